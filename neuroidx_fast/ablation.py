"""Masked batched ablation (SPEC.md section 6, Zhou et al.): what each unit of a layer is worth to each class.

``ablation_drops`` measures, for every ablated set S of units of one layer (one unit at a time by
default), the per-class top-1 accuracy of the model with F_c = 0 (``mode="zero"``) or F_c = m_c, the
unit's dataset mean (``mode="mean"``), for c in S at every position, against the intact model.

The engine, per batch of B images:
  1. runs the model up to the layer ONCE (``graph_split``: the forward traced with torch.fx and cut
     after the layer; values the rest of the forward needs from before the layer, such as a residual
     branch, cross the cut);
  2. general path: for M masks at a time, writes the M masked replicas of the layer output [M*B, ...]
     in one pass (``ops.mask_replicas``), replicates the values that cross the cut and runs only the
     rest of the forward on them;
  3. read-out path (chosen automatically when the layer feeds a linear read-out through per-channel
     ops only, e.g. global average pooling then a linear layer, all torch's own modules without forward
     hooks, pooling at the input ranks it pools per channel, and each mask is one unit): computes
     the intact read-out input p [B, C] once and, for every unit c and image at once, the argmax of
     the logits with feature c replaced (``ops.readout_ablation_argmax``: float64, fused, certified
     against a rounding-error bound of the model's own matmul); the rare (unit, batch) with an
     uncertified image is recomputed through the general path at the naive shape.

Exactness (what "the same counts as the naive loop" rests on). The naive loop is one full forward of
each batch per ablated set, with a forward hook replacing the layer output by a copy whose ablated
channels hold the fill (``naive_ablation_counts``). The engine reproduces it as follows:
  * the prefix and the suffix execute the traced graph, i.e. the same calls as ``model.forward``: a
    suffix run on B images computes bit for bit what the naive forward computes (deterministic kernels).
    Where tracing changes what the forward computes, the run is refused: an in-place write whose
    result is never used (dropped from the graph: ``graph_split``), and, on every batch, intact logits
    of the two halves that differ from ``model.forward``'s (``h += y`` on a tensor also saved under
    another name becomes ``h = h + y``); on the first batch, also under ablation, against the naive
    loop's own hooked forward, for up to 8 masks spread over the set (``h += g`` with g = 0 on intact
    images only; up to 8 full forwards of the batch's first 8 images, small next to S passes of the
    rest of the forward over the data). The intact counts are ``model.forward``'s own. NaN in the
    layer's output or the logits is an error naming the images;
  * several masks share a run of the rest of the forward only where that is shown exact: on the
    first batch of each size, replicas of that batch under masks spread over the set, run together
    at every run size used and each alone (the naive shape), must give the same logits bit for bit
    (CPU; a few float32 rounding steps on a GPU). Else (a rest that mixes the rows of its batch:
    ``F.batch_norm`` with training=True, ``z - z.mean(0)``, a branch on the batch's sum; or rounds
    differently with the number of rows, as a CPU ``Linear`` on 1 to 3 rows) one mask a run, the
    naive loop's shape. The check costs a run of the masks of one chunk, and eight masks run alone, per
    batch size and run size;
  * the masked replicas are bit copies of the layer output, the fill being the same value cast to the
    activation dtype; replicas keep the layer output's memory format, so the same kernels run; a
    layer output that is neither contiguous nor channels_last (a permuted conv(x).transpose(2, 3)) is
    masked as the naive hook masks it, in a clone with its strides, one mask a run;
  * the general path batches M masks, i.e. M*B rows instead of B. Where the rest of the forward is
    batch-size invariant (as torch's CPU convolutions, pooling and norms are on the test models; a
    CPU ``Linear`` on 1 to 3 rows is not) the counts are exact by construction. Otherwise rows can
    round differently, which can only flip an argmax whose top-2 logit gap is at rounding level; so
    every replica whose gap is within ``verify`` (relative to its largest logit; default 1e-4 for
    float32, 1e-10 for float64, off for float16/bfloat16) is recomputed at the naive shape, and its
    mask's predictions for that batch are the naive loop's own. Counts are exact unless batch-size
    dependent rounding moves a logit gap by more than that margin;
  * the read-out path is exact whenever the bound holds: a certified class is the argmax of every
    logit vector within the error bound of a float32 (or the dtype's) matmul of any summation order,
    with products rounded once (float32 ``highest`` precision; TF32 / bf16 matmul modes and half
    dtypes widen the bound, assuming float32 accumulation); every other (unit, batch) is recomputed
    at the naive shape.
Predicted class = ``argmax`` of the logits, the lowest index on ties (as ``torch.argmax``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import ops
from .background import reading
from .graph_split import SplitModel, incoming_weight_l1, logits_element, readout_rank_problem, split_model
from .hooks import LayerCapture, resolve_layers
from .indexing import _base_dataset
from .ops.reference import replica_memory_format
from .prepare import (check_label_range, check_pixel_batch, check_preprocess, dataset_length, eval_on_device,
                      first_line, image_loader, pixel_space, positive_int, restores_modes, split_batch)

__all__ = ["AblationResult", "ablation_drops", "ablation_correlations", "naive_ablation_counts",
           "CORRELATION_ATTRIBUTES"]

# Attribute columns of the neuron table correlated with the drops (SPEC.md section 6), when present.
CORRELATION_ATTRIBUTES = ("class_selectivity", "class_selectivity_morcos", "color_selectivity", "mean_activation")
_VERIFY_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
_REDUCED_FP32_RTOL = 2.0 ** -8  # float32 convolutions / matmuls with TF32 (10-bit) or bfloat16 operands


def _setting(read):
    """``read()``, or None where this torch lacks the setting or refuses to read it (torch raises on a
    legacy getter once the new fp32_precision settings were used, and the other way round)."""
    try:
        return read()
    except (AttributeError, RuntimeError):
        return None


def _new_fp32_precision(backend: str, op: str):
    """torch >= 2.9's fp32_precision for ``op`` ("conv", "matmul") of ``backend`` ("mkldnn", "cuda",
    "cudnn"): the first set of the op's, the backend's and the global one ("none" defers upwards)."""
    for read in (lambda: getattr(getattr(torch.backends, backend), op).fp32_precision,
                 lambda: getattr(torch.backends, backend).fp32_precision, lambda: torch.backends.fp32_precision):
        value = _setting(read)
        if value is not None and str(value).lower() != "none":
            return str(value).lower()
    return None


def reduced_float32_precisions(device_type: str, ops=("conv", "matmul")) -> set:
    """Which reduced precisions ("tf32", "bf16") torch may give the operands of float32 ``ops`` on
    ``device_type``, from its settings old and new, each read apart: torch refuses a legacy getter
    once the new fp32_precision settings were used (an error about a "mix of the legacy and new
    APIs"), and reading the new ones needs no legacy getter."""
    found = set()
    legacy = _setting(torch.get_float32_matmul_precision)  # matmuls of every device
    if "matmul" in ops and legacy in ("high", "medium"):
        found.add("tf32" if legacy == "high" else "bf16")
    backends = {"cuda": {"conv": "cudnn", "matmul": "cuda"}}.get(device_type, {"conv": "mkldnn", "matmul": "mkldnn"})
    for op in ops:
        mode = _new_fp32_precision(backends[op], op)
        if mode in ("tf32", "bf16"):
            found.add(mode)
    if device_type == "cuda":
        if "conv" in ops and _setting(lambda: bool(torch.backends.cudnn.allow_tf32)):
            found.add("tf32")
        if "matmul" in ops and _setting(lambda: bool(torch.backends.cuda.matmul.allow_tf32)):
            found.add("tf32")
    return found


def verify_rtol(dtype: torch.dtype, device_type: str) -> float | None:
    """How close a replica's top-2 logits may come before the general path re-checks it the naive way.
    A batch of replicas and the naive loop's batch may run different kernels (cuDNN picks by batch
    size); in float32 they agree to ~1e-6 relative, but where torch lets float32 convolutions or matmuls
    round their operands to TF32 (CUDA's default for cuDNN convolutions) or bfloat16, to ~1e-3: the
    margin widens to 2^-8 there."""
    rtol = _VERIFY_RTOL.get(dtype)
    if dtype != torch.float32:
        return rtol
    return _REDUCED_FP32_RTOL if reduced_float32_precisions(device_type) else rtol


# ------------------------------------------------------------------------------------------ result

@dataclass
class AblationResult:
    """Counts of one ablation run; every rate is derived from them.

    ``masks`` [S, C] bool (the ablated sets), ``units`` [S] int64 (the unit of a one-unit set, else -1),
    ``correct`` [S, K] int64 (images of class k still classified correctly under set s),
    ``intact_correct`` [K] int64, ``class_counts`` [K] int64 (images per class), ``class_names``
    (from ``dataset.classes``), ``fill`` [C] float64 (the values of ``mode="mean"``; None for zero),
    ``weight_l1`` [C] float64 (L1 norm of each unit's incoming weights; NaN where no single conv or
    linear layer produces the unit), ``stats`` (path, masks per batch, recomputations).
    """

    layer: str
    mode: str
    masks: torch.Tensor
    units: torch.Tensor
    correct: torch.Tensor
    intact_correct: torch.Tensor
    class_counts: torch.Tensor
    class_names: list[str] | None = None
    fill: torch.Tensor | None = None
    weight_l1: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.class_counts.sum())

    @property
    def num_units(self) -> int:
        return self.masks.shape[1]

    def _rate(self, counts: torch.Tensor) -> torch.Tensor:
        n = self.class_counts.double()
        return torch.where(n > 0, counts.double() / n.clamp(min=1), torch.full_like(n, float("nan")))

    @property
    def intact_accuracy(self) -> torch.Tensor:
        """[K] float64: top-1 recall per class, intact (NaN for classes without images)."""
        return self._rate(self.intact_correct)

    @property
    def accuracy(self) -> torch.Tensor:
        """[S, K] float64: top-1 recall per class under each ablated set."""
        return self._rate(self.correct)

    @property
    def drop(self) -> torch.Tensor:
        """[S, K] float64: d_k = acc_k(intact) - acc_k(ablated), as (intact_correct_k - correct_k) / count_k:
        one rounding, so that equal drops are equal numbers (a difference of two rounded rates made 1/3 of
        one class and 1/3 of another differ in the last bit, and ``max_drop_class`` named one of them)."""
        return self._rate(self.intact_correct[None, :] - self.correct)

    @property
    def overall_intact_accuracy(self) -> float:
        return float(self.intact_correct.sum()) / max(1, self.num_images)

    @property
    def overall_accuracy(self) -> torch.Tensor:
        """[S] float64: top-1 accuracy over all images under each ablated set."""
        return self.correct.sum(dim=1).double() / max(1, self.num_images)

    @property
    def overall_drop(self) -> torch.Tensor:
        """[S] float64: overall accuracy drop, from the difference of the counts (one rounding, as ``drop``)."""
        return (self.intact_correct.sum() - self.correct.sum(dim=1)).double() / max(1, self.num_images)

    @property
    def max_drop_class(self) -> torch.Tensor:
        """[S] int64: the class of the largest per-class drop; -1 where several classes share it (no one
        class: most often a unit whose ablation changes nothing, every class at 0, where naming the lowest
        class made up an answer) or no class has images."""
        d = self.drop
        filled = torch.where(torch.isnan(d), torch.full_like(d, float("-inf")), d)
        best = filled.argmax(dim=1)
        shared = (filled == filled.max(dim=1, keepdim=True).values).sum(dim=1) > 1
        return torch.where(torch.isnan(d).all(dim=1) | shared, torch.full_like(best, -1), best)

    @property
    def max_drop(self) -> torch.Tensor:
        """[S] float64: max_k d_k over the classes with images (NaN if none has)."""
        d = self.drop
        largest = torch.where(torch.isnan(d), torch.full_like(d, float("-inf")), d).max(dim=1).values
        return torch.where(torch.isnan(d).all(dim=1), torch.full_like(largest, float("nan")), largest)

    def class_name(self, k: int) -> str:
        if k < 0:
            return ""
        return self.class_names[k] if self.class_names is not None else str(k)

    def to_frame(self, per_class: bool = False):
        """pandas DataFrame, one row per ablated set: layer, unit (-1 for a group), units, overall_drop,
        max_class_drop, max_drop_class, max_drop_class_name, accuracy, intact_accuracy, weight_l1
        (one-unit sets); ``per_class=True`` adds one ``drop[<class>]`` column per class. Join it with the
        neuron table on (layer, unit)."""
        import pandas as pd

        units = self.units.tolist()
        cls = self.max_drop_class.tolist()
        l1 = self.weight_l1 if self.weight_l1 is not None else torch.full((self.num_units,), float("nan"))
        data = {
            "layer": [self.layer] * len(units),
            "unit": units,
            "units": [",".join(str(int(c)) for c in row.nonzero().flatten()) for row in self.masks],
            "overall_drop": self.overall_drop.tolist(),
            "max_class_drop": self.max_drop.tolist(),
            "max_drop_class": cls,
            "max_drop_class_name": [self.class_name(k) for k in cls],
            "accuracy": self.overall_accuracy.tolist(),
            "intact_accuracy": [self.overall_intact_accuracy] * len(units),
            "weight_l1": [float(l1[u]) if u >= 0 else float("nan") for u in units],
        }
        if per_class:
            drop = self.drop
            for k in range(drop.shape[1]):
                data[f"drop[{self.class_name(k)}]"] = drop[:, k].tolist()
        return pd.DataFrame(data)

    def __repr__(self) -> str:
        return (f"AblationResult(layer={self.layer!r}, mode={self.mode!r}, sets={self.masks.shape[0]}, "
                f"units={self.num_units}, classes={self.class_counts.numel()}, images={self.num_images}, "
                f"path={self.stats.get('path')!r})")


