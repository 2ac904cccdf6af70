"""``TopK``: the streaming, mergeable, serialisable per-unit top-K state of SPEC.md section 1."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends
from .ops import spatial_reduce
from .ops.reference import topk_merge_rows
from .prepare import as_index, canonical_device, positive_int

__all__ = ["TopK", "STATE_FORMAT"]

STATE_FORMAT = "neuroidx_fast.TopK/1"
_NAN_POLICIES = ("raise", "ignore")
_MAX_ID = torch.iinfo(torch.int64).max


class ReducedBatch(NamedTuple):
    """``TopK.reduce``'s result: per (image, unit) max, flat argmax and mean [B, C], and ``rare``."""
    vmax: torch.Tensor
    argmax: torch.Tensor
    vmean: torch.Tensor
    rare: torch.Tensor


def _repeated_id(ids: torch.Tensor) -> tuple[int, int] | None:
    """(row, image id) of the first row of ``ids`` [C, K] that holds some image id (>= 0) twice; None if
    none does."""
    ordered = ids.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if not bool(repeated.any()):
        return None
    row = int(repeated.any(dim=1).nonzero()[0, 0])
    return row, int(ordered[row, 1:][repeated[row]][0])


class TopK:
    """The K best images of each of ``num_units`` units, kept exactly over a stream of batches.

    For unit c the state holds the K largest activations seen (value descending, then lower image id
    first), with the image ids and the flat positions of the maxima. Unused slots hold value -inf,
    id -1 and position -1. Memory is O(num_units * k) whatever the number of images. The K-th slot of
    each unit is its admission threshold: once warm, a candidate that does not beat it costs one
    comparison and no merge.

    ``nan="raise"`` (default) rejects NaN activations with an error naming the unit and the batch's
    image ids; ``nan="ignore"`` treats NaN as -inf. ``backend`` picks the implementation of the update
    (see ``neuroidx_fast.backends``); every backend gives the same state, bit for bit.
    """

    def __init__(self, num_units: int, k: int, device=None, nan: str = "raise", backend: str | None = "auto",
                 name: str | None = None):
        self.num_units = positive_int("TopK: num_units", num_units)
        self.k = positive_int("TopK: k", k)
        if nan not in _NAN_POLICIES:
            raise ValueError(f"TopK: nan must be one of {_NAN_POLICIES}, got {nan!r}")
        self.nan = nan
        self.name = name
        self.device = canonical_device(device) if device is not None else torch.device("cpu")
        self.backend = backends.resolve_name(backend, self.device)
        self._ops = backends.get(self.backend, self.device)
        shape = (self.num_units, self.k)
        self.values = torch.full(shape, float("-inf"), dtype=torch.float32, device=self.device)
        self.ids = torch.full(shape, -1, dtype=torch.int64, device=self.device)
        self.positions = torch.full(shape, -1, dtype=torch.int64, device=self.device)
        self.count = 0

    def __repr__(self) -> str:
        label = f"{self.name!r}, " if self.name else ""
        return (f"TopK({label}num_units={self.num_units}, k={self.k}, count={self.count}, "
                f"device={self.device}, backend={self.backend!r})")

    # ------------------------------------------------------------------ updates
    def _where(self) -> str:
        return f"layer {self.name!r}" if self.name else "TopK"

    def _check_batch(self, values, ids, positions):
        if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[1] != self.num_units:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"{self._where()}: values must be a [B, {self.num_units}] tensor, got {shape}")
        if not values.is_floating_point():
            raise TypeError(f"{self._where()}: values must be floating point, got {values.dtype}")
        if values.device != self.device:
            raise ValueError(f"{self._where()}: values are on {values.device} but the state is on {self.device}; "
                             f"move them with .to({str(self.device)!r}) or build the TopK with that device")
        try:
            ids = torch.as_tensor(ids, device=self.device)
        except (TypeError, ValueError, RuntimeError, OverflowError):  # None, strings, ints past int64
            raise TypeError(f"{self._where()}: ids must be integers (int64), got {str(ids)[:80]}") from None
        if ids.numel() == 0:
            ids = ids.to(torch.int64)  # [] is a float tensor to torch
        if ids.dim() != 1 or ids.shape[0] != values.shape[0]:
            raise ValueError(f"{self._where()}: ids must be a [B] = [{values.shape[0]}] tensor of image ids, "
                             f"got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"{self._where()}: ids must be integers (int64), got {ids.dtype}")
        ids = ids.to(torch.int64).contiguous()
        if positions is None:
            positions = torch.zeros(values.shape, dtype=torch.int64, device=self.device)
        else:
            try:
                positions = torch.as_tensor(positions, device=self.device)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise TypeError(f"{self._where()}: positions must be integers (int64), got {str(positions)[:80]}") \
                    from None
            if positions.shape != values.shape:
                raise ValueError(f"{self._where()}: positions must have the shape of values "
                                 f"{tuple(values.shape)}, got {tuple(positions.shape)}")
            if positions.dtype.is_floating_point or positions.dtype == torch.bool:
                raise TypeError(f"{self._where()}: positions must be integers (int64), got {positions.dtype}")
            positions = positions.to(torch.int64).contiguous()
        # detached: the state keeps values, not the graph that made them (and every batch's inputs)
        return values.detach().float().contiguous(), ids, positions

    def _id_problems(self, ids, positions) -> torch.Tensor:
        """[4] bool, left on the device (read with the NaN check in one sync): ids outside [0, 2^63 - 1), an
        id twice in the batch, an id the state ranks, a negative position. ``_raise_id_problem`` names it."""
        ordered = ids.sort().values
        no = torch.zeros((), dtype=torch.bool, device=ids.device)
        return torch.stack([
            (ordered[0] < 0) | (ordered[-1] == _MAX_ID),  # (the largest int64 sorts with the empty slots' -1 ids)
            (ordered[1:] == ordered[:-1]).any(),
            torch.isin(self.ids, ids).any(),
            (positions < 0).any() if positions.numel() else no,
        ])

    def _raise_id_problem(self, problems: list, ids, positions):
        if problems[0]:
            lowest, highest = (int(v) for v in torch.aminmax(ids))
            raise ValueError(f"{self._where()}: image ids must lie in [0, 2^63 - 1) (their dataset positions), "
                             f"got {lowest if lowest < 0 else highest}")
        if problems[1]:
            raise ValueError(f"{self._where()}: a batch holds the same image id twice; each image must be "
                             "seen once (ids are dataset positions)")
        if problems[2]:
            unit, slot = (int(i) for i in torch.isin(self.ids, ids).nonzero()[0])
            raise ValueError(f"{self._where()}: image id {int(self.ids[unit, slot])} was added before (unit "
                             f"{unit} ranks it); each image must be seen once (ids are dataset positions)")
        raise ValueError(f"{self._where()}: positions must be flat indices >= 0 of the maxima, got "
                         f"{int(positions.min())}")

    def _handle_nan(self, values, ids):
        nan_mask = torch.isnan(values)
        if not bool(nan_mask.any()):
            return values
        if self.nan == "ignore":
            return values.masked_fill(nan_mask, float("-inf"))
        rows, units = nan_mask.nonzero(as_tuple=True)
        bad_units = sorted(set(units.tolist()))
        bad_ids = sorted(set(ids[rows].tolist()))
        shown = ", ".join(map(str, bad_units[:8])) + (" ..." if len(bad_units) > 8 else "")
        raise ValueError(
            f"NaN activation in {self._where()}: unit(s) {shown} on image id(s) {bad_ids[:16]}"
            f"{' ...' if len(bad_ids) > 16 else ''} (batch ids {ids.tolist()[:32]}"
            f"{' ...' if ids.numel() > 32 else ''}). Check the model and inputs, or pass nan='ignore' "
            "to treat NaN as -inf")

    def update(self, values: torch.Tensor, ids, positions=None, check_ids: bool = True,
               nan_free: bool = False) -> "TopK":
        """Add a batch: ``values`` [B, C] (each image's per-unit activation), ``ids`` [B] int64 image ids,
        ``positions`` [B, C] int64 flat positions of the maxima (zeros if None). Each image must be added
        once: the ids are checked to be distinct, >= 0, and not among the images the state ranks (an image
        added before that no unit ranks cannot be seen, and counts twice in ``count``), the positions to
        be >= 0; ``check_ids=False`` skips those checks (for callers that generate ids and positions).
        ``nan_free=True``: the caller has found that ``values`` hold no NaN (skips that check, a device sync)."""
        values, ids, positions = self._check_batch(values, ids, positions)
        if values.shape[0] == 0:
            return self
        # every check of the batch is read in one device sync (a GPU stalls the CPU at each)
        checks = [self._id_problems(ids, positions)] if check_ids else []
        if not nan_free:
            checks.append(torch.isnan(values).any().reshape(1))
        found = torch.cat(checks).tolist() if checks else []
        if check_ids and any(found[:4]):
            self._raise_id_problem(found[:4], ids, positions)
        if not nan_free and found[-1]:
            values = self._handle_nan(values, ids)
        self._ops.topk_update(self.values, self.ids, self.positions, values, ids, positions)
        self.count += int(values.shape[0])
        return self

    def observe(self, activations: torch.Tensor, ids, check_ids: bool = True):
        """Reduce a layer output [B, C, H, W] (or [B, C]) with ``spatial_reduce`` and add it.

        Returns the per-(image, unit) spatial means [B, C] (for class-conditional statistics). Under
        ``nan="ignore"``, NaN elements of a map are dropped: its max and argmax come from the rest, its
        mean is the mean of the rest (NaN when every element is NaN)."""
        reduced = self.reduce(activations)
        return self.add_reduced(reduced, bool(reduced.rare), activations, ids, check_ids)

    def reduce(self, activations: torch.Tensor) -> "ReducedBatch":
        """The first half of ``observe``, with no device sync: the spatial reduction of ``activations`` and
        ``rare``, a 0-d bool tensor on their device that is True where the batch needs ``observe``'s
        careful path (a NaN max, or a mean that is not finite). A caller indexing many layers reads every
        layer's ``rare`` in one sync, then calls ``add_reduced``: a GPU is not made to wait once a layer."""
        if not isinstance(activations, torch.Tensor) or activations.dim() not in (2, 4):
            raise ValueError(f"{self._where()}: activations must be a [B, C, H, W] or [B, C] tensor")
        if activations.shape[1] != self.num_units:
            raise ValueError(f"{self._where()}: activations have {activations.shape[1]} channels, "
                             f"the state tracks {self.num_units} units")
        vmax, argmax, vmean = spatial_reduce(activations, backend=self.backend, refine_overflow=False)
        rare = torch.isnan(vmax).any() | ~torch.isfinite(vmean).all()
        return ReducedBatch(vmax, argmax, vmean, rare)

    def add_reduced(self, reduced: "ReducedBatch", rare: bool, activations: torch.Tensor, ids,
                    check_ids: bool = True) -> torch.Tensor:
        """The second half of ``observe``: add ``reduced`` (``reduce(activations)``), whose ``rare`` the
        caller has read; returns the spatial means [B, C]. A rare batch is reduced again on the careful
        path (overflowed means summed again in float64, the NaN policy applied), so the result is
        ``observe``'s in every case."""
        if not rare:  # no NaN max and finite means: the careful path would change nothing
            self.update(reduced.vmax, ids, reduced.argmax, check_ids=check_ids, nan_free=True)
            return reduced.vmean
        vmax, argmax, vmean = spatial_reduce(activations, backend=self.backend)
        if self.nan == "ignore":
            vmax, argmax, vmean = _drop_nan_elements(activations, vmax, argmax, vmean)
        self.update(vmax, ids, argmax, check_ids=check_ids)
        return vmean

    # ------------------------------------------------------------------ results and state
    def result(self):
        """(values [C, K] float32, ids [C, K] int64, positions [C, K] int64), best first (copies)."""
        return self.values.clone(), self.ids.clone(), self.positions.clone()

    def merge(self, other: "TopK") -> "TopK":
        """Fold in the state of a disjoint set of images (another shard); returns self. Shards that share
        an image that some unit ranks in both top-Ks are refused; an image shared but ranked by no unit
        cannot be seen here, and counts twice in ``count``."""
        if not isinstance(other, TopK):
            raise TypeError(f"TopK.merge expects a TopK, got {type(other).__name__}")
        if (other.num_units, other.k) != (self.num_units, self.k):
            raise ValueError(f"TopK.merge: shapes differ (num_units, k) = {(self.num_units, self.k)} vs "
                             f"{(other.num_units, other.k)}")
        ids = torch.cat([self.ids, other.ids.to(self.device)], dim=1)
        shared = _repeated_id(ids)
        if shared is not None:
            unit, image = shared
            raise ValueError(f"TopK.merge: both states hold image id {image} (unit {unit}): the shards overlap, "
                             "or the same shard is merged twice; merge states of disjoint sets of images")
        merged = topk_merge_rows(
            torch.cat([self.values, other.values.to(self.device)], dim=1),
            ids,
            torch.cat([self.positions, other.positions.to(self.device)], dim=1),
            self.k,
        )
        self.values, self.ids, self.positions = (t.contiguous() for t in merged)
        self.count += other.count
        return self

    def state_dict(self) -> dict:
        """Plain tensors, ints and strings (CPU): saveable with torch.save and loadable with
        ``torch.load(weights_only=True)`` (NeuronIndex.save keeps the tensors in safetensors). A snapshot:
        its tensors are copies, later updates do not change them."""
        return {
            "format": STATE_FORMAT,
            "num_units": self.num_units,
            "k": self.k,
            "count": self.count,
            "nan": self.nan,
            "values": self.values.detach().cpu().clone(),
            "ids": self.ids.detach().cpu().clone(),
            "positions": self.positions.detach().cpu().clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict, device=None, backend: str | None = "auto") -> "TopK":
        """Rebuild a TopK from ``state_dict()``; rejects a foreign or inconsistent state clearly."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a TopK state (format {found!r}, expected {STATE_FORMAT!r})")
        missing = [key for key in ("num_units", "k", "count", "values", "ids", "positions") if key not in state]
        if missing:
            raise ValueError(f"TopK state is missing {missing}")
        # ints as state_dict() writes them: 2.7 or "3" is a state it did not write, not a count to round
        num_units, k, count = (as_index(state[key]) for key in ("num_units", "k", "count"))
        for key, value in (("num_units", num_units), ("k", k), ("count", count)):
            if value is None:
                raise ValueError(f"TopK state: {key} must be an int, got {state[key]!r} (corrupt state)")
        top = cls(num_units, k, device=device, nan=state.get("nan", "raise"), backend=backend)
        for key, dtype in (("values", torch.float32), ("ids", torch.int64), ("positions", torch.int64)):
            tensor = state[key]
            if not isinstance(tensor, torch.Tensor) or tensor.shape != (num_units, k) or tensor.dtype != dtype:
                raise ValueError(f"TopK state: {key!r} must be a [{num_units}, {k}] {dtype} tensor, got "
                                 f"{getattr(tensor, 'shape', None)} {getattr(tensor, 'dtype', None)}")
        if count < 0:
            raise ValueError(f"TopK state: count must be >= 0, got {count}")
        # copies: the new TopK updates its tensors in place, the caller's state stays as it was
        values, ids, positions = (state[key].to(top.device, copy=True).contiguous()
                                  for key in ("values", "ids", "positions"))
        if torch.isnan(values).any():
            raise ValueError("TopK state: NaN values (corrupt state)")
        empty = ids < 0
        if bool(((values != float("-inf")) & empty).any() or (positions[empty] != -1).any()
                or (ids[empty] != -1).any() or (positions[~empty] < 0).any()):
            raise ValueError("TopK state: an empty slot (id -1) must hold value -inf and position -1, and a filled "
                             "one a position >= 0 (corrupt state)")
        if bool((empty[:, :-1] & ~empty[:, 1:]).any()):
            raise ValueError("TopK state: an empty slot before a filled one (corrupt state)")
        if _repeated_id(ids) is not None:
            raise ValueError("TopK state: a unit holds the same image id twice (corrupt state)")
        filled = int((~empty).sum(dim=1).max())
        if filled > count:
            raise ValueError(f"TopK state: a unit holds {filled} images but count says {count} were seen "
                             "(corrupt state)")
        resorted = topk_merge_rows(values, ids, positions, k)
        if not (torch.equal(resorted[1], ids) and torch.equal(resorted[0], values)):
            raise ValueError("TopK state: rows are not in top-K order (corrupt state)")
        top.values, top.ids, top.positions, top.count = values, ids, positions, count
        return top


def _drop_nan_elements(activations, vmax, argmax, vmean):
    """Recompute, with NaN elements dropped, only the maps whose reduction met a NaN (rare)."""
    hit = torch.isnan(vmax)
    if not bool(hit.any()):
        return vmax, argmax, vmean
    x = activations if activations.dim() == 4 else activations[:, :, None, None]
    rows, units = hit.nonzero(as_tuple=True)
    maps = x[rows, units].reshape(rows.numel(), -1).float()
    nan = torch.isnan(maps)
    filled = maps.masked_fill(nan, float("-inf"))
    m, a = filled.max(dim=1)
    kept = (~nan).sum(dim=1)
    mean = (maps.masked_fill(nan, 0.0).sum(dim=1, dtype=torch.float64) / kept).float()  # (float32 sums can overflow)
    vmax, argmax, vmean = vmax.clone(), argmax.clone(), vmean.clone()
    vmax[rows, units], argmax[rows, units], vmean[rows, units] = m, a, mean
    return vmax, argmax, vmean
