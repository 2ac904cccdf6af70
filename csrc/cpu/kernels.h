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

// out [M, Ch, rh, rw] = crops of images [N, Ch, H, W] (all contiguous) from image rows slots [M] (-1:
// zeros) with top-left corners tops [M, 2] = (y0, x0); pixels outside an image take pad [Ch], or the
// nearest image pixel when pad is nullptr (edge mode). Needs H, W > 0 unless every slot is -1.
void gather_crops(const float* images, int64_t N, int64_t Ch, int64_t H, int64_t W, const int64_t* slots,
                  const int64_t* tops, int64_t M, int64_t rh, int64_t rw, const float* pad, float* out,
                  int num_threads);

// The same from uint8 pixel codes: code k is the float32 pixel pixel_code_value(k) = k / 255 rounded to
// float32 (what float(k) / 255 gives on CPU), and the crops are those of the decoded float32 image.
void gather_crops(const uint8_t* codes, int64_t N, int64_t Ch, int64_t H, int64_t W, const int64_t* slots,
                  const int64_t* tops, int64_t M, int64_t rh, int64_t rw, const float* pad, float* out,
                  int num_threads);
float pixel_code_value(uint8_t code);
// codes [n] = the pixel code of each of images [n]; true when every pixel is exactly its code's value
// (bit for bit), false otherwise (codes then unspecified).
bool pixel_codes(const float* images, int64_t n, uint8_t* codes, int num_threads);

// In place: sums[u] += double(weights[u, j]) * crop(slots[u, j], tops[u, j]) for j = 0 .. J-1 in order,
// skipping slots < 0; sums [U, Ch, rh, rw] float64, slots / weights [U, J], tops [U, J, 2], crops as above.
void accumulate_crops(double* sums, int64_t U, int64_t Ch, int64_t rh, int64_t rw, const float* images, int64_t N,
                      int64_t H, int64_t W, const int64_t* slots, const int64_t* tops, const float* weights,
                      int64_t J, const float* pad, int num_threads);
// The same from uint8 pixel codes (as gather_crops): bit-identical to the float32 path on the decoded image.
void accumulate_crops(double* sums, int64_t U, int64_t Ch, int64_t rh, int64_t rw, const uint8_t* codes, int64_t N,
                      int64_t H, int64_t W, const int64_t* slots, const int64_t* tops, const float* weights,
                      int64_t J, const float* pad, int num_threads);
// The float32 accumulate_crops through the images' uint8 codes, one channel at a time: the codes of
// channel c of every image go to scratch [N * H * W] (the pass of pixel_codes; a third of all the codes,
// so a third of the page faults), and the crops of channel c are read from them. A channel whose pixels
// are not all codes, and those after it, are read as float32. Same bits either way. Returns how many
// channels were read through codes.
int64_t accumulate_crops_via_codes(double* sums, int64_t U, int64_t Ch, int64_t rh, int64_t rw, const float* images,
                                   int64_t N, int64_t H, int64_t W, const int64_t* slots, const int64_t* tops,
                                   const float* weights, int64_t J, const float* pad, uint8_t* scratch,
                                   int num_threads);
// accumulate_crops runs hand-written AVX-512 loops where the CPU has AVX-512 VBMI, the portable ones
// otherwise (same bits). false: the portable ones from now on; true: back to the default. Returns
// whether the AVX-512 loops are in use.
bool set_crop_kernels_avx512(bool enable);
// Whether accumulate_crops runs its AVX-512 loops now.
bool crop_kernels_avx512();

// out [M * B, C, H, W] (dense: NCHW, or NHWC when channels_last) = M masked copies of x (strides in
// elements): out[m * B + b, c] = masks[m * C + c] ? fill[c] : x[b, c]. A bit copy of elem_size-byte elements
// (2, 4 or 8); x is read only for kept channels.
void mask_replicas(const void* x, int64_t elem_size, int64_t B, int64_t C, int64_t H, int64_t W, int64_t stride_b,
                   int64_t stride_c, int64_t stride_h, int64_t stride_w, const uint8_t* masks, int64_t M,
                   const void* fill, void* out, bool channels_last, int num_threads);

// pred [U, B]: for unit c = units[u] and image b, the certified argmax over k of
// logits[b, k] + weight_t[c, k] * (ablated[c] - features[b, c]), else -1 (float64; weight_t is [C, K]).
void readout_ablation_argmax(const double* logits, const double* features, const double* weight_t,
                             const double* ablated, const int64_t* units, int64_t U, const double* scale,
                             double err_rel, int64_t B, int64_t C, int64_t K, int64_t* pred, int num_threads);

// Local response normalisation across channels of a dense float32 [B, C, H, W] map (NCHW, or NHWC when
// channels_last; HW = H * W): y = x * d^-beta, d_c = k + alpha / size * sum of x_j^2 over channels
// j = c - size / 2 .. c + (size - 1) / 2 (as torch.nn.LocalResponseNorm). lrn_backward gives the input
// gradient from x and the output gradient (grad_x may not alias either).
void lrn_forward(const float* x, float* y, int64_t B, int64_t C, int64_t HW, bool channels_last, int64_t size,
                 float alpha, float beta, float k, int num_threads);
void lrn_backward(const float* x, const float* grad, float* grad_x, int64_t B, int64_t C, int64_t HW,
                  bool channels_last, int64_t size, float alpha, float beta, float k, int num_threads);

}  // namespace neuroidx
