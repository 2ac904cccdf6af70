"""Color selectivity index (SPEC.md section 4, Rafegas et al.): how much a unit's top activations drop
when its top images lose their color. alpha_c = 1 - sum_j a'_j / sum_j a_j, where a'_j is the unit's
activation at the same position pos_j on a gray version of top image j."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .features import (batch_slots, check_finite_top_images, check_top_images_size, load_top_images,
                       refuse_nonfinite_rows, resolve_dataset)
from .hooks import LayerCapture, resolve_layers
from .neuron_index import NeuronIndex
from .prepare import check_preprocess, evaluating, model_device, param_dtype, pixel_space, positive_int, shortened
from .receptive_fields import ReceptiveField

__all__ = ["color_selectivity", "luminance", "pca_gray_crops", "GRAY_MODES"]

GRAY_MODES = ("luminance", "pca")
LUMA = (0.299, 0.587, 0.114)


def _floating_pixels(images: torch.Tensor, what: str) -> torch.Tensor:
    """Floating pixel-space images: uint8 ones are 8-bit pixels, made k / 255 (prepare.pixel_space, the
    values to_tensor gives); other integer dtypes have no agreed scale, so they are refused (the gray
    weights cast to an integer dtype would be 0, and a [0, 1] gray cast back to one would be 0 or 1)."""
    if images.dtype == torch.uint8:
        return pixel_space(images)
    if not images.is_floating_point():
        raise ValueError(f"{what}: images must be floating pixel-space images in [0, 1] or uint8 8-bit pixels, got "
                         f"{images.dtype}: convert them (e.g. images.float() / 255 for 8-bit codes held wider)")
    return images


def luminance(images: torch.Tensor) -> torch.Tensor:
    """0.299 R + 0.587 G + 0.114 B of [B, 3, H, W] images, replicated to 3 channels. Floating images
    keep their dtype (float16 and bfloat16 ones are weighted in float32, then rounded once); uint8
    images are 8-bit pixels and give float32 images in [0, 1] (k / 255 first, as
    ``prepare.pixel_space``); other integer dtypes raise a ValueError."""
    images = _floating_pixels(images, "luminance")
    work = torch.promote_types(images.dtype, torch.float32)
    weights = torch.tensor(LUMA, dtype=work, device=images.device)
    gray = torch.einsum("bchw,c->bhw", images.to(work), weights).to(images.dtype)
    return gray[:, None].expand(-1, 3, -1, -1).contiguous()


def pca_gray_crops(images: torch.Tensor, tops: torch.Tensor, size) -> torch.Tensor:
    """The authors' gray variant, one image per row: inside each row's RF box (top-left ``tops`` [P, 2],
    ``size`` (rh, rw), clipped to the image) the pixel colors are projected on their first principal
    component, min-max rescaled to [0, 1] and replicated to 3 channels; outside the box the image is
    unchanged. The component's sign is the one that correlates positively with luminance, so that
    bright stays bright; a box of one uniform color (no principal direction) takes its luminance.
    Floating images keep their dtype; uint8 images are 8-bit pixels and give float32 images in [0, 1]
    (k / 255 first, as ``prepare.pixel_space``); other integer dtypes raise a ValueError."""
    images = _floating_pixels(images, "pca_gray_crops")
    P, _, H, W = images.shape
    rh, rw = size
    ys = torch.arange(H, device=images.device)
    xs = torch.arange(W, device=images.device)
    inside_y = (ys[None] >= tops[:, :1]) & (ys[None] < tops[:, :1] + rh)  # [P, H]
    inside_x = (xs[None] >= tops[:, 1:]) & (xs[None] < tops[:, 1:] + rw)  # [P, W]
    mask = (inside_y[:, :, None] & inside_x[:, None, :]).to(images.dtype)  # [P, H, W]
    count = mask.sum(dim=(1, 2)).clamp_min(1)[:, None]
    pixels = images.double()
    m = mask.double()[:, None]
    mean = (pixels * m).sum(dim=(2, 3)) / count  # [P, 3]
    centred = (pixels - mean[:, :, None, None]) * m
    cov = torch.einsum("pchw,pdhw->pcd", centred, centred) / count[:, :, None]
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    axis = eigvecs[:, :, -1]  # [P, 3]
    luma = torch.tensor(LUMA, dtype=axis.dtype, device=axis.device)
    axis = torch.where((axis @ luma < 0)[:, None], -axis, axis)
    projected = torch.einsum("pchw,pc->phw", pixels - mean[:, :, None, None], axis)
    inf = torch.tensor(float("inf"), dtype=projected.dtype, device=projected.device)
    low = torch.where(mask.bool(), projected, inf).amin(dim=(1, 2))
    high = torch.where(mask.bool(), projected, -inf).amax(dim=(1, 2))
    span = high - low
    flat = span <= 1e-12
    scaled = (projected - low[:, None, None]) / torch.where(flat, torch.ones_like(span), span)[:, None, None]
    gray_luma = torch.einsum("pchw,c->phw", pixels, luma)
    gray = torch.where(flat[:, None, None], gray_luma, scaled).to(images.dtype)
    return torch.where(mask.bool()[:, None], gray[:, None].expand(-1, 3, -1, -1), images)


def _forward(capture, model_dtype, images, preprocess, autocast):
    x = images
    if preprocess is not None:
        x = preprocess(x)
    with autocast:
        return capture.run(x.to(model_dtype))


def _gather(output: torch.Tensor, slots: torch.Tensor, units: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """a'[c, j] = output[slots[c, j], c, positions[c, j]] for every hit (slot >= 0), in one indexing op."""
    flat = output.reshape(output.shape[0], output.shape[1], -1).float()
    hit = slots >= 0
    return flat[slots[hit], units.expand_as(slots)[hit], positions[hit]], hit


