"""Pure-PyTorch reference implementations of the hot ops (SPEC.md section 1).

These are the default backend, the CPU fallback and the oracle every other backend is tested against.
Every backend module (``cpp``, ``triton``, ``cuda``) exposes the same two functions with the same
contract:

``spatial_reduce(x) -> (vmax, argmax, vmean)``
    ``x``: [B, C, H, W] float32 / float16 / bfloat16, any strides (contiguous, channels_last, sliced).
    ``vmax`` [B, C] float32: the map's maximum, bit-identical to the element cast to float32;
    ``argmax`` [B, C] int64: its flat index ``y * W + x``, the lowest one on ties;
    ``vmean`` [B, C] float32: the map's mean (accumulated in float32 or wider; not bit-exact across
    backends and layouts, which sum in different orders: equal to float32 rounding).
    A map holding NaN gives ``vmax = NaN``, ``argmax`` = the flat index of its first NaN and a NaN mean,
    that NaN's own bits for float32 and bfloat16 maps; a float16 NaN's bits are unspecified (torch on
    CPU makes every float16 NaN 0x7fffffff, the CUDA and Triton kernels keep its payload). NaN is an
    error of the index by default (SPEC.md 1).

``topk_update(state_values, state_ids, state_positions, values, ids, positions) -> None``
    In place. ``state_values`` [C, K] float32, ``state_ids`` / ``state_positions`` [C, K] int64, all
    contiguous, every row sorted best first; ``values`` [B, C] float32 contiguous and NaN-free (the
    caller checks), ``ids`` [B] int64, ``positions`` [B, C] int64 contiguous.
    Afterwards each row holds the best K of (its old entries, the B candidates of that unit), sorted.
    Order: a real entry beats an empty one (empty: value -inf, id -1, position -1); between real
    entries the larger value wins, then the lower id. Exact ties of (value, id), which only arise when
    the caller feeds an image twice, keep the old entry first, then candidates in batch order.
    The K-th slot of each row is the unit's admission threshold: a candidate that does not beat it is
    skipped without touching the row, so once the state is warm almost nothing is merged.

Pixel codes. ``gather_crops`` and ``accumulate_crops`` take ``images`` either as float32 pixels or as
uint8 pixel codes: code k stands for the float32 pixel ``k / 255`` rounded to float32 (the IEEE division
``float32(k) / 255``, which is what ``images.float() / 255`` gives on CPU and torchvision's ``to_tensor``
makes of an 8-bit file; ``pixel_code_values()`` lists the 256 values). Every op behaves exactly as on the
decoded float32 image (``decode_pixels``), bit for bit, on every backend; the codes only move a quarter of
the bytes. ``neuroidx_fast.ops.as_pixel_codes(images)`` finds the codes of a float32 image whose every
pixel is such a value (else None).

``gather_crops(images, slots, tops, size, pad_value) -> crops``
    ``images`` [N, Ch, H, W] float32, or uint8 pixel codes, contiguous; ``slots`` [M] int64 (an image
    row, or -1: empty); ``tops`` [M, 2] int64 contiguous, the (y0, x0) input pixel of each crop's
    top-left corner, which may lie outside the image; ``size`` (rh, rw); ``pad_value`` [Ch] float32
    (pixels outside the image take it) or None (edge mode: they take the nearest image pixel). Returns
    ``crops`` [M, Ch, rh, rw] float32 with ``crops[m, :, i, j] = images[slots[m], :, y0 + i, x0 + j]``
    (decoded, for codes); an empty slot gives zeros. A pure copy: every backend is bit-identical to this
    one.

``accumulate_crops(sums, images, slots, tops, weights, pad_value) -> None``
    In place. ``sums`` [U, Ch, rh, rw] float64 contiguous; ``images`` as in ``gather_crops``; ``slots``
    [U, J] int64, ``tops`` [U, J, 2] int64, ``weights`` [U, J] float32, all contiguous. For every unit u
    and j = 0, 1, ..., J-1 in that order, where ``slots[u, j] >= 0``:
    ``sums[u] += float64(weights[u, j]) * float64(crop(u, j))``, with crops cut as in ``gather_crops``.
    The product of two float32 numbers is exact in float64, so a fused multiply-add gives the same bits
    as a multiply then an add: every backend that adds in j order is bit-identical to this one.

``mask_replicas(x, masks, fill) -> out``
    ``x`` [B, C, H, W] of any float dtype and any strides; ``masks`` [M, C] bool contiguous; ``fill`` [C]
    contiguous, in ``x.dtype``. Returns ``out`` [M * B, C, H, W] with ``out[m * B + b, c] = fill[c]`` where
    ``masks[m, c]``, else ``x[b, c]``: M masked replicas, mask-major. ``out`` is channels_last when ``x``
    is channels_last and not contiguous (``replica_memory_format``), else contiguous. A pure bit copy
    (every backend is bit-identical to this one); the fast backends write each element once and read
    ``x`` only for the channels a mask keeps.

``readout_ablation_argmax(logits, features, weight, ablated, units, scale, err_rel) -> pred``
    All float64 and contiguous: ``logits`` [B, K] (intact logits of a linear read-out), ``features``
    [B, C] (its input), ``weight`` [K, C], ``ablated`` [C] (the value feature c takes when unit c is
    ablated), ``scale`` [B, K] (sum over j of ``|weight[k, j] * features[b, j]|`` plus ``|bias[k]|``);
    ``units`` [U] int64 in [0, C); ``err_rel`` >= 0 a Python float. For u, b, k with c = units[u], in
    this order of float64 operations (no fused multiply-add):
    ``z = logits[b, k] + weight[k, c] * (ablated[c] - features[b, c])``,
    ``e = err_rel * clamp(scale[b, k] + |weight[k, c]| * (|ablated[c]| - |features[b, c]|), min=0)``.
    ``pred[u, b]`` (int64 [U, B]) is the first k maximising z when that class is certified: every z and
    e of the row finite and ``z - e`` of the best class strictly above ``z + e`` of every other class;
    else -1. So a certified class is the argmax of every logit vector within +-e of z, whatever the
    rounding of the computation that produced it. Every backend gives the same integers (same float64
    operations in the same order).
"""

