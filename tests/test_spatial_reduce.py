import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuroidx_fast import ops
from oracles import spatial_reduce_oracle
from conftest import cpu_backends

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(x, backend):
    vmax, argmax, vmean = ops.spatial_reduce(x, backend=backend)
    e_max, e_arg, e_mean = spatial_reduce_oracle(x)
    assert vmax.dtype == torch.float32 and argmax.dtype == torch.int64 and vmean.dtype == torch.float32
    assert torch.equal(argmax, e_arg), f"argmax {argmax} != {e_arg}"
    assert torch.equal(vmax.isnan(), e_max.isnan())
    assert torch.equal(torch.nan_to_num(vmax), torch.nan_to_num(e_max))
    finite = e_mean.isfinite()
    n = x[0, 0].numel() if x.dim() == 4 else 1
    tol = 1e-6 * (n ** 0.5) * e_mean.abs().clamp(min=1.0)
    assert ((vmean.double() - e_mean).abs()[finite] <= tol[finite]).all()
    assert torch.equal(vmean.isnan(), e_mean.isnan())


def layouts(x):
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    b, c, h, w = x.shape
    big = torch.full((b, 2 * c, h + 1, 3 * w), 7.0, dtype=x.dtype)
    view = big[:, ::2, 1:, ::3]  # strides in every dimension, nothing contiguous
    view.copy_(x)
    yield "sliced", view
    yield "broadcast", x[:, :, :1, :].expand(b, c, h, w) if h > 1 else x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 1, 1, 1), (1, 5, 1, 9), (4, 6, 4, 1), (2, 17, 3, 3)])
def test_layouts_and_dtypes(backend, dtype, shape):
    torch.manual_seed(hash(shape) % 1000)
    x = torch.randint(-3, 4, shape).to(dtype)  # quantised: many ties inside each map
    for name, xl in layouts(x):
        if name != "broadcast":
            assert torch.equal(xl.float(), x.float()), name
        check(xl, backend)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_means_of_large_maps_stay_close_to_exact(backend):
    """The cpp means (float32 lanes or rows folded into float64) are as close as torch's: a float32 sum
    over a whole 224 x 224 map drifted to relative errors of 2e-6 (contiguous maps) and 8e-6 (channels
    last), against 2e-7."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 16, 224, 224, generator=g) + 1.0
    exact = x.double().mean(dim=(2, 3))
    for name, view in layouts(x):
        if name == "broadcast":
            continue
        vmean = ops.spatial_reduce(view, backend=backend)[2]
        error = ((vmean.double() - exact).abs() / exact).max().item()
        assert error < 5e-7, f"{name}: relative error {error:.1e}"



@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_maps_whose_float32_sum_overflows_have_finite_means(backend):
    """Finite values near float32's limit: a float32 sum passes 3.4e38 and the mean was inf (a live
    unit's Morcos index then NaN); maps that hold inf keep an infinite mean."""
    x = torch.full((2, 3, 4, 5), 3e38)
    x[0, 1] = torch.linspace(-3e38, 3e38, 20, dtype=torch.float64).reshape(4, 5).float()  # a float32 sum: inf - inf
    x[1, 2, 0, 0] = float("inf")
    x[1, 0] = -3e38
    for name, view in layouts(x):
        vmean = ops.spatial_reduce(view, backend=backend)[2]
        assert torch.equal(vmean, view.double().mean(dim=(2, 3)).float()), name
        assert torch.isfinite(vmean).sum() == 5 and vmean[1, 2] == float("inf"), name
    big = torch.full((1, 1, 224, 224), 1e34, dtype=torch.float32)  # the sum passes 3.4e38 at 224 x 224
    assert ops.spatial_reduce(big, backend=backend)[2].item() == pytest.approx(1e34, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_keeps_its_bits_in_every_layout(backend, dtype):
    """The max and mean of a map holding NaN are that NaN's own bits (the cpp strided and channels-last
    paths wrote the default quiet NaN instead)."""
    x = torch.zeros(1, 2, 3, 4)
    x.view(torch.int32)[0, 1, 1, 2] = -0x3FFFFF  # NaN 0xffc00001: sign and payload set
    x = x.to(dtype)
    expected = x.float()[0, 1, 1, 2].view(torch.int32).item()
    for name, view in layouts(x):
        if name == "broadcast":
            continue
        vmax, argmax, vmean = ops.spatial_reduce(view, backend=backend)
        assert vmax[0, 1].view(torch.int32).item() == expected, name
        assert vmean[0, 1].view(torch.int32).item() == expected and argmax[0, 1].item() == 6, name

@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dimensional_input(backend):
    x = torch.randn(5, 7)
    vmax, argmax, vmean = ops.spatial_reduce(x, backend=backend)
    assert torch.equal(vmax, x) and torch.equal(vmean, x) and torch.equal(argmax, torch.zeros(5, 7, dtype=torch.int64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_infinities_nan_and_signed_zero(backend, dtype):
    inf, nan = float("inf"), float("nan")
    maps = [
        [[-inf, -inf], [-inf, -inf]],  # all -inf: max -inf at 0
        [[1.0, inf], [inf, -inf]],  # +inf twice: the first
        [[2.0, nan], [nan, 5.0]],  # NaN: first NaN, whatever the larger values
        [[nan, nan], [nan, nan]],
        [[-inf, nan], [3.0, 3.0]],
        [[-0.0, 0.0], [-1.0, -0.0]],
        [[inf, -inf], [0.0, 1.0]],  # mean is NaN without any NaN element
    ]
    x = torch.tensor(maps).to(dtype)[None]  # [1, 7, 2, 2]
    for _, xl in layouts(x):
        check(xl, backend)
    vmax, argmax, _ = ops.spatial_reduce(x, backend=backend)
    assert argmax.tolist() == [[0, 1, 1, 0, 1, 0, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 4), c=st.integers(1, 9), h=st.integers(1, 6), w=st.integers(1, 6),
    levels=st.integers(1, 5), dtype=st.sampled_from(DTYPES), channels_last=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random(backend, b, c, h, w, levels, dtype, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, levels, (b, c, h, w), generator=g).float() - levels / 2).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check(x, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    vmax, argmax, vmean = ops.spatial_reduce(torch.empty(0, 4, 3, 3), backend=backend)
    assert vmax.shape == argmax.shape == vmean.shape == (0, 4)


def test_float64_goes_through_the_reference():
    x = torch.tensor([[[[1.0, 1.0 + 1e-12]]]], dtype=torch.float64)  # equal once rounded to float32
    vmax, argmax, _ = ops.spatial_reduce(x)
    assert argmax.item() == 1 and vmax.dtype == torch.float32


@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.zeros(2, 3, 4), ValueError, "[B, C, H, W]"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.int32), TypeError, "x.float()"),
        (torch.zeros(2, 3, 0, 4), ValueError, "empty activation map"),
        ([1.0, 2.0], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(x, error, words):
    with pytest.raises(error, match=None) as info:
        ops.spatial_reduce(x)
    assert words in str(info.value)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not load here")
def test_triton_refuses_maps_its_int32_position_counter_would_overflow():
    """The kernel's int32 counter steps past H * W by up to a block: a map within a block of 2^31 - 1
    positions looped forever on wrapped (negative) positions; it is refused before the launch (a
    stride-0 view: no memory behind it)."""
    x = torch.zeros(1, 1, 1, 1).expand(1, 1, 1, 2**31 - 10)
    with pytest.raises(ValueError, match="exceed the kernel's int32 index range"):
        ops.spatial_reduce(x, backend="triton")
