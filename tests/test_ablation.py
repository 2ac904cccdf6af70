"""Masked batched ablation (SPEC.md section 6): the ops on every backend against the torch reference,
the engine against the naive loop (one full forward per ablated set, with a forward hook), the
read-out path against the general path, and clear errors on bad input."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import neuroidx_fast.ablation as abl
from neuroidx_fast import ops
from neuroidx_fast.graph_split import split_model
from neuroidx_fast.ops import reference
from bench.bench_ablation import Bottleneck
from conftest import cpu_backends, gpu_backends
from models import ImageSet, make_model

BACKENDS = cpu_backends()
FAST = [b for b in BACKENDS if b != "triton"]  # the Triton interpreter only gets tiny engine runs
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(autouse=True)
def one_thread():
    # Hundreds of small forwards: with OpenMP threads on a shared 2-core machine, every parallel region
    # waits for a busy core, and a test runs 10-100x slower. The kernels' threaded paths are covered by
    # test_cpp_kernels_threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibrated(name: str, n: int = 24, seed: int = 0, dtype=torch.float32):
    """A test model whose predictions vary across images (its read-out bias is centred on the data) and
    a dataset labelled mostly by those predictions, so that ablations visibly move per-class counts."""
    model = make_model(name, seed=seed).to(dtype)
    data = ImageSet(n=n, size=16, classes=4, seed=seed)
    data.images = data.images.to(dtype)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.bias -= model(data.images).mean(dim=0)
        predicted = model(data.images).argmax(dim=1)
    data.labels = torch.where(torch.arange(n) % 4 == 3, data.labels, predicted)
    return model, data


def assert_equal_to_naive(result, model, data, layer, batch_size, preprocess=None):
    intact, correct, counts = abl.naive_ablation_counts(model, data, layer, result.masks, fill=result.fill,
                                                        preprocess=preprocess, batch_size=batch_size)
    assert torch.equal(result.class_counts, counts)
    assert torch.equal(result.intact_correct, intact)
    assert torch.equal(result.correct, correct), (result.correct - correct).abs().sum()
    return correct


def assert_not_vacuous(result):
    # Some ablations must change some class's count, else the comparison proves little.
    assert (result.correct != result.intact_correct[None, :]).any(dim=1).sum() >= 2


# ------------------------------------------------------------------------------------------ mask_replicas

def _layouts(x):
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
        b, c, h, w = x.shape
        big = torch.zeros((b, 2 * c, h + 1, 3 * w), dtype=x.dtype)
        view = big[:, ::2, 1:, ::3]
        view.copy_(x)
        yield "sliced", view
        yield "transposed", x.transpose(2, 3).contiguous().transpose(2, 3)
        yield "broadcast", x[:, :, :1].expand(b, c, h, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 1, 1, 1), (1, 5, 1, 9), (2, 17, 3, 3), (3, 6)])
def test_mask_replicas_matches_reference_bit_for_bit(backend, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    c = shape[1]
    masks = torch.rand(4, c, generator=g) < 0.4
    masks[0] = True
    masks[1] = False
    for fill in (None, 0.25, torch.randn(c, generator=g)):
        for name, xl in _layouts(x):
            got = ops.mask_replicas(xl, masks, fill, backend=backend)
            want = ops.mask_replicas(xl, masks, fill, backend="torch")
            assert got.shape == (4 * shape[0],) + tuple(shape[1:]) and got.stride() == want.stride(), name
            assert torch.equal(got, want), (name, fill)
            # The semantics, spelled out: row m * B + b is image b under mask m.
            f = torch.zeros(c) if fill is None else torch.as_tensor(fill).expand(c)
            for m in range(4):
                for b in range(shape[0]):
                    row = got[m * shape[0] + b]
                    for u in range(c):
                        expect = f[u].to(dtype).expand_as(row[u]) if masks[m, u] else xl[b, u]
                        assert torch.equal(row[u], expect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_replicas_is_a_bit_copy_and_keeps_channels_last(backend):
    x = torch.tensor([-0.0, float("nan"), float("inf"), 1e-40]).view(1, 4, 1, 1).repeat(2, 1, 3, 2)
    x = x.contiguous(memory_format=torch.channels_last)
    masks = torch.tensor([[False, False, False, False], [True, False, True, False]])
    fill = torch.tensor([-0.0, 2.0, float("-inf"), 3.0])
    got = ops.mask_replicas(x, masks, fill, backend=backend)
    assert not got.is_contiguous() and got.is_contiguous(memory_format=torch.channels_last)
    want = ops.mask_replicas(x, masks, fill, backend="torch")
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.equal(got[:2].view(torch.int32), x.view(torch.int32))
    assert got[2, 0, 0, 0].item() == 0.0 and torch.signbit(got[2, 0, 0, 0])



@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_replicas_of_inputs_that_require_grad_is_a_detached_copy(backend):
    """The torch reference raised (autograd refuses where(out=)) where the other backends copy bits."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    fill = torch.randn(3, requires_grad=True)
    got = ops.mask_replicas(x, torch.tensor([[True, False, False]]), fill, backend=backend)
    assert not got.requires_grad
    assert torch.equal(got[:, 0], fill.detach()[0].expand(2, 4, 4)) and torch.equal(got[:, 1:], x.detach()[:, 1:])

