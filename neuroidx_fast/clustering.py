"""Clustering of units and of image categories (SPEC.md section 7, Dai 2020), with scikit-learn k-means.

Units are clustered by their class-conditional mean profiles (SPEC.md 5.2) or by their Neuron Features;
image categories by their mean activation vectors over the layer's units. Items that cannot be placed
(dead units, NaN Neuron Features, classes without images, constant profiles) get the label -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .prepare import as_index, as_seed, integer_tensor, positive_int

__all__ = ["cluster_units", "cluster_categories", "Clusters", "purity"]

UNIT_FEATURES = ("class_profile", "nf")


@dataclass
class Clusters:
    """``labels`` [n] int64: the cluster of each item (unit or category), -1 where it was left out;
    ``silhouette``: mean silhouette of the clustered items (None unless 2 <= clusters < items);
    ``purity``: share of items in their cluster's majority ``reference`` group (None without reference);
    ``reference`` [n] int64 (-1: unknown); ``names``: one name per item; ``sizes``: items per cluster."""

    kind: str
    layer: str
    features: str
    n_clusters: int
    labels: torch.Tensor
    silhouette: float | None
    purity: float | None
    reference: torch.Tensor | None
    names: list[str]
    sizes: list[int] = field(default_factory=list)

    def members(self, cluster: int) -> list[int]:
        if not 0 <= cluster < self.n_clusters:
            raise ValueError(f"cluster {cluster} out of range: there are {self.n_clusters} clusters")
        return (self.labels == cluster).nonzero().reshape(-1).tolist()

    def summary(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "features": self.features, "n_clusters": self.n_clusters,
                "items": int(self.labels.numel()), "clustered": int((self.labels >= 0).sum()),
                "silhouette": self.silhouette, "purity": self.purity, "sizes": list(self.sizes)}

    def to_frame(self):
        """A pandas DataFrame: one row per item (name, cluster, reference group)."""
        import pandas as pd

        frame = pd.DataFrame({self.kind: self.names, "cluster": self.labels.tolist()})
        if self.reference is not None:
            frame["reference"] = self.reference.tolist()
        return frame


def purity(labels, reference) -> float:
    """Sum over clusters of the size of the cluster's largest reference group, over the items counted
    (items with label -1 or reference -1 are left out)."""
    labels, reference = torch.as_tensor(labels).reshape(-1), torch.as_tensor(reference).reshape(-1)
    if labels.numel() != reference.numel():
        raise ValueError(f"{labels.numel()} labels for {reference.numel()} reference entries")
    keep = (labels >= 0) & (reference >= 0)
    labels, reference = labels[keep], reference[keep]
    if labels.numel() == 0:
        raise ValueError("no item has both a cluster and a reference group")
    # groups by their rank among those present: any int may name one (bincount of 10**12 wanted 8 TB)
    reference = torch.unique(reference, return_inverse=True)[1]
    total = sum(int(torch.bincount(reference[labels == k]).max()) for k in labels.unique())
    return total / labels.numel()


def _layer(index, layer):
    if isinstance(layer, str) and hasattr(index, "layers"):
        return index[layer]
    raise TypeError(f"expected a NeuronIndex and a layer name, got {type(index).__name__} and {layer!r}")


def _check_k(n_clusters, available, what) -> int:
    k = as_index(n_clusters)
    if k is None or k < 1:
        raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
    if k > available:
        raise ValueError(f"n_clusters={k} is more than the {available} {what} that can be clustered")
    return k


def _class_means(index, layer_index, caller):
    if layer_index.class_sum is None:
        raise ValueError(f"{caller} needs class statistics, but layer {layer_index.name!r} was indexed without "
                         "labels: index a dataset that yields (image, label) pairs")
    return layer_index.class_means()


def _zscore_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows centred and scaled to unit std; the mask of rows that are finite and not constant."""
    mean = x.mean(1, keepdim=True)
    std = x.std(1, keepdim=True, unbiased=False)
    ok = torch.isfinite(x).all(1) & (std[:, 0] > 1e-12 * (1 + mean[:, 0].abs()))
    return (x - mean) / std.clamp(min=1e-300), ok


