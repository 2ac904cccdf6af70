// gather_crops and accumulate_crops on CPU: cut receptive-field crops out of images (pixels outside an
// image take a per-channel pad value, or the nearest image pixel in edge mode), either copied out or
// added, weighted, into float64 per-unit sums (the Neuron Feature numerators).
//
// A row of a crop is three runs: columns left of the image, the in-image span (one contiguous run of
// the image row: a memcpy, or a vectorised multiply-add), and columns right of it. The two outer runs
// hold one value each (the pad value, or the row's first / last pixel in edge mode). accumulate adds
// two crops per pass over a sums row (their runs merged), halving the loads and stores of the sums; from
// codes on CPUs with AVX-512 VBMI, crop_runs_avx512.h adds each crop row whole, its outer runs masked in.
//
// Images come as float32 pixels or as uint8 pixel codes (reference.py): code k stands for the float32
// nearest k / 255, what torchvision's to_tensor makes of an 8-bit file. Reading codes moves a quarter of
// the bytes (large crops from float32 images wait on memory), and decode() turns each into exactly that
// float32, so the products and sums below are the same bits as from the float32 image.
//
// Exactness (reference.py): gather is a copy. accumulate adds float64(w) * float64(pixel) to the sum
// of each output element for j = 0, 1, ... in order; a float32 x float32 product is exact in float64,
// so whether the compiler fuses the multiply-add or not, every addition rounds exactly as the
// reference's `sums + terms` does. Only the order of the additions into one element matters, so the
// work is split freely over units, channels and row blocks, each of which runs its j loop in order.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "crop_runs_avx512.h"  // the accumulation loop by hand, where the CPU has AVX-512 VBMI
#include "kernels.h"
#include "simd.h"  // the accumulation loop is the hot one: built for AVX-512 and AVX2 as well

// Each crop row is a short run (r pixels) in a random image, which the hardware prefetchers do not
// foresee: left alone, every row waits on memory (measured: 3x slower). So while the kernels work on
// row i of one crop, they prefetch row i of the crop kNext places ahead, into L2. GCC deems a function
// that only prefetches pure and drops the calls to it unless it is inlined first, hence the forced
// inline.
#if defined(__GNUC__) || defined(__clang__)
#define NX_PREFETCH(address) __builtin_prefetch((address), 0, 2)
#define NX_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define NX_PREFETCH(address) ((void)(address))
#define NX_ALWAYS_INLINE inline
#endif

