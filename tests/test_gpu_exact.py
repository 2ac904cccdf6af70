"""Every GPU backend (triton, cuda) against the torch reference on the GPU, at full-size shapes."""

import pytest
import torch

import neuroidx_fast as nx
from neuroidx_fast.ops import reference
from conftest import gpu_backends

pytestmark = pytest.mark.gpu
BACKENDS = [b for b in gpu_backends() if b != "torch"] or ["triton", "cuda"]
SHAPES = [(256, 256, 56, 56), (256, 512, 28, 28), (256, 1024, 14, 14), (256, 2048, 7, 7)]


def _backend_or_skip(name):
    if name not in gpu_backends():
        pytest.skip(f"backend {name} unavailable on cuda: {nx.backends.unavailable_reason(name, 'cuda')}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_reduce_full_size(backend, shape, dtype, channels_last):
    _backend_or_skip(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).mul_(4).round_().to(dtype)  # ties inside maps
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = nx.spatial_reduce(x, backend=backend)
    expected = reference.spatial_reduce(x)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.allclose(got[2], expected[2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(256, 1024, 14, 14), (256, 2048, 7, 7)])
def test_topk_stream_full_size(backend, shape):
    _backend_or_skip(backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    fast = nx.TopK(shape[1], 100, device="cuda", backend=backend)
    ref = nx.TopK(shape[1], 100, device="cuda", backend="torch")
    for step in range(6):
        x = torch.randn(shape, device="cuda", generator=g).mul_(2).round_().to(torch.bfloat16)
        ids = torch.arange(step * shape[0], (step + 1) * shape[0], device="cuda")
        fast.observe(x, ids)
        ref.observe(x, ids)
        for a, b in zip(fast.result(), ref.result()):
            assert torch.equal(a, b)
