"""The ``cuda`` backend (csrc/cuda/*.cu launched by neuroidx_fast/ops/cuda.py through CuPy).

Without a GPU: the kernels are compile-checked with nvcc where the CUDA toolkit is installed (as they
are on disk, and as the launcher assembles them for NVRTC). On a GPU (marker ``gpu``, and CuPy
installed): both ops are compared with ``neuroidx_fast.ops.reference`` exactly (values bit for bit,
argmax, ids and positions equal; the mean within float32 tolerance).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch

from neuroidx_fast.ops import reference

REPO = Path(__file__).resolve().parents[1]
CUDA_SRC = REPO / "csrc" / "cuda"
KERNEL_FILES = ("spatial_reduce.cu", "topk_update.cu", "crops.cu")
NVCC = shutil.which("nvcc")

needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc is not on PATH: the CUDA kernels are compile-checked only where the CUDA toolkit is")


def _cupy_installed() -> bool:
    return importlib.util.find_spec("cupy") is not None


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 10_000


def _nvcc(tmp_path: Path, source: Path, arch: str, *extra: str) -> str:
    out = tmp_path / f"{source.stem}_{arch}.out"
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "-Werror", "all-warnings", *extra, "-o", str(out), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    return out.read_text(errors="replace") if "--ptx" in extra else ""


def _launcher_without_cupy(monkeypatch):
    """neuroidx_fast/ops/cuda.py loaded with a stand-in for cupy (it touches cupy only when it compiles
    or launches), under a private name, so that its source assembly can be checked on any machine."""
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    spec = importlib.util.spec_from_file_location("_neuroidx_cuda_probe", REPO / "neuroidx_fast" / "ops" / "cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- without a GPU ---------------------------------------------------------------------------------

@pytest.mark.parametrize("filename", KERNEL_FILES)
def test_sources_include_nothing_but_common(filename):
    # NVRTC has no host headers: the only include allowed is our own header, pasted by the launcher.
    includes = re.findall(r"^\s*#\s*include\s*(\S+)", (CUDA_SRC / filename).read_text(), re.MULTILINE)
    assert includes == ['"common.cuh"']
    assert not re.findall(r"^\s*#\s*include", (CUDA_SRC / "common.cuh").read_text(), re.MULTILINE)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("filename", KERNEL_FILES)
def test_kernels_compile_with_nvcc(tmp_path, filename, arch):
    # --cubin also runs ptxas: register spills or local memory would fail the check as well.
    _nvcc(tmp_path, CUDA_SRC / filename, arch, "--cubin", "-Xptxas", "-Werror,-warn-spills,-warn-lmem-usage")


@needs_nvcc
@pytest.mark.parametrize("filename", KERNEL_FILES)
def test_assembled_source_defines_every_launched_kernel(tmp_path, monkeypatch, filename):
    launcher = _launcher_without_cupy(monkeypatch)
    text = launcher.kernel_source(filename)
    assert not re.findall(r"^\s*#\s*include", text, re.MULTILINE)
    source = tmp_path / filename
    source.write_text(text)
    ptx = _nvcc(tmp_path, source, "sm_90", "--ptx")
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert set(launcher.KERNELS[filename]) <= entries


@needs_nvcc
def test_topk_update_opts_in_wherever_static_and_dynamic_shared_memory_pass_48_kib(tmp_path, monkeypatch):
    # Dynamic bytes just below 48 KiB were launched without the opt-in, though the kernel's own static
    # shared memory takes the block past 48 KiB: cudaErrorInvalidValue (e.g. K = 128, B = 2304).
    out = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "--cubin", "-Xptxas", "-v", "-o",
                          str(tmp_path / "topk.cubin"), str(CUDA_SRC / "topk_update.cu")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    static = max(int(n) for n in re.findall(r"(\d+) bytes smem", out.stderr))
    launcher = _launcher_without_cupy(monkeypatch)
    assert static <= launcher._STATIC_SHARED
    events = []
    monkeypatch.setattr(launcher, "_info", lambda device: (132, 227 * 1024))  # an H100
    monkeypatch.setattr(launcher, "_kernel", lambda *args: "kernel")
    monkeypatch.setattr(launcher, "_allow_shared", lambda kernel, name, device, nbytes: events.append("opt-in"))
    monkeypatch.setattr(launcher, "_launch", lambda *args, shared_mem: events.append(shared_mem))
    for k, batch in [(128, 2304), (100, 2337), (2047, 1), (1, 2456), (100, 2000)]:
        events.clear()
        state = (_OnCuda(2, k), _OnCuda(2, k, dtype=torch.int64), _OnCuda(2, k, dtype=torch.int64))
        launcher.topk_update(*state, _OnCuda(batch, 2), _OnCuda(batch, dtype=torch.int64),
                             _OnCuda(batch, 2, dtype=torch.int64))
        dynamic = launcher._topk_shared_bytes(k, batch)
        assert events[-1] == dynamic  # launched, not handed to the reference
        assert ("opt-in" in events) == (dynamic + static > 48 * 1024), (k, batch, dynamic, events)


class _OnCuda:
    """A stand-in for a contiguous CUDA tensor of this shape and dtype, enough for a launcher's checks."""

    device = torch.device("cuda", 0)

    def __init__(self, *shape, dtype=torch.float32):
        self.shape, self.dtype = torch.Size(shape), dtype

    def is_contiguous(self):
        return True

    def contiguous(self):
        return self

    def data_ptr(self):
        return 0


