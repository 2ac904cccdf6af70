"""Saving and loading what the pipeline makes, in the layout of ``neuroidx_fast.outdir``."""

from __future__ import annotations

import ast
import numbers
import os
import shutil

from safetensors.torch import load_file, save_file

from .atomic import write_atomic
from .features import NeuronFeatures
from .outdir import OutDir, read_json, write_json
from .png import save_png, to_pil
from .receptive_fields import ReceptiveField

__all__ = ["save_features", "load_features"]

_TENSORS = ("nf", "crops", "crop_ids", "crop_values", "dead", "units", "weight_sum")


def _save_tensors(path, tensors: dict) -> None:
    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp),
                 suffix=".safetensors")


def _pad_to_json(pad):
    """A pad as the JSON of rf.json holds it: a mode's name, or its value(s) as numbers."""
    if isinstance(pad, str):
        return pad
    if isinstance(pad, numbers.Real):
        return float(pad)
    values = pad.tolist() if hasattr(pad, "tolist") else list(pad)
    return [float(v) for v in values] if isinstance(values, list) else float(values)


def _pad_from_json(value):
    """The pad ``_pad_to_json`` wrote: values as a tuple. (Earlier files hold str(pad): "(r, g, b)".)"""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str) and value[:1] in "([0123456789-.":
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
        return tuple(parsed) if isinstance(parsed, (list, tuple)) else parsed
    return value


def save_features(features: NeuronFeatures, out: OutDir, pngs: bool = True, scale: int | None = None) -> None:
    """Write a layer's NFs: tensors, receptive field, the grid PNG, and per unit its NF and crop PNGs."""
    layer = features.layer
    _save_tensors(out.features_file(layer), {k: getattr(features, k) for k in _TENSORS})
    rf = features.rf
    write_json(out.rf_json(layer), {"size": list(rf.size), "stride": list(rf.stride), "offset": list(rf.offset),
                                    "input_size": list(rf.input_size), "map_size": list(rf.map_size or (1, 1)),
                                    "whole_image": rf.whole_image, "method": rf.method,
                                    "pad": _pad_to_json(features.pad), "norm": features.norm})
    # the PNGs of an earlier run of this layer (other units, more crops kept) would stay beside the new ones
    for folder in (out.nf_png(layer, 0).parent, out.crop_png(layer, 0, 0).parent):
        shutil.rmtree(folder, ignore_errors=True)
    if not pngs:
        return
    size = max(features.nf.shape[-2:])
    scale = scale or max(1, 48 // size)
    features.save_grid(out.grid_png(layer), scale=scale)
    for row, unit in enumerate(features.units.tolist()):
        save_png(to_pil(features.nf[row], scale), out.nf_png(layer, unit))
        for j, image_id in enumerate(features.crop_ids[row].tolist()):
            if image_id >= 0:
                save_png(to_pil(features.crops[row, j], scale), out.crop_png(layer, unit, j))


def load_features(out: OutDir, layer: str) -> NeuronFeatures:
    """Read back what ``save_features`` wrote."""
    path = out.features_file(layer)
    if not path.exists():
        raise FileNotFoundError(f"no Neuron Features for layer {layer!r} in {out.root}: run `neuroidx features` first")
    tensors = load_file(os.fspath(path))
    info = read_json(out.rf_json(layer))
    rf = ReceptiveField(tuple(info["size"]), tuple(info["stride"]), tuple(info["offset"]), tuple(info["input_size"]),
                        tuple(info["map_size"]), bool(info["whole_image"]), info["method"])
    return NeuronFeatures(layer, tensors["nf"], tensors["crops"], tensors["crop_ids"], tensors["crop_values"],
                          tensors["dead"].bool(), tensors["weight_sum"], tensors["units"], rf,
                          _pad_from_json(info["pad"]), info["norm"])
