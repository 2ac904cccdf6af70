"""The low-level ops: the stable API other tools call. Each validates its input, then dispatches to a
backend (see ``neuroidx_fast.backends``); ``reference`` holds the pure-torch versions."""

from __future__ import annotations

import torch

from .. import backends

__all__ = ["spatial_reduce", "gather_crops", "accumulate_crops", "as_pixel_codes", "pad_value", "SUPPORTED_DTYPES",
           "mask_replicas", "readout_ablation_argmax"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def spatial_reduce(x: torch.Tensor, backend: str | None = "auto", refine_overflow: bool = True):
    """One read of a layer output gives, per (image, unit), its max, argmax and mean over positions.

    ``x``: [B, C, H, W] or [B, C] (read as H = W = 1), float32 / float16 / bfloat16 (float64 is
    accepted and always reduced by the torch reference), any memory format.
    Returns ``(vmax [B, C] float32, argmax [B, C] int64, vmean [B, C] float32)``; argmax is the flat
    index ``y * W + x`` of the first maximum. A map holding NaN gives a NaN max pointing at its first NaN.
    A map of finite values whose float32 sum overflows has its mean summed again in float64 (a device
    sync per call); ``refine_overflow=False`` leaves that mean not finite, for a caller that checks
    many layers' means at once (``TopK.reduce``).
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
    x = x.detach()  # (statistics, not functions autograd follows: the same on every backend)
    vmax, argmax, vmean = backends.get(name, x.device).spatial_reduce(x)
    return vmax, argmax, _overflowed_means_again(x, vmax, vmean) if refine_overflow else vmean


def _overflowed_means_again(x: torch.Tensor, vmax: torch.Tensor, vmean: torch.Tensor) -> torch.Tensor:
    """The backends sum a map in float32 (in pieces): finite values whose sum passes 3.4e38 (e.g. 1e34 on
    a 224 x 224 map) made the mean of a live unit inf (or NaN, inf - inf), and its class selectivity NaN.
    Those maps (a mean that is not finite, in a map without NaN: rare) are summed again in float64; a map
    that holds inf keeps it."""
    overflow = ~torch.isfinite(vmean) & ~torch.isnan(vmax)
    if not bool(overflow.any()):
        return vmean
    rows, units = overflow.nonzero(as_tuple=True)
    maps = x[rows, units].reshape(rows.numel(), -1)
    vmean = vmean.clone()
    vmean[rows, units] = maps.mean(dim=1, dtype=torch.float64).float()
    return vmean


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
    if isinstance(pad, bool) or pad is None:
        raise TypeError(f"pad must be a mode name, a number or a sequence of numbers, not {pad!r}")
    try:
        wide = torch.as_tensor(pad, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"pad must be 'gray', 'zero', 'edge', a number or one number per channel, not {pad!r}") from None
    if not torch.isfinite(wide).all() or bool((wide.abs() > torch.finfo(torch.float32).max).any()):
        raise ValueError(f"pad values must be finite float32 numbers, got {wide.tolist()}")
    value = wide.to(torch.float32)
    if value.numel() == 1:
        value = value.expand(channels)
    if value.numel() != channels:
        raise ValueError(f"pad has {value.numel()} values for {channels}-channel images; give one or {channels}")
    return value.to(device).contiguous()


def as_pixel_codes(images: torch.Tensor, backend: str | None = "auto") -> torch.Tensor | None:
    """The uint8 pixel codes of ``images`` when every pixel is one, else None.

    A float32 image made from 8-bit files (``to_tensor``, ``images.float() / 255`` on CPU) holds only the
    256 values ``k / 255`` rounded to float32; then ``images`` is exactly ``codes`` (uint8, same shape, k
    for such a pixel), which ``gather_crops`` and ``accumulate_crops`` accept in its place with the same
    results, bit for bit, reading a quarter of the bytes. Any other pixel (another value, -0.0, NaN)
    gives None. A uint8 tensor is returned as it is; other dtypes give None. One pass over the image
    with the cpp backend (the torch reference elsewhere, and when ``backend`` has no such kernel).
    """
    from . import reference

    if not isinstance(images, torch.Tensor):
        raise TypeError(f"as_pixel_codes expects a torch.Tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return images
    if images.dtype != torch.float32:
        return None
    module = backends.get(backends.resolve_name(backend, images.device), images.device)
    return getattr(module, "pixel_codes", reference.pixel_codes)(images)


def _crop_args(images, slots, tops, what: str):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"{what}: images must be a float32 tensor [N, Ch, H, W] in pixel space or its uint8 pixel "
                         f"codes (see as_pixel_codes), got {getattr(images, 'dtype', type(images).__name__)} "
                         f"{tuple(getattr(images, 'shape', ()))}; convert other images with images.float()")
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


_MOST_CROP_SIDE = 1 << 20


def _crop_size(size) -> tuple[int, int]:
    """(rh, rw) from an int or a pair of ints (NumPy and 0-d tensor ints too)."""
    from ..prepare import as_index

    if as_index(size) is not None:
        pair = (as_index(size),) * 2
    elif isinstance(size, (tuple, list, torch.Size)) and len(size) == 2:
        pair = tuple(as_index(v) for v in size)
    else:
        pair = (None,)
    if None in pair or min(pair) < 1:
        raise ValueError(f"crop size must be a positive int or a pair (rh, rw) of them, got {size!r}")
    if max(pair) > _MOST_CROP_SIDE:  # (past it the crops' sizes overflow the allocators' int64 arithmetic)
        raise ValueError(f"crop size {pair} is too large: at most {_MOST_CROP_SIDE} pixels a side")
    return pair


def gather_crops(images: torch.Tensor, slots: torch.Tensor, tops: torch.Tensor, size, pad="gray",
                 backend: str | None = "auto") -> torch.Tensor:
    """Cut ``size`` crops (an int or (rh, rw)) from ``images`` [N, Ch, H, W] float32, or uint8 pixel codes
    (code k is the pixel k / 255 rounded to float32: see ``as_pixel_codes``).

    Crop m comes from image row ``slots[m]`` (-1: empty, zeros) with its top-left corner at input pixel
    ``tops[m] = (y0, x0)``, which may lie outside the image; outside pixels take ``pad`` (see
    ``pad_value``). ``slots`` [M] (or any shape, taken flattened, with ``tops`` [..., 2] of the same leading
    shape: [U, J] slots give the U * J crops unit by unit). Returns [M, Ch, rh, rw] float32, bit-identical
    on every backend. (The cpp backend
    puts outputs of 8 MiB or more on huge pages: a view into a storage up to 2 MiB larger, which
    ``torch.save`` writes whole; ``.clone()`` gives a tight one.)
    """
    _crop_args(images, slots, tops, "gather_crops")
    rh, rw = _crop_size(size)
    fill = pad_value(pad, images.shape[1], images.device)
    name = backends.resolve_name(backend, images.device)
    if slots.numel() == 0:
        return images.new_zeros((0, images.shape[1], rh, rw), dtype=torch.float32)
    with torch.no_grad():  # (a copy, not a function autograd follows: the same on every backend)
        return backends.get(name, images.device).gather_crops(images.contiguous(), slots.reshape(-1).contiguous(),
                                                              tops.reshape(-1, 2).contiguous(), (rh, rw), fill)


def accumulate_crops(sums: torch.Tensor, images: torch.Tensor, slots: torch.Tensor, tops: torch.Tensor,
                     weights: torch.Tensor, pad="gray", backend: str | None = "auto") -> torch.Tensor:
    """Add weighted crops into per-unit sums, in place: the fused half of a Neuron Feature.

    ``sums`` [U, Ch, rh, rw] float64; ``slots`` [U, J] (image rows of ``images``, -1 to skip), ``tops``
    [U, J, 2] and ``weights`` [U, J] float32. For each unit u, in j order: ``sums[u] += weights[u, j] *
    crop(slots[u, j], tops[u, j])`` in float64, which every backend reproduces bit for bit (a NaN's payload
    and sign aside: which operand's NaN an addition keeps differs between kernels). ``images``
    [N, Ch, H, W] float32, or uint8 pixel codes (``as_pixel_codes``): the same bits as the float32 image
    they stand for, and on CPU faster (a quarter of the bytes to read). The cpp backend finds the codes
    of big float32 images itself where the crops read each pixel several times (``codes_pay_off`` in
    ops/crop_operands.py) and every pixel is one. Returns ``sums``.
    """
    _crop_args(images, slots, tops, "accumulate_crops")
    if not isinstance(sums, torch.Tensor) or sums.dtype != torch.float64 or sums.dim() != 4 \
            or not sums.is_contiguous() or sums.device != images.device:
        raise ValueError("accumulate_crops: sums must be a contiguous float64 tensor [U, Ch, rh, rw] on the "
                         "images' device")
    if sums.requires_grad:
        raise ValueError("accumulate_crops: sums requires grad, but the crops are added in place outside autograd: "
                         "pass a tensor that does not (e.g. sums.detach())")
    if slots.dim() != 2 or slots.shape[0] != sums.shape[0] or sums.shape[1] != images.shape[1]:
        raise ValueError(f"accumulate_crops: slots {tuple(slots.shape)} must be [U, J] with U = {sums.shape[0]} "
                         f"and sums must have {images.shape[1]} channels")
    if not isinstance(weights, torch.Tensor) or weights.dtype != torch.float32 or weights.shape != slots.shape:
        raise ValueError(f"accumulate_crops: weights must be float32 of shape {tuple(slots.shape)}, got "
                         f"{getattr(weights, 'dtype', None)} {tuple(getattr(weights, 'shape', ()))}")
    for label, t in (("images", images), ("slots", slots), ("tops", tops), ("weights", weights)):
        if t.numel() and sums.numel() and t.device == sums.device \
                and t.untyped_storage().data_ptr() == sums.untyped_storage().data_ptr():  # (empty ones: all at 0)
            raise ValueError(f"accumulate_crops: sums shares memory with {label}, which the backends would read as "
                             f"they write the sums (each in its own order): pass a copy ({label}.clone())")
    fill = pad_value(pad, images.shape[1], images.device)
    name = backends.resolve_name(backend, images.device)
    if slots.numel() == 0:
        return sums
    with torch.no_grad():  # (images, weights or a pad that require grad would make sums a node of a graph)
        backends.get(name, images.device).accumulate_crops(sums, images.contiguous(), slots.contiguous(),
                                                           tops.contiguous(), weights.to(images.device).contiguous(),
                                                           fill)
    return sums


REPLICA_DTYPES = SUPPORTED_DTYPES + (torch.float64,)


def mask_replicas(x: torch.Tensor, masks: torch.Tensor, fill=None, backend: str | None = "auto") -> torch.Tensor:
    """M masked replicas of a layer output in one write: the input of a batched ablation.

    ``x``: [B, C, H, W] or [B, C] (float16 / bfloat16 / float32 / float64, any strides); ``masks``: [M, C]
    bool (True: ablate that unit in that replica); ``fill``: None (zeros), a number, or one value per
    unit (cast to ``x.dtype``). Returns [M * B, C, H, W] (or [M * B, C]) with row ``m * B + b`` = image b
    under mask m: ``fill[c]`` where ``masks[m, c]``, else ``x[b, c]``. The output is channels_last when
    ``x`` is (so the layers after it run the same kernels as on ``x``), else contiguous. A bit copy:
    identical on every backend.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mask_replicas expects a torch.Tensor, got {type(x).__name__}")
    flat = x.dim() == 2
    if flat:
        x = x[:, :, None, None]
    if x.dim() != 4:
        raise ValueError(f"mask_replicas expects a [B, C, H, W] or [B, C] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in REPLICA_DTYPES:
        raise TypeError(f"mask_replicas expects float16, bfloat16, float32 or float64 activations, got {x.dtype}")
    c = x.shape[1]
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
        raise TypeError(f"mask_replicas: masks must be a bool tensor [M, {c}], got "
                        f"{getattr(masks, 'dtype', type(masks).__name__)}")
    if masks.dim() == 1:
        masks = masks[None]
    if masks.dim() != 2 or masks.shape[1] != c:
        raise ValueError(f"mask_replicas: masks must have shape [M, {c}] (one column per unit), got "
                         f"{tuple(masks.shape)}")
    if masks.device != x.device:
        raise ValueError(f"mask_replicas: masks are on {masks.device} but x is on {x.device}")
    if fill is None:
        fill_t = torch.zeros(c, dtype=x.dtype, device=x.device)
    else:
        try:
            fill_t = None if isinstance(fill, (bool, str)) else torch.as_tensor(fill)
        except (TypeError, ValueError, RuntimeError):
            fill_t = None
        if fill_t is None or fill_t.dtype == torch.bool:
            raise TypeError(f"mask_replicas: fill must be None, a number or one number per unit, not {fill!r}")
        fill_t = fill_t.to(device=x.device, dtype=x.dtype).reshape(-1)
        if fill_t.numel() == 1:
            fill_t = fill_t.expand(c)
        if fill_t.numel() != c:
            raise ValueError(f"mask_replicas: fill has {fill_t.numel()} values for {c} units; give one or {c}")
    name = backends.resolve_name(backend, x.device)
    m = masks.shape[0]
    if m * x.numel() == 0:
        from .reference import empty_replicas

        out = empty_replicas(x, m)
    else:
        out = backends.get(name, x.device).mask_replicas(x, masks.contiguous(), fill_t.contiguous())
    return out.reshape(out.shape[0], c) if flat else out


def readout_ablation_argmax(logits: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, ablated=None,
                            units=None, scale=None, err_rel: float = 0.0, backend: str | None = "auto") -> torch.Tensor:
    """The predicted class of every image with each unit of a linear read-out's input ablated alone.

    ``features`` [B, C] is the input of a linear layer ``weight`` [K, C] (+ bias) whose output
    ``logits`` [B, K] are the class scores; ablating unit c sets feature c to ``ablated[c]`` (default 0).
    For each unit u of ``units`` (default: all C) and image b, the ablated logits are
    ``logits[b] + weight[:, c] * (ablated[c] - features[b, c])``, computed in float64 on the fly (no
    [U, B, K] tensor). Returns ``pred`` [U, B] int64: their argmax where it is certified, else -1.
    Certified means the best class stays best for every logit vector within ``+-err_rel * s`` of the
    float64 values, with ``s`` the ablated row of ``scale`` [B, K] (``|features| @ |weight|.T + |bias|``):
    pass the relative error bound of the computation you want to reproduce (e.g. a float32 matmul) and
    recompute the -1 entries exactly. ``err_rel=0`` certifies every finite row without a tie.
    All tensors float64 (``units`` int64) on one device.
    """
    tensors = {"logits": logits, "features": features, "weight": weight}
    for label, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or t.dim() != 2:
            raise TypeError(f"readout_ablation_argmax: {label} must be a 2-D float64 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}; the "
                            "certification needs float64 (cast with .double())")
    b, k = logits.shape
    c = features.shape[1]
    device = logits.device
    if features.shape[0] != b or tuple(weight.shape) != (k, c):
        raise ValueError(f"readout_ablation_argmax: expected logits [B, K], features [B, C] and weight [K, C]; got "
                         f"{tuple(logits.shape)}, {tuple(features.shape)} and {tuple(weight.shape)}")
    if ablated is None:
        ablated = torch.zeros(c, dtype=torch.float64, device=device)
    if not isinstance(ablated, torch.Tensor) or ablated.dtype != torch.float64 or tuple(ablated.shape) != (c,):
        raise ValueError(f"readout_ablation_argmax: ablated must be a float64 tensor [{c}], got "
                         f"{getattr(ablated, 'dtype', type(ablated).__name__)} {tuple(getattr(ablated, 'shape', ()))}")
    if units is None:
        units = torch.arange(c, device=device)
    if not isinstance(units, torch.Tensor) or units.dtype != torch.int64 or units.dim() != 1:
        raise TypeError("readout_ablation_argmax: units must be a 1-D int64 tensor of unit indices")
    if units.numel() and (int(units.min()) < 0 or int(units.max()) >= c):
        raise IndexError(f"readout_ablation_argmax: units must lie in [0, {c}), got values in "
                         f"[{int(units.min())}, {int(units.max())}]")
    err_rel = float(err_rel)
    if not err_rel >= 0 or err_rel == float("inf"):
        raise ValueError(f"readout_ablation_argmax: err_rel must be a finite number >= 0, got {err_rel}")
    if scale is None:
        if err_rel > 0:
            raise ValueError("readout_ablation_argmax: err_rel > 0 needs scale = |features| @ |weight|.T + |bias|")
        scale = torch.zeros_like(logits)
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float64 or tuple(scale.shape) != (b, k):
        raise ValueError(f"readout_ablation_argmax: scale must be a float64 tensor [{b}, {k}]")
    for label, t in dict(tensors, ablated=ablated, units=units, scale=scale).items():
        if t.device != device:
            raise ValueError(f"readout_ablation_argmax: {label} is on {t.device} but logits are on {device}")
    name = backends.resolve_name(backend, device)
    if units.numel() == 0 or b == 0:
        return torch.empty((units.numel(), b), dtype=torch.int64, device=device)
    if k == 0:
        return torch.full((units.numel(), b), -1, dtype=torch.int64, device=device)
    return backends.get(name, device).readout_ablation_argmax(
        logits.contiguous(), features.contiguous(), weight.contiguous(), ablated.contiguous(), units.contiguous(),
        scale.contiguous(), err_rel)
