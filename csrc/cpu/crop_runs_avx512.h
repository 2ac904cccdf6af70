// The inner loop of accumulate_crops from uint8 pixel codes, written for AVX-512 (with VBMI: Ice Lake, Zen 4
// and later), which crops.cpp uses when the CPU has it: a sums row gets one or two crop rows' terms in
// order, dst[k] = (dst[k] + term_a(k)) + term_b(k), each term a crop pixel times its weight (an image
// pixel, or the pad value or an edge pixel where the crop row leaves the image) or, for a crop row
// outside the image with constant padding, the pad value times the weight.
//
// Why by hand: the portable loop (crops.cpp) decodes a uint8 pixel code with a vector division, splits
// a row into runs at the image borders and lets the compiler finish each run with scalar code. Here 8
// codes are decoded with a byte permute, one conversion to float32 and a shift (below), a crop row is
// added whole, 16 columns at a time, its columns outside the image masked in (found once per crop), and
// the row's last columns are stored with vectors no wider than them (store_low). On the crops of
// bench/bench_crops.py from codes (2-core Zen 4, interleaved in one process, all crops in cache): 42
// against 51 ms for the 100 x 100 layer and 11 against 15 ms for the 44 x 44 one with the previous
// loop of runs, itself faster than the portable loop (50 against 96 ms with every box inside the images).
// The same loops over float32 pixels were not faster (those wait on memory: 4 bytes a pixel), so
// float32 images keep the portable loop.
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
// sum of the same float32 pixels, which only reads them, takes 6 ms), at a quiet moment of the machine;
// encode_span writes them with streaming stores.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(NEUROIDX_NO_TARGET_CLONES)
#define NX_CROP_AVX512 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#define NX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")))

