"""Receptive fields (SPEC.md section 2): ``receptive_field(model, layer, input_size)``, and
``receptive_fields(model, layers, input_size)`` for several layers from one walk of the graph.

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
from .rf_walk import _analytic, _analytic_shared, _field, _Unsupported

__all__ = ["ReceptiveField", "receptive_field", "receptive_fields", "probe_gradient", "probe_receptive_field"]


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
    larger than some units' fields, with a warning. ``receptive_fields`` finds several layers' at once.
    """
    return _receptive_field(model, layer, input_size, method, channels, None, stacklevel=3)


def receptive_fields(model: nn.Module, layers, input_size, channels: int = 3,
                     errors: str = "raise") -> dict[str, ReceptiveField]:
    """``{layer: receptive_field(model, layer, input_size, channels=channels)}`` for each of ``layers`` (a
    name or names), the same fields, warnings and errors, but from one trace and one walk of the graph
    where the walk answers for each layer as it would alone (the probe, where it falls back to it, still
    measures each layer apart). ``errors="raise"``: the first layer that has no field raises its error, as
    that loop would; ``errors="return"``: its error is its value in the dict, and the other layers go on.
    """
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
    names = list(dict.fromkeys([layers] if isinstance(layers, str) else layers))
    shared: list = []  # the shared walk's warnings
    walked = _walked_together(model, names, input_size, channels, shared)
    fields = {}
    try:
        with warnings.catch_warnings(record=True) as own:
            warnings.simplefilter("always")
            for name in names:
                try:
                    fields[name] = _receptive_field(model, name, input_size, "auto", channels, walked.get(name),
                                                    stacklevel=3)
                except Exception as exc:
                    if errors == "raise":
                        raise
                    fields[name] = exc
    finally:
        _show_again(shared, own)
    return fields


def _show_again(shared: list, own: list) -> None:
    """Show the warnings the layers' own walks gave (``own``), after those of the shared walk that none
    of them gave again (a warning given once per process, by a model or by torch's TORCH_WARN_ONCE, is
    not given again), each at its place and through the user's filters: one registry for the call, so
    a warning the "default" action shows once per place is shown once."""
    again = {(str(w.message), w.category) for w in own}
    registry: dict = {}
    for w in [w for w in shared if (str(w.message), w.category) not in again] + list(own):
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=registry, source=w.source)


def _walked_together(model: nn.Module, names, input_size, channels, seen: list) -> dict:
    """What one walk of the graph finds for each layer that it answers for as a walk for the layer alone
    would ({} where the arguments are wrong: each layer's own call says how)."""
    try:
        size, channels = _as_size(input_size), _as_channels(channels)
    except ValueError:
        return {}
    modules = {}
    for name in names:
        try:
            modules[name] = _layer_module(model, name)
        except Exception:  # an unknown name or not a model: that layer's own call raises it
            continue
    return _analytic_shared(model, modules, size, channels, seen) if modules else {}


def _receptive_field(model: nn.Module, layer: str, input_size, method: str, channels, walked,
                     stacklevel: int) -> ReceptiveField:
    """receptive_field, from ``walked`` (what a shared walk found at the layer) where not None;
    ``stacklevel``: where its warnings point, as seen from this function."""
    module = _layer_module(model, layer)
    size, channels = _as_size(input_size), _as_channels(channels)
    if method not in ("auto", "analytic", "probe"):
        raise ValueError(f"method must be 'auto', 'analytic' or 'probe', got {method!r}")
    if method != "probe":
        try:
            if walked is not None:
                return _field(walked, size, layer, stacklevel + 1)
            return _analytic(model, layer, module, size, channels, stacklevel + 1)
        except _Unsupported as exc:
            if method == "analytic":
                raise ValueError(f"the analytic receptive field of {layer!r} is unknown: {exc.reason}") from None
            warnings.warn(f"receptive field of {layer!r}: the graph walk stopped at {exc.reason}; measuring it with "
                          "the gradient probe instead", stacklevel=stacklevel)
    return probe_receptive_field(model, layer, size, channels=channels)
