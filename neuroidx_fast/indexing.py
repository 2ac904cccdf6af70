"""``index_dataset``: one streaming pass of a dataset through a model records, for every unit of the
chosen layers, its top-K images and the class-conditional sums of its spatial means (SPEC.md 1, 5.2).

Resumable (atomic checkpoints every few batches, exact continuation) and distributed (under an
initialised torch.distributed, each rank indexes a contiguous shard; rank 0 merges and returns).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import json
import math
import numbers
import os
import types
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from .background import reading
from .hooks import LayerCapture, LayerNotReachedError, resolve_layers
from .receptive_fields import receptive_fields
from .neuron_index import LayerIndex, NeuronIndex
from .prepare import (check_pixel_batch, check_preprocess, dataset_length, eval_on_device, first_line, image_loader,
                      nonfinite_images, pixel_space, positive_int, restores_modes, split_batch)
from .storage import MANIFEST, BundleError, is_bundle, read_bundle, recover_interrupted_write, write_bundle
from .topk import TopK

__all__ = ["index_dataset", "model_fingerprint"]

CHECKPOINT_FORMAT = "neuroidx_fast.IndexCheckpoint"
CHECKPOINT_VERSION = 1


class _LayerStats:
    """Running state of one layer: a TopK, the sum of spatial means, and per-class sums and counts."""

    def __init__(self, name, num_units, k, map_size, device, nan, backend):
        self.name, self.map_size = name, tuple(map_size)
        self.top = TopK(num_units, k, device=device, nan=nan, backend=backend, name=name)
        self.mean_sum = torch.zeros(num_units, dtype=torch.float64, device=device)
        self.class_sum = None
        self.class_count = None
        self.nan_means_said = False

    def reduce(self, activations, batch: int):
        """The batch's spatial reduction (``TopK.reduce``: no device sync); ``add`` adds it."""
        if activations.shape[0] != batch:  # (TopK would blame the ids of the batch's images)
            raise ValueError(f"layer {self.name!r} outputs shape {tuple(activations.shape)} for a batch of {batch} "
                             "images: its first dimension must be the batch; index a layer whose output is "
                             "[B, C, H, W] or [B, C]")
        size = tuple(activations.shape[2:]) if activations.dim() == 4 else (1, 1)
        if size != self.map_size:
            raise ValueError(f"layer {self.name!r}: activation map size changed from {self.map_size} to {size}; "
                             "every image must have the same size")
        return self.top.reduce(activations)

    def add(self, activations, reduced, rare: bool, ids, labels, num_classes):
        means = self.top.add_reduced(reduced, rare, activations, ids, check_ids=False).double()
        if rare:  # (a batch that is not rare has finite means)
            self._warn_of_nan_means(means, ids)
        self.mean_sum += means.sum(dim=0)
        if labels is not None:
            self._add_classes(means, labels, num_classes)

    def _warn_of_nan_means(self, means, ids) -> None:
        """A NaN spatial mean (a map of NaN only, under nan="ignore"; a map holding both +inf and -inf)
        makes the unit's mean activation and its class's mean NaN for good: said once per layer, not
        left to surprise (Morcos selectivity, clustering and mode="mean" ablation then skip the unit)."""
        if self.nan_means_said or not bool(torch.isnan(means).any()):
            return
        self.nan_means_said = True
        rows, units = torch.isnan(means).nonzero(as_tuple=True)
        warnings.warn(f"layer {self.name!r}: the spatial mean of unit(s) {sorted(set(units.tolist()))[:8]} is NaN on "
                      f"image id(s) {sorted(set(ids[rows].tolist()))[:8]} (a map of NaN only, under "
                      "nan='ignore', or one holding both +inf and -inf): those units' mean activation and class "
                      "means are NaN", stacklevel=4)

    def _add_classes(self, means, labels, needed):
        if self.class_sum is None:
            self.class_sum = torch.zeros(0, means.shape[1], dtype=torch.float64, device=means.device)
            self.class_count = torch.zeros(0, dtype=torch.int64, device=means.device)
        if needed > self.class_sum.shape[0]:
            self.class_sum = _grow(self.class_sum, needed)
            self.class_count = _grow(self.class_count, needed)
        # index_put_ with accumulate adds rows in batch order (deterministic; index_add_ on float64 CPU
        # tensors is also ~1000x slower).
        self.class_sum.index_put_((labels,), means, accumulate=True)
        self.class_count.index_put_((labels,), torch.ones_like(labels), accumulate=True)

    def to_layer_index(self) -> LayerIndex:
        values, ids, positions = (t.cpu() for t in self.top.result())
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return LayerIndex(self.name, values, ids, positions, self.map_size, self.top.count, self.mean_sum.cpu(),
                          cpu(self.class_sum), cpu(self.class_count))

    @classmethod
    def from_layer_index(cls, layer: LayerIndex, device, nan, backend):
        stats = cls(layer.name, layer.num_units, layer.k, layer.map_size, device, nan, backend)
        stats.top = TopK.from_state_dict(dict(layer.topk_state(), nan=nan), device=device, backend=backend)
        stats.top.name = layer.name
        stats.mean_sum = layer.mean_sum.to(device)
        if layer.class_sum is not None:
            stats.class_sum, stats.class_count = layer.class_sum.to(device), layer.class_count.to(device)
        return stats


def _grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    grown = torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    grown[: t.shape[0]] = t
    return grown


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, shapes, dtypes and every byte of every tensor, and a
    quantised tensor's scales and zero points: its bytes are its integers, the same for a model quantised
    again at other scales; an entry that is no tensor, such as a module's ``get_extra_state()`` or
    quantised packed parameters, by its name and ``_describe``)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            digest.update(f"{name}|{_describe(tensor, 0)}|".encode())
            continue
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
        if tensor.is_quantized:
            digest.update(f"|{_quantisation(tensor, functools.partial(_describe, depth=1))}|".encode())
    return digest.hexdigest()