# ------------------------------------------------------------------------------------------ helpers

def _images_labels(batch, need_labels: bool = True):
    images, labels = split_batch(batch)
    if labels is None and need_labels:
        raise ValueError("ablation needs labels: the dataset must yield (image, label) pairs, since the drops "
                         "are per-class accuracies; it yields images only")
    return images, labels


def _logits(out) -> torch.Tensor:
    if isinstance(out, (tuple, list, dict)):
        out = logits_element(out)  # the element the traced rest of the forward computes
    elif not isinstance(out, torch.Tensor) and isinstance(getattr(out, "logits", None), torch.Tensor):
        out = out.logits
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise TypeError(f"the model must return class scores [B, K] (a tensor, or a tuple / dict / object whose "
                        f"first element / 'logits' is one); got {type(out).__name__} "
                        f"{tuple(getattr(out, 'shape', ()))}")
    return out


def _logit_difference(a: torch.Tensor, b: torch.Tensor, exact: bool) -> float | None:
    """The largest |a - b| when a and b are not the same logits, else None. ``exact`` (CPU, where a
    computation repeated on the same shapes is deterministic): any difference counts. Otherwise (a GPU:
    the kernels may differ with cuDNN's autotuner) a few float32 rounding steps at b's scale are
    allowed, whatever the dtype: bfloat16 logits that differ at all differ by more (a tolerance in
    rounding steps of b's dtype let wrong graphs and batch mixing through in bfloat16). Equal entries,
    infinities and NaN included, differ by 0."""
    if a.shape != b.shape:
        return float("inf")
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    gap = (a.double() - b.double()).abs().masked_fill(same, 0.0).nan_to_num(nan=float("inf"))
    difference = float(gap.max()) if gap.numel() else 0.0
    if exact:
        return None if difference == 0.0 else difference
    finite = b.double().abs().masked_fill(~torch.isfinite(b), 0.0)
    scale = float(finite.max()) if finite.numel() else 0.0
    return None if difference <= 4 * torch.finfo(torch.float32).eps * max(scale, 1.0) else difference


