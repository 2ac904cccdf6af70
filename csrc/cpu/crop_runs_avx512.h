// The inner loop of accumulate_crops from uint8 pixel codes, written for AVX-512 (with VBMI: Ice Lake, Zen 4
// and later), which crops.cpp uses when the CPU has it: one run of a sums row gets one or two crops' terms
// in order, dst[k] = (dst[k] + term_a(k)) + term_b(k), each term a crop pixel times its weight or a constant.
//
// Why by hand: the portable loop (crops.cpp) decodes a uint8 pixel code with a vector division and lets
// the compiler finish each run with scalar code; here 8 codes are decoded with a byte permute, one
// conversion to float32 and a shift (below), and a run ends with masked vectors. On the 100 x 100 crops
// of bench/bench_crops.py (2-core Zen 4, interleaved in one process): 65 ms from codes against 71 ms with
// an older decode (exact conversion to float64, then rounded by two integer operations on its bits) and
// 107 ms with the portable loop; 50, 59 and 96 ms with every box inside the images and its crops in
// cache (the compute-bound case). The same loops over float32 pixels were not faster (those wait on
// memory: 4 bytes a pixel), so float32 images keep the portable loop.
//
// Decoding code k to float32(k / 255) exactly, without a division. 2^32 / 255 = 0x01010101 + 1/255, so
// k / 255 * 2^32 = P + k / 255 with P = k * 0x01010101 (the byte four times: one byte permute). P has
// 24 + b significant bits, b the bit length of k, so float32 drops its low b bits, which hold k itself;
// the exact value's dropped part is k + k / 255, above half of 2^b (k >= 2^(b-1)) and below 2^b. So
// float32's round to nearest of k / 255 * 2^32 rounds P up: exactly what converting P to float32 with
// rounding toward +infinity gives (its dropped bits, k, are not all zero; a carry moves into the
// exponent as it should; k = 0 gives 0). Checked for all 256 codes (tests/test_crops.py).
//
// From float32 to float64 without a conversion: the bits of a float32 y > 0, zero-extended to 64 and
// shifted left by 29, put its mantissa at the top of float64's and its biased exponent e in the low
// bits of float64's exponent field, i.e. the float64 2^(e - 1023) * 1.m = y * 2^(127 - 1023), exactly
// (y = 0 gives 0). With y = 2^32 x that is x * 2^-864, always a normal float64 (x >= 1 / 255), and
// the 2^864 goes into the weight: w * 2^864 is exact (|w| < 2^128, a float32), so each product w * x,
// and so every sum, is the same bits as the reference's. Two vcvtps2pd per 16 codes cost more than the
// permutes and shifts that replace them: 7.6 against 10.1 cycles per 16 columns of two crops with
// everything in cache, 4-5% on the whole 100 x 100 layer (which also waits on memory).
//
// pixel_codes (crops.cpp) finds the codes of a float32 image with the same decode (encode16 below): 10 ms
// for 512 images of 224 x 224 on 2 Zen 4 cores, against 18-22 ms with the portable pass's division (a
// sum of the same float32 pixels, which only reads them, takes 6 ms).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(NEUROIDX_NO_TARGET_CLONES)
#define NX_CROP_AVX512 1

#include <immintrin.h>

#include <cstdint>

#define NX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")))

// GCC 12 warns that the intrinsics' own "undefined" registers may be used uninitialized (a false
// positive of its headers, not of this code).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace neuroidx {
namespace avx512 {

// What a term adds to each element of the run.
enum class Term { kPixels, kConstant, kNone };

// Dwords P = k * 0x01010101 (code k in each of the four bytes) to float32 2^32 times k's pixel: the
// rounding toward +infinity shown above.
NX_AVX512 inline __m512 scaled_pixels(__m512i replicated) {
  return _mm512_cvt_roundepu32_ps(replicated, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
}

// Codes [first, first + 8) of k decoded: float64 2^-864 times their pixel (see above). The byte
// permute gives qword i code first + i in each byte of its low dword and zeros above, which convert to
// float32 2^32 x and 0; the shift does the rest.
template <int first>
NX_AVX512 inline __m512d decode8(__m512i k) {
  constexpr int64_t kRepeat = 0x01010101;
  const __m512i repeat = _mm512_set_epi64((first + 7) * kRepeat, (first + 6) * kRepeat, (first + 5) * kRepeat,
                                          (first + 4) * kRepeat, (first + 3) * kRepeat, (first + 2) * kRepeat,
                                          (first + 1) * kRepeat, first * kRepeat);
  const __m512i replicated = _mm512_maskz_permutexvar_epi8(0x0F0F0F0F0F0F0F0FULL, repeat, k);
  return _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_castps_si512(scaled_pixels(replicated)), 29));
}

// Codes [0, 16) decoded, in two halves.
NX_AVX512 inline void load16(const uint8_t* p, __m512d* lo, __m512d* hi) {
  const __m512i k = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *lo = decode8<0>(k);
  *hi = decode8<8>(k);
}

// Codes [0, 8) (lanes under m) decoded.
NX_AVX512 inline __m512d load8(const uint8_t* p, __mmask8 m) {
  return decode8<0>(_mm512_castsi128_si512(_mm_maskz_loadu_epi8(m, p)));
}

// Elements [k, k + 8) (lanes under m) of a run: add one term to the sums v.
template <Term kind>
NX_AVX512 inline void add_term8(__m512d* v, const uint8_t* span, int64_t k, __mmask8 m, __m512d w, __m512d c) {
  if constexpr (kind == Term::kPixels) {
    *v = _mm512_fmadd_pd(w, load8(span + k, m), *v);
  } else if constexpr (kind == Term::kConstant) {
    *v = _mm512_add_pd(*v, c);
  }
}

