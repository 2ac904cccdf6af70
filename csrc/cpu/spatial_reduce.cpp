// spatial_reduce on CPU: one pass over each activation map gives its max, first argmax and mean.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace neuroidx {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct Float32 {
  using Storage = float;
  static inline float load(float v) { return v; }
};

struct BFloat16 {
  using Storage = uint16_t;
  static inline float load(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
};

struct Float16 {
  using Storage = uint16_t;
  // Exact IEEE half -> float, including subnormals, infinities and NaN payloads.
  static inline float load(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {
      const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;  // mantissa * 2^-24
      return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
};

// A contiguous map (stride_w == 1, stride_h == W): vectorised max + sum, then a scan for the first max.
// The sum runs in float32 vector lanes over chunks of kSumChunk elements, whose sums add up in float64
// (one float32 lane sum over a whole 224 x 224 map drifted to a relative error of 2e-6).
constexpr int64_t kSumChunk = 1024;

template <class T>
void reduce_contiguous_map(const typename T::Storage* p, int64_t n, float* out_max, int64_t* out_arg,
                           float* out_mean) {
  float m = kNegInf;
  double s = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kSumChunk) {
    const int64_t i1 = std::min(n, i0 + kSumChunk);
    float chunk = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : chunk)
    for (int64_t i = i0; i < i1; ++i) {
      const float v = T::load(p[i]);
      m = v > m ? v : m;
      chunk += v;
    }
    s += static_cast<double>(chunk);
  }
  if (std::isnan(s)) {  // a NaN in the map (or +inf + -inf): the first NaN, if any, is the answer
    for (int64_t i = 0; i < n; ++i) {
      const float v = T::load(p[i]);
      if (std::isnan(v)) {
        *out_max = v;
        *out_arg = i;
        *out_mean = v;
        return;
      }
    }
  }
  int64_t arg = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (T::load(p[i]) == m) {
      arg = i;
      break;
    }
  }
  *out_max = T::load(p[arg]);
  *out_arg = arg;
  *out_mean = static_cast<float>(s / static_cast<double>(n));
}

// Any strides, one map at a time.
template <class T>
void reduce_strided_map(const typename T::Storage* p, int64_t H, int64_t W, int64_t sh, int64_t sw, float* out_max,
                        int64_t* out_arg, float* out_mean) {
  float m = kNegInf;
  int64_t arg = -1, first_nan = -1;
  double s = 0.0;  // of the rows' float32 sums (as reduce_channels_last_block)
  for (int64_t y = 0; y < H; ++y) {
    float row = 0.0f;
    for (int64_t x = 0; x < W; ++x) {
      const float v = T::load(p[y * sh + x * sw]);
      if (v > m) {
        m = v;
        arg = y * W + x;
      } else if (std::isnan(v) && first_nan < 0) {
        first_nan = y * W + x;
      }
      row += v;
    }
    s += static_cast<double>(row);
  }
  if (first_nan >= 0) {  // that NaN itself, its bits as the other paths and backends give them
    const float v = T::load(p[first_nan / W * sh + first_nan % W * sw]);
    *out_max = v;
    *out_arg = first_nan;
    *out_mean = v;
    return;
  }
  if (arg < 0) arg = 0;  // every value is -inf
  *out_max = m;
  *out_arg = arg;
  *out_mean = static_cast<float>(s / static_cast<double>(H * W));
}

