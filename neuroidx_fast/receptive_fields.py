"""Receptive fields (SPEC.md section 2): ``receptive_field(model, layer, input_size)``.

Two measurements: an analytic walk of the model's graph (``rf_walk``: torch.fx, composing per axis a
jump, a size and an offset through every node) and the gradient probe (``rf_probe``: which input pixels
a unit's value depends on, on a copy of the model made positive and linear where it matters). The walk
answers; the probe is its fallback, with a warning, for graphs the walk does not know, and the oracle
of the tests. ``rf_field`` holds the ``ReceptiveField`` both return and the geometry they share.
"""

from __future__ import annotations

import warnings

from torch import nn

from .rf_field import ReceptiveField, _as_channels, _as_size, _layer_module
from .rf_probe import probe_gradient, probe_receptive_field
from .rf_walk import _analytic, _Unsupported

__all__ = ["ReceptiveField", "receptive_field", "probe_gradient", "probe_receptive_field"]


def receptive_field(model: nn.Module, layer: str, input_size, method: str = "auto",
                    channels: int = 3) -> ReceptiveField:
    """The receptive field of ``layer``'s units for inputs of ``input_size`` (int or (H, W)).

    ``method="auto"`` walks the graph and falls back, with a warning, to the gradient probe when the
    graph holds an operation the walk does not know; "analytic" raises instead; "probe" always probes.
    Branches whose strides disagree raise ValueError, as does a layer whose output holds its positions
    elsewhere than on the last two axes (channels last) and one after an upsampling. Boxes are the
    theoretical fields (SPEC.md 2): a network that pads circularly, or by reflection or replication wider
    than the window after the padding reaches in, is warned of, as its border units also see pixels past
    their boxes. Adaptive pooling whose windows are uneven (10 -> 4) gets boxes that hold every window,
    larger than some units' fields, with a warning.
    """
    module = _layer_module(model, layer)
    size, channels = _as_size(input_size), _as_channels(channels)
    if method not in ("auto", "analytic", "probe"):
        raise ValueError(f"method must be 'auto', 'analytic' or 'probe', got {method!r}")
    if method != "probe":
        try:
            return _analytic(model, layer, module, size, channels)
        except _Unsupported as exc:
            if method == "analytic":
                raise ValueError(f"the analytic receptive field of {layer!r} is unknown: {exc.reason}") from None
            warnings.warn(f"receptive field of {layer!r}: the graph walk stopped at {exc.reason}; measuring it with "
                          "the gradient probe instead", stacklevel=2)
    return probe_receptive_field(model, layer, size, channels=channels)