def _fresh(value):
    """A private copy for one suffix run (the suffix may write in place: ReLU(inplace=True), +=)."""
    return value.clone() if isinstance(value, torch.Tensor) else value


def _spread(n: int, count: int) -> list[int]:
    """Up to ``count`` distinct indices in [0, n), spread evenly from the first to the last."""
    return torch.linspace(0, n - 1, min(count, n)).round().long().unique().tolist()


def _masked_clone(output: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """The naive loop's ablation of a layer output: a clone (in its strides) whose channels under
    ``mask`` [C] hold ``fill`` [C] (in the output's dtype)."""
    out = output.clone()
    out[:, mask] = fill[mask].view((1, -1) + (1,) * (out.dim() - 2))
    return out


def _odd_layout(t: torch.Tensor) -> bool:
    """Whether a clone of t (the naive hook's copy) has other strides than masked replicas of t get."""
    return torch.empty_like(t).stride() != torch.empty_like(t, memory_format=replica_memory_format(t)).stride()


def _replicate(t: torch.Tensor, m: int) -> torch.Tensor:
    """[m * B, ...]: t repeated m times along the batch, mask-major, in t's memory format."""
    fmt = replica_memory_format(t)
    out = torch.empty((m * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=fmt)
    out.view((m,) + tuple(t.shape)).copy_(t.unsqueeze(0).expand((m,) + tuple(t.shape)))
    return out


def _near_tie(logits: torch.Tensor, rtol: float) -> torch.Tensor:
    """[N] bool: rows whose top-2 gap is within rtol of their largest |logit| (or not finite)."""
    if logits.shape[1] < 2:
        return ~torch.isfinite(logits).all(dim=1)
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    top = z.topk(2, dim=1).values
    gap = top[:, 0] - top[:, 1]
    scale = z.abs().amax(dim=1)
    return ~torch.isfinite(z).all(dim=1) | (gap <= rtol * scale)


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u) if n * u < 0.5 else float("inf")


def readout_error_bound(dtype: torch.dtype, num_terms: int) -> float:
    """Relative error bound (times sum |w_j x_j| + |b|) of a linear layer's output computed in ``dtype``
    by any summation order, as the read-out path assumes it (see the module docstring)."""
    u64 = 2.0 ** -53
    n = num_terms + 2
    if dtype == torch.float64:
        acc = _gamma(n, u64)
    elif dtype == torch.float32:
        acc = _gamma(n, 2.0 ** -24)
        # the read-out's matmul may run on either device's kernels: the widest of their settings
        modes = reduced_float32_precisions("cpu", ("matmul",)) | reduced_float32_precisions("cuda", ("matmul",))
        if "bf16" in modes:
            acc += 2 * 2.0 ** -8 + 2.0 ** -16  # operands rounded to bfloat16
        elif "tf32" in modes:
            acc += 2 * 2.0 ** -11 + 2.0 ** -22  # operands rounded to TF32
    else:
        unit = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}.get(dtype)
        if unit is None:
            raise TypeError(f"no error bound for a linear read-out in {dtype}")
        acc = _gamma(n, 2.0 ** -24) + 4 * unit  # float32 accumulation, a few roundings to the dtype
    return acc + 8 * _gamma(n + 4, u64)  # the float64 evaluation itself


def _layer_means(index, layer: str):
    if hasattr(index, "layers") and hasattr(index, "__getitem__"):
        try:
            index = index[layer]
        except KeyError:
            raise ValueError(f"index= has no layer {layer!r}; indexed layers: {list(index.layers)}") from None
    if not hasattr(index, "mean_activation"):
        raise TypeError(f"index= must be a NeuronIndex or LayerIndex, got {type(index).__name__}")
    if getattr(index, "name", layer) != layer:
        raise ValueError(f"index= is the LayerIndex of {index.name!r}, not of {layer!r}: pass the NeuronIndex, or "
                         f"its layer {layer!r}")
    return index.mean_activation()


# ------------------------------------------------------------------------------------------ engine

