"""The ``cuda`` backend: the hand-written kernels of csrc/cuda, compiled at first use through CuPy.

The .cu sources ship as package data (``neuroidx_fast.cuda_src``), are compiled by NVRTC through
``cupy.RawModule`` once per (source file, device) and launched on torch's current stream on the
tensors' own memory: outputs are torch tensors, no copy and no CuPy memory pool is involved.
Same contract as ``neuroidx_fast.ops.reference`` (exact values, ids, positions and argmax).

Inputs the kernels do not cover (a map of 2^30 elements or more; a top-K state in an unexpected dtype
or memory layout, or too large for shared memory) are passed to the reference, which gives the same
result.
"""

from __future__ import annotations

import importlib.resources
import re
import threading
from pathlib import Path

import numpy
import torch

import cupy  # an ImportError here marks the backend unavailable (reported by neuroidx_fast.backends)

from neuroidx_fast.ops import reference
from neuroidx_fast.ops.crop_operands import INT32_LIMIT, check_index_range, crop_operands

__all__ = ["check_device", "spatial_reduce", "topk_update", "gather_crops", "accumulate_crops", "kernel_source",
           "KERNELS", "mask_replicas", "readout_ablation_argmax"]

# Must match NX_SR_THREADS / NX_TOPK_THREADS in the .cu files.
_SR_THREADS = 256
_TOPK_THREADS = 256
_CROP_THREADS = 256  # NX_CROP_THREADS in crops.cu
_CROP_CHUNK = 256 * 4  # output pixels per block: NX_CROP_THREADS * NX_CROP_PIXELS

_DTYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_SR_VARIANTS = ("groups_contig", "groups_strided", "threads_flat", "threads_rows")

# Every kernel the launcher calls, per source file (the tests check that each one is defined).
KERNELS = {
    "spatial_reduce.cu": tuple(f"nx_sr_{v}_{s}" for v in _SR_VARIANTS for s in _DTYPE_SUFFIX.values()),
    "topk_update.cu": ("nx_topk_update",),
    "crops.cu": tuple(f"nx_{op}_crops_{mode}{pixels}" for op in ("gather", "accumulate") for mode in ("pad", "edge")
                      for pixels in ("", "_u8")),
    "ablation.cu": ("nx_mask_replicas_u16", "nx_mask_replicas_u32", "nx_mask_replicas_u64",
                    "nx_readout_ablation_argmax"),
}

_NVRTC_OPTIONS = ("--std=c++17",)
_MAX_MAP_ELEMENTS = 1 << 30  # the kernels index a map with int32
_DEFAULT_SHARED = 48 * 1024  # shared memory (static + dynamic) a block gets without opting in
_STATIC_SHARED = 1024  # kept for a kernel's static shared memory (nx_topk_update's s_scan: 48 bytes)
_SHARED_WITHOUT_OPT_IN = _DEFAULT_SHARED - _STATIC_SHARED  # dynamic bytes launched without the opt-in
_INCLUDE_COMMON = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"common\.cuh"[ \t]*$', re.MULTILINE)

_lock = threading.Lock()
_modules: dict = {}  # (file, device index) -> cupy.RawModule
_kernels: dict = {}  # (file, kernel name, device index) -> cupy.RawKernel
_streams: dict = {}  # (device index, cudaStream_t) -> cupy.cuda.ExternalStream
_opted_in: dict = {}  # (kernel name, device index) -> dynamic shared bytes allowed so far
_device_info: dict = {}  # device index -> (multiprocessor count, opt-in shared bytes per block)
_check: dict = {}  # device index -> None (usable) or the reason it is not


# --- sources and compilation -------------------------------------------------------------------

def _read_source(filename: str) -> str:
    try:
        return importlib.resources.files("neuroidx_fast.cuda_src").joinpath(filename).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        # Running from a source tree that is on sys.path but not installed: csrc/cuda next to the package.
        return (Path(__file__).resolve().parents[2] / "csrc" / "cuda" / filename).read_text(encoding="utf-8")


def kernel_source(filename: str) -> str:
    """The text NVRTC compiles: ``filename`` with common.cuh pasted in place of its include
    (NVRTC has no include path into the installed package)."""
    common = _read_source("common.cuh")
    text, count = _INCLUDE_COMMON.subn(lambda _match: common, _read_source(filename))
    if count != 1:
        raise RuntimeError(f"{filename}: expected one '#include \"common.cuh\"' line, found {count}")
    return text