// GCC 12 warns that the intrinsics' own "undefined" registers may be used uninitialized (a false
// positive of its headers, not of this code).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace neuroidx {
namespace avx512 {

// The scales of the decode by shift (above): a decoded pixel is kPixelScale times its value, and a
// weight is multiplied by kWeightScale to make up for it; constant pixels (pad values, edge pixels)
// take kPixelScale too.
constexpr double kPixelScale = 0x1p-864, kWeightScale = 0x1p864;

// Dwords P = k * 0x01010101 (code k in each of the four bytes) to float32 2^32 times k's pixel: the
// rounding toward +infinity shown above.
NX_AVX512 inline __m512 scaled_pixels(__m512i replicated) {
  return _mm512_cvt_roundepu32_ps(replicated, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
}

// Codes [first, first + 8) of k as float32 2^32 times their pixel, in the low dword of each qword
// (zeros above): the byte permute puts code first + i in each byte of qword i's low dword.
template <int first>
NX_AVX512 inline __m512i scaled_pixel_bits(__m512i k) {
  constexpr int64_t kRepeat = 0x01010101;
  const __m512i repeat = _mm512_set_epi64((first + 7) * kRepeat, (first + 6) * kRepeat, (first + 5) * kRepeat,
                                          (first + 4) * kRepeat, (first + 3) * kRepeat, (first + 2) * kRepeat,
                                          (first + 1) * kRepeat, first * kRepeat);
  return _mm512_castps_si512(scaled_pixels(_mm512_maskz_permutexvar_epi8(0x0F0F0F0F0F0F0F0FULL, repeat, k)));
}

// Codes [first, first + 8) of k decoded: float64 2^-864 times their pixel (the shift shown above).
template <int first>
NX_AVX512 inline __m512d decode8(__m512i k) {
  return _mm512_castsi512_pd(_mm512_slli_epi64(scaled_pixel_bits<first>(k), 29));
}

// The same in the lanes under `in`; the other lanes keep `outside` (a constant pixel, as scaled: the
// pad value or an edge pixel).
template <int first>
NX_AVX512 inline __m512d decode8_or(__m512i k, __mmask8 in, __m512d outside) {
  return _mm512_castsi512_pd(
      _mm512_mask_slli_epi64(_mm512_castpd_si512(outside), in, scaled_pixel_bits<first>(k), 29));
}

// Lanes [a, b) of eight, a and b clamped to [0, 8].
inline uint8_t lanes(int64_t a, int64_t b) {
  a = a < 0 ? 0 : (a > 8 ? 8 : a);
  b = b < 0 ? 0 : (b > 8 ? 8 : b);
  return static_cast<uint8_t>(((1u << b) - 1) & ~((1u << a) - 1));
}

// Which columns of a crop row are pixels of the image and which lie right of it, eight at a time:
// span[q] holds the lanes of columns 8q .. 8q + 7 inside [before, before + inside), right[q] those at or
// past its end. The same for every row of a crop, so found once per crop; chunks(rw) + 1 bytes each (the
// last one zero, so that a 16-column step may read two).
struct ColumnMasks {
  uint8_t* span;
  uint8_t* right;
  static int64_t chunks(int64_t rw) { return (rw + 7) / 8; }
  void fill(int64_t before, int64_t inside, int64_t rw) const {
    const int64_t end = before + inside;
    for (int64_t q = 0; q < chunks(rw); ++q) {
      span[q] = lanes(before - 8 * q, end - 8 * q);
      right[q] = static_cast<uint8_t>(lanes(end - 8 * q, 8) & lanes(0, rw - 8 * q));
    }
    span[chunks(rw)] = right[chunks(rw)] = 0;
  }
};

// What a crop row adds to a sums row: w * pixel at every column, all of them codes of an image row
// (kFull: no masks needed) or those of its in-image span and the pad value or edge pixels elsewhere
// (kPixels); w * the pad value at every column (kConstant: a row outside the image with constant
// padding); or nothing (kNone, no crop: not even +0.0, which would turn -0.0 into +0.0).
enum class Term { kFull, kPixels, kConstant, kNone };

// One crop row as the loop below reads it. Pixels are float64 2^-864 times their value, as decode8
// gives them, and w is 2^864 times the crop's weight (exact: a float32 times a power of two, in
// float64's range either way), so w * pixel is the exact product of weight and pixel, and adding it is
// the one rounding of the reference's sums + w * pixel, for pixels and pad values alike.
struct CodeRow {
  uintptr_t origin;  // address of crop column 0's code: only the span's columns are read
  ColumnMasks masks;
  __m512d w, left, right;  // right: the pixel right of the span (edge padding; else left too)
};

// Columns [k, k + 16) of one crop row added to the sums lo, hi.
template <Term kind, bool kEdge>
NX_AVX512 inline void add16(__m512d* lo, __m512d* hi, const CodeRow& row, int64_t k) {
  if constexpr (kind == Term::kFull) {
    const __m512i codes =
        _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row.origin + k)));
    *lo = _mm512_fmadd_pd(row.w, decode8<0>(codes), *lo);
    *hi = _mm512_fmadd_pd(row.w, decode8<8>(codes), *hi);
  } else if constexpr (kind == Term::kPixels) {
    const int64_t q = k / 8;
    uint16_t in;  // the masks of chunks q and q + 1
    std::memcpy(&in, row.masks.span + q, sizeof in);
    const __m512i codes =
        _mm512_castsi128_si512(_mm_maskz_loadu_epi8(in, reinterpret_cast<const void*>(row.origin + k)));
    __m512d out_lo = row.left, out_hi = row.left;
    if constexpr (kEdge) {
      uint16_t right;
      std::memcpy(&right, row.masks.right + q, sizeof right);
      out_lo = _mm512_mask_blend_pd(static_cast<__mmask8>(right), row.left, row.right);
      out_hi = _mm512_mask_blend_pd(static_cast<__mmask8>(right >> 8), row.left, row.right);
    }
    *lo = _mm512_fmadd_pd(row.w, decode8_or<0>(codes, static_cast<__mmask8>(in), out_lo), *lo);
    *hi = _mm512_fmadd_pd(row.w, decode8_or<8>(codes, static_cast<__mmask8>(in >> 8), out_hi), *hi);
  } else if constexpr (kind == Term::kConstant) {
    *lo = _mm512_fmadd_pd(row.w, row.left, *lo);
    *hi = _mm512_fmadd_pd(row.w, row.left, *hi);
  }
}