from __future__ import annotations

import torch

__all__ = ["spatial_reduce", "topk_update", "topk_merge_rows", "better", "gather_crops", "accumulate_crops",
           "pixel_code_values", "decode_pixels", "pixel_codes",
           "mask_replicas", "replica_memory_format", "empty_replicas", "readout_ablation_argmax"]

# Sort key for empty slots: larger than any real id, so that empties sort after real -inf entries.
_EMPTY_ID_KEY = torch.iinfo(torch.int64).max


def spatial_reduce(x: torch.Tensor):
    b, c = x.shape[0], x.shape[1]
    flat = x.reshape(b, c, -1)
    # torch.max over a dim returns the first maximal index and propagates NaN (pointing at the first NaN).
    vmax, argmax = flat.max(dim=2)
    vmean = flat.mean(dim=2, dtype=torch.float32)
    return vmax.float(), argmax, vmean


def better(v_a, id_a, v_b, id_b):
    """True where entry a ranks strictly before entry b (empty entries have id -1)."""
    a_real = id_a >= 0
    b_real = id_b >= 0
    strictly = (v_a > v_b) | ((v_a == v_b) & (id_a < id_b))
    return a_real & (~b_real | strictly)


def topk_merge_rows(values, ids, positions, k: int):
    """Sort each row of [R, N] entries by the top-K order and keep the first k columns."""
    order_ids = torch.where(ids >= 0, ids, torch.full_like(ids, _EMPTY_ID_KEY))
    # Two stable sorts: secondary key (id ascending) first, then primary key (value descending).
    by_id = torch.sort(order_ids, dim=1, stable=True).indices
    v1 = torch.gather(values, 1, by_id)
    by_value = torch.sort(v1, dim=1, descending=True, stable=True).indices
    order = torch.gather(by_id, 1, by_value)[:, :k]
    return (torch.gather(values, 1, order), torch.gather(ids, 1, order), torch.gather(positions, 1, order))


