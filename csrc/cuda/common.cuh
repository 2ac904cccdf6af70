// Shared device helpers of the neuroidx_fast CUDA kernels.
//
// These sources are compiled at run time by NVRTC (through CuPy), which has no host headers: no
// <cstdint>, <cuda_fp16.h> or <math.h>. Everything here therefore uses builtin types only
// (int, long long, unsigned short, ...) and the intrinsics NVRTC provides without an include.
// The Python launcher pastes this file in place of the `#include "common.cuh"` line, so the
// .cu files also compile as they are with nvcc (the compile check of the test suite).
#ifndef NEUROIDX_FAST_COMMON_CUH
#define NEUROIDX_FAST_COMMON_CUH

#define NX_FULL_MASK 0xffffffffu
// Flat index meaning "no element yet": larger than any index of a map (the launcher keeps
// H * W below it).
#define NX_NO_INDEX 0x7fffffff

__device__ __forceinline__ float nx_neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ bool nx_isnan(float v) { return v != v; }

__device__ __forceinline__ int nx_min_int(int a, int b) { return a < b ? a : b; }

// bfloat16 is the top half of a float32: the conversion is exact for every value, NaN included.
__device__ __forceinline__ float nx_bf16_to_float(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// IEEE binary16 -> binary32, exact for every input (normal, subnormal, zero, inf, NaN).
__device__ __forceinline__ float nx_fp16_to_float(unsigned short h) {
    const unsigned int sign = ((unsigned int)(h & 0x8000u)) << 16;
    const unsigned int exponent = (h >> 10) & 0x1fu;
    const unsigned int mantissa = h & 0x3ffu;
    unsigned int bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);  // inf, or NaN with its payload kept
    } else if (exponent != 0u) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
    } else {
        // zero or subnormal: mantissa * 2^-24, exact in float32 (a normal number there)
        bits = sign | __float_as_uint((float)mantissa * 5.9604644775390625e-8f);
    }
    return __uint_as_float(bits);
}

// Element loaders, one per activation dtype: each turns one stored element into float32.
struct NxLoadF32 {
    typedef float T;
    static __device__ __forceinline__ float load(const float* p) { return *p; }
};

struct NxLoadF16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float load(const unsigned short* p) { return nx_fp16_to_float(*p); }
};

struct NxLoadBF16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float load(const unsigned short* p) { return nx_bf16_to_float(*p); }
};

// (value, flat index) pairs of a max reduction, NaN-free. `a` takes `b` when b is larger, or
// equal with a lower index: the lowest flat index wins among equal maxima, whatever the order
// in which partial results are combined. An empty partial is (-inf, NX_NO_INDEX).
__device__ __forceinline__ void nx_take_better(float& best, int& idx, float other_best, int other_idx) {
    if (other_best > best || (other_best == best && other_idx < idx)) {
        best = other_best;
        idx = other_idx;
    }
}

// Streaming top-K order (SPEC section 1, reference.better): true where entry a ranks strictly
// before entry b. A real entry (id >= 0) beats an empty one (id -1); between real entries the
// larger value wins, then the lower id. Values are NaN-free (the caller checks).
__device__ __forceinline__ bool nx_better(float va, long long ida, float vb, long long idb) {
    if (ida < 0) return false;
    if (idb < 0) return true;
    return va > vb || (va == vb && ida < idb);
}

#endif  // NEUROIDX_FAST_COMMON_CUH
