"""The public ops on inputs a review found mishandled: tensors that require grad (the torch backend made
``sums`` a node of a graph, and a second batch into it then failed), sums that share memory with what is
read (a silent answer that differs between backends) and crop sizes past what any allocator counts."""

import pytest
import torch

from neuroidx_fast import ops
from tests.conftest import cpu_backends


def _crops(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g).requires_grad_(requires_grad)
    slots = torch.tensor([[0, 2], [1, -1]])
    tops = torch.tensor([[[-2, 1], [3, 3]], [[0, -4], [0, 0]]])
    weights = torch.tensor([[1.0, 0.5], [1.0, 0.25]]).requires_grad_(requires_grad)
    return images, slots, tops, weights


@pytest.mark.filterwarnings("ignore:overflow encountered in reduce:RuntimeWarning")  # (the Triton interpreter's numpy)
@pytest.mark.parametrize("backend", cpu_backends())
def test_inputs_that_require_grad_give_what_detached_ones_give(backend):
    images, slots, tops, weights = _crops(requires_grad=True)
    plain = [t.detach() for t in (images, weights)]
    expected = torch.zeros(2, 3, 5, 5, dtype=torch.float64)
    for _ in range(2):
        ops.accumulate_crops(expected, plain[0], slots, tops, plain[1], backend=backend)
    sums = torch.zeros_like(expected)
    for _ in range(2):  # (the second batch raised "sums requires grad" on the torch backend)
        ops.accumulate_crops(sums, images, slots, tops, weights, backend=backend)
    assert not sums.requires_grad and torch.equal(sums, expected)
    crops = ops.gather_crops(images, slots, tops, 5, backend=backend)
    assert not crops.requires_grad and torch.equal(crops, ops.gather_crops(plain[0], slots, tops, 5, backend=backend))
    maps = (torch.rand(2, 3, 4, 4) * 1e38).requires_grad_(True)  # (overflowing sums: the means summed again)
    reduced = ops.spatial_reduce(maps, backend=backend)
    assert not any(t.requires_grad for t in reduced)
    assert all(torch.equal(a, b) for a, b in zip(reduced, ops.spatial_reduce(maps.detach(), backend=backend)))


@pytest.mark.parametrize("backend", cpu_backends())
def test_sums_that_share_memory_with_what_is_read_are_refused(backend):
    _, slots, tops, weights = _crops()
    sums = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    images = sums.view(torch.float32).reshape(2, 3, 4, 8)  # (the same bytes)
    with pytest.raises(ValueError, match="sums shares memory with images"):
        ops.accumulate_crops(sums, images, slots.clamp(max=1), tops, weights, backend=backend)
    flat = torch.zeros(2 * 3 * 4 * 4 + 4, dtype=torch.float64)
    sums = flat[4:].view(2, 3, 4, 4)
    weights = flat[:4].view(torch.float32)[:4].view(2, 2)
    with pytest.raises(ValueError, match="sums shares memory with weights"):
        ops.accumulate_crops(sums, torch.rand(2, 3, 4, 4), slots.clamp(max=1), tops, weights, backend=backend)


@pytest.mark.parametrize("size", [2 ** 31, (2 ** 62, 2 ** 62), (4, 2 ** 21)])
def test_a_crop_size_past_any_allocation_is_named(size):
    images, slots, tops, weights = _crops()
    with pytest.raises(ValueError, match="is too large: at most 1048576 pixels a side"):
        ops.gather_crops(images, slots, tops, size)


@pytest.mark.parametrize("backend", cpu_backends())
def test_no_units_add_nothing(backend):
    # a first alias check took empty tensors (every one at address 0) for ones sharing memory
    sums = torch.zeros(0, 3, 4, 4, dtype=torch.float64)
    empty = torch.zeros(0, 2, dtype=torch.int64)
    out = ops.accumulate_crops(sums, torch.rand(2, 3, 8, 8), empty, torch.zeros(0, 2, 2, dtype=torch.int64),
                               torch.zeros(0, 2), backend=backend)
    assert out is sums and out.shape == (0, 3, 4, 4)
