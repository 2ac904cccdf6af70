// topk_update: merge a batch of candidates into the streaming per-unit top-K state, in place
// (reference.py holds the contract; nx_better in common.cuh is the order).
//
// One block of NX_TOPK_THREADS threads per unit c (blockIdx.x). Each row of the state is sorted
// best first, so its last slot is the unit's admission threshold:
//   0. every thread checks its share of the B candidates values[:, c] against the threshold; if no
//      candidate beats it the block returns without writing (the common case once the state is
//      warm: B loads and one barrier per unit);
//   1. the row is copied to shared memory and the admitted candidates are compacted there, in
//      batch order (a block-wide scan);
//   2. each admitted candidate finds lo = the number of old entries ranked before it by binary
//      search on the sorted row (an old entry equal in (value, id) ranks first); a histogram
//      counts the candidates per lo;
//   3. an inclusive scan of the histogram gives, for old entry j, the number of candidates ranked
//      before it: those with lo <= j;
//   4. new rank of old entry j = j + that count; new rank of candidate i = lo_i + the number of
//      candidates ranked before it (better, or equal in (value, id) with a lower batch index).
//      The ranks are a permutation of 0 .. K + n - 1; the entries with rank < K are written to
//      their slot. All reads of the row happened in step 1, before the barriers, so the writes
//      cannot clobber an entry that is still to be read; an old entry that keeps its slot is not
//      written at all.
// Dynamic shared memory: 24 K + 20 B bytes (see the layout below; the launcher computes the same).
#include "common.cuh"

#define NX_TOPK_THREADS 256  // block size (the launcher uses the same)
#define NX_TOPK_WARPS (NX_TOPK_THREADS / 32)

// Exclusive prefix sum of x over the block; *total receives the block's sum. Every thread of the
// block must call it (it holds barriers); s_scan has NX_TOPK_WARPS + 1 ints.
__device__ __forceinline__ int nx_block_exclusive_scan(int x, int* s_scan, int* total) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    int inclusive = x;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int y = __shfl_up_sync(NX_FULL_MASK, inclusive, offset);
        if (lane >= offset) inclusive += y;
    }
    if (lane == 31) s_scan[warp] = inclusive;
    __syncthreads();
    if (threadIdx.x == 0) {  // a handful of warp totals: a serial scan is enough
        int running = 0;
        for (int k = 0; k < NX_TOPK_WARPS; ++k) {
            const int t = s_scan[k];
            s_scan[k] = running;
            running += t;
        }
        s_scan[NX_TOPK_WARPS] = running;
    }
    __syncthreads();
    const int result = s_scan[warp] + inclusive - x;
    *total = s_scan[NX_TOPK_WARPS];
    __syncthreads();  // s_scan is reused by the next call
    return result;
}

