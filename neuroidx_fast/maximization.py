"""Activation maximisation (SPEC.md section 7): many units optimised in one batch, one image per unit,
and the dual objective of Stergiou's "The Mind's Eye" (features of an image set as targets).

The forward runs only up to the layer (``UnitObjective`` stops it there; when the layer is a plain
Conv2d or Linear, it stops before the layer and reads the objective as a dot product with the layer's
input, see unit_objective.py). During the optimisation the model is in eval mode with its parameters'
``requires_grad`` off (only the image needs a gradient, and no weight gradient is computed); both are
restored afterwards and the weights are never written.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from .heap import reuse_freed_memory
from .hooks import resolve_layers
from .image_conv_grad import image_conv_gradients
from .image_param import PARAMS, ImageParam, RandomTransforms, total_variation
from .prepare import (as_index, as_seed, check_pixel_range, model_device as _model_device, nonfinite_images,
                      param_dtype, pixel_space, positive_int)
from .unit_objective import OBJECTIVES, UnitObjective

__all__ = ["maximize", "maximize_towards", "unit_activations", "save_maximized", "TowardsResult"]

# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def frozen_eval(model: nn.Module, device: torch.device, preprocess=None, image_gradients: bool = True):
    """Eval mode, no parameter gradients, gradients enabled, deterministic cuDNN on CUDA; all restored.
    A ``preprocess`` that is a module (a learnt colour adapter, a normalisation layer) is part of the path
    to the model and is frozen the same way: else a Dropout in train mode would make runs differ and the
    image's gradient would pile up in its parameters' ``.grad``. Gradients are on even inside the caller's
    ``torch.inference_mode()``, which ``enable_grad`` alone does not leave (nothing would be recorded).
    Meanwhile, on the CPU, convolutions that read the image compute their pixel gradient by phases
    (image_conv_grad.py) and freed memory is kept for reuse (heap.py: the steps of an optimisation
    allocate and free the same large temporaries, which glibc would otherwise fault in anew each step).
    With ``image_gradients`` (a backward to the image will run), parameters made inside
    ``torch.inference_mode()`` are refused up front: autograd cannot save them, and the error it gives
    names neither the cause nor the fix."""
    roots = [model] + ([preprocess] if isinstance(preprocess, nn.Module) else [])
    if image_gradients:
        _refuse_inference_tensors(roots)
    training = {m: m.training for root in roots for m in root.modules()}
    requires = {p: p.requires_grad for root in roots for p in root.parameters()}
    cudnn = torch.backends.cudnn
    saved_cudnn = (cudnn.deterministic, cudnn.benchmark)
    try:
        for root in roots:
            root.eval()
        for p in requires:
            p.requires_grad_(False)
        if device.type == "cuda":  # cuDNN may pick non-deterministic (atomic) backward algorithms otherwise
            cudnn.deterministic, cudnn.benchmark = True, False
        cpu = device.type == "cpu"
        with torch.inference_mode(False), torch.enable_grad(), reuse_freed_memory(enabled=cpu), \
                image_conv_gradients(model, enabled=cpu):
            yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved_cudnn
        for m, flag in training.items():
            m.training = flag
        # inside inference mode, where torch sets requires_grad on inference tensors too: outside it refuses
        # True for them, and that refusal stopped the loop with the other parameters left frozen
        with torch.inference_mode():
            for p, flag in requires.items():
                p.requires_grad_(flag)


def _refuse_inference_tensors(roots) -> None:
    """A ValueError when a parameter of ``roots`` is an inference tensor (made or loaded inside
    ``torch.inference_mode()``), which no backward may save. (Buffers are left alone: one that the
    backward never saves, such as an added bias, works.)"""
    for root in roots:
        for name, tensor in root.named_parameters():
            if tensor.is_inference():
                what = "the model's" if root is roots[0] else "the preprocess module's"
                raise ValueError(f"{what} parameters are inference tensors ({name!r} among them), which autograd "
                                 "cannot use for the image's gradient: build or load it outside "
                                 "torch.inference_mode() (torch.no_grad() is enough there)")


def model_device(model: nn.Module, device) -> torch.device:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with torch.inference_mode(False):  # a move inside the caller's inference_mode would make inference tensors
        return _model_device(model, device)  # of the parameters, which autograd then refuses to save


def _one_layer(model, layer) -> str:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be one module name (a str), got {type(layer).__name__}")
    return next(iter(resolve_layers(model, [layer])))


def _size(size) -> tuple[int, int]:
    """(h, w) from one side or a pair; integers as ``as_index`` reads them (NumPy integers and 0-d integer
    tensors too, as for steps, seed and units), never bools or floats."""
    side = as_index(size)
    sides = [side, side] if side is not None else list(size) if isinstance(size, (tuple, list)) else None
    sides = None if sides is None or len(sides) != 2 else [as_index(s) for s in sides]
    if sides is None or any(s is None or s < 1 for s in sides):
        raise ValueError(f"size must be a positive int or a pair (h, w) of them, got {size!r}")
    return sides[0], sides[1]


def _positive(name, value, integer=False, zero_ok=False):
    """``value`` checked (a positive, or with ``zero_ok`` non-negative, number; an int when ``integer``:
    NumPy integers too) and returned as a Python int or float. Strings are refused, numeric ones too: the
    caller computes with the number, and a "0.05" that passed here failed later with torch's TypeError."""
    number = as_index(value)
    if number is None and not integer and not isinstance(value, (bool, str, bytes)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
    if number is None or not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
        kind = "int" if integer else "number"
        raise ValueError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} {kind}, got {value!r}")
    return number


