// spatial_reduce: one read of x [B, C, H, W] gives, per map (b, c), its max, the flat index
// y * W + x of that max (the lowest one on ties) and its mean (reference.py holds the contract).
//
// Two kernel families, picked by the launcher (neuroidx_fast/ops/cuda.py) from the strides:
//   nx_sr_groups_*   a group of G = 2^log2g threads (1 .. 256) reduces one map; the G threads read
//                    adjacent elements of the map, so maps whose elements are adjacent in memory
//                    (NCHW) are read coalesced. `contig`: element p of the map sits at p;
//                    `strided`: at h * sH + w * sW (any strides, e.g. a sliced tensor).
//   nx_sr_threads_*  one thread reduces one map and adjacent threads take adjacent maps (adjacent
//                    c), so channels_last tensors (stride of C == 1) are read coalesced. `flat`:
//                    sH == W * sW, the map is one strided run, which may be cut into 2^log2g
//                    slices of consecutive positions when there are too few maps to fill the
//                    device (combined through shared memory); `rows`: any strides, never sliced.
//
// Exactness. Every thread walks its elements in increasing flat index and takes a new maximum
// only when it is strictly larger, so it keeps the lowest index among its equal maxima; partial
// results are combined with nx_take_better (larger value, then lower index). The stored max is
// the element itself converted to float (the conversions are exact). NaN never wins a comparison
// in that pass; instead it propagates into the float sum, so a map whose sum is NaN is scanned
// a second time for its first NaN (a sum is NaN iff the map holds a NaN or both +inf and -inf;
// in the latter case the second scan finds nothing and the first result stands). A map that is
// all -inf keeps the "no index" marker, turned into argmax 0 with max -inf.
#include "common.cuh"

// First element of map `map` = b * C + c (threads past the last map keep x and read nothing).
template <class T>
__device__ __forceinline__ const T* nx_map_base(const T* x, long long map, bool valid, long long C, long long sB,
                                                long long sC) {
  if (!valid) return x;
  const long long b = map / C;
  return x + b * sB + (map - b * C) * sC;
}


#define NX_SR_THREADS 256  // block size of every kernel in this file (the launcher uses the same)
#define NX_SR_WARPS (NX_SR_THREADS / 32)
#define NX_SR_CHUNK 64  // per-thread kernels sum runs of this many elements separately (accuracy)

// Strictly larger only: a thread visits its elements in increasing p, so it keeps the first maximum.
__device__ __forceinline__ void nx_sr_max(float v, int p, float& best, int& idx) {
    if (v > best) {
        best = v;
        idx = p;
    }
}

__device__ __forceinline__ long long nx_sr_offset(int p, int W, long long sH, long long sW) {
    const int h = p / W;
    return (long long)h * sH + (long long)(p - h * W) * sW;
}

// Offsets of the positions start, start + step, start + 2 * step, ... of an H x W map with
// strides (sH, sW), without a division per step.
struct NxMapWalk {
    int w, dw, W;
    long long off, doff, wrap;

    __device__ __forceinline__ NxMapWalk(int start, int step, int W_, long long sH, long long sW) {
        W = W_;
        const int h = start / W;
        w = start - h * W;
        const int dh = step / W;
        dw = step - dh * W;
        off = (long long)h * sH + (long long)w * sW;
        doff = (long long)dh * sH + (long long)dw * sW;
        wrap = sH - (long long)W * sW;
    }

    __device__ __forceinline__ void advance() {
        w += dw;
        off += doff;
        if (w >= W) {  // w + dw < 2 W: at most one carry into the next row
            w -= W;
            off += wrap;
        }
    }
};

