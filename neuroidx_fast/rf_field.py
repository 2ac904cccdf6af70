"""The receptive field of a layer's units (SPEC.md section 2), and the geometry that its two measurements,
the graph walk (``rf_walk``) and the gradient probe (``rf_probe``), share."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

from .hooks import LayerCapture, LayerNotReachedError, resolve_layers
from .prepare import as_index, evaluating, first_line, model_device, param_dtype

__all__ = ["ReceptiveField"]


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of one layer's units for one input size.

    Unit position (y, x) sees input pixels ``offset + p * stride`` to ``offset + p * stride + size - 1``
    per axis (inclusive; outside the image where the network pads). ``whole_image``: the layer mixes all
    positions (after global pooling or flatten); then every unit sees the whole image (stride 0).
    ``method``: "analytic" (graph walk) or "probe" (gradient probe fallback).
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    input_size: tuple[int, int]
    map_size: tuple[int, int] | None = None
    whole_image: bool = False
    method: str = "analytic"

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)``: the inclusive input box of the unit at map position (y, x) (of the map
        ``map_size``, where known; the box itself may reach past the image, where the network pads)."""
        y, x = (_map_index(v, axis, self.map_size[a] if self.map_size else None)
                for a, (v, axis) in enumerate(((y, "y"), (x, "x"))))
        y0 = self.offset[0] + y * self.stride[0]
        x0 = self.offset[1] + x * self.stride[1]
        return y0, x0, y0 + self.size[0] - 1, x0 + self.size[1] - 1

    def tops(self, positions: torch.Tensor, map_width: int | None = None) -> torch.Tensor:
        """Top-left input pixels ``[..., 2]`` (y0, x0) of flat map positions ``y * W + x`` (int64)."""
        width = map_width if map_width is not None else (self.map_size[1] if self.map_size else None)
        if width is None:
            raise ValueError("tops() needs the map width: pass map_width or build the RF with a map size")
        width = _map_index(width, "map_width", None)
        if width < 1:
            raise ValueError(f"tops() needs a positive map_width, got {width}")
        if (not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex()
                or positions.dtype == torch.bool):  # True and False would be positions 1 and 0
            raise ValueError("tops() takes flat map positions y * W + x as an integer tensor, got "
                             f"{positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__}")
        # the map's height is known where the width is the map's own (a width given for another map says
        # nothing about its height)
        height = self.map_size[0] if self.map_size and width == self.map_size[1] else None
        if positions.numel():
            low, high = int(positions.min()), int(positions.max())
            if low < 0 or (height is not None and high >= height * width):
                valid = f"the {height}x{width} map's 0 .. {height * width - 1}" if height is not None else "0 or more"
                raise ValueError(f"tops() got flat map positions from {low} to {high}, outside {valid}: pass "
                                 "positions of this layer's map (unused top-K slots hold -1: drop or clamp them first)")
        positions = positions.to(torch.int64)
        y, x = positions // width, positions % width
        return torch.stack([self.offset[0] + y * self.stride[0], self.offset[1] + x * self.stride[1]], dim=-1)

    def __str__(self) -> str:
        if self.whole_image:
            return f"RF whole image {self.size[0]}x{self.size[1]}"
        return (f"RF {self.size[0]}x{self.size[1]}, stride {self.stride[0]}x{self.stride[1]}, "
                f"offset ({self.offset[0]}, {self.offset[1]}) [{self.method}]")


def _map_index(value, axis: str, length: int | None) -> int:
    """``value`` as a position along an axis of a map of ``length`` positions (None: unknown): an integer
    (int, NumPy or one-element torch integer) in 0 .. length - 1, else a ValueError that says so (int()
    would truncate 1.9 to 1 and accept "1", and an out-of-range position has a box of no unit)."""
    if isinstance(value, bool):
        raise ValueError(f"{axis} must be an integer map position, got {value!r}")
    try:
        index = operator.index(value)
    except TypeError:
        raise ValueError(f"{axis} must be an integer map position, got {value!r} ({type(value).__name__})") from None
    if index < 0:
        raise ValueError(f"{axis} = {index} is not a map position: positions count from 0")
    if length is not None and index >= length:
        raise ValueError(f"{axis} = {index} is outside the layer's map, whose positions along {axis} are "
                         f"0 .. {length - 1}")
    return index