namespace neuroidx {
namespace {

constexpr int64_t kNext = 2;         // prefetch distance, in crops
constexpr int64_t kBlockDoubles = 16384;  // sums a task works on at most: 128 KiB, within L2
constexpr int64_t kTasksPerThread = 4;
constexpr int64_t kLineBytes = 64;   // cache line
// Below this many pixels (gather) or pixel additions (accumulate) one thread does the work: starting
// the team would cost more than it saves.
constexpr int64_t kParallelWork = int64_t{1} << 18;

// The float32 value of a pixel. A code k stands for k / 255 rounded to float32: the IEEE division
// float32(k) / 255 (what torch computes for images.float() / 255 on CPU), computed here as such: one
// vector division per 8 or 16 codes, which the divider runs beside the conversions and multiply-adds
// (a table lookup would be a gather, slower). Checked for all 256 codes against torch
// (tests/test_crops.py, via pixel_code_values()).
inline float decode(float x) { return x; }
inline float decode(uint8_t k) { return static_cast<float>(k) / 255.0f; }

// Where a crop's columns (or rows) [x0, x0 + n) fall relative to an image axis [0, extent), extent > 0:
// `before` positions precede it, then `inside` positions start at image coordinate `first`, and the
// rest follow it. Coordinates far outside are clamped first, which changes no pixel (every position
// beyond a border reads the same pad or edge value) and keeps the arithmetic clear of overflow.
struct AxisSplit {
  int64_t before, first, inside, after;
};

inline AxisSplit split_axis(int64_t x0, int64_t n, int64_t extent) {
  x0 = std::min(std::max(x0, -n), extent);
  AxisSplit s;
  s.before = x0 < 0 ? std::min(-x0, n) : 0;
  s.first = std::max<int64_t>(x0, 0);
  const int64_t end = std::min(x0 + n, extent);
  s.inside = end > s.first ? end - s.first : 0;
  s.after = n - s.before - s.inside;
  return s;
}

// Edge mode: the image column whose pixel fills the columns right of the image, the row's last pixel
// in the crop (cols.first is W when the crop lies entirely right of the image).
inline int64_t right_edge_column(const AxisSplit& cols) {
  return std::max<int64_t>(cols.first + cols.inside, 1) - 1;
}

// Edge mode: the pixels that fill a crop row's columns left / right of the image, the row's first /
// last pixel. Read only where there are such columns (otherwise 0, unused): row[0] is a cache line of
// its own for a crop away from the left border (measured on bench/bench_crops.py's 44 px crops from
// float32: 102 ms in edge mode against 58 with gray padding while every row read it).
template <class T>
inline float left_edge_pixel(const T* row, const AxisSplit& cols) {
  return cols.before > 0 ? decode(row[0]) : 0.0f;
}

template <class T>
inline float right_edge_pixel(const T* row, const AxisSplit& cols) {
  return cols.after > 0 ? decode(row[right_edge_column(cols)]) : 0.0f;
}

// Image row of crop row y (y already clamped to [-rh, H]); nullptr when it lies outside the image in
// constant-pad mode. Edge mode takes the nearest row.
template <class T>
inline const T* source_row(const T* plane, int64_t y, int64_t H, int64_t W, bool edge) {
  if (y < 0 || y >= H) {
    if (!edge) return nullptr;
    y = y < 0 ? 0 : H - 1;
  }
  return plane + y * W;
}

// One crop channel: its image plane (nullptr for an empty slot), first row and column split.
template <class T>
struct CropRef {
  const T* plane;
  int64_t y0;
  AxisSplit cols;
};

template <class T>
inline CropRef<T> crop_ref(const T* images, int64_t slot, const int64_t* top, int64_t c, int64_t Ch, int64_t H,
                           int64_t W, int64_t rh, int64_t rw) {
  if (slot < 0) return CropRef<T>{nullptr, 0, AxisSplit{0, 0, 0, 0}};
  return CropRef<T>{images + (slot * Ch + c) * H * W, std::min(std::max(top[0], -rh), H), split_axis(top[1], rw, W)};
}

// Prefetch the in-image span of crop row i (rows outside the image hold no pixel, or, in edge mode,
// the first or last image row, which the crop's other rows keep in cache).
template <class T>
NX_ALWAYS_INLINE void prefetch_row(const CropRef<T>& crop, int64_t i, int64_t H, int64_t W) {
  const int64_t y = crop.y0 + i;
  if (crop.plane == nullptr || crop.cols.inside == 0 || y < 0 || y >= H) return;
  const T* begin = crop.plane + y * W + crop.cols.first;
  for (int64_t k = 0; k < crop.cols.inside; k += kLineBytes / int64_t{sizeof(T)}) NX_PREFETCH(begin + k);
  NX_PREFETCH(begin + crop.cols.inside - 1);
}

inline void copy_span(float* __restrict dst, const float* __restrict src, int64_t n) {
  if (n > 0) std::memcpy(dst, src, sizeof(float) * n);
}

inline void copy_span(float* __restrict dst, const uint8_t* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] = decode(src[k]);
}

template <class T>
inline void copy_row(float* dst, const T* row, const AxisSplit& cols, bool edge, float pad) {
  if (row == nullptr) {
    std::fill_n(dst, cols.before + cols.inside + cols.after, pad);
    return;
  }
  const float left = edge ? left_edge_pixel(row, cols) : pad;
  const float right = edge ? right_edge_pixel(row, cols) : pad;
  std::fill_n(dst, cols.before, left);
  copy_span(dst + cols.before, row + cols.first, cols.inside);
  std::fill_n(dst + cols.before + cols.inside, cols.after, right);
}

inline void add_constant(double* dst, int64_t n, double term) {
  for (int64_t k = 0; k < n; ++k) dst[k] += term;
}

template <class T>
NX_ALWAYS_INLINE void add_scaled(double* __restrict dst, const T* __restrict src, int64_t n, double w) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) dst[k] += w * static_cast<double>(decode(src[k]));
}

