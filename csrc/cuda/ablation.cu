// Masked batched ablation (contract: neuroidx_fast/ops/reference.py).
//
// nx_mask_replicas_{u16,u32,u64}: M masked replicas of a strided [B, C, H, W] map, a bit copy of 2-,
// 4- or 8-byte elements. blockIdx.x / threadIdx.x run over the elements j of one output row in the
// output's memory order (c-major for NCHW, position-major for channels_last: coalesced stores);
// blockIdx.y strides over the rows r = m * B + b, so one thread decodes its (c, y, x) once and writes
// that element of every row it visits. x is read only where the row's mask keeps the unit.
//
// nx_readout_ablation_argmax: one thread per (unit u, image b); it walks the K classes in order and
// keeps the first maximum of the ablated logit z with its bound e, the largest upper bound z + e with
// its first class and the largest upper bound among the other classes. Every float64 operation is a
// round-to-nearest intrinsic (__dadd_rn, __dmul_rn, ...), which the compiler never fuses into a
// multiply-add: the same bits as the reference's separate operations.
#include "common.cuh"

#define NX_MR_THREADS 256  // block size of the replica kernels (the launcher uses the same)
#define NX_RO_THREADS 128  // block size of the read-out kernel (the launcher uses the same)

template <class T>
__device__ __forceinline__ void nx_mask_replicas(const T* __restrict__ x, const unsigned char* __restrict__ masks,
                                                 const T* __restrict__ fill, T* __restrict__ out, int B, int C,
                                                 int W, int HW, long long sB, long long sC, long long sH,
                                                 long long sW, int rows, int channels_last) {
    const int row_len = C * HW;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= row_len) return;
    int c, p;
    if (channels_last) {
        p = j / C;
        c = j - p * C;
    } else {
        c = j / HW;
        p = j - c * HW;
    }
    const int y = p / W;
    const int xx = p - y * W;
    const long long offset = (long long)c * sC + (long long)y * sH + (long long)xx * sW;
    const T value = fill[c];
    // long long: r + gridDim.y passes INT_MAX (undefined behaviour) for rows near 2^31
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        const long long m = r / B;
        const long long b = r - m * B;
        out[(long long)r * row_len + j] = masks[(long long)m * C + c] ? value : x[(long long)b * sB + offset];
    }
}

#define NX_MR_KERNEL(SUFFIX, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(NX_MR_THREADS)                                              \
        nx_mask_replicas_##SUFFIX(const T* __restrict__ x, const unsigned char* __restrict__ masks,          \
                                  const T* __restrict__ fill, T* __restrict__ out, int B, int C, int W,      \
                                  int HW, long long sB, long long sC, long long sH, long long sW, int rows,  \
                                  int channels_last) {                                                       \
        nx_mask_replicas<T>(x, masks, fill, out, B, C, W, HW, sB, sC, sH, sW, rows, channels_last);          \
    }

NX_MR_KERNEL(u16, unsigned short)
NX_MR_KERNEL(u32, unsigned int)
NX_MR_KERNEL(u64, unsigned long long)

__device__ __forceinline__ double nx_dabs(double v) {
    return __longlong_as_double(__double_as_longlong(v) & 0x7fffffffffffffffLL);
}

__device__ __forceinline__ bool nx_dfinite(double v) {
    return (__double_as_longlong(v) & 0x7ff0000000000000LL) != 0x7ff0000000000000LL;
}

extern "C" __global__ void __launch_bounds__(NX_RO_THREADS)
    nx_readout_ablation_argmax(const double* __restrict__ logits, const double* __restrict__ features,
                               const double* __restrict__ weight, const double* __restrict__ ablated,
                               const long long* __restrict__ units, const double* __restrict__ scale,
                               long long* __restrict__ pred, double err_rel, int B, int C, int K, int U) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= U) return;
    const long long c = units[u];
    const double a = ablated[c];
    const double neg_inf = __longlong_as_double(0xfff0000000000000LL);
    for (long long b = blockIdx.y; b < B; b += gridDim.y) {
        const double f = features[(long long)b * C + c];
        const double d = __dsub_rn(a, f);
        const double ad = __dsub_rn(nx_dabs(a), nx_dabs(f));
        const double* lrow = logits + (long long)b * K;
        const double* srow = scale + (long long)b * K;
        double z_best = neg_inf, e_best = 0.0, u1 = neg_inf, u2 = neg_inf;
        int i_best = -1, i1 = -1;
        bool finite = true;
        for (int k = 0; k < K; ++k) {
            const double w = weight[(long long)k * C + c];
            const double z = __dadd_rn(lrow[k], __dmul_rn(w, d));
            double bound = __dadd_rn(srow[k], __dmul_rn(nx_dabs(w), ad));
            bound = bound < 0.0 ? 0.0 : bound;  // NaN stays NaN, as torch.clamp
            const double e = __dmul_rn(err_rel, bound);
            if (!nx_dfinite(z) || !nx_dfinite(e)) {
                finite = false;
                break;
            }
            if (z > z_best || i_best < 0) {
                z_best = z;
                e_best = e;
                i_best = k;
            }
            const double up = __dadd_rn(z, e);
            if (up > u1 || i1 < 0) {
                u2 = u1;
                u1 = up;
                i1 = k;
            } else if (up > u2) {
                u2 = up;
            }
        }
        long long result = -1;
        if (finite && i_best >= 0) {
            const double other = i1 == i_best ? u2 : u1;
            if (__dsub_rn(z_best, e_best) > other) result = i_best;
        }
        pred[(long long)u * B + b] = result;
    }
}
