// pybind11 bindings of the CPU kernels. Tensors cross as integer data pointers (torch's data_ptr()),
// shapes and strides in elements, so the module needs no torch headers.
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;

namespace {

template <class T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void spatial_reduce(std::uintptr_t x, int dtype, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sb,
                    int64_t sc, int64_t sh, int64_t sw, std::uintptr_t out_max, std::uintptr_t out_argmax,
                    std::uintptr_t out_mean, int num_threads) {
  if (dtype < 0 || dtype > 2) throw py::value_error("spatial_reduce: dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  neuroidx::spatial_reduce(as_ptr<const void>(x), static_cast<neuroidx::DType>(dtype), B, C, H, W, sb, sc, sh, sw,
                           as_ptr<float>(out_max), as_ptr<int64_t>(out_argmax), as_ptr<float>(out_mean),
                           num_threads);
}

void topk_update(std::uintptr_t state_values, std::uintptr_t state_ids, std::uintptr_t state_positions, int64_t C,
                 int64_t K, std::uintptr_t values, std::uintptr_t ids, std::uintptr_t positions, int64_t B,
                 int num_threads) {
  neuroidx::topk_update(as_ptr<float>(state_values), as_ptr<int64_t>(state_ids), as_ptr<int64_t>(state_positions),
                        C, K, as_ptr<const float>(values), as_ptr<const int64_t>(ids),
                        as_ptr<const int64_t>(positions), B, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "neuroidx_fast CPU kernels (csrc/cpu)";
  m.def("spatial_reduce", &spatial_reduce, py::call_guard<py::gil_scoped_release>(),
        "Per (b, c) max, first argmax and mean of a [B, C, H, W] map given by pointer, dtype code and strides.");
  m.def("topk_update", &topk_update, py::call_guard<py::gil_scoped_release>(),
        "In-place streaming top-K update of [C, K] sorted state rows with [B, C] candidates.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
