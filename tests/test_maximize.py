"""Activation maximisation (batched) and the dual objective of "The Mind's Eye" (SPEC.md section 7)."""

import numpy as np
import pytest
import torch
from torch import nn

import neuroidx_fast.maximization as mx
import neuroidx_fast.unit_objective as uo
from neuroidx_fast.image_param import (ImageParam, RandomTransforms, color_matrix, color_matrix_from_images,
                                      total_variation)

SIZE = 32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_net(seed=0, batchnorm=False):
    """conv1 (8 units; unit 0 a planted red detector: +R, -G, -B on every tap) -> ReLU -> pool -> conv2
    (16 units) -> ReLU -> GAP -> fc (4 logits). conv1's biases are positive so that no unit of conv2 starts
    dead on a gray image."""
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("conv1", nn.Conv2d(3, 8, 3, padding=1))
    if batchnorm:
        m.add_module("bn1", nn.BatchNorm2d(8))
    m.add_module("relu1", nn.ReLU())
    m.add_module("pool1", nn.MaxPool2d(2))
    m.add_module("conv2", nn.Conv2d(8, 16, 3, padding=1))
    m.add_module("relu2", nn.ReLU())
    m.add_module("gap", nn.AdaptiveAvgPool2d(1))
    m.add_module("flat", nn.Flatten())
    m.add_module("fc", nn.Linear(16, 4))
    with torch.no_grad():
        m.conv1.bias.uniform_(0.1, 0.3)
        m.conv1.weight[0] = 0
        m.conv1.weight[0, 0] = 1 / 9
        m.conv1.weight[0, 1:] = -0.5 / 9
        m.conv1.bias[0] = 0
        if batchnorm:
            m.bn1.running_mean.uniform_(-0.1, 0.1)
            m.bn1.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def net():
    return tiny_net()