// Crop planes t = m * Ch + c for t in [t0, t1) of the gathered output (an empty slot gives zeros).
template <class T>
void gather_planes(float* out, const T* images, const int64_t* slots, const int64_t* tops, int64_t t0,
                   int64_t t1, int64_t Ch, int64_t H, int64_t W, int64_t rh, int64_t rw, const float* pad) {
  const bool edge = pad == nullptr;
  auto ref = [&](int64_t t) {
    const int64_t m = t / Ch;
    return crop_ref(images, slots[m], tops + 2 * m, t % Ch, Ch, H, W, rh, rw);
  };
  for (int64_t t = t0; t < t1; ++t) {
    float* dst = out + t * rh * rw;
    const CropRef<T> crop = ref(t);
    if (crop.plane == nullptr) {
      std::fill_n(dst, rh * rw, 0.0f);
      continue;
    }
    const CropRef<T> next = t + kNext < t1 ? ref(t + kNext) : CropRef<T>{nullptr, 0, AxisSplit{0, 0, 0, 0}};
    const float fill = edge ? 0.0f : pad[t % Ch];
    for (int64_t i = 0; i < rh; ++i) {
      prefetch_row(next, i, H, W);
      copy_row(dst + i * rw, source_row(crop.plane, crop.y0 + i, H, W, edge), crop.cols, edge, fill);
    }
  }
}

// One crop row as the sums row sees it, weighted: columns [0, before) add `left`, the next `inside`
// columns add w * span[k], the rest add `right` (span is nullptr when the row lies outside the image in
// constant-pad mode: the whole row adds `left`).
template <class T>
struct RowTerms {
  const T* span;
  int64_t before, inside;
  double w, left, right;
};

template <class T>
NX_ALWAYS_INLINE RowTerms<T> row_terms(const CropRef<T>& crop, int64_t i, int64_t H, int64_t W, int64_t rw,
                                       double w, double pad_term, bool edge) {
  const T* row = source_row(crop.plane, crop.y0 + i, H, W, edge);
  if (row == nullptr) return RowTerms<T>{nullptr, rw, 0, w, pad_term, pad_term};
  const AxisSplit& cols = crop.cols;
  const double left = edge ? w * static_cast<double>(left_edge_pixel(row, cols)) : pad_term;
  const double right = edge ? w * static_cast<double>(right_edge_pixel(row, cols)) : pad_term;
  return RowTerms<T>{row + cols.first, cols.before, cols.inside, w, left, right};
}

template <class T>
NX_ALWAYS_INLINE void add_row(double* dst, const RowTerms<T>& a, int64_t rw) {
  add_constant(dst, a.before, a.left);
  add_scaled(dst + a.before, a.span, a.inside, a.w);
  add_constant(dst + a.before + a.inside, rw - a.before - a.inside, a.right);
}

// dst[k] = (dst[k] + term_a(k)) + term_b(k) for k < n, where each term is a constant (span nullptr)
// or w * pixel: two crops' additions in their order, with one load and store of the sums between them.
template <class T>
NX_ALWAYS_INLINE void add_pair_run(double* __restrict dst, int64_t n, const T* __restrict sa, double wa, double ca,
                                   const T* __restrict sb, double wb, double cb) {
  if (sa != nullptr && sb != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k)
      dst[k] = (dst[k] + wa * static_cast<double>(decode(sa[k]))) + wb * static_cast<double>(decode(sb[k]));
  } else if (sa != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dst[k] = (dst[k] + wa * static_cast<double>(decode(sa[k]))) + cb;
  } else if (sb != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dst[k] = (dst[k] + ca) + wb * static_cast<double>(decode(sb[k]));
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = (dst[k] + ca) + cb;
  }
}

// The run of columns of `t` that contains column k0: returns its end; *span points at the pixel of
// column k0 (nullptr for a constant run, whose value goes to *constant).
template <class T>
NX_ALWAYS_INLINE int64_t run_at(const RowTerms<T>& t, int64_t k0, int64_t rw, const T** span, double* constant) {
  *span = nullptr;
  if (t.span == nullptr || k0 < t.before) {
    *constant = t.left;
    return t.span == nullptr ? rw : t.before;
  }
  if (k0 < t.before + t.inside) {
    *span = t.span + (k0 - t.before), *constant = 0.0;
    return t.before + t.inside;
  }
  *constant = t.right;
  return rw;
}