def test_mask_replicas_rejects_bad_input():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="bool"):
        ops.mask_replicas(x, torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[M, 3\]"):
        ops.mask_replicas(x, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="fill has 2 values"):
        ops.mask_replicas(x, torch.ones(1, 3, dtype=torch.bool), fill=[1.0, 2.0])
    with pytest.raises(TypeError, match="float16, bfloat16"):
        ops.mask_replicas(x.int(), torch.ones(1, 3, dtype=torch.bool))
    assert ops.mask_replicas(x, torch.zeros(0, 3, dtype=torch.bool)).shape == (0, 3, 4, 4)


# ------------------------------------------------------------------------------------------ readout kernel

def _readout_case(b, c, k, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, c, generator=g, dtype=torch.float64).relu()
    w = torch.randn(k, c, generator=g, dtype=torch.float64)
    bias = torch.randn(k, generator=g, dtype=torch.float64)
    if ties and k > 2:
        w[2], bias[2] = w[0], bias[0]  # classes 0 and 2 always tie
    logits = f @ w.t() + bias
    scale = f.abs() @ w.abs().t() + bias.abs()
    return logits, f, w, bias, scale


def _explicit_readout(logits, f, w, ablated, units, scale, err_rel):
    """The contract evaluated with the [U, B, K] tensor materialised (float64, reference order)."""
    preds = []
    for c in units.tolist():
        z = logits + w[:, c][None, :] * (ablated[c] - f[:, c])[:, None]
        e = err_rel * (scale + w[:, c].abs()[None, :] * (ablated[c].abs() - f[:, c].abs())[:, None]).clamp(min=0)
        row = []
        for b in range(z.shape[0]):
            if not (torch.isfinite(z[b]).all() and torch.isfinite(e[b]).all()):
                row.append(-1)
                continue
            best = int(z[b].argmax())
            others = torch.cat([(z[b] + e[b])[:best], (z[b] + e[b])[best + 1:]])
            ok = others.numel() == 0 or bool(z[b, best] - e[b, best] > others.max())
            row.append(best if ok else -1)
        preds.append(row)
    return torch.tensor(preds, dtype=torch.int64)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not load here")
def test_triton_mask_replicas_rows_of_2_to_the_31_elements_are_written():
    """The kernel's row length C * H * W comes from the host (an int64 argument from 2^31 on): C * HW of
    two int32 arguments wrapped, and rows of [1, 32768, 256, 256] inputs came back unwritten. Launched
    with such a row's sizes on one-element buffers (every stride 0), its first block only."""
    from neuroidx_fast.kernels.ablation import _mask_replicas_kernel

    x, fill = torch.full((1,), 7, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    masks = torch.zeros(1, dtype=torch.uint8)  # unit 0 kept
    for c, hw in ((4, 65536), (32768, 65536), (65536, 65536)):
        out = torch.full((16,), -1, dtype=torch.int32)  # -1: never written
        _mask_replicas_kernel[(1, 1)](x, masks, fill, out, 1, c, 256, hw, c * hw, 0, 0, 0, 0,
                                      CHANNELS_LAST=False, BLOCK=16)
        assert out.tolist() == [7] * 16, (c, hw)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not load here")
def test_triton_readout_launches_units_in_chunks_of_the_grid_limit(monkeypatch):
    import neuroidx_fast.kernels.ablation as triton_ablation

    monkeypatch.setattr(triton_ablation, "GRID_Y_LIMIT", 1)  # one 64-unit block per launch: 3 launches
    launches = []
    kernel = triton_ablation._readout_kernel
    monkeypatch.setattr(triton_ablation, "_readout_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or kernel[grid]})())
    logits, f, w, _, scale = _readout_case(2, 150, 5, seed=8, ties=True)
    ablated = torch.randn(150, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    units = torch.arange(150).flip(0)
    got = ops.readout_ablation_argmax(logits, f, w, ablated, units, scale, 1e-3, backend="triton")
    assert torch.equal(got, _explicit_readout(logits, f, w, ablated, units, scale, 1e-3))
    assert launches == [(2, 1)] * 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,c,k", [(5, 7, 4), (3, 1, 6), (4, 9, 1), (2, 33, 70), (1, 5, 2)])
@pytest.mark.parametrize("err_rel", [0.0, 1e-3, 0.2])
def test_readout_argmax_matches_reference(backend, b, c, k, err_rel):
    logits, f, w, _, scale = _readout_case(b, c, k, seed=b * 100 + c * 10 + k, ties=True)
    g = torch.Generator().manual_seed(1)
    ablated = torch.randn(c, generator=g, dtype=torch.float64)
    units = torch.tensor([c - 1, 0] + list(range(c)) + [0], dtype=torch.int64)  # a subset order, repeats
    got = ops.readout_ablation_argmax(logits, f, w, ablated, units, scale, err_rel, backend=backend)
    want = _explicit_readout(logits, f, w, ablated, units, scale, err_rel)
    assert got.shape == (units.numel(), b) and got.dtype == torch.int64
    assert torch.equal(got, want)
    if k > 2:
        assert not (got == 2).any()  # a tie with class 0 is never certified


@pytest.mark.parametrize("backend", BACKENDS)
def test_readout_argmax_non_finite_rows_are_uncertified(backend):
    logits, f, w, _, scale = _readout_case(3, 4, 5, seed=3)
    logits[1, 2] = float("inf")
    f[2, 1] = float("nan")
    got = ops.readout_ablation_argmax(logits, f, w, None, None, scale, 1e-6, backend=backend)
    assert (got[:, 1] == -1).all() and (got[1, 2] == -1) and (got[0, 2] >= 0)


def test_readout_certificate_is_sound_for_float32_linear_layers():
    # Near-tie classes (weight rows one float32 ulp apart): whatever a certified class is, every float32
    # evaluation order of the ablated logits (batched matmul, one row, reversed sums) agrees with it.
    torch.manual_seed(0)
    b, c, k = 16, 64, 6
    lin = nn.Linear(c, k)
    with torch.no_grad():
        lin.weight[1] = torch.nextafter(lin.weight[0], torch.tensor(1.0))
        lin.bias[1] = lin.bias[0]
        lin.weight[3] = lin.weight[2] * (1 + 2 ** -20)
    f32 = torch.randn(b, c).relu()
    f64, w64, b64 = f32.double(), lin.weight.detach().double(), lin.bias.detach().double()
    err = abl.readout_error_bound(torch.float32, c)
    pred = ops.readout_ablation_argmax(f64 @ w64.t() + b64, f64, w64, None, None,
                                       f64.abs() @ w64.abs().t() + b64.abs(), err, backend="torch")
    assert (pred >= 0).float().mean() > 0.5 and (pred < 0).any()
    for u in range(c):
        x = f32.clone()
        x[:, u] = 0
        orders = [lin(x), torch.cat([lin(x[i:i + 1]) for i in range(b)]),
                  (x.flip(1)[:, None, :] * lin.weight.detach().flip(1)[None]).sum(-1) + lin.bias.detach()]
        for logits in orders:
            sure = pred[u] >= 0
            assert torch.equal(logits.argmax(dim=1)[sure], pred[u][sure])


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp backend is unavailable here")
def test_cpp_kernels_threaded():
    torch.set_num_threads(2)  # restored by the one_thread fixture
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 13, 6, 7, generator=g)
    masks = torch.rand(7, 13, generator=g) < 0.5
    fill = torch.randn(13, generator=g)
    for xl in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, ::2]):
        assert torch.equal(ops.mask_replicas(xl, masks, fill, backend="cpp"), reference.mask_replicas(xl, masks, fill))
    logits, f, w, _, scale = _readout_case(9, 31, 17, seed=4, ties=True)
    units = torch.arange(31)
    for err in (0.0, 1e-3):
        assert torch.equal(ops.readout_ablation_argmax(logits, f, w, None, units, scale, err, backend="cpp"),
                           _explicit_readout(logits, f, w, torch.zeros(31, dtype=torch.float64), units, scale, err))


# ------------------------------------------------------------------------------------------ engine = naive loop

@pytest.mark.parametrize("backend", FAST)
def test_vgg_mid_conv_layer_equals_naive_loop(backend):
    model, data = calibrated("vgg")
    result = abl.ablation_drops(model, data, "features.3", batch_size=8, masks_per_batch=5, backend=backend,
                                progress=False)
    assert result.stats["path"] == "general" and result.masks.shape == (12, 12)
    assert torch.equal(result.units, torch.arange(12))
    assert_equal_to_naive(result, model, data, "features.3", batch_size=8)
    assert_not_vacuous(result)


def test_a_training_model_is_ablated_in_eval_mode_and_keeps_its_modes():
    # Both the batched ablation and the naive loop run the model in eval mode (BatchNorm in train mode
    # would normalise by each batch) and give every module its own mode back.
    model, data = calibrated("vgg")
    want = abl.ablation_drops(model.eval(), data, "features.3", units=[0, 5], batch_size=8, progress=False)
    model.train()
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][:1]
    frozen[0].eval()
    running = frozen[0].running_var.clone()
    got = abl.ablation_drops(model, data, "features.3", units=[0, 5], batch_size=8, progress=False)
    assert torch.equal(got.correct, want.correct) and torch.equal(got.intact_correct, want.intact_correct)
    assert model.training and not frozen[0].training and torch.equal(frozen[0].running_var, running)
    assert all(m.training for m in model.modules() if m is not frozen[0])
    intact, correct, _ = abl.naive_ablation_counts(model, data, "features.3", got.masks, batch_size=8)
    assert torch.equal(intact, want.intact_correct) and torch.equal(correct, want.correct)
    assert model.training and not frozen[0].training and torch.equal(frozen[0].running_var, running)


