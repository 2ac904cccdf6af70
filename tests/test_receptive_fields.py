"""Receptive fields: the analytic graph walk against the gradient probe (SPEC.md section 2)."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroidx_fast import receptive_field
from neuroidx_fast.models import vgg_m
from neuroidx_fast.receptive_fields import _Box, _union, probe_gradient, probe_receptive_field
from tests.models import make_model


class AlexNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(4, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(6 * 36, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class Dilated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.conv3 = nn.Conv2d(4, 4, 3, stride=2, padding=4, dilation=4)
        self.conv4 = nn.Conv2d(4, 4, (3, 5), padding="same", dilation=(1, 2))

    def forward(self, x):
        return self.conv4(F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))))


class CeilAndFunctional(nn.Module):
    """ceil_mode pooling, functional pooling, an inception-like concatenation and asymmetric kernels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.branch_a = nn.Conv2d(4, 3, 1)
        self.branch_b = nn.Conv2d(4, 3, 5, padding=2)
        self.branch_c = nn.Conv2d(4, 3, (1, 7), padding=(0, 3))
        self.conv2 = nn.Conv2d(9, 4, 3, padding=1)
        self.pool2 = nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x)))
        x = torch.cat([self.branch_a(x), self.branch_b(x), self.branch_c(F.max_pool2d(x, 3, 1, 1))], dim=1)
        x = self.pool2(F.relu(self.conv2(x)))
        return x.mean(dim=(2, 3))


