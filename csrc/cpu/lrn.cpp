// Local response normalisation across channels (VGG-M's and AlexNet's LRN), forward and input
// gradient, each in one pass over memory. torch's own form (models.BandLocalResponseNorm in Python)
// takes six passes each way; on the CPU at batch 64 those passes wait on memory.
//
//   d_c = k + alpha_n * sum_{j = c - lo .. c + hi} x_j^2     (lo = size / 2, hi = (size - 1) / 2;
//   y_c = x_c * d_c^-beta                                     alpha_n = alpha / size; zero outside)
//   dx_j = g_j p_j - 2 beta alpha_n x_j sum_{c = j - hi .. j + lo} g_c x_c p_c / d_c,   p = d^-beta
//
// The backward recomputes d from x instead of reading saved tensors: two streams in (x, g), one out.
// Pixels are taken in tiles of kTile: the tile's [C, kTile] block is copied into a local buffer
// (a transpose from channels-last, rows from NCHW), worked on with vector loops over the pixels, and
// written back. Every sum runs in channel order, as torch's average pooling does; the results equal
// torch's up to float32 rounding (tests/test_unit_objective.py).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "simd.h"

namespace neuroidx {
namespace {

constexpr int64_t kTile = 16;  // pixels per tile (one AVX-512 vector of float32)

struct LrnShape {
  int64_t B, C, HW;
  bool channels_last;
  int64_t lo, hi;
  float alpha_n, beta, k;
};

// The [C, n] block of pixels p0 .. p0 + n - 1 of image b, into a buffer with rows of kTile (rows n ..
// kTile - 1 zero, so that the vector loops read defined values), and back out.
inline void load_tile(const LrnShape& s, const float* __restrict src, float* __restrict buf, int64_t b, int64_t p0,
                      int64_t n) {
  if (n < kTile) std::fill_n(buf, s.C * kTile, 0.0f);
  if (s.channels_last) {
    const float* base = src + (b * s.HW + p0) * s.C;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < s.C; ++c) buf[c * kTile + t] = base[t * s.C + c];
  } else {
    for (int64_t c = 0; c < s.C; ++c) std::memcpy(buf + c * kTile, src + (b * s.C + c) * s.HW + p0, n * sizeof(float));
  }
}

inline void store_tile(const LrnShape& s, const float* __restrict buf, float* __restrict dst, int64_t b, int64_t p0,
                       int64_t n) {
  if (s.channels_last) {
    float* base = dst + (b * s.HW + p0) * s.C;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < s.C; ++c) base[t * s.C + c] = buf[c * kTile + t];
  } else {
    for (int64_t c = 0; c < s.C; ++c) std::memcpy(dst + (b * s.C + c) * s.HW + p0, buf + c * kTile, n * sizeof(float));
  }
}

// d = k + alpha_n * the sum of x_j^2 over channel c's window, for the tile's kTile pixels.
inline void divisor_row(const LrnShape& s, const float* xs, int64_t c, float* d) {
  float acc[kTile] = {};
  const int64_t j0 = std::max<int64_t>(0, c - s.lo), j1 = std::min<int64_t>(s.C - 1, c + s.hi);
  for (int64_t j = j0; j <= j1; ++j) {
    const float* row = xs + j * kTile;
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) acc[t] += row[t] * row[t];
  }
#pragma omp simd
  for (int64_t t = 0; t < kTile; ++t) d[t] = s.k + s.alpha_n * acc[t];
}

// p = d^-beta: beta = 0.75 as rsqrt(d) * sqrt(rsqrt(d)) (vector ops), any other beta through exp and log.
inline void power_row(const LrnShape& s, const float* d, float* p) {
  if (s.beta == 0.75f) {
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) {
      const float root = 1.0f / std::sqrt(d[t]);
      p[t] = root * std::sqrt(root);
    }
  } else {
    for (int64_t t = 0; t < kTile; ++t) p[t] = std::exp(-s.beta * std::log(d[t]));
  }
}