def _kernel(filename: str, name: str, device: int):
    key = (filename, name, device)
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                with cupy.cuda.Device(device):
                    module = _modules.get((filename, device))
                    if module is None:
                        module = cupy.RawModule(code=kernel_source(filename), options=_NVRTC_OPTIONS)
                        _modules[(filename, device)] = module
                    kernel = module.get_function(name)
                _kernels[key] = kernel
    return kernel


def _info(device: int):
    info = _device_info.get(device)
    if info is None:
        props = torch.cuda.get_device_properties(device)
        optin = int(getattr(props, "shared_memory_per_block_optin", 0) or _DEFAULT_SHARED)
        info = (int(props.multi_processor_count), max(optin, _DEFAULT_SHARED))
        _device_info[device] = info
    return info


def _stream(device: int, tensor_device: torch.device):
    handle = torch.cuda.current_stream(tensor_device).cuda_stream
    key = (device, handle)
    stream = _streams.get(key)
    if stream is None:
        stream = cupy.cuda.ExternalStream(handle, device)
        _streams[key] = stream
    return stream


def _launch(kernel, tensor_device: torch.device, grid: int, block: int, args: tuple, shared_mem: int = 0) -> None:
    device = tensor_device.index
    with cupy.cuda.Device(device), _stream(device, tensor_device):
        kernel((grid,), (block,), args, shared_mem=shared_mem)


def _ptr(t: torch.Tensor):
    return numpy.uint64(t.data_ptr())


def check_device(device_type: str) -> None:
    """Raises RuntimeError (one line) unless the kernels can run on ``device_type`` tensors."""
    if device_type != "cuda":
        raise RuntimeError(f"the CUDA kernels run on CUDA devices only, not on {device_type}")
    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA kernels need a CUDA device and torch.cuda.is_available() is False")
    device = torch.cuda.current_device()
    if device not in _check:
        try:
            for filename, names in KERNELS.items():
                _kernel(filename, names[0], device)  # compiles the whole file
            _check[device] = None
        except Exception as exc:  # NVRTC missing, driver too old, compile error: report, do not crash
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            _check[device] = f"CuPy could not compile the CUDA kernels: {type(exc).__name__}: {first_line}"
    if _check[device] is not None:
        raise RuntimeError(_check[device])


# --- spatial_reduce ------------------------------------------------------------------------------

