"""The operand checks the crop kernels of every backend share (cpp, triton, cuda): each backend calls
``crop_operands`` and, where its kernels index pixels with 32-bit integers, ``check_index_range``.
The public ops (ops/__init__.py) have validated the values already; these checks guard the raw
memory the kernels read when a backend is called directly."""

from __future__ import annotations

import torch

__all__ = ["INT32_LIMIT", "crop_operands", "check_index_range", "codes_pay_off"]

INT32_LIMIT = 2**31 - 1
# When codes_pay_off: float32 images of at least this many bytes, whose crops read each pixel this often.
CODES_MIN_IMAGE_BYTES = 64 << 20
CODES_MIN_READS_PER_PIXEL = 4


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


def codes_pay_off(images, slots, size) -> bool:
    """Whether crops of ``size`` for the valid ``slots`` are worth reading from the uint8 pixel codes of
    float32 ``images`` (a quarter of the bytes) rather than from the images, at the cost of one pass over
    all of them to find the codes (as_pixel_codes, or the cpp accumulate_crops' own pass, one channel at a
    time). That pays where the images do not fit in the last
    level cache and the crops read each pixel several times (CODES_MIN_IMAGE_BYTES,
    CODES_MIN_READS_PER_PIXEL). Measured with the cpp kernels on bench/bench_crops.py's layers (2-core
    Zen 4, 32 MiB L3): 512 images of 224 x 224 (294 MiB) read 10, 4 and 2 times: 107 against 172 ms,
    85 against 116 ms, 52 against 48 ms; 64 such images (37 MiB) read 6 times: 11.1 against 10.4 ms.
    Since the pass that finds the codes uses AVX-512 where the CPU has it (10 instead of 20 ms on those
    images), the codes break even at about 2 reads (1.6 reads: 0.90x, 1.9: 1.01x, 4: 1.23x; 37 MiB read
    10 times: 1.02x); the thresholds stay where they pay without it too."""
    rh, rw = size
    reads = images.shape[1] * rh * rw * int((slots >= 0).sum())
    return (images.dtype == torch.float32 and images.numel() * 4 >= CODES_MIN_IMAGE_BYTES
            and reads >= CODES_MIN_READS_PER_PIXEL * images.numel())