@pytest.fixture(scope="module")
def noise():
    return torch.rand(48, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def dataset_stats(model, layer, images, units, objective):
    acts = torch.stack([mx.unit_activations(model, layer, images, u, objective=objective) for u in units])
    return acts.mean(1), acts.amax(1)


# ---------------------------------------------------------------------------------------------- maximize
def test_linear_units_approach_their_optimum_and_red_detector_goes_red(net, noise):
    units = list(range(8))
    start = mx.maximize(net, "conv1", units, size=SIZE, steps=0)
    images = mx.maximize(net, "conv1", units, size=SIZE, steps=40)
    assert images.shape == (8, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    a0 = mx.unit_activations(net, "conv1", start, units)
    a1 = mx.unit_activations(net, "conv1", images, units)
    # A conv1 unit is linear in the image: its mean is best for the image whose channel c is 1 where the
    # filter's channel c sums positive, 0 elsewhere.
    best_image = (net.conv1.weight.sum(dim=(2, 3)) > 0).float()[:, :, None, None].expand(-1, -1, SIZE, SIZE)
    best = mx.unit_activations(net, "conv1", best_image, units)
    data_mean, _ = dataset_stats(net, "conv1", noise, units, "mean")
    assert ((best - a0) > 0.05).all()
    assert ((a1 - a0) >= 0.4 * (best - a0)).all(), (a0, a1, best)
    assert ((a1 - data_mean) >= 0.4 * (best - data_mean)).all(), (data_mean, a1, best)
    r, g, b = images[0].mean(dim=(1, 2))
    assert r > g + 0.3 and r > b + 0.3, (r, g, b)
    assert start[0].mean(dim=(1, 2)).std() < 0.02  # it started gray


@pytest.mark.parametrize("param", ["fourier", "pixel"])
def test_deep_units_driven_above_start_and_dataset(net, noise, param):
    units = list(range(16))
    start = mx.maximize(net, "conv2", units, size=SIZE, steps=0, param=param, objective="center")
    images = mx.maximize(net, "conv2", units, size=SIZE, steps=60, param=param, objective="center")
    a0 = mx.unit_activations(net, "conv2", start, units, objective="center")
    a1 = mx.unit_activations(net, "conv2", images, units, objective="center")
    data_mean, data_max = dataset_stats(net, "conv2", noise, units, "center")
    assert (a1 > a0 + 0.03).all(), (a0, a1)
    assert (a1 > data_mean + 0.08).all(), (data_mean, a1)
    assert (a1 > data_max).float().mean() >= 0.75, (data_max, a1)


def test_mean_objective_and_two_dimensional_layer(net):
    a0 = mx.unit_activations(net, "fc", mx.maximize(net, "fc", [0, 1, 2, 3], size=SIZE, steps=0), [0, 1, 2, 3])
    images = mx.maximize(net, "fc", [0, 1, 2, 3], size=SIZE, steps=40, transforms=None)
    a1 = mx.unit_activations(net, "fc", images, [0, 1, 2, 3])
    assert (a1 > a0 + 0.02).all(), (a0, a1)


def test_regularisers_do_their_job(net):
    kw = dict(size=SIZE, steps=30, param="pixel", transforms=None)
    free = mx.maximize(net, "conv2", [1, 3], **kw)
    smooth = mx.maximize(net, "conv2", [1, 3], tv=5.0, **kw)
    gray = mx.maximize(net, "conv2", [1, 3], l2=50.0, **kw)
    blurred = mx.maximize(net, "conv2", [1, 3], blur_every=2, blur_sigma=1.0, **kw)
    assert (total_variation(smooth) < 0.7 * total_variation(free)).all()
    assert (total_variation(blurred) < 0.7 * total_variation(free)).all()
    dev = lambda x: (x - 0.5).abs().flatten(1).mean(1)  # noqa: E731
    assert (dev(gray) < 0.7 * dev(free)).all()


def test_deterministic_and_independent_of_the_batch(net):
    kw = dict(size=SIZE, steps=25, objective="center")
    a = mx.maximize(net, "conv2", [0, 2, 5, 7], **kw)
    b = mx.maximize(net, "conv2", [0, 2, 5, 7], **kw)
    assert torch.equal(a, b)
    other = mx.maximize(net, "conv2", [0, 2, 5, 7], seed=1, **kw)
    assert (a - other).abs().max() > 1e-2
    # An image depends on its own unit and seed only; other units in the batch change the float rounding
    # of the convolutions at most (a few pixels may drift where a ReLU or max-pool switches over).
    alone = mx.maximize(net, "conv2", [5], **kw)
    assert (alone[0] - a[2]).abs().mean() < 1e-3
    chunked = mx.maximize(net, "conv2", [0, 2, 5, 7], batch_size=3, **kw)
    assert ((chunked - a).abs().flatten(1).mean(1) < 1e-3).all()
    assert (alone[0] - a[0]).abs().mean() > 1e-2  # while another unit's image is far away


def test_progress_counts_every_step_of_every_batch(net, capsys):
    quiet = mx.maximize(net, "conv2", [0, 2, 5], size=SIZE, steps=3, batch_size=2)
    assert capsys.readouterr().err == ""
    shown = mx.maximize(net, "conv2", [0, 2, 5], size=SIZE, steps=3, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "maximize conv2" in err and "6/6" in err
    assert torch.equal(quiet, shown)


def test_image_optimiser_is_fused_adam_with_the_plain_update():
    start = torch.randn(4, 3, 8, 5, 2)
    grads = [torch.randn_like(start) for _ in range(3)]
    params = {}
    for name, make in (("fused", lambda p: mx._adam(p, 0.05)), ("plain", lambda p: torch.optim.Adam([p], lr=0.05))):
        p = start.clone().requires_grad_(True)
        optimiser = make(p)
        for g in grads:
            p.grad = g.clone()
            optimiser.step()
        params[name] = p.detach()
        if name == "fused":
            assert optimiser.defaults["fused"] is True  # the one-kernel step (5x faster on the CPU at batch 64)
    torch.testing.assert_close(params["fused"], params["plain"], rtol=1e-6, atol=1e-6)
    assert (params["fused"] - start).abs().max() > 0.1  # the steps did move the parameters


def test_preprocess_is_applied_before_the_model(net):
    swap = lambda x: x[:, [2, 1, 0]]  # noqa: E731  the model sees BGR: the red detector wants blue
    images = mx.maximize(net, "conv1", [0], size=SIZE, steps=40, preprocess=swap)
    r, g, b = images[0].mean(dim=(1, 2))
    assert b > r + 0.3 and b > g + 0.3, (r, g, b)


class ViewFlattenNet(nn.Module):
    """LeNet / AlexNet style: conv -> ReLU -> pool -> ``x.view(x.size(0), -1)`` -> fc1 -> ReLU -> fc2. The
    ``view`` needs contiguous activations: it raises on a channels-last batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(8 * 8 * 8, 10), nn.Linear(10, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_models_that_flatten_with_view_take_batches_of_several_images():
    model = ViewFlattenNet().eval()
    images = mx.maximize(model, "fc1", [0, 1, 2], size=16, steps=4)
    alone = torch.cat([mx.maximize(model, "fc1", [u], size=16, steps=4) for u in (0, 1, 2)])
    torch.testing.assert_close(images, alone, rtol=0, atol=1e-4)
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        direct = model.fc1(model.pool(torch.relu(model.conv1(x))).reshape(5, -1))
    torch.testing.assert_close(mx.unit_activations(model, "fc1", x, [0, 1, 2, 3, 4]), direct[range(5), range(5)])
    assert mx.maximize_towards(model, "fc2", x, clusters=2, steps=2).shape == (2, 3, 16, 16)


def test_channels_last_batches_only_where_the_model_runs_them(net):
    pixels = torch.rand(2, 3, 16, 16)
    for model, layer, runs in ((net, "conv2", True), (ViewFlattenNet().eval(), "fc1", False)):
        with mx.frozen_eval(model, torch.device("cpu")), \
                uo.UnitObjective(model, layer, "mean", (16, 16), torch.float32, "cpu") as readout:
            assert readout.channels_last is runs
            x = readout.model_input(pixels)
            assert x.is_contiguous(memory_format=torch.channels_last) is runs and x.is_contiguous() is not runs
            assert readout.model_input(pixels[:1]).is_contiguous()  # one image: no layout change


def gray_net():
    """tiny_net for one-channel (grayscale) inputs."""
    torch.manual_seed(0)
    m = tiny_net()
    m.conv1 = nn.Conv2d(1, 8, 3, padding=1)
    return m.eval()


def test_a_preprocess_that_changes_the_channels_is_used_from_the_first_forward():
    # A grayscale model fed through preprocess=RGB->gray: the layer probe must take that path too.
    model = gray_net()
    to_gray = lambda x: x.mean(1, keepdim=True)  # noqa: E731
    images = mx.maximize(model, "conv2", [0, 1], size=16, steps=3, preprocess=to_gray)
    assert images.shape == (2, 3, 16, 16)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        direct = model.conv2(model.pool1(model.relu1(model.conv1(to_gray(x))))).mean(dim=(2, 3))[:, 0]
    torch.testing.assert_close(mx.unit_activations(model, "conv2", x, 0, preprocess=to_gray), direct)
    assert mx.maximize_towards(model, "conv2", x, steps=2, preprocess=to_gray).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="cannot run on 16x16 images after preprocess=.*preprocess that turns"):
        mx.maximize(model, "conv2", [0], size=16, steps=1, preprocess=lambda x: x)


def test_model_state_restored_and_eval_mode_used():
    model = tiny_net(batchnorm=True)
    reference = mx.maximize(model, "conv2", [1, 4], size=SIZE, steps=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.conv1.weight.requires_grad_(False)
    model.fc.training = False
    trained = mx.maximize(model, "conv2", [1, 4], size=SIZE, steps=10)
    assert torch.equal(trained, reference)  # BatchNorm used its running statistics (eval mode)
    assert model.training and model.bn1.training and not model.fc.training
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_module_preprocess_is_frozen_in_eval_mode_like_the_model(net):
    # It was left as it came: a Dropout in train mode made runs differ, gradients piled up in its weights
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5)).train()
    pre[0].bias.requires_grad_(False)
    kw = dict(size=16, steps=3, transforms=None, preprocess=pre)
    images = mx.maximize(net, "conv2", [0, 1], **kw)
    assert torch.equal(images, mx.maximize(net, "conv2", [0, 1], **kw))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mx.unit_activations(net, "conv2", x, 0, preprocess=pre),
                       mx.unit_activations(net, "conv2", x, 0, preprocess=pre))
    assert torch.equal(mx.maximize_towards(net, "relu2", x, steps=2, preprocess=pre),
                       mx.maximize_towards(net, "relu2", x, steps=2, preprocess=pre))
    assert pre[0].weight.grad is None
    with pytest.raises(ValueError, match="out of range"):  # restored after an error too
        mx.maximize(net, "conv2", [99], **kw)
    assert pre.training and pre[1].training and pre[0].weight.requires_grad and not pre[0].bias.requires_grad


def test_runs_inside_inference_mode_as_outside(net):
    # torch.enable_grad does not leave inference mode: every step failed with "element 0 of tensors does
    # not require grad". Images made inside the block are inference tensors, which autograd cannot save.
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    want = (mx.maximize(net, "conv2", [0, 5], size=16, steps=2), mx.unit_activations(net, "relu2", x, 1),
            mx.maximize_towards(net, "relu2", x, clusters=2, steps=2))
    with torch.inference_mode():
        images = x.clone()
        assert images.is_inference()
        got = (mx.maximize(net, "conv2", [0, 5], size=16, steps=2), mx.unit_activations(net, "relu2", images, 1),
               mx.maximize_towards(net, "relu2", images, clusters=2, steps=2))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not any(p.requires_grad is False for p in net.parameters())  # restored


def test_moving_the_model_inside_inference_mode_keeps_its_parameters_for_autograd():
    # model.to(device) inside inference mode made inference tensors of them, which no backward may save
    # (the meta device stands for a GPU here: any move shows it)
    model = nn.Conv2d(3, 3, 1)
    with torch.inference_mode():
        assert mx.model_device(model, "meta") == torch.device("meta")
    assert model.weight.device.type == "meta" and not model.weight.is_inference()


def test_nan_activations_are_an_error_naming_the_layer_units_images_and_step():
    # maximize returned all-NaN images, unit_activations NaN values, maximize_towards NaN images (or
    # scikit-learn's "Input X contains NaN", naming neither layer nor unit)
    model = tiny_net()
    with torch.no_grad():
        model.conv2.weight[3, 0, 0, 0] = float("nan")  # unit 3 of conv2 is NaN on every image
    kw = dict(size=16, steps=3)
    for layer in ("conv2", "relu2"):  # the shortcut and the layer's output
        with pytest.raises(ValueError, match=rf"NaN in the objective of layer '{layer}' for unit\(s\) \[3, 3\] at "
                                             r"step 1 of 3: .*NaN weights"):
            mx.maximize(model, layer, [0, 3, 5, 3], **kw)
    with pytest.raises(ValueError, match=r"layer 'fc' for unit\(s\) \[0\] at step 1 of 3"):
        mx.maximize(model, "fc", [0], **kw)
    # a healthy unit of the shortcut is the same as in the model without NaN (its G has only its weights)
    assert torch.equal(mx.maximize(model, "conv2", [0, 5], **kw), mx.maximize(tiny_net(), "conv2", [0, 5], **kw))
    # through relu2 the backward of conv2 mixes its channels (0 * NaN): a finite objective, a NaN image
    with pytest.raises(ValueError, match=r"NaN in the gradient to the image of unit\(s\) \[0\] of layer 'relu2' at "
                                         r"step 1 of 3, though the objective was finite"):
        mx.maximize(model, "relu2", [0], **kw)
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"NaN activations of layer 'relu2' on image\(s\) \[1, 4\] \(unit\(s\) \[3\]\)"):
        mx.unit_activations(model, "relu2", x, [0, 3, 2, 2, 3, 5])
    for clusters in (1, 2):
        with pytest.raises(ValueError, match=r"NaN or infinite features of layer 'relu2' on image\(s\) \[5, 0, 2\] "
                                             r"\(channel\(s\) \[3\]\)"):
            mx.maximize_towards(model, "relu2", x, ids=[5, 0, 2], clusters=clusters, steps=2)


def test_numeric_strings_are_refused_naming_the_argument(net):
    # float("0.05") passed the check, then the string itself reached Adam or the loss: raw TypeErrors
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for label, value in (("lr", "0.05"), ("l2", "0.1"), ("tv", "0"), ("blur_sigma", b"1")):
        with pytest.raises(ValueError, match=f"{label} must be a (positive|non-negative) number, got {value!r}"):
            mx.maximize(net, "conv2", [0], size=16, steps=1, **{label: value})
    for label, value in (("l1", "0.1"), ("activation_weight", "1"), ("charbonnier_eps", "1e-3")):
        with pytest.raises(ValueError, match=f"{label} must be a (positive|non-negative) number, got {value!r}"):
            mx.maximize_towards(net, "conv2", x, steps=1, **{label: value})
    assert mx._positive("lr", np.float32(0.5)) == 0.5 and type(mx._positive("lr", torch.tensor(2))) is int


def test_a_model_built_inside_inference_mode_is_refused_by_name_and_left_as_it_came(net):
    # Its parameters are inference tensors: the restore's own error ("Setting requires_grad=True on
    # inference tensor") hid the cause and left every parameter frozen. A forward alone (unit_activations)
    # can use them, and does.
    with torch.inference_mode():
        built = tiny_net()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mx.unit_activations(built, "relu2", x, 1), mx.unit_activations(net, "relu2", x, 1))
    assert all(p.requires_grad for p in built.parameters())
    for run in (lambda: mx.maximize(built, "conv2", [0], size=16, steps=2),
                lambda: mx.maximize_towards(built, "relu2", x, steps=2)):
        with pytest.raises(ValueError, match=r"model's parameters are inference tensors \('conv1.weight'.*outside "
                                             r"torch.inference_mode\(\)"):
            run()
        assert all(p.requires_grad for p in built.parameters())


class _CachedBias(nn.Module):
    """A conv after an additive bias buffer made on its first call (e.g. a serving warm-up under
    inference_mode): the backward saves nothing of it, so the buffer may be an inference tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if not hasattr(self, "pos"):
            self.register_buffer("pos", torch.linspace(0, 1, x.shape[-1]).expand(x.shape[-2], -1).clone())
        return self.conv(x + self.pos)


def test_an_inference_buffer_the_backward_does_not_save_is_no_reason_to_refuse():
    model = _CachedBias().eval()
    with torch.inference_mode():
        model(torch.rand(1, 3, 16, 16))
    assert model.pos.is_inference()
    images = mx.maximize(model, "conv", [0, 1], size=16, steps=3)
    assert images.shape == (2, 3, 16, 16) and bool(torch.isfinite(images).all())


def test_colour_matrix_from_images_refuses_non_finite_pixels():
    images = torch.rand(1, 3, 2, 2)
    images[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN or infinite pixel value\(s\)"):  # (eigh failed to converge)
        color_matrix_from_images(images)
    with pytest.raises(ValueError, match=r"at least 2 pixels, got images \(1, 3, 0, 4\) \(0 pixel\(s\)\)"):
        color_matrix_from_images(torch.rand(1, 3, 0, 4))


def test_errors(net):
    with pytest.raises(ValueError, match="unknown layer 'conv3'.*conv"):
        mx.maximize(net, "conv3", [0], size=SIZE, steps=1)
    with pytest.raises(ValueError, match=r"out of range: layer 'conv1' has 8 units"):
        mx.maximize(net, "conv1", [3, 8], size=SIZE, steps=1)
    with pytest.raises(ValueError, match="no units"):
        mx.maximize(net, "conv1", [], size=SIZE, steps=1)
    with pytest.raises(ValueError, match="param"):
        mx.maximize(net, "conv1", [0], size=SIZE, steps=1, param="wavelet")
    with pytest.raises(ValueError, match="objective"):
        mx.maximize(net, "conv1", [0], size=SIZE, steps=1, objective="max")
    with pytest.raises(ValueError, match="size"):
        mx.maximize(net, "conv1", [0], size=0, steps=1)
    with pytest.raises(ValueError, match="cannot run on 2x2"):
        mx.maximize(nn.Sequential(nn.Conv2d(3, 4, 5)), "0", [0], size=2, steps=1)
    for bad in ([1.5], 1.5, [True], "conv1"):
        with pytest.raises(ValueError, match="units must be ints"):
            mx.maximize(net, "conv1", bad, size=SIZE, steps=1)
    with pytest.raises(ValueError, match="seed must be an int, got None"):
        mx.maximize(net, "conv1", [0], size=SIZE, steps=1, seed=None)
    with pytest.raises(ValueError, match="steps must be a non-negative int, got 1.5"):
        mx.maximize(net, "conv1", [0], size=SIZE, steps=1.5)
    # NumPy integers (and 0-d integer tensors) are integers
    want = mx.maximize(net, "conv1", [0, 3], size=SIZE, steps=2, seed=1)
    got = mx.maximize(net, "conv1", np.array([0, 3]), size=SIZE, steps=np.int64(2), seed=np.int32(1))
    assert torch.equal(got, want)
    assert torch.equal(mx.maximize(net, "conv1", torch.tensor(3), size=SIZE, steps=2, seed=1), want[1:])
    # ... for the size too
    for size in (np.int64(SIZE), (np.int64(SIZE), SIZE), torch.tensor(SIZE), torch.Size([SIZE, SIZE])):
        assert torch.equal(mx.maximize(net, "conv1", [0, 3], size=size, steps=2, seed=1), want)
    for bad in (True, 16.0, (16, True), (16, 0), (16,), (16, 16, 16), "16", torch.tensor([16, 16])):
        with pytest.raises(ValueError, match="size must be a positive int or a pair"):
            mx.maximize(net, "conv1", [0], size=bad, steps=1)


def test_parametrisations_round_trip_and_colour_matrix():
    m = color_matrix()
    assert torch.allclose(m, m.T) and torch.allclose(m.norm(dim=0), torch.ones(3), atol=1e-6)
    images = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.05
    for kind in ("fourier", "pixel"):
        assert torch.allclose(ImageParam.from_images(kind, images).image(), images, atol=1e-5)
    for method in ("sample", "fft"):  # identity draws give the image back
        warp = RandomTransforms([0, 1], steps=3, size=(20, 24), degrees=0.0, scale=0.0, jitter=0, method=method)
        assert torch.allclose(warp(images, 0), images, atol=1e-5)


def test_colour_matrix_from_images_needs_two_pixels():
    # the covariance of a single 1x1 image was NaN, and eigh then failed to converge
    with pytest.raises(ValueError, match=r"at least 2 pixels, got images \(1, 3, 1, 1\) \(1 pixel.*color_matrix\(\)"):
        color_matrix_from_images(torch.rand(1, 3, 1, 1))
    two = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])[:, :, None, None]  # gray pixels: luminance only
    assert torch.allclose(color_matrix_from_images(two), torch.full((3, 3), 3 ** -0.5), atol=1e-4)


def test_the_two_warps_agree():
    # The CPU warp (grid_sample) and the deterministic CUDA one (FFT shears + resampling matrices) are the
    # same geometric transform: on a smooth image they differ far less than the warp changes the image.
    n = 40
    y, x = torch.meshgrid(torch.arange(n) - 19.5, torch.arange(n) - 19.5, indexing="ij")
    blob = lambda cy, cx, s: torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / s)  # noqa: E731
    image = torch.stack([0.5 + 0.4 * blob(5, 8, 30), 0.5 + 0.4 * blob(-6, 2, 40), 0.5 - 0.3 * blob(1, -9, 30)])
    images = image[None].repeat(4, 1, 1, 1)
    sample = RandomTransforms([0, 1, 2, 3], 4, (n, n), method="sample")
    fft = RandomTransforms([0, 1, 2, 3], 4, (n, n), method="fft")
    for step in range(4):
        a, b = sample(images, step), fft(images, step)
        moved = (a - images).abs().flatten(1).mean(1)
        assert (moved > 1e-3).all()
        assert ((a - b).abs().flatten(1).mean(1) < 0.15 * moved).all()


def test_save_maximized(tmp_path, net):
    from PIL import Image

    images = mx.maximize(net, "conv1", [0, 1, 2], size=16, steps=2)
    plain = mx.save_maximized(images, tmp_path / "grid.png", ncols=3)
    assert Image.open(plain).size == (3 * 16 + 2 * 2, 16)
    titled = mx.save_maximized(images, tmp_path / "titled.png", titles=["unit 0", "unit 1", "unit 2"], scale=2)
    width, height = Image.open(titled).size
    assert height > 32 and width >= 2 * 32
    with pytest.raises(ValueError, match="2 titles for 3 images"):
        mx.save_maximized(images, tmp_path / "bad.png", titles=["a", "b"])
    broken = images.clone()
    broken[1, 0, 2, 3] = float("nan")  # a NaN image was written as a PNG
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] hold NaN"):
        mx.save_maximized(broken, tmp_path / "nan.png")
    assert not (tmp_path / "nan.png").exists()