class ShuffleAndPad(nn.Module):
    """A ShuffleNet-like unit (channel split, a branch on half the channels, concatenation, shuffle),
    torch.split and an asymmetric functional pad."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2)
        self.branch = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.Conv2d(2, 2, 1))
        self.conv = nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x):
        kept, changed = self.stem(x).chunk(2, dim=1)
        x = F.channel_shuffle(torch.cat([kept, self.branch(changed)], dim=1), 2)
        first, rest = torch.split(x, [1, 3], dim=1)
        return self.conv(F.pad(torch.cat([rest, first], 1), (2, 1, 1, 0)))


CASES = [
    # (model factory, layers, input size, has dilation)
    (lambda: vgg_m(5, 99, width=0.05, fc_width=4), ["conv1", "pool1", "conv2", "norm2", "conv3", "conv5", "pool5"],
     99, False),
    (lambda: make_model("vgg"), ["features.0", "features.2", "features.4", "features.8"], 20, False),
    (AlexNetLike, ["features.0", "features.3", "features.5", "features.10", "avgpool"], 224, False),
    (lambda: make_model("resnet"), ["stem", "layer1", "layer2.conv1", "layer2.down", "layer2"], (17, 14), False),
    (Dilated, ["conv2", "conv3", "conv4"], 31, True),
    (CeilAndFunctional, ["pool1", "branch_c", "conv2", "pool2"], (29, 26), False),
    (ShuffleAndPad, ["branch", "conv"], (27, 30), False),
]


def _clip(box, size):
    y0, x0, y1, x1 = box
    return max(y0, 0), max(x0, 0), min(y1, size[0] - 1), min(x1, size[1] - 1)


def _bounds(mask):
    ys, xs = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
    return int(ys[0]), int(xs[0]), int(ys[-1]), int(xs[-1])


def _sample_positions(h, w):
    if h * w <= 30:
        return [(y, x) for y in range(h) for x in range(w)]
    ys, xs = sorted({0, 1, h // 2, h - 2, h - 1}), sorted({0, 1, w // 2, w - 2, w - 1})
    return [(y, x) for y in ys for x in xs]


@pytest.mark.parametrize("factory,layers,input_size,dilated", CASES)
def test_analytic_box_agrees_with_gradient_probe(factory, layers, input_size, dilated):
    torch.manual_seed(0)
    model = factory().eval()
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    for layer in layers:
        rf = receptive_field(model, layer, input_size, method="analytic")
        assert rf.method == "analytic" and not rf.whole_image
        h, w = rf.map_size
        positions = _sample_positions(h, w)
        masks = probe_gradient(model, layer, input_size, positions)
        interior = 0
        for (y, x), mask in zip(positions, masks):
            y0, x0, y1, x1 = _clip(rf.box(y, x), size)
            inside = torch.zeros(size, dtype=torch.bool)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            assert not (mask & ~inside).any(), f"{layer} at {(y, x)}: gradient outside the analytic box {rf}"
            box = rf.box(y, x)
            if box[0] >= 0 and box[1] >= 0 and box[2] < size[0] and box[3] < size[1]:
                interior += 1
                # away from the border the probe sees the full box (with dilation, its corners at least)
                assert _bounds(mask) == box, f"{layer} at {(y, x)}: box {rf} larger than the probe's"
        if rf.size[0] < size[0] // 2 and rf.size[1] < size[1] // 2:
            assert interior > 0, f"{layer}: no interior position was checked"


@pytest.mark.parametrize("factory,layers,input_size,dilated", CASES)
def test_probe_fallback_measures_the_same_field(factory, layers, input_size, dilated):
    torch.manual_seed(0)
    model = factory().eval()
    for layer in layers[-2:]:
        analytic = receptive_field(model, layer, input_size, method="analytic")
        probed = probe_receptive_field(model, layer, input_size)
        assert (probed.size, probed.stride, probed.offset) == (analytic.size, analytic.stride, analytic.offset)
        assert probed.map_size == analytic.map_size and probed.method == "probe"


def test_vgg_m_conv5_at_224_worked_by_hand():
    # conv1 7x7/2 pad 0:  r = 7,               j = 2,  o = 0
    # pool1 3x3/2:        r = 7 + 2*2 = 11,     j = 4,  o = 0
    # conv2 5x5/2 pad 1:  r = 11 + 4*4 = 27,    j = 8,  o = 0 - 1*4 = -4
    # pool2 3x3/2:        r = 27 + 2*8 = 43,    j = 16, o = -4
    # conv3 3x3/1 pad 1:  r = 43 + 2*16 = 75,   j = 16, o = -4 - 16 = -20
    # conv4 3x3/1 pad 1:  r = 75 + 32 = 107,    o = -36
    # conv5 3x3/1 pad 1:  r = 107 + 32 = 139,   o = -52;  map 13x13
    model = vgg_m(1000, 224, width=0.05, fc_width=8)
    rf = receptive_field(model, "conv5", 224)
    assert (rf.size, rf.stride, rf.offset, rf.map_size) == ((139, 139), (16, 16), (-52, -52), (13, 13))
    assert rf.box(0, 0) == (-52, -52, 86, 86)
    assert rf.box(12, 6) == (-52 + 192, -52 + 96, 86 + 192, 86 + 96)
    tops = rf.tops(torch.tensor([0, 13 * 12 + 6]))
    assert tops.tolist() == [[-52, -52], [140, 44]]


def test_vgg_m_on_rectangular_and_too_small_inputs():
    # 224 x 99: conv5 maps of 13 x 5, pool5 6 x 2 (fc6's input), the field as at 224 x 224
    model = vgg_m(4, (224, 99), width=0.05, fc_width=8).eval()
    assert model(torch.rand(2, 3, 224, 99)).shape == (2, 4)
    assert model.fc6.in_features == model.conv5.out_channels * 6 * 2
    rf = receptive_field(model, "conv5", (224, 99))
    assert (rf.size, rf.stride, rf.offset, rf.map_size) == ((139, 139), (16, 16), (-52, -52), (13, 5))
    with pytest.raises(ValueError, match="at least 57x57"):
        vgg_m(4, (224, 50))
    with pytest.raises(ValueError, match="int or \\(height, width\\)"):
        vgg_m(4, (224, 99, 3))


@pytest.mark.parametrize("pool_padding, offset", [(0, 0), (1, -1)])
def test_dilated_max_pooling_worked_by_hand(pool_padding, offset):
    # conv 3x3: r = 3, j = 1. Pool 3x3, dilation 2 (k_eff = 5), stride 2: r = 3 + 4 * 1 = 7, j = 2,
    # offset 0 - padding * 1. (The probe cannot check it: its copy averages instead of taking the max,
    # and average pooling has no dilation.)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.MaxPool2d(3, stride=2, padding=pool_padding, dilation=2)).eval()
    rf = receptive_field(model, "1", 32, method="analytic")
    assert (rf.size, rf.stride, rf.offset) == ((7, 7), (2, 2), (offset, offset))
    assert rf.box(3, 1) == (offset + 6, offset + 2, offset + 12, offset + 8)


def test_layers_that_mix_all_positions_see_the_whole_image():
    model = AlexNetLike().eval()
    for layer in ("classifier.1", "classifier.3"):
        rf = receptive_field(model, layer, 224)
        assert rf.whole_image and rf.size == (224, 224) and rf.box(0, 0) == (0, 0, 223, 223)
    resnet = make_model("resnet")
    assert receptive_field(resnet, "head.0", (17, 14)).whole_image  # global average pooling
    assert probe_receptive_field(resnet, "head.2", (17, 14)).whole_image


class _Softmaxed(nn.Module):
    """conv -> a softmax (module or function form, over some axis) -> strided conv."""

    def __init__(self, softmax):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3, stride=2)
        self.softmax = softmax

    def forward(self, x):
        return self.out(self.softmax(self.conv(x)))


@pytest.mark.parametrize("softmax, per_position", [
    (nn.Softmax(dim=1), True), (nn.LogSoftmax(dim=-3), True), (nn.Softmax2d(), True),
    (lambda x: F.softmax(x, dim=1), True), (lambda x: torch.softmax(x, -3), True),
    (nn.Softmax(dim=-1), False), (nn.LogSoftmax(dim=2), False), (lambda x: F.log_softmax(x, dim=3), False),
    (lambda x: torch.softmax(x, -1), False),
])
def test_softmax_keeps_the_box_over_channels_only(softmax, per_position):
    model = _Softmaxed(softmax).eval()
    rf = receptive_field(model, "out", 20, method="analytic")
    if per_position:  # each position normalised on its own: the two 3x3 convs' field
        assert (rf.size, rf.stride, rf.offset, rf.whole_image) == ((5, 5), (2, 2), (0, 0), False)
        probed = probe_receptive_field(model, "out", 20)  # its random positive weights keep channels apart
        assert (probed.size, probed.stride, probed.offset) == (rf.size, rf.stride, rf.offset)
    else:  # over a row or column of the map: every output reads a whole image row / column
        assert rf.whole_image


class _ScaledThenPooled(nn.Module):
    """A per-channel learned scale (a [1, C, 1, 1] parameter) and a functional global mean."""

    def __init__(self):
        super().__init__()
        self.conv, self.out, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3, stride=2), nn.Linear(2, 3)
        self.scale = nn.Parameter(torch.full((1, 4, 1, 1), 2.0))

    def forward(self, x):
        y = self.out(self.conv(x) * self.scale)
        return self.fc(torch.mean(y, dim=(2, 3)))


def test_channel_splits_and_functional_padding_need_no_probe(recwarn):
    rf = receptive_field(ShuffleAndPad().eval(), "conv", (27, 30))
    # stem 3x3/2: size 3, stride 2; the branch's 3x3 adds 2 * 2; F.pad moves the origin by (1, 2) steps of
    # 2 up and left; the 3x3/2 conv adds 2 * 2
    assert (rf.size, rf.stride, rf.offset, rf.method) == ((11, 11), (4, 4), (-4, -6), "analytic")
    assert not [w for w in recwarn if "probe" in str(w.message)]
    with pytest.raises(ValueError, match="split along a spatial axis"):
        receptive_field(_Wrapped(lambda x: torch.cat(x.chunk(2, dim=-1), 1)), "out", 16, method="analytic")


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_circular_padding_is_warned_of(mode, recwarn):
    # A circular conv's border units see the opposite border (the probe's gradient wraps around): outside
    # the theoretical box, which is what every other padding mode's field stays within.
    conv = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode=mode), nn.Conv2d(2, 2, 3, stride=2)).eval()
    rf = receptive_field(conv, "1", 12)
    assert (rf.size, rf.stride, rf.offset) == ((5, 5), (2, 2), (-1, -1))
    warned = [str(w.message) for w in recwarn if "circular" in str(w.message)]
    assert warned == (["receptive field: module '0' (Conv2d) pads circularly, so units near a border also see "
                       "pixels of the opposite border, which their boxes (and the crops cut from them) leave out"]
                      if mode == "circular" else [])
    seen = probe_gradient(conv, "1", (12, 12), [(0, 0)])[0].clone()
    y0, x0, y1, x1 = rf.box(0, 0)
    seen[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = False
    assert bool(seen.any()) == (mode == "circular")
    padded = [nn.Sequential(nn.CircularPad2d(1), nn.Conv2d(3, 2, 3)),
              _Wrapped(lambda x: torch.cat([F.pad(x, (1, 1, 1, 1), mode="circular")] * 2, 1))]
    for model, layer, name in zip(padded, ("1", "out"), ("module '0' (CircularPad2d)", "pad(mode='circular')")):
        recwarn.clear()
        receptive_field(model.eval(), layer, 12, method="analytic")
        assert [str(w.message).split(" pads")[0] for w in recwarn] == [f"receptive field: {name}"]


class _Wrapped(nn.Module):
    """conv, then ``op``, then an output conv named "out"."""

    def __init__(self, op):
        super().__init__()
        self.conv, self.op, self.out = nn.Conv2d(3, 2, 3), op, nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(self.op(self.conv(x)))


def test_common_functional_patterns_need_no_probe(recwarn):
    model = _ScaledThenPooled().eval()
    rf = receptive_field(model, "out", 20)
    assert (rf.size, rf.stride, rf.offset, rf.method) == ((5, 5), (2, 2), (0, 0), "analytic")
    assert receptive_field(model, "fc", 20).whole_image
    assert not [w for w in recwarn if "probe" in str(w.message)]


def test_an_input_too_small_for_the_model_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 7), nn.Conv2d(4, 4, 7)).eval()
    with pytest.warns(UserWarning, match="graph walk stopped"), \
            pytest.raises(ValueError, match="cannot run on 8x8 inputs of 3 channel.*layer '1'.*larger input_size"):
        receptive_field(model, "1", 8)


def test_a_module_named_with_a_quote_is_probed():
    # torch.fx writes module names into string literals of its generated code: a quote breaks it
    model = nn.Sequential()
    model.add_module('c"1', nn.Conv2d(3, 4, 3))
    model.add_module("out", nn.Conv2d(4, 4, 3, stride=2))
    with pytest.warns(UserWarning, match="graph walk stopped at torch.fx cannot trace"):
        rf = receptive_field(model.eval(), "out", 16)
    assert (rf.size, rf.stride, rf.offset, rf.method) == ((5, 5), (2, 2), (0, 0), "probe")


def test_a_model_of_other_input_channels_is_told_to_pass_them():
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2)).eval()
    with pytest.warns(UserWarning, match="graph walk stopped"), \
            pytest.raises(ValueError, match=r"16x16 inputs of 3 channel\(s\).*pass channels= .*these inputs have 3"):
        receptive_field(gray, "2", 16)
    rf = receptive_field(gray, "2", 16, channels=1)
    assert (rf.size, rf.stride, rf.offset) == ((5, 5), (2, 2), (0, 0))


def test_unknown_operation_falls_back_to_the_probe_with_a_warning():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)
            self.out = nn.Conv2d(2, 2, 3, stride=2)

        def forward(self, x):
            return self.out(torch.roll(self.conv(x), 1, dims=1))  # roll over channels keeps the box

    model = Shifted().eval()
    with pytest.raises(ValueError, match="roll"):
        receptive_field(model, "out", 20, method="analytic")
    with pytest.warns(UserWarning, match="gradient probe"):
        rf = receptive_field(model, "out", 20)
    assert (rf.size, rf.stride, rf.offset, rf.method) == ((5, 5), (2, 2), (0, 0), "probe")


def test_adaptive_pooling_with_unequal_windows_is_probed():
    model = AlexNetLike().eval()  # at 99 px the features are 2x2 and avgpool stretches them to 6x6
    with pytest.raises(ValueError, match="unequal sizes"):
        receptive_field(model, "avgpool", 99, method="analytic")
    with pytest.warns(UserWarning, match="gradient probe"):
        assert receptive_field(model, "avgpool", 99).method == "probe"


def test_untraceable_model_falls_back_to_the_probe():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 5, stride=2, padding=1)

        def forward(self, x):
            if x.sum() > 0:  # fx cannot trace a branch on data
                x = x * 2
            return self.conv(x)

    with pytest.warns(UserWarning, match="fx cannot trace"):
        rf = receptive_field(DataDependent(), "conv", 21)
    assert (rf.size, rf.stride, rf.offset) == ((5, 5), (2, 2), (-1, -1))


def test_merging_branches_with_different_strides_is_an_error():
    with pytest.raises(ValueError, match="different strides"):
        _union([_Box((2, 2), (3, 3), (0, 0)), _Box((4, 4), (7, 7), (-1, -1))])
    merged = _union([_Box((2, 2), (3, 3), (0, 0)), _Box((2, 2), (7, 5), (-2, -1))])
    assert merged == _Box((2, 2), (7, 5), (-2, -1))


class _TwoStrides(nn.Module):
    """Two branches of 8 x 8 maps, one of stride 2 and one of stride 4, concatenated."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.Conv2d(3, 2, 1, stride=4, padding=8)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], dim=1))


