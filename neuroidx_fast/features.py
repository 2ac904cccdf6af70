"""Neuron Features (SPEC.md section 3, Rafegas et al.): the activation-weighted average of the
receptive-field crops of each unit's top-K images, made in one second pass over the unique top images."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import Subset

from . import backends, ops
from .background import reading
from .neuron_index import NeuronIndex
from .ops.crop_operands import codes_pay_off
from .png import image_grid, save_png, to_uint8
from .prepare import (as_index, canonical_device, check_pixel_batch, dataset_length, image_loader, integer_tensor,
                      nonfinite_images, pins_batches, positive_int, split_batch)
from .receptive_fields import ReceptiveField, receptive_field

__all__ = ["NeuronFeatures", "neuron_features", "save_grid", "save_unit", "load_top_images"]

NORMS = ("sum", "k")


@dataclass
class NeuronFeatures:
    """The Neuron Features of one layer.

    ``nf`` [C, 3, rh, rw] float32 in [0, 1], NaN for dead units; ``crops`` [C, keep, 3, rh, rw] uint8
    (keep = min(keep_crops, K): no more crops than the index holds top images per unit): the crops of
    each unit's best ``keep`` top images (zeros where there is none; a dead unit has none: with a_1 <= 0
    its top images are not ones that drive it, e.g. every image ties at 0 after a ReLU); ``crop_ids`` and
    ``crop_values`` [C, keep]: their dataset ids (-1: none) and activations; ``dead`` [C] bool;
    ``weight_sum`` [C]: sum of the weights a_j / a_1 (NaN for dead units); ``units`` [C]: which units of the layer these are.
    """

    layer: str
    nf: torch.Tensor
    crops: torch.Tensor
    crop_ids: torch.Tensor
    crop_values: torch.Tensor
    dead: torch.Tensor
    weight_sum: torch.Tensor
    units: torch.Tensor
    rf: ReceptiveField
    pad: object = "gray"
    norm: str = "sum"

    def save_grid(self, path, **kwargs) -> str:
        return save_grid(self, path, **kwargs)

    def save_unit(self, unit: int, path, **kwargs) -> str:
        return save_unit(self, unit, path, **kwargs)


def load_top_images(dataset, ids: torch.Tensor, batch_size: int, num_workers: int = 0, progress: bool = False,
                    desc: str = "top images", device=None):
    """Yield ``(batch_ids, images)`` for the sorted unique ``ids``, in id order and batches: each image
    is loaded once whatever number of units rank it. Images come as the dataset gives them: floating, or
    uint8 8-bit pixels (prepare.pixel_space); for a CUDA ``device``, images and ids in page-locked
    memory (asynchronous copies there: ``prepare.image_loader``, ``batch_slots``)."""
    ids = torch.unique(ids[ids >= 0].cpu())
    if pins_batches(device or "cpu"):
        ids = ids.pin_memory()  # (its slices, the batch ids, are page-locked too)
    loader = image_loader(Subset(dataset, ids.tolist()), batch_size, device or "cpu", num_workers)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), unit="batch", desc=desc)
    try:
        start = 0
        with reading(loader) as batches:
            for batch in batches:
                images = split_batch(batch)[0]
                check_pixel_batch(images, "top images")
                yield ids[start:start + images.shape[0]], images
                start += images.shape[0]
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def batch_slots(batch_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of ``batch_ids`` (sorted) holding each entry of ``ids``; -1 where the image is elsewhere."""
    batch_ids = batch_ids.to(ids.device, non_blocking=True)  # (asynchronous from load_top_images' pinned ids)
    where = torch.searchsorted(batch_ids, ids).clamp(max=batch_ids.numel() - 1)
    hit = (ids >= 0) & (batch_ids[where] == ids)
    return torch.where(hit, where, torch.full_like(where, -1))