@pytest.mark.parametrize("layer", ["layer2.bn1", "layer1.conv1"])
def test_resnet_inside_a_residual_block_equals_naive_loop(layer):
    model, data = calibrated("resnet", seed=1)
    split = split_model(model, layer)
    assert split.live_names and all(split.batched)  # the skip branch crosses the cut
    result = abl.ablation_drops(model, data, layer, batch_size=7, progress=False)  # last batch: 3 images
    assert result.stats["path"] == "general"
    assert_equal_to_naive(result, model, data, layer, batch_size=7)
    assert_not_vacuous(result)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("name,layer", [("resnet", "layer2"), ("vgg", "classifier.2")])
def test_readout_path_every_unit_equals_naive_and_general(backend, name, layer):
    model, data = calibrated(name, seed=2)
    fast = abl.ablation_drops(model, data, layer, batch_size=8, backend=backend, progress=False)
    assert fast.stats["path"] == "readout" and fast.stats["suffix_rows"] == 8 * fast.stats["readout_fallbacks"]
    general = abl.ablation_drops(model, data, layer, batch_size=8, backend=backend, path="general",
                                 progress=False)
    assert general.stats["path"] == "general"
    assert torch.equal(fast.correct, general.correct) and torch.equal(fast.intact_correct, general.intact_correct)
    assert_equal_to_naive(fast, model, data, layer, batch_size=8)
    assert_not_vacuous(fast)


class _Bottleneck(Bottleneck):
    """torchvision's Bottleneck (in-place ReLU, ``out += identity``, the shortcut computed late) with a
    projection shortcut, made after the block's own layers."""

    def __init__(self, cin, width, stride):
        super().__init__(cin, width, stride)
        self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width))