template <class T>
NX_ALWAYS_INLINE void add_row_pair(double* dst, const RowTerms<T>& a, const RowTerms<T>& b, int64_t rw) {
  int64_t k0 = 0;
  while (k0 < rw) {
    const T *sa, *sb;
    double ca, cb;
    const int64_t k1 = std::min(run_at(a, k0, rw, &sa, &ca), run_at(b, k0, rw, &sb, &cb));
    add_pair_run<T>(dst + k0, k1 - k0, sa, a.w, ca, sb, b.w, cb);
    k0 = k1;
  }
}

// Rows [i0, i1) of sums[u, c] += w_j * crop_j for the unit's crops j = crops[0 .. n-1] (its slots that
// hold an image, in j order). Two crops at a time share one pass over the sums rows (half the sums
// loads and stores), each still added in its turn.
template <class T>
NX_ALWAYS_INLINE void accumulate_block(double* sums, const T* images, const int64_t* slots, const int64_t* tops,
                                       const float* weights, const int64_t* crops, int64_t n, int64_t c, int64_t Ch,
                                       int64_t H, int64_t W, int64_t rh, int64_t rw, int64_t i0, int64_t i1,
                                       const float* pad) {
  const bool edge = pad == nullptr;
  const CropRef<T> none{nullptr, 0, AxisSplit{0, 0, 0, 0}};
  auto ref = [&](int64_t q) {
    return q < n ? crop_ref(images, slots[crops[q]], tops + 2 * crops[q], c, Ch, H, W, rh, rw) : none;
  };
  for (int64_t q = 0; q < n; q += 2) {
    const CropRef<T> a = ref(q), b = ref(q + 1);
    const CropRef<T> next_a = ref(q + kNext), next_b = ref(q + kNext + 1);
    const double wa = static_cast<double>(weights[crops[q]]);
    const double wb = q + 1 < n ? static_cast<double>(weights[crops[q + 1]]) : 0.0;
    const double pad_a = edge ? 0.0 : wa * static_cast<double>(pad[c]);
    const double pad_b = edge ? 0.0 : wb * static_cast<double>(pad[c]);
    for (int64_t i = i0; i < i1; ++i) {
      prefetch_row(next_a, i, H, W);
      prefetch_row(next_b, i, H, W);
      double* dst = sums + i * rw;
      if (b.plane != nullptr) {  // a always holds a crop (q < n); b not past the last one
        add_row_pair<T>(dst, row_terms(a, i, H, W, rw, wa, pad_a, edge),
                        row_terms(b, i, H, W, rw, wb, pad_b, edge), rw);
      } else {
        add_row<T>(dst, row_terms(a, i, H, W, rw, wa, pad_a, edge), rw);
      }
    }
  }
}

// The multi-versioned entry points, one per pixel type (the template is inlined into each clone).
NX_WIDE_SIMD
void accumulate_block_f32(double* sums, const float* images, const int64_t* slots, const int64_t* tops,
                          const float* weights, const int64_t* crops, int64_t n, int64_t c, int64_t Ch, int64_t H,
                          int64_t W, int64_t rh, int64_t rw, int64_t i0, int64_t i1, const float* pad) {
  accumulate_block<float>(sums, images, slots, tops, weights, crops, n, c, Ch, H, W, rh, rw, i0, i1, pad);
}

NX_WIDE_SIMD
void accumulate_block_u8(double* sums, const uint8_t* images, const int64_t* slots, const int64_t* tops,
                         const float* weights, const int64_t* crops, int64_t n, int64_t c, int64_t Ch, int64_t H,
                         int64_t W, int64_t rh, int64_t rw, int64_t i0, int64_t i1, const float* pad) {
  accumulate_block<uint8_t>(sums, images, slots, tops, weights, crops, n, c, Ch, H, W, rh, rw, i0, i1, pad);
}