def test_a_model_merging_different_strides_has_no_receptive_field():
    model = _TwoStrides().eval()
    with pytest.raises(ValueError, match="different strides") as error:
        receptive_field(model, "out", 16)
    assert "While executing" not in str(error.value)  # torch.fx's own note about the failing node
    with pytest.warns(UserWarning, match="no single size and stride describe"):
        probe_receptive_field(model, "out", 16)


def test_the_probe_sees_a_unit_that_mixes_a_whole_row_as_the_whole_image():
    model = _Softmaxed(nn.Softmax(dim=-1)).eval()
    assert probe_receptive_field(model, "out", 20).whole_image
    assert receptive_field(model, "out", 20).whole_image


def test_bad_arguments():
    model = make_model("vgg")
    with pytest.raises(ValueError, match="closest names: features.0"):
        receptive_field(model, "feature.0", 16)
    with pytest.raises(ValueError, match="input_size"):
        receptive_field(model, "features.0", "big")
    with pytest.raises(ValueError, match="method"):
        receptive_field(model, "features.0", 16, method="exact")


def test_walk_leaves_the_model_as_it_was():
    model = make_model("resnet").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    receptive_field(model, "layer2", 16)
    probe_receptive_field(model, "layer2", 16)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _ChannelsLast(nn.Module):
    """ConvNeXt-style: a depthwise conv, then LayerNorm and Linear layers over the channels of the
    channels-last tensor (permute there and back), plus channel reductions and selections of other forms
    (a mean that drops the channel axis, a CBAM-like gate from the method max, indexing with None,
    integers and Ellipsis): every one of them keeps the box."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 5, padding=2, groups=3)
        self.norm = nn.LayerNorm(3)
        self.pw = nn.Linear(3, 6)
        self.conv = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.functional_norm = True

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw(F.layer_norm(y, (3,)) if self.functional_norm else y)
        y = torch.transpose(y.relu(), 1, 3).transpose(2, 3)  # back to N, C, H, W
        gate = torch.sigmoid(torch.mean(y, 1).unsqueeze(1) + y.max(1, keepdim=True)[0]
                             + torch.amax(y, dim=(1,))[:, None] + y[:, 0][:, None, ...] + y[..., 1:2, :, :])
        return self.conv(y * gate)


def test_channels_last_layers_and_channel_reductions_keep_the_box(recwarn):
    # The walk follows the positions through permutes, channel-axis LayerNorm / Linear and channel
    # reductions (it took all of them for the whole image); 5 x 5 depthwise, then 3 x 3 stride 2.
    model = _ChannelsLast()
    rf = receptive_field(model, "conv", 20, method="analytic")
    assert (rf.size, rf.stride, rf.offset, rf.whole_image) == ((7, 7), (2, 2), (-3, -3), False)
    assert not [w for w in recwarn if "probe" in str(w.message)]
    # The same field as a net without the channels-last part, and the probe's where it can see it (a
    # LayerNorm over the channels of a constant input has no gradient: the probe needs the norm out).
    model.norm, model.functional_norm = nn.Identity(), False
    rf = receptive_field(model, "conv", 20, method="analytic")
    probed = probe_receptive_field(model, "conv", 20)
    assert (rf.size, rf.stride, rf.offset) == (probed.size, probed.stride, probed.offset) == ((7, 7), (2, 2), (-3, -3))


class _PositionsMixedAfterPermute(nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.conv, self.mix = nn.Conv2d(3, 4, 3, padding=1), mix

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)  # N, H, W, C
        if self.mix == "linear over the width":
            y = F.linear(y.transpose(2, 3), torch.ones(20, 20))
        elif self.mix == "layer norm over the map":
            y = F.layer_norm(y, (20, 20, 4))
        elif self.mix == "softmax over rows":
            y = y.softmax(dim=1)
        else:
            y = y.mean(dim=(1,), keepdim=True)
        return torch.flatten(y, 1).sum(1, keepdim=True)


@pytest.mark.parametrize("mix", ["linear over the width", "layer norm over the map", "softmax over rows", "mean"])
def test_channels_last_operations_over_positions_mix_them(mix):
    model = nn.Sequential()
    model.add_module("net", _PositionsMixedAfterPermute(mix))
    assert receptive_field(model, "net", 20, method="analytic").whole_image


class _SharedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.r = nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3), nn.ReLU()

    def forward(self, x):
        return self.r(self.conv2(self.r(self.conv1(x))))


def test_a_module_called_twice_is_refused_as_by_index_dataset():
    from neuroidx_fast.hooks import SharedModuleError

    with pytest.raises(SharedModuleError, match="runs more than once"):
        receptive_field(_SharedRelu(), "r", 16)


class _Concatenated(nn.Module):
    """A concatenation as the layer: channels 0-1 from a 1x1 branch, channels 2-3 from a 5x5 one."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(4, 2, 1)
        self.b5 = nn.Conv2d(4, 2, 5, padding=2)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b5(x)], 1)