class _TinyResNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(_Bottleneck(8, 4, 1))
        self.layer2 = nn.Sequential(_Bottleneck(16, 8, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("layer,units", [("layer1.0.bn1", None), ("layer1.0.conv3", [0, 3, 7, 15]),
                                         ("layer1", [1, 2, 5, 11]), ("layer2.0.bn2", None), ("layer2", None)])
def test_torchvision_style_bottlenecks_with_inplace_ops(layer, units):
    torch.manual_seed(14)
    model = _TinyResNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_mean, -0.2, 0.2)
            nn.init.uniform_(m.running_var, 0.5, 2.0)
    model.eval()
    data = ImageSet(n=20, size=12, classes=4, seed=14)
    with torch.no_grad():
        model.fc.bias -= model(data.images).mean(dim=0)
        data.labels = torch.where(torch.arange(20) % 4 == 3, data.labels, model(data.images).argmax(dim=1))
    result = abl.ablation_drops(model, data, layer, units=units, batch_size=6, progress=False)
    assert result.stats["path"] == ("readout" if layer == "layer2" else "general")
    assert_equal_to_naive(result, model, data, layer, batch_size=6)
    with pytest.raises(ValueError, match="called 3 times"):
        abl.ablation_drops(model, data, "layer1.0.relu", progress=False)


def test_readout_path_falls_back_on_ties():
    # Two classes with identical weights tie on every image: nothing about them can be certified, so
    # those (unit, batch) pairs are recomputed, and the lower class wins as in torch.argmax.
    model, data = calibrated("resnet", seed=3)
    with torch.no_grad():
        model.head[2].weight[3] = model.head[2].weight[1]
        model.head[2].bias[3] = model.head[2].bias[1]
    result = abl.ablation_drops(model, data, "layer2", batch_size=10, progress=False)
    assert result.stats["path"] == "readout" and result.stats["readout_fallbacks"] > 0
    assert_equal_to_naive(result, model, data, "layer2", batch_size=10)


def test_group_masks_equal_naive_loop():
    model, data = calibrated("vgg", seed=4)
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(9, 16, generator=g) < 0.3
    masks[0] = False  # the empty set: the intact model
    masks[1] = True  # every unit
    result = abl.ablation_drops(model, data, "features.8", masks=masks, batch_size=8, masks_per_batch=4,
                                progress=False)
    assert_equal_to_naive(result, model, data, "features.8", batch_size=8)
    assert torch.equal(result.correct[0], result.intact_correct)
    assert (result.units[2:] == torch.where(masks[2:].sum(1) == 1, masks[2:].long().argmax(1), -1)).all()
    assert_not_vacuous(result)


def test_readout_group_masks_use_general_path():
    model, data = calibrated("resnet", seed=5)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[0, :4] = True
    masks[1, 5] = True
    masks[2, 7:] = True
    result = abl.ablation_drops(model, data, "layer2", masks=masks, batch_size=8, progress=False)
    assert result.stats["path"] == "general"
    assert_equal_to_naive(result, model, data, "layer2", batch_size=8)


@pytest.mark.parametrize("name,layer", [("vgg", "features.4"), ("resnet", "layer2"), ("resnet", "layer2.bn1")])
def test_mean_mode_equals_naive_loop(name, layer):
    model, data = calibrated(name, seed=6)
    result = abl.ablation_drops(model, data, layer, mode="mean", batch_size=8, progress=False)
    # The fill is each unit's dataset mean of its spatial means (SPEC.md 1 and 6), in float64.
    split = split_model(model, layer)
    with torch.no_grad():
        cut, _ = split.run_prefix(data.images)
    expected = cut.double().mean(dim=(2, 3)).mean(dim=0) if cut.dim() == 4 else cut.double().mean(dim=0)
    torch.testing.assert_close(result.fill, expected, rtol=1e-12, atol=1e-12)
    assert_equal_to_naive(result, model, data, layer, batch_size=8)
    assert_not_vacuous(result)
    # Means passed in (or taken from an index) give the same run.
    again = abl.ablation_drops(model, data, layer, mode="mean", means=result.fill, batch_size=8, progress=False)
    assert torch.equal(again.correct, result.correct)


def test_mean_mode_from_a_neuron_index():
    import neuroidx_fast as nx

    model, data = calibrated("vgg", seed=7)
    index = nx.index_dataset(model, data, ["features.5"], k=3, batch_size=8, progress=False)
    result = abl.ablation_drops(model, data, "features.5", units=[0, 3, 11], mode="mean", index=index,
                                batch_size=8, progress=False)
    assert torch.equal(result.fill, index["features.5"].mean_activation())
    assert_equal_to_naive(result, model, data, "features.5", batch_size=8)
    index = nx.index_dataset(model, data, ["features.2", "features.5"], k=3, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="LayerIndex of 'features.2', not of 'features.5'"):
        abl.ablation_drops(model, data, "features.5", mode="mean", index=index["features.2"], progress=False)


def test_float64_channels_last_model_and_preprocess():
    model, data = calibrated("resnet", seed=8, dtype=torch.float64)
    model = model.to(memory_format=torch.channels_last)

    def preprocess(x):  # normalisation on the device, then channels_last activations throughout
        return ((x - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)

    for layer, units in (("layer2.bn1", [0, 5, 9, 15]), ("layer2", None)):
        result = abl.ablation_drops(model, data, layer, units=units, batch_size=8, preprocess=preprocess,
                                    progress=False)
        assert_equal_to_naive(result, model, data, layer, batch_size=8, preprocess=preprocess)


def test_verification_recomputes_at_the_naive_shape():
    model, data = calibrated("vgg", seed=9)
    base = abl.ablation_drops(model, data, "features.3", batch_size=8, masks_per_batch=6, verify=None,
                              progress=False)
    forced = abl.ablation_drops(model, data, "features.3", batch_size=8, masks_per_batch=6, verify=1e9,
                                progress=False)
    assert base.stats["verified_masks"] == 0
    assert forced.stats["verified_masks"] == 12 * 3  # every mask of every batch (3 batches of 8)
    assert torch.equal(base.correct, forced.correct)
    assert_equal_to_naive(base, model, data, "features.3", batch_size=8)


@pytest.mark.parametrize("path", ["general", "readout"])
def test_triton_backend_tiny_engine_run(path):
    if "triton" not in BACKENDS:
        pytest.skip("the triton backend is unavailable here")
    model, data = calibrated("resnet", n=10, seed=10)
    result = abl.ablation_drops(model, data, "layer2", units=[1, 4, 9], batch_size=5, backend="triton",
                                path=path, progress=False)
    assert result.stats["path"] == path
    assert_equal_to_naive(result, model, data, "layer2", batch_size=5)


# ------------------------------------------------------------------------------------------ result

def test_result_rates_and_frame():
    counts = torch.tensor([4, 0, 5])
    result = abl.AblationResult(
        layer="l", mode="zero", masks=torch.tensor([[True, False], [False, True], [True, True]]),
        units=torch.tensor([0, 1, -1]), correct=torch.tensor([[4, 0, 1], [2, 0, 5], [0, 0, 0]]),
        intact_correct=torch.tensor([4, 0, 5]), class_counts=counts, class_names=["a", "b", "c"],
        weight_l1=torch.tensor([1.5, 2.5], dtype=torch.float64))
    assert torch.isnan(result.intact_accuracy[1])
    torch.testing.assert_close(result.drop[0, [0, 2]], torch.tensor([0.0, 0.8], dtype=torch.float64))
    # class b has no images; classes a and c share the largest drop of the last set: no one class
    assert result.max_drop_class.tolist() == [2, 0, -1]
    torch.testing.assert_close(result.max_drop, torch.tensor([0.8, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(result.overall_drop, torch.tensor([4 / 9, 2 / 9, 1.0], dtype=torch.float64))
    frame = result.to_frame(per_class=True)
    assert list(frame["unit"]) == [0, 1, -1] and list(frame["units"]) == ["0", "1", "0,1"]
    assert list(frame["max_drop_class_name"]) == ["c", "a", ""]
    assert frame["weight_l1"].iloc[1] == 2.5 and pd.isna(frame["weight_l1"].iloc[2])
    assert "drop[c]" in frame.columns



def test_a_set_that_changes_nothing_names_no_class():
    """Every class at drop 0 (the ablation changes nothing): no one class, not the lowest (the demo named
    "red disk" for 143 such units); a unique largest drop, even at 0 or below, keeps its class."""
    result = abl.AblationResult(
        layer="l", mode="zero", masks=torch.tensor([[True, False], [False, True]]), units=torch.tensor([0, 1]),
        correct=torch.tensor([[3, 5], [3, 4]]), intact_correct=torch.tensor([3, 5]), class_counts=torch.tensor([5, 5]),
        class_names=["a", "b"])
    assert result.max_drop_class.tolist() == [-1, 1]
    torch.testing.assert_close(result.max_drop, torch.tensor([0.0, 0.2], dtype=torch.float64))
    assert list(result.to_frame()["max_drop_class_name"]) == ["", "b"]

def test_dataset_classes_that_are_not_the_models_outputs_are_warned_of(recwarn):
    model, data = calibrated("vgg")
    data.classes = ["a", "b", "c"]  # the model has 4 outputs
    with pytest.warns(UserWarning, match="the dataset names 3 classes but the model has 4 outputs"):
        result = abl.ablation_drops(model, data, "features.3", units=[0], batch_size=8, progress=False)
    assert result.class_names is None
    data.classes = ["a", "b", "c", "d"]
    recwarn.clear()
    assert abl.ablation_drops(model, data, "features.3", units=[0], batch_size=8, progress=False).class_names == \
        ["a", "b", "c", "d"]
    assert not [w for w in recwarn if "classes but the model" in str(w.message)]


def test_weight_l1_of_the_producing_conv():
    model, data = calibrated("vgg", seed=11)
    expected = model.features[3].weight.detach().double().abs().sum(dim=(1, 2, 3))
    for layer in ("features.3", "features.4", "features.5", "features.6"):  # conv, BN, ReLU, MaxPool
        result = abl.ablation_drops(model, data, layer, units=[0], batch_size=20, progress=False)
        assert torch.equal(result.weight_l1, expected), layer
    result = abl.ablation_drops(*calibrated("resnet", seed=11), "layer2", units=[0], batch_size=20, progress=False)
    assert torch.isnan(result.weight_l1).all()  # a residual sum has no single incoming layer


def test_ablation_correlations():
    model, data = calibrated("vgg", seed=12)
    result = abl.ablation_drops(model, data, "features.3", batch_size=8, progress=False)
    frame = result.to_frame()
    table = pd.DataFrame({
        "layer": ["features.3"] * 12 + ["other"] * 2,
        "unit": list(range(12)) + [0, 1],
        "class_selectivity": list(frame["max_class_drop"] * 3 + 1) + [9.0, -9.0],  # monotone: rho = 1
        "mean_activation": list(-frame["overall_drop"]) + [0.0, 0.0],  # decreasing: rho = -1
        "color_selectivity": [float("nan")] * 4 + list(range(8)) + [0.0, 0.0],  # 4 NaN rows skipped
        "dead": [False] * 14,
    })
    corr = abl.ablation_correlations(result, table)
    assert list(corr.index) == ["class_selectivity", "color_selectivity", "mean_activation", "weight_l1"]
    assert corr.loc["class_selectivity", "max_class_drop"] == pytest.approx(1.0)
    assert corr.loc["mean_activation", "overall_drop"] == pytest.approx(-1.0)
    assert corr.loc["color_selectivity", "n"] == 8 and corr.loc["weight_l1", "n"] == 12
    ranks = frame[["weight_l1", "overall_drop"]].rank()
    assert corr.loc["weight_l1", "overall_drop"] == pytest.approx(ranks.corr().iloc[0, 1])
    with pytest.raises(ValueError, match="no rows for layer"):
        abl.ablation_correlations(result, table.assign(layer="x"))
    twice = abl.ablation_drops(model, data, "features.3", units=[1, 1, 2, 3], batch_size=8, progress=False)
    with pytest.raises(ValueError, match=r"unit\(s\) \[1\] more than once"):
        abl.ablation_correlations(twice, table)


def test_correlations_with_the_neuron_table():
    table_module = pytest.importorskip("neuroidx_fast.table")
    import neuroidx_fast as nx

    model, data = calibrated("vgg", seed=3)
    index = nx.index_dataset(model, data, ["features.3", "features.7"], k=5, batch_size=8, progress=False)
    table = table_module.neuron_table(index, labels=data)
    result = abl.ablation_drops(model, data, "features.3", mode="mean", index=index, batch_size=8, progress=False)
    corr = abl.ablation_correlations(result, table)
    assert {"class_selectivity", "class_selectivity_morcos", "mean_activation", "weight_l1"} <= set(corr.index)
    assert corr.loc["mean_activation", "n"] == 12 and corr.loc["color_selectivity", "n"] == 0  # no color column data
    assert corr.loc["mean_activation"].notna()["overall_drop"]
    joined = table_module.neuron_table(index, extra=result.to_frame())
    assert joined.loc[joined["layer"] == "features.3", "overall_drop"].notna().all()


# ------------------------------------------------------------------------------------------ bad input

class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:  # control flow that depends on the data: torch.fx cannot trace it
            x = x * 2
        return self.fc(x.mean(dim=(2, 3)))


class _SharedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.relu(self.relu(self.conv(x)).mean(dim=(2, 3))))


def test_bad_input_raises_clearly():
    model, data = calibrated("vgg", n=12)
    with pytest.raises(ValueError, match=r"unknown layer 'features\.33'.*closest names: features\.3"):
        abl.ablation_drops(model, data, "features.33", progress=False)
    with pytest.raises(IndexError, match=r"unit 12 out of range: layer 'features\.3' has 12 units"):
        abl.ablation_drops(model, data, "features.3", units=[0, 12], progress=False)
    with pytest.raises(IndexError, match="out of range"):
        abl.ablation_drops(model, data, "features.3", units=[-1], progress=False)
    unlabelled = ImageSet(n=12, size=16, labels=False)
    with pytest.raises(ValueError, match="ablation needs labels"):
        abl.ablation_drops(model, unlabelled, "features.3", progress=False)
    with pytest.raises(ValueError, match=r"masks must have shape \[S, 12\]"):
        abl.ablation_drops(model, data, "features.3", masks=torch.ones(2, 5, dtype=torch.bool), progress=False)
    with pytest.raises(ValueError, match="not both"):
        abl.ablation_drops(model, data, "features.3", units=[1], masks=torch.ones(1, 12, dtype=torch.bool),
                           progress=False)
    with pytest.raises(ValueError, match="mode must be 'zero' or 'mean'"):
        abl.ablation_drops(model, data, "features.3", mode="noise", progress=False)
    with pytest.raises(ValueError, match="path='readout' does not apply"):
        abl.ablation_drops(model, data, "features.3", path="readout", progress=False)
    with pytest.raises(ValueError, match="12 units, got 3 means"):
        abl.ablation_drops(model, data, "features.3", mode="mean", means=[0.0, 1.0, 2.0], progress=False)
    bad_labels = ImageSet(n=12, size=16, classes=9)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 4\)"):
        abl.ablation_drops(model, bad_labels, "features.3", batch_size=12, progress=False)
    with pytest.raises(TypeError, match="torch.fx could not trace"):
        abl.ablation_drops(_Untraceable(), data, "conv", progress=False)
    quoted = nn.Sequential()  # torch.fx wrote getattr(self, "a"b"): a SyntaxError naming no module
    for name, module in (("conv", nn.Conv2d(3, 4, 3)), ('re"lu', nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(1)),
                         ("flat", nn.Flatten()), ("fc", nn.Linear(4, 4))):
        quoted.add_module(name, module)
    with pytest.raises(TypeError, match=r"names hold quotes or backslashes \(\['re\"lu'\]\).*naive_ablation_counts"):
        abl.ablation_drops(quoted, data, "conv", progress=False)
    with pytest.raises(ValueError, match="called 2 times"):
        abl.ablation_drops(_SharedRelu(), data, "relu", progress=False)


# ------------------------------------------------------------------------------------------ CUDA

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile(tmp_path, arch):
    out = tmp_path / f"ablation_{arch}.cubin"
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "-Werror", "all-warnings", "--cubin", "-Xptxas",
           "-Werror,-warn-spills,-warn-lmem-usage", "-o", str(out), str(REPO / "csrc" / "cuda" / "ablation.cu")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_cuda_launcher_names_every_kernel(tmp_path, monkeypatch):
    import importlib.util
    import sys
    import types

    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    spec = importlib.util.spec_from_file_location("_ablation_cuda_probe", REPO / "neuroidx_fast" / "ops" / "cuda.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    source = tmp_path / "ablation.cu"
    source.write_text(launcher.kernel_source("ablation.cu"))
    ptx = tmp_path / "ablation.ptx"
    subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "--ptx", "-o", str(ptx), str(source)], check=True)
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx.read_text()))
    assert set(launcher.KERNELS["ablation.cu"]) <= entries


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in gpu_backends() if b != "torch"] or ["cuda", "triton"])
def test_gpu_ops_match_reference(backend):
    if backend not in gpu_backends():
        pytest.skip(f"backend {backend} unavailable on cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32, torch.float16, torch.float64):
        x = torch.randn(64, 96, 14, 14, device="cuda", generator=g).to(dtype)
        masks = torch.rand(9, 96, device="cuda", generator=g) < 0.2
        fill = torch.randn(96, device="cuda", generator=g)
        for xl in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, 1:, ::2]):
            got = ops.mask_replicas(xl, masks, fill, backend=backend)
            assert torch.equal(got, reference.mask_replicas(xl, masks, fill.to(dtype)))
    logits, f, w, _, scale = (t.cuda() for t in _readout_case(256, 512, 1000, seed=5, ties=True))
    ablated = torch.randn(512, device="cuda", dtype=torch.float64, generator=g)
    units = torch.arange(512, device="cuda")
    for err in (0.0, 1e-4):
        got = ops.readout_ablation_argmax(logits, f, w, ablated, units, scale, err, backend=backend)
        assert torch.equal(got, reference.readout_ablation_argmax(logits, f, w, ablated, units, scale, err))