def _module_lines(module: nn.Module) -> str:
    """Every submodule's name, type and settings (``extra_repr``), one per line: what ``repr`` shows, less
    the parameter lists' entries, which name their device (the state dict covers their values)."""
    lines = []
    for name, sub in module.named_modules():
        kind = f"{type(sub).__module__}.{type(sub).__qualname__}"
        shown = "" if isinstance(sub, (nn.ParameterList, nn.ParameterDict)) else sub.extra_repr()
        if type(sub).__repr__ is not nn.Module.__repr__:  # its own repr (torchvision's Normalize: mean, std)
            shown += "|" + repr(sub)
        lines.append(f"{name}|{kind}|{shown}")
    return "\n".join(lines)


def structure_fingerprint(model: nn.Module, preprocess=None) -> str:
    """SHA-256 of the model's modules, their types and settings (``_module_lines``), and of a module
    ``preprocess``'s: what the state dict does not show (a ReLU swapped for a LeakyReLU; a torchvision
    Normalize keeps its mean and std as plain attributes), on any device. A change of ``forward`` code
    stays unseen; a plain function ``preprocess`` is recorded by ``_preprocess_code``."""
    shown = _module_lines(preprocess) if isinstance(preprocess, nn.Module) else ""
    return hashlib.sha256(f"{_module_lines(model)}\n{shown}".encode()).hexdigest()


def dataset_fingerprint(dataset) -> str | None:
    """What a dataset says of its own contents through a ``fingerprint()`` method (``ImageFolder``: its
    file list), also through a Subset (with the positions it takes); None for others. A checkpoint
    records it: a resume on another file list of the same length would mix two datasets' images."""
    base, positions = dataset, None
    while isinstance(base, Subset):
        positions = [int(i) for i in base.indices] if positions is None else [int(base.indices[i]) for i in positions]
        base = base.dataset
    fingerprint = getattr(base, "fingerprint", None)
    if not callable(fingerprint):
        return None
    if positions is None:
        return str(fingerprint())
    return f"{fingerprint()}|{hashlib.sha256(repr(positions).encode()).hexdigest()}"


def _check_map_style(dataset) -> None:
    """Ids are positions in the dataset: a DataLoader (whose length counts batches) and an
    IterableDataset (which has no positions) are refused before their length is taken for images."""
    if isinstance(dataset, DataLoader):
        raise TypeError("index_dataset takes the dataset itself, not a DataLoader (whose length counts batches): "
                        "pass loader.dataset, and batch_size= and num_workers= for its loading")
    if isinstance(dataset, IterableDataset):
        raise TypeError(f"the dataset is an IterableDataset ({type(dataset).__name__}): index_dataset reads images by "
                        "position (their ids), so it needs a map-style dataset, with __len__ and __getitem__")


class _Positions(Subset):
    """The positions of a dataset that a pass reads. The dataset's own IndexError (a ``__len__`` larger
    than the images it can give) names neither the position nor that length: both are named."""

    def __getitems__(self, indices):
        positions = [self.indices[i] for i in indices]
        if not callable(getattr(self.dataset, "__getitems__", None)):
            return [_item(self.dataset, position) for position in positions]
        try:
            return self.dataset.__getitems__(positions)
        except IndexError as exc:
            raise _beyond_length(self.dataset, f"images {positions[0]}..{positions[-1]}", exc) from exc


def _item(dataset, position: int):
    try:
        return dataset[position]
    except IndexError as exc:
        raise _beyond_length(dataset, f"image {position}", exc) from exc


def _beyond_length(dataset, what: str, exc: IndexError) -> IndexError:
    length = len(dataset)
    return IndexError(f"the dataset raised IndexError reading {what} ({first_line(exc)}), though its __len__ says it "
                      f"holds {length} images (ids 0..{length - 1}): its __len__ must be the number of images it can "
                      "give (or its __getitem__ has a bug: the traceback above shows where it raised)")