// Columns [k, k + 8) of one crop row added to the sums v; no code is read past the row's end (kFull:
// only the lanes under lanes_left; kPixels: those lanes are in no mask).
template <Term kind, bool kEdge>
NX_AVX512 inline void add8(__m512d* v, const CodeRow& row, int64_t k, __mmask8 lanes_left) {
  if constexpr (kind == Term::kFull) {
    const __m512i codes =
        _mm512_castsi128_si512(_mm_maskz_loadu_epi8(lanes_left, reinterpret_cast<const void*>(row.origin + k)));
    *v = _mm512_fmadd_pd(row.w, decode8<0>(codes), *v);
  } else if constexpr (kind == Term::kPixels) {
    const int64_t q = k / 8;
    const __mmask8 in = row.masks.span[q];
    const __m512i codes =
        _mm512_castsi128_si512(_mm_maskz_loadu_epi8(in, reinterpret_cast<const void*>(row.origin + k)));
    const __m512d out = kEdge ? _mm512_mask_blend_pd(row.masks.right[q], row.left, row.right) : row.left;
    *v = _mm512_fmadd_pd(row.w, decode8_or<0>(codes, in, out), *v);
  } else if constexpr (kind == Term::kConstant) {
    *v = _mm512_fmadd_pd(row.w, row.left, *v);
  }
}

// dst[0 .. n) = the low n lanes of v, 0 < n < 8, stored with vectors no wider than what they hold. A
// masked store of 8 lanes would do, but on Zen 4 a load that overlaps its 64 bytes soon after (the next
// sums row begins there) waits for it: a sums row of 44 columns getting two crop rows in cache took 31
// time-stamp ticks with the masked store against 22 with these.
NX_AVX512 inline void store_low(double* dst, __m512d v, int64_t n) {
  __m256d quad = _mm512_castpd512_pd256(v);
  if (n & 4) {
    _mm256_storeu_pd(dst, quad);
    dst += 4;
    quad = _mm512_extractf64x4_pd(v, 1);
  }
  __m128d pair = _mm256_castpd256_pd128(quad);
  if (n & 2) {
    _mm_storeu_pd(dst, pair);
    dst += 2;
    pair = _mm256_extractf128_pd(quad, 1);
  }
  if (n & 1) _mm_store_sd(dst, pair);
}

// A sums row of rw columns += crop row a's terms, then crop row b's, element by element in that order.
template <Term a, Term b, bool kEdge>
NX_AVX512 inline void add_rows(double* dst, int64_t rw, const CodeRow& ra, const CodeRow& rb) {
  int64_t k = 0;
  for (; k + 16 <= rw; k += 16) {
    __m512d lo = _mm512_loadu_pd(dst + k), hi = _mm512_loadu_pd(dst + k + 8);
    add16<a, kEdge>(&lo, &hi, ra, k);
    add16<b, kEdge>(&lo, &hi, rb, k);
    _mm512_storeu_pd(dst + k, lo);
    _mm512_storeu_pd(dst + k + 8, hi);
  }
  if (k + 8 <= rw) {
    __m512d v = _mm512_loadu_pd(dst + k);
    add8<a, kEdge>(&v, ra, k, 0xFF);
    add8<b, kEdge>(&v, rb, k, 0xFF);
    _mm512_storeu_pd(dst + k, v);
    k += 8;
  }
  if (k < rw) {
    const __mmask8 m = static_cast<__mmask8>((1u << (rw - k)) - 1);
    __m512d v = _mm512_maskz_loadu_pd(m, dst + k);
    add8<a, kEdge>(&v, ra, k, m);
    add8<b, kEdge>(&v, rb, k, m);
    store_low(dst + k, v, rw - k);
  }
}

// add_rows for the terms of the two rows (b's kNone: a alone).
template <bool kEdge, Term a>
NX_AVX512 inline void add_rows_b(double* dst, int64_t rw, const CodeRow& ra, Term tb, const CodeRow& rb) {
  switch (tb) {
    case Term::kFull: return add_rows<a, Term::kFull, kEdge>(dst, rw, ra, rb);
    case Term::kPixels: return add_rows<a, Term::kPixels, kEdge>(dst, rw, ra, rb);
    case Term::kConstant: return add_rows<a, Term::kConstant, kEdge>(dst, rw, ra, rb);
    case Term::kNone: return add_rows<a, Term::kNone, kEdge>(dst, rw, ra, rb);
  }
}