@pytest.mark.gpu
@pytest.mark.parametrize("name,layer", [("resnet", "layer2.bn1"), ("resnet", "layer2"), ("vgg", "features.3")])
def test_gpu_engine_equals_naive_loop(name, layer):
    model, data = calibrated(name, seed=13)
    model = model.cuda()
    result = abl.ablation_drops(model, data, layer, batch_size=8, device="cuda", progress=False)
    assert_equal_to_naive(result, model, data, layer, batch_size=8)


def test_the_re_check_margin_widens_where_float32_may_use_tf32():
    from neuroidx_fast.ablation import verify_rtol

    # (plain assignments restored by hand: these flags are properties that monkeypatch cannot undo)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cudnn.allow_tf32 = True  # CUDA's default for convolutions
        assert verify_rtol(torch.float32, "cuda") == 2.0 ** -8
        assert verify_rtol(torch.float64, "cuda") == 1e-10 and verify_rtol(torch.float32, "cpu") == 1e-4
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        assert verify_rtol(torch.float32, "cuda") == 1e-4
        torch.set_float32_matmul_precision("high")
        assert verify_rtol(torch.float32, "cpu") == 2.0 ** -8
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_a_read_out_layer_whose_forward_was_replaced_is_run_as_it_is():
    """A forward set on the head Linear's instance (accelerate's hooks, a user's patch): the read-out
    path computed the logits from the Linear's weights, not from that forward (151 counts off here)."""
    model, data = calibrated("vgg", seed=3)
    assert abl.ablation_drops(model, data, "classifier.2", batch_size=8, progress=False).stats["path"] == "readout"
    head = model.classifier[3]
    head.forward = lambda x: nn.Linear.forward(head, x).flip(1)
    result = abl.ablation_drops(model, data, "classifier.2", batch_size=8, progress=False)
    assert result.stats["path"] == "general" and "forward of its own" in result.stats["readout"]
    assert_equal_to_naive(result, model, data, "classifier.2", batch_size=8)