def _kmeans(points: torch.Tensor, n_clusters: int, seed: int, n_init: int, what: str):
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    distinct = len(torch.unique(points, dim=0))
    if distinct < n_clusters:  # k-means would leave clusters empty (sklearn only warns)
        raise ValueError(f"n_clusters={n_clusters} but the {points.shape[0]} {what} have only {distinct} distinct "
                         f"feature vectors: ask for at most {distinct} clusters")
    data = points.double().numpy()
    # (scikit-learn takes seeds in [0, 2**32) only; these functions take any int, as maximize does)
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed % 2 ** 32).fit(data)
    labels = torch.as_tensor(km.labels_, dtype=torch.int64)
    score = (float(silhouette_score(data, km.labels_))
             if 2 <= n_clusters < points.shape[0] and distinct > 1 and len(labels.unique()) > 1 else None)
    return labels, score


def _group_indices(values, argument: str, what: str) -> torch.Tensor:
    """``values`` as int64 [n]: integers only (casting floats would cut 0.7 to group 0, silently)."""
    try:
        return integer_tensor(argument, values).reshape(-1).cpu()
    except ValueError as exc:
        raise ValueError(f"{argument} must hold one int group index per {what} (-1: none); {exc}") from None



def _finish(kind, layer, features, n_clusters, ok, sub_labels, score, reference, names):
    labels = torch.full((ok.numel(),), -1, dtype=torch.int64)
    labels[ok] = sub_labels
    pur = None
    if reference is not None:
        what, argument = ("categories", "groups") if kind == "category" else (kind + "s", "reference")
        reference = _group_indices(reference, argument, what)
        if reference.numel() != labels.numel():
            raise ValueError(f"{argument} has {reference.numel()} entries for {labels.numel()} {what}")
        if ((labels >= 0) & (reference >= 0)).any():
            pur = purity(labels, reference)
    sizes = torch.bincount(sub_labels, minlength=n_clusters).tolist()
    return Clusters(kind, layer, features, n_clusters, labels, score, pur, reference, names, sizes)


def cluster_units(index, layer: str, n_clusters: int, features: str = "class_profile", nf=None,
                  reference=None, normalize: bool | None = None, seed: int = 0, n_init: int = 10) -> Clusters:
    """k-means clusters of the units of ``layer`` (Dai 2020).

    ``features="class_profile"``: each unit's class-conditional means mu_k (SPEC.md 5.2; the index needs
    labels), z-scored per unit by default (``normalize``) so that the shape of the profile counts, not
    its scale; units with a constant profile get -1. ``features="nf"``: the units' Neuron Features, from
    ``nf=`` (a ``neuron_features`` result with ``.nf``, or a tensor [C, 3, r, r]); units whose NF is NaN
    get -1; not normalised by default. In both, dead units (``LayerIndex.dead()``: best activation <= 0)
    get -1 and take no part in the purity.
    ``reference`` [C] (group per unit, -1 unknown) gives the purity; by default, for class profiles, each
    clustered unit's preferred class (argmax of mu_k), -1 for the units left out.
    """
    seed, n_init = as_seed(seed), positive_int("n_init", n_init)
    layer_index = _layer(index, layer)
    if features not in UNIT_FEATURES:
        raise ValueError(f"features must be one of {UNIT_FEATURES}, got {features!r}")
    num_units = layer_index.num_units
    # A dead unit (SPEC.md 3: best activation <= 0, or no image seen) has every index NaN: its class
    # profile, even when not constant (a pre-ReLU unit that is always negative), places it nowhere.
    live = ~layer_index.dead()
    if features == "class_profile":
        means = _class_means(index, layer_index, "cluster_units(features='class_profile')")
        # Classes without images carry no information. A NaN mean of one unit (nan="ignore") is that unit's
        # problem: it gets -1 (its row is not finite), every other unit keeps the class in its profile.
        classes = (layer_index.class_count > 0).nonzero().reshape(-1)
        means = means[classes]
        if means.shape[0] < 2:
            raise ValueError(f"class profiles need at least 2 classes with images, layer {layer!r} has "
                             f"{means.shape[0]}")
        points = means.T.contiguous()                          # [C, classes]
        z, ok = _zscore_rows(points)
        ok = ok & live
        if normalize is None or normalize:
            points = z
        if reference is None:
            preferred = classes[points.nan_to_num(-torch.inf).argmax(1)]  # a class id, not a position in `classes`
            reference = torch.where(ok, preferred, torch.full((num_units,), -1))
    else:
        if nf is None:
            raise ValueError("features='nf' needs the Neuron Features: pass nf= (the result of "
                             "neuroidx_fast.neuron_features(...) or a tensor [C, 3, r, r])")
        tensor = getattr(nf, "nf", nf)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
            raise ValueError(f"nf must have a tensor .nf [C, 3, r, r] or be one, got {type(tensor).__name__}")
        if tensor.shape[0] != num_units:
            raise ValueError(f"nf has {tensor.shape[0]} units but layer {layer!r} has {num_units}")
        points = tensor.detach().double().cpu().reshape(num_units, -1)
        ok = torch.isfinite(points).all(1) & live
        if normalize:
            z, finite = _zscore_rows(points)
            points, ok = z, ok & finite
    available = int(ok.sum())
    dead = int((~live).sum())
    n_clusters = _check_k(n_clusters, available,
                          f"units (with a usable feature{f'; {dead} dead units left out' if dead else ''})")
    sub_labels, score = _kmeans(points[ok], n_clusters, seed, n_init, "units")
    names = [f"unit {c}" for c in range(num_units)]
    return _finish("unit", layer, features, n_clusters, ok, sub_labels, score, reference, names)