extern "C" __global__ void __launch_bounds__(NX_TOPK_THREADS)
    nx_topk_update(float* __restrict__ state_values, long long* __restrict__ state_ids,
                   long long* __restrict__ state_positions, const float* __restrict__ values,
                   const long long* __restrict__ ids, const long long* __restrict__ positions, int num_units,
                   int k, int batch) {
    extern __shared__ long long nx_topk_smem[];  // long long: 8-byte aligned
    __shared__ int s_scan[NX_TOPK_WARPS + 1];

    const int unit = blockIdx.x;
    const int tid = threadIdx.x;
    float* row_v = state_values + (long long)unit * k;
    long long* row_id = state_ids + (long long)unit * k;
    long long* row_pos = state_positions + (long long)unit * k;

    // 0. Admission test against the K-th entry.
    const float thr_v = row_v[k - 1];
    const long long thr_id = row_id[k - 1];
    int any_admitted = 0;
    for (int b = tid; b < batch; b += NX_TOPK_THREADS) {
        if (nx_better(values[(long long)b * num_units + unit], ids[b], thr_v, thr_id)) {
            any_admitted = 1;
            break;
        }
    }
    if (!__syncthreads_or(any_admitted)) return;  // block-uniform

    // Shared layout (8-byte arrays first): 8 * (2 K + B) + 4 * (2 K + 3 B) = 24 K + 20 B bytes.
    long long* s_old_id = nx_topk_smem;                // [K]
    long long* s_old_pos = s_old_id + k;               // [K]
    long long* s_cand_id = s_old_pos + k;              // [B]
    float* s_old_v = (float*)(s_cand_id + batch);      // [K]
    int* s_before_old = (int*)(s_old_v + k);           // [K] histogram of lo, then its inclusive scan
    float* s_cand_v = (float*)(s_before_old + k);      // [B]
    int* s_cand_b = (int*)(s_cand_v + batch);          // [B] batch index of each admitted candidate
    int* s_cand_lo = s_cand_b + batch;                 // [B]

    // 1. Copy the row; compact the admitted candidates in batch order.
    for (int j = tid; j < k; j += NX_TOPK_THREADS) {
        s_old_v[j] = row_v[j];
        s_old_id[j] = row_id[j];
        s_old_pos[j] = row_pos[j];
        s_before_old[j] = 0;
    }
    int n_cand = 0;  // block-uniform
    for (int b0 = 0; b0 < batch; b0 += NX_TOPK_THREADS) {
        const int b = b0 + tid;
        float v = 0.0f;
        long long id = -1;
        int admitted = 0;
        if (b < batch) {
            v = values[(long long)b * num_units + unit];
            id = ids[b];
            admitted = nx_better(v, id, thr_v, thr_id) ? 1 : 0;
        }
        int chunk_total;
        const int slot = n_cand + nx_block_exclusive_scan(admitted, s_scan, &chunk_total);
        if (admitted) {
            s_cand_v[slot] = v;
            s_cand_id[slot] = id;
            s_cand_b[slot] = b;
        }
        n_cand += chunk_total;
    }
    __syncthreads();

    // 2. lo = first j with candidate better than old entry j; it exists since the candidate beats
    //    entry K - 1, and the predicate is monotone in j because the row is sorted.
    for (int i = tid; i < n_cand; i += NX_TOPK_THREADS) {
        const float v = s_cand_v[i];
        const long long id = s_cand_id[i];
        int lo = 0;
        int hi = k - 1;
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (nx_better(v, id, s_old_v[mid], s_old_id[mid])) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        s_cand_lo[i] = lo;
        atomicAdd(&s_before_old[lo], 1);
    }
    __syncthreads();

    // 3. Inclusive scan: s_before_old[j] = number of candidates with lo <= j, i.e. ranked before
    //    old entry j.
    int running = 0;  // block-uniform
    for (int j0 = 0; j0 < k; j0 += NX_TOPK_THREADS) {
        const int j = j0 + tid;
        const int count = j < k ? s_before_old[j] : 0;
        int chunk_total;
        const int exclusive = nx_block_exclusive_scan(count, s_scan, &chunk_total);
        if (j < k) s_before_old[j] = running + exclusive + count;
        running += chunk_total;
    }
    __syncthreads();

    // 4. Scatter every entry whose new rank is below K.
    for (int j = tid; j < k; j += NX_TOPK_THREADS) {
        const int before = s_before_old[j];
        const int rank = j + before;
        if (before != 0 && rank < k) {
            row_v[rank] = s_old_v[j];
            row_id[rank] = s_old_id[j];
            row_pos[rank] = s_old_pos[j];
        }
    }
    for (int i = tid; i < n_cand; i += NX_TOPK_THREADS) {
        const float v = s_cand_v[i];
        const long long id = s_cand_id[i];
        int rank = s_cand_lo[i];
        for (int i2 = 0; i2 < n_cand && rank < k; ++i2) {
            const float v2 = s_cand_v[i2];
            const long long id2 = s_cand_id[i2];
            if (nx_better(v2, id2, v, id) || (i2 < i && v2 == v && id2 == id)) ++rank;
        }
        if (rank < k) {
            row_v[rank] = v;
            row_id[rank] = id;
            row_pos[rank] = positions[(long long)s_cand_b[i] * num_units + unit];
        }
    }
}
