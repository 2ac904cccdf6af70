"""Class selectivity of every unit of an indexed layer (SPEC.md section 5).

- ``class_selectivity``: Rafegas et al.'s gamma, from the classes of each unit's top-K images (5.1).
- ``class_selectivity_morcos``: Morcos et al.'s index, from the class-conditional means of the whole
  dataset that the index recorded (5.2).

Dead units (SPEC.md section 3: best activation <= 0, or no image seen) get NaN, never a silent 0.

Gamma needs the label of every top image: an index built from a labelled dataset records them
(``NeuronIndex.labels``); otherwise (an index saved by an older version, a hand-built one) pass
``labels=`` (the dataset's labels as an int tensor [N], or the dataset itself).
"""

from __future__ import annotations

import math
import numbers
import numpy as np
import torch

from .neuron_index import LayerIndex, NeuronIndex

__all__ = ["class_selectivity", "class_selectivity_morcos", "top_image_labels", "gamma_floor"]

# Relative slack when comparing a cumulative class share with tau < 1: float64 sums of <= K shares may
# land a few ulps under a share they reach exactly.
_TAU_SLACK = 1e-9


def _layer(index, layer) -> LayerIndex:
    if isinstance(index, LayerIndex):
        if layer is not None and layer != index.name:
            raise ValueError(f"got the LayerIndex of {index.name!r} but layer={layer!r}")
        return index
    if not isinstance(index, NeuronIndex):
        raise TypeError(f"index must be a NeuronIndex (or a LayerIndex), got {type(index).__name__}")
    if layer is None:
        raise ValueError(f"name the layer: one of {list(index.layers)}")
    return index[layer]


def _as_label_tensor(labels) -> torch.Tensor | None:
    """Labels given directly (tensor, numpy array, list/tuple of ints) as an int64 tensor, else None."""
    if isinstance(labels, torch.Tensor):
        t = labels
    elif isinstance(labels, np.ndarray):
        t = torch.from_numpy(labels)
    elif isinstance(labels, (list, tuple)):
        if labels and all(isinstance(v, (tuple, list)) for v in labels):
            return None  # a dataset as a list of (image, label) items
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in labels):
            raise ValueError("labels given as a list must hold one int class index per dataset image")
        t = torch.tensor(list(labels), dtype=torch.int64)
    else:
        return None
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor [N] (one class index per dataset image), got "
                         f"{tuple(t.shape)} {t.dtype}")
    return t.to(torch.int64).cpu()


