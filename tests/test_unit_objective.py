"""The objective maximize raises: the affine shortcut (stop before a plain Conv2d / Linear, dot product
with its input) equals reading the layer's output, in value and in gradient."""

import copy

import pytest
import torch
from torch import nn

import neuroidx_fast.maximization as mx
import neuroidx_fast.unit_objective as uo
from neuroidx_fast.hooks import SharedModuleError
from neuroidx_fast.models import BandLocalResponseNorm, vgg_m

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def net_with(layer: nn.Module, dtype=torch.float32):
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("stem", nn.Conv2d(3, 6, 3, padding=1))
    m.add_module("act", nn.Tanh())
    m.add_module("target", layer)
    return m.to(dtype).eval()


LAYERS = {
    "conv": lambda: nn.Conv2d(6, 10, 3, padding=1),
    "conv-strided-dilated-reflect": lambda: nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2,
                                                      padding_mode="reflect"),
    "conv-grouped-no-bias-even-map": lambda: nn.Conv2d(6, 10, 4, groups=2, bias=False),
    "conv-same": lambda: nn.Conv2d(6, 10, 5, padding="same", padding_mode="circular"),
}


def both_paths(model, units, objective, size, x):
    """(values, input gradients) through the layer and through the shortcut."""
    dtype = next(model.parameters()).dtype
    results = []
    for affine in (False, True):
        with mx.frozen_eval(model, torch.device("cpu")), \
                uo.UnitObjective(model, "target", objective, size, dtype, torch.device("cpu"), affine) as readout:
            assert readout.affine is affine
            xg = x.clone().requires_grad_(True)
            values = readout.for_units(torch.tensor(units))(xg)
            (grad,) = torch.autograd.grad(values.sum(), xg)
            results.append((values.detach(), grad))
    return results


