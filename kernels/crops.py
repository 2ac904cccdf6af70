"""Triton kernels for ``gather_crops`` and ``accumulate_crops``: receptive-field crops of images, copied
out or added (weighted, in float64) into per-unit sums.

Contract: ``neuroidx_fast.ops.reference`` (module docstring). A program owns one channel of one crop
(gather) or of one unit's sum (accumulate) and a run of BLOCK consecutive output pixels of it, taken
in flat order p = i * rw + k, so the lanes of a program read whole rows of the image, coalesced.
Pixels outside the image take the channel's pad value (masked load) or, in edge mode, the nearest
image pixel (clamped coordinates).

uint8 pixel codes (CODES): the kernels read the codes and decode each pixel they read through the
256-entry float32 table of the values the codes stand for (``reference.pixel_code_values``). A table
load is exact by construction, where Triton's float32 division is not correctly rounded; the results are
bit-identical to the float32 kernels' on the decoded images, for a quarter of the image bytes.

Exactness: gather is a copy. accumulate keeps each pixel's float64 sum in a register and, for
j = 0, 1, ... in order, adds float64(w_j) * float64(pixel) unless slot j is empty; the product of two
float32 numbers is exact in float64, so a fused multiply-add rounds exactly as the reference's
multiply-then-add does, and the sums are bit-identical to it.

Corner coordinates are clamped to [-r, extent] first (no pixel changes: every position beyond a border
reads the same pad or edge value), which keeps the in-image arithmetic in int32; the launchers check
that H * W and the crop sizes fit.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from neuroidx_fast.ops.crop_operands import check_index_range, crop_operands
from neuroidx_fast.ops.reference import pixel_code_values

__all__ = ["gather_crops", "accumulate_crops", "pick_block"]

_MAX_BLOCK = 1024


@triton.jit
def _load_pixels(at, mask, codes_ptr, CODES: tl.constexpr):
    """float32 pixels at ``at`` where ``mask`` (0.0 elsewhere): uint8 codes decoded through the table
    ``codes_ptr`` (CODES), or the float32 pixels themselves."""
    if CODES:
        code = tl.load(at, mask=mask, other=0)
        v = tl.load(codes_ptr + code.to(tl.int32), mask=mask, other=0.0)
    else:
        v = tl.load(at, mask=mask, other=0.0)
    return v


@triton.jit
def _crop_pixels(images_ptr, codes_ptr, slot, y0, x0, c, Ch, H, W, rh, rw, ii, kk, live, pad,
                 EDGE: tl.constexpr, CODES: tl.constexpr):
    """Pixels (ii, kk) of the crop of image row ``slot`` (>= 0 where ``live``) with corner (y0, x0)."""
    y0 = tl.minimum(tl.maximum(y0, -rh), H).to(tl.int32)
    x0 = tl.minimum(tl.maximum(x0, -rw), W).to(tl.int32)
    ys = y0 + ii
    xs = x0 + kk
    plane = images_ptr + (slot * Ch + c) * H * W  # int64: slot is loaded as int64
    if EDGE:
        yc = tl.minimum(tl.maximum(ys, 0), H - 1)
        xc = tl.minimum(tl.maximum(xs, 0), W - 1)
        v = _load_pixels(plane + (yc * W + xc), live, codes_ptr, CODES)
    else:
        inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        v = _load_pixels(plane + (ys * W + xs), live & inside, codes_ptr, CODES)
        v = tl.where(inside, v, pad)
    return v


@triton.jit
def _tile_positions(rh, rw, BLOCK: tl.constexpr):
    """This program's BLOCK positions of a crop plane (grid axis 1): flat index, in-plane mask, row, column."""
    ps = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return ps, ps < rh * rw, ps // rw, ps % rw


@triton.jit
def _channel_pad(pad_ptr, c, EDGE: tl.constexpr):
    """The fill of channel c outside the image (unused in edge mode)."""
    if EDGE:
        pad = 0.0
    else:
        pad = tl.load(pad_ptr + c)
    return pad


@triton.jit
def _gather_crops_kernel(
    images_ptr, slots_ptr, tops_ptr, pad_ptr, codes_ptr, out_ptr,
    Ch, H, W, rh, rw,
    EDGE: tl.constexpr, CODES: tl.constexpr, BLOCK: tl.constexpr,
):
    mc = tl.program_id(0)  # crop m, channel c
    m = mc // Ch
    c = mc % Ch
    ps, pmask, ii, kk = _tile_positions(rh, rw, BLOCK)
    slot = tl.load(slots_ptr + m)
    y0 = tl.load(tops_ptr + 2 * m.to(tl.int64))  # (2 m overflows int32 from 2^30 crops)
    x0 = tl.load(tops_ptr + 2 * m.to(tl.int64) + 1)
    pad = _channel_pad(pad_ptr, c, EDGE)
    # Scalars broadcast once to tensors (the interpreter mis-types scalar & tensor boolean ops).
    filled = tl.broadcast_to(slot, [BLOCK]) >= 0
    live = pmask & filled
    v = _crop_pixels(images_ptr, codes_ptr, tl.maximum(slot, 0), y0, x0, c, Ch, H, W, rh, rw, ii, kk, live, pad,
                     EDGE, CODES)
    v = tl.where(filled, v, 0.0)
    tl.store(out_ptr + mc.to(tl.int64) * (rh * rw) + ps, v, mask=pmask)