#ifdef NX_CROP_AVX512
// Crop row i as crop_runs_avx512.h's row loop reads it (its weight, masks and, with constant padding,
// pad value already in *row): its term, and its origin and edge pixels.
NX_AVX512 NX_ALWAYS_INLINE avx512::Term code_row(const CropRef<uint8_t>& crop, int64_t i, int64_t H, int64_t W,
                                                 int64_t rw, bool edge, avx512::CodeRow* row) {
  using avx512::kPixelScale;
  const uint8_t* source = source_row(crop.plane, crop.y0 + i, H, W, edge);
  if (source == nullptr) return avx512::Term::kConstant;
  const AxisSplit& cols = crop.cols;
  row->origin = reinterpret_cast<uintptr_t>(source + cols.first) - static_cast<uintptr_t>(cols.before);
  if (edge) {
    row->left = _mm512_set1_pd(static_cast<double>(left_edge_pixel(source, cols)) * kPixelScale);
    row->right = _mm512_set1_pd(static_cast<double>(right_edge_pixel(source, cols)) * kPixelScale);
  }
  return cols.inside == rw ? avx512::Term::kFull : avx512::Term::kPixels;
}

// accumulate_block from codes with the AVX-512 row loop: each crop row is added whole, eight or sixteen
// columns at a time, its pad or edge columns masked in (no run splits a row at a border).
NX_AVX512
void accumulate_block_u8_avx512(double* sums, const uint8_t* images, const int64_t* slots, const int64_t* tops,
                                const float* weights, const int64_t* crops, int64_t n, int64_t c, int64_t Ch,
                                int64_t H, int64_t W, int64_t rh, int64_t rw, int64_t i0, int64_t i1,
                                const float* pad) {
  using avx512::kPixelScale, avx512::kWeightScale;
  const bool edge = pad == nullptr;
  const CropRef<uint8_t> none{nullptr, 0, AxisSplit{0, 0, 0, 0}};
  auto ref = [&](int64_t q) {
    return q < n ? crop_ref(images, slots[crops[q]], tops + 2 * crops[q], c, Ch, H, W, rh, rw) : none;
  };
  const int64_t mask_bytes = avx512::ColumnMasks::chunks(rw) + 1;
  std::vector<uint8_t> masks(4 * mask_bytes);
  const __m512d pad_pixel = _mm512_set1_pd(edge ? 0.0 : static_cast<double>(pad[c]) * kPixelScale);
  avx512::CodeRow rows[2];
  for (int s = 0; s < 2; ++s) {
    rows[s].origin = 0;
    rows[s].masks = avx512::ColumnMasks{masks.data() + 2 * s * mask_bytes, masks.data() + (2 * s + 1) * mask_bytes};
    rows[s].left = rows[s].right = pad_pixel;
  }
  for (int64_t q = 0; q < n; q += 2) {
    // The pass's crops, in j order.
    CropRef<uint8_t> pass[2];
    const int64_t count = std::min<int64_t>(2, n - q);
    for (int64_t t = 0; t < count; ++t) {
      pass[t] = ref(q + t);
      rows[t].w = _mm512_set1_pd(static_cast<double>(weights[crops[q + t]]) * kWeightScale);
      rows[t].masks.fill(pass[t].cols.before, pass[t].cols.inside, rw);
    }
    const CropRef<uint8_t> next_a = ref(q + kNext), next_b = ref(q + kNext + 1);
    for (int64_t i = i0; i < i1; ++i) {
      prefetch_row(next_a, i, H, W);
      prefetch_row(next_b, i, H, W);
      const avx512::Term ta = code_row(pass[0], i, H, W, rw, edge, &rows[0]);
      const avx512::Term tb = count == 2 ? code_row(pass[1], i, H, W, rw, edge, &rows[1]) : avx512::Term::kNone;
      if (edge) {
        avx512::add_rows<true>(sums + i * rw, rw, ta, rows[0], tb, rows[1]);
      } else {
        avx512::add_rows<false>(sums + i * rw, rw, ta, rows[0], tb, rows[1]);
      }
    }
  }
}
#endif

// Whether accumulate_crops takes the AVX-512 loops: where the CPU runs them, unless
// set_crop_kernels_avx512(false) turned them off (the tests compare both paths).
std::atomic<bool> use_avx512{avx512::cpu_has_avx512_vbmi()};