def _base_dataset(dataset):
    """The dataset under any Subsets of it (what says its classes, geometry and contents)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def dataset_geometry(dataset) -> str | None:
    """What a dataset says through a ``geometry()`` method (``ImageFolder``: its size, resize and crop), also
    through a Subset; None for others."""
    geometry = getattr(_base_dataset(dataset), "geometry", None)
    return str(geometry()) if callable(geometry) else None


def sample_fingerprint(dataset, positions) -> str:
    """SHA-256 of the items at ``positions`` (image bytes, dtype, shape and label): what a checkpoint
    records of a dataset that has no ``fingerprint()``, so that a resume on another dataset of the same
    length whose sampled items differ (or one with random transforms, whose ids name no fixed image) is
    refused. Cheap: a few items, so a dataset that differs only between them passes: a dataset that
    can change so should have a ``fingerprint()`` of its own (ImageFolder has)."""
    digest = hashlib.sha256()
    for position in positions:
        item = _item(dataset, position)
        image, label = (item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None)
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().contiguous()
            digest.update(f"{position}|{image.dtype}|{tuple(image.shape)}|".encode())
            digest.update(image.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{position}|{type(image).__name__}|".encode())
        digest.update(f"|{label.tolist() if isinstance(label, torch.Tensor) else label!r}\n".encode())
    return digest.hexdigest()


def _preprocess_fingerprint(preprocess) -> str | None:
    """What a checkpoint records of ``preprocess``: a module's class and state (its normalisation
    constants), a function's qualified name (the rule of the first checkpoints, kept as it was; its code
    and what it closes over: ``_preprocess_code``)."""
    if preprocess is None:
        return None
    if isinstance(preprocess, nn.Module):
        return f"{type(preprocess).__qualname__}:{model_fingerprint(preprocess)}"
    return f"{getattr(preprocess, '__module__', '?')}.{getattr(preprocess, '__qualname__', type(preprocess).__qualname__)}"


def _preprocess_code(preprocess, reprs: bool = False, selves: bool = False) -> str | None:
    """What a checkpoint records of a function ``preprocess`` besides its name (``_preprocess_fingerprint``,
    which is ``<lambda>`` for every lambda and ``partial`` for every ``functools.partial``): SHA-256 of its
    code (``_describe``), its defaults and what it closes over, of a partial's function and arguments, of
    a callable object's ``__call__`` and settings. The same in every process for the same function (no
    addresses); another Python version compiles other bytecode. None for a module (its class and state
    stand for it) and for no preprocess. ``reprs``: values of other kinds (a dtype, a device, an enum)
    by their repr too (``_describe``); without it, by their type alone, as the first checkpoints that
    recorded the code had them (key ``preprocess_code``; ``preprocess_values`` has the reprs). ``selves``:
    a bound method's object too (key ``preprocess_objects``, with the reprs), not its type's name alone."""
    if preprocess is None or isinstance(preprocess, nn.Module):
        return None
    return hashlib.sha256(_describe(preprocess, 0, reprs, selves).encode()).hexdigest()


def _method_object(obj, deeper) -> str:
    """A bound method's object as a resume compares it: a module by its state (Normalize(mean, std)); another
    object by its attributes that hold settings: numbers, strings, tensors, arrays, enums, functions and
    modules, and under public names short tuples and lists of them and dicts of them by name. Not what
    differs between a run and its resume with the same settings, or costs seconds to hash: objects such as
    a logger (whose attributes reach the process's global state), containers under private names (caches
    filled as the object is used), long sequences (a dataset's list of files)."""
    if isinstance(obj, nn.Module):
        return deeper(obj)
    attributes = getattr(obj, "__dict__", None)
    kept = {name: value for name, value in (attributes.items() if isinstance(attributes, dict) else ())
            if _holds_settings(value, private=name.startswith("_"))}
    return f"{type(obj).__qualname__}({deeper(kept)})"


_SETTING_TYPES = (bool, numbers.Number, str, bytes, torch.Tensor, torch.dtype, torch.device, enum.Enum, nn.Module,
                  types.FunctionType, types.BuiltinFunctionType, functools.partial)


def _holds_settings(value, depth: int = 0, private: bool = False) -> bool:
    """Whether ``value`` is a setting as _method_object records them."""
    if value is None or isinstance(value, _SETTING_TYPES):
        return True
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        return True
    if private:
        return False
    if isinstance(value, (tuple, list)):
        return depth < 3 and len(value) <= 64 and all(_holds_settings(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return depth < 3 and len(value) <= 64 and all(isinstance(k, str) and _holds_settings(v, depth + 1)
                                                      for k, v in value.items())
    return False


def _describe(value, depth: int, reprs: bool = True, selves: bool = False) -> str:
    """A text for what ``value`` computes or holds, without addresses: numbers, strings, bytes and None
    as their repr; tuples, lists, sets and dicts of them element by element; a tensor's (or numpy
    array's) dtype, shape and bytes (a quantised one's scales too, with ``reprs``); a function's code
    (bytecode, constants, names), defaults and closure cells; a partial's function and arguments; a
    bound method's function and, with ``selves``, its object's settings (``_method_object``; without,
    its type's name alone, as fingerprints recorded before had it); a module's submodules, settings and
    state; a callable object's ``__call__`` and attributes; with ``reprs``, a torch.dtype, device, memory format
    or layout, an enum or a range by its repr, a slice by its bounds, another object by its attributes
    (``__dict__``); anything else its type alone (what it holds cannot be told apart without its
    address, and a repr in general is not the same in every process). Globals a function reads are
    named, not looked into."""
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if depth > 8:
        return kind
    deeper = functools.partial(_describe, depth=depth + 1, reprs=reprs, selves=selves)
    if value is None or value is Ellipsis or isinstance(value, (bool, numbers.Number, str, bytes)):
        return f"{kind}:{value!r}"
    if isinstance(value, torch.Tensor):
        try:
            raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        except (RuntimeError, TypeError, NotImplementedError):  # sparse, quantised, meta: its kind and shape
            raw = b""
        described = f"tensor:{value.dtype}:{tuple(value.shape)}:{hashlib.sha256(raw).hexdigest()}"
        if reprs and value.is_quantized:  # (its bytes are the integers: the scales say what they stand for)
            return f"{described}:{_quantisation(value, deeper)}"
        return described
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        raw = value.tobytes() if value.dtype != object else repr(value.tolist()).encode()
        return f"ndarray:{value.dtype}:{value.shape}:{hashlib.sha256(raw).hexdigest()}"
    if isinstance(value, (tuple, list)):
        return f"{kind}({','.join(deeper(v) for v in value)})"
    if isinstance(value, (set, frozenset)):
        return f"{kind}({','.join(sorted(deeper(v) for v in value))})"
    if isinstance(value, dict):
        return f"{kind}({','.join(sorted(f'{deeper(k)}={deeper(v)}' for k, v in value.items()))})"
    if isinstance(value, types.CodeType):
        return (f"code({value.co_code.hex()};{deeper(value.co_consts)};{','.join(value.co_names)};"
                f"{value.co_argcount},{value.co_kwonlyargcount},{value.co_flags})")
    if isinstance(value, functools.partial):
        return f"partial({deeper(value.func)};{deeper(value.args)};{deeper(value.keywords)})"
    if isinstance(value, types.MethodType):
        # (Normalize(mean, std).forward: its object holds what it computes)
        bound_to = _method_object(value.__self__, deeper) if selves else type(value.__self__).__qualname__
        return f"method({deeper(value.__func__)};{bound_to})"
    if isinstance(value, types.FunctionType):
        cells = []
        for cell in value.__closure__ or ():
            try:
                cells.append(deeper(cell.cell_contents))
            except ValueError:  # an empty cell
                cells.append("<empty>")
        return (f"function({value.__module__}.{value.__qualname__};{deeper(value.__code__)};"
                f"{deeper(value.__defaults__)};{deeper(value.__kwdefaults__)};cells({','.join(cells)}))")
    if isinstance(value, nn.Module):  # (one held by a function or object: a Compose's Normalize)
        return f"module({_module_lines(value)};{model_fingerprint(value)})"
    if isinstance(value, (types.BuiltinFunctionType, type)):
        return f"{kind}:{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}"
    call = getattr(type(value), "__call__", None)
    if isinstance(call, types.FunctionType):  # a callable object
        settings = getattr(value, "__dict__", {})
        return f"{kind}({deeper(call)};{deeper(dict(settings) if isinstance(settings, dict) else {})})"
    if not reprs:
        return kind
    if isinstance(value, _STABLE_REPRS):  # (the same text in every process)
        return f"{kind}:{value!r}"
    if isinstance(value, enum.Enum):  # (its name: a member's repr shows its value, which may be a set)
        return f"{kind}.{value.name}"
    if isinstance(value, slice):
        return f"{kind}({deeper((value.start, value.stop, value.step))})"
    if isinstance(value, types.ModuleType):  # (its repr names the file it came from)
        return f"{kind}:{value.__name__}"
    settings = getattr(value, "__dict__", None)  # (a settings object: a repr may show a set in hash order)
    return f"{kind}({deeper(dict(settings))})" if isinstance(settings, dict) else kind


# kinds whose repr is the same in every process and tells their values apart (a repr in general is not:
# a set's order changes with the hash seed, addresses with the run)
_STABLE_REPRS = (torch.dtype, torch.device, torch.memory_format, torch.layout, range)


def _quantisation(tensor: torch.Tensor, describe) -> str:
    """A quantised tensor's scheme, scales and zero points (``describe`` for the per-channel tensors)."""
    scheme = tensor.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return f"{scheme}:{tensor.q_scale()!r}:{tensor.q_zero_point()}"
    return (f"{scheme}:{describe(tensor.q_per_channel_scales())}:{describe(tensor.q_per_channel_zero_points())}:"
            f"{tensor.q_per_channel_axis()}")


def _pixel_range(images: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """[2] float64 (lowest, highest) pixel of the batch ``x`` (``images`` on the device), left on the
    device to be read with the batch's other checks (one sync); None for 8-bit pixels (k / 255: in
    range) or an empty batch."""
    if images.dtype == torch.uint8 or not x.numel():
        return None
    return torch.stack(torch.aminmax(x)).double()  # one pass; the images are named only where needed


def _read_checks(pixel_range: torch.Tensor | None, rare: list) -> tuple[tuple | None, list]:
    """The batch's device-side checks read in one sync: (low, high) pixels or None, and each layer's
    ``rare`` flag (``TopK.reduce``) as a bool."""
    parts = ([pixel_range] if pixel_range is not None else []) + [flag.reshape(1).double() for flag in rare]
    if not parts:
        return None, []
    # (a layer of a model split over devices has its flag on its own: the add then names the mismatch)
    values = torch.cat([part.to(parts[0].device) for part in parts]).tolist()
    if pixel_range is None:
        return None, [bool(v) for v in values]
    return (values[0], values[1]), [bool(v) for v in values[2:]]


@contextlib.contextmanager
def _pixels_checked_first(images: torch.Tensor, first_id: int):
    """A batch's pixels are checked with its other device-side checks, after its forward; an error of the
    batch before then (its labels, its size, the model) is preceded by the pixel check, here on the CPU
    batch, as when pixels were checked first: NaN pixels are named rather than what they broke, and
    0..255 images get their warning before the model's failure on them."""
    try:
        yield
    except Exception:
        pixel_range = _pixel_range(images, images)
        if pixel_range is not None:
            _check_images(images, *pixel_range.tolist(), first_id)
        raise


def _check_images(images: torch.Tensor, low: float, high: float, first_id: int) -> None:
    """Pixel values of a batch whose lowest and highest pixels ``_read_checks`` read: finite (else an
    error naming the images), in [0, 1] (else a warning)."""
    if not (math.isfinite(low) and math.isfinite(high)):  # (nan="ignore" is for activations: a NaN pixel would
        bad = nonfinite_images(images).tolist()            # also spoil the pixel mean)
        raise ValueError(f"images {[first_id + int(i) for i in bad[:16]]} hold NaN or infinite pixels: the dataset "
                         "must give finite pixel-space images")
    # every batch (a dataset may turn to 0..255 further on); the warning shows once
    if low < -1e-3 or high > 1 + 1e-3:
        warnings.warn("images are outside [0, 1]: index_dataset expects pixel-space images and applies "
                      "normalisation through preprocess= (crops are cut from these images later)", stacklevel=3)


MAX_CLASSES = 1 << 20  # (the index keeps a row of sums per class: a label of 2^40 would ask for terabytes)


def _first_batch_failure(exc: RuntimeError, image_shape: tuple, model_channels: int) -> str:
    """What to say when the model fails on the first batch: the likely cause where torch's message names
    one (channels, a kernel larger than the map), else torch's first line as it is, with no guess."""
    said = f"the model fails on the first images, {image_shape} ({type(exc).__name__}: {first_line(exc)})"
    text = str(exc).lower()
    if "channels" in text and "expected" in text:
        fix = ("gray images [1, H, W] need a preprocess= that makes them RGB (e.g. x.expand(-1, 3, -1, -1)), "
               if model_channels == 1 else "")
        return f"{said}: the images have {model_channels} channel(s) as the model gets them; {fix}give the model " \
               "images with the channels its first layer takes"
    if "kernel size can't be greater than actual input size" in text or "output size is too small" in text:
        return f"{said}: images too small for its layers give this, so use larger ones (the CLI's --size)"
    return f"{said}: check that the model takes images of this size and number of channels (the CLI's --size)"


def _check_labels(labels: torch.Tensor, class_names, first_id: int) -> None:
    """Class indices: >= 0, below the dataset's number of classes where it names them (``classes``)."""
    low, high = int(labels.min()), int(labels.max())
    limit = len(class_names) if class_names else MAX_CLASSES
    if low < 0 or high >= limit:
        bad = first_id + int(((labels < 0) | (labels >= limit)).nonzero()[0])
        named = f"the dataset names {limit} classes" if class_names else f"at most {MAX_CLASSES} classes"
        raise ValueError(f"image {bad} has label {int(labels[bad - first_id])}: labels must be class indices in "
                         f"[0, {limit}) ({named})")


def _check_image_size(images: torch.Tensor, input_size, first_id: int) -> None:
    """Every image has the size of the first: the positions of the index, and the receptive field that
    maps them to crops, are those of one input size (another size can give the same maps)."""
    if input_size is not None:
        _check_same(f"images {first_id}..{first_id + images.shape[0] - 1}", "size", tuple(images.shape[-2:]),
                    tuple(input_size))


def _check_same(images: str, what: str, value, first) -> None:
    """``images`` (e.g. "images 8..11") have the ``what`` ("size", or "channels": a count) of the first ones."""
    if value == first:
        return
    if what == "size":
        raise ValueError(f"{images} are {value} but the first ones are {first}: give every image of the dataset "
                         "one size (e.g. a Resize and CenterCrop transform)")
    raise ValueError(f"{images} have {value} channel(s) but the first ones have {first}: give every image of the "
                     "dataset the same channels")


def _check_preprocess_size(images: torch.Tensor, x: torch.Tensor) -> None:
    """preprocess may change values and channels, not positions: crops are cut later from the dataset's
    images at the positions the model saw, which must be the same pixels."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != tuple(images.shape[-2:]):
        raise ValueError(f"preprocess turns images {tuple(images.shape[1:])} into {tuple(x.shape[1:])}: it may change "
                         "pixel values and channels (e.g. normalise, gray to RGB), not the image size, since crops are "
                         "cut from the dataset's images at the positions the model saw; resize, crop or pad in the "
                         "dataset (its transform) instead")


def _distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


# fingerprint keys that checkpoints of earlier versions lack: not checked when resuming one of those
_LATER_FINGERPRINTS = ("structure", "data_sample", "data_geometry", "preprocess_code", "preprocess_values",
                       "preprocess_objects")


def _holds_other_than_checkpoint(path) -> bool:
    """Whether ``path`` holds something other than an index checkpoint (another program's folder, a saved
    NeuronIndex), which must not be deleted to start over, unlike a corrupt or older checkpoint."""
    if not is_bundle(path):
        return True
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            kind = json.load(f).get("format")
    except (OSError, ValueError, AttributeError):  # missing or unreadable: a checkpoint's interrupted write
        return False
    return kind != CHECKPOINT_FORMAT


def _load_checkpoint(path, fingerprint, device, nan, backend, shard_length: int, batch_size: int):
    try:
        manifest, tensors = read_bundle(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    except BundleError as exc:
        if _holds_other_than_checkpoint(path):
            raise BundleError(f"checkpoint={os.fspath(path)!r} is not an index checkpoint ({exc}): give checkpoint= a "
                              "path of its own, a new directory that index_dataset fills") from None
        raise BundleError(f"cannot resume from checkpoint {path}: {exc}. Delete it to start over") from None
    saved = manifest.get("fingerprint", {})
    differ = sorted(key for key in set(saved) | set(fingerprint) if saved.get(key) != fingerprint.get(key)
                    and (key in saved or key not in _LATER_FINGERPRINTS))
    if differ:
        notes = []  # the named differences first, in this order, then the other settings as they are
        if "model" in differ or "structure" in differ:
            what = "weights" if "structure" not in differ else "modules (or the preprocess's settings)"
            notes.append(f"the model's {what} differ")
        if "data" in differ:
            notes.append("the dataset's contents differ (its file list changed)")
        if "data_sample" in differ:
            notes.append("the dataset's first or last image differs (another dataset of the same length, or random "
                         "transforms: ids must name fixed images)")
        if {"preprocess_code", "preprocess_values", "preprocess_objects"} & set(differ):
            notes.append("the preprocess function differs (its code, defaults, arguments, the values it closes "
                         "over or the object it is a method of; or this Python version compiles it otherwise)")
        if "data_geometry" in differ:
            notes.append(f"the images are made otherwise from the files (checkpoint {saved.get('data_geometry')}, now "
                         f"{fingerprint.get('data_geometry')})")
        notes += [f"{key}: checkpoint {saved.get(key)!r} vs now {fingerprint.get(key)!r}"
                  for key in differ if key not in ("model", "data") + _LATER_FINGERPRINTS]
        details = "; ".join(notes)
        raise ValueError(f"checkpoint {path} was made with other arguments ({details}). Use the original "
                         "arguments, or delete the checkpoint to start over")
    try:
        index = NeuronIndex.from_bundle(manifest, tensors, where=str(path))
        batches_done = _check_progress(manifest, index, shard_length, batch_size)
    except BundleError as exc:
        raise BundleError(f"cannot resume from checkpoint {path}: {exc}. Delete it to start over") from None
    stats = {name: _LayerStats.from_layer_index(layer, device, nan, backend) for name, layer in index.layers.items()}
    labels = index.labels.to(device) if index.labels is not None else None
    pixel_sum = index.meta.get("pixel_sum")
    pixels = torch.tensor(pixel_sum, dtype=torch.float64, device=device) if pixel_sum is not None else None
    return stats, batches_done, index.input_size, index.class_names, pixels, labels


def _check_progress(manifest: dict, index: NeuronIndex, shard_length: int, batch_size: int) -> int:
    """A checkpoint's ``batches_done``, checked against what its layers saw: a checkpoint is written after
    whole batches of its shard, so every layer saw min(batches_done * batch_size, shard length) images
    and, with labels, counts each of them in one class. A resume from a count that disagrees would add
    images twice or leave some out."""
    done = manifest.get("batches_done")
    batches = math.ceil(shard_length / batch_size)
    if not isinstance(done, int) or isinstance(done, bool) or not 1 <= done <= batches:
        raise BundleError(f"it records {done!r} batches done, not an int in [1, {batches}] (its shard has {batches} "
                          f"batches of {batch_size})")
    expected = min(done * batch_size, shard_length)
    for name, layer in index.layers.items():
        counted = int(layer.class_count.sum()) if layer.class_count is not None else expected
        if layer.images_seen != expected or counted != expected:
            raise BundleError(f"layer {name!r} saw {layer.images_seen} images (its class counts add up to {counted}), "
                              f"but {done} batch(es) of {batch_size} of its shard of {shard_length} are {expected}")
    return done


def _save_checkpoint(path, stats, fingerprint, batches_done, meta, pixel_sum, labels):
    index = _build_index(stats, meta, pixel_sum, labels)
    manifest, tensors = index.to_bundle()
    manifest.update(fingerprint=fingerprint, batches_done=batches_done)
    write_bundle(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, manifest, tensors)


def _index_meta(meta, layers: dict, input_size, pixel_sum) -> dict:
    """What an index records besides its tensors: the model's name, layer order, receptive fields, and
    the per-channel pixel sum and mean of the images seen (the "mean" pad of Neuron Features)."""
    out = {"model": meta["model"], "layer_order": list(layers)}
    if pixel_sum is not None:
        images = next(iter(layers.values())).images_seen if layers else 0
        pixel_count = images * math.prod(input_size or (0,))
        sums = [float(v) for v in pixel_sum.cpu()]
        out.update(pixel_sum=sums, pixel_count=int(pixel_count),
                   pixel_mean=[v / pixel_count for v in sums] if pixel_count else None)
    if meta.get("receptive_fields"):
        out["receptive_fields"] = meta["receptive_fields"]
    if meta.get("input_channels"):
        out["input_channels"] = meta["input_channels"]
    return out


def _build_index(stats, meta, pixel_sum=None, labels=None) -> NeuronIndex:
    layers = {name: s.to_layer_index() for name, s in stats.items()}
    return NeuronIndex(layers, meta["k"], meta["dataset_length"], meta["input_size"], meta["class_names"],
                       _index_meta(meta, layers, meta["input_size"], pixel_sum),
                       labels.cpu() if labels is not None else None)


def _model_input_channels(preprocess, pixel_sum, input_size, device) -> int:
    """Channels of what the model reads (its receptive fields are found on inputs of as many): the
    images' channels, after ``preprocess`` (which may make gray images RGB); 3 where no image was seen."""
    channels = pixel_sum.numel() if pixel_sum is not None else 3
    if preprocess is None or input_size is None:
        return channels
    try:
        with torch.no_grad():
            return int(preprocess(torch.zeros((1, channels) + tuple(input_size), device=device)).shape[1])
    except Exception:  # a preprocess that needs real images: their own channels
        return channels


def _receptive_fields(model, names, input_size, channels: int) -> dict:
    """Each layer's receptive field at the indexed input size, as plain numbers for the manifest."""
    found = {}
    # one walk of the graph for all the layers; a layer's error is its value
    for name, rf in receptive_fields(model, names, input_size, channels=channels, errors="return").items():
        if isinstance(rf, Exception):  # the index is complete: a field that cannot be found must not lose it
            warnings.warn(f"no receptive field recorded for {name!r} ({rf}); pass rf= to neuron_features",
                          stacklevel=3)
            continue
        found[name] = {"size": list(rf.size), "stride": list(rf.stride), "offset": list(rf.offset),
                       "whole_image": rf.whole_image, "method": rf.method}
    return found


def _check_ranks_agree(gathered, shards) -> None:
    """The checks a single process makes from batch to batch, between the ranks' shards (each rank
    checks only its own): one image size, one map size per layer, one number of channels, labels on
    all or none. Made alike on every rank, from what all gathered, so that all raise the same error
    (none is left waiting for the others)."""
    def images(rank):
        return f"{shards[rank][0]}..{shards[rank][1] - 1}"

    seen = [rank for rank, g in enumerate(gathered) if g[1] is not None]  # (ranks that saw images)
    if not seen:
        return
    first = seen[0]
    for rank in seen[1:]:
        _check_same(f"images {images(rank)}", "size", tuple(gathered[rank][1]), tuple(gathered[first][1]))
        _check_same(f"images {images(rank)}", "channels", gathered[rank][2].numel(), gathered[first][2].numel())
        for name, layer in gathered[rank][0].items():
            first_map = tuple(gathered[first][0][name].map_size)
            if tuple(layer.map_size) != first_map:
                raise ValueError(f"layer {name!r}: activation map size changed from {first_map} to "
                                 f"{tuple(layer.map_size)} (images {images(rank)}); every image must have the same "
                                 "size")
        if (gathered[rank][3] is None) != (gathered[first][3] is None):
            with_labels = [images(r) for r in seen if gathered[r][3] is not None]
            without = [images(r) for r in seen if gathered[r][3] is None]
            raise ValueError(f"some dataset items have labels and others do not (images {', '.join(with_labels)} "
                             f"have labels, images {', '.join(without)} do not)")


def _merge_ranks(dist, stats, meta, pixel_sum, labels, shard):
    """Gather every rank's layer indexes on every rank, check that the ranks' shards agree
    (``_check_ranks_agree``, on every rank); rank 0 folds them in rank order."""
    local = {name: s.to_layer_index() for name, s in stats.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (local, meta["input_size"], pixel_sum.cpu(),
                                      labels.cpu() if labels is not None else None, (shard.start, shard.stop)))
    _check_ranks_agree(gathered, [g[4] for g in gathered])
    if dist.get_rank() != 0:
        return None
    merged = {}
    for name in local:
        parts = [g[0][name] for g in gathered]
        tops = [TopK.from_state_dict(p.topk_state(), backend="torch") for p in parts]
        total = tops[0]
        for other in tops[1:]:
            total.merge(other)
        classes = max((p.class_sum.shape[0] for p in parts if p.class_sum is not None), default=None)
        class_sum = class_count = None
        if classes is not None:
            class_sum = sum(_grow(p.class_sum, classes) for p in parts if p.class_sum is not None)
            class_count = sum(_grow(p.class_count, classes) for p in parts if p.class_count is not None)
        merged[name] = LayerIndex(name, total.values, total.ids, total.positions, parts[0].map_size, total.count,
                                  sum(p.mean_sum for p in parts), class_sum, class_count)
    input_size = next((g[1] for g in gathered if g[1] is not None), None)
    pixels = sum(g[2] for g in gathered)
    parts = [g[3] for g in gathered if g[3] is not None]
    all_labels = torch.stack(parts).amax(dim=0) if parts else None  # each rank filled only its shard
    return NeuronIndex(merged, meta["k"], meta["dataset_length"], input_size, meta["class_names"],
                       _index_meta(meta, merged, input_size, pixels), all_labels)


@restores_modes
def index_dataset(model: nn.Module, dataset, layers, k: int = 100, preprocess=None, batch_size: int = 64,
                  num_workers: int = 0, device=None, autocast_dtype=None, checkpoint=None, checkpoint_every: int = 50,
                  progress: bool = True, backend: str | None = "auto", nan: str = "raise") -> NeuronIndex | None:
    """Stream ``dataset`` through ``model`` once and index every unit of ``layers``.

    ``dataset``: a map-style dataset of pixel-space images [3, H, W] in [0, 1], or (image, label)
    pairs; image ids are dataset positions. ``preprocess`` (e.g. normalisation) runs on the device
    before the model. The forward stops after the last requested layer. ``checkpoint``: a directory
    saved atomically every ``checkpoint_every`` batches; a run started again with the same arguments
    continues from it and gives exactly the uninterrupted result. Under torch.distributed, each rank
    indexes its shard; rank 0 returns the merged index, the other ranks return None. The model runs in
    eval mode; every module has its own mode back after.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = list(resolve_layers(model, layers))
    k, batch_size = positive_int("k", k), positive_int("batch_size", batch_size)
    check_preprocess(preprocess)
    checkpoint_every = positive_int("checkpoint_every", checkpoint_every)
    _check_map_style(dataset)
    length = dataset_length(dataset, "index")
    if k > length:
        raise ValueError(f"k={k} is larger than the dataset ({length} images); choose k <= {length}")

    dist, rank, world = _distributed()
    # Shards are whole batches of the single-process run, so that every image meets the same batch
    # composition (a convolution's rounding can depend on it) and the merged top-K equals it exactly (the
    # float64 sums of spatial means, added in another grouping, to their last bits).
    all_batches = math.ceil(length / batch_size)
    if world > all_batches:
        raise ValueError(f"{all_batches} batches of {batch_size} cannot feed {world} processes; "
                         "use a smaller batch_size or fewer processes")
    shard = range(min(length, rank * all_batches // world * batch_size),
                  min(length, (rank + 1) * all_batches // world * batch_size))
    device, param_dtype = eval_on_device(model, device)
    # everything that changes the activations: a resume must continue the same computation (only a checkpoint
    # reads it: without one, no weight is hashed and no image file stat-ed)
    fingerprint = None
    if checkpoint is not None:
        fingerprint = {"model": model_fingerprint(model), "data": dataset_fingerprint(dataset), "layers": names,
                       "k": k, "dataset_length": length, "batch_size": batch_size, "rank": rank, "world_size": world,
                       "nan": nan, "param_dtype": str(param_dtype), "autocast_dtype": str(autocast_dtype),
                       "preprocess": _preprocess_fingerprint(preprocess),
                       "preprocess_code": _preprocess_code(preprocess),
                       # (its own key: checkpoints written before it resume, their code checked as it was)
                       "preprocess_values": _preprocess_code(preprocess, reprs=True),
                       # (a bound method's object too: its own key, for the same reason)
                       "preprocess_objects": _preprocess_code(preprocess, reprs=True, selves=True),
                       "structure": structure_fingerprint(model, preprocess),
                       "data_geometry": dataset_geometry(dataset)}
        if fingerprint["data"] is None and len(shard):
            fingerprint["data_sample"] = sample_fingerprint(dataset, sorted({shard.start, shard.stop - 1}))
    classes = getattr(_base_dataset(dataset), "classes", None)  # (a Subset's too, those it has no image of)
    # (an empty list names no classes: labels are then checked against MAX_CLASSES, as with none)
    class_names = [str(c) for c in classes] if isinstance(classes, (list, tuple)) and len(classes) else None
    meta = {"k": k, "dataset_length": length, "input_size": None, "class_names": class_names,
            "model": type(model).__name__}
    if checkpoint is not None and world > 1:
        checkpoint = f"{os.fspath(checkpoint)}.rank{rank}"

    stats, batches_done, pixel_sum, all_labels = None, 0, None, None
    fresh = checkpoint is not None and os.path.isdir(checkpoint) and not os.listdir(checkpoint)  # e.g. just made
    if checkpoint is not None and not fresh and (os.path.exists(checkpoint) or recover_interrupted_write(checkpoint)):
        stats, batches_done, meta["input_size"], saved_names, pixel_sum, all_labels = _load_checkpoint(
            checkpoint, fingerprint, device, nan, backend, len(shard), batch_size)
        meta["class_names"] = saved_names if saved_names is not None else class_names
    total_batches = math.ceil(len(shard) / batch_size)
    start = shard.start + batches_done * batch_size
    loader = image_loader(_Positions(dataset, range(start, shard.stop)), batch_size, device, num_workers)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_batches, initial=batches_done, unit="batch", desc="indexing")
    try:
        with torch.no_grad(), LayerCapture(model, names) as capture, reading(loader) as batches:
            first_step = batches_done
            for step, batch in enumerate(batches, start=batches_done):
                images, labels = split_batch(batch)
                first_id = shard.start + step * batch_size
                check_pixel_batch(images, "index_dataset")
                with _pixels_checked_first(images, first_id):
                    labelled = labels is not None
                    if stats is not None and any(s.class_sum is not None for s in stats.values()) != labelled:
                        raise ValueError("some dataset items have labels and others do not")
                    if labels is not None and labels.numel():
                        _check_labels(labels, meta["class_names"], first_id)
                    _check_image_size(images, meta["input_size"], first_id)
                    ids = torch.arange(first_id, first_id + images.shape[0], device=device)
                    x = pixel_space(images.to(device, non_blocking=True))
                    pixel_range = _pixel_range(images, x)
                    pixels = x.sum(dim=(0, 2, 3), dtype=torch.float64)  # before preprocess: pixel space
                    if pixel_sum is not None:  # (sums of other channels would broadcast)
                        _check_same(f"images {first_id}..{first_id + images.shape[0] - 1}", "channels", pixels.numel(),
                                    pixel_sum.numel())
                    pixel_sum = pixels if pixel_sum is None else pixel_sum + pixels
                    if preprocess is not None:
                        x = preprocess(x)
                        _check_preprocess_size(images, x)
                    with autocast:
                        # the first batch runs the whole forward: a requested module that is called again
                        # later (shared) is an error before anything is recorded
                        run = capture.run_whole if step == first_step else capture.run
                        try:
                            outputs = run(x.to(param_dtype))
                        except RuntimeError as exc:
                            if (step != first_step or "out of memory" in str(exc)
                                    or isinstance(exc, LayerNotReachedError)):
                                raise
                            raise ValueError(_first_batch_failure(exc, tuple(images.shape[1:]), x.shape[1])) from exc
                    if stats is None:
                        meta["input_size"] = tuple(images.shape[-2:])
                        stats = {}
                        for name in names:
                            out = outputs[name]
                            if out.dim() not in (2, 4):
                                raise ValueError(f"layer {name!r} outputs shape {tuple(out.shape)}: index a layer "
                                                 "whose output is [B, C, H, W] or [B, C]")
                            if out.shape[1] == 0:
                                raise ValueError(f"layer {name!r} outputs shape {tuple(out.shape)}: it has no units "
                                                 "(0 channels); index a layer with at least one channel")
                            size = tuple(out.shape[2:]) if out.dim() == 4 else (1, 1)
                            stats[name] = _LayerStats(name, out.shape[1], k, size, device, nan, backend)
                    reduced = [stats[name].reduce(outputs[name], images.shape[0]) for name in names]
                    pixel_low_high, rare = _read_checks(pixel_range, [r.rare for r in reduced])  # the batch's one sync
                if pixel_low_high is not None:
                    _check_images(images, *pixel_low_high, first_id)
                label_dev = labels.to(device) if labels is not None else None
                if labels is not None:
                    if all_labels is None:
                        all_labels = torch.full((length,), -1, dtype=torch.int64, device=device)
                    all_labels[ids] = label_dev
                num_classes = int(labels.max()) + 1 if labels is not None and labels.numel() else 0
                num_classes = max(num_classes, len(meta["class_names"] or []))  # every named class gets a row
                for name, layer_reduced, layer_rare in zip(names, reduced, rare):
                    stats[name].add(outputs[name], layer_reduced, layer_rare, ids, label_dev, num_classes)
                batches_done = step + 1
                if bar is not None:
                    bar.update(1)
                if checkpoint is not None and (batches_done % checkpoint_every == 0 or batches_done == total_batches):
                    _save_checkpoint(checkpoint, stats, fingerprint, batches_done, meta, pixel_sum, all_labels)
    finally:
        if bar is not None:
            bar.close()
    meta["input_channels"] = _model_input_channels(preprocess, pixel_sum, meta["input_size"], device)
    meta["receptive_fields"] = (_receptive_fields(model, names, meta["input_size"], meta["input_channels"])
                                if rank == 0 else {})
    if dist is not None and world > 1:
        index = _merge_ranks(dist, stats, meta, pixel_sum, all_labels, shard)
    else:
        index = _build_index(stats, meta, pixel_sum, all_labels)
    if index is not None:
        index.dataset = dataset  # neuron_features and color_selectivity reload top images from it
    return index
