"""gather_crops and accumulate_crops (SPEC section 3, the crops of a Neuron Feature).

The torch reference is checked against a brute-force oracle written here (one pixel at a time, in plain
Python and numpy), and every backend against the reference, bit for bit (the contract in
``neuroidx_fast.ops.reference`` makes both ops exact: gather is a copy, accumulate adds exact float64
products in j order). CPU backends (the Triton interpreter among them) run tiny "weird" shapes; GPU
backends (marker ``gpu``) run the same shapes and a realistic layer, from float32 pixels and from uint8
pixel codes. Without a GPU, the CUDA kernels of csrc/cuda/crops.cu (the float32 ones and the `_u8` ones
that read codes) are also built for the host behind a small shim and run, block by block, on the
launches the cuda launcher plans; their nvcc compile checks live with the other kernels' in
tests/test_cuda_backend.py (KERNEL_FILES).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from neuroidx_fast import backends, ops
from neuroidx_fast.ops import reference
from tests.conftest import cpu_backends
from tests.test_cuda_backend import _launcher_without_cupy

GPU_BACKENDS = ("cuda", "triton")


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 100_000


# Each case: n images of ch x h x w, crops of `size`, u units x j crops each; corners drawn in
# `corner_range` (half-open) for y and x, plus the listed `extra_corners` spliced in.
CASES = {
    "basic": dict(n=3, ch=3, h=9, w=9, size=(5, 5), u=4, j=5, corner_range=(-3, 8)),
    "rectangular": dict(n=2, ch=3, h=6, w=11, size=(4, 7), u=3, j=4, corner_range=(-5, 10)),
    "larger_than_image": dict(n=2, ch=3, h=5, w=6, size=(13, 15), u=3, j=3, corner_range=(-14, 6)),
    "far_outside": dict(n=2, ch=3, h=7, w=8, size=(3, 4), u=3, j=6, corner_range=(-4, 8),
                        extra_corners=[(-1000, 3), (2, 900), (-(2**40), -(2**40)), (2**40, -5), (7, 8), (-3, -4)]),
    "one_channel": dict(n=3, ch=1, h=8, w=5, size=(6, 3), u=4, j=4, corner_range=(-6, 6)),
    "one_image_many_crops": dict(n=1, ch=3, h=6, w=7, size=(3, 5), u=2, j=9, corner_range=(-3, 7)),
    "single_crop": dict(n=2, ch=3, h=10, w=6, size=(7, 3), u=5, j=1, corner_range=(-4, 9)),
    "pixel_images": dict(n=2, ch=3, h=1, w=1, size=(3, 2), u=2, j=3, corner_range=(-3, 2)),
    "odd_sizes": dict(n=4, ch=3, h=13, w=5, size=(9, 11), u=3, j=5, corner_range=(-10, 12)),
}
PADS = ("constant", "edge")


def _pad_value(kind: str, ch: int):
    # Distinct per-channel values, one of them negative, so a wrong channel shows.
    return None if kind == "edge" else torch.tensor([0.25, -1.5, 3.0625])[:ch].contiguous()


def _inputs(name: str, device="cpu"):
    """images [n, ch, h, w], slots [u, j], tops [u, j, 2], weights [u, j], sums [u, ch, rh, rw] (float64)."""
    c = CASES[name]
    g = torch.Generator().manual_seed(_seed(name))
    n, ch, h, w, (rh, rw), u, j = c["n"], c["ch"], c["h"], c["w"], c["size"], c["u"], c["j"]
    images = torch.rand(n, ch, h, w, generator=g)
    images[0, 0, 0, 0] = 0.0  # an exact zero pixel
    slots = torch.randint(0, n, (u, j), generator=g)
    slots[torch.rand(u, j, generator=g) < 0.25] = -1  # empty slots
    if u >= 3:
        slots[1] = -1  # a unit with no crop at all
    lo, hi = c["corner_range"]
    tops = torch.randint(lo, hi, (u, j, 2), generator=g)
    extra = torch.tensor(c.get("extra_corners", []), dtype=torch.int64).reshape(-1, 2)
    tops.view(-1, 2)[:len(extra)] = extra
    weights = torch.randn(u, j, generator=g)  # negative weights among them
    weights[torch.rand(u, j, generator=g) < 0.2] = 0.0
    # Sums with some size, so that every addition rounds and the j order matters.
    sums = torch.randn(u, ch, rh, rw, generator=g, dtype=torch.float64) * 100
    sums[-1] = 0.0
    return tuple(t.to(device) for t in (images, slots, tops, weights, sums))


# --- the brute-force oracle ----------------------------------------------------------------------

def _oracle_crop(image: np.ndarray, y0: int, x0: int, rh: int, rw: int, pad) -> np.ndarray:
    """One [Ch, rh, rw] crop, pixel by pixel."""
    ch, h, w = image.shape
    out = np.empty((ch, rh, rw), dtype=np.float32)
    for c in range(ch):
        for i in range(rh):
            for k in range(rw):
                y, x = y0 + i, x0 + k
                if 0 <= y < h and 0 <= x < w:
                    out[c, i, k] = image[c, y, x]
                elif pad is None:  # edge: the nearest image pixel
                    out[c, i, k] = image[c, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]
                else:
                    out[c, i, k] = pad[c]
    return out


def _oracle_gather(images, slots, tops, size, pad):
    imgs = images.cpu().numpy()
    pad_np = None if pad is None else pad.cpu().numpy()
    rh, rw = size
    crops = []
    for slot, (y0, x0) in zip(slots.tolist(), tops.tolist()):
        if slot < 0:
            crops.append(np.zeros((imgs.shape[1], rh, rw), dtype=np.float32))
        else:
            crops.append(_oracle_crop(imgs[slot], y0, x0, rh, rw, pad_np))
    return torch.from_numpy(np.stack(crops))


def _oracle_accumulate(sums, images, slots, tops, weights, pad):
    out = sums.cpu().numpy().copy()
    imgs = images.cpu().numpy()
    pad_np = None if pad is None else pad.cpu().numpy()
    rh, rw = out.shape[2:]
    for u in range(out.shape[0]):
        for j in range(slots.shape[1]):
            slot = int(slots[u, j])
            if slot >= 0:
                crop = _oracle_crop(imgs[slot], int(tops[u, j, 0]), int(tops[u, j, 1]), rh, rw, pad_np)
                out[u] = out[u] + np.float64(weights[u, j].item()) * crop.astype(np.float64)
    return torch.from_numpy(out)


def _assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    view = torch.int64 if want.dtype == torch.float64 else torch.int32
    got, want = got.cpu().contiguous(), want.cpu().contiguous()
    if not torch.equal(got.view(view), want.view(view)):
        bad = (got.view(view) != want.view(view)).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(f"{len(bad)} of {want.numel()} elements differ; first at {first}: got "
                             f"{got[first].item()!r}, want {want[first].item()!r}")


# --- the reference against the oracle --------------------------------------------------------------

@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_oracle(case, pad):
    images, slots, tops, weights, sums = _inputs(case)
    fill = _pad_value(pad, images.shape[1])
    size = tuple(sums.shape[2:])
    crops = reference.gather_crops(images, slots.reshape(-1), tops.reshape(-1, 2), size, fill)
    _assert_bits_equal(crops, _oracle_gather(images, slots.reshape(-1), tops.reshape(-1, 2), size, fill))
    want = _oracle_accumulate(sums, images, slots, tops, weights, fill)
    reference.accumulate_crops(sums, images, slots, tops, weights, fill)
    _assert_bits_equal(sums, want)


def test_the_j_order_changes_the_bits():
    # The equality tests below have teeth: adding the same crops in another order rounds differently.
    images, slots, tops, weights, sums = _inputs("one_image_many_crops")
    slots = torch.zeros_like(slots)  # every crop real
    forward, backward = sums.clone(), sums.clone()
    reference.accumulate_crops(forward, images, slots, tops, weights, None)
    reference.accumulate_crops(backward, images, slots.flip(1), tops.flip(1), weights.flip(1), None)
    assert torch.allclose(forward, backward, rtol=1e-12, atol=1e-9)
    assert not torch.equal(forward, backward)


def test_reference_pad_modes_by_hand():
    # A 2 x 2 image, a 3 x 4 crop starting one pixel up and left: the layout written out.
    image = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [1, 1, 2, 2]
    slots, tops = torch.tensor([0, -1]), torch.tensor([[-1, -1], [0, 0]])
    g = 9.0
    want_pad = torch.tensor([[g, g, g, g], [g, 1, 2, g], [g, 3, 4, g]])
    want_edge = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4]])
    for backend in cpu_backends():
        got = ops.gather_crops(image, slots, tops, (3, 4), pad=g, backend=backend)
        assert torch.equal(got[0, 0], want_pad) and torch.equal(got[1], torch.zeros(1, 3, 4)), backend
        got = ops.gather_crops(image, slots, tops, (3, 4), pad="edge", backend=backend)
        assert torch.equal(got[0, 0], want_edge), backend

def test_reference_empty_slots_add_nothing():
    # -0.0 + (-1 * 0.0) is -0.0, and an empty slot adds nothing: a reference that added its term (+1 *
    # 0.0 here) or +0.0 for an empty slot would turn the -0.0 sums into +0.0.
    image = torch.zeros(1, 3, 4, 4)
    for slots in (torch.tensor([[-1, -1], [0, -1]]), torch.tensor([[-1, 0], [0, 0]])):
        sums = torch.full((2, 3, 2, 2), -0.0, dtype=torch.float64)
        weights = torch.where(slots < 0, 1.0, -1.0)
        reference.accumulate_crops(sums, image, slots, torch.ones(2, 2, 2, dtype=torch.int64), weights,
                                   torch.zeros(3))
        assert torch.equal(sums.view(torch.int64), torch.full_like(sums, -0.0).view(torch.int64)), slots



# --- every CPU backend against the reference ---------------------------------------------------------

def _against_reference(module, images, reference_images, slots, tops, weights, sums, fill):
    """``module``'s gather and accumulation of ``images`` (on their device) against the reference's of
    ``reference_images`` on CPU, bit for bit."""
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    size = tuple(sums.shape[2:])
    flat_slots, flat_tops = slots.reshape(-1), tops.reshape(-1, 2)
    want = reference.gather_crops(reference_images.cpu(), flat_slots.cpu(), flat_tops.cpu(), size, cpu(fill))
    _assert_bits_equal(module.gather_crops(images, flat_slots, flat_tops, size, fill), want)
    want_sums = sums.cpu().clone()
    reference.accumulate_crops(want_sums, reference_images.cpu(), slots.cpu(), tops.cpu(), weights.cpu(), cpu(fill))
    module.accumulate_crops(sums, images, slots, tops, weights, fill)
    _assert_bits_equal(sums, want_sums)


def _check_backend(module, case, pad, device="cpu"):
    images, slots, tops, weights, sums = _inputs(case, device)
    fill = _pad_value(pad, images.shape[1])
    _against_reference(module, images, images, slots, tops, weights, sums, None if fill is None else fill.to(device))


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", cpu_backends())
def test_backend_matches_reference(backend, case, pad):
    _check_backend(backends.get(backend, "cpu"), case, pad)


@pytest.mark.parametrize("pad", ["edge", "gray"])
def test_corners_near_the_int64_limits(pad):
    # every backend clamps the corner first; the reference added the offsets and wrapped around
    images = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    tops = torch.tensor([[2 ** 63 - 2, 0], [0, 2 ** 63 - 2], [-(2 ** 63) + 1, -5], [3, -(2 ** 63) + 1]])
    slots = torch.tensor([0, 1, 0, 1])
    want = reference.gather_crops(images, slots, tops.clamp(-10, 10), (3, 4), None if pad == "edge" else
                                  torch.full((3,), 0.5))
    for backend in cpu_backends():
        assert torch.equal(ops.gather_crops(images, slots, tops, (3, 4), pad, backend=backend), want), backend


@pytest.mark.parametrize("backend", cpu_backends())
def test_public_ops_every_pad_spelling(backend):
    images, slots, tops, weights, sums = _inputs("basic")
    size = tuple(sums.shape[2:])
    for pad in ("gray", "zero", "edge", -0.75, [0.1, 0.2, 0.3], torch.tensor([0.5, 0.0, 1.0])):
        fill = ops.pad_value(pad, images.shape[1], "cpu")
        got = ops.gather_crops(images, slots, tops, size, pad=pad, backend=backend)
        want = reference.gather_crops(images, slots.reshape(-1), tops.reshape(-1, 2), size, fill)
        _assert_bits_equal(got, want.reshape(got.shape))
        got_sums, want_sums = sums.clone(), sums.clone()
        assert ops.accumulate_crops(got_sums, images, slots, tops, weights, pad=pad, backend=backend) is got_sums
        reference.accumulate_crops(want_sums, images, slots, tops, weights, fill)
        _assert_bits_equal(got_sums, want_sums)


@pytest.mark.parametrize("backend", cpu_backends())
def test_public_ops_take_any_layout(backend):
    # Sliced images, transposed corner pairs, non-contiguous slots and weights: the op copies as needed.
    images, slots, tops, weights, sums = _inputs("rectangular")
    wide = torch.rand(images.shape[0], images.shape[1] + 1, images.shape[2], images.shape[3] + 2)
    wide[:, :-1, :, 1:-1] = images
    view = wide[:, :-1, :, 1:-1]
    tops_t = tops.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    slots_t, weights_t = slots.t().contiguous().t(), weights.t().contiguous().t()
    got = ops.gather_crops(view, slots_t, tops_t, sums.shape[2:], pad="gray", backend=backend)
    want = ops.gather_crops(images, slots, tops, sums.shape[2:], pad="gray", backend="torch")
    assert got.shape == (slots.numel(), images.shape[1]) + tuple(sums.shape[2:])
    _assert_bits_equal(got, want)
    got_sums, want_sums = sums.clone(), sums.clone()
    ops.accumulate_crops(got_sums, view, slots_t, tops_t, weights_t, pad="edge", backend=backend)
    ops.accumulate_crops(want_sums, images, slots, tops, weights, pad="edge", backend="torch")
    _assert_bits_equal(got_sums, want_sums)


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="the cpp backend did not load")
def test_cpp_moderate_shape_and_thread_counts():
    # Larger than the weird cases (many row blocks per plane, several threads), and the same bits
    # whatever the thread count.
    from neuroidx_fast.ops import cpp

    g = torch.Generator().manual_seed(5)
    images = torch.rand(12, 3, 40, 52, generator=g)
    slots = torch.randint(-1, 12, (24, 30), generator=g)
    tops = torch.randint(-30, 45, (24, 30, 2), generator=g)
    weights = torch.randn(24, 30, generator=g)
    sums = torch.randn(24, 3, 37, 61, generator=g, dtype=torch.float64)
    for fill in (torch.tensor([0.5, 0.25, -2.0]), None):
        want = sums.clone()
        reference.accumulate_crops(want, images, slots, tops, weights, fill)
        want_crops = reference.gather_crops(images, slots.reshape(-1), tops.reshape(-1, 2), (37, 61), fill)
        threads = torch.get_num_threads()
        try:
            for n in sorted({1, 2, 3, threads}):
                torch.set_num_threads(n)
                got = sums.clone()
                cpp.accumulate_crops(got, images, slots, tops, weights, fill)
                _assert_bits_equal(got, want)
                _assert_bits_equal(cpp.gather_crops(images, slots.reshape(-1), tops.reshape(-1, 2), (37, 61), fill),
                                   want_crops)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_inputs(backend):
    images = torch.rand(2, 3, 5, 5)
    none = torch.empty(0, dtype=torch.int64)
    crops = ops.gather_crops(images, none, none.reshape(0, 2), (4, 3), backend=backend)
    assert crops.shape == (0, 3, 4, 3) and crops.dtype == torch.float32
    sums = torch.randn(3, 3, 4, 3, dtype=torch.float64)
    before = sums.clone()
    ops.accumulate_crops(sums, images, none.reshape(3, 0), none.reshape(3, 0, 2), torch.empty(3, 0), backend=backend)
    assert torch.equal(sums, before)
    # Only empty slots: nothing is added, and gather gives zeros even from images with no pixels.
    slots = torch.full((3, 2), -1)
    tops = torch.zeros(3, 2, 2, dtype=torch.int64)
    ops.accumulate_crops(sums, images, slots, tops, torch.ones(3, 2), backend=backend)
    assert torch.equal(sums, before)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (0, 3, 5, 5)], ids=["no-pixels", "no-images"])
def test_only_empty_slots_need_no_pixels(backend, shape):
    # The public ops accept images without pixels (or no images) as long as every slot is empty.
    slots = torch.full((3, 2), -1)
    tops = torch.zeros(3, 2, 2, dtype=torch.int64)
    flat = ops.gather_crops(torch.rand(shape), slots.reshape(-1), tops.reshape(-1, 2), 2, backend=backend)
    assert torch.equal(flat, torch.zeros(6, 3, 2, 2))
    sums = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    before = sums.clone()
    ops.accumulate_crops(sums, torch.rand(shape), slots, tops, torch.ones(3, 2), backend=backend)
    assert torch.equal(sums, before)


# --- uint8 pixel codes ----------------------------------------------------------------------------------
# Code k stands for the float32 k / 255 (reference.py): every backend must give, from the codes, the bits
# it gives from the float32 image they stand for.

def _codes_and_pixels(images: torch.Tensor):
    codes = (images * 255).round().to(torch.uint8)
    return codes, codes.float() / 255  # what to_tensor makes of an 8-bit file (on CPU)


def test_pixel_code_values_are_torch_division():
    k = torch.arange(256)
    want = (k.to(torch.uint8).float() / 255).view(torch.int32)  # to_tensor: img.float().div(255)
    assert torch.equal(reference.pixel_code_values().view(torch.int32), want)
    assert torch.equal(reference.decode_pixels(k.to(torch.uint8)).view(torch.int32), want)
    # The IEEE division float32(k) / float32(255), independently of torch.
    ieee = np.arange(256, dtype=np.float32) / np.float32(255)
    assert np.array_equal(ieee.view(np.int32), want.numpy())
    # decode_pixels at any length and alignment (vectorised bodies and tails alike)
    for n, offset in ((1, 0), (17, 3), (1000, 5), (4099, 11)):
        codes = (torch.arange(n + offset) * 37 % 256).to(torch.uint8)[offset:]
        got = reference.decode_pixels(codes).numpy().view(np.int32)
        assert np.array_equal(got, ieee[codes.numpy()].view(np.int32)), (n, offset)
    if "cpp" in cpu_backends():  # what the C++ kernels decode each code to
        from neuroidx_fast.ops import cpp

        assert torch.equal(cpp.pixel_code_values().view(torch.int32), want)


@pytest.mark.parametrize("backend", cpu_backends())
def test_as_pixel_codes(backend):
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 256, (4, 3, 20, 33), dtype=torch.uint8, generator=g)
    codes.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every code
    images = codes.float() / 255
    assert torch.equal(ops.as_pixel_codes(images, backend), codes)
    view = images[:, :, 2:-3, 1:]  # any layout
    assert torch.equal(ops.as_pixel_codes(view, backend), codes[:, :, 2:-3, 1:])
    assert ops.as_pixel_codes(codes, backend) is codes
    assert ops.as_pixel_codes(images.double(), backend) is None
    assert ops.as_pixel_codes(torch.rand(2, 3, 5, 5, generator=g), backend) is None
    assert ops.as_pixel_codes(images[:0], backend).shape == (0, 3, 20, 33)
    pixel = images.view(-1)[77]  # code 77
    up, down = (float(torch.nextafter(pixel, torch.tensor(t))) for t in (2.0, -2.0))  # one ulp off
    for bad in (up, down, -0.0, float("nan"), float("inf"), -1 / 255, 1.5,
                0.5, 256 / 255):
        perturbed = images.clone()
        perturbed[3, 2, 19, 32] = bad  # the last pixel
        assert ops.as_pixel_codes(perturbed, backend) is None, bad
        perturbed = images.clone()
        perturbed.view(-1)[77] = bad
        assert ops.as_pixel_codes(perturbed, backend) is None, bad


def _check_codes(module, case, pad, device="cpu"):
    """``module``'s crops of the codes of case's images against the reference's of the float32 pixels they
    stand for (both made on CPU, where the division is the codes' definition, then moved to ``device``)."""
    images, slots, tops, weights, sums = _inputs(case)
    codes, pixels = _codes_and_pixels(images)
    fill = _pad_value(pad, images.shape[1])
    codes, slots, tops, weights, sums = (t.to(device) for t in (codes, slots, tops, weights, sums))
    _against_reference(module, codes, pixels, slots, tops, weights, sums, None if fill is None else fill.to(device))


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", cpu_backends())
def test_codes_match_float_pixels(backend, case, pad):
    _check_codes(backends.get(backend, "cpu"), case, pad)


def _every_code_inputs(device="cpu"):
    """codes [1, 2, 8, 32] holding every code in each channel (reversed in the second), the float32 pixels
    they stand for (made on CPU), and whole-image crops (8 x 32) of them at the image and across and
    beyond each border and corner, one slot empty: slots [1, 8], tops [1, 8, 2], weights [1, 8], sums."""
    codes = torch.stack([torch.arange(256), torch.arange(255, -1, -1)]).to(torch.uint8).view(1, 2, 8, 32)
    pixels = codes.float() / 255
    slots = torch.tensor([[0, 0, -1, 0, 0, 0, 0, 0]])
    tops = torch.tensor([[[0, 0], [-3, -5], [1, 1], [4, 20], [-9, 0], [2, -40], [7, 31], [-7, -31]]])
    weights = torch.tensor([[0.75, -2.0, 5.0, 1e-30, 3.0, -0.0, 1.5, -0.375]])
    sums = torch.randn(1, 2, 8, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 100
    return codes.to(device), pixels, slots.to(device), tops.to(device), weights.to(device), sums.to(device)


def _check_every_code(module, pad, device="cpu"):
    codes, pixels, slots, tops, weights, sums = _every_code_inputs(device)
    fill = _pad_value(pad, 2)
    want = reference.gather_crops(pixels, slots.reshape(-1).cpu(), tops.reshape(-1, 2).cpu(), (8, 32), fill)
    fill = None if fill is None else fill.to(device)
    _assert_bits_equal(module.gather_crops(codes, slots.reshape(-1), tops.reshape(-1, 2), (8, 32), fill), want)
    want_sums = sums.cpu().clone()
    reference.accumulate_crops(want_sums, pixels, slots.cpu(), tops.cpu(), weights.cpu(),
                               None if fill is None else fill.cpu())
    module.accumulate_crops(sums, codes, slots, tops, weights, fill)
    _assert_bits_equal(sums, want_sums)


def _refuse_decoding(monkeypatch):
    """Makes decoding uint8 images as a whole fail: the kernels under test must decode the pixels they read."""
    decode = reference.decode_pixels

    def only_float_images(images):
        assert images.dtype != torch.uint8, "the whole uint8 image was decoded before the kernels ran"
        return decode(images)

    monkeypatch.setattr(reference, "decode_pixels", only_float_images)


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("kernels", ["triton", "cuda_on_the_host"])
def test_gpu_kernels_decode_every_code_across_every_border(kernels, pad, request, monkeypatch):
    # The Triton kernels (interpreted) and crops.cu's `_u8` kernels (built for the host) read the codes
    # themselves, through the table: every code in each channel, crops at and beyond each border and
    # corner, give the reference's bits on the float32 pixels, gather and accumulate.
    if kernels == "triton":
        if "triton" not in cpu_backends():
            pytest.skip("the triton backend does not run on CPU here")
        module = backends.get("triton", "cpu")
    else:
        module = request.getfixturevalue("host_crops_cu")
    _refuse_decoding(monkeypatch)
    _check_every_code(module, pad)


@pytest.mark.parametrize("backend", cpu_backends())
def test_public_ops_take_pixel_codes(backend):
    images, slots, tops, weights, sums = _inputs("rectangular")
    codes, pixels = _codes_and_pixels(images)
    size = tuple(sums.shape[2:])
    for pad in ("gray", "edge"):
        got = ops.gather_crops(codes[:, :, :, 1:], slots, tops, size, pad=pad, backend=backend)
        assert got.dtype == torch.float32
        _assert_bits_equal(got, ops.gather_crops(pixels[:, :, :, 1:], slots, tops, size, pad=pad, backend="torch"))
        got_sums, want_sums = sums.clone(), sums.clone()
        ops.accumulate_crops(got_sums, codes, slots, tops, weights, pad=pad, backend=backend)
        ops.accumulate_crops(want_sums, pixels, slots, tops, weights, pad=pad, backend="torch")
        _assert_bits_equal(got_sums, want_sums)
    none = torch.empty(0, dtype=torch.int64)
    assert ops.gather_crops(codes, none, none.reshape(0, 2), 3, backend=backend).dtype == torch.float32


@pytest.fixture(params=["avx512", "portable"])
def code_loops(request):
    """Runs a test with each of the cpp kernels' accumulation loops for pixel codes: the AVX-512 ones
    (csrc/cpu/crop_runs_avx512.h, where the CPU has AVX-512 VBMI) and the portable ones."""
    if "cpp" not in cpu_backends():
        pytest.skip("the cpp backend did not load")
    from neuroidx_fast import _C

    want = request.param == "avx512"
    before = _C.crop_kernels_avx512()
    try:
        if _C.set_crop_kernels_avx512(want) != want:
            pytest.skip("this CPU has no AVX-512 VBMI: only the portable loops run here")
        yield request.param
    finally:
        _C.set_crop_kernels_avx512(before)


# The cases whose crops read each pixel often enough for the codes to pay, with each kind of code loops:
# they read each pixel 1.03, 1.07, 16.3, 4.6 and 3.4 times.
READ_AS_CODES = {"avx512": {"larger_than_image", "one_image_many_crops", "odd_sizes"},
                 "portable": {"larger_than_image"}}


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="the cpp backend did not load")
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8-bit", "any-float"])
@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("case", ["basic", "far_outside", "larger_than_image", "one_image_many_crops", "odd_sizes"])
def test_cpp_reads_8_bit_float_pixels_as_codes(case, pad, eight_bit, code_loops, monkeypatch):
    """The cpp accumulation finds the codes of float32 images itself where the crops read enough pixels
    (fewer reads with the AVX-512 loops), channel by channel, reads them for the channels whose pixels are
    all codes, and gives the bits of the float32 pixels either way."""
    from neuroidx_fast.ops import cpp, crop_operands
    from neuroidx_fast.ops.crop_operands import codes_pay_off

    assert cpp.code_loops() == code_loops
    images, slots, tops, weights, sums = _inputs(case)
    assert not codes_pay_off(images, slots, tuple(sums.shape[2:]), code_loops)  # tiny images: never
    monkeypatch.setitem(crop_operands.CODES_MIN_IMAGE_BYTES, code_loops, 0)
    pixels = _codes_and_pixels(images)[1] if eight_bit else images
    fill = _pad_value(pad, images.shape[1])
    via_codes = []  # the channels each call read through codes
    real_via_codes = cpp._C.accumulate_crops_via_codes
    monkeypatch.setattr(cpp._C, "accumulate_crops_via_codes",
                        lambda *args: via_codes.append(real_via_codes(*args)) or via_codes[-1])
    float_kernel = []  # the plain kernel's last argument: whether it reads codes
    real_kernel = cpp._C.accumulate_crops
    monkeypatch.setattr(cpp._C, "accumulate_crops", lambda *args: float_kernel.append(args[-1]) or real_kernel(*args))
    want = sums.clone()
    reference.accumulate_crops(want, pixels, slots, tops, weights, fill)
    got = sums.clone()
    cpp.accumulate_crops(got, pixels, slots, tops, weights, fill)
    _assert_bits_equal(got, want)
    tried = int(codes_pay_off(pixels, slots, tuple(sums.shape[2:]), code_loops))
    assert tried == int(case in READ_AS_CODES[code_loops])
    channels = pixels.shape[1]
    assert via_codes == [channels if eight_bit else 0] * tried and float_kernel == [False] * (1 - tried)
    kept = sums.clone()
    cpp.accumulate_crops(kept, pixels, slots, tops, weights, fill, transcode=False)  # the float32 kernel
    _assert_bits_equal(kept, want)
    assert len(via_codes) == tried and float_kernel[-1] is False
    if tried and eight_bit:
        # Channel 1 of one image not 8-bit: channel 0 through codes, the others from float32, same bits.
        mixed = pixels.clone()
        mixed[-1, 1, 0, 0] = 0.3
        want = sums.clone()
        reference.accumulate_crops(want, mixed, slots, tops, weights, fill)
        got = sums.clone()
        cpp.accumulate_crops(got, mixed, slots, tops, weights, fill)
        _assert_bits_equal(got, want)
        assert via_codes[-1] == 1
    # Few crops for many pixels: not worth a pass over the images.
    few = torch.full_like(slots, -1)
    few[0, 0] = 0
    assert not codes_pay_off(pixels.repeat(40, 1, 1, 1), few, tuple(sums.shape[2:]), code_loops)
    calls = len(via_codes)
    cpp.accumulate_crops(sums.clone(), pixels.repeat(40, 1, 1, 1), few, tops, weights, fill)
    assert len(via_codes) == calls


def test_cpp_codes_every_code_decodes_exactly(code_loops):
    # Each code, added once with weight 1 to zero sums, gives float64 of torch's k / 255, in runs of every
    # length from 1 to 256 (the vector loops' full chunks and their masked tails), and beside the border
    # (a constant pad run before or after the codes).
    from neuroidx_fast.ops import cpp

    codes = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256)
    pixels = codes.float() / 255
    for width in list(range(1, 40)) + [100, 255, 256]:
        for x0 in sorted({0, 256 - width, -3, 256 - width + 5, 101}):
            tops = torch.tensor([[[0, x0]]])
            got = torch.zeros(1, 1, 1, width, dtype=torch.float64)
            cpp.accumulate_crops(got, codes, torch.zeros(1, 1, dtype=torch.int64), tops, torch.ones(1, 1),
                                 torch.tensor([0.5]))
            want = torch.zeros_like(got)
            reference.accumulate_crops(want, pixels, torch.zeros(1, 1, dtype=torch.int64), tops, torch.ones(1, 1),
                                       torch.tensor([0.5]))
            _assert_bits_equal(got, want)
    whole = torch.zeros(1, 1, 1, 256, dtype=torch.float64)
    cpp.accumulate_crops(whole, codes, torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1, 2, dtype=torch.int64),
                         torch.ones(1, 1), torch.tensor([0.5]))
    _assert_bits_equal(whole.view(256), (torch.arange(256, dtype=torch.uint8).float() / 255).double())


