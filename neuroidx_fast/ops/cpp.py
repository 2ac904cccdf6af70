"""The ``cpp`` backend: CPU kernels of csrc/cpu through the pybind11 module ``neuroidx_fast._C``."""

from __future__ import annotations

import torch

from .. import _C

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def check_device(device_type: str) -> None:
    if device_type != "cpu":
        raise RuntimeError(f"the cpp backend runs on CPU tensors only, not {device_type}")


def spatial_reduce(x: torch.Tensor):
    b, c, h, w = x.shape
    vmax = torch.empty((b, c), dtype=torch.float32)
    argmax = torch.empty((b, c), dtype=torch.int64)
    vmean = torch.empty((b, c), dtype=torch.float32)
    _C.spatial_reduce(x.data_ptr(), _DTYPE_CODES[x.dtype], b, c, h, w, *x.stride(),
                      vmax.data_ptr(), argmax.data_ptr(), vmean.data_ptr(), torch.get_num_threads())
    return vmax, argmax, vmean


def topk_update(state_values, state_ids, state_positions, values, ids, positions) -> None:
    num_units, k = state_values.shape
    for t in (state_values, state_ids, state_positions, values, ids, positions):
        assert t.is_contiguous() and t.device.type == "cpu"
    _C.topk_update(state_values.data_ptr(), state_ids.data_ptr(), state_positions.data_ptr(), num_units, k,
                   values.data_ptr(), ids.data_ptr(), positions.data_ptr(), values.shape[0],
                   torch.get_num_threads())
