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

// pad == 0 (a null pointer) selects edge mode; codes: the images are uint8 pixel codes, not float32.
void gather_crops(std::uintptr_t images, int64_t N, int64_t Ch, int64_t H, int64_t W, std::uintptr_t slots,
                  std::uintptr_t tops, int64_t M, int64_t rh, int64_t rw, std::uintptr_t pad, std::uintptr_t out,
                  int num_threads, bool codes) {
  if (rh < 1 || rw < 1) throw py::value_error("gather_crops: crop size must be positive");
  if (codes)
    neuroidx::gather_crops(as_ptr<const uint8_t>(images), N, Ch, H, W, as_ptr<const int64_t>(slots),
                           as_ptr<const int64_t>(tops), M, rh, rw, as_ptr<const float>(pad), as_ptr<float>(out),
                           num_threads);
  else
    neuroidx::gather_crops(as_ptr<const float>(images), N, Ch, H, W, as_ptr<const int64_t>(slots),
                           as_ptr<const int64_t>(tops), M, rh, rw, as_ptr<const float>(pad), as_ptr<float>(out),
                           num_threads);
}

void accumulate_crops(std::uintptr_t sums, int64_t U, int64_t Ch, int64_t rh, int64_t rw, std::uintptr_t images,
                      int64_t N, int64_t H, int64_t W, std::uintptr_t slots, std::uintptr_t tops,
                      std::uintptr_t weights, int64_t J, std::uintptr_t pad, int num_threads, bool codes) {
  if (rh < 1 || rw < 1) throw py::value_error("accumulate_crops: crop size must be positive");
  if (codes)
    neuroidx::accumulate_crops(as_ptr<double>(sums), U, Ch, rh, rw, as_ptr<const uint8_t>(images), N, H, W,
                               as_ptr<const int64_t>(slots), as_ptr<const int64_t>(tops),
                               as_ptr<const float>(weights), J, as_ptr<const float>(pad), num_threads);
  else
    neuroidx::accumulate_crops(as_ptr<double>(sums), U, Ch, rh, rw, as_ptr<const float>(images), N, H, W,
                               as_ptr<const int64_t>(slots), as_ptr<const int64_t>(tops),
                               as_ptr<const float>(weights), J, as_ptr<const float>(pad), num_threads);
}

int64_t accumulate_crops_via_codes(std::uintptr_t sums, int64_t U, int64_t Ch, int64_t rh, int64_t rw,
                                   std::uintptr_t images, int64_t N, int64_t H, int64_t W, std::uintptr_t slots,
                                   std::uintptr_t tops, std::uintptr_t weights, int64_t J, std::uintptr_t pad,
                                   std::uintptr_t scratch, int num_threads) {
  if (rh < 1 || rw < 1) throw py::value_error("accumulate_crops_via_codes: crop size must be positive");
  return neuroidx::accumulate_crops_via_codes(as_ptr<double>(sums), U, Ch, rh, rw, as_ptr<const float>(images), N, H,
                                              W, as_ptr<const int64_t>(slots), as_ptr<const int64_t>(tops),
                                              as_ptr<const float>(weights), J, as_ptr<const float>(pad),
                                              as_ptr<uint8_t>(scratch), num_threads);
}

bool pixel_codes(std::uintptr_t images, int64_t n, std::uintptr_t codes, int num_threads) {
  return neuroidx::pixel_codes(as_ptr<const float>(images), n, as_ptr<uint8_t>(codes), num_threads);
}

py::list pixel_code_values() {
  py::list values;
  for (int k = 0; k < 256; ++k) values.append(neuroidx::pixel_code_value(static_cast<uint8_t>(k)));
  return values;
}

void mask_replicas(std::uintptr_t x, int64_t elem_size, int64_t B, int64_t C, int64_t H, int64_t W, int64_t sb,
                   int64_t sc, int64_t sh, int64_t sw, std::uintptr_t masks, int64_t M, std::uintptr_t fill,
                   std::uintptr_t out, bool channels_last, int num_threads) {
  if (elem_size != 2 && elem_size != 4 && elem_size != 8)
    throw py::value_error("mask_replicas: element size must be 2, 4 or 8 bytes");
  neuroidx::mask_replicas(as_ptr<const void>(x), elem_size, B, C, H, W, sb, sc, sh, sw, as_ptr<const uint8_t>(masks),
                          M, as_ptr<const void>(fill), as_ptr<void>(out), channels_last, num_threads);
}