_FP32_PRECISION_SETTINGS = [(), ("mkldnn",), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("cuda", "matmul"), ("cudnn",),
                            ("cudnn", "conv")]


def _fp32_precision_setting(path):
    setting = torch.backends
    for name in path:
        setting = getattr(setting, name)
    return setting


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9 has no fp32_precision settings")
def test_torchs_new_float32_precision_settings_widen_the_margins_and_break_nothing():
    """torch refuses its legacy get_float32_matmul_precision once the new fp32_precision settings were used
    (a RuntimeError about mixing the two APIs): ablation read both and failed with that error."""
    model, data = calibrated("vgg", seed=3)
    ieee_bound = abl.readout_error_bound(torch.float32, 64)
    saved = {path: _fp32_precision_setting(path).fp32_precision for path in _FP32_PRECISION_SETTINGS}
    try:
        torch.backends.fp32_precision = "ieee"
        for path in _FP32_PRECISION_SETTINGS[1:]:  # each deferring to the global setting (as other tests left them)
            _fp32_precision_setting(path).fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()  # (what the fix works around)
        result = abl.ablation_drops(model, data, "features.3", batch_size=8, progress=False)
        assert_equal_to_naive(result, model, data, "features.3", batch_size=8)
        assert abl.reduced_float32_precisions("cpu") == {"bf16"}
        assert abl.verify_rtol(torch.float32, "cpu") == 2.0 ** -8
        assert abl.verify_rtol(torch.float64, "cpu") == 1e-10
        assert abl.readout_error_bound(torch.float32, 64) > ieee_bound + 2 * 2.0 ** -8
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        torch.backends.fp32_precision = "tf32"  # every backend that defers to the global setting
        assert abl.reduced_float32_precisions("cuda") == {"tf32"}
        assert abl.reduced_float32_precisions("cpu", ("conv",)) == {"tf32"}
        assert abl.reduced_float32_precisions("cpu", ("matmul",)) == set()  # set to ieee above: its own
        assert abl.readout_error_bound(torch.float32, 64) > ieee_bound + 2 * 2.0 ** -11  # (cuda's matmul)
        torch.backends.fp32_precision = "ieee"
        assert abl.verify_rtol(torch.float32, "cpu") == 1e-4
    finally:
        for path, value in saved.items():
            _fp32_precision_setting(path).fp32_precision = value
    assert torch.get_float32_matmul_precision() == "highest"


class _BareInPlace(nn.Module):
    """An in-place op whose result is not assigned: torch.fx drops it from the traced graph."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 4)

    def forward(self, x):
        h = self.b(self.a(x))
        h.relu_()
        return self.fc(h.mean(dim=(2, 3)))


class _AliasedAdd(nn.Module):
    """h += y with h also saved as skip: traced, h += y becomes h = h + y and skip misses the change."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        skip = h
        h += self.b(h)
        return self.fc((h + skip).mean(dim=(2, 3)))


class _GatedAliasedAdd(_AliasedAdd):
    """The same aliasing, but y is 0 on dark images: only the later, bright ones tell."""

    def forward(self, x):
        h = self.a(x)
        skip = h
        h += torch.relu(x[:, :1].mean(dim=(1, 2, 3)) - 0.3)[:, None, None, None]
        return self.fc((h + skip).mean(dim=(2, 3)))


