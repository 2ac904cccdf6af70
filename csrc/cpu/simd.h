// Function multi-versioning for the hot loops: NX_WIDE_SIMD builds a function for AVX-512 and AVX2 as
// well as the baseline, and the loader picks the widest the CPU has (GCC / Clang on x86-64 Linux;
// elsewhere, or with NEUROIDX_NO_TARGET_CLONES defined, the baseline build only).
#pragma once

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(NEUROIDX_NO_TARGET_CLONES)
#define NX_WIDE_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NX_WIDE_SIMD
#endif