def test_cpp_pixel_codes_every_lane_and_tail(code_loops):
    # pixel_codes of every length 1..40 (the AVX-512 pass goes 16 pixels at a time, then a masked tail):
    # every code found, and one pixel that is not a code, at every position, turns the whole pass down.
    from neuroidx_fast.ops import cpp

    codes = torch.arange(256, dtype=torch.uint8).roll(7)
    pixels = codes.float() / 255
    assert torch.equal(cpp.pixel_codes(pixels), codes)
    for n in range(1, 41):
        assert torch.equal(cpp.pixel_codes(pixels[:n]), codes[:n]), n
        for position in range(n):
            for bad in (float(torch.nextafter(pixels[position], torch.tensor(2.0))), -0.0, float("nan"),
                        255.0, -1 / 255, 2 ** 32 / 255):
                perturbed = pixels[:n].clone()
                perturbed[position] = bad
                assert cpp.pixel_codes(perturbed) is None, (n, position, bad)


def test_cpp_pixel_codes_streamed_lines_at_every_alignment(code_loops):
    # The AVX-512 pass writes whole 64-byte lines of codes with streaming stores, ordinary stores before
    # the first line boundary and after the last: every length and alignment gets every code right, and
    # a pixel that is not a code is caught in each part.
    from neuroidx_fast import _C

    codes = torch.arange(256, dtype=torch.uint8).repeat(2)
    pixels = codes.float() / 255
    out = torch.zeros(512 + 64, dtype=torch.uint8)
    for n in (63, 64, 65, 127, 128, 129, 200, 333, 512):
        for offset in (0, 1, 15, 16, 33, 63):
            out.zero_()
            address = out.data_ptr() + (offset - out.data_ptr()) % 64  # codes start `offset` bytes past a line
            start = address - out.data_ptr()
            assert _C.pixel_codes(pixels.data_ptr(), n, address, 1)
            assert torch.equal(out[start:start + n], codes[:n]), (n, offset)
            assert not out[:start].any() and not out[start + n:].any(), (n, offset)
            for position in sorted({0, (64 - offset) % 64, n // 2, n - 1}):
                if position >= n:
                    continue
                bad = pixels.clone()
                bad[position] = float(torch.nextafter(pixels[position], torch.tensor(2.0)))
                assert not _C.pixel_codes(bad.data_ptr(), n, address, 1), (n, offset, position)


def test_cpp_codes_extreme_weights(code_loops):
    # The AVX-512 loop decodes codes to 2^-864 times their pixel and scales the weight by 2^864: exact
    # for every float32 weight, the largest, the smallest subnormal, -0.0 and negative ones included.
    from neuroidx_fast.ops import cpp

    codes = torch.arange(256, dtype=torch.uint8).view(1, 1, 8, 32)
    pixels = codes.float() / 255
    tiny = torch.finfo(torch.float32).tiny * 2.0 ** -23  # the smallest subnormal
    weights = torch.tensor([[torch.finfo(torch.float32).max, tiny, -0.0, -3.5, 1e-30, 7e37]])
    slots = torch.zeros(1, 6, dtype=torch.int64)
    tops = torch.tensor([[[0, 0], [0, -3], [1, 2], [-2, 0], [0, 5], [0, 0]]])
    for fill in (torch.tensor([0.5]), None):
        for j in range(1, 7):
            want = torch.zeros(1, 1, 8, 32, dtype=torch.float64)
            reference.accumulate_crops(want, pixels, slots[:, :j], tops[:, :j], weights[:, :j], fill)
            got = torch.zeros_like(want)
            cpp.accumulate_crops(got, codes, slots[:, :j], tops[:, :j], weights[:, :j], fill)
            _assert_bits_equal(got, want)


def test_cpp_codes_extreme_pad_values(code_loops):
    # The AVX-512 loop scales the pad value by 2^-864 like a decoded pixel: exact for every float32 pad
    # value too, -0.0, the smallest subnormal and the largest included.
    from neuroidx_fast.ops import cpp

    codes = torch.arange(256, dtype=torch.uint8).view(1, 1, 8, 32)
    pixels = codes.float() / 255
    slots = torch.zeros(1, 5, dtype=torch.int64)
    tops = torch.tensor([[[-3, -5], [4, 20], [-9, 0], [2, -40], [0, 0]]])  # across and beyond every border
    weights = torch.tensor([[0.75, -2.0, 1e-30, 3.0, -0.0]])
    tiny = torch.finfo(torch.float32).tiny * 2.0 ** -23
    for value in (-0.0, tiny, -tiny, torch.finfo(torch.float32).max, -7.5):
        fill = torch.tensor([value], dtype=torch.float32)
        want = torch.zeros(1, 1, 6, 19, dtype=torch.float64)
        reference.accumulate_crops(want, pixels, slots, tops, weights, fill)
        got = torch.zeros_like(want)
        cpp.accumulate_crops(got, codes, slots, tops, weights, fill)
        _assert_bits_equal(got, want)


def _guarded_buffer(nbytes: int, at_end: bool, mappings: list) -> int:
    """The address of nbytes of fresh memory that touch an unreadable page: right after one (at_end
    False) or right before one (True); the mapping goes to mappings, for munmap."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = libc.munmap.argtypes = None
    page = 4096
    pages = -(-nbytes // page)
    size = (pages + 2) * page
    base = libc.mmap(None, size, 3, 0x22, -1, 0)  # PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
    assert base not in (None, ctypes.c_void_p(-1).value)
    mappings.append((libc, base, size))
    for guard in (base, base + (pages + 1) * page):
        assert libc.mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(page), 0) == 0  # PROT_NONE
    return base + page + (pages * page - nbytes if at_end else 0)


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux mmap / mprotect")
def test_cpp_codes_read_and_write_nothing_outside_their_buffers(code_loops):
    # Codes and sums flush against unreadable pages, crops at every border, widths 1..40: a load or store
    # past a buffer (a vector wider than the row left) faults; the results are the reference's.
    from neuroidx_fast import _C

    g = torch.Generator().manual_seed(31)
    mappings = []
    try:
        for case in range(240):
            ch, h, w = 1 + case % 2, 1 + case % 4, 1 + (case * 7) % 40
            rh, rw, j = 1 + case % 3, 1 + (case * 11) % 40, 1 + case % 5
            at_end = bool(case % 2)
            address = _guarded_buffer(ch * h * w, at_end, mappings)
            codes = torch.frombuffer((ctypes.c_uint8 * (ch * h * w)).from_address(address), dtype=torch.uint8)
            codes = codes.view(1, ch, h, w)
            codes.copy_(torch.randint(0, 256, codes.shape, generator=g, dtype=torch.uint8))
            address = _guarded_buffer(ch * rh * rw * 8, case % 4 < 2, mappings)
            sums = torch.frombuffer((ctypes.c_double * (ch * rh * rw)).from_address(address), dtype=torch.float64)
            sums = sums.view(1, ch, rh, rw)
            sums.copy_(torch.randn(sums.shape, generator=g, dtype=torch.float64))
            slots = torch.randint(-1, 1, (1, j), generator=g)
            tops = torch.stack([torch.randint(-rh - 1, h + 2, (1, j), generator=g),
                                torch.randint(-rw - 1, w + 2, (1, j), generator=g)], dim=2)
            weights = torch.randn(1, j, generator=g)
            fill = None if case % 3 == 0 else torch.rand(ch, generator=g)
            want = sums.clone()
            reference.accumulate_crops(want, codes.float() / 255, slots, tops, weights, fill)
            _C.accumulate_crops(sums.data_ptr(), 1, ch, rh, rw, codes.data_ptr(), 1, h, w, slots.data_ptr(),
                                tops.data_ptr(), weights.data_ptr(), j, 0 if fill is None else fill.data_ptr(), 1,
                                True)
            _assert_bits_equal(sums, want)
    finally:
        for libc, base, size in mappings:
            libc.munmap(ctypes.c_void_p(base), ctypes.c_size_t(size))


def test_cpp_codes_keep_negative_zero_sums(code_loops):
    # -0.0 + (-1 * 0.0) is -0.0: a loop that also added +0.0 for a missing second crop would give +0.0.
    from neuroidx_fast.ops import cpp

    codes = torch.zeros(2, 3, 6, 40, dtype=torch.uint8)
    for j in (1, 2, 3):
        sums = torch.full((2, 3, 4, 37), -0.0, dtype=torch.float64)
        slots = torch.zeros(2, j, dtype=torch.int64)
        tops = torch.ones(2, j, 2, dtype=torch.int64)
        cpp.accumulate_crops(sums, codes, slots, tops, -torch.ones(2, j), None)
        assert torch.equal(sums.view(torch.int64), torch.full_like(sums, -0.0).view(torch.int64)), j


def test_cpp_codes_every_row_width(code_loops):
    # Crop widths 1..40 at corners in and beside the image, odd and even numbers of crops per unit (the
    # loops take crops two at a time), both pad modes: bit for bit the reference on the float32 pixels.
    from neuroidx_fast.ops import cpp

    g = torch.Generator().manual_seed(23)
    codes = torch.randint(0, 256, (4, 3, 9, 45), dtype=torch.uint8, generator=g)
    pixels = codes.float() / 255
    for width in range(1, 41):
        j = 3 if width % 2 else 4
        slots = torch.randint(-1, 4, (3, j), generator=g)
        tops = torch.stack([torch.randint(-4, 9, (3, j), generator=g),
                            torch.randint(-width - 2, 47, (3, j), generator=g)], dim=2)
        weights = torch.randn(3, j, generator=g)
        for fill in (torch.tensor([0.5, 0.25, -2.0]), None):
            sums = torch.randn(3, 3, 5, width, generator=g, dtype=torch.float64)
            want = sums.clone()
            reference.accumulate_crops(want, pixels, slots, tops, weights, fill)
            cpp.accumulate_crops(sums, codes, slots, tops, weights, fill)
            _assert_bits_equal(sums, want)


def test_cpp_codes_wide_rows_and_thread_counts(code_loops):
    # Rows long enough for the vector loops (with a tail), every code in the crops, several threads: the
    # cpp kernels' code path against their float32 path and the reference.
    from neuroidx_fast.ops import cpp

    g = torch.Generator().manual_seed(17)
    codes = torch.randint(0, 256, (5, 3, 31, 150), dtype=torch.uint8, generator=g)
    codes[:, :, 3, 3:109] = torch.arange(106, dtype=torch.uint8)  # every code, in rows 3 and 4
    codes[:, :, 4] = torch.arange(106, 256, dtype=torch.uint8)
    pixels = codes.float() / 255
    slots = torch.randint(-1, 5, (7, 12), generator=g)
    tops = torch.stack([torch.randint(-10, 25, (7, 12), generator=g), torch.randint(-40, 30, (7, 12), generator=g)],
                       dim=2)
    weights = torch.randn(7, 12, generator=g)
    sums = torch.randn(7, 3, 22, 141, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        for fill in (torch.tensor([0.5, 0.25, -2.0]), None):
            want = sums.clone()
            reference.accumulate_crops(want, pixels, slots, tops, weights, fill)
            want_crops = reference.gather_crops(pixels, slots.reshape(-1), tops.reshape(-1, 2), (22, 141), fill)
            for n in sorted({1, 2, threads}):
                torch.set_num_threads(n)
                for images in (codes, pixels):
                    got = sums.clone()
                    cpp.accumulate_crops(got, images, slots, tops, weights, fill)
                    _assert_bits_equal(got, want)
                    _assert_bits_equal(cpp.gather_crops(images, slots.reshape(-1), tops.reshape(-1, 2), (22, 141),
                                                        fill), want_crops)
    finally:
        torch.set_num_threads(threads)


# --- the CUDA kernels' logic, run on the host ----------------------------------------------------------
# Without a GPU, csrc/cuda/crops.cu (as the launcher assembles it for NVRTC) is built with the host C++
# compiler behind a thin shim (block / thread indices as globals, __ldg as a plain load) and every
# block and thread of the launch the launcher plans is run in turn. The kernels use no shared memory
# and no warp operations, so this checks their indexing, padding and accumulation order exactly.

_HOST_SHIM = r"""
#include <cstring>
struct NxDim3 { unsigned x, y, z; };
static NxDim3 blockIdx, threadIdx;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
template <class T> static inline T __ldg(const T* p) { return *p; }
static inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
static inline unsigned __float_as_uint(float v) { unsigned u; std::memcpy(&u, &v, 4); return u; }
"""

_HOST_GRID = r"""
#define NX_HOST_GRID(call) \
  for (unsigned bx = 0; bx < gx; ++bx) for (unsigned by = 0; by < gy; ++by) \
    for (unsigned t = 0; t < NX_CROP_THREADS; ++t) { blockIdx = {bx, by, 0}; threadIdx = {t, 0, 0}; call; }
#define NX_HOST_GATHER(name) extern "C" void host_##name(unsigned gx, unsigned gy, const float* images, \
    const long long* slots, const long long* tops, const float* pad, float* out, int Ch, int H, int W, int rh, \
    int rw) { NX_HOST_GRID(name(images, slots, tops, pad, out, Ch, H, W, rh, rw)) }
#define NX_HOST_ACCUMULATE(name) extern "C" void host_##name(unsigned gx, unsigned gy, double* sums, \
    const float* images, const long long* slots, const long long* tops, const float* weights, const float* pad, \
    int J, int Ch, int H, int W, int rh, int rw) { \
    NX_HOST_GRID(name(sums, images, slots, tops, weights, pad, J, Ch, H, W, rh, rw)) }