def _dark_first(n):
    data = ImageSet(n=n)
    data.images[:4] *= 0.1  # mean below 0.3: the gate is 0 on the first batch (the probe's image too)
    return data


@pytest.mark.parametrize("model_class, message", [
    (_BareInPlace, "writes in place into a tensor and never uses the result \\(call method 'relu_'\\)"),
    (_AliasedAdd, "traced with torch.fx does not compute what model.forward does"),
    (_GatedAliasedAdd, "does not compute what model.forward does .* among ids 4-7")])
def test_a_forward_that_tracing_changes_is_refused(model_class, message):
    # (the bare in-place op acts on some images only in practice, e.g. a clamp_: refused from the graph,
    # and every batch is checked against model.forward, not only the first image)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=message):
        abl.ablation_drops(model_class().eval(), _dark_first(8), "a", batch_size=4, progress=False)


class _MixesTheBatch(nn.Module):
    """The rest of the forward subtracts the batch's mean (like F.batch_norm with training=True): replicas
    of several masks in one run would change each other's logits."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, 4)

    def forward(self, x):
        z = self.a(x).mean(dim=(2, 3))
        return self.fc(z - z.mean(dim=0))


class _InfiniteLogit(nn.Module):
    """+inf for class 0 on the bright images: an ordinary value (SPEC.md section 1), not a refusal."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, 3)

    def forward(self, x):
        z = self.fc(torch.relu(self.a(x)).mean(dim=(2, 3)))
        big = torch.where(x[:, 0].mean(dim=(1, 2)) > 0.5, float("inf"), 0.0)
        return z + torch.stack([big, torch.zeros_like(big), torch.zeros_like(big)], dim=1)


class _Poison(nn.Module):
    def forward(self, h, x):
        return h + torch.where(x[:, 0, 0, 0] == 0.25, float("nan"), 0.0)[:, None, None, None]


class _NaNOnImage(nn.Module):
    """NaN from module p on, on image 5 only."""

    def __init__(self):
        super().__init__()
        self.a, self.p, self.fc = nn.Conv2d(3, 6, 3), _Poison(), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.p(self.a(x), x).mean(dim=(2, 3)))


def test_infinite_logits_count_and_nan_is_named():
    torch.manual_seed(4)
    model, data = _InfiniteLogit().eval(), ImageSet(n=8, classes=3)
    data.images[::2] = data.images[::2] * 0.5 + 0.5  # bright: +inf for class 0, on image 0 too
    result = abl.ablation_drops(model, data, "a", batch_size=4, progress=False)
    assert_equal_to_naive(result, model, data, "a", 4)
    data.images[5, 0, 0, 0] = 0.25
    with pytest.raises(ValueError, match=r"NaN activation in layer 'p': unit\(s\) \[0, 1, 2, 3, 4, 5\] on image "
                                         r"id\(s\) \[5\]"):
        abl.ablation_drops(_NaNOnImage().eval(), data, "p", batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"the model's outputs hold NaN for image id\(s\) \[5\]"):
        abl.ablation_drops(_NaNOnImage().eval(), data, "a", batch_size=4, progress=False)


class _BatchStatistics(nn.Module):
    """A BatchNorm without running statistics after the cut: it normalises by its batch even in eval."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.norm = nn.BatchNorm2d(6, track_running_stats=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.norm(self.a(x)).mean(dim=(2, 3)))


def test_batch_statistics_after_the_cut_keep_the_naive_counts():
    torch.manual_seed(1)
    model, data = _BatchStatistics().eval(), ImageSet(n=10)
    masks = torch.eye(6, dtype=torch.bool)
    result = abl.ablation_drops(model, data, "a", masks=masks, batch_size=5, progress=False)
    intact, correct, _ = abl.naive_ablation_counts(model, data, "a", masks, batch_size=5)
    assert torch.equal(result.intact_correct, intact) and torch.equal(result.correct, correct)
    assert result.stats["path"] == "general" and result.stats["masks_per_batch"] == 1


def test_weight_l1_of_a_pooling_layer_is_the_conv_before_it():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval()
    result = abl.ablation_drops(model, ImageSet(n=6), "2", progress=False)
    torch.testing.assert_close(result.weight_l1, model[0].weight.detach().double().abs().sum(dim=(1, 2, 3)))


class _MeanOverChannels(nn.Module):
    """flatten(2).mean(-2) on a [B, C, L] map averages the channels (C = L = 4 here): not a read-out."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 4, 15), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.a(x).flatten(2).mean(-2))


def test_a_mean_over_dim_minus_two_of_a_flat_map_is_not_a_read_out():
    torch.manual_seed(2)
    model, data = _MeanOverChannels().eval(), ImageSet(n=12)
    result = abl.ablation_drops(model, data, "a", progress=False)
    masks = torch.eye(4, dtype=torch.bool)
    intact, correct, _ = abl.naive_ablation_counts(model, data, "a", masks)
    assert result.stats["path"] == "general"
    assert torch.equal(result.intact_correct, intact) and torch.equal(result.correct, correct)


class _KeywordFlag(nn.Module):
    """forward(x, return_features=False): a branch on a keyword that the engine never passes."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, 4)

    def forward(self, x, return_features: bool = False):
        f = torch.relu(self.a(x)).mean(dim=(2, 3))
        return (self.fc(f), f) if return_features else self.fc(f)


class _AuxiliaryScalar(_KeywordFlag):
    """A dict output with an extra scalar entry from the input: only 'logits' is the rest of the forward."""

    def forward(self, x):
        return {"logits": self.fc(torch.relu(self.a(x)).mean(dim=(2, 3))), "energy": x.pow(2).mean()}


class _ShapeScale(_KeywordFlag):
    """A Python float from the input's shape (operator.truediv) used after the cut."""

    def forward(self, x):
        return self.fc(torch.relu(self.a(x)).mean(dim=(2, 3)) * (x.shape[-1] / 8))


@pytest.mark.parametrize("model_class", [_KeywordFlag, _AuxiliaryScalar, _ShapeScale])
def test_valid_forwards_that_were_refused(model_class):
    torch.manual_seed(5)
    model, data = model_class().eval(), ImageSet(n=6)
    result = abl.ablation_drops(model, data, "a", batch_size=3, progress=False)
    assert_equal_to_naive(result, model, data, "a", 3)


