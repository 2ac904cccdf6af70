"""Big CPU buffers on 2 MiB pages (Linux transparent huge pages), for the ones the kernels fill and reread.

A fresh buffer costs a page fault, and a zeroed page, for every 4 KiB of it on first touch: 1.4 us each
on the 2-core VM of bench/bench_crops.py, which made 40 of the 60 ms that ``as_pixel_codes`` took on
512 images of 224 x 224 (77 MB of codes). Reads scattered over it (the crops of accumulate_crops) also
miss the TLB less on 2 MiB pages. The kernel backs a region with huge pages on first touch when the
region is marked with madvise(MADV_HUGEPAGE) and the system allows it (``enabled`` set to ``always`` or
``madvise`` in /sys/kernel/mm/transparent_hugepage): ``empty`` allocates 2 MiB more than asked, so
that the tensor can start on a 2 MiB boundary, and marks it before anything touches it. Elsewhere (other
systems, THP off, small buffers) it is a plain ``torch.empty``; the contents are never affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import platform

import torch

__all__ = ["empty"]

HUGE_PAGE_BYTES = 2 << 20  # x86-64 and arm64 with 4 KiB base pages
MIN_BYTES = 8 << 20  # below this the faults saved do not pay for the 2 MiB allocated on top
_MADV_HUGEPAGE = 14  # the same on x86-64 and arm64


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise, or None where huge pages are not offered this way."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        madvise = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, on huge pages where the system gives them (see above): then
    a view that starts on a 2 MiB boundary of a storage 2 MiB larger."""
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise()
    if madvise is None or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    base = torch.empty(nbytes + HUGE_PAGE_BYTES, dtype=torch.uint8)
    start = -base.data_ptr() % HUGE_PAGE_BYTES
    tensor = base[start:start + nbytes].view(dtype).view(shape)
    # Whole huge pages only: the tail, if any, stays on small pages.
    madvise(tensor.data_ptr(), nbytes - nbytes % HUGE_PAGE_BYTES, _MADV_HUGEPAGE)
    return tensor

