"""Brute-force oracles, independent of the package's code: plain numpy, full sorts."""

import numpy as np
import torch


def spatial_reduce_oracle(x: torch.Tensor):
    """Per (b, c): numpy's first argmax (NaN propagates to its first occurrence), that element, float64 mean."""
    if x.dim() == 2:
        x = x[:, :, None, None]
    flat = x.float().reshape(x.shape[0], x.shape[1], -1).numpy()
    arg = np.argmax(flat, axis=2)
    vmax = np.take_along_axis(flat, arg[..., None], axis=2)[..., 0]
    with np.errstate(invalid="ignore"):  # +inf and -inf in one map: a NaN mean, as expected
        vmean = flat.astype(np.float64).mean(axis=2)
    return torch.from_numpy(vmax.copy()), torch.from_numpy(arg.astype(np.int64)), torch.from_numpy(vmean)


def topk_oracle(values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, k: int):
    """Full sort of every image of every unit: value descending, then id ascending; pad with (-inf, -1, -1)."""
    v = values.float().numpy()
    n, c = v.shape
    out_v = np.full((c, k), -np.inf, dtype=np.float32)
    out_i = np.full((c, k), -1, dtype=np.int64)
    out_p = np.full((c, k), -1, dtype=np.int64)
    idn = ids.numpy()
    for unit in range(c):
        order = np.lexsort((idn, -v[:, unit].astype(np.float64)))[:k]
        out_v[unit, : len(order)] = v[order, unit]
        out_i[unit, : len(order)] = idn[order]
        out_p[unit, : len(order)] = positions.numpy()[order, unit]
    return torch.from_numpy(out_v), torch.from_numpy(out_i), torch.from_numpy(out_p)


def assert_same_topk(got, expected):
    names = ("values", "ids", "positions")
    for name, g, e in zip(names, got, expected):
        assert torch.equal(g.cpu(), e), f"{name} differ:\n got {g}\n expected {e}"
