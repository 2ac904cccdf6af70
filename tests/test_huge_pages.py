import re

import pytest
import torch

from neuroidx_fast import backends, huge_pages, ops


def vma_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        smaps = f.read()
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*?^VmFlags:([^\n]*)", smaps, re.S | re.M):
        if int(m.group(1), 16) <= address < int(m.group(2), 16):
            return m.group(3).split()
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("shape,dtype", [((3, 1000, 1000), torch.float64), (((9 << 20) + 5,), torch.uint8)])
def test_big_buffers_start_on_a_huge_page_and_are_marked(shape, dtype):
    t = huge_pages.empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    t.fill_(3)
    assert bool((t == 3).all())
    if huge_pages._madvise() is None:  # not Linux, or THP off: a plain tensor
        assert t.storage_offset() == 0
        return
    assert t.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size() + huge_pages.HUGE_PAGE_BYTES
    assert "hg" in vma_flags(t.data_ptr())  # marked with MADV_HUGEPAGE (whether pages were free or not)


@pytest.mark.parametrize("shape", [(0,), (2, 0, 5), (100, 100)])
def test_small_buffers_are_plain_tensors(shape):
    t = huge_pages.empty(shape, torch.float32)
    assert t.shape == shape and t.storage_offset() == 0
    assert t.untyped_storage().nbytes() == t.numel() * 4


def test_pixel_codes_of_a_big_batch_are_exact_on_huge_pages():
    images = torch.randint(0, 256, (12, 3, 512, 512), dtype=torch.uint8)
    codes = ops.as_pixel_codes(images.float() / 255, backend="cpp")
    assert torch.equal(codes, images)
    if huge_pages._madvise() is not None:
        assert codes.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0


@pytest.mark.skipif("cpp" not in backends.available("cpu"), reason="the cpp backend did not load")
def test_big_gathers_land_on_huge_pages():
    images = torch.randint(0, 256, (4, 3, 300, 300), dtype=torch.uint8).float() / 255
    slots = torch.arange(40) % 4
    tops = torch.randint(-50, 150, (40, 2))
    crops = ops.gather_crops(images, slots, tops, 200, pad="gray", backend="cpp")  # 19 MB
    assert torch.equal(crops, ops.gather_crops(images, slots, tops, 200, pad="gray", backend="torch"))
    if huge_pages._madvise() is not None:
        assert crops.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0 and "hg" in vma_flags(crops.data_ptr())