@pytest.mark.parametrize("objective", ["mean", "center"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_affine_shortcut_equals_the_layer_output(kind, objective):
    model = net_with(LAYERS[kind]())
    units = [3, 0, 9, 3, 7]
    x = torch.rand(len(units), 3, 13, 11, generator=torch.Generator().manual_seed(2))
    (v_layer, g_layer), (v_affine, g_affine) = both_paths(model, units, objective, (13, 11), x)
    torch.testing.assert_close(v_affine, v_layer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_affine, g_layer, rtol=1e-5, atol=1e-6)
    assert g_layer.abs().max() > 0


def linear_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(75, 12), nn.Tanh(), nn.Linear(12, 10)).eval()


@pytest.mark.parametrize("kind", sorted(LAYERS) + ["linear"])
def test_a_nan_unit_leaves_the_shortcut_of_the_other_units_as_it_was(kind):
    # The batched backward that builds G mixed every unit's weights (0 * NaN): one NaN weight made every
    # unit's objective NaN, and the NaN check would have named them all
    size, target = ((5, 5), "3") if kind == "linear" else ((13, 11), "target")
    model = linear_net() if kind == "linear" else net_with(LAYERS[kind]())
    models = [model, copy.deepcopy(model)]
    with torch.no_grad():
        models[1].get_submodule(target).weight[9].view(-1)[0] = float("nan")
    units = torch.tensor([3, 9, 0, 9, 7])
    x = torch.rand(len(units), 3, *size, generator=torch.Generator().manual_seed(2), requires_grad=True)
    results = []
    for model in models:
        with mx.frozen_eval(model, torch.device("cpu")), \
                uo.UnitObjective(model, target, "mean", size, torch.float32, "cpu") as readout:
            assert readout.affine
            values = readout.for_units(units)(x)
            results.append((values.detach(), torch.autograd.grad(values[[0, 2, 4]].sum(), x)[0]))
    (clean, clean_grad), (values, grad) = results
    assert values.isnan().tolist() == [False, True, False, True, False]
    torch.testing.assert_close(values[[0, 2, 4]], clean[[0, 2, 4]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad[[0, 2, 4]], clean_grad[[0, 2, 4]], rtol=1e-6, atol=1e-7)
    assert clean_grad[[0, 2, 4]].abs().amax(dim=(1, 2, 3)).gt(0).all()


def test_affine_shortcut_on_linear_and_in_float64():
    model = nn.Sequential()
    model.add_module("flat", nn.Flatten())
    model.add_module("fc1", nn.Linear(75, 12))
    model.add_module("relu", nn.ReLU())
    model.add_module("target", nn.Linear(12, 7))
    model = model.double().eval()
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (v_layer, g_layer), (v_affine, g_affine) = both_paths(model, [6, 1, 1, 0], "mean", (5, 5), x)
    torch.testing.assert_close(v_affine, v_layer)
    torch.testing.assert_close(g_affine, g_layer, rtol=1e-12, atol=1e-12)


def test_shortcut_only_for_plain_layers():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x).square()

    assert uo.affine_layer(nn.Conv2d(2, 2, 1)) and uo.affine_layer(nn.Linear(2, 2))
    assert not uo.affine_layer(Scaled(2, 2, 1))
    assert not uo.affine_layer(nn.ReLU()) and not uo.affine_layer(nn.BatchNorm2d(2))
    hooked = nn.Conv2d(2, 2, 1)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert not uo.affine_layer(hooked)
    # a forward set on the instance (accelerate's hooks do so) or a global hook changes what it returns too
    patched = nn.Conv2d(2, 2, 1)
    patched.forward = lambda x: -nn.Conv2d.forward(patched, x)
    assert not uo.affine_layer(patched)
    plain = nn.Linear(2, 2)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert not uo.affine_layer(plain)
    finally:
        handle.remove()
    assert uo.affine_layer(plain)
    # a subclass that squares its output is read through its output, not through the shortcut
    model = net_with(Scaled(6, 4, 3, padding=1))
    with uo.UnitObjective(model, "target", "mean", (8, 8), torch.float32, torch.device("cpu")) as readout:
        assert not readout.affine and readout.width == 4


def test_maximize_same_images_with_and_without_the_shortcut(monkeypatch):
    model = net_with(nn.Conv2d(6, 10, 3, padding=1))
    kw = dict(size=16, steps=6, lr=0.1, seed=4)
    fast = mx.maximize(model, "target", [1, 5, 8], **kw)
    monkeypatch.setattr(uo, "affine_layer", lambda module: False)
    slow = mx.maximize(model, "target", [1, 5, 8], **kw)
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-4)
    assert (fast - 0.5).abs().max() > 1e-2  # the images did move away from the gray start


def test_layer_output_and_width_on_both_paths():
    model = net_with(nn.Conv2d(6, 10, 3, stride=2))
    x = torch.rand(2, 3, 9, 9)
    with torch.no_grad(), uo.UnitObjective(model, "target", "mean", (9, 9), torch.float32, "cpu") as fast:
        out_fast = fast.layer_output(x)
    with torch.no_grad(), uo.UnitObjective(model, "target", "mean", (9, 9), torch.float32, "cpu", affine=False) as ref:
        out_ref = ref.layer_output(x)
    assert fast.width == ref.width == 10 and fast.input_shape == (6, 9, 9)
    torch.testing.assert_close(out_fast, out_ref)
    torch.testing.assert_close(out_ref, model(x))


@pytest.mark.parametrize("preprocess", [
    lambda x: torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
    lambda x: x[..., 2:-2, 2:-2],
], ids=["upsample-2x", "crop"])
def test_the_shortcut_is_sized_by_the_preprocessed_input(preprocess, monkeypatch):
    # The probe runs the gray image through preprocess, as every step does: a preprocess that resizes sets
    # the shape of the layer's input, hence of the shortcut's gradient G.
    model = net_with(nn.Conv2d(6, 10, 3, padding=1))
    kw = dict(size=16, steps=4, lr=0.1, seed=2, transforms=None, preprocess=preprocess)
    fast = mx.maximize(model, "target", [1, 5], **kw)
    with uo.UnitObjective(model, "target", "mean", (16, 16), torch.float32, "cpu", preprocess=preprocess) as readout:
        assert readout.affine and readout.input_shape == (6,) + tuple(preprocess(torch.zeros(1, 3, 16, 16)).shape[2:])
    monkeypatch.setattr(uo, "affine_layer", lambda module: False)
    torch.testing.assert_close(fast, mx.maximize(model, "target", [1, 5], **kw), rtol=0, atol=2e-4)