class _ConcatNet(nn.Module):
    def __init__(self, unknown_op: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 2, 1)
        self.block = _Concatenated()
        self.unknown_op = unknown_op

    def forward(self, x):
        x = self.stem(x)
        if self.unknown_op:
            x = torch.roll(x, 1, 1)  # an operation the walk does not know: the field is probed
        return self.block(x)


def test_the_probe_measures_the_union_of_a_concatenations_fields():
    # stem 3x3/2 pad 1: size 3, stride 2, offset -1; the 5x5 branch: 3 + 4 * 2 = 11, offset -1 - 2 * 2 = -5;
    # the 1x1 branch keeps the stem's 3x3, inside it: the union is the 5x5 branch's box (SPEC.md 2)
    expected = ((11, 11), (2, 2), (-5, -5))
    analytic = receptive_field(_ConcatNet(False).eval(), "block", 32, method="analytic")
    assert (analytic.size, analytic.stride, analytic.offset) == expected
    probed = probe_receptive_field(_ConcatNet(False).eval(), "block", 32)
    assert (probed.size, probed.stride, probed.offset) == expected  # not channel 0's 3x3
    with pytest.warns(UserWarning, match="gradient probe"):
        fallback = receptive_field(_ConcatNet(True).eval(), "block", 32)
    assert (fallback.size, fallback.stride, fallback.offset, fallback.method) == expected + ("probe",)


