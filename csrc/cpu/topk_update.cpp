// Streaming top-K on CPU: each thread owns a contiguous range of units and walks the batch row by row,
// comparing each candidate with its unit's threshold (the K-th entry); the rare admitted candidate is
// inserted into the sorted row by binary search and a shift.
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace neuroidx {
namespace {

// The top-K order: a real entry (id >= 0) beats an empty one; then the larger value; then the lower id.
inline bool beats(float value_a, int64_t id_a, float value_b, int64_t id_b) {
  if (id_b < 0) return id_a >= 0;
  if (id_a < 0) return false;
  return value_a > value_b || (value_a == value_b && id_a < id_b);
}

inline void insert_sorted(float* row_values, int64_t* row_ids, int64_t* row_positions, int64_t K, float value,
                          int64_t id, int64_t position) {
  // First slot the candidate beats; entries it does not beat (exact ties included) stay ahead of it.
  int64_t lo = 0, hi = K - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (beats(value, id, row_values[mid], row_ids[mid])) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  for (int64_t j = K - 1; j > lo; --j) {
    row_values[j] = row_values[j - 1];
    row_ids[j] = row_ids[j - 1];
    row_positions[j] = row_positions[j - 1];
  }
  row_values[lo] = value;
  row_ids[lo] = id;
  row_positions[lo] = position;
}

}  // namespace

void topk_update(float* state_values, int64_t* state_ids, int64_t* state_positions, int64_t C, int64_t K,
                 const float* values, const int64_t* ids, const int64_t* positions, int64_t B, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  constexpr int64_t kUnitsPerTask = 512;
  const int64_t tasks = (C + kUnitsPerTask - 1) / kUnitsPerTask;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t c0 = t * kUnitsPerTask, nc = std::min(kUnitsPerTask, C - c0);
    std::vector<float> threshold_value(nc);
    std::vector<int64_t> threshold_id(nc);
    for (int64_t c = 0; c < nc; ++c) {
      threshold_value[c] = state_values[(c0 + c) * K + K - 1];
      threshold_id[c] = state_ids[(c0 + c) * K + K - 1];
    }
    for (int64_t b = 0; b < B; ++b) {
      const float* row = values + b * C + c0;
      const int64_t id = ids[b];
      for (int64_t c = 0; c < nc; ++c) {
        if (!beats(row[c], id, threshold_value[c], threshold_id[c])) continue;
        const int64_t unit = c0 + c;
        float* rv = state_values + unit * K;
        int64_t* ri = state_ids + unit * K;
        insert_sorted(rv, ri, state_positions + unit * K, K, row[c], id, positions[b * C + unit]);
        threshold_value[c] = rv[K - 1];
        threshold_id[c] = ri[K - 1];
      }
    }
  }
}

}  // namespace neuroidx
