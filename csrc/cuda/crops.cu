// gather_crops and accumulate_crops: receptive-field crops of float32 images [N, Ch, H, W], copied out
// ([M, Ch, rh, rw]) or added, weighted, into float64 per-unit sums [U, Ch, rh, rw] (reference.py holds
// the contract). Pixels outside an image take the channel's pad value, or in edge mode (the `_edge`
// kernels) the nearest image pixel.
//
// The `_u8` kernels read the images as uint8 pixel codes instead and decode each pixel they read
// through `codes`, the 256-entry float32 table of the values the codes stand for (k / 255 correctly
// rounded): a table load gives exactly the pixel of the float32 image, so every result is bit-identical
// to the float32 kernels' on the decoded images, for a quarter of the image bytes and no decoding pass.
//
// Layout of the work: block (blockIdx.x = crop or unit * Ch + channel, blockIdx.y = chunk) owns
// NX_CROP_THREADS * NX_CROP_PIXELS consecutive output pixels of one channel plane, in flat order
// p = i * rw + k; thread t takes p = chunk_start + t + q * NX_CROP_THREADS (q < NX_CROP_PIXELS), so
// the lanes of a warp read consecutive pixels of image rows (coalesced) and write consecutive outputs.
//
// Exactness: gather is a copy. accumulate keeps each pixel's float64 sum in a register and adds, for
// j = 0, 1, ... in order and skipping empty slots, double(w_j) * double(pixel): the product of two
// float32 numbers is exact in float64, so the fused multiply-add nvcc emits rounds exactly like the
// reference's multiply then add, and the sums are bit-identical to it.
//
// Corners are clamped to [-r, extent] (no pixel changes: every position beyond a border reads the same
// pad or edge value), which keeps pixel coordinates in int; the launcher checks that H * W, the crop
// sizes and extent + r fit in int.
#include "common.cuh"

#define NX_CROP_THREADS 256  // block size of every kernel in this file (the launcher uses the same)
#define NX_CROP_PIXELS 4     // output pixels per thread

__device__ __forceinline__ int nx_crop_corner(long long v, int r, int extent) {
    return (int)(v < -r ? -r : (v > extent ? extent : v));
}

// The float32 pixel stored at `at`: a float32 pixel as it is, a uint8 code through the table `codes`
// (unused for float32 images).
__device__ __forceinline__ float nx_pixel_value(const float* __restrict__ at, const float* __restrict__ codes) {
    return __ldg(at);
}

__device__ __forceinline__ float nx_pixel_value(const unsigned char* __restrict__ at,
                                                const float* __restrict__ codes) {
    return __ldg(codes + __ldg(at));
}

// Pixel (ys, xs) of one image channel plane, outside pixels taking `pad` (or the nearest pixel: EDGE).
// Nothing is read unless `live` (an empty slot has no plane; the result is then unspecified).
template <bool EDGE, typename Pixel>
__device__ __forceinline__ float nx_crop_pixel(const Pixel* __restrict__ plane, const float* __restrict__ codes,
                                               int ys, int xs, int H, int W, float pad, bool live) {
    if (EDGE) {
        ys = ys < 0 ? 0 : (ys >= H ? H - 1 : ys);
        xs = xs < 0 ? 0 : (xs >= W ? W - 1 : xs);
        return live ? nx_pixel_value(plane + ys * W + xs, codes) : pad;
    }
    return live && ys >= 0 && ys < H && xs >= 0 && xs < W ? nx_pixel_value(plane + ys * W + xs, codes) : pad;
}

template <bool EDGE, typename Pixel>
__device__ __forceinline__ void nx_gather_crops(const Pixel* __restrict__ images, const long long* __restrict__ slots,
                                                const long long* __restrict__ tops, const float* __restrict__ pad,
                                                const float* __restrict__ codes, float* __restrict__ out, int Ch,
                                                int H, int W, int rh, int rw) {
    const long long mc = blockIdx.x;  // crop m, channel c
    const long long m = mc / Ch;
    const int c = (int)(mc - m * Ch);
    const int plane_size = rh * rw;
    const long long slot = __ldg(slots + m);
    const int y0 = nx_crop_corner(__ldg(tops + 2 * m), rh, H);
    const int x0 = nx_crop_corner(__ldg(tops + 2 * m + 1), rw, W);
    const float fill = EDGE ? 0.0f : __ldg(pad + c);
    const Pixel* plane = images + (slot < 0 ? 0 : (slot * Ch + c) * (long long)H * W);
    float* dst = out + mc * plane_size;
    const int start = (int)blockIdx.y * (NX_CROP_THREADS * NX_CROP_PIXELS) + (int)threadIdx.x;
#pragma unroll
    for (int q = 0; q < NX_CROP_PIXELS; ++q) {
        const int p = start + q * NX_CROP_THREADS;
        if (p < plane_size) {
            const int i = p / rw;
            const float v = nx_crop_pixel<EDGE>(plane, codes, y0 + i, x0 + (p - i * rw), H, W, fill, slot >= 0);
            dst[p] = slot < 0 ? 0.0f : v;
        }
    }
}

