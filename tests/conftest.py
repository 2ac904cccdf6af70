"""Test setup. Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, before any test module imports the package."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from neuroidx_fast import backends  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny tensors (``pytestmark = pytest.mark.usefixtures(...)``): on a
    shared, loaded machine an OpenMP barrier per op costs more than the op (20x slower with 2 threads
    than with 1). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_backends():
    return backends.available("cpu")


def gpu_backends():
    return backends.available("cuda") if torch.cuda.is_available() else []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