# ---------------------------------------------------------------------------------------------- dual objective
@pytest.fixture(scope="module")
def two_groups():
    g = torch.Generator().manual_seed(0)
    red = torch.rand(8, 3, SIZE, SIZE, generator=g) * torch.tensor([1.0, 0.3, 0.3])[:, None, None]
    green = torch.rand(8, 3, SIZE, SIZE, generator=g) * torch.tensor([0.3, 1.0, 0.3])[:, None, None]
    return torch.cat([red, green])


def test_towards_reduces_the_distance_to_each_cluster_target(net, two_groups):
    images, info = mx.maximize_towards(net, "conv2", two_groups, clusters=2, top_channels=8, steps=40,
                                       return_targets=True)
    assert images.shape == (2, 3, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1
    labels = info.labels
    assert len(set(labels[:8].tolist())) == 1 and len(set(labels[8:].tolist())) == 1 and labels[0] != labels[8]
    sums = torch.zeros(2).index_add_(0, labels, info.weights)
    assert torch.allclose(sums, torch.ones(2), atol=1e-5)
    assert (info.distance_end < 0.5 * info.distance_start).all(), (info.distance_start, info.distance_end)
    assert (info.activation_end > info.activation_start).all()
    red = int(labels[0])
    for k, (strong, weak) in ((red, (0, 1)), (1 - red, (1, 0))):
        for im in (info.start[k], images[k]):
            means = im.mean(dim=(1, 2))
            assert means[strong] > means[weak] + 0.2  # each result keeps the colour of its cluster
    assert info.top_channels.shape == (2, 8)
    assert torch.equal(info.top_channels[:, 0], info.targets.argmax(1))


def test_towards_start_image_weights_and_ids(net, two_groups):
    dataset = [(im, i % 2) for i, im in enumerate(two_groups)]
    weights = torch.zeros(4)
    weights[2] = 1.0
    images = mx.maximize_towards(net, "conv2", dataset, ids=[1, 3, 9, 12], weights=weights, steps=0)
    assert torch.allclose(images[0], two_groups[9].clamp(1e-3, 1 - 1e-3), atol=1e-4)


def test_towards_ids_must_be_integer_indices(net, two_groups):
    # A cast to int64 read the mask [F, F, T, T] as the images [0, 0, 1, 1] and 2.7 as 2, with no error.
    mask = torch.tensor([False, False, True, True])
    for source in (two_groups[:4], list(two_groups[:4])):
        for bad in (mask, [True, True], [0.9, 2.7], torch.tensor([0.0, 2.0]), np.array([1.5]), 2.0):
            with pytest.raises(ValueError, match=r"ids must be integer item indices.*mask.nonzero\(\)"):
                mx.maximize_towards(net, "conv2", source, ids=bad, steps=0)
        want = mx.maximize_towards(net, "conv2", source, ids=[2, 3], steps=0)
        for good in (mask.nonzero().flatten(), np.array([2, 3]), (np.int64(2), 3), torch.tensor([[2], [3]])):
            assert torch.equal(mx.maximize_towards(net, "conv2", source, ids=good, steps=0), want)
        assert torch.equal(mx.maximize_towards(net, "conv2", source, ids=np.int64(3), steps=0),
                           mx.maximize_towards(net, "conv2", source, ids=[3], steps=0))


def test_towards_takes_every_int_seed_that_maximize_takes(net, two_groups):
    # scikit-learn's KMeans refused random_state -1 or 2**32 with its own parameter error
    labels = {seed: mx.maximize_towards(net, "conv2", two_groups, clusters=2, steps=0, seed=seed,
                                        return_targets=True)[1].labels for seed in (0, -1, 2 ** 32, 2 ** 40)}
    assert torch.equal(labels[2 ** 32], labels[0])  # (seeds are taken modulo 2**32 there)
    for got in labels.values():
        assert got[:8].unique().numel() == 1 and got[8:].unique().numel() == 1 and got[0] != got[8]


def test_a_list_mixing_uint8_and_float_images_is_refused_naming_the_dtypes(net, two_groups):
    # torch.stack made 0-255 floats of the uint8 ones: a misleading "pixel space [0, 1]" error
    floats = two_groups[:4]
    bytes_ = (floats * 255).round().to(torch.uint8)
    mixed = [floats[0], bytes_[1], floats[2], bytes_[3]]
    for call in (lambda images: mx.unit_activations(net, "conv2", images, 1),
                 lambda images: mx.maximize_towards(net, "conv2", images, steps=0)):
        with pytest.raises(ValueError, match=r"different dtypes \(torch.float32, torch.uint8\).*all uint8"):
            call(mixed)
        with pytest.raises(ValueError, match="different dtypes"):
            call([(im, 0) for im in mixed])
    assert torch.equal(mx.unit_activations(net, "conv2", list(bytes_), 1),
                       mx.unit_activations(net, "conv2", bytes_.float() / 255, 1))


def test_towards_errors(net, two_groups):
    with pytest.raises(ValueError, match="clusters=5 is more than the 4 images"):
        mx.maximize_towards(net, "conv2", two_groups[:4], clusters=5, steps=1)
    with pytest.raises(ValueError, match="empty"):
        mx.maximize_towards(net, "conv2", two_groups[:0], steps=1)
    with pytest.raises(ValueError, match="empty"):
        mx.maximize_towards(net, "conv2", [], steps=1)
    with pytest.raises(ValueError, match="weights"):
        mx.maximize_towards(net, "conv2", two_groups[:4], weights=[1, -1, 0, 0], steps=1)
    for weights in ("abcd", [[1, 2], [3]]):  # torch's own error named no fix
        with pytest.raises(ValueError, match="weights must be 4 finite non-negative numbers"):
            mx.maximize_towards(net, "conv2", two_groups[:4], weights=weights, steps=1)
    with pytest.raises(ValueError, match="unknown layer"):
        mx.maximize_towards(net, "conv9", two_groups[:4], steps=1)
    with pytest.raises(ValueError, match=r"pixel space \[0, 1\].*preprocess="):
        mx.maximize_towards(net, "conv2", (two_groups[:4] - 0.5) / 0.25, steps=1)
    broken = two_groups[:4].clone()
    broken[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"image\(s\) \[2\] of the set hold NaN"):
        mx.maximize_towards(net, "conv2", broken, steps=1)
    with pytest.raises(ValueError, match="clusters must be a positive int"):
        mx.maximize_towards(net, "conv2", two_groups[:4], clusters=1.0, steps=1)
    dead = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)  # never fires on [0, 1] images
    with pytest.raises(ValueError, match=r"features of '1' are all zero on the images of cluster\(s\) \[0\]"):
        mx.maximize_towards(dead, "1", two_groups[:4], steps=1)
    with pytest.raises(IndexError, match=r"image ids \[1, 9\] out of range: the image set has 4 items"):
        mx.maximize_towards(net, "conv2", two_groups[:4], ids=[1, 9], steps=1)
    with pytest.raises(ValueError, match="lr_decay"):
        mx.maximize_towards(net, "conv2", two_groups[:4], lr_decay="a", steps=1)
    with pytest.raises(ValueError, match=r"image\(s\) \[2\] of the set hold NaN"):
        mx.unit_activations(net, "conv2", broken, 0)
    with pytest.raises(ValueError, match=r"pixel space \[0, 1\]"):
        mx.unit_activations(net, "conv2", two_groups[:4] * 255, 0)
    for call in (lambda: mx.maximize_towards(lambda x: x, "conv2", two_groups[:4], steps=1),
                 lambda: mx.maximize(lambda x: x, "conv2", [0], size=SIZE, steps=1),
                 lambda: mx.unit_activations(lambda x: x, "conv2", two_groups[:4], 0)):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
            call()


@pytest.mark.gpu
def test_deterministic_on_gpu():
    model = tiny_net(batchnorm=True).cuda()
    kw = dict(size=SIZE, steps=30, objective="center", device="cuda")
    units = list(range(16))
    a = mx.maximize(model, "conv2", units, **kw)
    b = mx.maximize(model, "conv2", units, **kw)
    assert torch.equal(a, b)
    start = mx.maximize(model, "conv2", units, **dict(kw, steps=0))
    gain = (mx.unit_activations(model, "conv2", a, units, objective="center", device="cuda")
            - mx.unit_activations(model, "conv2", start, units, objective="center", device="cuda"))
    assert (gain > 0).all()