template <bool EDGE, typename Pixel>
__device__ __forceinline__ void nx_accumulate_crops(double* __restrict__ sums, const Pixel* __restrict__ images,
                                                    const long long* __restrict__ slots,
                                                    const long long* __restrict__ tops,
                                                    const float* __restrict__ weights, const float* __restrict__ pad,
                                                    const float* __restrict__ codes, int J, int Ch, int H, int W,
                                                    int rh, int rw) {
    const long long uc = blockIdx.x;  // unit u, channel c
    const long long u = uc / Ch;
    const int c = (int)(uc - u * Ch);
    const int plane_size = rh * rw;
    const float fill = EDGE ? 0.0f : __ldg(pad + c);
    const long long plane_stride = (long long)H * W;
    double* dst = sums + uc * plane_size;
    const int start = (int)blockIdx.y * (NX_CROP_THREADS * NX_CROP_PIXELS) + (int)threadIdx.x;

    int ii[NX_CROP_PIXELS], kk[NX_CROP_PIXELS];
    double acc[NX_CROP_PIXELS];
#pragma unroll
    for (int q = 0; q < NX_CROP_PIXELS; ++q) {
        const int p = start + q * NX_CROP_THREADS;
        const bool live = p < plane_size;
        ii[q] = live ? p / rw : 0;
        kk[q] = live ? p - ii[q] * rw : 0;
        acc[q] = live ? dst[p] : 0.0;
    }
    const long long row = u * J;
    // No branch on the slot: the body is predicated, so the unrolled iterations issue their loads
    // together (more bytes in flight per thread); the additions still happen in j order.
#pragma unroll 2
    for (int j = 0; j < J; ++j) {
        const long long slot = __ldg(slots + row + j);
        const bool real = slot >= 0;
        const double w = (double)__ldg(weights + row + j);
        const int y0 = nx_crop_corner(__ldg(tops + 2 * (row + j)), rh, H);
        const int x0 = nx_crop_corner(__ldg(tops + 2 * (row + j) + 1), rw, W);
        const Pixel* plane = images + (real ? (slot * Ch + c) * plane_stride : 0);
#pragma unroll
        for (int q = 0; q < NX_CROP_PIXELS; ++q) {
            const float v = nx_crop_pixel<EDGE>(plane, codes, y0 + ii[q], x0 + kk[q], H, W, fill, real);
            if (real) acc[q] += w * (double)v;
        }
    }
#pragma unroll
    for (int q = 0; q < NX_CROP_PIXELS; ++q) {
        const int p = start + q * NX_CROP_THREADS;
        if (p < plane_size) dst[p] = acc[q];
    }
}

// grid (M * Ch, ceil(rh * rw / (NX_CROP_THREADS * NX_CROP_PIXELS))), block NX_CROP_THREADS.
extern "C" __global__ void __launch_bounds__(NX_CROP_THREADS)
nx_gather_crops_pad(const float* images, const long long* slots, const long long* tops, const float* pad, float* out,
                    int Ch, int H, int W, int rh, int rw) {
    nx_gather_crops<false>(images, slots, tops, pad, nullptr, out, Ch, H, W, rh, rw);
}

extern "C" __global__ void __launch_bounds__(NX_CROP_THREADS)
nx_gather_crops_edge(const float* images, const long long* slots, const long long* tops, const float* pad, float* out,
                     int Ch, int H, int W, int rh, int rw) {
    nx_gather_crops<true>(images, slots, tops, pad, nullptr, out, Ch, H, W, rh, rw);
}

// The same from uint8 pixel codes, decoded through `codes` [256].
extern "C" __global__ void __launch_bounds__(NX_CROP_THREADS)
nx_gather_crops_pad_u8(const unsigned char* images, const long long* slots, const long long* tops, const float* pad,
                       const float* codes, float* out, int Ch, int H, int W, int rh, int rw) {
    nx_gather_crops<false>(images, slots, tops, pad, codes, out, Ch, H, W, rh, rw);
}

extern "C" __global__ void __launch_bounds__(NX_CROP_THREADS)
nx_gather_crops_edge_u8(const unsigned char* images, const long long* slots, const long long* tops, const float* pad,
                        const float* codes, float* out, int Ch, int H, int W, int rh, int rw) {
    nx_gather_crops<true>(images, slots, tops, pad, codes, out, Ch, H, W, rh, rw);
}

// grid (U * Ch, ceil(rh * rw / (NX_CROP_THREADS * NX_CROP_PIXELS))), block NX_CROP_THREADS.
extern "C" __global__ void __launch_bounds__(NX_CROP_THREADS)
nx_accumulate_crops_pad(double* sums, const float* images, const long long* slots, const long long* tops,
                        const float* weights, const float* pad, int J, int Ch, int H, int W, int rh, int rw) {
    nx_accumulate_crops<false>(sums, images, slots, tops, weights, pad, nullptr, J, Ch, H, W, rh, rw);
}

extern "C" __global__ void __launch_bounds__(NX_CROP_THREADS)
nx_accumulate_crops_edge(double* sums, const float* images, const long long* slots, const long long* tops,
                         const float* weights, const float* pad, int J, int Ch, int H, int W, int rh, int rw) {
    nx_accumulate_crops<true>(sums, images, slots, tops, weights, pad, nullptr, J, Ch, H, W, rh, rw);
}

// The same from uint8 pixel codes, decoded through `codes` [256].
extern "C" __global__ void __launch_bounds__(NX_CROP_THREADS)
nx_accumulate_crops_pad_u8(double* sums, const unsigned char* images, const long long* slots, const long long* tops,
                           const float* weights, const float* pad, const float* codes, int J, int Ch, int H, int W,
                           int rh, int rw) {
    nx_accumulate_crops<false>(sums, images, slots, tops, weights, pad, codes, J, Ch, H, W, rh, rw);
}

extern "C" __global__ void __launch_bounds__(NX_CROP_THREADS)
nx_accumulate_crops_edge_u8(double* sums, const unsigned char* images, const long long* slots, const long long* tops,
                            const float* weights, const float* pad, const float* codes, int J, int Ch, int H, int W,
                            int rh, int rw) {
    nx_accumulate_crops<true>(sums, images, slots, tops, weights, pad, codes, J, Ch, H, W, rh, rw);
}
