"""The ``cpp`` backend: CPU kernels of csrc/cpu through the pybind11 module ``neuroidx_fast._C``."""

from __future__ import annotations

import torch

from .. import _C, huge_pages
from .crop_operands import codes_pay_off, crop_operands

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def check_device(device_type: str) -> None:
    if device_type != "cpu":
        raise RuntimeError(f"the cpp backend runs on CPU tensors only, not {device_type}")


def spatial_reduce(x: torch.Tensor):
    b, c, h, w = x.shape
    vmax = torch.empty((b, c), dtype=torch.float32)
    argmax = torch.empty((b, c), dtype=torch.int64)
    vmean = torch.empty((b, c), dtype=torch.float32)
    _C.spatial_reduce(x.data_ptr(), _DTYPE_CODES[x.dtype], b, c, h, w, *x.stride(),
                      vmax.data_ptr(), argmax.data_ptr(), vmean.data_ptr(), torch.get_num_threads())
    return vmax, argmax, vmean


def topk_update(state_values, state_ids, state_positions, values, ids, positions) -> None:
    num_units, k = state_values.shape
    for t in (state_values, state_ids, state_positions, values, ids, positions):
        assert t.is_contiguous() and t.device.type == "cpu"
    _C.topk_update(state_values.data_ptr(), state_ids.data_ptr(), state_positions.data_ptr(), num_units, k,
                   values.data_ptr(), ids.data_ptr(), positions.data_ptr(), values.shape[0],
                   torch.get_num_threads())


def _crop_operands(images, slots, tops, pad_value, what: str):
    """Contiguous CPU operands of the crop kernels; uint8 images are pixel codes (reference.py), which the
    kernels read as such."""
    return crop_operands(images, slots, tops, pad_value, what, pixel_types=(torch.float32, torch.uint8))


def gather_crops(images, slots, tops, size, pad_value):
    rh, rw = size
    n, ch, h, w = images.shape
    images, slots, tops, pad = _crop_operands(images, slots, tops, pad_value, "gather_crops")
    m = slots.shape[0]
    # Big outputs on huge pages: a fresh tensor's page faults were most of the time (800 crops of
    # 3 x 100 x 100, bench/bench_crops.py: 42 ms on 4 KiB pages, 14 ms on 2 MiB pages).
    crops = huge_pages.empty((m, ch, rh, rw), torch.float32)
    if crops.numel():
        _C.gather_crops(images.data_ptr(), n, ch, h, w, slots.data_ptr(), tops.data_ptr(), m, rh, rw,
                        0 if pad is None else pad.data_ptr(), crops.data_ptr(), torch.get_num_threads(),
                        images.dtype == torch.uint8)
    return crops


def accumulate_crops(sums, images, slots, tops, weights, pad_value, transcode: bool = True) -> int | None:
    """``transcode``: read float32 images made of 8-bit pixels as their uint8 codes where that pays off
    (codes_pay_off, with its measurements; the same bits, a quarter of the bytes to read); other images
    cost the check of their first pixels. The codes are found one channel at a time into one scratch
    buffer (a third of the page faults): on the 100 px crops of bench/bench_crops.py, 80 / 96.5 ms best /
    median of 14 against 85 / 103 ms with all the codes found first (measured before the codes were
    written with streaming stores, which leave them out of the cache either way). Returns how many
    channels were read through codes where they were tried (else None)."""
    u, ch, rh, rw = sums.shape
    if sums.dtype != torch.float64 or not sums.is_contiguous() or weights.dtype != torch.float32:
        raise TypeError("accumulate_crops: sums must be contiguous float64 and weights float32")
    images, slots, tops, pad = _crop_operands(images, slots, tops, pad_value, "accumulate_crops")
    weights = weights.contiguous()
    if sums.numel() == 0 or slots.numel() == 0:
        return
    if transcode and codes_pay_off(images, slots, (rh, rw), code_loops()):
        n, _, h, w = images.shape
        scratch = huge_pages.empty((n * h * w,), torch.uint8)  # a third of the codes: page faults cost too
        return _C.accumulate_crops_via_codes(sums.data_ptr(), u, ch, rh, rw, images.data_ptr(), n, h, w,
                                             slots.data_ptr(), tops.data_ptr(), weights.data_ptr(), slots.shape[1],
                                             0 if pad is None else pad.data_ptr(), scratch.data_ptr(),
                                             torch.get_num_threads())
    _C.accumulate_crops(sums.data_ptr(), u, ch, rh, rw, images.data_ptr(), images.shape[0], images.shape[2],
                        images.shape[3], slots.data_ptr(), tops.data_ptr(), weights.data_ptr(), slots.shape[1],
                        0 if pad is None else pad.data_ptr(), torch.get_num_threads(), images.dtype == torch.uint8)