def check_top_images_size(images: torch.Tensor, index: NeuronIndex, channels=(3,)) -> None:
    """Top images must be what the index saw (positions and receptive fields are in its pixels), with
    one of ``channels``."""
    seen = index.image_channels
    if index.input_size is not None and (tuple(images.shape[-2:]) != tuple(index.input_size)
                                         or (seen is not None and images.shape[1] != seen)):
        raise ValueError(f"top images are {tuple(images.shape[1:])} but the index was built on "
                         f"{'' if seen is None else f'{seen} x '}{tuple(index.input_size)} images: pass the dataset "
                         "the index was built from")
    if images.shape[1] not in channels:
        raise ValueError(f"top images have {images.shape[1]} channels; this needs "
                         f"{' or '.join(map(str, channels))}-channel images")


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] images: gray ones (1 channel) with their value in each of R, G and B."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _resolve_rf(index: NeuronIndex, layer: str, rf, model) -> ReceptiveField:
    if index.input_size is None:  # (index_dataset records it; NeuronIndex.load refuses a bundle without it)
        raise ValueError("the index records no input size, so its positions cannot be mapped to image pixels: "
                         "index the dataset again with index_dataset")
    if rf is None and model is not None:
        channels = index.meta.get("input_channels") or index.image_channels or 3  # what the model reads
        rf = receptive_field(model, layer, index.input_size, channels=channels)
    if rf is None:
        rf = index.receptive_field(layer)
    if rf is None:
        raise ValueError(f"the index records no receptive field for {layer!r}: pass model= (to compute it) or rf=")
    if not isinstance(rf, ReceptiveField):
        raise TypeError(f"rf must be a ReceptiveField, got {type(rf).__name__}")
    if tuple(rf.input_size) != tuple(index.input_size):
        raise ValueError(f"the receptive field is for {tuple(rf.input_size)} inputs, but the index saw "
                         f"{tuple(index.input_size)} images: pass the receptive field of {layer!r} at the index's "
                         f"input size (receptive_field(model, {layer!r}, {tuple(index.input_size)}))")
    if min(rf.size) < 1 or (not rf.whole_image and min(rf.stride) < 1):
        raise ValueError(f"the receptive field has size {tuple(rf.size)} and stride {tuple(rf.stride)}: both must be "
                         "positive (a ReceptiveField made by hand?)")
    map_size = tuple(index[layer].map_size)
    if rf.map_size is not None and tuple(rf.map_size) != map_size:
        raise ValueError(f"the receptive field is of a layer with {tuple(rf.map_size)} maps, but {layer!r} has "
                         f"{map_size} maps in the index: pass the receptive field of this layer at the index's "
                         f"input size (receptive_field(model, {layer!r}, {tuple(index.input_size)}))")
    return rf


def check_finite_top_images(images: torch.Tensor, batch_ids: torch.Tensor) -> None:
    """A ValueError naming the top images (``batch_ids``) of a batch that hold NaN or infinite pixels: a
    NaN pixel would make a live unit's NF (or color selectivity) NaN, which is for dead units only.
    8-bit pixels (uint8) are finite."""
    if images.dtype == torch.uint8:
        return
    refuse_nonfinite_rows(batch_ids, nonfinite_images(images).cpu())


def refuse_nonfinite_rows(batch_ids: torch.Tensor, rows: torch.Tensor) -> None:
    """check_finite_top_images' error, for the ``rows`` (indices or a bool mask, on the CPU) of a batch
    found to hold NaN or infinite pixels; nothing where there are none."""
    bad = batch_ids[rows][:5].tolist()
    if bad:
        raise ValueError(f"top images {bad} hold NaN or infinite pixels: the dataset must give finite pixel-space "
                         "images in [0, 1]")


def _check_top_images(images: torch.Tensor, batch_ids: torch.Tensor, warned: list) -> None:
    """Finite pixels (check_finite_top_images), in [0, 1] (else warn once: the NF is clamped to [0, 1], so
    normalised images give a washed-out NF); 8-bit pixels (uint8) are both."""
    check_finite_top_images(images, batch_ids)
    if images.dtype != torch.uint8 and not warned and images.numel():
        low, high = torch.aminmax(images)  # one pass over the batch, not two
        if float(low) >= -1e-3 and float(high) <= 1 + 1e-3:
            return
        warned.append(True)
        warnings.warn("top images are outside [0, 1]: Neuron Features are averages of pixel-space crops, clamped "
                      "to [0, 1]; pass the images before normalisation", stacklevel=3)


def resolve_dataset(index: NeuronIndex, dataset):
    """The dataset a second pass over an index's top images reads: ``dataset``, else the one the index
    was built from (kept while in memory); it must hold at least the images the index was built on."""
    dataset = dataset if dataset is not None else index.dataset
    if dataset is None:
        raise ValueError("no dataset: this index was loaded from disk, so pass the dataset it was built from "
                         "(dataset=...)")
    if dataset_length(dataset, "read") < index.dataset_length:
        raise ValueError(f"the dataset has {len(dataset)} images but the index was built on {index.dataset_length}: "
                         "pass the dataset the index was built from")
    return dataset


