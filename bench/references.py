"""Reference trackers the benchmarks measure against (in the same run as the fast paths)."""

from __future__ import annotations

import torch


class NetDissectStyleTopK:
    """The classic running top-K: per batch, reduce each map with amax, take torch.topk of the batch per
    unit into a buffer of 5K entries per unit, and compact the buffer with torch.topk when it is full.
    (Not exact on ties: torch.topk breaks them arbitrarily. A speed reference only.)"""

    def __init__(self, num_units: int, k: int, device=None):
        self.k = k
        self.capacity = 5 * k
        self.values = torch.empty(num_units, 0, device=device)
        self.ids = torch.empty(num_units, 0, dtype=torch.int64, device=device)

    def observe(self, activations: torch.Tensor, ids: torch.Tensor) -> None:
        vmax = activations.flatten(2).amax(dim=2).float().t()  # [C, B]
        top = torch.topk(vmax, min(self.k, vmax.shape[1]), dim=1)
        self.values = torch.cat([self.values, top.values], dim=1)
        self.ids = torch.cat([self.ids, ids[top.indices]], dim=1)
        if self.values.shape[1] >= self.capacity:
            keep = torch.topk(self.values, self.k, dim=1)
            self.values = keep.values
            self.ids = torch.gather(self.ids, 1, keep.indices)
