"""Triton kernels of the masked batched ablation: ``mask_replicas`` and ``readout_ablation_argmax``.

Contract: ``neuroidx_fast.ops.reference`` (module docstring).

``mask_replicas``: a program owns one output row r = m * B + b (image b under mask m) and BLOCK
consecutive elements of it in the output's own memory order (c-major for NCHW, position-major for
channels_last), so the stores are coalesced. Each element is either the unit's fill value or a load
of x through its strides; the load is masked off for ablated units, so x is read only where a mask
keeps it. Tensors are passed as same-size integer views: the op is a bit copy, whatever the float type.

``readout_ablation_argmax``: a program owns one image b and BLOCK_U units; it walks the classes in
tiles of BLOCK_K, building the [BLOCK_U, BLOCK_K] tile of ablated logits
``z = logits[b, k] + W[k, c] * (a_c - f[b, c])`` and their error bounds ``e`` in registers (never the
[U, B, K] tensor), and folds each tile into a running state per unit: the first maximum of z with
its e, the largest upper bound z + e with its (first) class and the largest upper bound of the other
classes. The float64 operations are those of the reference, in its order; the launch disables fp
fusion (no fused multiply-add), so the certified classes are the reference's integers.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

GRID_Y_LIMIT = 65535  # programs along a CUDA grid's second axis

__all__ = ["mask_replicas", "readout_ablation_argmax"]

_BIG = 2**31 - 1
_BIG_C = tl.constexpr(_BIG)
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _mask_replicas_kernel(
    x_ptr, masks_ptr, fill_ptr, out_ptr,
    B, C, W, HW, TOTAL,
    stride_b, stride_c, stride_h, stride_w,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    # TOTAL = C * HW from the host: an int64 argument from 2^31 on, where C * HW of two int32 arguments
    # wrapped (a [1, 32768, 256, 256] input came back unwritten)
    r = tl.program_id(0).to(tl.int64)  # output row m * B + b
    m = r // B
    b = r % B
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = i < TOTAL
    if CHANNELS_LAST:
        p = i // C
        c = i % C
    else:
        c = i // HW
        p = i % HW
    y = p // W
    xx = p % W
    ablate = tl.load(masks_ptr + m * C + c, mask=live, other=0) != 0
    keep = live & ~ablate
    v = tl.load(x_ptr + b * stride_b + c * stride_c + y * stride_h + xx * stride_w, mask=keep, other=0)
    f = tl.load(fill_ptr + c, mask=live & ablate, other=0)
    tl.store(out_ptr + r * TOTAL + i, tl.where(ablate, f, v), mask=live)


def mask_replicas(x: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """[M * B, C, H, W] masked replicas of x [B, C, H, W] (see the reference's contract)."""
    from neuroidx_fast.ops.reference import empty_replicas

    if x.dim() != 4:
        raise ValueError(f"mask_replicas expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    bits = _BITS.get(x.element_size())
    if bits is None:
        raise TypeError(f"mask_replicas copies 2-, 4- or 8-byte elements, got {x.dtype}")
    b, c, h, w = x.shape
    m = masks.shape[0]
    out = empty_replicas(x, m)
    total = c * h * w
    if out.numel() == 0:
        return out
    # At most 65535 programs along a row (the grid's second axis): larger maps get larger blocks.
    block = min(triton.next_power_of_2(total), max(1024, triton.next_power_of_2(triton.cdiv(total, 65535))))
    grid = (m * b, triton.cdiv(total, block))
    with _device_ctx(x):
        _mask_replicas_kernel[grid](
            x.view(bits), masks.contiguous().view(torch.uint8), fill.to(x.dtype).contiguous().view(bits),
            out.view(bits),
            b, c, w, h * w, total,
            *x.stride(),
            CHANNELS_LAST=not out.is_contiguous(), BLOCK=block,
            num_warps=4 if block >= 512 else 1,
        )
    return out


@triton.jit
def _readout_kernel(
    logits_ptr, features_ptr, weight_ptr, ablated_ptr, units_ptr, scale_ptr, pred_ptr, err_ptr,
    B, C, K, U,
    BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    us = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    umask = us < U
    cs = tl.load(units_ptr + us, mask=umask, other=0)  # int64
    f = tl.load(features_ptr + b * C + cs, mask=umask, other=0.0)
    a = tl.load(ablated_ptr + cs, mask=umask, other=0.0)
    d = a - f
    ad = tl.abs(a) - tl.abs(f)
    err_rel = tl.load(err_ptr)  # float64 (a Python float argument would be passed as float32)

    inf = float("inf")
    run_z = tl.full([BLOCK_U], -inf, tl.float64)
    run_e = tl.zeros([BLOCK_U], tl.float64)
    run_ib = tl.full([BLOCK_U], -1, tl.int32)
    run_u1 = tl.full([BLOCK_U], -inf, tl.float64)
    run_i1 = tl.full([BLOCK_U], -1, tl.int32)
    run_u2 = tl.full([BLOCK_U], -inf, tl.float64)
    run_ok = tl.full([BLOCK_U], 1, tl.int32)
    k0s = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + k0s
        kmask = ks < K
        lg = tl.load(logits_ptr + b * K + ks, mask=kmask, other=0.0)
        sc = tl.load(scale_ptr + b * K + ks, mask=kmask, other=0.0)
        valid = umask[:, None] & kmask[None, :]
        w = tl.load(weight_ptr + ks[None, :].to(tl.int64) * C + cs[:, None], mask=valid, other=0.0)
        t = w * d[:, None]
        z = lg[None, :] + t
        sw = tl.abs(w) * ad[:, None]
        bound = sc[None, :] + sw
        bound = tl.where(bound < 0.0, 0.0, bound)
        e = err_rel * bound
        fin = (tl.abs(z) < inf) & (tl.abs(e) < inf)
        run_ok = tl.minimum(run_ok, tl.min(tl.where(valid & ~fin, 0, 1), axis=1))
        use = valid & fin
        zs = tl.where(use, z, -inf)
        t_z = tl.max(zs, axis=1)
        t_ib = tl.min(tl.where(use & (zs == t_z[:, None]), ks[None, :], _BIG_C), axis=1)
        t_e = tl.sum(tl.where(ks[None, :] == t_ib[:, None], e, 0.0), axis=1)
        take = (t_z > run_z) | ((run_ib < 0) & (t_ib < _BIG_C))
        run_z = tl.where(take, t_z, run_z)
        run_e = tl.where(take, t_e, run_e)
        run_ib = tl.where(take, t_ib, run_ib)
        ups = tl.where(use, z + e, -inf)
        t_u1 = tl.max(ups, axis=1)
        t_i1 = tl.min(tl.where(use & (ups == t_u1[:, None]), ks[None, :], _BIG_C), axis=1)
        t_u2 = tl.max(tl.where(ks[None, :] == t_i1[:, None], -inf, ups), axis=1)
        take_u = (t_u1 > run_u1) | ((run_i1 < 0) & (t_i1 < _BIG_C))
        run_u2 = tl.where(take_u, tl.maximum(t_u2, run_u1), tl.maximum(run_u2, t_u1))
        run_u1 = tl.where(take_u, t_u1, run_u1)
        run_i1 = tl.where(take_u, t_i1, run_i1)

    other = tl.where(run_i1 == run_ib, run_u2, run_u1)
    lower = run_z - run_e
    certified = (run_ok > 0) & (run_ib >= 0) & (lower > other)
    pred = tl.where(certified, run_ib, -1).to(tl.int64)
    tl.store(pred_ptr + us.to(tl.int64) * B + b, pred, mask=umask)


def readout_ablation_argmax(logits, features, weight, ablated, units, scale, err_rel):
    """[U, B] certified argmax of the read-out logits with each unit ablated (see the reference)."""
    b, k = logits.shape
    c = features.shape[1]
    u = units.shape[0]
    pred = torch.empty((u, b), dtype=torch.int64, device=logits.device)
    if u * b == 0:
        return pred
    if k >= _BIG:
        raise ValueError(f"readout_ablation_argmax: {k} classes exceed the int32 class index range")
    block_u = min(64, max(16, triton.next_power_of_2(u)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    units = units.contiguous()
    operands = (logits.contiguous(), features.contiguous(), weight.contiguous(), ablated.contiguous())
    err = torch.tensor([float(err_rel)], dtype=torch.float64, device=logits.device)
    chunk = GRID_Y_LIMIT * block_u  # the grid's second axis holds at most 65535 programs: units in chunks
    with _device_ctx(logits):
        for start in range(0, u, chunk):
            part = units[start:start + chunk]
            grid = (b, triton.cdiv(part.shape[0], block_u))
            _readout_kernel[grid](
                *operands, part, scale.contiguous(), pred[start:start + chunk], err, b, c, k, part.shape[0],
                BLOCK_U=block_u, BLOCK_K=block_k, num_warps=4, enable_fp_fusion=False,
            )
    return pred