def topk_update(state_values, state_ids, state_positions, values, ids, positions) -> None:
    num_units, k = state_values.shape
    if values.shape[0] == 0:
        return
    cand_v = values.t()  # [C, B]
    cand_ids = ids.view(1, -1).expand(num_units, -1)
    admitted = better(cand_v, cand_ids, state_values[:, -1:], state_ids[:, -1:])
    active = admitted.any(dim=1).nonzero().flatten()
    if active.numel() == 0:
        return
    cand_v = cand_v[active]
    cand_ids = torch.where(admitted[active], cand_ids[active], torch.full_like(cand_ids[active], -1))
    cand_v = torch.where(cand_ids >= 0, cand_v, torch.full_like(cand_v, float("-inf")))
    cand_pos = torch.where(cand_ids >= 0, positions.t()[active], torch.full_like(cand_ids, -1))
    merged = topk_merge_rows(
        torch.cat([state_values[active], cand_v], dim=1),
        torch.cat([state_ids[active], cand_ids], dim=1),
        torch.cat([state_positions[active], cand_pos], dim=1),
        k,
    )
    state_values[active], state_ids[active], state_positions[active] = merged


_PIXEL_CODE_VALUES = {}


def pixel_code_values(device="cpu") -> torch.Tensor:
    """[256] float32: the pixel that uint8 code k stands for, k / 255 rounded to float32 (the IEEE division
    float32(k) / 255, done on CPU: on CUDA, tensor / scalar may multiply by the reciprocal instead, which
    differs for about half the codes)."""
    device = torch.device(device)
    values = _PIXEL_CODE_VALUES.get(device)
    if values is None:
        values = (torch.arange(256, dtype=torch.float32) / 255).to(device)
        _PIXEL_CODE_VALUES[device] = values
    return values


def decode_pixels(images: torch.Tensor) -> torch.Tensor:
    """The float32 image of uint8 pixel codes (float32 images are returned as they are). On CPU the
    division itself (the table's own definition; 13x faster than a lookup on 512 images of 224 x 224),
    elsewhere the table (see pixel_code_values)."""
    if images.dtype != torch.uint8:
        return images
    if images.device.type == "cpu":
        return images.float().div_(255)
    return pixel_code_values(images.device)[images.to(torch.int32)]


def pixel_codes(images: torch.Tensor):
    """uint8 pixel codes of a float32 image, or None when some pixel is not exactly one."""
    codes = (images * 255).round_().clamp_(0, 255).to(torch.uint8)
    if not torch.equal(decode_pixels(codes).view(torch.int32), images.view(torch.int32)):
        return None
    return codes


def _crop_pixels(images, slots, tops, size, pad_value):
    """[M, Ch, rh, rw] crops and [M] empty-slot mask (the crops of empty slots are unspecified here)."""
    rh, rw = size
    n, ch, h, w = images.shape
    # Corners far outside first clamped to [-r, extent] (no pixel changes: beyond a border every position
    # reads the same pad or edge value), so that adding the offsets cannot overflow int64.
    y0 = tops[:, :1].clamp(-rh, h)
    x0 = tops[:, 1:].clamp(-rw, w)
    ys = y0 + torch.arange(rh, device=images.device)  # [M, rh]
    xs = x0 + torch.arange(rw, device=images.device)  # [M, rw]
    empty = slots < 0
    rows = slots.clamp(min=0)
    picked = images[rows[:, None, None], :, ys.clamp(0, h - 1)[:, :, None], xs.clamp(0, w - 1)[:, None, :]]
    crops = picked.permute(0, 3, 1, 2)  # [M, rh, rw, Ch] -> [M, Ch, rh, rw]
    if pad_value is not None:
        inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]  # [M, rh, rw]
        crops = torch.where(inside[:, None], crops, pad_value.to(crops.dtype)[None, :, None, None])
    return crops, empty