inline void accumulate_block_any(double* sums, const float* images, const int64_t* slots, const int64_t* tops,
                                 const float* weights, const int64_t* crops, int64_t n, int64_t c, int64_t Ch,
                                 int64_t H, int64_t W, int64_t rh, int64_t rw, int64_t i0, int64_t i1,
                                 const float* pad) {
  accumulate_block_f32(sums, images, slots, tops, weights, crops, n, c, Ch, H, W, rh, rw, i0, i1, pad);
}

inline void accumulate_block_any(double* sums, const uint8_t* images, const int64_t* slots, const int64_t* tops,
                                 const float* weights, const int64_t* crops, int64_t n, int64_t c, int64_t Ch,
                                 int64_t H, int64_t W, int64_t rh, int64_t rw, int64_t i0, int64_t i1,
                                 const float* pad) {
#ifdef NX_CROP_AVX512
  if (use_avx512.load(std::memory_order_relaxed))
    return accumulate_block_u8_avx512(sums, images, slots, tops, weights, crops, n, c, Ch, H, W, rh, rw, i0, i1,
                                      pad);
#endif
  accumulate_block_u8(sums, images, slots, tops, weights, crops, n, c, Ch, H, W, rh, rw, i0, i1, pad);
}

template <class T>
void gather_crops_impl(const T* images, int64_t Ch, int64_t H, int64_t W, const int64_t* slots, const int64_t* tops,
                       int64_t M, int64_t rh, int64_t rw, const float* pad, float* out, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  // Chunks of consecutive planes, so that the prefetch of the next crop serves this thread.
  constexpr int64_t kChunk = 16;
  const int64_t planes = M * Ch;
  const int64_t chunks = (planes + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (planes * rh * rw >= kParallelWork)
  for (int64_t b = 0; b < chunks; ++b) {
    gather_planes(out, images, slots, tops, b * kChunk, std::min(planes, (b + 1) * kChunk), Ch, H, W, rh, rw, pad);
  }
}

// Channels [c0, c1) of sums [U, Ch, rh, rw]: sums channel c reads channel image_c0 + (c - c0) of images
// with image_channels channels (the images' own channel c, or a scratch holding only channel c).
template <class T>
void accumulate_channels(double* sums, int64_t U, int64_t Ch, int64_t c0, int64_t c1, int64_t rh, int64_t rw,
                         const T* images, int64_t image_channels, int64_t image_c0, int64_t H, int64_t W,
                         const int64_t* slots, const int64_t* tops, const float* weights, int64_t J, const float* pad,
                         int num_threads) {
  if (num_threads < 1) num_threads = 1;
  const int64_t channels = c1 - c0;
  if (channels <= 0) return;
  // A task adds the J crops to one block of rows of a unit's channel plane: the whole plane when its
  // sums fit in L2 (kBlockDoubles), so that each crop is read top to bottom in one go, fewer pages
  // and a pattern the hardware prefetcher follows (measured on the 100 x 100 crops of
  // bench/bench_crops.py: 82 ms from codes against 97 ms with blocks of 16 KiB, which stay in L1
  // but revisit every crop five times). Smaller blocks where there are few units, so that every
  // thread gets several tasks. (Tried: a sums row held in registers while all J crops add their row
  // to it, from codes with AVX-512: 1.2x faster with the crops in cache, but 1.5x slower on 512
  // images, where J crops read a row at a time are J interleaved streams that the prefetchers do not
  // follow; staging rows or prefetching whole blocks did not recover it, and groups of 4-10 crops a
  // pass were no faster than these pairs. Also tried: finding each pair's row terms once per run of
  // rows that keep them, not once per row: with gray padding 4-7% slower in cache, 8% faster on the
  // 44 px layer, the same on the 100 px one; 12% faster with edge padding. The 100 px layer from codes
  // is bound by the vector units, not by memory: 52.5 ms with all its crops in cache against 54.2 ms
  // from the 512 images, 117 ms on one thread; its loop issues 16 zmm operations per 16 columns of two
  // crops: decode (byte permute, conversion, shift) and multiply-add, four each.)
  const int64_t rows_in_cache = std::max<int64_t>(1, kBlockDoubles / std::max<int64_t>(rw, 1));
  const int64_t blocks_for_threads = (kTasksPerThread * num_threads + U * channels - 1) / (U * channels);
  const int64_t wanted_blocks = std::min(rh, std::max((rh + rows_in_cache - 1) / rows_in_cache, blocks_for_threads));
  const int64_t block_rows = (rh + wanted_blocks - 1) / wanted_blocks;
  const int64_t blocks = (rh + block_rows - 1) / block_rows;
  const int64_t tasks = U * channels * blocks;
  // Each unit's crops: its slots that hold an image, in j order. The loops then pair crops that both
  // add something, and a unit with none among these images costs nothing: neuron_features passes the
  // top images in batches, which hold a few of each unit's K (on 64 of 512 images, the 44 px layer of
  // bench/bench_crops.py took 12 ms with every slot empty when each task stepped through them).
  std::vector<int64_t> crops(static_cast<size_t>(U * J)), counts(static_cast<size_t>(U), 0);
  for (int64_t u = 0; u < U; ++u) {
    for (int64_t j = 0; j < J; ++j) {
      if (slots[u * J + j] >= 0) crops[u * J + counts[u]++] = j;
    }
  }
  // Channel-major order: while every unit's crops of channel c are added, the images' channel-c planes
  // are all that is read (a third of the bytes), which the last-level cache can hold where all the
  // images do not (e.g. 512 images of 224 x 224 as uint8 codes: 26 MB a channel).
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (U * channels * rh * rw * J >= kParallelWork)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t c = c0 + t / (U * blocks), u = t / blocks % U, b = t % blocks;
    if (counts[u] == 0) continue;
    const int64_t image_c = image_c0 + (c - c0);
    const int64_t i0 = b * block_rows, i1 = std::min(rh, i0 + block_rows);
    // pad[image_c] of the shifted pointer is the pad value of channel c
    accumulate_block_any(sums + (u * Ch + c) * rh * rw, images, slots + u * J, tops + 2 * u * J, weights + u * J,
                         crops.data() + u * J, counts[u], image_c, image_channels, H, W, rh, rw, i0, i1,
                         pad == nullptr ? nullptr : pad + (c - image_c));
  }
}