@pytest.mark.skipif(_cupy_installed(), reason="CuPy is installed here")
def test_import_without_cupy_is_a_clean_import_error():
    sys.modules.pop("neuroidx_fast.ops.cuda", None)
    with pytest.raises(ImportError, match="cupy"):
        importlib.import_module("neuroidx_fast.ops.cuda")


# --- on a GPU ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("cupy", reason="the cuda backend needs CuPy (pip install 'neuroidx-fast[cuda13]')")
    from neuroidx_fast.ops import cuda

    cuda.check_device("cuda")  # compiles both files; raises with the reason if it cannot
    return cuda


@pytest.mark.gpu
def test_check_device(cuda_backend):
    from neuroidx_fast import backends

    cuda_backend.check_device("cuda")
    with pytest.raises(RuntimeError):
        cuda_backend.check_device("cpu")
    assert backends.unavailable_reason("cuda", "cuda") is None


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _activations(shape, kind: str, gen: torch.Generator) -> torch.Tensor:
    """float32 test data of one kind, on the GPU."""
    dev = "cuda"
    x = torch.randn(shape, generator=gen, device=dev)
    u = torch.rand(shape, generator=gen, device=dev)
    if kind == "ties":  # a few levels: many equal maxima per map
        x = torch.randint(0, 3, shape, generator=gen, device=dev).float()
    elif kind == "inf":
        x = torch.where(u < 0.05, float("inf"), torch.where(u > 0.95, float("-inf"), x))
    elif kind == "nan":  # NaN in some maps (several per map at times), next to infinities
        x = torch.where(u < 0.02, float("nan"), torch.where(u > 0.97, float("inf"), x))
    elif kind == "neg_inf":  # whole maps of -inf, and maps mixing -inf with a few finite values
        x = torch.where(u < 0.9, float("-inf"), x)
        x[:, ::2] = float("-inf")
    elif kind == "signed_zeros":  # +0.0 and -0.0 compare equal: the lowest index still wins
        x = torch.where(u < 0.5, 0.0, -0.0) * torch.ones_like(x)
        x = torch.where(u > 0.9, -1.0, x)
    return x


def _layout(shape, layout: str, dtype, kind: str, seed: int) -> torch.Tensor:
    B, C, H, W = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "contiguous":
        return _activations((B, C, H, W), kind, gen).to(dtype)
    if layout == "channels_last":
        return _activations((B, C, H, W), kind, gen).to(dtype).contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # every other channel, cropped maps
        return _activations((B, 2 * C, H + 1, W + 2), kind, gen).to(dtype)[:, ::2, 1:, 1:-1]
    if layout == "sliced_channels_last":
        big = _activations((B, C + 3, H + 2, W + 1), kind, gen).to(dtype)
        return big.contiguous(memory_format=torch.channels_last)[:, 1:C + 1, 2:, :W]
    if layout == "transposed":  # the map's x axis is the slow one
        return _activations((B, C, W, H), kind, gen).to(dtype).transpose(2, 3)
    raise ValueError(layout)