def resolve_pad(pad, index: NeuronIndex):
    """``pad`` as the crop ops take it (pad="mean": the index's pixel mean), checked."""
    if isinstance(pad, str) and pad not in ("gray", "zero", "edge", "mean"):
        raise ValueError(f"unknown pad mode {pad!r}; use 'gray', 'zero', 'edge', 'mean', a number or one number "
                         "per channel")
    if isinstance(pad, str) and pad == "mean":
        mean = index.meta.get("pixel_mean")
        if mean is None:
            raise ValueError("pad='mean' needs the dataset's pixel mean, which this index does not record; pass "
                             "pad=(r, g, b) with the mean yourself")
        mean = tuple(float(v) for v in mean)
        pad = mean * 3 if len(mean) == 1 else mean  # gray images are made RGB (as_rgb)
    value = ops.pad_value(pad, 3, "cpu")  # a bad value is an error now, not after a pass over the images
    if not isinstance(pad, str) and value is not None and bool(((value < 0) | (value > 1)).any()):
        # e.g. a mean in 0-255 units: white padding, with no word
        raise ValueError(f"pad values are pixels in [0, 1] (crops are cut from pixel-space images; 8-bit values "
                         f"are k / 255), got {value.tolist()}")
    return pad


KEPT_CROP_CHUNK_BYTES = 64 << 20