def _spatial_plan(num_maps: int, C: int, H: int, W: int, strides, sm_count: int):
    """(kernel variant, log2 of its group size or slice count, grid size, normalised strides)."""
    sB, sC, sH, sW = strides
    # The stride of a size-1 dimension is meaningless: normalise it so the layout tests below hold.
    if W == 1:
        sW = sH if H > 1 else 1
    if H == 1:
        sH = W * sW
    hw = H * W
    map_strides = [abs(s) for s, n in ((sH, H), (sW, W)) if n > 1]
    resident = sm_count * 2048  # threads the device holds at once
    if C > 1 and (not map_strides or abs(sC) < min(map_strides)):
        # channels_last-like: adjacent maps are closer in memory than adjacent elements of a map.
        if sH != W * sW:
            return "threads_rows", 0, -(-num_maps // _SR_THREADS), (sB, sC, sH, sW)
        slices = 1  # too few maps to fill the device: split each map into runs of positions
        while slices < 8 and hw >= 64 * slices and 2 * num_maps * slices <= resident:
            slices *= 2
        maps_per_block = _SR_THREADS // slices
        return "threads_flat", slices.bit_length() - 1, -(-num_maps // maps_per_block), (sB, sC, sH, sW)
    variant = "groups_contig" if (sW == 1 and sH == W) else "groups_strided"
    group = 1
    while group < 32 and hw >= 32 * group:  # at least 16 elements per thread
        group *= 2
    while group < _SR_THREADS and hw >= 32 * group and num_maps * group < resident:  # few, large maps
        group *= 2
    maps_per_block = _SR_THREADS // group
    return variant, group.bit_length() - 1, -(-num_maps // maps_per_block), (sB, sC, sH, sW)


def spatial_reduce(x: torch.Tensor):
    if x.dim() != 4:
        raise ValueError(f"spatial_reduce expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.device.type != "cuda":
        raise ValueError(f"the cuda backend got a tensor on {x.device}")
    suffix = _DTYPE_SUFFIX.get(x.dtype)
    B, C, H, W = x.shape
    num_maps, hw = B * C, H * W
    if suffix is None or hw >= _MAX_MAP_ELEMENTS:
        return reference.spatial_reduce(x)
    if hw == 0:
        raise ValueError(f"spatial_reduce got an empty activation map (H={H}, W={W})")
    vmax = torch.empty((B, C), dtype=torch.float32, device=x.device)
    argmax = torch.empty((B, C), dtype=torch.int64, device=x.device)
    vmean = torch.empty((B, C), dtype=torch.float32, device=x.device)
    if num_maps == 0:
        return vmax, argmax, vmean
    variant, log2g, grid, (sB, sC, sH, sW) = _spatial_plan(num_maps, C, H, W, x.stride(), _info(x.device.index)[0])
    kernel = _kernel("spatial_reduce.cu", f"nx_sr_{variant}_{suffix}", x.device.index)
    args = (
        _ptr(x), _ptr(vmax), _ptr(argmax), _ptr(vmean),
        numpy.int32(C), numpy.int32(H), numpy.int32(W),
        numpy.int64(sB), numpy.int64(sC), numpy.int64(sH), numpy.int64(sW),
        numpy.int64(num_maps), numpy.int32(log2g),
    )
    _launch(kernel, x.device, grid, _SR_THREADS, args)
    return vmax, argmax, vmean


# --- topk_update ---------------------------------------------------------------------------------

def _topk_shared_bytes(k: int, batch: int) -> int:
    # Layout in topk_update.cu: 8 * (2 K + B) + 4 * (2 K + 3 B).
    return 24 * k + 20 * batch


def topk_update(state_values, state_ids, state_positions, values, ids, positions) -> None:
    num_units, k = state_values.shape
    batch = values.shape[0]
    if tuple(state_ids.shape) != (num_units, k) or tuple(state_positions.shape) != (num_units, k):
        raise ValueError("topk_update: state_values, state_ids and state_positions must all be [C, K]")
    if tuple(values.shape) != (batch, num_units) or tuple(positions.shape) != (batch, num_units) \
            or tuple(ids.shape) != (batch,):
        raise ValueError(f"topk_update: expected values and positions [B, {num_units}] and ids [B], got "
                         f"{tuple(values.shape)}, {tuple(positions.shape)} and {tuple(ids.shape)}")
    if batch == 0 or num_units == 0 or k == 0:
        return
    tensors = (state_values, state_ids, state_positions, values, ids, positions)
    dtypes = (torch.float32, torch.int64, torch.int64, torch.float32, torch.int64, torch.int64)
    device = state_values.device
    state_ok = all(t.is_contiguous() for t in tensors[:3])
    shared = _topk_shared_bytes(k, batch)
    if (device.type != "cuda" or any(t.device != device for t in tensors) or not state_ok
            or any(t.dtype != d for t, d in zip(tensors, dtypes))
            or shared > _info(device.index)[1] - _STATIC_SHARED):
        reference.topk_update(*tensors)
        return
    values, ids, positions = values.contiguous(), ids.contiguous(), positions.contiguous()
    kernel = _kernel("topk_update.cu", "nx_topk_update", device.index)
    if shared > _SHARED_WITHOUT_OPT_IN:  # (dynamic + static above 48 KiB fails to launch without it)
        _allow_shared(kernel, "nx_topk_update", device.index, shared)
    args = (
        _ptr(state_values), _ptr(state_ids), _ptr(state_positions),
        _ptr(values), _ptr(ids), _ptr(positions),
        numpy.int32(num_units), numpy.int32(k), numpy.int32(batch),
    )
    _launch(kernel, device, num_units, _TOPK_THREADS, args, shared_mem=shared)


def _allow_shared(kernel, name: str, device: int, nbytes: int) -> None:
    """Opt the kernel in to more than 48 KiB of dynamic shared memory on ``device``."""
    key = (name, device)
    if _opted_in.get(key, _SHARED_WITHOUT_OPT_IN) >= nbytes:
        return
    with _lock:
        if _opted_in.get(key, _SHARED_WITHOUT_OPT_IN) < nbytes:
            allowed = _info(device)[1] - _STATIC_SHARED
            with cupy.cuda.Device(device):
                kernel.max_dynamic_shared_size_bytes = allowed
            _opted_in[key] = allowed


# --- gather_crops / accumulate_crops ----------------------------------------------------------------

def _crop_operands(images, slots, tops, pad_value, size, what: str):
    """Contiguous operands of the crop kernels (images float32, or uint8 pixel codes, which the `_u8`
    kernels decode as they read them); raises where the int indexing of crops.cu would not hold."""
    operands = crop_operands(images, slots, tops, pad_value, what, pixel_types=(torch.float32, torch.uint8))
    if slots.device != images.device or tops.device != images.device:
        raise ValueError(f"{what}: slots and tops must be on {images.device}")
    rh, rw = size
    check_index_range(images, size, what, "crops.cu", crop_limit=INT32_LIMIT - _CROP_CHUNK)
    if images.shape[1] > INT32_LIMIT or slots.shape[-1] > INT32_LIMIT:
        raise ValueError(f"{what}: {images.shape[1]} channels or {slots.shape[-1]} slots per unit exceed the 2**31 "
                         "index range of crops.cu")
    if -(-(rh * rw) // _CROP_CHUNK) > 65535:  # gridDim.y
        raise ValueError(f"{what}: crops of {rh * rw} pixels per channel are too large for crops.cu")
    return operands


def _require_cuda(images, what: str) -> None:
    if images.device.type != "cuda":
        raise ValueError(f"{what}: the cuda backend got images on {images.device}")


def _crop_kernel_and_table(op: str, images, pad):
    """The crops.cu kernel of ``op`` for these images and pad mode, and the table argument that follows
    ``pad`` in its signature: the 256 values of the pixel codes for uint8 images (the `_u8` kernels),
    nothing for float32 ones."""
    name = f"nx_{op}_crops_{'edge' if pad is None else 'pad'}"
    if images.dtype != torch.uint8:
        return name, ()
    return name + "_u8", (_ptr(reference.pixel_code_values(images.device)),)  # (cached: outlives the launch)


def gather_launch(images, slots, tops, pad, crops):
    """(kernel name, grid, args) of the crops.cu launch that fills ``crops`` [M, Ch, rh, rw] (operands as
    ``_crop_operands`` returns them; ``pad`` None is edge mode). The tests run it through a host build of
    crops.cu as well."""
    m, ch, rh, rw = crops.shape
    name, codes = _crop_kernel_and_table("gather", images, pad)
    args = (
        _ptr(images), _ptr(slots), _ptr(tops), _ptr(images if pad is None else pad), *codes, _ptr(crops),
        numpy.int32(ch), numpy.int32(images.shape[2]), numpy.int32(images.shape[3]), numpy.int32(rh), numpy.int32(rw),
    )
    return name, (m * ch, -(-(rh * rw) // _CROP_CHUNK)), args


def accumulate_launch(sums, images, slots, tops, weights, pad):
    """(kernel name, grid, args) of the crops.cu launch that adds into ``sums`` [U, Ch, rh, rw]."""
    u, ch, rh, rw = sums.shape
    name, codes = _crop_kernel_and_table("accumulate", images, pad)
    args = (
        _ptr(sums), _ptr(images), _ptr(slots), _ptr(tops), _ptr(weights), _ptr(images if pad is None else pad),
        *codes, numpy.int32(slots.shape[1]), numpy.int32(ch), numpy.int32(images.shape[2]),
        numpy.int32(images.shape[3]), numpy.int32(rh), numpy.int32(rw),
    )
    return name, (u * ch, -(-(rh * rw) // _CROP_CHUNK)), args


def _launch_crops(plan, tensor_device: torch.device) -> None:
    name, grid, args = plan
    device = tensor_device.index
    kernel = _kernel("crops.cu", name, device)
    with cupy.cuda.Device(device), _stream(device, tensor_device):
        kernel(grid, (_CROP_THREADS,), args)


def gather_crops(images, slots, tops, size, pad_value):
    _require_cuda(images, "gather_crops")
    rh, rw = size
    images, slots, tops, pad = _crop_operands(images, slots, tops, pad_value, size, "gather_crops")
    crops = torch.empty((slots.shape[0], images.shape[1], rh, rw), dtype=torch.float32, device=images.device)
    if crops.numel():
        _launch_crops(gather_launch(images, slots, tops, pad, crops), images.device)
    return crops


def accumulate_crops(sums, images, slots, tops, weights, pad_value) -> None:
    _require_cuda(images, "accumulate_crops")
    if sums.dtype != torch.float64 or not sums.is_contiguous() or sums.device != images.device:
        raise ValueError("accumulate_crops: sums must be a contiguous float64 tensor on the images' device")
    if weights.dtype != torch.float32 or weights.shape != slots.shape:
        raise ValueError(f"accumulate_crops: weights must be float32 of shape {tuple(slots.shape)}")
    images, slots, tops, pad = _crop_operands(images, slots, tops, pad_value, tuple(sums.shape[2:]),
                                              "accumulate_crops")
    weights = weights.to(images.device).contiguous()
    if sums.numel() and slots.numel():
        _launch_crops(accumulate_launch(sums, images, slots, tops, weights, pad), images.device)


# --- mask_replicas / readout_ablation_argmax ----------------------------------------------------------

_MR_THREADS = 256  # NX_MR_THREADS in ablation.cu
_RO_THREADS = 128  # NX_RO_THREADS in ablation.cu
_MAX_GRID_Y = 65535
_REPLICA_SUFFIX = {2: "u16", 4: "u32", 8: "u64"}


def mask_replicas(x, masks, fill):
    b, c, h, w = x.shape
    m = masks.shape[0]
    suffix = _REPLICA_SUFFIX.get(x.element_size())
    row_len, rows = c * h * w, m * b
    if x.device.type != "cuda" or suffix is None or row_len >= 2**31 - 1 or rows >= 2**31 - 1 \
            or masks.device != x.device:
        return reference.mask_replicas(x, masks, fill)
    out = reference.empty_replicas(x, m)
    if out.numel() == 0:
        return out
    masks = masks.contiguous().view(torch.uint8)
    fill = fill.to(device=x.device, dtype=x.dtype).contiguous()
    kernel = _kernel("ablation.cu", f"nx_mask_replicas_{suffix}", x.device.index)
    grid_x = -(-row_len // _MR_THREADS)
    grid_y = min(rows, _MAX_GRID_Y, max(1, (_info(x.device.index)[0] * 64) // grid_x))
    args = (
        _ptr(x), _ptr(masks), _ptr(fill), _ptr(out),
        numpy.int32(b), numpy.int32(c), numpy.int32(w), numpy.int32(h * w),
        *(numpy.int64(s) for s in x.stride()),
        numpy.int32(rows), numpy.int32(0 if out.is_contiguous() else 1),
    )
    device = x.device.index
    with cupy.cuda.Device(device), _stream(device, x.device):
        kernel((grid_x, grid_y), (_MR_THREADS,), args)
    return out


def readout_ablation_argmax(logits, features, weight, ablated, units, scale, err_rel):
    b, k = logits.shape
    c = features.shape[1]
    u = units.shape[0]
    tensors = (logits, features, weight, ablated, units, scale)
    if logits.device.type != "cuda" or any(t.device != logits.device for t in tensors) \
            or max(b, c, k, u) >= 2**31 - 1:
        return reference.readout_ablation_argmax(logits, features, weight, ablated, units, scale, err_rel)
    pred = torch.empty((u, b), dtype=torch.int64, device=logits.device)
    if u * b == 0:
        return pred
    logits, features, weight, ablated, units, scale = (t.contiguous() for t in tensors)
    kernel = _kernel("ablation.cu", "nx_readout_ablation_argmax", logits.device.index)
    args = (
        _ptr(logits), _ptr(features), _ptr(weight), _ptr(ablated), _ptr(units), _ptr(scale), _ptr(pred),
        numpy.float64(err_rel), numpy.int32(b), numpy.int32(c), numpy.int32(k), numpy.int32(u),
    )
    device = logits.device.index
    with cupy.cuda.Device(device), _stream(device, logits.device):
        kernel((-(-u // _RO_THREADS), min(b, _MAX_GRID_Y)), (_RO_THREADS,), args)
    return pred