class _AuxiliaryInTraining(nn.Module):
    """An auxiliary branch run in training mode only (as Inception's), which widens the field of `down`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.aux = nn.Conv2d(2, 2, 5, padding=2)
        self.down = nn.Conv2d(2, 2, 3, 2)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = x + self.aux(x)
        return self.down(x)


def test_the_walk_follows_the_eval_forward_and_refuses_a_layer_it_never_calls():
    model = _AuxiliaryInTraining().train()
    rf = receptive_field(model, "down", 16)
    # eval forward: 3x3 then 3x3/2 = 5x5 (the training forward's aux branch would make it 9x9, offset -2)
    assert (rf.size, rf.stride, rf.offset, rf.method) == ((5, 5), (2, 2), (0, 0), "analytic")
    assert model.training and model.aux.training
    with pytest.raises(ValueError, match="'aux' is not called"):
        receptive_field(model, "aux", 16, method="analytic")
    with pytest.raises(RuntimeError, match="never reached"), pytest.warns(UserWarning, match="not called"):
        receptive_field(model, "aux", 16)  # not the field of the model's output


@pytest.mark.parametrize("output_size,input_size", [((4, 2), (23, 17)), ((3, None), (12, 12))])
def test_probed_adaptive_pooling_boxes_are_the_probes_at_every_position(output_size, input_size):
    # (4, 2): a map 2 wide puts the probe's first two points in one column; (3, None): the map grows with
    # the input along x only, so a larger input has another geometry along y
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(output_size)).eval()
    rf = probe_receptive_field(model, "1", input_size)
    h, w = rf.map_size
    positions = [(y, x) for y in range(h) for x in range(w)]
    for (y, x), mask in zip(positions, probe_gradient(model, "1", input_size, positions)):
        assert rf.box(y, x) == _bounds(mask), f"{rf} at {(y, x)}"


class _LayerNormOverChannels(nn.Module):
    """A LayerNorm over the channels of a map (channels last inside, as ConvNeXt's)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _Centred(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=1, keepdim=True)


@pytest.mark.parametrize("normalise", [_LayerNormOverChannels(5), _Centred()])
def test_the_probe_sees_layers_that_normalise_over_channels(normalise):
    # the probe's positive copy must not make the channels cancel (all equal, or an equal-weight sum of
    # outputs that sum to 0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 5, 3, stride=2), normalise).eval()
    probed = probe_receptive_field(model, "3", 21)
    assert (probed.size, probed.stride, probed.offset) == ((5, 5), (2, 2), (0, 0))
    assert _bounds(probe_gradient(model, "3", 21, [(3, 4)])[0]) == (6, 8, 10, 12)  # 2 * (3, 4) + 4


def test_vgg_m_takes_numpy_sizes():
    np = pytest.importorskip("numpy")
    assert vgg_m(4, np.int64(64), width=0.05, fc_width=4).fc6.in_features == vgg_m(4, 64, width=0.05,
                                                                                    fc_width=4).fc6.in_features
    assert vgg_m(4, (np.int64(64), 99), width=0.05, fc_width=4)(torch.rand(1, 3, 64, 99)).shape == (1, 4)


@pytest.mark.parametrize("input_size", [(16, 256), (256, 16)])
def test_the_probe_on_thin_inputs_places_fields_cut_by_the_border(input_size):
    # five 3x3/2 convs: 63 x 63 fields at stride 32; at 16 px along an axis the map has one position there and
    # every field the probe can see is cut by the image's border on that axis
    layers = []
    for i in range(5):
        layers += [nn.Conv2d(3 if i == 0 else 4, 4, 3, 2, 1), nn.ReLU()]
    model = nn.Sequential(*layers).eval()
    analytic = receptive_field(model, "8", input_size, method="analytic")
    probed = probe_receptive_field(model, "8", input_size)
    assert (analytic.size, analytic.stride, analytic.offset) == ((63, 63), (32, 32), (-31, -31))
    assert (probed.size, probed.stride, probed.offset) == (analytic.size, analytic.stride, analytic.offset)


class _WidenedInPlace(nn.Module):
    """The layer's input changed in place by a wider branch: h.add_(9x9 conv of x)."""

    def __init__(self):
        super().__init__()
        self.small, self.big = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 9, padding=4)
        self.relu, self.out = nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.small(x)
        h.add_(self.big(x))  # in place, wider: `out` reads h, whose field is now 9x9
        return self.out(self.relu(h))  # in place, pointwise: the field is kept


def test_an_in_place_change_that_widens_a_field_is_not_missed():
    model = _WidenedInPlace().eval()
    with pytest.raises(ValueError, match="in-place change"):
        receptive_field(model, "out", 24, method="analytic")
    with pytest.warns(UserWarning, match="gradient probe"):
        rf = receptive_field(model, "out", 24)
    assert (rf.size, rf.offset, rf.method) == ((9, 9), (-4, -4), "probe")
    assert receptive_field(AlexNetLike().eval(), "features.3", 224).method == "analytic"  # ReLU(inplace=True)
