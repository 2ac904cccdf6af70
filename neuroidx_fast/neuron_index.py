"""``NeuronIndex``: what one streaming pass recorded for every unit of every indexed layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._version import __version__
from .prepare import as_index
from .receptive_fields import ReceptiveField
from .storage import BundleError, read_bundle, write_bundle
from .topk import STATE_FORMAT

__all__ = ["LayerIndex", "NeuronIndex", "INDEX_FORMAT", "INDEX_VERSION"]

INDEX_FORMAT = "neuroidx_fast.NeuronIndex"
INDEX_VERSION = 1


@dataclass
class LayerIndex:
    """One layer: top-K per unit (SPEC.md section 1) and the statistics of its spatial means (5.2).

    ``values`` [C, K] float32, ``ids`` [C, K] int64 (dataset positions), ``positions`` [C, K] int64
    (flat ``y * W + x`` in the activation map; -1 in unused slots), ``map_size`` (H, W),
    ``images_seen``, ``mean_sum`` [C] float64 (sum over images of each unit's spatial mean: float64 sums of
    batches' sums, whose last bits depend on the batch size and on how shards were merged),
    ``class_sum`` [num_classes, C] float64 and ``class_count`` [num_classes] int64 (None without labels).
    """

    name: str
    values: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor
    map_size: tuple[int, int]
    images_seen: int
    mean_sum: torch.Tensor
    class_sum: torch.Tensor | None = None
    class_count: torch.Tensor | None = None

    @property
    def num_units(self) -> int:
        return self.values.shape[0]

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def mean_activation(self) -> torch.Tensor:
        """[C] float64: each unit's mean over images of its spatial mean (NaN if no image was seen)."""
        return self.mean_sum / self.images_seen if self.images_seen else torch.full_like(self.mean_sum, float("nan"))

    def class_means(self) -> torch.Tensor:
        """[num_classes, C] float64: mu_k of SPEC.md 5.2 (NaN for classes without images)."""
        if self.class_sum is None:
            raise ValueError(f"layer {self.name!r} was indexed without labels: class statistics need a dataset "
                             "yielding (image, label)")
        counts = self.class_count.to(torch.float64)[:, None]
        return torch.where(counts > 0, self.class_sum / counts.clamp(min=1), torch.full_like(self.class_sum, float("nan")))

    def dead(self) -> torch.Tensor:
        """[C] bool: units whose best activation is <= 0 or that saw no image (SPEC.md section 3)."""
        return (self.ids[:, 0] < 0) | ~(self.values[:, 0] > 0)

    def live_slots(self) -> torch.Tensor:
        """[C, K] bool: the top-K slots that hold an image of a unit that is not dead (what NFs and
        color selectivity read); a slot at -inf (an all-NaN map under nan="ignore", or a true -inf)
        holds no image that drives the unit and takes no part."""
        return (self.ids >= 0) & (self.values > float("-inf")) & ~self.dead()[:, None]

    def yx(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column of each top-K maximum in the activation map ([C, K] each; -1 when unused)."""
        width = self.map_size[1]
        used = self.positions >= 0
        y = torch.where(used, self.positions // width, torch.full_like(self.positions, -1))
        x = torch.where(used, self.positions % width, torch.full_like(self.positions, -1))
        return y, x

    def topk_state(self) -> dict:
        """The layer's top-K as a ``TopK.state_dict()`` (to resume or merge with ``TopK.from_state_dict``)."""
        return {"format": STATE_FORMAT, "num_units": self.num_units, "k": self.k, "count": self.images_seen,
                "values": self.values, "ids": self.ids, "positions": self.positions}

    def top(self, unit: int) -> list[tuple[float, int, int, int]]:
        """The top images of one unit as (value, image id, y, x), best first, unused slots left out."""
        index = as_index(unit)
        if index is None:
            raise TypeError(f"unit must be an int channel index, got {unit!r}")
        if not 0 <= index < self.num_units:
            raise IndexError(f"unit {unit} out of range: layer {self.name!r} has {self.num_units} units")
        unit = index
        y, x = self.yx()
        return [(float(self.values[unit, j]), int(self.ids[unit, j]), int(y[unit, j]), int(x[unit, j]))
                for j in range(self.k) if self.ids[unit, j] >= 0]


def _check_class_stats(class_sum, class_count, num_units: int, class_names, what: str) -> None:
    """class_sum [classes, C] float64 and class_count [classes] int64 >= 0, both or neither; a row per
    named class where the classes are named (index_dataset gives every named class one, and labels
    past them are refused)."""
    if class_sum is None and class_count is None:
        return
    if class_sum is None or class_count is None or class_sum.dtype != torch.float64 or class_count.dtype != torch.int64 \
            or class_sum.dim() != 2 or class_sum.shape[1] != num_units or tuple(class_count.shape) != class_sum.shape[:1]:
        shapes = [None if t is None else f"{tuple(t.shape)} {t.dtype}" for t in (class_sum, class_count)]
        raise BundleError(f"{what}: class statistics {shapes[0]} / {shapes[1]}, not [classes, {num_units}] float64 / "
                          "[classes] int64")
    if class_count.numel() and int(class_count.min()) < 0:
        raise BundleError(f"{what}: a class counts {int(class_count.min())} images (counts are >= 0)")
    if class_names is not None and len(class_names) != class_count.shape[0]:
        raise BundleError(f"{what}: class statistics of {class_count.shape[0]} classes, but the index names "
                          f"{len(class_names)} classes")


def _check_input_size(size, what: str) -> tuple[int, int] | None:
    """The recorded input size: two positive ints (None where none is recorded)."""
    if size is None:
        return None
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise BundleError(f"{what}: input size {size!r}, not two positive ints (height, width)")
    return tuple(size)


def _check_slots(ids, positions, map_size, what: str) -> None:
    """Top-K slots that name images and map positions: ids >= -1, positions in [-1, H * W)."""
    if ids.numel() and (int(ids.min()) < -1 or int(positions.min()) < -1
                        or int(positions.max()) >= map_size[0] * map_size[1]):
        raise BundleError(f"{what}: top-K ids or positions out of range (ids >= -1, positions in [-1, "
                          f"{map_size[0] * map_size[1]}) for a {map_size[0]}x{map_size[1]} map)")


def _recorded_int(record: dict, key: str, where: str) -> int:
    """``record[key]``, an int as the package writes it: a float (5.7, or Infinity, which JSON reads) or a
    bool there is a manifest no neuroidx_fast wrote, not a count to round."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BundleError(f"{where}: {key} is {value!r}, not a whole number: the manifest was not written by "
                          "neuroidx_fast (or was edited); index again")
    return value


def _check_labels(labels, layers: dict, where: str) -> None:
    """Every image's label: -1 (not seen) or a class that the class statistics have a row for."""
    if labels is None or not labels.numel():
        return
    classes = next((layer.class_count.shape[0] for layer in layers.values() if layer.class_count is not None), None)
    low, high = int(labels.min()), int(labels.max())
    if low < -1 or (classes is not None and high >= classes):
        bad = low if low < -1 else high
        raise BundleError(f"{where}: an image has label {bad}, not -1 (unseen) or a class in [0, {classes})")


@dataclass
class NeuronIndex:
    """Every indexed layer of one model over one dataset; ``index[name]`` is its ``LayerIndex``."""

    layers: dict[str, LayerIndex]
    k: int
    dataset_length: int
    input_size: tuple[int, int] | None = None
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)
    # [dataset_length] int64: every image's label (-1 where none was seen); None without labels.
    labels: torch.Tensor | None = field(default=None, repr=False)
    # The dataset it was built from, while in memory (not saved): the default source of top images.
    dataset: object = field(default=None, repr=False, compare=False)

    def __getitem__(self, name: str) -> LayerIndex:
        if name not in self.layers:
            raise KeyError(f"layer {name!r} is not in this index; indexed layers: {list(self.layers)}")
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def has_labels(self) -> bool:
        return any(layer.class_sum is not None for layer in self.layers.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {l.num_units} units {l.map_size[0]}x{l.map_size[1]}" for n, l in self.layers.items())
        return f"NeuronIndex(k={self.k}, images={self.dataset_length}, layers=[{parts}])"

    @property
    def image_channels(self) -> int | None:
        """Channels of the images indexed (the length of the recorded per-channel pixel sums), None where
        the index records none."""
        pixel_sum = self.meta.get("pixel_sum")
        return len(pixel_sum) if pixel_sum else None

    def receptive_field(self, name: str):
        """The receptive field of layer ``name`` recorded at index time (None if none was recorded)."""
        layer = self[name]
        entry = (self.meta.get("receptive_fields") or {}).get(name)
        if entry is None or self.input_size is None:
            return None
        return ReceptiveField(tuple(entry["size"]), tuple(entry["stride"]), tuple(entry["offset"]),
                              tuple(self.input_size), tuple(layer.map_size), bool(entry["whole_image"]),
                              entry.get("method", "analytic"))

    def table(self, **kwargs):
        """The neuron table (pandas): one row per (layer, unit); see ``neuroidx_fast.table.neuron_table``."""
        from .table import neuron_table

        return neuron_table(self, **kwargs)

    # ------------------------------------------------------------------ storage
    def to_bundle(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors, layers = {}, []
        for i, (name, layer) in enumerate(self.layers.items()):
            for key in ("values", "ids", "positions", "mean_sum", "class_sum", "class_count"):
                value = getattr(layer, key)
                if value is not None:
                    tensors[f"{i}.{key}"] = value
            layers.append({"name": name, "map_size": list(layer.map_size), "images_seen": layer.images_seen,
                           "num_units": layer.num_units, "labels": layer.class_sum is not None})
        if self.labels is not None:
            tensors["labels"] = self.labels
        manifest = {
            "package_version": __version__, "k": self.k, "dataset_length": self.dataset_length,
            "input_size": list(self.input_size) if self.input_size else None, "class_names": self.class_names,
            "layers": layers, "meta": self.meta,
        }
        return manifest, tensors

    @classmethod
    def from_bundle(cls, manifest: dict, tensors: dict[str, torch.Tensor], where: str = "index") -> "NeuronIndex":
        try:
            k, length = _recorded_int(manifest, "k", where), _recorded_int(manifest, "dataset_length", where)
            if k < 1:
                raise BundleError(f"{where}: k is {k}; an index keeps k >= 1 top images per unit")
            if length < 0:
                raise BundleError(f"{where}: dataset length {length} must be >= 0")
            class_names = manifest.get("class_names")
            if class_names is not None and not (isinstance(class_names, list)
                                                and all(isinstance(c, str) for c in class_names)):
                raise BundleError(f"{where}: class names {str(class_names)[:80]}, not a list of strings")
            class_names = class_names or None  # (an empty list names no classes: earlier indexes saved one so)
            input_size = _check_input_size(manifest.get("input_size"), where)
            layers = {}
            for i, entry in enumerate(manifest["layers"]):
                name, num_units = entry["name"], _recorded_int(entry, "num_units", where)
                get = {key: tensors.get(f"{i}.{key}") for key in
                       ("values", "ids", "positions", "mean_sum", "class_sum", "class_count")}
                for key, dtype, shape in (("values", torch.float32, (num_units, k)), ("ids", torch.int64, (num_units, k)),
                                          ("positions", torch.int64, (num_units, k)),
                                          ("mean_sum", torch.float64, (num_units,))):
                    t = get[key]
                    if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                        raise BundleError(f"{where}: tensor {name}.{key} missing or of the wrong shape/dtype")
                if entry.get("labels") and (get["class_sum"] is None or get["class_count"] is None):
                    raise BundleError(f"{where}: class statistics of {name} are missing")
                if name in layers:
                    raise BundleError(f"{where}: layer {name!r} is recorded twice")
                _check_class_stats(get["class_sum"], get["class_count"], num_units, class_names,
                                   f"{where}: layer {name!r}")
                if bool(torch.isnan(get["values"]).any()):  # (nan="ignore" ranks NaN as -inf; "raise" refuses it)
                    raise BundleError(f"{where}: layer {name!r} ranks NaN top-K values, which indexing never records")
                map_size = tuple(entry["map_size"])
                if len(map_size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                 for v in map_size):
                    raise BundleError(f"{where}: layer {name!r} has map size {list(map_size)}, not two positive ints")
                _check_slots(get["ids"], get["positions"], map_size, f"{where}: layer {name!r}")
                seen = _recorded_int(entry, "images_seen", where)
                if not 0 <= seen <= length:
                    raise BundleError(f"{where}: layer {name!r} saw {seen} images of a dataset of {length}")
                if seen and input_size is None:  # (the size of the first batch is recorded with it)
                    raise BundleError(f"{where}: layer {name!r} saw {seen} images, but the index records no input "
                                      "size (what its positions and receptive fields are of)")
                layers[name] = LayerIndex(name, get["values"], get["ids"], get["positions"], map_size, seen,
                                          get["mean_sum"], get["class_sum"], get["class_count"])
            highest = max((int(layer.ids.max()) for layer in layers.values() if layer.ids.numel()), default=-1)
            if highest >= length:
                raise BundleError(f"{where}: image id {highest} is ranked in a dataset of {length} images")
            labels = tensors.get("labels")
            if labels is not None and (labels.dtype != torch.int64 or tuple(labels.shape) != (length,)):
                raise BundleError(f"{where}: tensor labels has the wrong shape/dtype")
            _check_labels(labels, layers, where)
            return cls(layers, k, length, input_size, class_names, manifest.get("meta") or {}, labels)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, BundleError):
                raise
            raise BundleError(f"{where}: manifest is inconsistent ({type(exc).__name__}: {exc})") from None

    def save(self, path) -> None:
        """Write a directory: tensors.safetensors + manifest.json (atomic: old or new, never half)."""
        manifest, tensors = self.to_bundle()
        write_bundle(path, INDEX_FORMAT, INDEX_VERSION, manifest, tensors)

    @classmethod
    def load(cls, path) -> "NeuronIndex":
        """Read an index written by ``save``; corrupt, truncated or foreign files raise BundleError."""
        manifest, tensors = read_bundle(path, INDEX_FORMAT, INDEX_VERSION)
        return cls.from_bundle(manifest, tensors, where=str(path))
