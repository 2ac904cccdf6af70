"""Per-unit contributions to one image's prediction (SPEC.md section 7, Dai 2020):
contribution_c = sum over positions of F_c * d logit / d F_c, and how much of the total positive
contribution the top units hold ("domination")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .hooks import SharedModuleError, resolve_layers
from .maximization import frozen_eval, model_device
from .prepare import as_index, check_pixel_range, check_preprocess, first_line, pixel_space, positive_int, shortened

__all__ = ["contributions", "Contributions"]


@dataclass
class Contributions:
    """``values`` [C] float64: each unit's contribution (activation x gradient, summed over positions) to
    the ``target`` logit; ``logit`` its value and ``logits`` [classes] all of them; ``order`` [C] units by
    contribution, largest first; ``top``: the number of units ``domination`` counts."""

    layer: str
    target: int
    logit: float
    logits: torch.Tensor
    values: torch.Tensor
    order: torch.Tensor
    top: int

    @property
    def total(self) -> float:
        """Sum of all contributions (equals logit(F) - logit(0) when the logit is linear, or positively
        homogeneous of degree 1, in the layer's output F)."""
        return float(self.values.sum())

    def domination_curve(self) -> torch.Tensor:
        """[C] float64: entry n-1 is the share of the total positive contribution held by the n units with
        the largest contributions (NaN when no unit contributes positively)."""
        positive = self.values.clamp(min=0)
        total = positive.sum()
        if total <= 0:
            return torch.full_like(positive, float("nan"))
        return positive[self.order].cumsum(0) / total

    def domination(self, top: int | None = None) -> float:
        """Share of the total positive contribution held by the ``top`` (default ``self.top``) first units."""
        count = self.values.numel()
        number = self.top if top is None else positive_int("top", top)
        if number > count:
            raise ValueError(f"top must be an int in 1..{count} (the layer's units), got {top!r}")
        return float(self.domination_curve()[number - 1])

    def top_units(self, n: int | None = None) -> list[tuple[int, float]]:
        """(unit, contribution) of the ``n`` (default ``self.top``) largest contributors."""
        n = self.top if n is None else positive_int("n", n)
        return [(int(u), float(self.values[u])) for u in self.order[:n]]


def _check_no_nan(layer: str, F: torch.Tensor, grad: torch.Tensor, logits: torch.Tensor) -> None:
    """A ValueError naming the layer and its units where the layer's output or the gradient of the logit
    holds NaN, or the logits do."""
    def nan_units(tensor):
        return shortened(torch.isnan(tensor[0]).reshape(tensor.shape[1], -1).any(1).nonzero().flatten().tolist(), 10)

    if nan_units(F):
        raise ValueError(f"NaN in layer {layer!r}'s output on this image, unit(s) {nan_units(F)}: their "
                         "contributions are undefined; check the model and the image (preprocess)")
    if bool(torch.isnan(logits).any()):
        raise ValueError(f"the model's logits hold NaN on this image (layer {layer!r}'s output is finite): check "
                         "the layers after it")
    if nan_units(grad):
        raise ValueError(f"NaN in the gradient of the target logit with respect to layer {layer!r}'s output, "
                         f"unit(s) {nan_units(grad)}: their contributions are undefined; check the layers after it")


def contributions(model: nn.Module, image: torch.Tensor, layer: str, target: int | None = None,
                  preprocess=None, top: int = 10, device=None) -> Contributions:
    """Contribution of every unit of ``layer`` to the ``target`` logit (default: the predicted class) for one
    pixel-space image [C, H, W] (or [1, C, H, W]; C the model's input channels: 3 for RGB, 1 for gray);
    ``preprocess`` runs before the model. The model (and a
    preprocess that is a module) runs in eval mode (restored afterwards); the model's output must be logits
    [1, classes]. A ``layer`` that runs more than once in the forward (a shared module) raises
    ``SharedModuleError``, as in ``index_dataset``. NaN in the layer's output, the logits or the gradient
    is a ValueError naming the layer and the units (a NaN contribution would rank first)."""
    modules = resolve_layers(model, [layer]) if isinstance(layer, str) else None
    if modules is None:
        raise TypeError(f"layer must be one module name (a str), got {type(layer).__name__}")
    module = modules[layer]
    image = pixel_space(image) if isinstance(image, torch.Tensor) else image
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor [C, H, W] in pixel space, got {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be one image [C, H, W] or [1, C, H, W], got {tuple(image.shape)}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image holds NaN or infinite pixels: give a finite pixel-space image")
    check_pixel_range(image)
    check_preprocess(preprocess)
    top = positive_int("top", top)
    device = model_device(model, device)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    captured = {}

    def hook(mod, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {layer!r} returned {type(output).__name__}, not a tensor")
        if "F" in captured:
            # A module shared by several places of the forward: the contributions of one call (the last,
            # as a plain overwrite would give) are not the layer's. index_dataset refuses it the same way.
            raise SharedModuleError(layer)
        leaf = output.detach().requires_grad_(True)
        captured["F"] = leaf
        # The rest of the forward runs on a copy, so that an in-place op after the layer (ReLU(inplace))
        # cannot overwrite the activations the contributions multiply.
        return leaf.clone()

    handle = module.register_forward_hook(hook)
    try:
        with frozen_eval(model, device, preprocess):
            x = image.detach().to(device)
            if preprocess is not None:
                x = preprocess(x)
            try:
                logits = model(x.to(dtype))
            except RuntimeError as exc:  # e.g. an [H, W, C] image: torch's own words name no fix
                raise ValueError(f"the model fails on this image of shape {tuple(image.shape[1:])} "
                                 f"({first_line(exc)}): give one pixel-space image [C, H, W] with the model's input "
                                 "channels and a size it takes") from exc
            if "F" not in captured:
                raise RuntimeError(f"the forward never reached layer {layer!r}: it is not used by model.forward")
            if not isinstance(logits, torch.Tensor) or logits.dim() not in (1, 2) or (logits.dim() == 2
                                                                                        and logits.shape[0] != 1):
                raise ValueError(f"the model must return logits [1, classes], got "
                                 f"{tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
            logits = logits.reshape(-1)
            index = int(logits.argmax()) if target is None else as_index(target)
            if index is None or not 0 <= index < logits.numel():
                raise ValueError(f"target must be a class index in 0..{logits.numel() - 1}, got {target!r}")
            target = index
            F = captured["F"]
            # Logits that depend on no captured output carry no graph at all: autograd.grad would fail with
            # "element 0 of tensors does not require grad" before allow_unused could say so.
            unused = ValueError(f"the logits do not depend on layer {layer!r} (its output does not reach them, or "
                                "only through non-differentiable steps): choose a layer on the way to the logits")
            if not logits.requires_grad:
                raise unused
            (grad,) = torch.autograd.grad(logits[target], F, allow_unused=True)
            if grad is None:
                raise unused
    finally:
        handle.remove()
    if F.dim() not in (2, 4):
        raise ValueError(f"layer {layer!r} outputs shape {tuple(F.shape)}: expected [1, C, H, W] or [1, C]")
    _check_no_nan(layer, F.detach(), grad, logits.detach())
    prod = (F.detach().double() * grad.double())[0]
    values = prod.flatten(1).sum(1) if prod.dim() == 3 else prod
    undefined = torch.isnan(values).nonzero().flatten().tolist()
    if undefined:  # +-inf activations where the gradient is 0: inf * 0
        raise ValueError(f"the contributions of unit(s) {undefined[:10]} of layer {layer!r} are undefined: their "
                         "activations are infinite where the target logit's gradient is 0 (inf * 0); check the model")
    values = values.cpu()
    order = torch.sort(values, descending=True, stable=True).indices
    logits = logits.detach().float().cpu()
    return Contributions(layer, target, float(logits[target]), logits, values, order,
                         min(top, values.numel()))
