// CPU kernels of neuroidx_fast: raw pointers, shapes and strides in elements; no torch headers.
// Semantics are those of neuroidx_fast/ops/reference.py (the contract in its docstring).
#pragma once

#include <cstdint>

namespace neuroidx {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Per (b, c): max (exact element value), flat argmax (lowest on ties; first NaN if any), mean.
void spatial_reduce(const void* x, DType dtype, int64_t B, int64_t C, int64_t H, int64_t W,
                    int64_t stride_b, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                    float* out_max, int64_t* out_argmax, float* out_mean, int num_threads);

// In-place streaming top-K update of C sorted rows of K entries with B candidates per unit.
void topk_update(float* state_values, int64_t* state_ids, int64_t* state_positions, int64_t C, int64_t K,
                 const float* values, const int64_t* ids, const int64_t* positions, int64_t B, int num_threads);

}  // namespace neuroidx