def top_image_labels(index, layer=None, labels=None) -> torch.Tensor:
    """[C, K] int64: the class of every top image of every unit of ``layer`` (-1 in unused slots).

    ``labels``: a [N] int tensor / array / list (the label of every dataset image, N = the indexed
    dataset's length), or the dataset itself (read from its ``targets`` if it has them, else from the
    ``(image, label)`` items of only the top images). Without ``labels``, the labels the index recorded
    (``NeuronIndex.labels``, [N] ints) are used.
    """
    lay = _layer(index, layer)
    length = index.dataset_length if isinstance(index, NeuronIndex) else None
    if labels is None:
        labels = getattr(index, "labels", None)
    if labels is None:
        has = isinstance(index, NeuronIndex) and index.has_labels
        why = ("the index has class statistics but no record of each image's label (NeuronIndex.labels)" if has
               else "the index was built without labels (its dataset yielded images only)")
        raise ValueError(f"class selectivity (gamma) needs the label of every top image of layer {lay.name!r}, "
                         f"and {why}: pass labels= (a [N] int tensor of the dataset's labels, or the dataset "
                         "itself, whose .targets or (image, label) items give them)")
    valid = lay.ids >= 0
    ids = lay.ids[valid]
    direct = _as_label_tensor(labels)
    if direct is None and hasattr(labels, "targets") and labels.targets is not None:
        direct = _as_label_tensor(labels.targets if not isinstance(labels.targets, range) else list(labels.targets))
    if direct is not None:
        n = len(direct)
        if length is not None and n != length:
            raise ValueError(f"labels has {n} entries but the index was built over {length} images")
        if ids.numel() and int(ids.max()) >= n:
            raise ValueError(f"layer {lay.name!r} ranks image id {int(ids.max())} but labels has only {n} entries")
        found = direct[ids]
    elif hasattr(labels, "__getitem__") and hasattr(labels, "__len__") and not isinstance(labels, (str, bytes, dict)):
        if length is not None and len(labels) != length:
            raise ValueError(f"the dataset has {len(labels)} images but the index was built over {length}")
        unique = torch.unique(ids)
        table = {}
        for i in unique.tolist():
            item = labels[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ValueError("the dataset passed as labels= yields no (image, label) pairs and has no "
                                 "targets: pass the labels as a [N] int tensor")
            label = item[1]
            if isinstance(label, torch.Tensor) and label.numel() == 1:
                label = label.item()
            if isinstance(label, bool) or not isinstance(label, numbers.Integral):
                raise ValueError(f"dataset item {i} has label {label!r}: labels must be int class indices")
            table[i] = int(label)
        found = torch.tensor([table[i] for i in ids.tolist()], dtype=torch.int64)
    else:
        raise TypeError(f"labels must be a [N] int tensor / array / list or a dataset, got {type(labels).__name__}")
    if found.numel() and int(found.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(found.min())} for a top image")
    out = torch.full(lay.ids.shape, -1, dtype=torch.int64)
    out[valid] = found
    return out


def _topk_weights(lay: LayerIndex) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w [C, K] float64, valid [C, K] bool, dead [C] bool): weights a_1 times w_j = a_j / a_1 over the
    valid slots (``LayerIndex.live_slots``: images at a value above -inf, of live units): the shares f(k)
    are ratios of their sums, and sums of the float32 a_j themselves keep classes that tie exactly tied
    (a_j / a_1 rounds)."""
    dead = lay.dead()
    values = lay.values.to(torch.float64)
    valid = lay.live_slots()
    top = torch.where(dead, torch.ones_like(values[:, 0]), values[:, 0])
    # Negative activations (possible in layers without a ReLU) weigh 0, as a ReLU would make them: a
    # negative share would let cumulative shares pass tau and then fall back under it.
    w = values.clamp(min=0)
    # a_1 = +inf (an ordinary value, SPEC.md 1): the limit of a_j / a_1 is 1 for the other +inf, else 0
    infinite = torch.isinf(top)[:, None]
    w = torch.where(infinite, (values == top[:, None]).to(torch.float64), w)
    w = torch.where(valid, w, torch.zeros_like(values))
    return w, valid, dead


def gamma_floor(k: int, num_classes: int) -> float:
    """The least class selectivity gamma (SPEC.md 5.1) a unit with ``k`` top images can have when the
    dataset's images come from ``num_classes`` classes: M counts at most min(k, num_classes) classes, so
    gamma >= (k - min(k, num_classes)) / (k - 1). It is 0 with at least k classes; with fewer, every unit
    is that selective by construction (k = 20 top images of 10 classes: gamma >= 10 / 19 = 0.526), and a
    threshold for "class selective" only tells units apart above it. NaN for k < 2 (gamma undefined)."""
    k, num_classes = int(k), int(num_classes)
    if k < 2:
        return float("nan")
    return (k - min(k, max(num_classes, 1))) / (k - 1)


def class_selectivity(index, layer=None, tau: float = 1.0, labels=None, return_class: bool = False):
    """Rafegas et al.'s class selectivity gamma of every unit of ``layer`` (SPEC.md 5.1): [C] float64.

    With weights w_j = a_j / a_1 over the unit's valid top-K slots (slots holding an image at a value
    above -inf; fewer than K when fewer images were seen, or under nan="ignore" with all-NaN maps),
    f(k) = sum of w_j over the top images of class k / sum_j w_j, and M = the fewest classes whose
    cumulative f (classes sorted by f, largest first) reaches ``tau``;
    gamma = (K - M) / (K - 1) with K the number of valid slots. 1: every top image has one class; 0: all
    classes differ.

    - ``tau`` in (0, 1]. ``tau == 1`` is exact: M = the number of classes with a positive share (every
      class among the top images when all of them respond positively), whatever the float rounding of
      the cumulative sums. For ``tau < 1`` a share reaching tau within 1e-9 (relative) counts as reaching it.
    - Negative activations below a positive a_1 (layers without a ReLU) weigh 0, as after a ReLU; so do
      zero activations: a class present only through zero-weight images does not count in M.
    - A unit with a single valid slot (K == 1, or one image seen) has gamma undefined (0 / 0): NaN.
    - Dead units (a_1 <= 0 or no image seen): NaN.

    ``labels``: see ``top_image_labels`` (needed only when the index did not record its images' labels).
    ``return_class=True`` also returns the dominant class of each unit's top images (largest f; lowest
    class index on ties; -1 for dead units) as [C] int64.
    """
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < float(tau) <= 1:
        raise ValueError(f"tau must be a number in (0, 1], got {tau!r}")
    tau = float(tau)
    lay = _layer(index, layer)
    classes = top_image_labels(index, layer, labels)
    w, valid, dead = _topk_weights(lay)
    # f(k) over the classes present among the top images only (a label of 2^40 would otherwise ask for
    # a row of 2^40 shares per unit); `found` is sorted, so the lowest class still wins ties below.
    found, present = torch.unique(classes.clamp(min=0), return_inverse=True)  # invalid slots: weight 0, class 0
    found = found if found.numel() else torch.zeros(1, dtype=torch.int64)
    shares = torch.zeros(lay.num_units, found.numel(), dtype=torch.float64)
    shares.scatter_add_(1, present.reshape(classes.shape), w)
    positive = (shares > 0).sum(dim=1)
    if tau == 1.0:
        m = positive
    else:
        cumulative = shares.sort(dim=1, descending=True).values.cumsum(dim=1)
        target = tau * shares.sum(dim=1, keepdim=True) * (1 - _TAU_SLACK)
        m = torch.minimum((cumulative < target).sum(dim=1) + 1, positive)
    k = valid.sum(dim=1).to(torch.float64)
    gamma = (k - m.to(torch.float64)) / (k - 1)
    undefined = dead | (k < 2)
    gamma = torch.where(undefined, torch.full_like(gamma, float("nan")), gamma)
    if not return_class:
        return gamma
    dominant = found[shares.argmax(dim=1)]  # first maximum: the lowest class on ties
    return gamma, torch.where(dead, torch.full_like(dominant, -1), dominant)


def class_selectivity_morcos(index, layer=None, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Morcos et al.'s class selectivity index of every unit of ``layer`` (SPEC.md 5.2).

    From the class-conditional means mu_k of each unit's spatial mean (recorded by the index over the
    whole dataset): SI = (mu_max - mu_rest) / (mu_max + mu_rest + eps), mu_max = max_k mu_k, mu_rest = the
    mean of the other classes' mu_k; ``eps``, a finite number >= 0, keeps the denominator off 0. Classes
    with no image in the dataset (a class name with no item, or a label never used) have no mean and are
    left out of both mu_max and mu_rest. The index needs at least two classes with images. Values are
    reported as computed (units with negative means, in layers without a ReLU, can fall outside [0, 1]).

    Returns (si [C] float64, top_class [C] int64: the class of mu_max, lowest index on ties). Dead units
    (a_1 <= 0 or no image seen): NaN and -1; so are units with a NaN class mean (an image whose whole map
    was NaN, indexed with nan="ignore").
    """
    # a NaN eps would make every SI NaN, a negative one can take the denominator through 0 (SI's sign flips)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(float(eps)) or float(eps) < 0:
        raise ValueError(f"eps must be a finite number >= 0 (a small one keeps the denominator off 0), got {eps!r}")
    eps = float(eps)
    lay = _layer(index, layer)
    if lay.class_sum is None:
        raise ValueError(f"layer {lay.name!r} was indexed without labels: Morcos selectivity needs the class "
                         "means, so index a dataset that yields (image, label) pairs")
    means = lay.class_means()  # [num_classes, C], NaN rows for classes without images
    present = lay.class_count > 0
    n_present = int(present.sum())
    if n_present < 2:
        raise ValueError(f"layer {lay.name!r}: Morcos selectivity needs images of at least 2 classes, the index "
                         f"has {n_present}")
    means = means[present]  # [P, C]
    class_ids = torch.nonzero(present).flatten()
    first = means.argmax(dim=0)  # torch.argmax returns the first maximum: the lowest class on ties
    best = means.gather(0, first[None, :])[0]
    is_best = torch.arange(n_present)[:, None] == first[None, :]
    rest = torch.where(is_best, torch.zeros_like(means), means).sum(dim=0) / (n_present - 1)
    si = (best - rest) / (best + rest + eps)
    top = class_ids[first]
    dead = lay.dead()
    si = torch.where(dead, torch.full_like(si, float("nan")), si)
    # a NaN mean (nan="ignore" with a map NaN everywhere) makes si NaN: no class is the top one then; an
    # infinite mean makes si NaN too (inf / inf, as IEEE arithmetic has it), but its class is the top one
    top = torch.where(dead | torch.isnan(means).any(dim=0), torch.full_like(top, -1), top)
    return si, top