NX_WIDE_SIMD
void forward_tile(const LrnShape& s, const float* x, float* y, int64_t b, int64_t p0, int64_t n, float* xs,
                  float* out) {
  load_tile(s, x, xs, b, p0, n);
  float d[kTile], p[kTile];
  for (int64_t c = 0; c < s.C; ++c) {
    divisor_row(s, xs, c, d);
    power_row(s, d, p);
    const float* xr = xs + c * kTile;
    float* yr = out + c * kTile;
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) yr[t] = xr[t] * p[t];
  }
  store_tile(s, out, y, b, p0, n);
}

NX_WIDE_SIMD
void backward_tile(const LrnShape& s, const float* x, const float* g, float* gx, int64_t b, int64_t p0, int64_t n,
                   float* xs, float* gs, float* ps, float* ts) {
  load_tile(s, x, xs, b, p0, n);
  load_tile(s, g, gs, b, p0, n);
  float d[kTile];
  for (int64_t c = 0; c < s.C; ++c) {  // p and t = g x p / d per channel
    divisor_row(s, xs, c, d);
    float* pr = ps + c * kTile;
    power_row(s, d, pr);
    const float *xr = xs + c * kTile, *gr = gs + c * kTile;
    float* tr = ts + c * kTile;
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) tr[t] = gr[t] * xr[t] * pr[t] / d[t];
  }
  const float scale = -2.0f * s.beta * s.alpha_n;
  for (int64_t j = 0; j < s.C; ++j) {  // dx_j = g_j p_j + scale x_j sum_{c = j - hi .. j + lo} t_c
    float acc[kTile] = {};
    const int64_t c0 = std::max<int64_t>(0, j - s.hi), c1 = std::min<int64_t>(s.C - 1, j + s.lo);
    for (int64_t c = c0; c <= c1; ++c) {
      const float* tr = ts + c * kTile;
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) acc[t] += tr[t];
    }
    const float *xr = xs + j * kTile, *gr = gs + j * kTile, *pr = ps + j * kTile;
    float* out = xs + j * kTile;  // x_j is not read again: the result takes its place
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) out[t] = gr[t] * pr[t] + scale * xr[t] * acc[t];
  }
  store_tile(s, xs, gx, b, p0, n);
}

LrnShape lrn_shape(int64_t B, int64_t C, int64_t HW, bool channels_last, int64_t size, float alpha, float beta,
                   float k) {
  return LrnShape{B, C, HW, channels_last, size / 2, (size - 1) / 2, alpha / static_cast<float>(size), beta, k};
}

}  // namespace

void lrn_forward(const float* x, float* y, int64_t B, int64_t C, int64_t HW, bool channels_last, int64_t size,
                 float alpha, float beta, float k, int num_threads) {
  const LrnShape s = lrn_shape(B, C, HW, channels_last, size, alpha, beta, k);
  const int64_t tiles = (HW + kTile - 1) / kTile;
#pragma omp parallel num_threads(std::max(num_threads, 1)) if (B * C * HW >= (int64_t{1} << 16))
  {
    std::vector<float> xs(C * kTile), out(C * kTile);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * tiles; ++task) {
      const int64_t b = task / tiles, p0 = task % tiles * kTile;
      forward_tile(s, x, y, b, p0, std::min(kTile, HW - p0), xs.data(), out.data());
    }
  }
}

void lrn_backward(const float* x, const float* grad, float* grad_x, int64_t B, int64_t C, int64_t HW,
                  bool channels_last, int64_t size, float alpha, float beta, float k, int num_threads) {
  const LrnShape s = lrn_shape(B, C, HW, channels_last, size, alpha, beta, k);
  const int64_t tiles = (HW + kTile - 1) / kTile;
#pragma omp parallel num_threads(std::max(num_threads, 1)) if (B * C * HW >= (int64_t{1} << 16))
  {
    std::vector<float> xs(C * kTile), gs(C * kTile), ps(C * kTile), ts(C * kTile);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * tiles; ++task) {
      const int64_t b = task / tiles, p0 = task % tiles * kTile;
      backward_tile(s, x, grad, grad_x, b, p0, std::min(kTile, HW - p0), xs.data(), gs.data(), ps.data(),
                    ts.data());
    }
  }
}

}  // namespace neuroidx
