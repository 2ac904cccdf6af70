"""Triton kernel for ``spatial_reduce``: per (image, unit) max, argmax (lowest flat index) and mean.

Contract: ``neuroidx_fast.ops.reference`` (module docstring). One program reads a tile of BLOCK_C
channels of one image, looping over the H*W positions in chunks of BLOCK_HW; the loaded tile is
[BLOCK_C, BLOCK_HW]. The launcher picks the block sizes per memory layout so the contiguous axis of
the tile is the one read coalesced: channels for channels_last (and [B, C, 1, 1]), positions for NCHW.

The loop body is purely element-wise: every lane keeps its own running max (``run_v``), the flat index
of its first maximum (``run_i``) and a float32 sum. Positions grow along a lane, so a strict ``>``
keeps the lowest index on ties; NaN is treated as larger than every number and sticks at the lane's
first NaN. The cross-lane reductions run once, after the loop:
  * any lane holding NaN -> argmax = the lowest NaN index among the lanes (= the map's first NaN);
  * else the max over lanes, and the lowest index among the lanes that reach it.
The stored max is re-read from x at the chosen index, so it is bit-identical to that element (this
also keeps the NaN payload and the sign of a zero maximum).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["spatial_reduce", "pick_blocks"]

_BIG = 2**31 - 1  # index sentinel: larger than any flat position (H * W < 2**31 is checked)
_BIG_C = tl.constexpr(_BIG)
_TILE = 2048  # elements per loaded tile


@triton.jit
def _position_offset(p, W, stride_h, stride_w, OFF64: tl.constexpr, FLAT_HW: tl.constexpr):
    """Element offset, inside one map, of flat positions p = y * W + x."""
    if OFF64:
        p = p.to(tl.int64)
    if FLAT_HW:
        return p * stride_w
    return (p // W) * stride_h + (p % W) * stride_w


@triton.jit
def _spatial_reduce_kernel(
    x_ptr, max_ptr, arg_ptr, mean_ptr,
    C, W, HW, n_cblocks,
    stride_b, stride_c, stride_h, stride_w,
    FLAT_HW: tl.constexpr,   # position p sits at p * stride_w (stride_h == W * stride_w, or H or W is 1)
    OFF64: tl.constexpr,     # offsets inside one image need 64 bits
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_cblocks
    cb = pid % n_cblocks
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    if OFF64:
        coff = cs.to(tl.int64) * stride_c
    else:
        coff = cs * stride_c
    img_ptr = x_ptr + b.to(tl.int64) * stride_b
    row_ptr = img_ptr + coff[:, None]  # [BLOCK_C, 1]

    run_v = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), tl.float32)
    run_i = tl.full([BLOCK_C, BLOCK_HW], _BIG_C, tl.int32)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    ps0 = tl.arange(0, BLOCK_HW)
    for p0 in range(0, HW, BLOCK_HW):
        ps = p0 + ps0
        pmask = ps < HW
        poff = _position_offset(ps, W, stride_h, stride_w, OFF64, FLAT_HW)
        m = cmask[:, None] & pmask[None, :]
        v = tl.load(row_ptr + poff[None, :], mask=m, other=0.0).to(tl.float32)
        acc += v
        upd = m & ((v > run_v) | ((v != v) & (run_v == run_v)) | (run_i == _BIG_C))
        run_v = tl.where(upd, v, run_v)
        run_i = tl.where(upd, ps[None, :], run_i)

    lane_nan = run_v != run_v
    nan_i = tl.min(tl.where(lane_nan, run_i, _BIG_C), axis=1)
    rv = tl.where(lane_nan, float("-inf"), run_v)
    mx = tl.max(rv, axis=1)
    at_max = (rv == mx[:, None]) & (run_i < _BIG_C)
    arg = tl.min(tl.where(at_max, run_i, _BIG_C), axis=1)
    arg = tl.where(nan_i < _BIG_C, nan_i, arg)
    valid = cmask & (arg < _BIG_C)
    arg = tl.where(valid, arg, 0)

    aoff = _position_offset(arg, W, stride_h, stride_w, OFF64, FLAT_HW)
    vmax = tl.load(img_ptr + coff + aoff, mask=valid, other=float("nan")).to(tl.float32)
    vmean = tl.sum(acc, axis=1) / HW

    out = b.to(tl.int64) * C + cs
    tl.store(max_ptr + out, vmax, mask=cmask)
    tl.store(arg_ptr + out, arg.to(tl.int64), mask=cmask)
    tl.store(mean_ptr + out, vmean, mask=cmask)


def _flat_hw_stride(h: int, w: int, sh: int, sw: int):
    """The stride of the flat position p = y * W + x if one exists, else None."""
    if h == 1:
        return sw
    if w == 1:
        return sh
    if sh == w * sw:
        return sw
    return None


def pick_blocks(shape, strides):
    """(BLOCK_C, BLOCK_HW, num_warps) for a [B, C, H, W] tensor with these strides."""
    _, c, h, w = shape
    _, sc, sh, sw = strides
    hw = h * w
    np_c = triton.next_power_of_2(c)
    np_hw = triton.next_power_of_2(hw)
    s_hw = _flat_hw_stride(h, w, sh, sw)
    s_pos = s_hw if s_hw is not None else sw  # stride between neighbouring positions (along a row)
    if hw == 1 or (c > 1 and sc < s_pos):
        # channels_last (or [B, C, 1, 1]): channels are the densest axis of the tile.
        block_c = min(np_c, max(64, _TILE // np_hw))
        block_hw = min(np_hw, max(1, _TILE // block_c))
    else:
        # NCHW (or any other layout): read along the positions, several channels per program for small maps.
        block_hw = min(np_hw, 1024)
        block_c = min(np_c, max(1, _TILE // block_hw))
    tile = block_c * block_hw
    num_warps = max(1, min(8, tile // 256))
    return block_c, block_hw, num_warps


def spatial_reduce(x: torch.Tensor):
    """Per (image, unit) max, argmax and mean of x [B, C, H, W] (float32 / float16 / bfloat16, any strides)."""
    if x.dim() != 4:
        raise ValueError(f"spatial_reduce expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton spatial_reduce takes float32, float16 or bfloat16, got {x.dtype}")
    b, c, h, w = x.shape
    hw = h * w
    vmax = torch.empty((b, c), dtype=torch.float32, device=x.device)
    argmax = torch.empty((b, c), dtype=torch.int64, device=x.device)
    vmean = torch.empty((b, c), dtype=torch.float32, device=x.device)
    if b * c == 0:
        return vmax, argmax, vmean
    if hw == 0:
        raise ValueError(f"spatial_reduce got an empty activation map (H={h}, W={w})")
    sb, sc, sh, sw = x.stride()
    s_hw = _flat_hw_stride(h, w, sh, sw)
    flat = s_hw is not None
    # Largest element offset inside one image (strides are non-negative in torch).
    span = (c - 1) * sc + (h - 1) * sh + (w - 1) * sw
    off64 = span >= 2**31 - 1 or (flat and (hw - 1) * s_hw >= 2**31 - 1)
    block_c, block_hw, num_warps = pick_blocks(x.shape, x.stride())
    if hw + block_hw >= _BIG:  # the kernel's int32 position counter steps past hw by up to a block
        raise ValueError(f"spatial_reduce: maps of {hw} positions exceed the kernel's int32 index range "
                         f"(2**31 - 1 - {block_hw})")
    n_cblocks = triton.cdiv(c, block_c)
    grid = (b * n_cblocks,)
    # Launch on the tensor's GPU, not on whichever one is current.
    device_ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        _spatial_reduce_kernel[grid](
            x, vmax, argmax, vmean,
            c, w, hw, n_cblocks,
            sb, sc, sh if not flat else 0, s_hw if flat else sw,
            FLAT_HW=flat, OFF64=off64, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=num_warps,
        )
    return vmax, argmax, vmean