template <typename L, bool CONTIG>
__device__ __forceinline__ void nx_sr_groups(const typename L::T* __restrict__ x, float* __restrict__ vmax,
                                             long long* __restrict__ argmax, float* __restrict__ vmean, int C,
                                             int H, int W, long long sB, long long sC, long long sH, long long sW,
                                             long long num_maps, int log2g) {
    __shared__ float s_best[NX_SR_WARPS];
    __shared__ int s_idx[NX_SR_WARPS];
    __shared__ float s_sum[NX_SR_WARPS];
    __shared__ int s_nan[NX_SR_WARPS];

    const int group = 1 << log2g;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int sub = tid & (group - 1);
    const long long map = (long long)blockIdx.x * (NX_SR_THREADS >> log2g) + (tid >> log2g);
    const bool valid = map < num_maps;
    const int hw = H * W;
    // Threads past the last map own no element but still take part in the shuffles and barriers.
    const int n = valid ? hw : 0;

    const typename L::T* base = nx_map_base(x, map, valid, C, sB, sC);

    float best = nx_neg_inf();
    int idx = NX_NO_INDEX;
    float sum = 0.0f;

    if (CONTIG) {
        int p = sub;
        for (; p + 3 * group < n; p += 4 * group) {  // four independent loads in flight
            const float v0 = L::load(base + p);
            const float v1 = L::load(base + p + group);
            const float v2 = L::load(base + p + 2 * group);
            const float v3 = L::load(base + p + 3 * group);
            nx_sr_max(v0, p, best, idx);
            nx_sr_max(v1, p + group, best, idx);
            nx_sr_max(v2, p + 2 * group, best, idx);
            nx_sr_max(v3, p + 3 * group, best, idx);
            sum += (v0 + v1) + (v2 + v3);
        }
        for (; p < n; p += group) {
            const float v = L::load(base + p);
            nx_sr_max(v, p, best, idx);
            sum += v;
        }
    } else {
        NxMapWalk walk(sub, group, W, sH, sW);
#pragma unroll 4
        for (int p = sub; p < n; p += group) {
            const float v = L::load(base + walk.off);
            nx_sr_max(v, p, best, idx);
            sum += v;
            walk.advance();
        }
    }

    // Combine the group: butterfly shuffles inside a warp (every lane ends with the result)...
    const int width = group < 32 ? group : 32;
    for (int offset = width >> 1; offset > 0; offset >>= 1) {
        const float other_best = __shfl_xor_sync(NX_FULL_MASK, best, offset);
        const int other_idx = __shfl_xor_sync(NX_FULL_MASK, idx, offset);
        const float other_sum = __shfl_xor_sync(NX_FULL_MASK, sum, offset);
        nx_take_better(best, idx, other_best, other_idx);
        sum += other_sum;
    }
    // ... then across the warps of a group wider than a warp (block-uniform branch).
    const int warps_per_group = group >> 5;
    const int first_warp = group > 32 ? (warp / warps_per_group) * warps_per_group : warp;
    if (group > 32) {
        if (lane == 0) {
            s_best[warp] = best;
            s_idx[warp] = idx;
            s_sum[warp] = sum;
        }
        __syncthreads();
        best = s_best[first_warp];
        idx = s_idx[first_warp];
        sum = s_sum[first_warp];
        for (int k = 1; k < warps_per_group; ++k) {
            nx_take_better(best, idx, s_best[first_warp + k], s_idx[first_warp + k]);
            sum += s_sum[first_warp + k];
        }
    }

    // NaN: rare, so found by a second scan of the maps whose sum is NaN (the same for the whole
    // group). __syncthreads_or makes the branch block-uniform for the shuffles and barriers.
    const bool scan_nan = valid && nx_isnan(sum);
    if (__syncthreads_or(scan_nan)) {
        int first_nan = NX_NO_INDEX;
        if (scan_nan) {
            if (CONTIG) {
                for (int p = sub; p < n; p += group) {
                    if (nx_isnan(L::load(base + p))) {
                        first_nan = p;
                        break;
                    }
                }
            } else {
                NxMapWalk walk(sub, group, W, sH, sW);
                for (int p = sub; p < n; p += group) {
                    if (nx_isnan(L::load(base + walk.off))) {
                        first_nan = p;
                        break;
                    }
                    walk.advance();
                }
            }
        }
        for (int offset = width >> 1; offset > 0; offset >>= 1)
            first_nan = nx_min_int(first_nan, __shfl_xor_sync(NX_FULL_MASK, first_nan, offset));
        if (group > 32) {
            if (lane == 0) s_nan[warp] = first_nan;
            __syncthreads();
            first_nan = s_nan[first_warp];
            for (int k = 1; k < warps_per_group; ++k) first_nan = nx_min_int(first_nan, s_nan[first_warp + k]);
        }
        if (first_nan != NX_NO_INDEX) {
            best = L::load(base + (CONTIG ? (long long)first_nan : nx_sr_offset(first_nan, W, sH, sW)));
            idx = first_nan;
        }
    }

    if (valid && sub == 0) {
        vmax[map] = best;
        argmax[map] = idx == NX_NO_INDEX ? 0 : idx;  // no index: the map is all -inf
        vmean[map] = sum / (float)hw;
    }
}