def _units(units) -> list[int]:
    if isinstance(units, torch.Tensor):
        if units.dtype.is_floating_point or units.dim() > 1:
            raise ValueError(f"units must be integer channel indices, got a {units.dtype} tensor of shape "
                             f"{tuple(units.shape)}")
        units = units.reshape(-1).tolist()
    else:
        single = as_index(units)
        try:
            units = [single] if single is not None else list(units)
        except TypeError:
            raise ValueError(f"units must be ints (channel indices), got {units!r}") from None
    if not units:
        raise ValueError("no units given: name at least one channel of the layer")
    indices = [as_index(u) for u in units]
    if any(i is None for i in indices):
        raise ValueError(f"units must be ints (channel indices), got {units!r}")
    return indices


def _check_units(units, width, name):
    bad = [u for u in units if not 0 <= u < width]
    if bad:
        raise ValueError(f"unit(s) {bad[:5]} out of range: layer {name!r} has {width} units (0..{width - 1})")


def _gap(out: torch.Tensor) -> torch.Tensor:
    return out.float() if out.dim() == 2 else out.float().mean(dim=(2, 3))


def _chunks(n, size):
    size = n if size is None else size
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _model_input(images, transforms, step, readout: UnitObjective):
    """The model input for pixel-space ``images``: warped by ``transforms`` (at ``step``) if given, then
    through the readout's one input path (preprocess, dtype, memory layout)."""
    return readout.model_input(transforms(images, step) if transforms is not None else images)


def _note_bad(first: torch.Tensor, bad: torch.Tensor, step: int) -> torch.Tensor:
    """``first`` [U] (the step at which each row first went ``bad``; -1: not yet) updated at ``step``. It
    stays on the device: a check at every step would make every step wait for the device."""
    return torch.where((first < 0) & bad, step, first)


def _nan_gradient(image: ImageParam) -> torch.Tensor:
    """[U] whether the gradient of each image's parameters holds NaN."""
    return image.params.grad.isnan().flatten(1).any(1)


def _check_finite_run(name, what, labels, first_objective, first_gradient, steps, nonfinite="NaN"):
    """A ValueError naming layer ``name``, the rows (``what`` ``labels[row]``) and the step where a run first
    went wrong (as ``_note_bad`` keeps them; step 0 is the start image, steps + 1 the result): its objective
    went ``nonfinite``, or before that its image's gradient went NaN. Only the rows at that earliest step
    are named: the others may have caught it from them (0 * NaN in the batched backward, then NaN images)."""
    firsts = {"objective": first_objective.cpu(), "gradient": first_gradient.cpu()}
    met = {kind: first[first >= 0] for kind, first in firsts.items()}
    if not any(m.numel() for m in met.values()):
        return
    step = min(int(m.min()) for m in met.values() if m.numel())
    kind = "objective" if bool((firsts["objective"] == step).any()) else "gradient"  # (the objective comes first)
    bad = [labels[r] for r in (firsts[kind] == step).nonzero().reshape(-1).tolist()][:8]
    when = "on the start image" if step == 0 else "on the result" if step > steps else f"at step {step} of {steps}"
    if kind == "objective":
        raise ValueError(f"{nonfinite} in the objective of layer {name!r} for {what} {bad} {when}: the model's "
                         f"activations there are {nonfinite} (NaN weights, or an overflow in float16); no image can "
                         "be made for them: check the model, or leave them out")
    raise ValueError(f"NaN in the gradient to the image of {what} {bad} of layer {name!r} {when}, though the "
                     "objective was finite: a layer up to that one has NaN weights (its backward mixes channels) "
                     "or a NaN derivative; check the model")