template <bool kEdge>
NX_AVX512 inline void add_rows(double* dst, int64_t rw, Term ta, const CodeRow& ra, Term tb, const CodeRow& rb) {
  switch (ta) {
    case Term::kFull: return add_rows_b<kEdge, Term::kFull>(dst, rw, ra, tb, rb);
    case Term::kPixels: return add_rows_b<kEdge, Term::kPixels>(dst, rw, ra, tb, rb);
    default: return add_rows_b<kEdge, Term::kConstant>(dst, rw, ra, tb, rb);
  }
}

// The other way (pixel_codes): the codes of pixels x[k] (k < 16) for the lanes under m, in the low byte of
// each dword of *codes, and the lanes whose pixel is not bit for bit its code's pixel. Candidate code:
// x * 255 rounded to an integer, its low byte (any pixel gets one); its pixel is decoded as above (no
// division) and its bits compared with x's, which also turns away -0.0, NaN and pixels out of range.
NX_AVX512 inline __mmask16 encode16(const float* x_ptr, __mmask16 m, __m512i* codes) {
  const __m512 x = _mm512_maskz_loadu_ps(m, x_ptr);
  const __m512i k = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(255.0f)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i byte0 = _mm512_set4_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000);  // P, per lane
  const __m512 scaled = scaled_pixels(_mm512_shuffle_epi8(k, byte0));
  const __m512 pixel = _mm512_mul_ps(scaled, _mm512_set1_ps(0x1p-32f));  // exact: a power of two, no underflow
  *codes = k;
  return _mm512_mask_cmpneq_epi32_mask(m, _mm512_castps_si512(pixel), _mm512_castps_si512(x));
}

// codes[k] = the code of x[k] for k in [begin, end), ordinary stores; the lanes that are not codes.
NX_AVX512 inline __mmask16 encode_stored(const float* x, int64_t begin, int64_t end, uint8_t* codes) {
  __mmask16 bad = 0;
  for (int64_t k = begin; k < end; k += 16) {
    const __mmask16 m = end - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (end - k)) - 1);
    __m512i code;
    bad |= encode16(x + k, m, &code);
    _mm512_mask_cvtepi32_storeu_epi8(codes + k, m, code);
  }
  return bad;
}

// codes[k] = the code of x[k] for k < n; true when every pixel is exactly its code's pixel. The whole
// 64-byte lines of codes are written with streaming stores, which do not read a line before writing
// it: 12.0 against 14.2 ms for the codes of 512 images of 224 x 224 on 2 Zen 4 cores (a read-only pass
// over the same images: 11.4 ms), 71-73 against 76-81 ms for bench/bench_crops.py's 100 px layer from
// float32, whose accumulation reads the codes afterwards anyway (they do not fit in the cache).
NX_AVX512 inline bool encode_span(const float* x, int64_t n, uint8_t* codes) {
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>(-reinterpret_cast<uintptr_t>(codes) & 63));
  __mmask16 bad = encode_stored(x, 0, head, codes);
  int64_t k = head;
  for (; k + 64 <= n; k += 64) {
    __m512i c0, c1, c2, c3;
    bad |= encode16(x + k, 0xFFFF, &c0);
    bad |= encode16(x + k + 16, 0xFFFF, &c1);
    bad |= encode16(x + k + 32, 0xFFFF, &c2);
    bad |= encode16(x + k + 48, 0xFFFF, &c3);
    __m512i line = _mm512_castsi128_si512(_mm512_cvtepi32_epi8(c0));
    line = _mm512_inserti32x4(line, _mm512_cvtepi32_epi8(c1), 1);
    line = _mm512_inserti32x4(line, _mm512_cvtepi32_epi8(c2), 2);
    line = _mm512_inserti32x4(line, _mm512_cvtepi32_epi8(c3), 3);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(codes + k), line);
  }
  if (k > head) _mm_sfence();  // the streamed lines written before anything that follows
  bad |= encode_stored(x, k, n, codes);
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