def _spatial(t):
    return tuple(t.shape[-2:]) if isinstance(t, torch.Tensor) and t.dim() >= 3 else None


def _covering_window(spans, strides) -> tuple[int, int, int]:
    """(size, stride, origin): evenly spaced windows, ``origin + p * stride`` to ``... + size - 1``, that hold
    every span (p, start, end) (end exclusive) of position p; of the ``strides`` tried, the one whose
    windows are the smallest."""
    best = None
    for stride in strides:
        origin = min(start - p * stride for p, start, _ in spans)
        size = max(end - p * stride for p, _, end in spans) - origin
        if best is None or size < best[0]:
            best = (size, stride, origin)
    return best


def _as_size(input_size) -> tuple[int, int]:
    if as_index(input_size) is not None:  # an int, numpy's too (not an array of two, which has __index__ too)
        input_size = (input_size, input_size)
    try:
        # operator.index, not int(): a size of 16.7 pixels is a mistake to report, not to truncate
        if any(isinstance(v, bool) for v in input_size):
            raise TypeError
        h, w = (operator.index(v) for v in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"input_size must be an int or (height, width) of whole pixels, got {input_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"input_size must be positive, got {(h, w)}")
    return h, w


def _as_channels(channels) -> int:
    """``channels`` (the model's input channels) as a positive int: 2.5 or True would make a blank input of
    no sense, and 0 or -1 an error about the input's size."""
    if isinstance(channels, bool):
        raise ValueError(f"channels must be a positive int (the model's input channels), got {channels!r}")
    try:
        channels = operator.index(channels)
    except TypeError:
        raise ValueError(f"channels must be a positive int (the model's input channels), got {channels!r} "
                         f"({type(channels).__name__})") from None
    if channels < 1:
        raise ValueError(f"channels must be a positive int (the model's input channels), got {channels}")
    return channels


def _blank_input(model: nn.Module, size, channels: int):
    return torch.zeros((1, channels) + tuple(size), device=model_device(model, None), dtype=param_dtype(model))


def _layer_output(model, layer, size, channels):
    """The layer's output on a blank input of ``size`` and ``channels`` (eval mode, no gradient). A model that
    cannot run on such inputs (torch's RuntimeError: the wrong depth, a map smaller than a kernel) is a
    ValueError that names the fix: channels= or a larger input_size."""
    try:
        with evaluating(model), torch.no_grad(), LayerCapture(model, [layer]) as capture:
            return capture.run(_blank_input(model, size, channels))[layer]
    except RuntimeError as exc:
        if isinstance(exc, LayerNotReachedError):
            raise
        message = first_line(exc)
        # torch's words for an input of the wrong depth (conv: "expected input[...] to have 1 channels")
        fix = (f"pass channels= (the model's input channels; these inputs have {channels})" if "channels" in message
               else "choose a larger input_size")
        raise ValueError(f"the model cannot run on {size[0]}x{size[1]} inputs of {channels} channel(s) up to layer "
                         f"{layer!r} ({type(exc).__name__}: {message}): {fix}") from None


def _layer_module(model: nn.Module, layer: str) -> nn.Module:
    """The module named ``layer``; for a name like none of the model's (where resolve_layers has no close
    names to suggest), the error lists some names the model has, so that the user sees how they look."""
    try:
        return resolve_layers(model, [layer])[layer]
    except ValueError as exc:
        if "closest names" in str(exc) or not str(exc).startswith("unknown layer"):
            raise
        names = [name for name, _ in model.named_modules() if name]
        listed = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        hint = f"; the model's layers include {listed}" if names else "; the model has no submodules to name"
        raise ValueError(f"{exc}{hint}") from None
