"""The low-level ops: the stable API other tools call. Each validates its input, then dispatches to a
backend (see ``neuroidx_fast.backends``); ``reference`` holds the pure-torch versions."""

from __future__ import annotations

import torch

from .. import backends

__all__ = ["spatial_reduce", "SUPPORTED_DTYPES"]

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