class _Engine:
    """One ablation run: the split model, the data and the per-batch paths."""

    def __init__(self, model, dataset, layer, preprocess, batch_size, device, backend, num_workers, progress):
        self.model, self.dataset, self.layer = model, dataset, layer
        self.preprocess, self.batch_size, self.backend = preprocess, batch_size, backend
        self.num_workers, self.progress = num_workers, progress
        self.device, self.param_dtype = eval_on_device(model, device)
        self.exact = self.device.type == "cpu"  # deterministic kernels: comparisons bit for bit
        self.split: SplitModel = split_model(model, layer)
        self.layer_module = resolve_layers(model, layer)[layer]
        self.stats = {"batches": 0, "verified_masks": 0, "readout_fallbacks": 0, "suffix_rows": 0}

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        check_pixel_batch(images, "ablation")
        x = pixel_space(images.to(self.device, non_blocking=True))
        if self.preprocess is not None:
            x = self.preprocess(x)
        return x.to(self.param_dtype)

    def batches(self, desc: str):
        loader = image_loader(self.dataset, self.batch_size, self.device, self.num_workers)
        with reading(loader) as batches:
            if not self.progress:
                for batch in batches:  # (not `yield from`: closing this would close the reader and wait)
                    yield batch
                return
            from tqdm.auto import tqdm

            with tqdm(total=len(loader), unit="batch", desc=desc) as bar:
                for batch in batches:
                    yield batch
                    bar.update(1)

    def probe(self):
        """The layer output of the first image alone: its shape and dtype, before any pass."""
        item = self.dataset[0]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"the dataset must yield image tensors [3, H, W] (or (image, label)); got "
                             f"{type(image).__name__}")
        x = self.inputs(image[None])
        with torch.no_grad():
            try:
                self.intact(x)
            except RuntimeError as exc:  # (torch's message named neither the images nor the fix)
                if "out of memory" in str(exc):
                    raise
                raise ValueError(f"the model's whole forward fails on the dataset's images, {tuple(image.shape)} "
                                 f"({type(exc).__name__}: {first_line(exc)}): ablation runs the whole model up to its "
                                 "logits, so give images of a size it takes (an index may have been made at a size "
                                 "only its layers take: the CLI's --size)") from exc
            _, cut, _ = self.checked_intact(x, [0])
        return cut

    def checked_intact(self, x, ids):
        """``intact`` of the batch ``x`` (its images' ids ``ids``), checked (``check_batch``) against the
        traced rest of the forward run on it: (logits, layer output, values from before the layer)."""
        logits, cut, live = self.intact(x)
        if cut.dim() not in (2, 4):
            raise ValueError(f"layer {self.layer!r} outputs shape {tuple(cut.shape)}: ablate a layer whose "
                             "output is [B, C, H, W] or [B, C]")
        traced = _logits(self.split.run_suffix(_fresh(cut), [_fresh(v) for v in live]))
        self.check_batch(cut, traced, logits, ids)
        return logits, cut, live

    def batches_exactly(self, cut, live, masks, fill, counts) -> bool:
        """Whether k masked replicas of this batch run together through the rest of the forward give
        what each gives alone (the naive loop's shape), for every k in ``counts``, compared bit for bit
        (on a GPU, to a few float32 rounding steps). Else the rest mixes the rows of its batch
        (F.batch_norm with training=True, z - z.mean(0), a branch on the whole batch's sum) or rounds
        differently with the number of rows (a CPU Linear on 1 to 3 rows), and masks run one at a time.
        The replicas are real: this batch's layer output under masks spread over the set (first, last,
        between), replica j with the batch's rows rotated by j, so that replicas differ even where the
        masked units equal the fill on every image (which would hide the mixing). Of a run of k, the
        first two, the last two and four between are also run alone (each alone run costs what the
        naive loop's rest does for one mask: all k of them made the check cost as much as the batch)."""
        m, b = max(counts), cut.shape[0]
        picks = _spread(masks.shape[0], m)
        picks += [picks[-1]] * (m - len(picks))
        alone = {}
        replicas = _replicate(cut, m)
        blocks = replicas.view((m,) + tuple(cut.shape))
        try:
            with torch.no_grad():
                for j, pick in enumerate(picks):
                    rotated = torch.empty_like(cut)
                    rotated.copy_(torch.roll(cut, j % max(b, 1), 0))
                    blocks[j].copy_(ops.mask_replicas(rotated, masks[pick:pick + 1], fill, backend=self.backend))
                for k in sorted(set(counts)):
                    if k < 2:
                        continue
                    together = _logits(self.split.run_suffix(replicas[:k * b].clone(), self.live_for(live, k)))
                    together = together.reshape((k, b) + tuple(together.shape[1:]))
                    for j in sorted({0, 1, k - 2, k - 1} | set(_spread(k, 6))):
                        if j not in alone:
                            alone[j] = _logits(self.split.run_suffix(blocks[j].clone(), [_fresh(v) for v in live]))
                        if _logit_difference(together[j], alone[j], self.exact) is not None:
                            return False
        except RuntimeError:  # e.g. a reshape to the batch size: the rest cannot take several masks
            return False
        return True

    def intact(self, x):
        """One batch, intact: ``model.forward``'s logits, the layer's output as that forward computed it
        (caught by a hook, as the naive loop's hook sees it; a copy: what follows may write into it),
        and the values the rest of the forward needs from before the layer (from the traced prefix:
        none in most nets, and then the forward is the only pass)."""
        caught = []

        def catch(_module, _inputs, output):
            caught.append(output.clone() if isinstance(output, torch.Tensor) else output)

        handle = self.layer_module.register_forward_hook(catch)
        try:
            logits = _logits(self.model(x.clone()))  # (a forward may write into its input: x.sub_(0.5))
        finally:
            handle.remove()
        if len(caught) != 1:
            raise RuntimeError(f"model.forward called layer {self.layer!r} {len(caught)} times, where its traced "
                               "forward calls it once: count with naive_ablation_counts")
        if not isinstance(caught[0], torch.Tensor):
            raise TypeError(f"layer {self.layer!r} returned {type(caught[0]).__name__}, not a tensor: ablate a module "
                            "whose output is a [B, C, H, W] or [B, C] tensor")
        live = self.split.run_prefix(x.clone())[1] if self.split.live_names else []
        return logits, caught[0], live

    def check_batch(self, cut, traced, direct, ids) -> None:
        """Every batch: no NaN in the layer's output or the model's, and the traced halves computing what
        model.forward computes on it, intact (torch.fx turns h += y into h = h + y: a saved alias of h no
        longer sees the change, on the images where y is not 0). Else the counts would be off, silently.
        (Bit equality on CPU; on a GPU a few float32 rounding steps: with cuDNN's autotuner the two runs
        may pick different kernels.)"""
        self.check_activation(cut, ids)
        if bool(torch.isnan(direct).any()):
            rows = torch.isnan(direct).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"the model's outputs hold NaN for image id(s) {[ids[r] for r in rows][:16]}: no class is "
                             "predicted there; check the model and inputs")
        difference = _logit_difference(traced, direct, self.exact)
        if difference is not None:
            raise ValueError(f"cannot ablate {type(self.model).__name__} at layer {self.layer!r}: its forward traced "
                             f"with torch.fx does not compute what model.forward does (max difference {difference:.3g} "
                             f"on intact image(s) among ids {ids[0]}-{ids[-1]}), "
                             "typically an in-place op whose result is not assigned (h.relu_(), F.relu(h, "
                             "inplace=True)) or h += y on a tensor saved under another name. Assign in-place "
                             "results (h = h.relu()), or count with naive_ablation_counts")

    def check_activation(self, cut, ids) -> None:
        """No NaN in the layer's output of the batch of images ``ids``: the error names the units and images."""
        if bool(torch.isnan(cut).any()):
            rows, units = torch.isnan(cut.reshape(cut.shape[0], cut.shape[1], -1)).any(dim=2).nonzero(as_tuple=True)
            raise ValueError(f"NaN activation in layer {self.layer!r}: unit(s) {sorted(set(units.tolist()))[:8]} on "
                             f"image id(s) {sorted({ids[r] for r in rows.tolist()})[:16]}; check the model and inputs")

    def check_ablated_logits(self, logits, masks, first_set: int, ids) -> None:
        """No NaN in the logits of the replicas of sets ``first_set``, ... (mask-major, ``len(ids)`` rows
        each): argmax would count NaN logits as a prediction of class 0. The error names the set, its
        units and the images."""
        self.refuse_nan(torch.isnan(logits).any(dim=1).view(-1, len(ids)), masks, first_set, ids)

    def refuse_nan(self, nan, masks, first_set: int, ids) -> None:
        """The error of check_ablated_logits where ``nan`` [sets, len(ids)] (sets ``first_set``, ...) holds
        a True: one host sync."""
        if not bool(nan.any()):
            return
        j = int(nan.any(dim=1).nonzero()[0])
        units = masks[first_set + j].nonzero().flatten().tolist()
        raise ValueError(f"the model's outputs hold NaN with unit(s) {units[:8]} of layer {self.layer!r} ablated (set "
                         f"{first_set + j}) for image id(s) {[ids[r] for r in nan[j].nonzero().flatten().tolist()][:16]}: "
                         "no class is predicted there (the intact outputs are finite); the forward after the layer "
                         "cannot take those units at the fill (e.g. it divides by their sum), so ablate other sets "
                         "or fix the model")

    def check_ablated(self, x, masks, fill, ids) -> None:
        """First batch: the traced rest of the forward under ablation against the naive loop's own
        forward (model.forward, the layer's output replaced by a hook), for up to 8 masks spread over
        the set (first, last, between), on the batch's first 8 images. The intact check cannot see a traced
        graph that differs only under ablation (h += g with g = 0 on intact images). Costs up to 8 full
        forwards of 8 images (of the whole batch, they were a third of the run on 64 images). Both sides
        start from one forward of those 8 images alone: the layer output the hook sees there (a slice of
        the whole batch's output may round otherwise: a convolution's kernel depends on the batch size)."""
        n = min(8, x.shape[0])
        x, ids = x[:n], ids[:n]
        live = self.split.run_prefix(x.clone())[1] if self.split.live_names else []
        for pick in _spread(masks.shape[0], 8):
            mask, caught = masks[pick], []

            def ablate(_module, _inputs, output):
                caught.append(output.clone())
                return _masked_clone(output, mask, fill)

            handle = self.layer_module.register_forward_hook(ablate)
            try:
                direct = _logits(self.model(x.clone()))
            finally:
                handle.remove()
            traced = _logits(self.split.run_suffix(self.replica(caught[0], mask, fill), [_fresh(v) for v in live]))
            difference = _logit_difference(traced, direct, self.exact)
            if difference is not None:
                units = mask.nonzero().flatten().tolist()
                raise ValueError(
                    f"cannot ablate {type(self.model).__name__} at layer {self.layer!r}: under ablation (set {pick}, "
                    f"unit(s) {units[:8]}) its forward traced with torch.fx does not compute what model.forward "
                    f"does (max difference {difference:.3g} on image(s) among ids {ids[0]}-{ids[-1]}), typically "
                    "h += y on a tensor saved under another name, with y = 0 on intact images. Assign in-place "
                    "results (h = h + y), or count with naive_ablation_counts (one full forward per set)")

    def live_for(self, live, m: int) -> list:
        """The values from before the layer for a run of ``m`` masked replicas: those computed from the
        input repeated m times along the batch, as the replicas are; the others (constants) as they are."""
        return [_replicate(v, m) if batched else _fresh(v) for v, batched in zip(live, self.split.batched)]

    def replica(self, cut, mask_row, fill):
        """The layer output of this batch with one mask applied, as the naive loop's hook writes it: in
        its strides (a clone), where mask_replicas' memory format (contiguous or channels_last) is not
        the clone's (a permuted layer output, conv(x).transpose(2, 3): reductions would add in another
        order)."""
        if _odd_layout(cut):
            return _masked_clone(cut, mask_row, fill)
        return ops.mask_replicas(cut, mask_row[None], fill, backend=self.backend)

    def dataset_means(self) -> torch.Tensor:
        """m_c: mean over images of each unit's spatial mean (float64), from the layer output that
        model.forward computes (a hook, the forward stopped there), as the naive loop's hook sees it: the
        traced prefix may compute something else (an aliased h += y before the layer)."""
        total, count = None, 0
        with torch.no_grad(), LayerCapture(self.model, self.layer) as capture:
            for batch in self.batches("ablation: unit means"):
                images = batch[0] if isinstance(batch, (list, tuple)) else batch
                cut = capture.run(self.inputs(images))[self.layer]
                self.check_activation(cut, list(range(count, count + cut.shape[0])))
                means = cut.double().mean(dim=(2, 3)) if cut.dim() == 4 else cut.double()
                total = means.sum(dim=0) if total is None else total + means.sum(dim=0)
                count += cut.shape[0]
        return (total / count).cpu()

    # --- per batch -----------------------------------------------------------------------------------
    def naive_shape(self, cut, live, masks, s: int, fill, ids):
        """Predictions of mask ``s`` on this batch (images ``ids``), computed at the naive loop's shape [B]."""
        replica = self.replica(cut, masks[s], fill)
        self.stats["suffix_rows"] += cut.shape[0]
        logits = _logits(self.split.run_suffix(replica, [_fresh(v) for v in live]))
        self.check_ablated_logits(logits, masks, s, ids)
        return logits.argmax(dim=1)

    def general(self, cut, live, masks, fill, per_call: int, rtol, ids):
        s, b = masks.shape[0], cut.shape[0]
        pred = torch.empty((s, b), dtype=torch.int64, device=cut.device)
        nan = torch.zeros((s, b), dtype=torch.bool, device=cut.device)  # checked once, after the loop (one sync)
        for s0 in range(0, s, per_call):
            chunk = masks[s0:s0 + per_call]
            m = chunk.shape[0]
            replicas = (self.replica(cut, chunk[0], fill) if m == 1
                        else ops.mask_replicas(cut, chunk, fill, backend=self.backend))
            logits = _logits(self.split.run_suffix(replicas, self.live_for(live, m)))
            if logits.shape[0] != m * b:
                raise RuntimeError(f"the forward after layer {self.layer!r} returned {logits.shape[0]} rows for "
                                   f"{m * b} masked replicas: it mixes images of a batch, so it cannot be ablated "
                                   "in batches (use masks_per_batch=1)")
            self.stats["suffix_rows"] += m * b
            nan[s0:s0 + m] = torch.isnan(logits).any(dim=1).view(m, b)
            p = logits.argmax(dim=1).view(m, b)
            if rtol is not None and m > 1:
                for j in _near_tie(logits, rtol).view(m, b).any(dim=1).nonzero().flatten().tolist():
                    p[j] = self.naive_shape(cut, live, masks, s0 + j, fill, ids)
                    self.stats["verified_masks"] += 1
            pred[s0:s0 + m] = p
        self.refuse_nan(nan, masks, 0, ids)
        return pred

    def readout(self, cut, live, masks, unit_ids, fill, plan_state, ids):
        plan = self.split.readout
        weight64, bias64, ablated64, err_rel = plan_state
        p = plan.pre(_fresh(cut))
        if p.dim() != 2 or tuple(p.shape) != (cut.shape[0], cut.shape[1]):
            raise RuntimeError(f"the read-out chain after layer {self.layer!r} ({plan.description}) gave shape "
                               f"{tuple(p.shape)} instead of {(cut.shape[0], cut.shape[1])}; use path='general'")
        f64 = p.double()
        logits64 = f64 @ weight64.t() + bias64
        scale64 = f64.abs() @ weight64.abs().t() + bias64.abs()
        pred = ops.readout_ablation_argmax(logits64, f64, weight64, ablated64, unit_ids, scale64, err_rel,
                                           backend=self.backend)
        for j in (pred < 0).any(dim=1).nonzero().flatten().tolist():
            pred[j] = self.naive_shape(cut, live, masks, j, fill, ids)
            self.stats["readout_fallbacks"] += 1
        return pred


