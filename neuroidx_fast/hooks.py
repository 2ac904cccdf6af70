"""Capture the outputs of named layers during a forward and stop the forward after the last of them
(``LayerCapture``), or the input of one layer, stopping before it runs (``InputCapture``)."""

from __future__ import annotations

import difflib

import torch
from torch import nn

__all__ = ["resolve_layers", "LayerCapture", "InputCapture", "SharedModuleError", "LayerNotReachedError"]


def resolve_layers(model: nn.Module, layers) -> dict[str, nn.Module]:
    """Map layer names (from ``model.named_modules()``) to modules; unknown names list the closest ones."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layers, str):
        layers = [layers]
    if layers is None or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be a module name or a list of them, got {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError("no layers given: name at least one module of model.named_modules()")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers named twice: {sorted({n for n in layers if layers.count(n) > 1})}")
    modules = dict(model.named_modules())
    found = {}
    for name in layers:
        if not isinstance(name, str) or name not in modules or name == "":
            close = difflib.get_close_matches(str(name), [n for n in modules if n], n=5, cutoff=0.4)
            hint = f"; closest names: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown layer {name!r}: not a name of model.named_modules(){hint}")
        found[name] = modules[name]
    return found


class _StopForward(Exception):
    """Raised by the last hook: nothing after the deepest requested layer is computed."""


def _forward_until_stopped(model: nn.Module, inputs, kwargs) -> None:
    """Run the forward until a capture hook raises _StopForward (or to its end)."""
    try:
        model(*inputs, **kwargs)
    except _StopForward:
        pass


class LayerNotReachedError(RuntimeError):
    """A requested layer that the forward never ran: the model's structure, not its inputs, is to blame."""


def _never_reached(names) -> LayerNotReachedError:
    return LayerNotReachedError(f"the forward never reached layer(s) {list(names)}: they are not used by "
                                "model.forward")


class SharedModuleError(ValueError):
    """A requested module ran twice in one forward."""

    def __init__(self, name: str):
        super().__init__(f"layer {name!r} runs more than once in one forward (a module shared by several places of "
                         "model.forward, e.g. torchvision's ReLU inside a residual block): its outputs are not one "
                         "layer. Choose a module that is called once, e.g. the block that holds it or the conv / "
                         "norm before it")


class LayerCapture:
    """Context manager: ``with LayerCapture(model, names) as cap: outputs = cap.run(x)``.

    ``run`` returns ``{name: output tensor}`` for every requested layer and interrupts the forward as
    soon as all of them have produced their output. A layer that the forward does not reach is an error,
    and so is a second call of a requested module within one forward (a shared module: which call would
    be the layer?). ``run_whole`` lets the forward run to its end, so that every such call is seen.
    Outputs are the values the layer returned: copies wherever the forward goes on past the layer (a
    later in-place op would otherwise rewrite them).
    """

    def __init__(self, model: nn.Module, layers, stop_early: bool = True):
        self.model = model
        self.modules = resolve_layers(model, layers)
        self.stop_early = stop_early
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def _hook(self, name):
        def hook(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor; index a "
                                "module whose output is a [B, C, H, W] or [B, C] tensor")
            if name in self._outputs:
                raise SharedModuleError(name)
            last = self.stop_early and len(self._outputs) + 1 == len(self.modules)
            # Where the forward goes on, a later in-place op (ReLU(inplace=True), out += identity) may
            # rewrite this very tensor: keep a copy. Where it stops right here, nothing can.
            self._outputs[name] = output if last else output.clone()
            if last:
                raise _StopForward

        return hook

    def run(self, *inputs, **kwargs) -> dict[str, torch.Tensor]:
        self._outputs = {}
        _forward_until_stopped(self.model, inputs, kwargs)
        return self._collect()

    def run_whole(self, *inputs, **kwargs) -> dict[str, torch.Tensor]:
        """As ``run``, without interrupting the forward: a later call of a requested module raises
        ``SharedModuleError`` here (``run`` stops at the last requested layer, before such a call). Once
        every requested layer is captured, an error further on is not one (e.g. a head sized for other
        inputs than the ones indexed): the forward just ends there."""
        stop_early, self.stop_early = self.stop_early, False
        self._outputs = {}
        try:
            _forward_until_stopped(self.model, inputs, kwargs)
        except SharedModuleError:
            raise
        except Exception:
            if len(self._outputs) < len(self.modules):
                raise
        finally:
            self.stop_early = stop_early
        return self._collect()

    def _collect(self) -> dict[str, torch.Tensor]:
        missing = [name for name in self.modules if name not in self._outputs]
        if missing:
            raise _never_reached(missing)
        outputs, self._outputs = self._outputs, {}
        return outputs


class InputCapture:
    """Context manager: ``with InputCapture(model, name) as cap: a = cap.run(x)``: the first positional
    input of layer ``name`` (its first call), the forward interrupted before the layer runs."""

    def __init__(self, model: nn.Module, name: str):
        self.model = model
        self.name, self.module = next(iter(resolve_layers(model, [name]).items()))
        self._input = None
        self._handle = None

    def __enter__(self):
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._handle = None
        return False

    def _hook(self, module, inputs):
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            raise TypeError(f"layer {self.name!r} was called without a tensor as its first input")
        self._input = inputs[0]
        raise _StopForward

    def run(self, *inputs, **kwargs) -> torch.Tensor:
        self._input = None
        _forward_until_stopped(self.model, inputs, kwargs)
        if self._input is None:
            raise _never_reached([self.name])
        captured, self._input = self._input, None
        return captured
