"""The operand checks the crop kernels of every backend share (cpp, triton, cuda): each backend calls
``crop_operands`` and, where its kernels index pixels with 32-bit integers, ``check_index_range``.
The public ops (ops/__init__.py) have validated the values already; these checks guard the raw
memory the kernels read when a backend is called directly."""

from __future__ import annotations

import torch

__all__ = ["INT32_LIMIT", "crop_operands", "check_index_range", "codes_pay_off"]

INT32_LIMIT = 2**31 - 1
# When codes_pay_off: float32 images of at least this many bytes, whose crops read each pixel at least
# this often, for the cpp kernels' code loops of each kind ("avx512": crop_runs_avx512.h; "portable").
CODES_MIN_IMAGE_BYTES = {"avx512": 4 << 20, "portable": 64 << 20}
CODES_MIN_READS_PER_PIXEL = {"avx512": 1.5, "portable": 8.0}


def crop_operands(images, slots, tops, pad_value, what: str, pixel_types=(torch.float32,)):
    """Contiguous (images, slots, tops, pad): ``pad`` float32 on the images' device, or None (edge mode).
    ``pixel_types``: the image dtypes the backend reads (uint8 means pixel codes, reference.py)."""
    if images.dim() != 4 or images.dtype not in pixel_types:
        names = " or ".join(str(t).replace("torch.", "") for t in pixel_types)
        raise ValueError(f"{what}: images must be {names} [N, Ch, H, W], got {images.dtype} {tuple(images.shape)}")
    if slots.dtype != torch.int64 or tops.dtype != torch.int64:
        raise TypeError(f"{what}: slots and tops must be int64, got {slots.dtype} and {tops.dtype}")
    _, ch, h, w = images.shape
    if h * w == 0 and bool((slots >= 0).any()):
        raise ValueError(f"{what}: cannot crop from empty images {tuple(images.shape)}")
    pad = None if pad_value is None else pad_value.to(device=images.device, dtype=torch.float32).contiguous()
    if pad is not None and pad.numel() != ch:
        raise ValueError(f"{what}: pad_value has {pad.numel()} values for {ch} channels")
    return images.contiguous(), slots.contiguous(), tops.contiguous(), pad


def check_index_range(images, size, what: str, kernels: str, crop_limit: int = INT32_LIMIT) -> None:
    """Raises where pixel coordinates (clamped corners: at most extent + r) or a crop's pixel count
    (at most ``crop_limit``) would overflow the kernels' int32 indexing; the image offset is int64."""
    h, w = images.shape[2:]
    rh, rw = size
    if h * w > INT32_LIMIT or rh * rw > crop_limit or h + rh > INT32_LIMIT // 2 or w + rw > INT32_LIMIT // 2:
        raise ValueError(f"{what}: images {h}x{w} or crops {rh}x{rw} exceed the 2**31 index range of {kernels}")


def codes_pay_off(images, slots, size, loops: str) -> bool:
    """Whether crops of ``size`` for the valid ``slots`` are worth reading from the uint8 pixel codes of
    float32 ``images`` (a quarter of the bytes) rather than from the images, at the cost of one pass over
    all of them to find the codes (as_pixel_codes, or the cpp accumulate_crops' own pass, one channel at a
    time), with the cpp kernels' code ``loops`` ("avx512" or "portable": ops.cpp.code_loops()). That pays
    where the crops read each pixel often enough, and the images are big enough for the pass to be worth
    starting (CODES_MIN_READS_PER_PIXEL, CODES_MIN_IMAGE_BYTES).

    Measured with the cpp kernels (2-core Zen 4, 32 MiB L3), float32 kernel time / (pass + accumulation
    from the codes), medians of 5, on bench/bench_crops.py's 44 and 100 px layers with fewer or more crops
    per unit. AVX-512 loops: 512 images of 224 x 224 (294 MiB) read 0.5, 1, 1.9 and 3.9 times by 44 px
    crops: 0.60x, 0.82x, 1.26x, 1.58x; by 100 px crops 1 and 2.5 times: 0.83x, 1.37x; 64 and 16 such
    images (37 and 9 MiB, in cache or nearly) read 1.9 to 9.6 times: 1.10x to 1.74x; 8 images read 6.4
    times: 1.11x. The portable loops (a division per code): 512 images read 1, 1.9, 3.9 and 7.7 times by
    44 px crops: 0.57x, 0.81x, 0.94x, 1.05x; 2.5 and 10 times by 100 px crops: 0.81x, 1.28x."""
    rh, rw = size
    reads = images.shape[1] * rh * rw * int((slots >= 0).sum())
    return (images.dtype == torch.float32 and images.numel() * 4 >= CODES_MIN_IMAGE_BYTES[loops]
            and reads >= CODES_MIN_READS_PER_PIXEL[loops] * images.numel())