// codes[k] = the code of images[k]; true when every pixel is exactly its code's value, bit for bit.
// Branch-free so that it vectorises: adding 1.5 * 2^23 rounds x * 255 to an integer held in the low
// mantissa bits (for x in range; any other pixel gets some code and fails the check that follows).
// Where the CPU has AVX-512 VBMI, encode_chunk takes crop_runs_avx512.h's pass instead (no division).
NX_WIDE_SIMD
bool encode_span(const float* __restrict images, int64_t n, uint8_t* __restrict codes) {
  uint32_t ok = 1;
#pragma omp simd reduction(& : ok)
  for (int64_t k = 0; k < n; ++k) {
    const float x = images[k];
    const float shifted = x * 255.0f + 12582912.0f;
    uint32_t bits, x_bits;
    std::memcpy(&bits, &shifted, sizeof bits);
    std::memcpy(&x_bits, &x, sizeof x_bits);
    const uint8_t code = static_cast<uint8_t>(bits & 0xFFu);
    codes[k] = code;
    // Bit equality with the code's pixel: equal values, and no -0.0 (those pixels are >= +0.0, never NaN).
    ok &= static_cast<uint32_t>(decode(code) == x) & ((x_bits >> 31) ^ 1u);
  }
  return ok != 0;
}

inline bool encode_chunk(const float* images, int64_t n, uint8_t* codes) {
#ifdef NX_CROP_AVX512
  if (use_avx512.load(std::memory_order_relaxed)) return avx512::encode_span(images, n, codes);
#endif
  return encode_span(images, n, codes);
}

// One piece of pixel_codes' work: codes[k] = the code of pixels[k] for k < n.
struct CodePiece {
  const float* pixels;
  int64_t n;
  uint8_t* codes;
};

// The codes of pieces(b) for b < count (work: their pixels in all), over the threads; true when every
// pixel is its code's value. The pieces left once some pixel is not a code are skipped: images that
// are not 8-bit cost about a piece per thread (the cpp accumulate_crops tries the float32 images where
// codes would pay off).
template <class Pieces>
bool encode_pieces(int64_t count, int64_t work, int num_threads, Pieces pieces) {
  if (num_threads < 1) num_threads = 1;
  std::atomic<bool> exact{true};
#pragma omp parallel for schedule(static) num_threads(num_threads) if (work >= kParallelWork)
  for (int64_t b = 0; b < count; ++b) {
    if (!exact.load(std::memory_order_relaxed)) continue;
    const CodePiece piece = pieces(b);
    if (!encode_chunk(piece.pixels, piece.n, piece.codes)) exact.store(false, std::memory_order_relaxed);
  }
  return exact.load();
}

}  // namespace

