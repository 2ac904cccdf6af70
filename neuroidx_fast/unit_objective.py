"""The quantity activation maximisation raises: for a batch of model inputs, the activation of unit
units[u] (a channel of one layer) on image u, averaged over positions (``mean``) or at the map's centre
(``center``).

Two ways to the same numbers (``UnitObjective`` picks one):

- through the layer: the forward runs up to the layer (``LayerCapture``), and the unit's map is read
  from the layer's output;
- affine shortcut: when the layer is a plain ``nn.Conv2d`` or ``nn.Linear``, the objective is an affine
  function of the layer's input ``a``: ``obj_u(a) = c_u + <G_u, a>`` (a convolution or matrix product,
  then a mean over positions or the pick of one position, are all linear; the bias is the constant).
  ``G_u`` and ``c_u`` are computed once per batch of units, by one forward and backward of the layer on
  zero inputs; each step then stops the forward before the layer (``InputCapture``) and takes one dot
  product per image. The layer never runs during the optimisation: its forward and its input-gradient
  backward over all C channels, for every image at every step, become one multiply-add over its input.
  That is where a batch of units gains most over one unit at a time (for a single image most of a step
  is per-op overhead, for a batch it is the arithmetic, and the target layer is often the biggest).

The shortcut's terms are computed in float32 (float64 for a float64 model) from the layer's weights;
the results equal the direct path up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .graph_split import plain_module, runs_forward_hooks
from .hooks import InputCapture, LayerCapture, LayerNotReachedError, SharedModuleError, resolve_layers

__all__ = ["UnitObjective", "unit_maps_objective", "affine_layer", "OBJECTIVES"]

OBJECTIVES = ("mean", "center")


def unit_maps_objective(out: torch.Tensor, units: torch.Tensor, objective: str,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[U] in ``dtype``: ``objective`` of channel units[u] of ``out`` [U, C, H, W] or [U, C] on row u."""
    rows = torch.arange(out.shape[0], device=out.device)
    maps = out[rows, units]
    if maps.dim() == 1:
        return maps.to(dtype)
    if objective == "mean":
        return maps.flatten(1).to(dtype).mean(1)
    return maps[:, maps.shape[1] // 2, maps.shape[2] // 2].to(dtype)


def affine_layer(module: nn.Module) -> bool:
    """True for a plain ``nn.Conv2d`` or ``nn.Linear`` (not a subclass, nor one whose forward was set on
    the instance: either may compute something else) that runs no forward hooks, its own or global ones
    (which could change what it returns)."""
    return (type(module) in (nn.Conv2d, nn.Linear) and plain_module(module, (nn.Conv2d, nn.Linear))
            and not runs_forward_hooks(module))


def _affine_forward(module: nn.Module, a: torch.Tensor, channel: int | None = None) -> torch.Tensor:
    """The layer's output for input ``a``, computed in ``a``'s dtype (weights cast to it); with ``channel``,
    the weights and bias of every other output channel are zeros (a layer of that one unit)."""
    weight = module.weight.to(a.dtype)
    bias = None if module.bias is None else module.bias.to(a.dtype)
    if channel is not None:
        keep = torch.arange(weight.shape[0], device=weight.device) == channel
        weight = torch.where(keep.reshape((-1,) + (1,) * (weight.dim() - 1)), weight, 0)
        bias = None if bias is None else torch.where(keep, bias, 0)
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(a, weight, bias)
    return F.linear(a, weight, bias)


class UnitObjective:
    """Context manager: ``with UnitObjective(model, name, objective) as obj: f = obj.for_units(units);
    values = f(obj.model_input(images))``, ``values`` [U] float32 with gradients to ``images``.

    ``model_input`` is the one path from pixel-space images [B, 3, H, W] to what the model is given:
    ``preprocess`` (e.g. normalisation, a resize, RGB to gray), the cast to ``dtype``, and on the CPU the
    channels-last layout for a batch of several images where the model runs it. On entering, one gray
    image of ``size`` takes that path and runs to the layer: ``width`` is then its number of channels, and
    in affine mode ``input_shape`` the shape of the layer's input. ``affine=False`` (or a layer that is not
    plainly affine) reads the layer's output every step. A layer that runs more than once in one forward
    (a shared module) raises ``SharedModuleError``, as in ``index_dataset``.
    """

    def __init__(self, model: nn.Module, name: str, objective: str, size, dtype, device, affine: bool = True,
                 preprocess=None):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be a function of a batch of images, got {type(preprocess).__name__}")
        self.model = model
        self.name, self.module = next(iter(resolve_layers(model, [name]).items()))
        self.objective, self.size, self.dtype, self.device = objective, tuple(size), dtype, torch.device(device)
        self.preprocess = preprocess
        self.affine = affine and affine_layer(self.module)
        self.capture = InputCapture(model, name) if self.affine else LayerCapture(model, [name])
        self.width = None
        self.input_shape = None
        # Whether a batch of several images goes to the model channels-last; decided by the probe.
        self.channels_last = False

    def __enter__(self):
        self._refuse_shared_module()  # before the capture's hooks, which stop the forward at the layer
        self.capture.__enter__()
        try:
            self.width = self._probe()
        except BaseException:
            self.capture.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        return self.capture.__exit__(*exc)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """What the model is given for the pixel-space images [B, 3, H, W] (on ``device``)."""
        x = self.preprocess(images) if self.preprocess is not None else images
        x = x.to(self.dtype)
        if self.channels_last and x.device.type == "cpu" and x.dim() == 4 and x.shape[0] > 1:
            # oneDNN's convolutions, forward and input-gradient backward, run faster on a channels-last batch
            # (the layout then carries through the network): 1.3-2x on the benchmark models' first convolutions
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _run(self, x):
        return self.capture.run(x) if self.affine else self.capture.run(x)[self.name]

    def layer_output(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output [B, C, ...] for the model input ``x``."""
        out = self._run(x)
        return _affine_forward(self.module, out) if self.affine else out

    def _refuse_shared_module(self) -> None:
        """Raise ``SharedModuleError`` when the layer runs more than once in one forward of the gray image
        (torchvision's BasicBlock calls one ReLU twice). Every step stops the forward at the layer's first
        call, so such a layer would silently be its first call, not the layer ``index_dataset`` and
        ``contributions`` refuse. The forward runs to its end here, the only way to see a later call; an
        error in it that comes before a second call is left to the probe, which names what is wrong."""
        gray = torch.full((1, 3) + self.size, 0.5, device=self.device)
        try:
            with torch.no_grad(), LayerCapture(self.model, [self.name]) as whole:
                whole.run_whole(self.model_input(gray))  # (an error after the layer's call ends the forward)
        except SharedModuleError:
            raise
        except Exception:  # a size or preprocess the model refuses, or a layer it never reaches: the probe says so
            pass

    def _probe(self) -> int:
        # The gray image takes the very path of the images optimised or measured (preprocess included): a
        # preprocess that changes the channels or the size changes what the layer sees, and input_shape
        # sizes the shortcut's gradient.
        gray = torch.full((1, 3) + self.size, 0.5, device=self.device)
        try:
            with torch.no_grad():
                out = self._run(self.model_input(gray))  # one forward: in affine mode, the layer's input
                if self.affine:
                    self.input_shape = tuple(out.shape[1:])
                    out = _affine_forward(self.module, out)
        except RuntimeError as exc:
            if isinstance(exc, LayerNotReachedError):
                raise
            after = " after preprocess=" if self.preprocess is not None else ""
            raise ValueError(f"the model cannot run on {self.size[0]}x{self.size[1]} images{after} up to layer "
                             f"{self.name!r} ({type(exc).__name__}: {exc}); choose another size, or a preprocess "
                             "that turns [B, 3, H, W] pixel images into what the model takes") from exc
        if out.dim() not in (2, 4):
            raise ValueError(f"layer {self.name!r} outputs shape {tuple(out.shape)}: choose a layer whose output "
                             "is [B, C, H, W] or [B, C]")
        self.channels_last = self._runs_channels_last()
        return out.shape[1]

    def _runs_channels_last(self) -> bool:
        """Whether a channels-last batch of two images runs up to the layer. Not every model does: one that
        flattens with ``x.view(x.size(0), -1)`` (LeNet, AlexNet style) refuses the non-contiguous
        activations that the layout carries down to it; such a model is given contiguous batches."""
        if self.device.type != "cpu":
            return False
        self.channels_last = True
        try:
            with torch.no_grad():
                self._run(self.model_input(torch.full((2, 3) + self.size, 0.5, device=self.device)))
        except Exception:  # whatever the model raises on the layout, the contiguous batch is what it expects
            return False
        finally:
            self.channels_last = False
        return True

    def for_units(self, units: torch.Tensor):
        """The objective of units[u] on row u of a model input batch: a function [U, ...] -> [U]."""
        if not self.affine:
            return lambda x: unit_maps_objective(self._run(x), units, self.objective)
        gradient, constant = self._affine_terms(units)
        layouts = {}

        def objective(x):
            a = self._run(x)
            # G in the memory layout of the layer's input, so that the gradient that flows back down the
            # network has the layout of its activations (a channels-last batch mixed with contiguous
            # gradients makes every element-wise backward op several times slower)
            layout = _layout(a)
            if layout not in layouts:
                layouts[layout] = gradient.contiguous(memory_format=layout)
            return (a.to(gradient.dtype) * layouts[layout]).sum(dim=tuple(range(1, a.dim()))).float() + constant

        return objective

    def _affine_terms(self, units: torch.Tensor):
        """G [U, *input_shape] (the objective's gradient with respect to the layer's input) and c [U]
        (its value at a zero input). Row u depends on the weights of unit units[u] alone: a NaN weight of
        one unit would make every row NaN in the batched backward (0 * NaN), so the rows are then redone
        one unit at a time, and only that unit's row stays NaN."""
        gradient, constant = self._affine_terms_of(units)
        if not bool(torch.isfinite(gradient).all()):
            rows = [self._affine_terms_of(units[u:u + 1], channel=int(units[u])) for u in range(units.numel())]
            gradient, constant = torch.cat([g for g, _ in rows]), torch.cat([c for _, c in rows])
        return gradient, constant

    def _affine_terms_of(self, units: torch.Tensor, channel: int | None = None):
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        zero = torch.zeros((units.numel(),) + self.input_shape, dtype=dtype, device=self.device, requires_grad=True)
        with torch.enable_grad():
            out = _affine_forward(self.module, zero, channel)
            value = unit_maps_objective(out, units, self.objective, dtype)
            (gradient,) = torch.autograd.grad(value.sum(), zero)
        return gradient, value.detach().float()


def _layout(a: torch.Tensor) -> torch.memory_format:
    if a.dim() == 4 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format