// Channels innermost (stride_c == 1, channels_last): walk positions, update a block of channels at once.
// Each channel's sum runs in float32 along a row of the map, and the rows' sums add up in float64: a
// float32 sum over the whole map, one position after another, drifted (relative error 8e-6 on maps of
// 224 x 224, against 1e-7 for the contiguous maps' vector sums), for a float64 add per channel and row.
template <class T>
void reduce_channels_last_block(const typename T::Storage* p, int64_t nc, int64_t H, int64_t W, int64_t sh,
                                int64_t sw, float* out_max, int64_t* out_arg, float* out_mean) {
  std::vector<float> m(nc, kNegInf), s(nc, 0.0f);
  std::vector<double> total(nc, 0.0);
  std::vector<int64_t> arg(nc, -1);
  float* mp = m.data();
  float* sp = s.data();
  double* tp = total.data();
  int64_t* ap = arg.data();
  for (int64_t y = 0; y < H; ++y) {
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) sp[c] = 0.0f;
    for (int64_t x = 0; x < W; ++x) {
      const typename T::Storage* row = p + y * sh + x * sw;
      const int64_t flat = y * W + x;
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c) {
        const float v = T::load(row[c]);
        const bool greater = v > mp[c];
        mp[c] = greater ? v : mp[c];
        ap[c] = greater ? flat : ap[c];
        sp[c] += v;
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) tp[c] += static_cast<double>(sp[c]);
  }
  for (int64_t c = 0; c < nc; ++c) {
    if (std::isnan(tp[c])) {  // rare: redo this channel with the NaN-aware scalar loop
      reduce_strided_map<T>(p + c, H, W, sh, sw, out_max + c, out_arg + c, out_mean + c);
      continue;
    }
    out_max[c] = mp[c];
    out_arg[c] = ap[c] < 0 ? 0 : ap[c];
    out_mean[c] = static_cast<float>(tp[c] / static_cast<double>(H * W));
  }
}

template <class T>
void spatial_reduce_typed(const void* xv, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sb, int64_t sc,
                          int64_t sh, int64_t sw, float* out_max, int64_t* out_arg, float* out_mean,
                          int num_threads) {
  using S = typename T::Storage;
  const S* x = static_cast<const S*>(xv);
  const int64_t n = H * W;
  // Element i of the map lies at p + i.
  const bool map_contiguous = (W == 1 || sw == 1) && (H == 1 || sh == W);
  if (map_contiguous && !(sc == 1 && n > 1 && C > 1)) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < B * C; ++r) {
      const int64_t b = r / C, c = r % C;
      reduce_contiguous_map<T>(x + b * sb + c * sc, n, out_max + r, out_arg + r, out_mean + r);
    }
  } else if (sc == 1) {
    constexpr int64_t kBlock = 256;
    const int64_t blocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < B * blocks; ++t) {
      const int64_t b = t / blocks, c0 = (t % blocks) * kBlock;
      const int64_t nc = std::min(kBlock, C - c0);
      const int64_t r = b * C + c0;
      reduce_channels_last_block<T>(x + b * sb + c0, nc, H, W, sh, sw, out_max + r, out_arg + r, out_mean + r);
    }
  } else {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t r = 0; r < B * C; ++r) {
      const int64_t b = r / C, c = r % C;
      reduce_strided_map<T>(x + b * sb + c * sc, H, W, sh, sw, out_max + r, out_arg + r, out_mean + r);
    }
  }
}

}  // namespace

void spatial_reduce(const void* x, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t stride_b,
                    int64_t stride_c, int64_t stride_h, int64_t stride_w, float* out_max, int64_t* out_argmax,
                    float* out_mean, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  switch (dtype) {
    case DType::Float32:
      spatial_reduce_typed<Float32>(x, B, C, H, W, stride_b, stride_c, stride_h, stride_w, out_max, out_argmax,
                                    out_mean, num_threads);
      break;
    case DType::Float16:
      spatial_reduce_typed<Float16>(x, B, C, H, W, stride_b, stride_c, stride_h, stride_w, out_max, out_argmax,
                                    out_mean, num_threads);
      break;
    case DType::BFloat16:
      spatial_reduce_typed<BFloat16>(x, B, C, H, W, stride_b, stride_c, stride_h, stride_w, out_max, out_argmax,
                                     out_mean, num_threads);
      break;
  }
}

}  // namespace neuroidx