def gather_crops(images, slots, tops, size, pad_value):
    images = decode_pixels(images)
    if not bool((slots >= 0).any()):  # nothing to cut (also when there are no images or no pixels)
        return images.new_zeros((slots.shape[0], images.shape[1]) + tuple(size))
    crops, empty = _crop_pixels(images, slots, tops, size, pad_value)
    return torch.where(empty[:, None, None, None], torch.zeros((), dtype=crops.dtype, device=crops.device),
                       crops).contiguous()


def accumulate_crops(sums, images, slots, tops, weights, pad_value) -> None:
    size = tuple(sums.shape[2:])
    if not bool((slots >= 0).any()):
        return
    images = decode_pixels(images)
    # One float64 buffer for every step's sums + terms: fresh tensors of this size each step would cost
    # a page fault per 4 KiB (on CPU, most of the time of a large layer).
    added = torch.empty_like(sums)
    for j in range(slots.shape[1]):  # j order fixes the float64 rounding every backend reproduces
        crops, empty = _crop_pixels(images, slots[:, j], tops[:, j], size, pad_value)
        # float64 products (exact), then sums + terms, one rounding (in place: a mixed float32 x float64
        # multiply takes a slow path)
        added.copy_(crops).mul_(weights[:, j].double()[:, None, None, None]).add_(sums)
        if bool(empty.any()):  # an empty slot adds nothing, not even +0.0 (which would turn -0.0 into +0.0)
            kept = (~empty).nonzero().flatten()
            sums[kept] = added[kept]
        else:
            sums.copy_(added)


def check_device(device_type: str) -> None:
    """The reference runs wherever torch runs."""


def replica_memory_format(x: torch.Tensor):
    """channels_last for a 4-D channels_last tensor that is not also contiguous, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_replicas(x: torch.Tensor, m: int) -> torch.Tensor:
    """The uninitialised [m * B, C, H, W] output of ``mask_replicas`` (dtype, device, memory format)."""
    b, c, h, w = x.shape
    return torch.empty((m * b, c, h, w), dtype=x.dtype, device=x.device, memory_format=replica_memory_format(x))


def mask_replicas(x, masks, fill):
    m = masks.shape[0]
    out = empty_replicas(x, m)
    # written once, in place (a where into a new [m, B, C, H, W] tensor and a copy would write it twice); a
    # copy of bits, detached as the other backends' outputs are (out= refuses inputs that require grad)
    torch.where(masks[:, None, :, None, None], fill.detach()[None, None, :, None, None], x.detach()[None],
                out=out.view(m, *x.shape))
    return out


def readout_ablation_argmax(logits, features, weight, ablated, units, scale, err_rel):
    b, k = logits.shape
    u = units.shape[0]
    pred = torch.empty((u, b), dtype=torch.int64, device=logits.device)
    classes = torch.arange(k, device=logits.device)
    step = max(1, (1 << 21) // max(1, b * k))  # units per chunk: never a full [U, B, K] tensor
    for s0 in range(0, u, step):
        cs = units[s0:s0 + step]
        w = weight[:, cs].t()[:, None, :]  # [U', 1, K]
        f = features[:, cs].t()[:, :, None]  # [U', B, 1]
        a = ablated[cs][:, None, None]  # [U', 1, 1]
        z = logits[None] + w * (a - f)
        e = err_rel * (scale[None] + w.abs() * (a.abs() - f.abs())).clamp(min=0)
        finite = (torch.isfinite(z) & torch.isfinite(e)).all(dim=2)
        zs = torch.where(torch.isfinite(z), z, torch.full_like(z, float("-inf")))
        best = zs.argmax(dim=2, keepdim=True)  # the first maximum
        lower = zs.gather(2, best) - e.gather(2, best)
        upper = torch.where(classes == best, torch.full_like(z, float("-inf")), z + e)
        other = upper.max(dim=2, keepdim=True).values
        certified = finite & (lower > other).squeeze(2)
        pred[s0:s0 + step] = torch.where(certified, best.squeeze(2), torch.full_like(best.squeeze(2), -1))
    return pred