template <typename L, bool FLAT>
__device__ __forceinline__ void nx_sr_threads(const typename L::T* __restrict__ x, float* __restrict__ vmax,
                                              long long* __restrict__ argmax, float* __restrict__ vmean, int C,
                                              int H, int W, long long sB, long long sC, long long sH, long long sW,
                                              long long num_maps, int log2s) {
    __shared__ float s_best[NX_SR_THREADS];
    __shared__ int s_idx[NX_SR_THREADS];
    __shared__ float s_sum[NX_SR_THREADS];

    // `flat` maps may be split into 2^log2s slices of consecutive positions (when there are too few
    // maps to fill the device); thread t of the block takes map t % maps_per_block and slice
    // t / maps_per_block, so a warp still reads 32 adjacent maps. `rows` maps are never split.
    const int slices = FLAT ? 1 << log2s : 1;
    const int maps_per_block = NX_SR_THREADS / slices;
    const int local = threadIdx.x % maps_per_block;
    const int slice = threadIdx.x / maps_per_block;
    const long long map = (long long)blockIdx.x * maps_per_block + local;
    const bool valid = map < num_maps;
    const int hw = H * W;
    const typename L::T* base = nx_map_base(x, map, valid, C, sB, sC);

    float best = nx_neg_inf();
    int idx = NX_NO_INDEX;
    float sum = 0.0f;

    if (FLAT) {  // position p at p * sW
        const int per_slice = (hw + slices - 1) / slices;
        const int begin = (int)(slice * (long long)per_slice < hw ? slice * (long long)per_slice : hw);
        const int stop = valid ? nx_min_int(begin + per_slice, hw) : begin;
        for (int p0 = begin; p0 < stop; p0 += NX_SR_CHUNK) {
            const int end = nx_min_int(p0 + NX_SR_CHUNK, stop);
            const typename L::T* ptr = base + (long long)p0 * sW;
            float part = 0.0f;
            int p = p0;
            for (; p + 7 < end; p += 8) {  // eight independent loads in flight
                float v[8];
#pragma unroll
                for (int k = 0; k < 8; ++k) v[k] = L::load(ptr + k * sW);
#pragma unroll
                for (int k = 0; k < 8; ++k) nx_sr_max(v[k], p + k, best, idx);
                part += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
                ptr += 8 * sW;
            }
            for (; p < end; ++p) {
                const float v = L::load(ptr);
                nx_sr_max(v, p, best, idx);
                part += v;
                ptr += sW;
            }
            sum += part;
        }
    } else if (valid) {  // row by row
        for (int h = 0; h < H; ++h) {
            const typename L::T* ptr = base + (long long)h * sH;
            const int p_row = h * W;
            float part = 0.0f;
            int w = 0;
            for (; w + 7 < W; w += 8) {
                float v[8];
#pragma unroll
                for (int k = 0; k < 8; ++k) v[k] = L::load(ptr + k * sW);
#pragma unroll
                for (int k = 0; k < 8; ++k) nx_sr_max(v[k], p_row + w + k, best, idx);
                part += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
                ptr += 8 * sW;
            }
            for (; w < W; ++w) {
                const float v = L::load(ptr);
                nx_sr_max(v, p_row + w, best, idx);
                part += v;
                ptr += sW;
            }
            sum += part;
        }
    }

    if (slices > 1) {  // block-uniform: combine the slices of each map in the slice-0 thread
        s_best[threadIdx.x] = best;
        s_idx[threadIdx.x] = idx;
        s_sum[threadIdx.x] = sum;
        __syncthreads();
        if (slice != 0) return;  // past the only barrier
        for (int s = 1; s < slices; ++s) {
            const int t = s * maps_per_block + local;
            nx_take_better(best, idx, s_best[t], s_idx[t]);
            sum += s_sum[t];
        }
    }
    if (!valid) return;

    if (nx_isnan(sum)) {  // rare: look for the first NaN of the whole map (see the file comment)
        for (int p = 0; p < hw; ++p) {
            const float v = L::load(base + (FLAT ? (long long)p * sW : nx_sr_offset(p, W, sH, sW)));
            if (nx_isnan(v)) {
                best = v;
                idx = p;
                break;
            }
        }
    }

    vmax[map] = best;
    argmax[map] = idx == NX_NO_INDEX ? 0 : idx;  // no index: the map is all -inf
    vmean[map] = sum / (float)hw;
}

#define NX_SR_PARAMS(T)                                                                                     \
    const T *__restrict__ x, float *__restrict__ vmax, long long *__restrict__ argmax,                      \
        float *__restrict__ vmean, int C, int H, int W, long long sB, long long sC, long long sH, long long sW, \
        long long num_maps, int log2g

#define NX_SR_KERNELS(SUFFIX, LOADER)                                                                          \
    extern "C" __global__ void __launch_bounds__(NX_SR_THREADS)                                                \
        nx_sr_groups_contig_##SUFFIX(NX_SR_PARAMS(LOADER::T)) {                                                \
        nx_sr_groups<LOADER, true>(x, vmax, argmax, vmean, C, H, W, sB, sC, sH, sW, num_maps, log2g);          \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(NX_SR_THREADS)                                                \
        nx_sr_groups_strided_##SUFFIX(NX_SR_PARAMS(LOADER::T)) {                                               \
        nx_sr_groups<LOADER, false>(x, vmax, argmax, vmean, C, H, W, sB, sC, sH, sW, num_maps, log2g);         \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(NX_SR_THREADS)                                                \
        nx_sr_threads_flat_##SUFFIX(NX_SR_PARAMS(LOADER::T)) {                                                 \
        nx_sr_threads<LOADER, true>(x, vmax, argmax, vmean, C, H, W, sB, sC, sH, sW, num_maps, log2g);         \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(NX_SR_THREADS)                                                \
        nx_sr_threads_rows_##SUFFIX(NX_SR_PARAMS(LOADER::T)) {                                                 \
        nx_sr_threads<LOADER, false>(x, vmax, argmax, vmean, C, H, W, sB, sC, sH, sW, num_maps, log2g);        \
    }

NX_SR_KERNELS(f32, NxLoadF32)
NX_SR_KERNELS(f16, NxLoadF16)
NX_SR_KERNELS(bf16, NxLoadBF16)