def _build_masks(units, masks, channels: int, layer: str, device) -> torch.Tensor:
    if units is not None and masks is not None:
        raise ValueError("give units= (one unit per ablation) or masks= (sets of units), not both")
    if masks is not None:
        masks = torch.as_tensor(masks)
        if masks.dtype != torch.bool:
            raise TypeError(f"masks must be a bool tensor [S, {channels}] (True: ablate the unit), got {masks.dtype}")
        if masks.dim() != 2 or masks.shape[1] != channels or masks.shape[0] == 0:
            raise ValueError(f"masks must have shape [S, {channels}] with S >= 1 (layer {layer!r} has {channels} "
                             f"units), got {tuple(masks.shape)}")
        return masks.to(device)
    if units is None:
        return torch.eye(channels, dtype=torch.bool, device=device)
    try:
        ids = torch.as_tensor(units).reshape(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # strings, ints past int64
        raise TypeError(f"units must be integer unit indices, got {str(units)[:80]}") from None
    if ids.numel() == 0:
        raise ValueError("units= is empty: give at least one unit index, or None for every unit")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"units must be integer unit indices, got {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= channels)]
    if bad.numel():
        raise IndexError(f"unit {int(bad[0])} out of range: layer {layer!r} has {channels} units (0 .. {channels - 1})")
    out = torch.zeros((ids.numel(), channels), dtype=torch.bool, device=device)
    out[torch.arange(ids.numel(), device=device), ids.to(device)] = True
    return out


@restores_modes
def ablation_drops(model: nn.Module, dataset, layer: str, units=None, masks=None, mode: str = "zero",
                   preprocess=None, masks_per_batch: int | None = None, batch_size: int = 64, device=None,
                   backend: str | None = "auto", progress: bool = True, *, means=None, index=None,
                   path: str = "auto", verify="auto", num_workers: int = 0) -> AblationResult:
    """Per-unit (or per-set), per-class accuracy drops of ``model`` when units of ``layer`` are ablated.

    ``dataset``: map-style, yielding (pixel-space image [3, H, W], label) pairs; ``preprocess`` runs on
    the device before the model. ``units``: unit indices, one ablation each (default: every unit of the
    layer); or ``masks`` [S, C] bool: arbitrary sets. ``mode``: "zero" (F_c = 0) or "mean" (F_c = m_c,
    the unit's dataset mean: from ``means`` [C], else ``index`` (a NeuronIndex / LayerIndex:
    ``mean_activation``), else a prefix-only pass over ``dataset``). ``masks_per_batch``: masks per run
    of the rest of the forward ([masks_per_batch * B] replicas; default: as many as fit a memory budget).
    ``path``: "auto" (the read-out path where it applies), "general" or "readout". ``verify``: the
    relative top-2 logit gap under which a batched replica is recomputed at the naive loop's shape
    ("auto": by dtype, see the module docstring; None: never). ``backend`` picks the kernels.
    The model runs in eval mode (and is moved to ``device``); every module has its own mode back after.
    The counts equal those of ``naive_ablation_counts`` (one full forward per set); see the module
    docstring for what that rests on.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str), got {type(layer).__name__}")
    resolve_layers(model, layer)
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean' (SPEC.md section 6), got {mode!r}")
    if mode == "zero" and (means is not None or index is not None):
        raise ValueError("means= and index= give the fill of mode='mean'; they do not apply to mode='zero'")
    if means is not None and index is not None:
        raise ValueError("give means= or index= (two sources of the fill of mode='mean'), not both")
    if path not in ("auto", "general", "readout"):
        raise ValueError(f"path must be 'auto', 'general' or 'readout', got {path!r}")
    batch_size = positive_int("batch_size", batch_size)
    check_preprocess(preprocess)
    masks_per_batch = positive_int("masks_per_batch", masks_per_batch, none_means="as many as fit a memory budget")
    verify_off = verify is None or verify is False
    if not (verify_off or (isinstance(verify, str) and verify == "auto")
            or (isinstance(verify, (int, float)) and not isinstance(verify, bool) and verify >= 0)):
        raise ValueError(f"verify must be 'auto', None or a relative gap >= 0, got {verify!r}")
    dataset_length(dataset, "measure")
    first = dataset[0]
    if not (isinstance(first, (tuple, list)) and len(first) >= 2):
        raise ValueError("ablation needs labels: the dataset must yield (image, label) pairs, since the drops are "
                         f"per-class accuracies; it yields {type(first).__name__}")

    engine = _Engine(model, dataset, layer, preprocess, batch_size, device, backend, num_workers, progress)
    probe = engine.probe()
    channels, act_dtype = probe.shape[1], probe.dtype
    if engine.split.readout is not None:  # (pooling is per channel at some input ranks only: known now)
        problem = readout_rank_problem(engine.split.readout, probe)
        if problem:
            engine.split.readout, engine.split.readout_reason = None, problem
    masks = _build_masks(units, masks, channels, layer, engine.device)
    sizes = masks.sum(dim=1)
    unit_of = torch.where(sizes == 1, masks.to(torch.int64).argmax(dim=1), torch.full_like(sizes, -1))

    fill64 = None
    if mode == "mean":
        if means is not None:
            try:
                fill64 = torch.as_tensor(means, dtype=torch.float64).reshape(-1).cpu()
            except (TypeError, ValueError, RuntimeError):  # (torch said "too many dimensions 'str'")
                raise TypeError(f"means= must be numbers, one mean per unit ([C] floats), got "
                                f"{str(means)[:80]}") from None
        elif index is not None:
            fill64 = torch.as_tensor(_layer_means(index, layer), dtype=torch.float64).reshape(-1).cpu()
        else:
            fill64 = engine.dataset_means()
        if fill64.numel() != channels:
            raise ValueError(f"mode='mean' needs one mean per unit: layer {layer!r} has {channels} units, got "
                             f"{fill64.numel()} means")
        used = masks.any(dim=0).cpu()
        missing = (~torch.isfinite(fill64) & used).nonzero().flatten()
        if missing.numel():
            raise ValueError(f"units {missing[:10].tolist()} of layer {layer!r} have no finite mean "
                             f"({fill64[missing[:10]].tolist()}: their activations hold +-inf, or the means given "
                             "are not finite); mode='mean' cannot ablate them: use mode='zero' or give finite means=")
    fill64_or_zero = fill64 if fill64 is not None else torch.zeros(channels, dtype=torch.float64)
    fill = fill64_or_zero.to(act_dtype).to(engine.device)  # the value the naive hook writes, in the activation dtype

    # A BatchNorm without running statistics normalises with the statistics of its batch, even in eval
    # mode: replicas of several masks in one batch would mix, and a read-out is no longer per channel.
    batch_statistics = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
                           for m in model.modules())
    readout_ok = engine.split.readout is not None and bool((sizes == 1).all()) and not batch_statistics
    if path == "readout" and not readout_ok:
        why = engine.split.readout_reason or "some masks ablate several units at once"
        raise ValueError(f"path='readout' does not apply to layer {layer!r}: {why}; use path='auto' or 'general'")
    use_readout = readout_ok and path != "general"
    rtol = None if verify_off else (verify_rtol(act_dtype, engine.device.type) if isinstance(verify, str)
                                    else float(verify))

    s = masks.shape[0]
    per_call = masks_per_batch
    if per_call is None:
        budget = (1 << 30) if engine.device.type == "cuda" else (32 << 20)
        per_replica_set = probe[0].numel() * probe.element_size() * batch_size
        per_call = max(1, min(s, budget // max(1, per_replica_set)))
    per_call = 1 if batch_statistics else min(per_call, s)
    # masks per run for each batch size: several only where that is shown exact on the first batch of
    # that size (checked at the run sizes used: full chunks and the last one), else one, as the naive loop
    per_call_of: dict[int, int] = {}
    chunk_sizes = {per_call, s % per_call or per_call}

    plan_state = None
    if use_readout:
        plan = engine.split.readout
        weight64 = plan.weight.to(engine.device).double()
        bias64 = (plan.bias.to(engine.device).double() if plan.bias is not None
                  else torch.zeros(weight64.shape[0], dtype=torch.float64, device=engine.device))
        if weight64.shape[1] != channels:
            use_readout = False
        else:
            with torch.no_grad():
                fill_map = ops.mask_replicas(probe, torch.ones((1, channels), dtype=torch.bool, device=probe.device),
                                             fill.to(probe.device), backend=backend)
                ablated64 = plan.pre(fill_map).reshape(-1).double()
            hw = probe[0, 0].numel()
            err_rel = readout_error_bound(plan.weight.dtype, channels + 2 * hw)
            plan_state = (weight64, bias64, ablated64.to(engine.device), err_rel)
    unit_ids = unit_of.clamp(min=0)

    correct = intact = counts = None
    first_id = 0
    with torch.no_grad():
        for batch in engine.batches(f"ablation {layer}"):
            images, labels = _images_labels(batch)
            labels = labels.to(engine.device)
            # the intact predictions are the model's own (those of the naive loop), and the traced rest of
            # the forward is checked against them on every batch
            x, ids = engine.inputs(images), list(range(first_id, first_id + images.shape[0]))
            logits, cut, live = engine.checked_intact(x, ids)
            if first_id == 0:
                engine.check_ablated(x, masks, fill, ids)
            first_id += images.shape[0]
            classes = logits.shape[1]
            if correct is None:
                correct = torch.zeros((s, classes), dtype=torch.int64, device=engine.device)
                intact = torch.zeros(classes, dtype=torch.int64, device=engine.device)
                counts = torch.zeros(classes, dtype=torch.int64, device=engine.device)
            check_label_range(labels, classes)
            counts.index_add_(0, labels, torch.ones_like(labels))
            intact.index_add_(0, labels, (logits.argmax(dim=1) == labels).to(torch.int64))
            if use_readout:
                pred = engine.readout(cut, live, masks, unit_ids, fill, plan_state, ids)
            else:
                rows = cut.shape[0]
                if rows not in per_call_of:
                    per_call_of[rows] = (per_call if per_call > 1 and not _odd_layout(cut)
                                         and engine.batches_exactly(cut, live, masks, fill, chunk_sizes) else 1)
                pred = engine.general(cut, live, masks, fill, per_call_of[rows], rtol, ids)
            correct.index_add_(1, labels, (pred == labels[None, :]).to(torch.int64))
            engine.stats["batches"] += 1

    names = getattr(_base_dataset(dataset), "classes", None)  # (through Subsets, as indexing reads them)
    class_names = [str(c) for c in names] if isinstance(names, (list, tuple)) and len(names) == classes else None
    if isinstance(names, (list, tuple)) and len(names) != classes:
        warnings.warn(f"the dataset names {len(names)} classes but the model has {classes} outputs: a drop compares "
                      "output k with label k, which means something only when they are the same classes in the same "
                      "order; the classes are reported by number", stacklevel=2)
    stats = dict(engine.stats, path="readout" if use_readout else "general",
                 masks_per_batch=None if use_readout else min(per_call_of.values(), default=per_call),
                 verify_rtol=None if use_readout else rtol,
                 readout=engine.split.readout.description if use_readout else engine.split.readout_reason)
    return AblationResult(
        layer=layer, mode=mode, masks=masks.cpu(), units=unit_of.cpu(), correct=correct.cpu(),
        intact_correct=intact.cpu(), class_counts=counts.cpu(), class_names=class_names, fill=fill64,
        weight_l1=incoming_weight_l1(model, engine.split, channels), stats=stats)


# ------------------------------------------------------------------------------------------ naive loop

def _check_naive_logits(logits, layer: str, mask, first_id: int) -> None:
    """No NaN in the naive loop's logits (argmax would count them as class 0), as the engine checks."""
    nan = torch.isnan(logits).any(dim=1)
    if bool(nan.any()):
        ids = (nan.nonzero().flatten() + first_id).tolist()[:16]
        what = "intact" if mask is None else f"with unit(s) {mask.nonzero().flatten().tolist()[:8]} of layer {layer!r} ablated"
        raise ValueError(f"the model's outputs hold NaN {what} for image id(s) {ids}: no class is predicted there; "
                         "fix the model or the images")


@restores_modes
def naive_ablation_counts(model: nn.Module, dataset, layer: str, masks, fill=None, preprocess=None,
                          batch_size: int = 64, device=None, pass_times: list | None = None):
    """The slow oracle: one full pass over ``dataset`` per ablated set, each forward with a hook that
    replaces the layer output by a copy whose ablated channels hold ``fill`` ([C], cast to the output
    dtype; zeros by default). Returns ``(intact_correct [K], correct [S, K], class_counts [K])`` int64.
    ``pass_times``: a list that receives the seconds of each pass (the intact one first)."""
    module = resolve_layers(model, layer)[layer]
    masks = torch.as_tensor(masks)
    if masks.dtype != torch.bool:  # (a cast would make 0.5 an ablation)
        raise TypeError(f"masks must be a bool tensor [S, C] (True: ablate the unit), got {masks.dtype}")
    if masks.dim() != 2 or masks.shape[0] == 0:
        raise ValueError(f"masks must be a bool tensor [S, C] with S >= 1, got shape {tuple(masks.shape)}")
    device, param_dtype = eval_on_device(model, device)
    current: dict = {"mask": None}

    def hook(_module, _inputs, output):
        mask = current["mask"]
        if mask is None:
            return None
        channels = output.shape[1]
        values = torch.zeros(channels) if fill is None else torch.as_tensor(fill, dtype=torch.float64).reshape(-1)
        if mask.numel() != channels or values.numel() != channels:
            raise ValueError(f"layer {layer!r} has {channels} units: masks must be [S, {channels}] and fill "
                             f"[{channels}], got masks {tuple(masks.shape)} and fill [{values.numel()}]")
        return _masked_clone(output, mask, values.to(output.device, torch.float64).to(output.dtype))

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    results = []
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for s in [None] + list(range(masks.shape[0])):
                start = time.perf_counter()
                current["mask"] = None if s is None else masks[s].to(device)
                correct = counts = None
                seen = 0
                for batch in loader:
                    images, labels = _images_labels(batch)
                    labels = labels.to(device)
                    x = pixel_space(images.to(device))
                    if preprocess is not None:
                        x = preprocess(x)
                    logits = _logits(model(x.to(param_dtype)))
                    check_label_range(labels, logits.shape[1])
                    _check_naive_logits(logits, layer, None if s is None else masks[s], seen)
                    seen += logits.shape[0]
                    if correct is None:
                        correct = torch.zeros(logits.shape[1], dtype=torch.int64, device=device)
                        counts = torch.zeros_like(correct)
                    counts.index_add_(0, labels, torch.ones_like(labels))
                    correct.index_add_(0, labels, (logits.argmax(dim=1) == labels).to(torch.int64))
                if correct is None:  # (any dataset, iterable ones too: the loop saw no batch)
                    raise ValueError("the dataset is empty: nothing to measure")
                results.append(correct.cpu())
                if pass_times is not None:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    pass_times.append(time.perf_counter() - start)
    finally:
        handle.remove()
    return results[0], torch.stack(results[1:]), counts.cpu()


# ------------------------------------------------------------------------------------------ correlations

def _spearman(x, y) -> float:
    if len(x) < 3:
        return float("nan")
    rx, ry = x.rank(method="average"), y.rank(method="average")
    if rx.nunique() < 2 or ry.nunique() < 2:
        return float("nan")
    return float(rx.corr(ry))


def ablation_correlations(result: AblationResult, table=None):
    """Spearman correlations, across the units of ``result`` (one-unit ablations), of the largest
    per-class drop and of the overall drop with each unit attribute (SPEC.md section 6).

    Attributes: the columns of ``table`` (the neuron table: one row per (layer, unit)) among
    class_selectivity, class_selectivity_morcos, color_selectivity and mean_activation, plus the L1
    norm of the incoming weights from ``result``. Units with a NaN in the attribute are skipped (each
    attribute separately). Returns a DataFrame indexed by attribute with columns ``max_class_drop``,
    ``overall_drop`` (the correlations; NaN with fewer than 3 units or a constant column) and ``n``.
    """
    import pandas as pd

    frame = result.to_frame()
    frame = frame[frame["unit"] >= 0]
    if frame.empty:
        raise ValueError("ablation_correlations needs one-unit ablations (units=...); this result holds only "
                         "sets of several units")
    repeated = sorted(set(frame.loc[frame["unit"].duplicated(), "unit"].tolist()))
    if repeated:  # each unit counts once in a correlation across units
        raise ValueError(f"the result ablates unit(s) {repeated[:10]} more than once: a correlation across units "
                         "counts each once; ablate distinct units")
    attributes = []
    if table is not None:
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"table must be a pandas DataFrame (the neuron table), got {type(table).__name__}")
        if "unit" not in table.columns:
            raise ValueError("table needs a 'unit' column (the neuron table has one row per (layer, unit))")
        rows = table[table["layer"] == result.layer] if "layer" in table.columns else table
        if rows.empty:
            raise ValueError(f"table has no rows for layer {result.layer!r}")
        if rows["unit"].duplicated().any():
            raise ValueError(f"table has several rows for some units of layer {result.layer!r}")
        attributes = [a for a in CORRELATION_ATTRIBUTES if a in rows.columns]
        frame = frame.merge(rows[["unit"] + attributes], on="unit", how="left")
    attributes.append("weight_l1")
    out = []
    for attribute in attributes:
        data = frame[[attribute, "max_class_drop", "overall_drop"]].apply(pd.to_numeric, errors="coerce").dropna()
        out.append({"attribute": attribute,
                    "max_class_drop": _spearman(data[attribute], data["max_class_drop"]),
                    "overall_drop": _spearman(data[attribute], data["overall_drop"]),
                    "n": len(data)})
    return pd.DataFrame(out).set_index("attribute")