class SharedModules(nn.Module):
    """torchvision BasicBlock style: one ReLU called twice, and one conv (a plain Conv2d, read through the
    affine shortcut) applied twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.conv, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = self.relu(self.conv(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("layer", ["relu", "conv"])  # read through its output / through the shortcut
def test_a_module_called_twice_is_refused_as_indexing_does(layer):
    # Every step stops at the layer's first call: without the check the second call was silently ignored
    model, x = SharedModules().eval(), torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    match = f"{layer!r} runs more than once in one forward"
    with pytest.raises(SharedModuleError, match=match):
        mx.maximize(model, layer, [0], size=8, steps=1)
    with pytest.raises(SharedModuleError, match=match):
        mx.unit_activations(model, layer, x, 0)
    with pytest.raises(SharedModuleError, match=match):
        mx.maximize_towards(model, layer, x, steps=1)
    assert not getattr(model, layer)._forward_hooks and not getattr(model, layer)._forward_pre_hooks
    assert mx.maximize(model, "stem", [0], size=8, steps=1).shape == (1, 3, 8, 8)  # called once: fine


# ---------------------------------------------------------------------------------------------- band LRN
@pytest.mark.parametrize("size", [1, 2, 4, 5])
@pytest.mark.parametrize("channels", [1, 3, 24])
@pytest.mark.parametrize("beta", [0.75, 0.6])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_band_lrn_equals_torch_lrn(size, channels, beta, backend, monkeypatch):
    monkeypatch.setenv("NEUROIDX_BACKEND", backend)
    from neuroidx_fast.ops import cpp
    calls = []
    for fn in ("lrn_forward", "lrn_backward"):
        monkeypatch.setattr(cpp, fn, lambda *a, _f=getattr(cpp, fn), _n=fn: calls.append(_n) or _f(*a))
    ours = BandLocalResponseNorm(channels, size, alpha=5e-3, beta=beta, k=2.0)
    torchs = nn.LocalResponseNorm(size, alpha=5e-3, beta=beta, k=2.0)
    # 6 x 5 = 30 pixels: the fused kernels' second tile of 16 is partly empty
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = (torch.randn(3, channels, 6, 5, generator=torch.Generator().manual_seed(size)) * 20)
        x = x.contiguous(memory_format=memory_format).requires_grad_(True)
        y_ours, y_torch = ours(x), torchs(x)
        assert y_ours.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(y_ours, y_torch, rtol=2e-6, atol=1e-6)
        with torch.no_grad():  # the inference path (nothing saved)
            torch.testing.assert_close(ours(x), y_ours.detach(), rtol=0, atol=0)
        g_ours, = torch.autograd.grad((y_ours * y_ours.detach()).sum(), x)
        g_torch, = torch.autograd.grad((y_torch * y_torch.detach()).sum(), x)
        assert g_ours.is_contiguous(memory_format=memory_format)
        # where the two terms of the gradient nearly cancel, rounding shows against the result's scale
        torch.testing.assert_close(g_ours, g_torch, rtol=2e-5, atol=1e-6 * float(g_torch.abs().max()))
    # cpp: forward, inference forward and backward, in each layout, through the fused kernels
    assert calls == (["lrn_forward", "lrn_forward", "lrn_backward"] * 2 if backend == "cpp" else [])


def test_fused_lrn_second_derivative_matches_torch():
    # create_graph through the cpp path (float32) takes the differentiable torch formula
    x = torch.randn(2, 6, 3, 4, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    seconds = []
    for lrn in (BandLocalResponseNorm(6, 3, alpha=0.3, beta=0.75, k=1.0), nn.LocalResponseNorm(3, 0.3, 0.75, 1.0)):
        grad, = torch.autograd.grad(lrn(x).square().sum(), x, create_graph=True)
        seconds.append(torch.autograd.grad(grad.sum(), x)[0])
    torch.testing.assert_close(seconds[0], seconds[1], rtol=1e-4, atol=1e-5)


def test_fused_lrn_kernels_follow_the_layout_and_reject_a_wrong_width():
    from neuroidx_fast.ops import cpp
    x = torch.randn(2, 7, 3, 19, generator=torch.Generator().manual_seed(3))
    strided = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # neither NCHW nor NHWC: copied
    grad = torch.randn(2, 7, 3, 19, generator=torch.Generator().manual_seed(4))
    want = nn.LocalResponseNorm(3, 0.1, 0.75, 1.0)(x)
    for t in (x, x.contiguous(memory_format=torch.channels_last), strided):
        torch.testing.assert_close(cpp.lrn_forward(t, 3, 0.1, 0.75, 1.0), want, rtol=2e-6, atol=1e-6)
        base = cpp.lrn_backward(x, grad, 3, 0.1, 0.75, 1.0)
        torch.testing.assert_close(cpp.lrn_backward(t, grad.contiguous(memory_format=torch.channels_last), 3, 0.1,
                                                    0.75, 1.0), base, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"for 7 channels expects \[B, 7, H, W\]"):
        BandLocalResponseNorm(7, 3)(torch.zeros(1, 6, 2, 2))


@pytest.mark.parametrize("size", [2, 5])  # an even window is lopsided: the backward's transposed band matters
@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_band_lrn_backward_passes_gradcheck_and_gradgradcheck(size, beta):
    lrn = BandLocalResponseNorm(4, size, alpha=0.5, beta=beta, k=1.5).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    assert torch.autograd.gradcheck(lrn, (x,))
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(lrn, (x_cl,))
    with torch.no_grad():  # the inference path (nothing saved) computes the same values
        torch.testing.assert_close(lrn(x), lrn(x.detach().requires_grad_(True)).detach(), rtol=0, atol=0)
    assert torch.autograd.gradgradcheck(lrn, (x,))  # the backward's create_graph branch


def test_vgg_m_uses_band_lrn_and_loads_weights_saved_without_it():
    net = vgg_m(num_classes=5, input_size=64, width=0.125)
    assert isinstance(net.norm1, BandLocalResponseNorm) and isinstance(net.norm1, nn.LocalResponseNorm)
    assert not any("band" in key for key in net.state_dict())
    other = vgg_m(num_classes=5, input_size=64, width=0.125)
    other.load_state_dict(net.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64)
    plain = vgg_m(num_classes=5, input_size=64, width=0.125)
    plain.norm1 = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    plain.norm2 = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    plain.load_state_dict(net.state_dict(), strict=True)
    torch.testing.assert_close(net.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-6)


def test_shortcut_gradient_keeps_the_channels_last_layout():
    model = net_with(nn.Conv2d(6, 10, 3, padding=1))
    x = torch.rand(3, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with mx.frozen_eval(model, torch.device("cpu")), \
            uo.UnitObjective(model, "target", "mean", (8, 8), torch.float32, "cpu") as readout:
        stem_out = []
        handle = model.stem.register_forward_hook(lambda m, i, o: stem_out.append(o))
        values = readout.for_units(torch.tensor([0, 4, 9]))(x)
        handle.remove()
        (grad,) = torch.autograd.grad(values.sum(), stem_out[0])
    # the gradient reaching the channels-last activations is channels-last too
    assert not grad.is_contiguous() and grad.is_contiguous(memory_format=torch.channels_last)
