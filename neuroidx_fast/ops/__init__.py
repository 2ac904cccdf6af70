"""The low-level ops: the stable API other tools call. Each validates its input, then dispatches to a
backend (see ``neuroidx_fast.backends``); ``reference`` holds the pure-torch versions."""

from __future__ import annotations

import torch

from .. import backends

__all__ = ["spatial_reduce", "gather_crops", "accumulate_crops", "pad_value", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def spatial_reduce(x: torch.Tensor, backend: str | None = "auto"):
    """One read of a layer output gives, per (image, unit), its max, argmax and mean over positions.

    ``x``: [B, C, H, W] or [B, C] (read as H = W = 1), float32 / float16 / bfloat16 (float64 is
    accepted and always reduced by the torch reference), any memory format.
    Returns ``(vmax [B, C] float32, argmax [B, C] int64, vmean [B, C] float32)``; argmax is the flat
    index ``y * W + x`` of the first maximum. A map holding NaN gives a NaN max pointing at its first NaN.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"spatial_reduce expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        x = x[:, :, None, None]
    if x.dim() != 4:
        raise ValueError(f"spatial_reduce expects a [B, C, H, W] or [B, C] tensor, got shape {tuple(x.shape)}; "
                         "flatten extra dimensions into H or W first")
    if x.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(f"spatial_reduce expects float32, float16 or bfloat16 activations, got {x.dtype}; "
                        "cast with x.float()")
    b, c, h, w = x.shape
    if h * w == 0:
        raise ValueError(f"spatial_reduce got an empty activation map (H={h}, W={w})")
    name = backends.resolve_name(backend, x.device)
    if b * c == 0:
        empty = x.new_empty((b, c), dtype=torch.float32)
        return empty, x.new_empty((b, c), dtype=torch.int64), empty.clone()
    if x.dtype == torch.float64:
        name = "torch"
    return backends.get(name, x.device).spatial_reduce(x)


PAD_NAMES = {"gray": 0.5, "zero": 0.0}


def pad_value(pad, channels: int, device) -> torch.Tensor | None:
    """The per-channel fill of pixels outside the image, or None for ``pad="edge"`` (nearest pixel).

    ``pad``: "gray" (0.5), "zero" (0), "edge", a number, or one number per channel (e.g. the dataset
    mean, which ``neuron_features(pad="mean")`` passes here).
    """
    if isinstance(pad, str):
        if pad == "edge":
            return None
        if pad not in PAD_NAMES:
            raise ValueError(f"unknown pad mode {pad!r}; use 'gray', 'zero', 'edge', a number or one number "
                             "per channel")
        return torch.full((channels,), PAD_NAMES[pad], dtype=torch.float32, device=device)
    if isinstance(pad, bool):
        raise TypeError("pad must be a mode name, a number or a sequence of numbers, not a bool")
    value = torch.as_tensor(pad, dtype=torch.float32).reshape(-1)
    if value.numel() == 1:
        value = value.expand(channels)
    if value.numel() != channels:
        raise ValueError(f"pad has {value.numel()} values for {channels}-channel images; give one or {channels}")
    if not torch.isfinite(value).all():
        raise ValueError(f"pad values must be finite, got {value.tolist()}")
    return value.to(device).contiguous()


def _crop_args(images, slots, tops, what: str):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype != torch.float32:
        raise ValueError(f"{what}: images must be a float32 tensor [N, Ch, H, W] in pixel space, got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}; "
                         "convert uint8 images with images.float() / 255")
    for label, t in (("slots", slots), ("tops", tops)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise TypeError(f"{what}: {label} must be an int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != images.device:
            raise ValueError(f"{what}: {label} is on {t.device} but images are on {images.device}")
    if tops.shape != slots.shape + (2,):
        raise ValueError(f"{what}: tops must have shape {tuple(slots.shape) + (2,)} (a (y0, x0) per slot), "
                         f"got {tuple(tops.shape)}")
    if slots.numel() and (int(slots.max()) >= images.shape[0] or int(slots.min()) < -1):
        raise IndexError(f"{what}: slots must be image rows in [0, {images.shape[0]}) or -1 (empty); got values in "
                         f"[{int(slots.min())}, {int(slots.max())}]")
    if images.shape[2] * images.shape[3] == 0 and bool((slots >= 0).any()):
        raise ValueError(f"{what}: cannot crop from empty images {tuple(images.shape)}")


def _crop_size(size) -> tuple[int, int]:
    rh, rw = (size, size) if isinstance(size, int) else tuple(size)
    if isinstance(rh, bool) or isinstance(rw, bool) or int(rh) < 1 or int(rw) < 1:
        raise ValueError(f"crop size must be positive, got {size!r}")
    return int(rh), int(rw)


def gather_crops(images: torch.Tensor, slots: torch.Tensor, tops: torch.Tensor, size, pad="gray",
                 backend: str | None = "auto") -> torch.Tensor:
    """Cut ``size`` crops (an int or (rh, rw)) from ``images`` [N, Ch, H, W] float32.

    Crop m comes from image row ``slots[m]`` (-1: empty, zeros) with its top-left corner at input pixel
    ``tops[m] = (y0, x0)``, which may lie outside the image; outside pixels take ``pad`` (see
    ``pad_value``). Returns [M, Ch, rh, rw] float32, bit-identical on every backend.
    """
    _crop_args(images, slots, tops, "gather_crops")
    rh, rw = _crop_size(size)
    fill = pad_value(pad, images.shape[1], images.device)
    name = backends.resolve_name(backend, images.device)
    if slots.numel() == 0:
        return images.new_zeros((0, images.shape[1], rh, rw))
    return backends.get(name, images.device).gather_crops(images.contiguous(), slots.reshape(-1).contiguous(),
                                                          tops.reshape(-1, 2).contiguous(), (rh, rw), fill)


def accumulate_crops(sums: torch.Tensor, images: torch.Tensor, slots: torch.Tensor, tops: torch.Tensor,
                     weights: torch.Tensor, pad="gray", backend: str | None = "auto") -> torch.Tensor:
    """Add weighted crops into per-unit sums, in place: the fused half of a Neuron Feature.

    ``sums`` [U, Ch, rh, rw] float64; ``slots`` [U, J] (image rows of ``images``, -1 to skip), ``tops``
    [U, J, 2] and ``weights`` [U, J] float32. For each unit u, in j order: ``sums[u] += weights[u, j] *
    crop(slots[u, j], tops[u, j])`` in float64, which every backend reproduces bit for bit. Returns
    ``sums``.
    """
    _crop_args(images, slots, tops, "accumulate_crops")
    if not isinstance(sums, torch.Tensor) or sums.dtype != torch.float64 or sums.dim() != 4 \
            or not sums.is_contiguous() or sums.device != images.device:
        raise ValueError("accumulate_crops: sums must be a contiguous float64 tensor [U, Ch, rh, rw] on the "
                         "images' device")
    if slots.dim() != 2 or slots.shape[0] != sums.shape[0] or sums.shape[1] != images.shape[1]:
        raise ValueError(f"accumulate_crops: slots {tuple(slots.shape)} must be [U, J] with U = {sums.shape[0]} "
                         f"and sums must have {images.shape[1]} channels")
    if not isinstance(weights, torch.Tensor) or weights.dtype != torch.float32 or weights.shape != slots.shape:
        raise ValueError(f"accumulate_crops: weights must be float32 of shape {tuple(slots.shape)}, got "
                         f"{getattr(weights, 'dtype', None)} {tuple(getattr(weights, 'shape', ()))}")
    fill = pad_value(pad, images.shape[1], images.device)
    name = backends.resolve_name(backend, images.device)
    if slots.numel() == 0:
        return sums
    backends.get(name, images.device).accumulate_crops(sums, images.contiguous(), slots.contiguous(),
                                                       tops.contiguous(), weights.to(images.device).contiguous(),
                                                       fill)
    return sums