def cluster_categories(index, layer: str, n_clusters: int, groups=None, normalize: bool = True, seed: int = 0,
                       n_init: int = 10) -> Clusters:
    """k-means clusters of the image categories (classes) of the index by their mean activation vectors
    over the units of ``layer`` (rows of class_means, [classes, C]; Dai 2020). ``normalize``: each unit is
    z-scored across classes first (so that a few large units do not decide alone; constant units are
    dropped). Classes without images get -1. Units with a NaN or infinite mean on a class with images
    (maps NaN on whole images under nan="ignore", or infinite activations) are dropped for every class:
    dropping the class instead would leave it out for one unit's sake. ``groups`` [classes] (e.g.
    super-categories) gives the purity. Needs an index built with labels.
    """
    seed, n_init = as_seed(seed), positive_int("n_init", n_init)
    layer_index = _layer(index, layer)
    means = _class_means(index, layer_index, "cluster_categories")      # [classes, C]
    ok = layer_index.class_count > 0
    units = torch.isfinite(means[ok]).all(0)
    if not units.any():
        raise ValueError(f"every unit of layer {layer!r} has a NaN or infinite mean on some class with images (maps "
                         "NaN on whole images, indexed with nan='ignore', or infinite activations): no unit to cluster "
                         "the classes by; index again with nan='raise' to find the images")
    n_clusters = _check_k(n_clusters, int(ok.sum()), "classes with images")
    points = torch.zeros(means.shape[0], int(units.sum()), dtype=torch.float64)
    points[ok] = means[ok][:, units]
    if normalize:
        z, usable = _zscore_rows(points[ok].T.contiguous())              # per unit across classes
        if int(ok.sum()) < 2:
            raise ValueError(f"only one class has images in the index of layer {layer!r}: z-scoring each unit "
                             "across classes needs two (index images of several classes, or pass normalize=False)")
        if not usable.any():
            raise ValueError(f"every unit of layer {layer!r} has the same mean on every class: nothing to cluster")
        points = torch.zeros(means.shape[0], int(usable.sum()), dtype=torch.float64)
        points[ok] = z[usable].T
    sub_labels, score = _kmeans(points[ok], n_clusters, seed, n_init, "classes")
    count = means.shape[0]
    names = list(index.class_names) if index.class_names and len(index.class_names) == count else \
        [f"class {k}" for k in range(count)]
    return _finish("category", layer, "class_means", n_clusters, ok, sub_labels, score, groups, names)