class _AliasedBeforeTheLayer(nn.Module):
    """h += b(h) with h saved as skip before the layer: the traced prefix gives the layer another input."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.layer = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        skip = h
        h += 3.0 * self.b(h)[:, :, :1, :1]
        return self.fc(self.layer(skip).mean(dim=(2, 3)))


def test_mean_mode_takes_the_means_of_model_forward():
    torch.manual_seed(6)
    model, data = _AliasedBeforeTheLayer().eval(), ImageSet(n=6)
    outputs = []
    handle = model.layer.register_forward_hook(lambda _m, _i, out: outputs.append(out.double().mean(dim=(2, 3))))
    with torch.no_grad():
        model(data.images)
    handle.remove()
    result = abl.ablation_drops(model, data, "layer", mode="mean", batch_size=3, progress=False)
    torch.testing.assert_close(result.fill, torch.cat(outputs).mean(dim=0), rtol=1e-12, atol=1e-12)


def test_bfloat16_checks_are_bit_for_bit_on_cpu():
    # a tolerance of 64 bfloat16 rounding steps (half the logit scale) let this through (and the mixing of
    # test_a_rest_that_mixes_the_batch_keeps_the_naive_counts)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="does not compute what model.forward does"):
        abl.ablation_drops(_AliasedAdd().to(torch.bfloat16).eval(), _dark_first(8), "a", batch_size=4,
                           progress=False)


class _MixesTheBatchBlackFirst(nn.Module):
    """z - 0.7 z.mean(0) after a bias-free conv: on a black first image the layer output is the fill."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 6, 3, bias=False), nn.Linear(6, 4)

    def forward(self, x):
        z = torch.relu(self.a(x)).mean(dim=(2, 3))
        return self.fc(z - 0.7 * z.mean(dim=0))


class _BatchSumBranch(nn.Module):
    """A branch on the whole batch's sum (untraceable, so kept opaque): more rows, other branch."""

    def forward(self, h):
        return -h if h.abs().sum() > 3000.0 else 2.0 * h  # a batch of 4 images sums to ~1100


class _BranchesOnTheBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.branch, self.fc = nn.Conv2d(3, 6, 3), _BatchSumBranch(), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.branch(self.a(x))).mean(dim=(2, 3)))


# (bfloat16: a tolerance of 64 of its rounding steps, half the logit scale, let the mixing through)
@pytest.mark.parametrize("model_class, dtype", [(_MixesTheBatch, torch.float32), (_MixesTheBatch, torch.bfloat16),
                                                (_MixesTheBatchBlackFirst, torch.float32),
                                                (_BranchesOnTheBatch, torch.float32)])
def test_a_rest_that_mixes_the_batch_keeps_the_naive_counts(model_class, dtype):
    # mixing measured on real batches at the run size (a probe of image 0 intact and fully ablated missed it
    # where image 0's layer output is the fill, and where it shows only with more rows)
    torch.manual_seed(7)
    model, data = model_class().to(dtype).eval(), ImageSet(n=12)
    data.images[0] = 0.0
    with torch.no_grad():
        data.labels = model(data.images.to(dtype)).argmax(dim=1)
    result = abl.ablation_drops(model, data, "a", batch_size=4, masks_per_batch=6, progress=False)
    assert_equal_to_naive(result, model, data, "a", 4)
    assert result.stats["masks_per_batch"] == 1


class _AliasedOnlyUnderAblation(nn.Module):
    """h += g on a tensor saved as skip, with g = 0 while unit 0 (a constant 3) is intact."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 4)
        with torch.no_grad():
            self.a.weight[0], self.a.bias[0] = 0.0, 3.0
            self.b.weight[:, 0] = 0.0

    def forward(self, x):
        r = torch.relu(self.a(x))
        h = self.b(r)
        skip = h
        h += torch.relu(1.0 - r.amax(dim=1, keepdim=True))
        return self.fc((h + skip).mean(dim=(2, 3)))


def test_a_forward_that_tracing_changes_only_under_ablation_is_refused():
    torch.manual_seed(8)
    with pytest.raises(ValueError, match=r"under ablation \(set 0, unit\(s\) \[0\]\).*naive_ablation_counts"):
        abl.ablation_drops(_AliasedOnlyUnderAblation().eval(), ImageSet(n=8), "a", batch_size=4, progress=False)


class _Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).transpose(2, 3)


class _SumsInTwoOrders(nn.Module):
    """A permuted layer output summed in its own layout and over a contiguous copy: the two logits
    differ by rounding, by image, only in the layout the naive hook's clone keeps."""

    def __init__(self):
        super().__init__()
        self.layer = _Transposed()

    def forward(self, x):
        p = self.layer(x)[:, 0]
        return torch.stack([p.sum(dim=(1, 2)), p.contiguous().sum(dim=(1, 2))], dim=1)


def test_a_permuted_layer_output_keeps_its_strides_in_the_replicas():
    torch.manual_seed(0)
    model, data = _SumsInTwoOrders().eval(), ImageSet(n=32, size=24, classes=2)
    data.labels = torch.ones(32, dtype=torch.int64)
    masks = torch.tensor([[False, False, True, False], [False, False, True, True]])
    result = abl.ablation_drops(model, data, "layer", masks=masks, batch_size=16, progress=False)
    correct = assert_equal_to_naive(result, model, data, "layer", 16)
    assert correct.sum() > 0


def test_naive_ablation_counts_checks_its_arguments():
    """masks of the wrong width, a fill of the wrong length and labels past the outputs raised torch's
    IndexError; float masks were cast (0.5 ablating the unit)."""
    model, data = calibrated("vgg")
    channels = abl.ablation_drops(model, data, "features.3", units=[0], progress=False).masks.shape[1]
    with pytest.raises(ValueError, match=f"has {channels} units: masks must be \\[S, {channels}\\]"):
        abl.naive_ablation_counts(model, data, "features.3", torch.ones(1, channels - 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"fill \[2\]"):
        abl.naive_ablation_counts(model, data, "features.3", torch.eye(channels, dtype=torch.bool)[:1],
                                  fill=[1.0, 2.0])
    with pytest.raises(TypeError, match="bool tensor"):
        abl.naive_ablation_counts(model, data, "features.3", torch.full((1, channels), 0.5))
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 4\)"):
        abl.naive_ablation_counts(model, ImageSet(n=12, size=16, classes=9), "features.3",
                                  torch.eye(channels, dtype=torch.bool)[:1])


def test_a_model_that_cannot_run_on_the_images_says_so():
    """Indexing runs the model only up to its deepest layer, so an index can be made at a size the whole
    model does not take; ablation then failed with torch's 'mat1 and mat2 shapes cannot be multiplied'."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 4)).eval()
    with pytest.raises(ValueError, match=r"whole forward fails on the dataset's images, \(3, 20, 20\).*mat1.*--size"):
        abl.ablation_drops(model, ImageSet(n=4, size=20, classes=4), "0", progress=False)
    assert abl.ablation_drops(model, ImageSet(n=4, size=16, classes=4), "0", progress=False).masks.shape == (4, 4)