// Elements [k, k + 16) of a run: add one term to the sums lo, hi.
template <Term kind>
NX_AVX512 inline void add_term(__m512d* lo, __m512d* hi, const uint8_t* span, int64_t k, __m512d w, __m512d c) {
  if constexpr (kind == Term::kPixels) {
    __m512d x_lo, x_hi;
    load16(span + k, &x_lo, &x_hi);
    // One rounding, as dst + w * x: the product of a float32-sized weight and pixel is exact in float64.
    *lo = _mm512_fmadd_pd(w, x_lo, *lo);
    *hi = _mm512_fmadd_pd(w, x_hi, *hi);
  } else if constexpr (kind == Term::kConstant) {
    *lo = _mm512_add_pd(*lo, c);
    *hi = _mm512_add_pd(*hi, c);
  }
}

// dst[k] = (dst[k] + term_a(k)) + term_b(k) for k < n; a kPixels term adds w * pixel (the code span[k]),
// a kConstant term adds c, a kNone term nothing (not even +0.0, which would turn -0.0 into +0.0).
template <Term a, Term b>
NX_AVX512 inline void run(double* dst, int64_t n, const uint8_t* span_a, double w_a, double c_a,
                          const uint8_t* span_b, double w_b, double c_b) {
  // The codes decode to 2^-864 times their pixel: the weights take the 2^864 (exactly).
  const __m512d wa = _mm512_set1_pd(w_a * 0x1p864), ca = _mm512_set1_pd(c_a);
  const __m512d wb = _mm512_set1_pd(w_b * 0x1p864), cb = _mm512_set1_pd(c_b);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    __m512d lo = _mm512_loadu_pd(dst + k), hi = _mm512_loadu_pd(dst + k + 8);
    add_term<a>(&lo, &hi, span_a, k, wa, ca);
    add_term<b>(&lo, &hi, span_b, k, wb, cb);
    _mm512_storeu_pd(dst + k, lo);
    _mm512_storeu_pd(dst + k + 8, hi);
  }
  for (; k < n; k += 8) {  // the last 1..15 elements, 8 at a time (masked-off lanes are neither read nor written)
    const __mmask8 m = n - k >= 8 ? 0xFF : static_cast<__mmask8>((1u << (n - k)) - 1);
    __m512d v = _mm512_maskz_loadu_pd(m, dst + k);
    add_term8<a>(&v, span_a, k, m, wa, ca);
    add_term8<b>(&v, span_b, k, m, wb, cb);
    _mm512_mask_storeu_pd(dst + k, m, v);
  }
}

// The run of two crops' terms; span nullptr means the constant term c.
NX_AVX512 inline void pair_run(double* dst, int64_t n, const uint8_t* sa, double wa, double ca, const uint8_t* sb,
                               double wb, double cb) {
  constexpr Term P = Term::kPixels, C = Term::kConstant;
  if (sa != nullptr && sb != nullptr) {
    run<P, P>(dst, n, sa, wa, ca, sb, wb, cb);
  } else if (sa != nullptr) {
    run<P, C>(dst, n, sa, wa, ca, sb, wb, cb);
  } else if (sb != nullptr) {
    run<C, P>(dst, n, sa, wa, ca, sb, wb, cb);
  } else {
    run<C, C>(dst, n, sa, wa, ca, sb, wb, cb);
  }
}

// One crop's span: dst[k] += w * pixel(span[k]).
NX_AVX512 inline void single_run(double* dst, int64_t n, const uint8_t* span, double w) {
  run<Term::kPixels, Term::kNone>(dst, n, span, w, 0.0, nullptr, 0.0, 0.0);
}

// The other way (pixel_codes): codes[k] = the code of pixels x[k] for the lanes under m, and the lanes
// whose pixel is not bit for bit its code's pixel. Candidate code: x * 255 rounded to an integer, its
// low byte (any pixel gets one); its pixel is decoded as above (no division) and its bits compared with
// x's, which also turns away -0.0, NaN and pixels out of range.
NX_AVX512 inline __mmask16 encode16(const float* x_ptr, uint8_t* codes, __mmask16 m) {
  const __m512 x = _mm512_maskz_loadu_ps(m, x_ptr);
  const __m512i k = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(255.0f)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i byte0 = _mm512_set4_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000);  // P, per lane
  const __m512 scaled = scaled_pixels(_mm512_shuffle_epi8(k, byte0));
  const __m512 pixel = _mm512_mul_ps(scaled, _mm512_set1_ps(0x1p-32f));  // exact: a power of two, no underflow
  _mm512_mask_cvtepi32_storeu_epi8(codes, m, k);  // the low byte, as the shuffle took
  return _mm512_mask_cmpneq_epi32_mask(m, _mm512_castps_si512(pixel), _mm512_castps_si512(x));
}

// codes[k] = the code of x[k] for k < n; true when every pixel is exactly its code's pixel.
NX_AVX512 inline bool encode_span(const float* x, int64_t n, uint8_t* codes) {
  __mmask16 bad = 0;
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) bad |= encode16(x + k, codes + k, 0xFFFF);
  if (k < n) bad |= encode16(x + k, codes + k, static_cast<__mmask16>((1u << (n - k)) - 1));
  return bad == 0;
}

// Whether this CPU runs the functions above (checked once; false in builds without them).
inline bool cpu_has_avx512_vbmi() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vbmi");
  return has;
}

}  // namespace avx512
}  // namespace neuroidx

#pragma GCC diagnostic pop

#else  // no AVX-512 loops in this build: crops.cpp runs the portable ones

namespace neuroidx {
namespace avx512 {
inline bool cpu_has_avx512_vbmi() { return false; }
}  // namespace avx512
}  // namespace neuroidx

#endif