def _adam(params: torch.Tensor, lr: float) -> torch.optim.Adam:
    """Adam on the image parameters, fused (one kernel per step) where torch has it for the device: on
    the CPU at batch 64 its step takes 0.7 ms instead of 3.5 ms for the default form's eight passes
    (the same update, up to float rounding; deterministic either way)."""
    try:
        return torch.optim.Adam([params], lr=lr, fused=True)
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.Adam([params], lr=lr)


def _descend(loss, x, tv, optimiser, image, step, blur_every, blur_sigma):
    """One optimisation step on ``loss`` plus ``tv`` * the total variation of ``x``; then every
    ``blur_every`` steps (0: never) the image is blurred (std ``blur_sigma``)."""
    if tv:
        loss = loss + tv * total_variation(x).sum()
    loss.backward()
    optimiser.step()
    if blur_every and (step + 1) % blur_every == 0:
        image.blur_(blur_sigma)


# ---------------------------------------------------------------------------------------------- maximize
def maximize(model: nn.Module, layer: str, units, size=128, steps: int = 256, lr: float = 0.05,
             param: str = "fourier", transforms: str | None = "standard", l2: float = 0.0, tv: float = 0.0,
             blur_every: int = 0, blur_sigma: float = 0.5, objective: str = "mean", seed: int = 0,
             batch_size: int | None = None, device=None, preprocess=None, decorrelate: bool = True,
             progress: bool = False) -> torch.Tensor:
    """Images [U, 3, h, w] in [0, 1] (float32, CPU) that maximise each unit of ``units`` (channels of
    ``layer``), one image per unit, all optimised together (``batch_size`` units at a time; None: all).

    Image u maximises ``objective`` (``mean`` over positions, or the ``center`` position, of channel
    units[u]) minus ``l2`` * mean((x - 0.5)^2) minus ``tv`` * total variation, with Adam (``lr``) for
    ``steps`` steps. ``param``: ``fourier`` (1/f-scaled spectrum) or ``pixel``; both through a sigmoid,
    with a fixed colour decorrelation matrix when ``decorrelate``. ``transforms="standard"``: a random
    rotation, scale and jitter of each image at each step, on a mid-gray surround (None: the model sees
    the image as is). ``blur_every`` > 0 blurs the image (std ``blur_sigma`` px) every that many steps.
    ``preprocess`` (e.g. normalisation) is applied to the [0, 1] image before the model (a module is put in
    eval mode and frozen, as the model is). ``progress``: a progress bar over the steps of all batches.

    Image u depends only on (seed, units[u], the arguments), not on the other units of the batch (up to
    the float rounding of batched convolutions), and is bit-identical from run to run on one device. On
    CUDA that holds when the modules up to ``layer`` have deterministic backwards (convolutions under
    the deterministic cuDNN set here, max-pooling, BatchNorm, ReLU do; AdaptiveAvgPool2d and bilinear
    interpolate do not). ``steps=0`` returns the starting images (near-uniform gray). A NaN objective, or
    NaN in an image's gradient, is a ValueError naming the layer, the units and the step (SPEC.md 1).
    """
    name = _one_layer(model, layer)
    units = _units(units)
    size = _size(size)
    seed = as_seed(seed)
    steps = _positive("steps", steps, integer=True, zero_ok=True)
    lr = _positive("lr", lr)
    l2, tv, blur_sigma = (_positive(label, value, zero_ok=True)
                          for label, value in (("l2", l2), ("tv", tv), ("blur_sigma", blur_sigma)))
    blur_every = _positive("blur_every", blur_every, integer=True, zero_ok=True)
    if batch_size is not None:
        batch_size = _positive("batch_size", batch_size, integer=True)
    if param not in PARAMS:
        raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
    if transforms not in ("standard", None):
        raise ValueError(f"transforms must be 'standard' or None, got {transforms!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    device = model_device(model, device)
    dtype = param_dtype(model)
    results = []
    chunks = list(_chunks(len(units), batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * len(chunks), unit="step", desc=f"maximize {name}")
    try:
        with frozen_eval(model, device, preprocess), UnitObjective(model, name, objective, size, dtype, device,
                                                        preprocess=preprocess) as readout:
            _check_units(units, readout.width, name)
            for chunk in chunks:
                ids = [units[i] for i in chunk]
                image = ImageParam.random(param, ids, size, decorrelate=decorrelate, device=device, seed=seed)
                warp = (RandomTransforms(ids, steps, size, seed=seed, device=device)
                        if transforms == "standard" else None)
                unit_objective = readout.for_units(torch.tensor(ids, device=device))
                optimiser = _adam(image.params, lr)
                first_nan = torch.full((len(ids),), -1, dtype=torch.int64, device=device)
                first_nan_gradient = first_nan.clone()
                for step in range(steps):
                    optimiser.zero_grad(set_to_none=True)
                    x = image.image()
                    values = unit_objective(_model_input(x, warp, step, readout))
                    first_nan = _note_bad(first_nan, values.detach().isnan(), step + 1)
                    loss = -values.sum()
                    if l2:
                        loss = loss + l2 * (x - 0.5).square().flatten(1).mean(1).sum()
                    _descend(loss, x, tv, optimiser, image, step, blur_every, blur_sigma)
                    first_nan_gradient = _note_bad(first_nan_gradient, _nan_gradient(image), step + 1)
                    if bar is not None:
                        bar.update(1)
                with torch.no_grad():
                    results.append(image.image().float().cpu())
                _check_finite_run(name, "unit(s)", ids, first_nan, first_nan_gradient, steps)
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(results)


def unit_activations(model: nn.Module, layer: str, images: torch.Tensor, units, objective: str = "mean",
                     preprocess=None, batch_size: int = 64, device=None) -> torch.Tensor:
    """[N] float32: the ``objective`` activation of unit units[n] on image n (pixel-space [N, 3, H, W]);
    one int ``units`` means that unit on every image. No transforms: what the image itself drives. NaN
    values are a ValueError naming the layer, the images and the units (SPEC.md 1)."""
    name = _one_layer(model, layer)
    images = _image_batch(images)
    check_pixel_range(images)
    units = _units(units)
    if len(units) == 1:
        units = units * images.shape[0]
    if len(units) != images.shape[0]:
        raise ValueError(f"{len(units)} units for {images.shape[0]} images: give one unit per image or one unit")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    batch_size = _positive("batch_size", batch_size, integer=True)
    device = model_device(model, device)
    dtype = param_dtype(model)
    values = []
    size = tuple(images.shape[-2:])
    with (frozen_eval(model, device, preprocess, image_gradients=False), torch.no_grad(),
          UnitObjective(model, name, objective, size, dtype, device, affine=False, preprocess=preprocess) as readout):
        _check_units(units, readout.width, name)
        target = torch.tensor(units, device=device)
        for chunk in _chunks(images.shape[0], batch_size):
            x = _model_input(images[chunk.start:chunk.stop].to(device), None, 0, readout)
            values.append(readout.for_units(target[chunk.start:chunk.stop])(x).cpu())
    values = torch.cat(values)
    bad = values.isnan().nonzero().reshape(-1).tolist()
    if bad:
        raise ValueError(f"NaN activations of layer {name!r} on image(s) {bad[:8]} (unit(s) "
                         f"{sorted({units[i] for i in bad})[:8]}): the model's activations there are NaN (NaN "
                         "weights, or an overflow in float16); check the model")
    return values


# ---------------------------------------------------------------------------------------------- dual objective
@dataclass
class TowardsResult:
    """What ``maximize_towards(..., return_targets=True)`` used and reached, per cluster k.

    ``images`` [K, 3, h, w]; ``labels`` [N] (cluster of each input image); ``weights`` [N] (each image's
    weight inside its cluster, summing to 1 per cluster); ``targets`` [K, C] (weighted mean pooled
    features T); ``top_channels`` [K, top] (channels of T ranked by value); ``start`` [K, 3, h, w] (the
    weighted mean images); ``distance_start`` / ``distance_end`` [K] (Charbonnier distance between
    GAP(layer(x)) and T at the start image and the result); ``activation_start`` / ``activation_end`` [K]
    (the activation term: sum over top channels of o * T / sum of T^2, 1 when o equals T there).
    """

    images: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    targets: torch.Tensor
    top_channels: torch.Tensor
    start: torch.Tensor
    distance_start: torch.Tensor
    distance_end: torch.Tensor
    activation_start: torch.Tensor
    activation_end: torch.Tensor


def _image_ids(ids) -> torch.Tensor:
    """``ids`` (one int, ints, or an integer tensor / array) as int64 [n]. Bools and floats are refused, as
    for units: a cast would read a boolean mask as the ids 0 and 1, and truncate 2.7 to 2, with no error."""
    single = as_index(ids)
    if single is not None:
        return torch.tensor([single])
    shown = repr(ids) if len(repr(ids)) <= 80 else repr(ids)[:77] + "..."
    refused = ValueError(f"ids must be integer item indices (ints, or an integer tensor or array), got {shown}; "
                         "for a boolean mask over the images pass its positions, e.g. mask.nonzero().flatten()")
    if isinstance(ids, torch.Tensor) or hasattr(ids, "__array__"):
        picks = torch.as_tensor(ids)
        if picks.numel() and (picks.dtype == torch.bool or picks.is_floating_point() or picks.is_complex()):
            raise refused
        return picks.reshape(-1).to(torch.int64)
    try:
        picks = [as_index(i) for i in ids]
    except TypeError:
        raise refused from None
    if any(i is None for i in picks):
        raise refused
    return torch.tensor(picks, dtype=torch.int64)


def _image_batch(images, ids=None) -> torch.Tensor:
    """A pixel-space batch [N, 3, H, W] (CPU float32) from a tensor, a list of images or a map-style
    dataset yielding images or (image, label) pairs; ``ids`` picks items (integer indices only)."""
    picks = None if ids is None else _image_ids(ids)
    if isinstance(images, torch.Tensor):
        outside = picks is not None and picks.numel() and (int(picks.min()) < -len(images)
                                                           or int(picks.max()) >= len(images))
        if outside:
            raise IndexError(f"image ids {picks.tolist()[:8]} out of range: the image set has {len(images)} items")
        batch = images if picks is None else images[picks]
        if batch.dim() == 3:
            batch = batch[None]
    else:
        try:
            length = len(images)
        except TypeError:
            raise TypeError("images must be a tensor [N, 3, H, W], a list of [3, H, W] tensors or a map-style "
                            f"dataset, got {type(images).__name__}") from None
        picks = range(length) if picks is None else picks.tolist()
        items = []
        for i in picks:
            if not -length <= i < length:
                raise IndexError(f"image id {i} out of range: the image set has {length} items")
            item = images[i]
            items.append(item[0] if isinstance(item, (tuple, list)) else item)
        if not items:
            raise ValueError("the image set is empty: give at least one image")
        if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in items):
            raise ValueError("every image must be a tensor [3, H, W] in pixel space [0, 1]")
        dtypes = sorted({str(t.dtype) for t in items})
        if len(dtypes) > 1:  # a stack would make floats of all, the 8-bit ones 0-255 instead of k / 255
            raise ValueError(f"images of different dtypes ({', '.join(dtypes)}): give every image the same type, "
                             "all uint8 8-bit pixels or all float pixels in [0, 1]")
        if len({tuple(t.shape) for t in items}) != 1:
            raise ValueError(f"images of several sizes: {sorted({tuple(t.shape) for t in items})[:4]}; resize them "
                             "to one size")
        batch = torch.stack(items)
    batch = pixel_space(batch) if isinstance(batch, torch.Tensor) else batch
    if batch.dim() != 4 or batch.shape[1] != 3 or not batch.is_floating_point():
        raise ValueError(f"expected float images [N, 3, H, W] in pixel space [0, 1], got {tuple(batch.shape)} "
                         f"{batch.dtype}")
    if batch.shape[0] == 0:
        raise ValueError("the image set is empty: give at least one image")
    return batch.detach().float().cpu()


def _check_finite_features(name: str, features: torch.Tensor, ids) -> None:
    """A ValueError naming the layer, the images (by their ids, as given) and the channels where the pooled
    ``features`` [N, C] hold NaN or infinity: they can be neither clustered nor a target."""
    bad = ~torch.isfinite(features)
    rows = bad.any(1).nonzero().reshape(-1).tolist()
    if rows:
        names = _image_ids(ids).tolist() if ids is not None else list(range(features.shape[0]))
        channels = bad.any(0).nonzero().reshape(-1).tolist()
        raise ValueError(f"NaN or infinite features of layer {name!r} on image(s) {[names[r] for r in rows][:8]} "
                         f"(channel(s) {channels[:8]}): the model's activations there are not finite (NaN "
                         "weights, or an overflow in float16); check the model, or leave those images out")


def _charbonnier(o: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """[K]: mean over channels of sqrt(r^2 + eps^2) - eps, r the difference scaled by the RMS of the target
    (a robust distance: quadratic near 0, linear for outliers; scale-free across layers)."""
    scale = target.square().mean(1, keepdim=True).sqrt().clamp(min=1e-12)
    r = (o - target) / scale
    return (torch.sqrt(r * r + eps * eps) - eps).mean(1)


def _activation_term(o: torch.Tensor, target: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    t_top = target.gather(1, top)
    return (o.gather(1, top) * t_top).sum(1) / t_top.square().sum(1).clamp(min=1e-12)


def _cluster_images(features: torch.Tensor, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means labels [N] on the L2-normalised pooled features, and each image's weight in its cluster:
    exp(-d^2 / (2 mean d^2)) with d its distance to the centre (typical images count more than outliers),
    normalised to sum 1 per cluster."""
    unit = features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)
    n = features.shape[0]
    if clusters == 1:
        labels = torch.zeros(n, dtype=torch.int64)
    else:
        from sklearn.cluster import KMeans

        # (scikit-learn takes seeds in [0, 2**32) only; maximize takes any int, and so does this)
        km = KMeans(n_clusters=clusters, n_init=10, random_state=seed % 2 ** 32).fit(unit.double().numpy())
        labels = torch.as_tensor(km.labels_, dtype=torch.int64)
    weights = torch.zeros(n, dtype=torch.float64)
    for k in range(clusters):
        members = (labels == k).nonzero().reshape(-1)
        if members.numel() == 0:
            raise ValueError(f"k-means left cluster {k} empty ({n} images for {clusters} clusters, some of them "
                             "identical): use fewer clusters")
        pts = unit[members].double()
        d2 = (pts - pts.mean(0)).square().sum(1)
        w = torch.exp(-d2 / (2 * d2.mean())) if float(d2.mean()) > 0 else torch.ones_like(d2)
        weights[members] = w / w.sum()
    return labels, weights


def maximize_towards(model: nn.Module, layer: str, images, clusters: int = 1, top_channels: int = 50,
                     steps: int = 200, lr: float = 0.05, activation_weight: float = 0.5,
                     distance_weight: float = 1.0, l1: float = 0.01, tv: float = 0.01, blur_every: int = 10,
                     blur_sigma: float = 0.5, lr_decay: float = 0.1, charbonnier_eps: float = 1e-3,
                     param: str = "fourier", transforms: str | None = None, weights=None, ids=None,
                     preprocess=None, seed: int = 0, batch_size: int = 64, device=None, decorrelate: bool = True,
                     return_targets: bool = False):
    """The dual objective of Stergiou's "The Mind's Eye" (SPEC.md 7): images [clusters, 3, h, w] in [0, 1]
    showing the class-agnostic features that ``layer`` sees in a set of images.

    ``images``: a tensor [N, 3, h, w], a list of images or a map-style dataset (``ids``, integer indices,
    picks items, e.g. a unit's top images from the index; for a boolean mask pass mask.nonzero()). Their
    global-average-pooled features are clustered with k-means (``clusters`` targets); each cluster's
    target T is the weighted mean of its images' features (``weights`` per image, or the default: typical
    images weigh more than outliers). Image k starts from the weighted mean of its images and minimises,
    with Adam and a step decaying exponentially from ``lr`` to ``lr * lr_decay``:
        - activation_weight * sum_{top channels of T} o_ch T_ch / sum T_ch^2      (o = GAP(layer(x)))
        + distance_weight * Charbonnier(o - T)  (scaled by the RMS of T)
        + l1 * mean |x - 0.5| + tv * total variation(x)
    and is blurred every ``blur_every`` steps. ``return_targets=True`` also returns a ``TowardsResult``.
    Non-finite features (of the images, or of an image being optimised) are a ValueError naming the layer
    and the image ids or clusters: they can be neither clustered nor a target.
    """
    name = _one_layer(model, layer)
    seed = as_seed(seed)
    batch = _image_batch(images, ids)
    check_pixel_range(batch)
    n = batch.shape[0]
    clusters = _positive("clusters", clusters, integer=True)
    if clusters > n:
        raise ValueError(f"clusters={clusters} is more than the {n} images given: choose clusters <= {n}")
    top_channels = _positive("top_channels", top_channels, integer=True)
    steps = _positive("steps", steps, integer=True, zero_ok=True)
    lr = _positive("lr", lr)
    batch_size = _positive("batch_size", batch_size, integer=True)
    blur_every = _positive("blur_every", blur_every, integer=True, zero_ok=True)
    charbonnier_eps = _positive("charbonnier_eps", charbonnier_eps)
    activation_weight, distance_weight, l1, tv, blur_sigma = (
        _positive(label, value, zero_ok=True)
        for label, value in (("activation_weight", activation_weight), ("distance_weight", distance_weight),
                             ("l1", l1), ("tv", tv), ("blur_sigma", blur_sigma)))
    if isinstance(lr_decay, bool) or not isinstance(lr_decay, numbers.Real) or not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay (final step / first step) must be in (0, 1], got {lr_decay!r}")
    if param not in PARAMS:
        raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
    if transforms not in ("standard", None):
        raise ValueError(f"transforms must be 'standard' or None, got {transforms!r}")
    device = model_device(model, device)
    dtype = param_dtype(model)
    size = tuple(batch.shape[-2:])

    with (frozen_eval(model, device, preprocess),
          UnitObjective(model, name, "mean", size, dtype, device, affine=False, preprocess=preprocess) as readout):
        with torch.no_grad():
            features = torch.cat([
                _gap(readout.layer_output(_model_input(batch[c.start:c.stop].to(device), None, 0, readout)))
                for c in _chunks(n, batch_size)]).cpu()
        _check_finite_features(name, features, ids)
        labels, default_weights = _cluster_images(features, clusters, seed)
        if weights is None:
            w = default_weights
        else:
            problem = ValueError(f"weights must be {n} finite non-negative numbers, one per image, got "
                                 f"{weights!r:.80}")
            try:
                w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as exc:  # text, ragged lists: torch's words name no fix
                raise problem from exc
            if w.numel() != n or not torch.isfinite(w).all() or (w < 0).any():
                raise problem
            sums = torch.zeros(clusters, dtype=torch.float64).index_add_(0, labels, w)
            if (sums <= 0).any():
                raise ValueError(f"the weights of cluster(s) {(sums <= 0).nonzero().reshape(-1).tolist()} sum to 0")
            w = w / sums[labels]
        onehot = torch.zeros(clusters, n, dtype=torch.float64)
        onehot[labels, torch.arange(n)] = w
        targets = (onehot @ features.double()).float()                                   # [K, C]
        if not bool((targets.abs() > 0).any(dim=1).all()):
            dead = (targets == 0).all(dim=1).nonzero().reshape(-1).tolist()
            raise ValueError(f"the features of {name!r} are all zero on the images of cluster(s) {dead} (a layer dead "
                             "on them): there is no target to move towards; pick another layer or other images")
        start = torch.einsum("kn,nchw->kchw", onehot, batch.double()).float().clamp(0, 1)
        top = min(top_channels, targets.shape[1])
        top_idx = targets.topk(top, dim=1).indices

        out_images, d0, d1, a0, a1 = [], [], [], [], []
        for chunk in _chunks(clusters, batch_size):
            t = targets[chunk.start:chunk.stop].to(device)
            idx = top_idx[chunk.start:chunk.stop].to(device)
            image = ImageParam.from_images(param, start[chunk.start:chunk.stop].to(device), decorrelate=decorrelate)
            warp = (RandomTransforms(list(chunk), steps, size, seed=seed, device=device)
                    if transforms == "standard" else None)
            optimiser = _adam(image.params, lr)

            def terms(x, step=0, warped=None):
                o = _gap(readout.layer_output(_model_input(x, warped, step, readout)))
                return _activation_term(o, t, idx), _charbonnier(o, t, charbonnier_eps)

            def nonfinite(act, dist):
                return ~(torch.isfinite(act) & torch.isfinite(dist)).detach()

            with torch.no_grad():
                act, dist = terms(image.image())
                a0.append(act.cpu()), d0.append(dist.cpu())
                first_bad = _note_bad(torch.full_like(act, -1, dtype=torch.int64), nonfinite(act, dist), 0)
                first_nan_gradient = torch.full_like(first_bad, -1)
            for step in range(steps):
                for group in optimiser.param_groups:
                    group["lr"] = lr * lr_decay ** (step / max(1, steps - 1))
                optimiser.zero_grad(set_to_none=True)
                x = image.image()
                act, dist = terms(x, step, warp)
                first_bad = _note_bad(first_bad, nonfinite(act, dist), step + 1)
                loss = (-activation_weight * act + distance_weight * dist).sum()
                if l1:
                    loss = loss + l1 * (x - 0.5).abs().flatten(1).mean(1).sum()
                _descend(loss, x, tv, optimiser, image, step, blur_every, blur_sigma)
                first_nan_gradient = _note_bad(first_nan_gradient, _nan_gradient(image), step + 1)
            with torch.no_grad():
                x = image.image()
                act, dist = terms(x)
                first_bad = _note_bad(first_bad, nonfinite(act, dist), steps + 1)
                a1.append(act.cpu()), d1.append(dist.cpu())
                out_images.append(x.float().cpu())
            _check_finite_run(name, "cluster(s)", list(chunk), first_bad, first_nan_gradient, steps,
                              nonfinite="NaN or infinity")
    result = torch.cat(out_images)
    if not return_targets:
        return result
    return result, TowardsResult(result, labels, w.float(), targets, top_idx, start, torch.cat(d0), torch.cat(d1),
                                 torch.cat(a0), torch.cat(a1))


# ---------------------------------------------------------------------------------------------- PNG
def save_maximized(images: torch.Tensor, path, titles=None, ncols: int | None = None, scale: int = 1,
                   gap: int = 2) -> str:
    """Write the images [N, 3, h, w] (e.g. from ``maximize``) as one PNG grid, with an optional title
    under each (e.g. ``[f"unit {u}" for u in units]``); returns the path."""
    from .png import image_grid, save_png, to_pil

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"expected images [N, 3, h, w] with N >= 1, got {getattr(images, 'shape', images)!r}")
    bad = nonfinite_images(images).tolist()
    if bad:  # (the PNG would show them as black, or as whatever the cast to 8 bits made of NaN)
        raise ValueError(f"image(s) {bad[:8]} hold NaN or infinite pixels: there is nothing to draw for them")
    ncols = positive_int("ncols", ncols, none_means="a square grid")
    scale, gap = positive_int("scale", scale), positive_int("gap", gap, zero_ok=True)
    ncols = min(ncols, images.shape[0]) if ncols else None
    if titles is None:
        return save_png(image_grid(images, ncols=ncols, gap=gap, scale=scale), path)
    titles = [str(t) for t in titles]
    if len(titles) != images.shape[0]:
        raise ValueError(f"{len(titles)} titles for {images.shape[0]} images")
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tiles = [to_pil(im, scale) for im in images]
    w, h = tiles[0].size
    line = max(font.getbbox(t or " ")[3] for t in titles) + 4
    text_w = max(font.getbbox(t or " ")[2] for t in titles)
    cell_w = max(w, text_w + 2)
    ncols = ncols or math.ceil(math.sqrt(len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    grid = Image.new("RGB", (ncols * cell_w + (ncols - 1) * gap, nrows * (h + line) + (nrows - 1) * gap), "white")
    draw = ImageDraw.Draw(grid)
    for i, (tile, title) in enumerate(zip(tiles, titles)):
        x0, y0 = (i % ncols) * (cell_w + gap), (i // ncols) * (h + line + gap)
        grid.paste(tile, (x0 + (cell_w - w) // 2, y0))
        draw.text((x0 + (cell_w - font.getbbox(title or " ")[2]) // 2, y0 + h + 2), title, fill="black", font=font)
    return save_png(grid, path)