def _gather_every_slot(output: torch.Tensor, slots: torch.Tensor, units: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
    """[C, K] float64: output[slots[c, j], c, positions[c, j]], read at image 0 where a slot is elsewhere
    (slot -1: the caller keeps what it had there); no mask, so no device sync."""
    flat = output.reshape(output.shape[0], output.shape[1], -1)
    return flat[slots.clamp(min=0), units.expand_as(slots), positions].float().double()


def _check_deferred(unchecked_pixels: list, state: dict) -> None:
    """The luminance pass's checks, read once it is over: NaN or infinite pixels in a top image (the
    first batch's were checked at once), then NaN activations on gray images (the errors named as when
    each batch was checked)."""
    if unchecked_pixels and bool(torch.stack([bad.any() for _, bad in unchecked_pixels]).any()):
        for batch_ids, bad in unchecked_pixels:
            refuse_nonfinite_rows(batch_ids, bad.cpu())
    for name, s in state.items():
        if bool(torch.isnan(s["gray"]).any()):
            raise _nan_gray_error(name, s["gray"], s["units"].expand_as(s["ids"]), s["ids"])


def _nan_gray_error(name: str, values: torch.Tensor, units: torch.Tensor, image_ids: torch.Tensor) -> ValueError:
    """A NaN a'_j would make a live unit's alpha NaN, which SPEC.md keeps for dead units: an error (as NaN
    activations are when indexing), naming the layer, the units and the images (``units``, ``image_ids``:
    those of each entry of ``values``)."""
    nan = torch.isnan(values)
    bad_units = torch.unique(units[nan].cpu()).tolist()
    bad_ids = torch.unique(image_ids[nan].cpu()).tolist()
    return ValueError(f"color selectivity of {name!r}: the model gives NaN activations on the gray version of top "
                      f"image(s) {bad_ids[:5]} for unit(s) {bad_units[:10]} ({int(nan.sum())} in all): alpha would "
                      "be NaN for live units; check the model (e.g. a division that is 0 / 0 on gray pixels) and "
                      "its inputs")


def _check_reproduces(capture, model_dtype, images, batch_ids, state, layers, preprocess, autocast) -> None:
    """Warn when the model, as called here, does not give back the index's top activations a_j on the
    top images of one batch: a'_j / a_j would compare two models (another preprocess, autocast or
    weights than the index's), silently. One more forward of that batch; loose tolerances, so that
    another device or kernel's rounding passes."""
    # a copy: the batch is made gray after this, and a preprocess (Normalize(inplace=True)) or a model
    # may change its input in place
    outputs = _forward(capture, model_dtype, images.clone(), preprocess, autocast)
    for name, s in state.items():
        slots = batch_slots(batch_ids, s["ids"])
        now, hit = _gather(outputs[name], slots, s["units"], s["positions"])  # s["ids"]: valid slots only
        hit = hit.cpu()
        if not bool(hit.any()):
            continue
        L = layers[name]
        then, now = L.values[hit].double(), now.double().cpu()
        scale = L.values[:, :1].abs().double().expand_as(L.values)[hit]
        # written as "not close" so that a NaN now (no comparison holds) counts as a mismatch
        off = ~(torch.isclose(now, then, rtol=0.05, atol=0) | ((now - then).abs() <= 1e-3 * scale))
        if bool(off.any()):
            k = int(off.nonzero()[0])
            warnings.warn(f"color selectivity of {name!r}: the model does not give back the index's top activations "
                          f"on {int(off.sum())} of {int(hit.sum())} top-image slots checked (e.g. "
                          f"{float(then[k]):.4g}, now {float(now[k]):.4g}): pass the preprocess= and autocast_dtype= the index was built "
                          "with, and the same weights; alpha compares the two", stacklevel=3)


def color_selectivity(model: nn.Module, index: NeuronIndex, layer, dataset=None, gray: str = "luminance",
                      batch_size: int = 64, preprocess=None, num_workers: int = 0, device=None,
                      autocast_dtype=None, progress: bool = False):
    """Color selectivity alpha_c of every unit of ``layer`` (a name: returns a [C] float32 tensor; a
    list of names: returns {name: tensor}, the gray forwards shared by all of them).

    ``gray="luminance"``: each unique top image is made gray once (0.299 R + 0.587 G + 0.114 B) and run
    once, the forward stopped after the deepest layer; the activations at every (unit, image, position)
    of the top-K are gathered from it. ``gray="pca"``: per (unit, top image) pair, the RF box alone is
    made gray by ``pca_gray_crops``; the pairs are run in batches. ``preprocess`` and ``autocast_dtype``
    should be those the index was built with. The model runs in eval mode (its mode is restored after).
    Dead units (SPEC.md 3) give NaN. The index is not clamped: a gray image may excite a unit more.
    Live units whose top activations sum to 0 or less (a layer without a ReLU) get the formula's value
    as is (SPEC.md 4), with a warning naming them: it means nothing there. A NaN or infinite pixel in a
    top image, or a NaN activation of a live unit on a gray image, is a ValueError (naming the images,
    and the layer and units).
    """
    names = [layer] if isinstance(layer, str) else list(layer)
    resolve_layers(model, names)
    if gray not in GRAY_MODES:
        raise ValueError(f"gray must be one of {GRAY_MODES}, got {gray!r}")
    batch_size = positive_int("batch_size", batch_size)
    check_preprocess(preprocess)
    layers = {name: index[name] for name in names}
    dataset = resolve_dataset(index, dataset)
    if index.image_channels not in (None, 3):
        raise ValueError(f"color selectivity compares each top image with its gray version, so it needs RGB "
                         f"images; this index was built on {index.image_channels}-channel images")
    device, model_dtype = model_device(model, device), param_dtype(model)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    state = {}
    for name, L in layers.items():
        dead, valid = L.dead(), L.live_slots()
        state[name] = {"ids": torch.where(valid, L.ids, torch.full_like(L.ids, -1)).to(device),
                       "positions": L.positions.clamp(min=0).to(device), "valid": valid, "dead": dead,
                       # (luminance: filled on the device, batch after batch, with no sync; pca: on the CPU)
                       "gray": torch.zeros(L.values.shape, dtype=torch.float64,
                                           device=device if gray == "luminance" else "cpu"),
                       "units": torch.arange(L.num_units, device=device)[:, None]}
    all_ids = torch.cat([s["ids"].reshape(-1).cpu() for s in state.values()])
    # the luminance pass reads the device once, at the end (a sync a batch kept a GPU from overlapping the
    # next batch's loading with this one's forward): its pixel checks and its NaN checks wait until then
    unchecked_pixels = []

    top_images = load_top_images(dataset, all_ids, batch_size, num_workers, progress, f"color ({gray})", device)
    with evaluating(model), torch.no_grad(), LayerCapture(model, names) as capture, contextlib.closing(top_images):
        for step, (batch_ids, images) in enumerate(top_images):
            check_top_images_size(images, index)  # a'_j is read at pos_j of the index's maps
            images = pixel_space(images.to(device, non_blocking=True))
            if gray == "luminance" and step > 0:
                unchecked_pixels.append((batch_ids, ~torch.isfinite(images).flatten(1).all(dim=1)))
            else:
                check_finite_top_images(images, batch_ids)  # a NaN pixel would make a live unit's alpha NaN
            if step == 0:
                _check_reproduces(capture, model_dtype, images, batch_ids, state, layers, preprocess, autocast)
            if gray == "luminance":
                outputs = _forward(capture, model_dtype, luminance(images), preprocess, autocast)
                for name, s in state.items():
                    slots = batch_slots(batch_ids, s["ids"])
                    s["gray"] = torch.where(slots >= 0, _gather_every_slot(outputs[name], slots, s["units"],
                                                                           s["positions"]), s["gray"])
            else:
                for name, s in state.items():
                    _pca_batch(capture, model_dtype, name, s, index, batch_ids, images, preprocess, autocast,
                               batch_size)

    _check_deferred(unchecked_pixels, state)
    result = {}
    for name, L in layers.items():
        s = state[name]
        s["gray"] = s["gray"].cpu()
        top = torch.where(s["valid"], L.values.double(), torch.zeros((), dtype=torch.float64)).sum(dim=1)
        gray_sum = torch.where(s["valid"], s["gray"], torch.zeros((), dtype=torch.float64)).sum(dim=1)
        alpha = (1 - gray_sum / top).float()
        alpha[s["dead"]] = float("nan")
        _warn_where_no_positive_sum(top, s["dead"], name)
        result[name] = alpha
    return result[names[0]] if isinstance(layer, str) else result


def _warn_where_no_positive_sum(top, dead, name) -> None:
    """A warning naming the live units whose top activations sum to 0 or less (a layer without a ReLU):
    SPEC.md 4's alpha is reported as is (not clamped), but there it means nothing (a zero denominator
    gives +-inf or NaN, a negative one flips the index's sign)."""
    undefined = ~dead & (top <= 0)
    if bool(undefined.any()):
        units = undefined.nonzero().flatten().tolist()
        warnings.warn(f"color selectivity of {name!r}: {len(units)} live unit(s) ({shortened(units, 10)}) have top "
                      "activations that sum to 0 or less, so 1 - sum a'_j / sum a_j means nothing for them (reported as is: "
                      "+-inf, NaN or a flipped sign); index a layer after its ReLU to get positive activations",
                      stacklevel=3)


def _pca_batch(capture, model_dtype, name, s, index, batch_ids, images, preprocess, autocast, batch_size):
    rf: ReceptiveField | None = index.receptive_field(name)
    if rf is None:
        raise ValueError(f"gray='pca' needs the receptive field of {name!r}, which the index does not record")
    slots = batch_slots(batch_ids, s["ids"])
    hit = torch.nonzero(slots >= 0)  # [P, 2] (unit, j) pairs whose image is in this batch
    if hit.numel() == 0:
        return
    L = index[name]
    positions = s["positions"][hit[:, 0], hit[:, 1]]
    if rf.whole_image:
        tops = torch.zeros((hit.shape[0], 2), dtype=torch.int64, device=images.device)
    else:
        tops = rf.tops(positions, L.map_size[1]).to(images.device)
    for start in range(0, hit.shape[0], batch_size):
        part = slice(start, start + batch_size)
        pairs = hit[part]
        grayed = pca_gray_crops(images[slots[pairs[:, 0], pairs[:, 1]]], tops[part], rf.size)
        out = _forward(capture, model_dtype, grayed, preprocess, autocast)[name]
        flat = out.reshape(out.shape[0], out.shape[1], -1).float()
        rows = torch.arange(pairs.shape[0], device=flat.device)
        values = flat[rows, pairs[:, 0], positions[part]]
        if bool(torch.isnan(values).any()):
            image_ids = batch_ids.to(slots.device)[slots[pairs[:, 0], pairs[:, 1]]]
            raise _nan_gray_error(name, values, pairs[:, 0], image_ids)
        s["gray"][pairs[:, 0].cpu(), pairs[:, 1].cpu()] = values.double().cpu()