def code_loops() -> str:
    """The kind of accumulation loops the kernels run for pixel codes: "avx512" (crop_runs_avx512.h, where
    the CPU has AVX-512 VBMI) or "portable"."""
    return "avx512" if _C.crop_kernels_avx512() else "portable"


def pixel_codes(images: torch.Tensor):
    """uint8 pixel codes of a float32 CPU image, or None when some pixel is not exactly one (one pass)."""
    images = images.contiguous()
    codes = huge_pages.empty(images.shape, torch.uint8)  # its first touch is most of this function's time
    if images.numel() and not _C.pixel_codes(images.data_ptr(), images.numel(), codes.data_ptr(),
                                             torch.get_num_threads()):
        return None
    return codes


def pixel_code_values() -> torch.Tensor:
    """[256] float32: the pixel the kernels make of each uint8 code (the tests compare it with torch's)."""
    return torch.tensor(_C.pixel_code_values(), dtype=torch.float32)


def mask_replicas(x, masks, fill):
    from .reference import empty_replicas

    b, c, h, w = x.shape
    m = masks.shape[0]
    out = empty_replicas(x, m)
    channels_last = not out.is_contiguous()
    _C.mask_replicas(x.data_ptr(), x.element_size(), b, c, h, w, *x.stride(), masks.contiguous().data_ptr(), m,
                     fill.to(x.dtype).contiguous().data_ptr(), out.data_ptr(), channels_last, torch.get_num_threads())
    return out


def readout_ablation_argmax(logits, features, weight, ablated, units, scale, err_rel):
    b, k = logits.shape
    c = features.shape[1]
    pred = torch.empty((units.shape[0], b), dtype=torch.int64)
    weight_t = weight.t().contiguous()  # [C, K]: one unit's column is a contiguous row
    _C.readout_ablation_argmax(logits.contiguous().data_ptr(), features.contiguous().data_ptr(), weight_t.data_ptr(),
                               ablated.contiguous().data_ptr(), units.contiguous().data_ptr(), units.shape[0],
                               scale.contiguous().data_ptr(), float(err_rel), b, c, k, pred.data_ptr(),
                               torch.get_num_threads())
    return pred


def _dense_layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as a dense NCHW or NHWC tensor (a copy only when it is neither) and whether it is NHWC."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def lrn_forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """Cross-channel local response normalisation of a float32 CPU [B, C, H, W] map, in its layout."""
    x, channels_last = _dense_layout(x)
    b, c, h, w = x.shape
    y = torch.empty_like(x)
    _C.lrn_forward(x.data_ptr(), y.data_ptr(), b, c, h * w, channels_last, size, alpha, beta, k,
                   torch.get_num_threads())
    return y


def lrn_backward(x: torch.Tensor, grad: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """The input gradient of ``lrn_forward`` at x for the output gradient ``grad``."""
    x, channels_last = _dense_layout(x)
    grad = grad.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    b, c, h, w = x.shape
    grad_x = torch.empty_like(x)
    _C.lrn_backward(x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), b, c, h * w, channels_last, size, alpha, beta,
                    k, torch.get_num_threads())
    return grad_x