void readout_ablation_argmax(std::uintptr_t logits, std::uintptr_t features, std::uintptr_t weight_t,
                             std::uintptr_t ablated, std::uintptr_t units, int64_t U, std::uintptr_t scale,
                             double err_rel, int64_t B, int64_t C, int64_t K, std::uintptr_t pred, int num_threads) {
  neuroidx::readout_ablation_argmax(as_ptr<const double>(logits), as_ptr<const double>(features),
                                    as_ptr<const double>(weight_t), as_ptr<const double>(ablated),
                                    as_ptr<const int64_t>(units), U, as_ptr<const double>(scale), err_rel, B, C, K,
                                    as_ptr<int64_t>(pred), num_threads);
}

void lrn_forward(std::uintptr_t x, std::uintptr_t y, int64_t B, int64_t C, int64_t HW, bool channels_last,
                 int64_t size, float alpha, float beta, float k, int num_threads) {
  if (size < 1) throw py::value_error("lrn_forward: size must be positive");
  neuroidx::lrn_forward(as_ptr<const float>(x), as_ptr<float>(y), B, C, HW, channels_last, size, alpha, beta, k,
                        num_threads);
}

void lrn_backward(std::uintptr_t x, std::uintptr_t grad, std::uintptr_t grad_x, int64_t B, int64_t C, int64_t HW,
                  bool channels_last, int64_t size, float alpha, float beta, float k, int num_threads) {
  if (size < 1) throw py::value_error("lrn_backward: size must be positive");
  neuroidx::lrn_backward(as_ptr<const float>(x), as_ptr<const float>(grad), as_ptr<float>(grad_x), B, C, HW,
                         channels_last, size, alpha, beta, k, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "neuroidx_fast CPU kernels (csrc/cpu)";
  m.def("spatial_reduce", &spatial_reduce, py::call_guard<py::gil_scoped_release>(),
        "Per (b, c) max, first argmax and mean of a [B, C, H, W] map given by pointer, dtype code and strides.");
  m.def("topk_update", &topk_update, py::call_guard<py::gil_scoped_release>(),
        "In-place streaming top-K update of [C, K] sorted state rows with [B, C] candidates.");
  m.def("gather_crops", &gather_crops, py::call_guard<py::gil_scoped_release>(),
        "Copy [M, Ch, rh, rw] float32 crops out of [N, Ch, H, W] float32 images or uint8 pixel codes (codes=True) "
        "(pad pointer 0: edge mode).");
  m.def("accumulate_crops", &accumulate_crops, py::call_guard<py::gil_scoped_release>(),
        "In-place float64 sums[u] += weights[u, j] * crop(u, j), j in order, from float32 images or uint8 pixel "
        "codes (codes=True) (pad pointer 0: edge mode).");
  m.def("accumulate_crops_via_codes", &accumulate_crops_via_codes, py::call_guard<py::gil_scoped_release>(),
        "accumulate_crops from float32 images read through their uint8 pixel codes, found one channel at a time "
        "into scratch [N*H*W] (a channel that is not all codes, and the rest, read as float32); returns how many "
        "channels went through codes.");
  m.def("set_crop_kernels_avx512", &neuroidx::set_crop_kernels_avx512,
        "accumulate_crops: False takes the portable loops, True the AVX-512 ones where the CPU has them "
        "(the default); returns whether the AVX-512 loops are in use.");
  m.def("crop_kernels_avx512", &neuroidx::crop_kernels_avx512,
        "Whether accumulate_crops runs its AVX-512 loops (else the portable ones).");
  m.def("pixel_codes", &pixel_codes, py::call_guard<py::gil_scoped_release>(),
        "Fill n uint8 pixel codes from n contiguous float32 pixels; False unless every pixel is its code's value.");
  m.def("pixel_code_values", &pixel_code_values,
        "The float32 value (as a Python float) the crop kernels give each uint8 pixel code 0..255.");
  m.def("mask_replicas", &mask_replicas, py::call_guard<py::gil_scoped_release>(),
        "M masked replicas [M*B, C, H, W] of a strided [B, C, H, W] map (bit copy of 2/4/8-byte elements).");
  m.def("readout_ablation_argmax", &readout_ablation_argmax, py::call_guard<py::gil_scoped_release>(),
        "Certified argmax of linear read-out logits with one input unit ablated, per (unit, image); -1 if uncertain.");
  m.def("lrn_forward", &lrn_forward, py::call_guard<py::gil_scoped_release>(),
        "Cross-channel local response normalisation of a dense float32 NCHW / NHWC map, one pass.");
  m.def("lrn_backward", &lrn_backward, py::call_guard<py::gil_scoped_release>(),
        "Input gradient of lrn_forward from x and the output gradient, one pass (recomputes the divisor).");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
