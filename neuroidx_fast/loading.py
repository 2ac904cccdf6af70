"""Models, weights and input normalisation named on the command line."""

from __future__ import annotations

import importlib
import os
import sys

import torch
from torch import nn

from .prepare import first_line

__all__ = ["load_model", "load_weights", "Normalize", "parse_normalize", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """(x - mean) / std per channel, on the device: the ``preprocess`` of the pipeline (picklable)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))
        # one mean and one std for every channel ('--normalize mean,std'): images of any channel count
        self.one_value = self.mean.unique().numel() == 1 and self.std.unique().numel() == 1

    def forward(self, x):
        mean, std = self.mean, self.std
        if x.dim() == 4 and x.shape[1] != mean.shape[1]:  # (broadcast, [B, 1, H, W] would become [B, 3, H, W])
            if not getattr(self, "one_value", False):
                raise ValueError(f"the normalisation holds {mean.shape[1]} channels' means and stds, but the images "
                                 f"have {x.shape[1]} channel(s): give one per channel, or one mean and one std for all "
                                 "(--normalize mean,std)")
            mean, std = mean[:, :1], std[:, :1]
        return (x - mean.to(x.device, x.dtype)) / std.to(x.device, x.dtype)


def parse_normalize(spec: str | None):
    """``imagenet``, ``none``, ``mean,std`` (one value each) or six values ``m1,m2,m3,s1,s2,s3``."""
    if spec is None or spec.strip().lower() == "none":
        return None
    if spec.strip().lower() == "imagenet":
        return Normalize(IMAGENET_MEAN, IMAGENET_STD)
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        values = []
    half = len(values) // 2
    # as the float32 they become: a std of 1e-46 is 0 there, and 1e39 infinite
    stored = torch.tensor(values, dtype=torch.float32) if values else torch.zeros(0)
    if len(values) in (2, 6) and (not bool(torch.isfinite(stored).all()) or bool((stored[half:] <= 0).any())):
        raise ValueError(f"--normalize {spec!r}: the means must be numbers and the standard deviations numbers > 0")
    if len(values) == 2:
        return Normalize((values[0],) * 3, (values[1],) * 3)
    if len(values) == 6:
        return Normalize(values[:3], values[3:])
    raise ValueError(f"--normalize {spec!r} not understood: use imagenet, none, 'mean,std' or six numbers "
                     "'m1,m2,m3,s1,s2,s3'")


def _from_factory(spec: str, kwargs: dict, import_root: str | None = None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    # a factory in the user's working directory, or in the one recorded (a later step run from elsewhere):
    # first, so that a module of the same name in the working directory does not take its place
    root = import_root or os.getcwd()
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError) as exc:  # (ValueError: an empty name, ':x')
        raise ValueError(f"cannot import {module_name!r} for --model {spec!r}: {exc}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"{module_name!r} has no {attr!r} (from --model {spec!r})")
        factory = getattr(factory, part)
    if isinstance(factory, nn.Module) and kwargs:
        raise ValueError(f"--model {spec!r} names a model already built, which takes no --model-args ({kwargs}): name "
                         "a factory function instead, or drop --model-args")
    model = factory(**kwargs) if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model(spec: str, kwargs: dict | None = None, import_root: str | None = None) -> nn.Module:
    """A model from ``package.module:factory`` (called with ``kwargs``; imported from ``import_root`` first,
    by default the working directory), ``vgg_m`` (built in), or a torchvision / timm model name when those
    libraries are installed (untrained: weights come from ``--weights``)."""
    kwargs = dict(kwargs or {})
    if not isinstance(spec, str) or not spec:
        raise ValueError("--model is required: package.module:factory, vgg_m, or a torchvision / timm name")
    if ":" in spec:
        return _from_factory(spec, kwargs, import_root)
    if spec in ("vgg_m", "vgg-m"):
        from .models import vgg_m

        return vgg_m(**kwargs)
    tried = []
    try:
        import torchvision

        if spec in torchvision.models.list_models():
            return torchvision.models.get_model(spec, weights=None, **kwargs)
        tried.append("torchvision")
    except ImportError:
        tried.append("torchvision (not installed)")
    try:
        import timm

        if spec in timm.list_models():
            return timm.create_model(spec, pretrained=False, **kwargs)
        tried.append("timm")
    except ImportError:
        tried.append("timm (not installed)")
    raise ValueError(f"unknown model {spec!r}: not package.module:factory, not vgg_m, not a model of "
                     f"{', '.join(tried)}")


def _is_safetensors(path: str) -> bool:
    """A safetensors file, by its name (any case) or its first bytes: an 8-byte little-endian header
    length, then the JSON header's "{" (torch files begin with a zip's "PK" or a pickle's 0x80)."""
    if path.lower().endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def is_weights_format(path) -> bool:
    """Whether ``path`` begins as a weights file does: safetensors, or torch.save's zip or pickle."""
    with open(path, "rb") as f:
        head = f.read(2)
    return _is_safetensors(os.fspath(path)) or head == b"PK" or head[:1] == b"\x80"


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load a state dict (safetensors, or a torch file read with weights_only=True) into ``model``,
    strictly: missing, unexpected or mis-shaped tensors are a one-line error naming a few of them."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"weights {path!r} is a folder: give the weights file (safetensors, or a state dict saved "
                         "with torch.save)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Unsupported global" in str(exc):  # torch's long message about pickled code
            raise ValueError(f"cannot read weights {path!r}: it holds pickled Python objects, not just tensors (a "
                             "whole model saved with torch.save(model)?); save model.state_dict() instead (or a "
                             "safetensors file), after loading it yourself if you trust its source") from None
        raise ValueError(f"cannot read weights {path!r}: {type(exc).__name__}: {first_line(exc)}") from None
    # a training checkpoint: the model's state dict under one of the usual keys
    wrapped = [key for key in ("state_dict", "model", "model_state_dict")
               if isinstance(state, dict) and isinstance(state.get(key), dict)]
    if len(wrapped) == 1:
        state = state[wrapped[0]]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {path!r} hold no state dict of tensors")
    own = model.state_dict()
    # (a BatchNorm's step counter: absent from many converted checkpoints, and load_state_dict fills it in)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                parts.append(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}")
        prefixed = unexpected and all(k.startswith("module.") for k in unexpected)
        hint = ("; saved from DataParallel? its keys begin with 'module.': save model.module.state_dict(), or strip "
                "the prefix") if prefixed else ""
        raise ValueError(f"weights {path!r} do not fit the model ({'; '.join(parts)}){hint}")
    for key in own:  # the counters left out above: the model's own (torch's strict load of a file that
        if key not in state:  # keeps _metadata would refuse them as missing)
            state[key] = own[key]
    model.load_state_dict(state)
    return model
