"""Triton kernel for ``topk_update``: merge one batch of candidates into the per-unit top-K, in place.

Contract: ``neuroidx_fast.ops.reference`` (module docstring). Order ("a beats b"): a real entry
(id >= 0) beats an empty one (id -1); between real entries the larger value wins, then the lower id;
exact (value, id) ties keep the old entry first, then the candidates in batch order.

One program owns BLOCK_U consecutive units (rows), so no two programs touch the same row.
  1. Admission, read coalesced along the units: a [BLOCK_A, BLOCK_U] tile of ``values`` is compared with
     each row's K-th entry (the threshold); the admitted candidates are counted per unit. Once the
     state is warm this is all the work there is: a unit with no admitted candidate is never written.
  2. For each unit with admissions, a rank-based merge (no sort): the row's K state entries are loaded
     into registers, then, for each chunk of BLOCK_B candidates,
       rank(candidate i) = #(state entries that i does not beat) + #(admitted candidates before i)
       shift(state j)   += #(admitted candidates that beat j)
     and the candidates whose rank is < K are stored at slot ``rank``; finally every state entry that
     moved (shift > 0) and stays in the row (j + shift < K) is stored at slot j + shift. The ranks form
     a permutation of the merged list, so the stores hit distinct slots; the row is read in full (and
     a barrier passed) before the first store, which makes the in-place update safe.
Rows with K > MAX_K are merged by the torch reference (the row would not fit in registers).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["topk_update", "pick_blocks", "MAX_K"]

MAX_K = 1024  # largest K merged by the kernel; larger rows use the torch reference
_PAIR_TILE = 2048  # elements of the [candidates, state] and [candidates, candidates] comparison tiles
_MIN_BLOCK = 16


@triton.jit
def _better(va, ia, vb, ib):
    """True where entry a ranks strictly before entry b (the contract's order, without the tie rule)."""
    return (ia >= 0) & ((ib < 0) | (va > vb) | ((va == vb) & (ia < ib)))


@triton.jit
def _unit_candidates(v_ptr, id_ptr, bs, bmask, c, C, th_v, th_id):
    """Values and ids of candidates ``bs`` of unit c, and which of them beat the threshold (th_v, th_id)."""
    cv = tl.load(v_ptr + bs.to(tl.int64) * C + c, mask=bmask, other=float("-inf"))
    cid = tl.load(id_ptr + bs, mask=bmask, other=-1)
    return cv, cid, bmask & _better(cv, cid, th_v, th_id)


@triton.jit
def _merge_unit(
    sv_ptr, sid_ptr, spos_ptr, v_ptr, id_ptr, pos_ptr,
    c, B, C, K,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    row = c.to(tl.int64) * K
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    th_v = tl.load(sv_ptr + row + (K - 1))
    th_id = tl.load(sid_ptr + row + (K - 1))
    s_v = tl.load(sv_ptr + row + ks, mask=kmask, other=float("-inf"))
    s_id = tl.load(sid_ptr + row + ks, mask=kmask, other=-1)
    s_pos = tl.load(spos_ptr + row + ks, mask=kmask, other=-1)
    # Scalars broadcast once to tensors (the interpreter mis-types scalar & tensor boolean ops).
    th_vb = tl.broadcast_to(th_v, [BLOCK_B])
    th_ib = tl.broadcast_to(th_id, [BLOCK_B])
    th_vm = tl.broadcast_to(th_v, [BLOCK_M])
    th_im = tl.broadcast_to(th_id, [BLOCK_M])
    shift = tl.zeros([BLOCK_K], tl.int32)
    # Every thread has read the row before anyone writes to it.
    tl.debug_barrier()

    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        bmask = bs < B
        cv, cid, adm = _unit_candidates(v_ptr, id_ptr, bs, bmask, c, C, th_vb, th_ib)
        if tl.sum(adm.to(tl.int32), axis=0) > 0:
            # beat[i, j]: candidate i beats state entry j (strictly: the old entry wins exact ties).
            beat = _better(cv[:, None], cid[:, None], s_v[None, :], s_id[None, :])
            shift += tl.sum((beat & adm[:, None] & kmask[None, :]).to(tl.int32), axis=0)
            rank = tl.sum(((~beat) & kmask[None, :]).to(tl.int32), axis=1)
            for m0 in range(0, B, BLOCK_M):
                ms = m0 + tl.arange(0, BLOCK_M)
                mmask = ms < B
                ov, oid, oadm = _unit_candidates(v_ptr, id_ptr, ms, mmask, c, C, th_vm, th_im)
                # before[i, m]: admitted candidate m comes before candidate i in the merged order.
                before = _better(ov[None, :], oid[None, :], cv[:, None], cid[:, None]) | (
                    (ov[None, :] == cv[:, None]) & (oid[None, :] == cid[:, None]) & (ms[None, :] < bs[:, None]))
                rank += tl.sum((before & oadm[None, :]).to(tl.int32), axis=1)
            keep = adm & (rank < K)
            cpos = tl.load(pos_ptr + bs.to(tl.int64) * C + c, mask=keep, other=-1)
            tl.store(sv_ptr + row + rank, cv, mask=keep)
            tl.store(sid_ptr + row + rank, cid, mask=keep)
            tl.store(spos_ptr + row + rank, cpos, mask=keep)

    dest = ks + shift
    moved = kmask & (shift > 0) & (dest < K)
    tl.store(sv_ptr + row + dest, s_v, mask=moved)
    tl.store(sid_ptr + row + dest, s_id, mask=moved)
    tl.store(spos_ptr + row + dest, s_pos, mask=moved)


@triton.jit
def _topk_update_kernel(
    sv_ptr, sid_ptr, spos_ptr, v_ptr, id_ptr, pos_ptr,
    B, C, K,
    BLOCK_U: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    u0 = pid * BLOCK_U
    us_local = tl.arange(0, BLOCK_U)
    us = u0 + us_local
    umask = us < C
    last = us.to(tl.int64) * K + (K - 1)
    th_v = tl.load(sv_ptr + last, mask=umask, other=float("inf"))
    th_id = tl.load(sid_ptr + last, mask=umask, other=0)

    count = tl.zeros([BLOCK_U], tl.int32)
    for b0 in range(0, B, BLOCK_A):
        bs = b0 + tl.arange(0, BLOCK_A)
        bmask = bs < B
        tmask = bmask[:, None] & umask[None, :]
        cv = tl.load(v_ptr + bs.to(tl.int64)[:, None] * C + us[None, :], mask=tmask, other=float("-inf"))
        cid = tl.load(id_ptr + bs, mask=bmask, other=-1)
        adm = tmask & _better(cv, cid[:, None], th_v[None, :], th_id[None, :])
        count += tl.sum(adm.to(tl.int32), axis=0)

    for u in range(BLOCK_U):
        n = tl.sum(tl.where(us_local == u, count, 0), axis=0)
        if n > 0:
            _merge_unit(sv_ptr, sid_ptr, spos_ptr, v_ptr, id_ptr, pos_ptr,
                        u0 + u, B, C, K, BLOCK_K, BLOCK_B, BLOCK_M)


def pick_blocks(num_units: int, k: int, batch: int):
    """(BLOCK_U, BLOCK_A, BLOCK_K, BLOCK_B, BLOCK_M, num_warps) for C units, K slots, B candidates."""
    np_b = max(_MIN_BLOCK, triton.next_power_of_2(batch))
    block_k = max(_MIN_BLOCK, triton.next_power_of_2(k))
    block_b = min(np_b, max(_MIN_BLOCK, _PAIR_TILE // block_k))
    block_m = min(np_b, max(_MIN_BLOCK, _PAIR_TILE // block_b))
    # Units per program: up to 8 (one 32-byte sector of float32 values per candidate) while keeping
    # at least ~256 programs in flight.
    block_u = min(8, max(1, triton.next_power_of_2(num_units) // 256))
    block_a = min(np_b, max(_MIN_BLOCK, 1024 // block_u))
    num_warps = 8 if block_k * block_b > _PAIR_TILE else 4  # large K: the state tile does not shrink further
    return block_u, block_a, block_k, block_b, block_m, num_warps


def topk_update(state_values, state_ids, state_positions, values, ids, positions) -> None:
    """Merge B candidates per unit into the sorted [C, K] top-K state, in place (see the module docstring)."""
    num_units, k = state_values.shape
    batch = values.shape[0]
    assert state_ids.shape == (num_units, k) and state_positions.shape == (num_units, k)
    assert values.shape == (batch, num_units) and positions.shape == (batch, num_units)
    assert ids.shape == (batch,)
    assert state_values.dtype == torch.float32 and values.dtype == torch.float32
    assert state_ids.dtype == torch.int64 and state_positions.dtype == torch.int64
    assert ids.dtype == torch.int64 and positions.dtype == torch.int64
    for t in (state_values, state_ids, state_positions, values, positions):
        assert t.is_contiguous(), "topk_update: state, values and positions must be contiguous"
    for t in (state_ids, state_positions, values, ids, positions):
        assert t.device == state_values.device, "topk_update: all tensors must be on the same device"
    if batch == 0 or num_units == 0 or k == 0:
        return
    if k > MAX_K:
        from neuroidx_fast.ops import reference

        reference.topk_update(state_values, state_ids, state_positions, values, ids, positions)
        return
    ids = ids.contiguous()
    block_u, block_a, block_k, block_b, block_m, num_warps = pick_blocks(num_units, k, batch)
    grid = (triton.cdiv(num_units, block_u),)
    device = state_values.device
    device_ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with device_ctx:
        _topk_update_kernel[grid](
            state_values, state_ids, state_positions, values, ids, positions,
            batch, num_units, k,
            BLOCK_U=block_u, BLOCK_A=block_a, BLOCK_K=block_k, BLOCK_B=block_b, BLOCK_M=block_m,
            num_warps=num_warps,
        )