def _assert_spatial_matches(x: torch.Tensor, got) -> None:
    vmax, argmax, vmean = got
    rmax, rargmax, _ = reference.spatial_reduce(x)
    B, C = x.shape[:2]
    assert vmax.shape == argmax.shape == vmean.shape == (B, C)
    assert vmax.dtype == vmean.dtype == torch.float32 and argmax.dtype == torch.int64
    assert torch.equal(argmax, rargmax)
    nan = torch.isnan(vmax)
    assert torch.equal(nan, torch.isnan(rmax))
    # The max is bit for bit the element at argmax cast to float32 (so -0.0 stays -0.0).
    picked = x.reshape(B, C, -1).gather(2, argmax.unsqueeze(2)).squeeze(2).float()
    assert torch.equal(torch.isnan(picked), nan)
    assert torch.equal(vmax[~nan].view(torch.int32), picked[~nan].view(torch.int32))
    assert torch.equal(vmax[~nan], rmax[~nan])
    expected_mean = x.double().mean(dim=(2, 3)).float()
    torch.testing.assert_close(vmean, expected_mean, rtol=1e-5, atol=1e-5, equal_nan=True)


SHAPES = [
    (3, 5, 7, 7),
    (2, 3, 14, 14),
    (4, 6, 1, 1),  # H = W = 1
    (2, 1, 5, 9),  # C = 1
    (1, 3, 1, 17),
    (33, 7, 3, 2),
    (2, 2, 61, 53),  # groups wider than a warp
    (1, 2, 300, 300),  # a block per map
]
LAYOUTS = ["contiguous", "channels_last", "sliced", "sliced_channels_last", "transposed"]
KINDS = ["normal", "ties", "inf", "nan", "neg_inf", "signed_zeros"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_spatial_reduce_matches_reference(cuda_backend, shape, dtype, layout, kind):
    x = _layout(shape, layout, dtype, kind, seed=_seed(shape, layout, kind))
    _assert_spatial_matches(x, cuda_backend.spatial_reduce(x))


@pytest.mark.gpu
def test_spatial_reduce_every_group_size(cuda_backend):
    # Map sizes around every power of two pick every group size (1 .. 256) of the NCHW kernels,
    # contiguous maps and strided ones (every other element).
    gen = torch.Generator(device="cuda").manual_seed(0)
    for hw in (1, 15, 16, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 1024, 4095, 4096, 8193):
        for kind in ("normal", "ties", "nan"):
            for x in (_activations((2, 3, 1, hw), kind, gen), _activations((2, 3, 1, 2 * hw), kind, gen)[..., ::2]):
                _assert_spatial_matches(x, cuda_backend.spatial_reduce(x))


@pytest.mark.gpu
def test_spatial_reduce_runs_on_the_current_stream(cuda_backend):
    x = torch.randn(64, 32, 14, 14, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = cuda_backend.spatial_reduce(x)
    torch.cuda.current_stream().wait_stream(stream)
    _assert_spatial_matches(x, got)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "shape,dtype",
    [((256, 256, 56, 56), torch.bfloat16), ((256, 256, 56, 56), torch.float32),
     ((256, 1024, 14, 14), torch.bfloat16), ((256, 1024, 14, 14), torch.float16)],
    ids=["256x256x56x56-bf16", "256x256x56x56-f32", "256x1024x14x14-bf16", "256x1024x14x14-f16"])
def test_spatial_reduce_full_size(cuda_backend, shape, dtype, layout):
    x = _layout(shape, layout, dtype, "normal", seed=1)
    _assert_spatial_matches(x, cuda_backend.spatial_reduce(x))
    del x
    torch.cuda.empty_cache()


# --- topk_update --------------------------------------------------------------------------------

def _empty_state(num_units: int, k: int):
    values = torch.full((num_units, k), float("-inf"), device="cuda")
    ids = torch.full((num_units, k), -1, dtype=torch.int64, device="cuda")
    return values, ids, ids.clone()


def _batches(num_units: int, batch: int, n_batches: int, kind: str, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    order = torch.randperm(batch * n_batches, generator=gen, device="cuda")  # ids not in batch order
    for t in range(n_batches):
        values = torch.randn(batch, num_units, generator=gen, device="cuda")
        if kind in ("ties", "repeat", "dup_ids"):
            values = torch.randint(0, 3, (batch, num_units), generator=gen, device="cuda").float()
        elif kind == "inf":
            u = torch.rand(batch, num_units, generator=gen, device="cuda")
            values = torch.where(u < 0.2, float("inf"), torch.where(u > 0.7, float("-inf"), values))
        ids = order[t * batch:(t + 1) * batch].clone()
        if kind == "dup_ids":  # the same image twice in one batch
            ids = torch.randint(0, max(2, batch // 2), (batch,), generator=gen, device="cuda")
        positions = torch.randint(0, 3136, (batch, num_units), generator=gen, device="cuda")
        yield values, ids, positions
        if kind == "repeat":  # the same batch fed again: exact (value, id) ties, the old entry stays first
            yield values.clone(), ids.clone(), positions.clone()


def _assert_states_equal(got, want) -> None:
    assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])


TOPK_CASES = [  # (C, K, B, batches)
    (7, 5, 4, 6),
    (3, 50, 8, 2),  # K > images seen: empty slots remain
    (1, 3, 16, 4),  # C = 1
    (5, 1, 9, 4),  # K = 1
    (4, 6, 1, 12),  # B = 1
    (64, 100, 256, 5),
    (32, 10, 128, 20),  # warm: most batches admit nothing
    (16, 1000, 1024, 3),  # ~44 KiB of shared memory
    (8, 2000, 1024, 2),  # ~68 KiB: opts in to more shared memory
    (4, 128, 2304, 1),  # 48 KiB dynamic: with the static bytes, past 48 KiB (opts in)
    (4, 8000, 8192, 1),  # beyond any shared memory: handed to the reference
]
TOPK_KINDS = ["normal", "ties", "inf", "repeat", "dup_ids"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", TOPK_KINDS)
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "C{}-K{}-B{}-n{}".format(*c))
def test_topk_update_matches_reference(cuda_backend, case, kind):
    num_units, k, batch, n_batches = case
    got, want = _empty_state(num_units, k), _empty_state(num_units, k)
    for values, ids, positions in _batches(num_units, batch, n_batches, kind, seed=_seed(case, kind)):
        reference.topk_update(*want, values, ids, positions)
        cuda_backend.topk_update(*got, values, ids, positions)
        _assert_states_equal(got, want)


@pytest.mark.gpu
def test_topk_update_ignores_unreal_candidates(cuda_backend):
    # A candidate with id -1 is an empty entry: it never enters the state.
    got, want = _empty_state(3, 4), _empty_state(3, 4)
    values = torch.randn(5, 3, device="cuda")
    ids = torch.tensor([4, -1, 2, -1, 7], device="cuda")
    positions = torch.arange(15, device="cuda").view(5, 3)
    reference.topk_update(*want, values, ids, positions)
    cuda_backend.topk_update(*got, values, ids, positions)
    _assert_states_equal(got, want)
    assert not (got[1] == -1).logical_and(got[0] > float("-inf")).any()


@pytest.mark.gpu
def test_topk_update_non_contiguous_candidates(cuda_backend):
    got, want = _empty_state(6, 7), _empty_state(6, 7)
    for values, ids, positions in _batches(12, 9, 4, "ties", seed=3):
        values, positions = values[:, ::2], positions[:, ::2]  # [B, 6] views
        reference.topk_update(*want, values, ids, positions)
        cuda_backend.topk_update(*got, values, ids, positions)
        _assert_states_equal(got, want)
