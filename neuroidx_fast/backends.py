"""Backend registry: which implementations of the hot ops loaded, and which one a call uses.

Backends: ``torch`` (the reference, always there), ``cpp`` (csrc/cpu through the compiled module
``neuroidx_fast._C``), ``triton`` (kernels/, CUDA devices; CPU only under ``TRITON_INTERPRET=1``) and
``cuda`` (csrc/cuda compiled at first use through CuPy). Each backend module is imported lazily, the
first time a tensor on a device it serves asks for it; one that cannot load is reported once (a
warning naming the reason and what to install) and skipped by ``auto``. Nothing here raises at import.

Choice: the ``backend=`` keyword, else the ``NEUROIDX_BACKEND`` environment variable, else ``auto``:
the first usable backend of ``AUTO_ORDER`` for the tensor's device type.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")
ENV_VAR = "NEUROIDX_BACKEND"

_MODULES = {
    "torch": "neuroidx_fast.ops.reference",
    "cpp": "neuroidx_fast.ops.cpp",
    "triton": "neuroidx_fast.ops.triton",
    "cuda": "neuroidx_fast.ops.cuda",
}

# Fastest first. CPU: measured by bench/bench_topk.py (cpp >= 2x torch). CUDA: provisional order
# (hand-written CUDA, then Triton) until a GPU session measures it (see bench/results).
AUTO_ORDER = {
    "cpu": ("cpp", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}

_FIXES = {
    "cpp": "reinstall the package with a C++ compiler present (pip install -e .) so that "
    "neuroidx_fast._C is built",
    "triton": "pip install 'neuroidx-fast[triton]' on a machine with a CUDA GPU "
    "(on CPU, Triton kernels run only under TRITON_INTERPRET=1)",
    "cuda": "pip install 'neuroidx-fast[cuda12]' or 'neuroidx-fast[cuda13]' (CuPy) on a machine with a CUDA GPU",
}


class BackendUnavailable(RuntimeError):
    """Raised when a backend that was asked for by name cannot serve the tensor's device."""


_lock = threading.Lock()
_loaded: dict[str, ModuleType | BaseException] = {}
_reported: set[tuple[str, str]] = set()


def _import(name: str) -> ModuleType | BaseException:
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = importlib.import_module(_MODULES[name])
            except Exception as exc:  # a broken optional dependency must never crash the package
                _loaded[name] = exc
        return _loaded[name]


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def unavailable_reason(name: str, device="cpu") -> str | None:
    """None if backend ``name`` can run on ``device``, else why not (one line)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    module = _import(name)
    if isinstance(module, BaseException):
        return f"failed to load: {type(module).__name__}: {module}"
    try:
        module.check_device(_device_type(device))
    except Exception as exc:
        return str(exc)
    return None


def available(device="cpu") -> list[str]:
    """The backends that can run on ``device``, in ``BACKENDS`` order."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def _report_once(name: str, device_type: str, reason: str) -> None:
    key = (name, device_type)
    if key in _reported:
        return
    _reported.add(key)
    warnings.warn(
        f"neuroidx_fast: backend {name!r} is unavailable on {device_type} and was skipped: {reason}. "
        f"To enable it: {_FIXES.get(name, 'see README.md')}.",
        RuntimeWarning,
        stacklevel=3,
    )


def resolve_name(backend: str | None, device) -> str:
    """The backend a call with ``backend=`` on ``device`` uses (name only)."""
    device_type = _device_type(device)
    choice = backend or "auto"
    source = "backend="
    if choice == "auto" and os.environ.get(ENV_VAR, "").strip():
        choice = os.environ[ENV_VAR].strip().lower()
        source = f"environment variable {ENV_VAR}="
    if choice != "auto":
        if choice not in _MODULES:
            raise ValueError(f"unknown backend {choice!r} (from {source}); choose one of "
                             f"{', '.join(BACKENDS)} or 'auto'")
        reason = unavailable_reason(choice, device_type)
        if reason is not None:
            raise BackendUnavailable(
                f"backend {choice!r} (from {source}) cannot run on {device_type}: {reason}. "
                f"Use backend='auto' or one of {available(device_type)}; to enable it: "
                f"{_FIXES.get(choice, '')}")
        return choice
    for name in AUTO_ORDER.get(device_type, ("torch",)):
        reason = unavailable_reason(name, device_type)
        if reason is None:
            return name
        _report_once(name, device_type, reason)
    return "torch"


def get(backend: str | None, device) -> ModuleType:
    """The backend module (with ``spatial_reduce`` and ``topk_update``) for ``device``."""
    module = _import(resolve_name(backend, device))
    assert not isinstance(module, BaseException)
    return module


def cpu_kernels(x: torch.Tensor) -> ModuleType | None:
    """The cpp backend module when it serves x (a float32 CPU tensor) and the backend choice (the
    ``NEUROIDX_BACKEND`` variable, else auto) picks it, else None: for model-side kernels that have a
    torch form beside them (models.BandLocalResponseNorm)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() == 0:
        return None
    return get("cpp", x.device) if resolve_name("auto", x.device) == "cpp" else None
