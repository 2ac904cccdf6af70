"""The ``triton`` backend: the Triton kernels of kernels/ (installed as ``neuroidx_fast.kernels``).

Runs on CUDA devices; on CPU tensors only under ``TRITON_INTERPRET=1`` (set before triton is imported),
which is how the tests exercise it without a GPU. Same contract as ``neuroidx_fast.ops.reference``.
"""

from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from neuroidx_fast.kernels.crops import accumulate_crops, gather_crops
from neuroidx_fast.kernels.spatial_reduce import spatial_reduce
from neuroidx_fast.kernels.topk_update import topk_update
from neuroidx_fast.kernels.ablation import mask_replicas, readout_ablation_argmax

__all__ = ["check_device", "spatial_reduce", "topk_update", "gather_crops", "accumulate_crops",
           "mask_replicas", "readout_ablation_argmax"]


def check_device(device_type: str) -> None:
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("Triton kernels need a CUDA device and torch.cuda.is_available() is False")
        return
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return
        raise RuntimeError("Triton kernels need a CUDA device (on CPU they run only under TRITON_INTERPRET=1, "
                           "for tests)")
    raise RuntimeError(f"Triton kernels run on CUDA devices only, not on {device_type}")
