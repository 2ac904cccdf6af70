// Masked batched ablation on CPU (contract: neuroidx_fast/ops/reference.py).
//
// mask_replicas: M masked copies of a [B, C, H, W] map, written once each. A pure bit copy, so the
// kernel is generic in the element size (2, 4 or 8 bytes), never in the float type.
//
// readout_ablation_argmax: for every (unit, image), the argmax of the intact logits corrected for one
// ablated feature, certified against a rounding-error bound. float64 throughout, each operation in the
// reference's order and without fused multiply-adds, so every backend gives the same bits.
#include <cmath>
#include <cstring>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

#if defined(__clang__)
#define NX_NO_CONTRACT _Pragma("clang fp contract(off)")
#define NX_NO_CONTRACT_FN
#elif defined(__GNUC__)
#define NX_NO_CONTRACT
#define NX_NO_CONTRACT_FN __attribute__((optimize("fp-contract=off")))
#else
#define NX_NO_CONTRACT
#define NX_NO_CONTRACT_FN
#endif

namespace neuroidx {
namespace {

// Output rows r = m * B + b. Channels first (NCHW output): one (row, channel) plane at a time, either
// a fill or a copy of the source plane (a memcpy when the plane is contiguous in the source).
template <class T>
void replicas_nchw(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sb, int64_t sc, int64_t sh,
                   int64_t sw, const uint8_t* masks, int64_t M, const T* fill, T* out, int num_threads) {
  const int64_t hw = H * W;
  const bool plane_contiguous = (W == 1 || sw == 1) && (H == 1 || sh == W);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t t = 0; t < M * B * C; ++t) {
    const int64_t c = t % C;
    const int64_t r = t / C;
    const int64_t m = r / B, b = r % B;
    T* dst = out + t * hw;
    if (masks[m * C + c]) {
      const T v = fill[c];
      for (int64_t i = 0; i < hw; ++i) dst[i] = v;
    } else if (plane_contiguous) {
      std::memcpy(dst, x + b * sb + c * sc, static_cast<size_t>(hw) * sizeof(T));
    } else {
      const T* src = x + b * sb + c * sc;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t xx = 0; xx < W; ++xx) dst[y * W + xx] = src[y * sh + xx * sw];
    }
  }
}

// Channels last (NHWC output): one (row, position) pixel of C channels at a time, a select per channel.
template <class T>
void replicas_nhwc(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sb, int64_t sc, int64_t sh,
                   int64_t sw, const uint8_t* masks, int64_t M, const T* fill, T* out, int num_threads) {
  const int64_t hw = H * W;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t t = 0; t < M * B * hw; ++t) {
    const int64_t p = t % hw;
    const int64_t r = t / hw;
    const int64_t m = r / B, b = r % B;
    const int64_t y = p / W, xx = p % W;
    const T* src = x + b * sb + y * sh + xx * sw;
    const uint8_t* mrow = masks + m * C;
    T* dst = out + t * C;
    if (sc == 1) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dst[c] = mrow[c] ? fill[c] : src[c];
    } else {
      for (int64_t c = 0; c < C; ++c) dst[c] = mrow[c] ? fill[c] : src[c * sc];
    }
  }
}

template <class T>
void replicas_typed(const void* x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sb, int64_t sc, int64_t sh,
                    int64_t sw, const uint8_t* masks, int64_t M, const void* fill, void* out, bool channels_last,
                    int num_threads) {
  const T* xs = static_cast<const T*>(x);
  const T* fs = static_cast<const T*>(fill);
  T* os = static_cast<T*>(out);
  if (channels_last) {
    replicas_nhwc<T>(xs, B, C, H, W, sb, sc, sh, sw, masks, M, fs, os, num_threads);
  } else {
    replicas_nchw<T>(xs, B, C, H, W, sb, sc, sh, sw, masks, M, fs, os, num_threads);
  }
}

// Running state of one (unit, image): the first maximum of z, its bound, and the two largest upper
// bounds z + e with the (first) index of the largest, exactly as the reference's reductions.
struct ReadoutState {
  double z_best = -std::numeric_limits<double>::infinity();
  double e_best = 0.0;
  int64_t i_best = -1;
  double u1 = -std::numeric_limits<double>::infinity();
  int64_t i1 = -1;
  double u2 = -std::numeric_limits<double>::infinity();
  bool finite = true;
};

NX_NO_CONTRACT_FN void readout_one(const double* logits_row, const double* scale_row, const double* w_col,
                                   double f, double a, double err_rel, int64_t K, int64_t* pred) {
  NX_NO_CONTRACT
  const double d = a - f;
  const double ad = std::fabs(a) - std::fabs(f);
  ReadoutState s;
  for (int64_t k = 0; k < K; ++k) {
    const double w = w_col[k];
    const double t = w * d;
    const double z = logits_row[k] + t;
    const double sw = std::fabs(w) * ad;
    double bound = scale_row[k] + sw;
    bound = bound < 0.0 ? 0.0 : bound;  // NaN stays NaN (then the entry is not finite), as torch.clamp
    const double e = err_rel * bound;
    if (!std::isfinite(z) || !std::isfinite(e)) {
      s.finite = false;
      break;
    }
    if (z > s.z_best || s.i_best < 0) {
      s.z_best = z;
      s.e_best = e;
      s.i_best = k;
    }
    const double u = z + e;
    if (u > s.u1 || s.i1 < 0) {
      s.u2 = s.u1;
      s.u1 = u;
      s.i1 = k;
    } else if (u > s.u2) {
      s.u2 = u;
    }
  }
  if (!s.finite || s.i_best < 0) {
    *pred = -1;
    return;
  }
  const double other = s.i1 == s.i_best ? s.u2 : s.u1;
  const double lower = s.z_best - s.e_best;
  *pred = lower > other ? s.i_best : -1;
}

}  // namespace

void mask_replicas(const void* x, int64_t elem_size, int64_t B, int64_t C, int64_t H, int64_t W, int64_t stride_b,
                   int64_t stride_c, int64_t stride_h, int64_t stride_w, const uint8_t* masks, int64_t M,
                   const void* fill, void* out, bool channels_last, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  switch (elem_size) {
    case 2:
      replicas_typed<uint16_t>(x, B, C, H, W, stride_b, stride_c, stride_h, stride_w, masks, M, fill, out,
                               channels_last, num_threads);
      break;
    case 4:
      replicas_typed<uint32_t>(x, B, C, H, W, stride_b, stride_c, stride_h, stride_w, masks, M, fill, out,
                               channels_last, num_threads);
      break;
    case 8:
      replicas_typed<uint64_t>(x, B, C, H, W, stride_b, stride_c, stride_h, stride_w, masks, M, fill, out,
                               channels_last, num_threads);
      break;
    default:
      break;  // the binding rejects other sizes
  }
}

void readout_ablation_argmax(const double* logits, const double* features, const double* weight_t,
                             const double* ablated, const int64_t* units, int64_t U, const double* scale,
                             double err_rel, int64_t B, int64_t C, int64_t K, int64_t* pred, int num_threads) {
  if (num_threads < 1) num_threads = 1;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t t = 0; t < U * B; ++t) {
    const int64_t u = t / B, b = t % B;
    const int64_t c = units[u];
    readout_one(logits + b * K, scale + b * K, weight_t + c * K, features[b * C + c], ablated[c], err_rel, K,
                pred + t);
  }
}

}  // namespace neuroidx