NX_HOST_GATHER(nx_gather_crops_pad)
NX_HOST_GATHER(nx_gather_crops_edge)
NX_HOST_ACCUMULATE(nx_accumulate_crops_pad)
NX_HOST_ACCUMULATE(nx_accumulate_crops_edge)
#define NX_HOST_GATHER_U8(name) extern "C" void host_##name(unsigned gx, unsigned gy, const unsigned char* images, \
    const long long* slots, const long long* tops, const float* pad, const float* codes, float* out, int Ch, int H, \
    int W, int rh, int rw) { NX_HOST_GRID(name(images, slots, tops, pad, codes, out, Ch, H, W, rh, rw)) }
#define NX_HOST_ACCUMULATE_U8(name) extern "C" void host_##name(unsigned gx, unsigned gy, double* sums, \
    const unsigned char* images, const long long* slots, const long long* tops, const float* weights, \
    const float* pad, const float* codes, int J, int Ch, int H, int W, int rh, int rw) { \
    NX_HOST_GRID(name(sums, images, slots, tops, weights, pad, codes, J, Ch, H, W, rh, rw)) }
NX_HOST_GATHER_U8(nx_gather_crops_pad_u8)
NX_HOST_GATHER_U8(nx_gather_crops_edge_u8)
NX_HOST_ACCUMULATE_U8(nx_accumulate_crops_pad_u8)
NX_HOST_ACCUMULATE_U8(nx_accumulate_crops_edge_u8)
"""


class _HostCrops:
    """The cuda backend's two crop ops on CPU tensors, through the host build of crops.cu: the launcher's
    operand checks and launch plans, each planned launch run block by block (``run``). Crops start as
    NaN, so that a pixel no thread writes shows."""

    def __init__(self, launcher, run):
        self.launcher, self.run = launcher, run

    def gather_crops(self, images, slots, tops, size, pad_value):
        images, slots, tops, pad = self.launcher._crop_operands(images, slots, tops, pad_value, size, "gather_crops")
        crops = torch.full((slots.shape[0], images.shape[1]) + tuple(size), float("nan"))
        self.run(self.launcher.gather_launch(images, slots, tops, pad, crops))
        return crops

    def accumulate_crops(self, sums, images, slots, tops, weights, pad_value):
        images, slots, tops, pad = self.launcher._crop_operands(images, slots, tops, pad_value, tuple(sums.shape[2:]),
                                                                "accumulate_crops")
        self.run(self.launcher.accumulate_launch(sums, images, slots, tops, weights.contiguous(), pad))


@pytest.fixture(scope="module")
def host_crops_cu(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler to build crops.cu for the host")
    with pytest.MonkeyPatch.context() as mp:
        launcher = _launcher_without_cupy(mp)
    tmp = tmp_path_factory.mktemp("host_crops")
    source = tmp / "crops_host.cpp"
    source.write_text(_HOST_SHIM + launcher.kernel_source("crops.cu") + _HOST_GRID)
    library = tmp / "crops_host.so"
    # (#pragma unroll is for nvcc.)
    cmd = [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas",
           "-o", str(library), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    lib = ctypes.CDLL(str(library))

    def run(plan):
        name, grid, args = plan
        assert set(launcher.KERNELS["crops.cu"]) >= {name}
        converted = [ctypes.c_void_p(int(a)) if isinstance(a, np.uint64) else ctypes.c_int(int(a)) for a in args]
        assert all(isinstance(a, (np.uint64, np.int32)) for a in args)
        getattr(lib, f"host_{name}")(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), *converted)

    return _HostCrops(launcher, run)


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("case", CASES)
def test_cuda_kernels_on_the_host(host_crops_cu, case, pad):
    _check_backend(host_crops_cu, case, pad)


@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("case", CASES)
def test_cuda_u8_kernels_on_the_host(host_crops_cu, case, pad, monkeypatch):
    _refuse_decoding(monkeypatch)
    _check_codes(host_crops_cu, case, pad)


def test_cuda_launcher_picks_the_u8_kernels_for_codes(host_crops_cu):
    # uint8 images go to the `_u8` kernels with the code table after the pad operand; float32 images to the
    # float32 kernels, with the arguments they always had.
    launcher = host_crops_cu.launcher
    images, slots, tops, weights, sums = _inputs("basic")
    codes = _codes_and_pixels(images)[0]
    table = launcher._ptr(reference.pixel_code_values("cpu"))
    for pixels, suffix in ((images, ""), (codes, "_u8")):
        for pad in (None, torch.zeros(3)):
            mode = "edge" if pad is None else "pad"
            crops = torch.empty((slots.numel(), 3, 5, 5))
            name, _, args = launcher.gather_launch(pixels, slots.reshape(-1), tops.reshape(-1, 2), pad, crops)
            assert name == f"nx_gather_crops_{mode}{suffix}" and (table in args[4:5]) == (suffix == "_u8")
            assert len(args) == 10 + (suffix == "_u8")
            name, _, args = launcher.accumulate_launch(sums, pixels, slots, tops, weights, pad)
            assert name == f"nx_accumulate_crops_{mode}{suffix}" and (table in args[6:7]) == (suffix == "_u8")
            assert len(args) == 12 + (suffix == "_u8")


def test_cuda_launcher_refuses_cpu_tensors_and_huge_crops(host_crops_cu):
    launcher = host_crops_cu.launcher
    images, slots, tops, weights, sums = _inputs("basic")
    with pytest.raises(ValueError, match="cuda backend got images on cpu"):
        launcher.gather_crops(images, slots.reshape(-1), tops.reshape(-1, 2), (3, 3), None)
    with pytest.raises(ValueError, match="cuda backend got images on cpu"):
        launcher.accumulate_crops(sums, images, slots, tops, weights, None)
    with pytest.raises(ValueError, match="too large for crops.cu"):
        launcher._crop_operands(images, slots, tops, None, (2**14, 2**13), "gather_crops")


# --- validation of the public ops -------------------------------------------------------------------

def _valid_args():
    images, slots, tops, weights, sums = _inputs("basic")
    return dict(images=images, slots=slots, tops=tops, weights=weights, sums=sums)


@pytest.mark.parametrize("change,error,match", [
    (dict(images=lambda a: a["images"].double()), ValueError, "float32"),
    (dict(images=lambda a: (a["images"] * 255).to(torch.int16)), ValueError, "uint8 pixel codes"),
    (dict(images=lambda a: a["images"][0]), ValueError, r"\[N, Ch, H, W\]"),
    (dict(slots=lambda a: a["slots"].int()), TypeError, "slots must be an int64"),
    (dict(tops=lambda a: a["tops"].float()), TypeError, "tops must be an int64"),
    (dict(slots=lambda a: a["slots"].clamp(min=0) + 1), IndexError, r"slots must be image rows in \[0, 3\)"),
    (dict(slots=lambda a: a["slots"] - 1), IndexError, "or -1"),
    (dict(tops=lambda a: a["tops"][..., :1]), ValueError, "tops must have shape"),
    (dict(tops=lambda a: a["tops"][:2]), ValueError, "tops must have shape"),
])
def test_validation_both_ops(change, error, match):
    args = _valid_args()
    for key, make in change.items():
        args[key] = make(args)
    with pytest.raises(error, match=match):
        ops.gather_crops(args["images"], args["slots"], args["tops"], 3)
    with pytest.raises(error, match=match):
        ops.accumulate_crops(args["sums"], args["images"], args["slots"], args["tops"], args["weights"])


@pytest.mark.parametrize("pad,error,match", [
    ("blue", ValueError, "unknown pad mode"),
    ([0.5, 0.5], ValueError, "pad has 2 values for 3-channel images"),
    (float("nan"), ValueError, "finite"),
    ([0.5, float("inf"), 0.5], ValueError, "finite"),
    (True, TypeError, "not True"),
    (None, TypeError, "not None"),
    (1e300, ValueError, r"finite float32 numbers, got \[1e\+300\]"),  # not the inf it would round to
])
def test_validation_bad_pad(pad, error, match):
    a = _valid_args()
    with pytest.raises(error, match=match):
        ops.gather_crops(a["images"], a["slots"], a["tops"], 3, pad=pad)
    with pytest.raises(error, match=match):
        ops.accumulate_crops(a["sums"], a["images"], a["slots"], a["tops"], a["weights"], pad=pad)


@pytest.mark.parametrize("size", [0, (3, 0), (-1, 4), (True, 3), (3.7, 2), (4,), "4", (2, 2, 2), None])
def test_validation_bad_size(size):
    a = _valid_args()
    with pytest.raises(ValueError, match="crop size must be a positive int or a pair"):
        ops.gather_crops(a["images"], a["slots"], a["tops"], size)


def test_sizes_of_numpy_and_tensor_ints():
    a = _valid_args()
    want = ops.gather_crops(a["images"], a["slots"], a["tops"], (4, 3))
    for size in ((np.int64(4), torch.tensor(3)), torch.Size([4, 3]), [4, 3]):
        assert torch.equal(ops.gather_crops(a["images"], a["slots"], a["tops"], size), want)
    assert torch.equal(ops.gather_crops(a["images"], a["slots"], a["tops"], np.int64(3)),
                       ops.gather_crops(a["images"], a["slots"], a["tops"], 3))


def test_validation_accumulate_only():
    a = _valid_args()

    def call(**changed):
        args = dict(sums=a["sums"], images=a["images"], slots=a["slots"], tops=a["tops"], weights=a["weights"])
        return ops.accumulate_crops(**{**args, **changed})

    with pytest.raises(ValueError, match="contiguous float64"):
        call(sums=a["sums"].float())
    with pytest.raises(ValueError, match=r"sums requires grad.*sums.detach\(\)"):
        call(sums=a["sums"].clone().requires_grad_())
    with pytest.raises(ValueError, match="contiguous float64"):
        call(sums=a["sums"].transpose(2, 3))
    with pytest.raises(ValueError, match=r"must be \[U, J\] with U = 3"):
        call(sums=a["sums"][:3])
    with pytest.raises(ValueError, match="must have 3 channels"):
        call(sums=a["sums"][:, :1].contiguous())
    with pytest.raises(ValueError, match="weights must be float32 of shape"):
        call(weights=a["weights"].double())
    with pytest.raises(ValueError, match="weights must be float32 of shape"):
        call(weights=a["weights"][:, :2])
    with pytest.raises(ValueError, match="cannot crop from empty images"):
        call(images=torch.rand(3, 3, 0, 5))


def test_unknown_backend_is_reported():
    a = _valid_args()
    with pytest.raises(ValueError, match="unknown backend"):
        ops.gather_crops(a["images"], a["slots"], a["tops"], 3, backend="fortran")


# --- GPU backends --------------------------------------------------------------------------------------

@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = backends.unavailable_reason(request.param, "cuda")
    if reason is not None:
        pytest.skip(f"backend {request.param} is unavailable on cuda: {reason}")
    return backends.get(request.param, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("case", CASES)
def test_gpu_backend_matches_reference(gpu_backend, case, pad):
    _check_backend(gpu_backend, case, pad, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("case", CASES)
def test_gpu_codes_match_float_pixels(gpu_backend, case, pad, monkeypatch):
    _refuse_decoding(monkeypatch)
    _check_codes(gpu_backend, case, pad, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("pad", PADS)
def test_gpu_kernels_decode_every_code_on_the_device(gpu_backend, pad, monkeypatch):
    _refuse_decoding(monkeypatch)
    _check_every_code(gpu_backend, pad, device="cuda")


def _layer(units: int, k: int, n_images: int, size: int, seed: int):
    """A realistic layer: corners on a conv layer's RF grid (stride 16, offset -42, so that boxes of
    about 100 pixels reach past the image), top images drawn among n_images, descending positive weights with a
    few empty slots."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    images = torch.rand(n_images, 3, size, size, generator=g, device="cuda")
    slots = torch.randint(0, n_images, (units, k), generator=g, device="cuda")
    slots[:, -3:] = -1
    grid = torch.randint(0, (size + 15) // 16, (units, k, 2), generator=g, device="cuda")
    tops = -42 + 16 * grid
    weights = torch.rand(units, k, generator=g, device="cuda").sort(dim=1, descending=True).values
    return images, slots, tops, weights


@pytest.mark.gpu
@pytest.mark.parametrize("pixels", ["float32", "uint8"])
@pytest.mark.parametrize("pad", PADS)
def test_gpu_realistic_layer(gpu_backend, pad, pixels):
    images, slots, tops, weights = _layer(512, 100, 256, 224, seed=_seed("layer", pad))
    if pixels == "uint8":  # the kernels read the codes; the reference the float32 pixels they stand for
        images = (images * 255).round_().to(torch.uint8)
    decoded = reference.decode_pixels(images)  # (on CUDA through the table: exact)
    fill = None if pad == "edge" else torch.full((3,), 0.5, device="cuda")
    want = torch.zeros(512, 3, 100, 100, dtype=torch.float64, device="cuda")
    reference.accumulate_crops(want, decoded, slots, tops, weights, fill)
    got = torch.zeros_like(want)
    gpu_backend.accumulate_crops(got, images, slots, tops, weights, fill)
    _assert_bits_equal(got, want)
    sub_slots, sub_tops = slots[:64].reshape(-1), tops[:64].reshape(-1, 2)
    _assert_bits_equal(gpu_backend.gather_crops(images, sub_slots, sub_tops, (100, 100), fill),
                       reference.gather_crops(decoded, sub_slots, sub_tops, (100, 100), fill))
    del images, decoded, want, got
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_rectangular_crops_and_current_stream(gpu_backend):
    images, slots, tops, weights = _layer(96, 37, 50, 67, seed=3)
    tops = tops + torch.tensor([5, -7], device="cuda")
    fill = torch.tensor([0.1, 0.2, 0.3], device="cuda")
    want = torch.randn(96, 3, 45, 29, dtype=torch.float64, device="cuda")
    got = want.clone()
    reference.accumulate_crops(want, images, slots, tops, weights, fill)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gpu_backend.accumulate_crops(got, images, slots, tops, weights, fill)
        crops = gpu_backend.gather_crops(images, slots.reshape(-1), tops.reshape(-1, 2), (45, 29), None)
    torch.cuda.current_stream().wait_stream(stream)
    _assert_bits_equal(got, want)
    _assert_bits_equal(crops, reference.gather_crops(images, slots.reshape(-1), tops.reshape(-1, 2), (45, 29), None))