def _keep_crops(crops, images, kept, tops, size, pad, backend) -> None:
    """crops[u, j] = the uint8 crop of each kept slot (u, j) of this batch that holds one of its images, cut
    as float32 and converted a chunk at a time: all of a batch's at once took several full float copies of
    them (256 units' 9 crops of 427 x 427 px, a ResNet layer4 field: 22 GB at the peak)."""
    where = (kept >= 0).nonzero()
    chunk = max(1, KEPT_CROP_CHUNK_BYTES // (3 * size[0] * size[1] * 4))
    for start in range(0, where.shape[0], chunk):
        u, j = where[start:start + chunk].unbind(1)
        cut = ops.gather_crops(images, kept[u, j], tops[u, j], size, pad, backend)
        crops[u.cpu(), j.cpu()] = to_uint8(cut).cpu()


def neuron_features(index: NeuronIndex, layer: str, dataset=None, pad="gray", norm: str = "sum",
                    keep_crops: int = 9, batch_size: int = 64, num_workers: int = 0, units=None, rf=None,
                    model=None, device=None, backend: str | None = "auto", progress: bool = False) -> NeuronFeatures:
    """Neuron Features of every unit of ``layer`` (or of ``units``).

    The top images are reloaded from ``dataset`` (default: the dataset the index was built from, while
    in memory), each unique image once, in id order, in batches; every unit's crops are cut from those
    batches at once. ``pad``: "gray" (0.5), "zero", "mean" (the dataset's pixel mean, recorded by
    ``index_dataset``), "edge", or numbers. ``norm``: "sum" (NF = sum_j w_j I_j / sum_j w_j) or "k"
    (the paper's (1/K) sum_j w_j I_j, K = the unit's top images). The receptive field comes from
    ``rf``, else from ``model``, else from the index. NF values are clamped to [0, 1]; with images in
    [0, 1], this only matters where some top activations are negative (pre-activation layers), which
    gives negative weights. Where
    those weights sum to 0 (or to no finite number) the NF is undefined: NaN, with a warning. Top slots
    at -inf (all-NaN maps under ``nan="ignore"``) take no part: no weight, no crop. Gray (1-channel)
    images are cropped as the RGB images (g, g, g) they show: their NFs and crops are RGB too.
    """
    if not isinstance(index, NeuronIndex):
        raise TypeError(f"index must be a NeuronIndex (index_dataset's result, or NeuronIndex.load), got "
                        f"{type(index).__name__}")
    L = index[layer]
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    keep_crops = positive_int("keep_crops", keep_crops, zero_ok=True)
    batch_size = positive_int("batch_size", batch_size)
    dataset = resolve_dataset(index, dataset)
    rf = _resolve_rf(index, layer, rf, model)
    pad = resolve_pad(pad, index)
    device = canonical_device(device) if device is not None else torch.device("cpu")
    if units is None:
        units = torch.arange(L.num_units)
    else:
        units = integer_tensor("units (channel indices)", units).reshape(-1)
        if units.numel() == 0:
            raise ValueError("units is empty: name at least one unit, or pass units=None for all of them")
    if units.numel() and (int(units.min()) < 0 or int(units.max()) >= L.num_units):
        raise IndexError(f"units must lie in [0, {L.num_units}) for layer {layer!r}")

    values, ids, positions = L.values[units], L.ids[units], L.positions[units]
    dead = L.dead()[units]
    # Slots at -inf (all-NaN maps under nan="ignore", or a true -inf) carry no weight and no crop: a_j / a_1
    # = -inf would turn a live unit's NF into NaN or, clamped, black; they are not images that drive it.
    valid = L.live_slots()[units]
    ids = torch.where(valid, ids, torch.full_like(ids, -1))
    # NF = sum_j w_j I_j / sum_j w_j with w_j = a_j / a_1 (SPEC.md 3) is sum_j a_j I_j / sum_j a_j: the kernels
    # add a_j I_j, the top activations themselves as weights (float32: each product with a pixel is exact in
    # float64, whatever their range), and the sums are divided by sum_j a_j summed exactly, which is 0
    # where the NF is undefined (weights a_j / a_1 rounded first made a = 3, -1, -2 sum to 1e-16, and the NF
    # of rounding noise, clamped, black). norm="k": (1/K) sum_j w_j I_j = sum_j a_j I_j / (K a_1).
    # a_1 = +inf (an ordinary value, SPEC.md 1): the limit of a_j / a_1 is 1 for the other +inf, else 0
    # (inf / inf would make the NF of a live unit NaN), so those weights are 1 and the scale a_1 is 1.
    infinite_top = torch.isposinf(values[:, :1])
    weights = torch.where(infinite_top, (values == float("inf")).float(), values)
    weights = torch.where(valid, weights, torch.zeros_like(weights)).contiguous()
    top_scale = torch.where(infinite_top[:, 0], 1.0, values[:, 0].double())
    exact_sum = torch.tensor([math.fsum(row) for row in weights.double().tolist()], dtype=torch.float64)
    if rf.whole_image:
        tops = torch.zeros(ids.shape + (2,), dtype=torch.int64)
    else:
        tops = rf.tops(positions.clamp(min=0), L.map_size[1])
    rh, rw = rf.size
    C, K = ids.shape
    keep = min(keep_crops, K)
    sums = torch.zeros((C, 3, rh, rw), dtype=torch.float64, device=device)
    crops = torch.zeros((C, keep, 3, rh, rw), dtype=torch.uint8)
    ids_dev, tops_dev, weights_dev = ids.to(device), tops.to(device), weights.to(device)
    try_codes = device.type == "cpu" and backends.resolve_name(backend, device) == "cpp"
    warned: list = []
    top_images = load_top_images(dataset, ids, batch_size, num_workers, progress, f"NF {layer}", device)
    with contextlib.closing(top_images):  # (on an error, its batches stop being read at once)
        for batch_ids, images in top_images:
            check_top_images_size(images, index, channels=(1, 3))
            # 8-bit pixels stay uint8: the pixel codes every backend reads (ops.as_pixel_codes): k / 255 exactly
            images = images.to(device=device, dtype=None if images.dtype == torch.uint8 else torch.float32,
                               non_blocking=True)
            _check_top_images(images, batch_ids, warned)  # on the device: a GPU checks a batch in a fraction of ms
            images = as_rgb(images).contiguous()
            slots = batch_slots(batch_ids, ids_dev)
            # Pixels from 8-bit files (k / 255) are passed as uint8 codes: the same bits, a quarter of the bytes
            # for the cpp kernels to read; worth the one pass over the batch that finds them where codes_pay_off
            # (batches whose crops read each pixel often enough: fewer times with the AVX-512 loops). Found here
            # once for both the sums and the kept crops (the accumulation alone would find them itself). Once a
            # batch is not 8-bit, the later ones are not tried.
            if try_codes and codes_pay_off(images, slots, (rh, rw), backends.get("cpp", device).code_loops()):
                codes = ops.as_pixel_codes(images, backend)
                try_codes = codes is not None
                images = images if codes is None else codes
            ops.accumulate_crops(sums, images, slots, tops_dev, weights_dev, pad, backend)
            if keep:
                _keep_crops(crops, images, slots[:, :keep], tops_dev[:, :keep], (rh, rw), pad, backend)
    # sum_j w_j (NaN for a dead unit: it has no NF, SPEC.md 3)
    weight_sum = torch.where(dead, float("nan"), exact_sum / top_scale)
    denominator = exact_sum if norm == "sum" else valid.sum(dim=1).double() * top_scale
    nf = (sums.cpu() / denominator[:, None, None, None]).to(torch.float32).clamp_(0, 1)
    # Negative top activations (pre-activation layers) give negative weights: their sum can be 0 or
    # below. NF = sum_j w_j I_j / sum_j w_j as it is where that is a number; NaN where not.
    defined = torch.isfinite(denominator) & (denominator != 0)
    undefined = ~dead & ~defined
    if bool(undefined.any()):
        warnings.warn(f"the Neuron Feature of {int(undefined.sum())} live unit(s) of {layer!r} is undefined (their "
                      f"top weights a_j / a_1 sum to 0): NaN images for units "
                      f"{units[undefined].tolist()[:10]}", stacklevel=2)
    nf[dead | undefined] = float("nan")
    return NeuronFeatures(layer, nf, crops, ids[:, :keep].clone(), torch.where(valid, values,
                          torch.full_like(values, float("-inf")))[:, :keep].clone(), dead, weight_sum.float(),
                          units, rf, pad, norm)


def _scale_for(size, target: int = 64) -> int:
    return max(1, target // max(size))


def _grid_rows(features: NeuronFeatures, units) -> torch.Tensor:
    """Rows of ``features`` that ``units`` names: positions in ``features.units``, or a bool mask over them."""
    count = features.nf.shape[0]
    rows = torch.as_tensor(units).reshape(-1)
    if rows.numel() == 0:
        raise ValueError("units selects no unit: nothing to draw")
    if rows.dtype == torch.bool:
        if rows.numel() != count:
            raise ValueError(f"a units mask needs one entry per unit of these features ({count}), got {rows.numel()}")
        rows = rows.nonzero().flatten()
    elif rows.is_floating_point() or rows.is_complex():
        raise ValueError(f"units must be positions in features.units (ints) or a bool mask, got {rows.dtype} values")
    rows = rows.to(torch.int64)
    if rows.numel() == 0:
        raise ValueError("the units mask selects no unit: nothing to draw")
    if int(rows.min()) < -count or int(rows.max()) >= count:  # negative: from the end, as in Python
        raise IndexError(f"units must be positions in [0, {count}) of features.units (these features hold "
                         f"{count} units), got {rows.tolist()[:10]}")
    return rows


def save_grid(features: NeuronFeatures, path, units=None, ncols: int | None = None, scale: int | None = None) -> str:
    """A PNG grid of the layer's NFs in unit order (dead units drawn dark gray); ``units``: positions in
    ``features.units`` (or a bool mask over them, e.g. ``~features.dead``) to draw only those."""
    nf = features.nf if units is None else features.nf[_grid_rows(features, units)]
    ncols = positive_int("ncols", ncols, none_means="the default")
    scale = positive_int("scale", scale, none_means="the default")
    scale = scale or _scale_for(nf.shape[-2:])
    return save_png(image_grid(nf, ncols=ncols, scale=scale), path)


def save_unit(features: NeuronFeatures, unit: int, path, scale: int | None = None) -> str:
    """A PNG strip for one unit of the layer (a unit index, one of ``features.units``): its NF, then its
    top crops."""
    number = as_index(unit)
    if number is None:
        raise ValueError(f"unit must be a unit index of layer {features.layer!r} (an int), got {unit!r}")
    rows = (features.units == number).nonzero().flatten()
    if rows.numel() == 0:
        held = features.units.tolist()
        raise IndexError(f"unit {number} of layer {features.layer!r} is not among the {len(held)} units of these "
                         f"features ({held[:10]}{' ...' if len(held) > 10 else ''})")
    row = int(rows[0])
    scale = positive_int("scale", scale, none_means="the default")
    tiles = [features.nf[row]] + [c for c, i in zip(features.crops[row], features.crop_ids[row]) if int(i) >= 0]
    scale = scale or _scale_for(features.nf.shape[-2:])
    return save_png(image_grid(tiles, ncols=len(tiles), scale=scale), path)
