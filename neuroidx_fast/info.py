"""``neuroidx info``: versions, devices and which backends loaded (and why the others did not)."""

from __future__ import annotations

import importlib
import platform

import torch

from . import backends
from ._version import __version__


def _version_of(module_name: str) -> str:
    try:
        return getattr(importlib.import_module(module_name), "__version__", "installed")
    except Exception as exc:
        return f"not available ({type(exc).__name__})"


def info_text() -> str:
    lines = [
        f"neuroidx_fast {__version__}",
        f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__}, "
        f"numpy {_version_of('numpy')}, triton {_version_of('triton')}, cupy {_version_of('cupy')}",
        f"cpu: {torch.get_num_threads()} torch threads",
    ]
    device_types = ["cpu"]
    if torch.cuda.is_available():
        device_types.append("cuda")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                         f"capability {props.major}.{props.minor}")
    else:
        lines.append("cuda: no device")
    for device_type in device_types:
        lines.append(f"backends on {device_type} (auto picks: {backends.resolve_name('auto', device_type)}):")
        for name in backends.BACKENDS:
            reason = backends.unavailable_reason(name, device_type)
            lines.append(f"  {name:<7} {'loaded' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)