@triton.jit
def _accumulate_crops_kernel(
    sums_ptr, images_ptr, slots_ptr, tops_ptr, weights_ptr, pad_ptr, codes_ptr,
    J, Ch, H, W, rh, rw,
    EDGE: tl.constexpr, CODES: tl.constexpr, BLOCK: tl.constexpr,
):
    uc = tl.program_id(0)  # unit u, channel c
    u = uc // Ch
    c = uc % Ch
    ps, pmask, ii, kk = _tile_positions(rh, rw, BLOCK)
    out = sums_ptr + uc.to(tl.int64) * (rh * rw) + ps
    acc = tl.load(out, mask=pmask, other=0.0)
    pad = _channel_pad(pad_ptr, c, EDGE)
    row = u.to(tl.int64) * J
    for j in range(0, J):
        slot = tl.load(slots_ptr + row + j)
        y0 = tl.load(tops_ptr + 2 * (row + j))
        x0 = tl.load(tops_ptr + 2 * (row + j) + 1)
        w = tl.load(weights_ptr + row + j).to(tl.float64)
        filled = tl.broadcast_to(slot, [BLOCK]) >= 0
        v = _crop_pixels(images_ptr, codes_ptr, tl.maximum(slot, 0), y0, x0, c, Ch, H, W, rh, rw, ii, kk,
                         pmask & filled, pad, EDGE, CODES)
        acc = tl.where(filled, acc + w * v.to(tl.float64), acc)
    tl.store(out, acc, mask=pmask)


def pick_block(plane_size: int):
    """(BLOCK, num_warps) for crops of ``plane_size`` = rh * rw pixels per channel."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(plane_size))
    return block, max(1, min(4, block // 128))


def _operands(images, slots, tops, pad_value, size, what: str):
    operands = crop_operands(images, slots, tops, pad_value, what, pixel_types=(torch.float32, torch.uint8))
    check_index_range(images, size, what, "the Triton crop kernels")
    return operands


def _code_table(images: torch.Tensor) -> torch.Tensor:
    """The table the kernels decode uint8 images through (float32 images: any tensor, never read)."""
    return pixel_code_values(images.device) if images.dtype == torch.uint8 else images


def _plane_blocks(plane_size: int, block: int) -> int:
    blocks = triton.cdiv(plane_size, block)
    if blocks > 65535:  # the second grid axis of a CUDA launch
        raise ValueError(f"crops of {plane_size} pixels per channel are too large for the Triton crop kernels")
    return blocks


def _device_context(t: torch.Tensor):
    # Launch on the tensor's GPU, not on whichever one is current.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def gather_crops(images: torch.Tensor, slots: torch.Tensor, tops: torch.Tensor, size, pad_value):
    """[M, Ch, rh, rw] crops of ``images``, float32 or uint8 pixel codes (see the reference contract)."""
    rh, rw = size
    images, slots, tops, pad = _operands(images, slots, tops, pad_value, size, "gather_crops")
    m, ch = slots.shape[0], images.shape[1]
    crops = torch.empty((m, ch, rh, rw), dtype=torch.float32, device=images.device)
    if crops.numel() == 0:
        return crops
    block, num_warps = pick_block(rh * rw)
    grid = (m * ch, _plane_blocks(rh * rw, block))
    with _device_context(images):
        _gather_crops_kernel[grid](
            images, slots, tops, images if pad is None else pad, _code_table(images), crops,
            ch, images.shape[2], images.shape[3], rh, rw,
            EDGE=pad is None, CODES=images.dtype == torch.uint8, BLOCK=block, num_warps=num_warps,
        )
    return crops


def accumulate_crops(sums: torch.Tensor, images: torch.Tensor, slots: torch.Tensor, tops: torch.Tensor,
                     weights: torch.Tensor, pad_value) -> None:
    """In place: sums[u] += float64(weights[u, j]) * crop(u, j), j in order (see the reference contract)."""
    if sums.dtype != torch.float64 or not sums.is_contiguous() or weights.dtype != torch.float32:
        raise TypeError("accumulate_crops: sums must be contiguous float64 and weights float32")
    u, ch, rh, rw = sums.shape
    images, slots, tops, pad = _operands(images, slots, tops, pad_value, (rh, rw), "accumulate_crops")
    weights = weights.contiguous()
    if sums.numel() == 0 or slots.numel() == 0:
        return
    block, num_warps = pick_block(rh * rw)
    grid = (u * ch, _plane_blocks(rh * rw, block))
    with _device_context(images):
        _accumulate_crops_kernel[grid](
            sums, images, slots, tops, weights, images if pad is None else pad, _code_table(images),
            slots.shape[1], ch, images.shape[2], images.shape[3], rh, rw,
            EDGE=pad is None, CODES=images.dtype == torch.uint8, BLOCK=block, num_warps=num_warps,
        )