float pixel_code_value(uint8_t code) { return decode(code); }

bool crop_kernels_avx512() { return use_avx512.load(); }

bool set_crop_kernels_avx512(bool enable) {
  use_avx512.store(enable && avx512::cpu_has_avx512_vbmi());
  return use_avx512.load();
}

bool pixel_codes(const float* images, int64_t n, uint8_t* codes, int num_threads) {
  constexpr int64_t kChunk = int64_t{1} << 16;
  return encode_pieces((n + kChunk - 1) / kChunk, n, num_threads, [&](int64_t b) {
    const int64_t k0 = b * kChunk;
    return CodePiece{images + k0, std::min(n, k0 + kChunk) - k0, codes + k0};
  });
}

namespace {

// codes [N, plane] = the codes of channel c of images [N, Ch, plane]; true when every pixel is its code's.
bool channel_codes(const float* images, int64_t N, int64_t Ch, int64_t plane, int64_t c, uint8_t* codes,
                   int num_threads) {
  return encode_pieces(N, N * plane, num_threads, [&](int64_t n) {
    return CodePiece{images + (n * Ch + c) * plane, plane, codes + n * plane};
  });
}

}  // namespace

void gather_crops(const float* images, int64_t N, int64_t Ch, int64_t H, int64_t W, const int64_t* slots,
                  const int64_t* tops, int64_t M, int64_t rh, int64_t rw, const float* pad, float* out,
                  int num_threads) {
  (void)N;
  gather_crops_impl(images, Ch, H, W, slots, tops, M, rh, rw, pad, out, num_threads);
}

void gather_crops(const uint8_t* codes, int64_t N, int64_t Ch, int64_t H, int64_t W, const int64_t* slots,
                  const int64_t* tops, int64_t M, int64_t rh, int64_t rw, const float* pad, float* out,
                  int num_threads) {
  (void)N;
  gather_crops_impl(codes, Ch, H, W, slots, tops, M, rh, rw, pad, out, num_threads);
}

void accumulate_crops(double* sums, int64_t U, int64_t Ch, int64_t rh, int64_t rw, const float* images, int64_t N,
                      int64_t H, int64_t W, const int64_t* slots, const int64_t* tops, const float* weights,
                      int64_t J, const float* pad, int num_threads) {
  (void)N;
  accumulate_channels(sums, U, Ch, 0, Ch, rh, rw, images, Ch, 0, H, W, slots, tops, weights, J, pad, num_threads);
}

void accumulate_crops(double* sums, int64_t U, int64_t Ch, int64_t rh, int64_t rw, const uint8_t* codes, int64_t N,
                      int64_t H, int64_t W, const int64_t* slots, const int64_t* tops, const float* weights,
                      int64_t J, const float* pad, int num_threads) {
  (void)N;
  accumulate_channels(sums, U, Ch, 0, Ch, rh, rw, codes, Ch, 0, H, W, slots, tops, weights, J, pad, num_threads);
}

int64_t accumulate_crops_via_codes(double* sums, int64_t U, int64_t Ch, int64_t rh, int64_t rw, const float* images,
                                   int64_t N, int64_t H, int64_t W, const int64_t* slots, const int64_t* tops,
                                   const float* weights, int64_t J, const float* pad, uint8_t* scratch,
                                   int num_threads) {
  for (int64_t c = 0; c < Ch; ++c) {
    if (!channel_codes(images, N, Ch, H * W, c, scratch, num_threads)) {
      accumulate_channels(sums, U, Ch, c, Ch, rh, rw, images, Ch, c, H, W, slots, tops, weights, J, pad,
                          num_threads);
      return c;
    }
    accumulate_channels(sums, U, Ch, c, c + 1, rh, rw, scratch, 1, 0, H, W, slots, tops, weights, J, pad,
                        num_threads);
  }
  return Ch;
}

}  // namespace neuroidx
