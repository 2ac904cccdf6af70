"""Receptive fields: the analytic graph walk against the gradient probe (SPEC.md section 2)."""


import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroidx_fast import receptive_field
from neuroidx_fast.hooks import SharedModuleError
from neuroidx_fast.models import vgg_m
from neuroidx_fast.receptive_fields import probe_gradient, probe_receptive_field
from neuroidx_fast.rf_walk import _Box, _union
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
    with pytest.raises(ValueError, match="at least 41x41"):
        vgg_m(4, (224, 40))
    with pytest.raises(ValueError, match="int or \\(height, width\\)"):
        vgg_m(4, (224, 99, 3))
    # 41 px is the smallest input every layer has an output for (pool5's ceil-mode window on a 2 x 2 map)
    small = vgg_m(4, 41, width=0.05, fc_width=8).eval()
    assert small(torch.rand(1, 3, 41, 41)).shape == (1, 4)
    for bad in (dict(num_classes=0), dict(num_classes=2.5), dict(fc_width=0), dict(width=float("nan"))):
        with pytest.raises(ValueError, match="must be a positive"):
            vgg_m(**{"num_classes": 4, "input_size": 64, **bad})


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


@pytest.mark.parametrize("method", ["auto", "analytic", "probe"])
def test_an_input_too_small_for_the_model_is_a_clear_error(method, recwarn):
    # the walk said "the analytic receptive field is unknown: running the traced graph failed", naming no fix,
    # and auto warned that the graph was at fault before the probe said what was
    model = nn.Sequential(nn.Conv2d(3, 4, 7), nn.Conv2d(4, 4, 7)).eval()
    with pytest.raises(ValueError, match="cannot run on 8x8 inputs of 3 channel.*layer '1'.*larger input_size"):
        receptive_field(model, "1", 8, method=method)
    assert not [w for w in recwarn if "graph walk" in str(w.message)]


def test_a_module_named_with_a_quote_is_probed():
    # torch.fx writes module names into string literals of its generated code: a quote breaks it
    model = nn.Sequential()
    model.add_module('c"1', nn.Conv2d(3, 4, 3))
    model.add_module("out", nn.Conv2d(4, 4, 3, stride=2))
    with pytest.warns(UserWarning, match="graph walk stopped at torch.fx cannot trace"):
        rf = receptive_field(model.eval(), "out", 16)
    assert (rf.size, rf.stride, rf.offset, rf.method) == ((5, 5), (2, 2), (0, 0), "probe")


@pytest.mark.parametrize("method", ["auto", "analytic", "probe"])
def test_a_model_of_other_input_channels_is_told_to_pass_them(method, recwarn):
    gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2)).eval()
    with pytest.raises(ValueError, match=r"16x16 inputs of 3 channel\(s\).*pass channels= .*these inputs have 3"):
        receptive_field(gray, "2", 16, method=method)
    assert not [w for w in recwarn if "graph walk" in str(w.message)]
    rf = receptive_field(gray, "2", 16, channels=1, method=method)
    assert (rf.size, rf.stride, rf.offset) == ((5, 5), (2, 2), (0, 0))


@pytest.mark.parametrize("channels, message", [
    (2.5, r"got 2.5 \(float\)"),  # a raw TypeError from torch.zeros
    (True, "got True"),  # accepted as 1 channel
    (0, "got 0"), (-1, "got -1"),  # "choose a larger input_size"
    ("3", "got '3' \\(str\\)"),
])
def test_channels_must_be_a_positive_int(channels, message):
    pooled = nn.Sequential(nn.MaxPool2d(2)).eval()  # no conv to check the input's depth
    for call in (lambda: receptive_field(pooled, "0", 8, channels=channels),
                 lambda: receptive_field(pooled, "0", 8, channels=channels, method="probe"),
                 lambda: probe_receptive_field(pooled, "0", 8, channels=channels),
                 lambda: probe_gradient(pooled, "0", 8, [(0, 0)], channels=channels)):
        with pytest.raises(ValueError, match="channels must be a positive int \\(the model's input channels\\), "
                                             + message):
            call()
    assert receptive_field(pooled, "0", 8, channels=np_int(2)).size == (2, 2)


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


def test_adaptive_pooling_to_a_larger_map_is_an_upsampling_error():
    # at 99 px the features are 2x2 and avgpool stretches them to 6x6: three units per feature row, which
    # no stride of whole pixels describes (the probe used to round its step of 0 to a stride of 1)
    model = AlexNetLike().eval()
    with pytest.raises(ValueError, match="upsamples"):
        receptive_field(model, "avgpool", 99, method="analytic")
    with pytest.warns(UserWarning, match="gradient probe"), pytest.raises(ValueError, match="upsampling"):
        receptive_field(model, "avgpool", 99)
    with pytest.warns(UserWarning, match="gradient probe"):
        assert receptive_field(model, "classifier.1", 99).whole_image  # after flatten: mixed anyway


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


class _Picked(nn.Module):
    """A [B, C] layer fed by one map position: conv 3x3 (no padding), then a Linear on position (3, 4)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.tokens = nn.Conv2d(3, 4, 3), nn.Linear(4, 2), nn.Identity()

    def forward(self, x):
        y = self.conv(x)
        self.tokens(y.flatten(2))  # a [B, C, L] output: no map
        return self.fc(y[:, :, 3, 4])


def test_the_probe_measures_a_layer_of_two_dimensional_output():
    model = _Picked().eval()
    assert _bounds(probe_gradient(model, "fc", 10, [(0, 0)])[0]) == (3, 4, 5, 6)  # SPEC.md 1: H = W = 1
    with pytest.raises(ValueError, match=r"shape \(1, 4, 64\).*\[B, C, H, W\] or \[B, C\]"):
        probe_gradient(model, "tokens", 10, [(0, 0)])


def test_a_layer_of_two_dimensional_output_fed_by_one_position_is_measured_not_whole():
    model = _Picked().eval()
    with pytest.warns(UserWarning, match="gradient probe instead"):  # the walk stops at the indexing
        rf = receptive_field(model, "fc", 10)
    assert not rf.whole_image and rf.map_size == (1, 1) and rf.method == "probe"
    assert rf.box(0, 0) == (3, 4, 5, 6) and rf.tops(torch.tensor([0])).tolist() == [[3, 4]]  # the NF's crop


class _Transposed(nn.Module):
    """A 3x1 conv at stride 2x1, then its map's height and width swapped: the rows of a unit's field follow
    its map column. On the diagonal (2, 2), (3, 3) the fields move as a 3x1 field at stride 2x1 would."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 4, (3, 1), (2, 1)), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(self.conv(x).transpose(2, 3))


def test_the_probe_refuses_a_map_whose_height_and_width_are_swapped():
    with pytest.raises(ValueError, match=r"stride and an offset per axis \(a transpose"):
        probe_receptive_field(_Transposed().eval(), "out", (11, 7))


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


class _MixFFN(nn.Module):
    """SegFormer's Mix-FFN: the positions flattened into tokens, a Linear over each token's channels (it
    mixes no position), the tokens reshaped back into a map, a depthwise 3x3 conv."""

    def __init__(self, flatten):
        super().__init__()
        self.flatten = flatten
        self.stem, self.fc = nn.Conv2d(3, 8, 3, 2, 1), nn.Linear(8, 8)
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        tokens = self.fc(self.flatten(x).transpose(1, 2))
        return self.dw(tokens.transpose(1, 2).reshape(b, c, h, w))


@pytest.mark.parametrize("flatten", [lambda x: x.flatten(2), lambda x: x.view(x.shape[0], x.shape[1], -1)])
def test_positions_flattened_into_tokens_are_probed_not_whole(flatten):
    model = _MixFFN(flatten).eval()
    with pytest.raises(ValueError, match="axis of tokens"):
        receptive_field(model, "dw", 16, method="analytic")
    with pytest.warns(UserWarning, match="axis of tokens"):
        rf = receptive_field(model, "dw", 16)
    assert (rf.size, rf.stride, rf.offset, rf.whole_image) == ((7, 7), (2, 2), (-3, -3), False)


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


def test_the_probe_spaces_fields_the_input_does_not_cut():
    # at 100x140 the fields of conv3 (75 px) near the map's centre are cut: one by the top border, one by the
    # bottom rows that the net's pooling leaves unread (its box ends at row 98 of 99); their spacing (12) is
    # not the stride (16), which fields measured on a larger input show
    model = vgg_m(10, input_size=(100, 140), width=0.02, fc_width=4).eval()
    analytic = receptive_field(model, "conv3", (100, 140), method="analytic")
    probed = probe_receptive_field(model, "conv3", (100, 140))
    assert (probed.size, probed.stride, probed.offset) == ((75, 75), (16, 16), (-20, -20))
    assert (analytic.size, analytic.stride, analytic.offset) == (probed.size, probed.stride, probed.offset)


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


# ------------------------------------------------------------------------------- defects found in review
class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 projection, a residual sum."""

    def __init__(self, channels, activation):
        super().__init__()
        wide = 2 * channels
        self.expand, self.depthwise = nn.Conv2d(channels, wide, 1), nn.Conv2d(wide, wide, 3, padding=1, groups=wide)
        self.project, self.activation = nn.Conv2d(wide, channels, 1), activation

    def forward(self, x):
        return x + self.project(self.activation(self.depthwise(self.activation(self.expand(x)))))


class _SaturatingResidualNet(nn.Module):
    """A MobileNetV2-like net: on the probe's all-ones input the residual sums grow past 6, where ReLU6's
    (and its kin's) gradient is zero."""

    def __init__(self, activation):
        super().__init__()
        self.stem, self.down = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 2, 1)
        self.blocks = nn.Sequential(*[_InvertedResidual(4, activation) for _ in range(5)])
        self.out, self.activation = nn.Conv2d(4, 4, 1), activation

    def forward(self, x):
        return self.out(self.blocks(self.activation(self.down(self.activation(self.stem(x))))))


class _Activation(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("activation", [
    nn.ReLU6(), nn.ReLU6(inplace=True), nn.Hardtanh(0.0, 6.0), _Activation(F.relu6),
    _Activation(lambda x: torch.clamp(x, 0, 6)), _Activation(lambda x: x.clamp(max=6.0)),
    _Activation(lambda x: x.clamp_(0, 6)), _Activation(lambda x: x.clamp_max(6.0)),
    _Activation(lambda x: F.hardsigmoid(4 * x)),  # flat past 3 (the probe's values stay below 3 unscaled)
])
def test_the_probe_sees_through_activations_that_saturate(activation):
    # stem and down 3x3/2: 3 + 2 * 2 = 7, stride 4; five 3x3 depthwise convs: 7 + 5 * 2 * 4 = 47; offset
    # -1 - 1 * 2 - 5 * 4 = -23. The probe used to lose the pixels whose paths pass values above the bound.
    model = _SaturatingResidualNet(activation).eval()
    analytic = receptive_field(model, "out", 64, method="analytic")
    assert (analytic.size, analytic.stride, analytic.offset) == ((47, 47), (4, 4), (-23, -23))
    probed = probe_receptive_field(model, "out", 64)
    assert (probed.size, probed.stride, probed.offset) == (analytic.size, analytic.stride, analytic.offset)
    assert _bounds(probe_gradient(model, "out", 64, [(8, 8)])[0]) == analytic.box(8, 8)


def _adaptive_model(output_size, then_conv=False):
    layers = [nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(output_size)]
    return nn.Sequential(*layers, *([nn.Conv2d(2, 2, 3)] if then_conv else [])).eval()


@pytest.mark.parametrize("input_size, output_size, expected, uneven", [
    (8, 7, ((2, 2), (1, 1), (0, 0)), False),     # windows 0-1, 1-2, ..., 6-7: uniform, though 7 does not divide 8
    (9, 4, ((3, 3), (2, 2), (0, 0)), False),     # 0-2, 2-4, 4-6, 6-8
    (10, 4, ((4, 4), (2, 2), (0, 0)), True),     # 0-2, 2-4, 5-7, 7-9: boxes 0-3, 2-5, 4-7, 6-9 hold them
    (10, 7, ((4, 4), (1, 1), (0, 0)), True),     # VGG at 320 px: 0-1, 1-2, 2-4, 4-5, 5-7, 7-8, 8-9
    ((10, 9), (4, 3), ((4, 3), (2, 3), (0, 0)), True),
])
def test_adaptive_pooling_boxes_hold_every_window(input_size, output_size, expected, uneven, recwarn):
    # torch's adaptive windows run from floor(i * in / out) to ceil((i + 1) * in / out) - 1; the walk
    # refused every non-divisible case and the probe's approximation (10 -> 4: size 3, stride 3, offset -1)
    # left out row 2 from unit 0's box
    model = _adaptive_model(output_size)
    rf = receptive_field(model, "1", input_size)
    assert (rf.size, rf.stride, rf.offset, rf.method) == expected + ("analytic",)
    assert bool([w for w in recwarn if "unequal sizes or spacings" in str(w.message)]) == uneven
    assert not [w for w in recwarn if "probe" in str(w.message)]
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    for then_conv in (False, True):  # the superset composes with the layers after it
        model = _adaptive_model(output_size, then_conv)
        layer = "2" if then_conv else "1"
        rf = receptive_field(model, layer, input_size)
        positions = [(y, x) for y in range(rf.map_size[0]) for x in range(rf.map_size[1])]
        for (y, x), mask in zip(positions, probe_gradient(model, layer, input_size, positions)):
            y0, x0, y1, x1 = _clip(rf.box(y, x), size)
            inside = torch.zeros(size, dtype=torch.bool)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            assert not (mask & ~inside).any(), f"{layer} at {(y, x)}: gradient outside the box {rf}"
            if not uneven:
                assert _bounds(mask) == rf.box(y, x)


def test_the_probe_covers_uneven_adaptive_windows_it_measures():
    model = _adaptive_model(4)  # 10 -> 4: windows 0-2, 2-4, 5-7, 7-9
    with pytest.warns(UserWarning, match="hold the fields measured"):
        probed = probe_receptive_field(model, "1", 10)
    assert (probed.size, probed.stride, probed.offset) == ((4, 4), (2, 2), (0, 0))


@pytest.mark.parametrize("layer", ["norm", "pw"])
def test_a_channels_last_layer_is_refused_not_probed(layer, recwarn):
    # its output is [N, H, W, C]: the probe read it as [N, C, H, W] and answered "whole image", map (W, C)
    with pytest.raises(ValueError, match=r"\[1, 20, 20, \d\] whose positions lie on its dimensions 1 and 2.*"
                                         "after the permute back"):
        receptive_field(_ChannelsLast(), layer, 20)
    assert not [w for w in recwarn if "probe" in str(w.message)]


@pytest.mark.parametrize("upsample", [
    nn.Upsample(scale_factor=2), nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1),
    _Activation(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear")),
])
def test_a_layer_after_an_upsampling_is_a_clear_error(upsample):
    # the probe rounded the measured step of 1/2 pixel to a stride of 1: boxes off the image
    model = nn.Sequential(nn.Conv2d(3, 2, 3), upsample, nn.Conv2d(2, 2, 3)).eval()
    with pytest.warns(UserWarning, match="gradient probe"), \
            pytest.raises(ValueError, match="'2' that move by 0 input pixels.*upsampling"):
        receptive_field(model, "2", 16)
    with pytest.raises(ValueError, match="upsampling"):
        probe_receptive_field(model, "2", 16)


class _ReadsShapes(nn.Module):
    """Sizes read in forward (fx records getattr and size()), a ShuffleNetV2 channel shuffle (a 5-d view,
    a transpose, a view back) and a classifier flattened by y.reshape(y.shape[0], -1)."""

    def __init__(self):
        super().__init__()
        self.conv, self.out, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 3, stride=2), nn.Linear(2 * 7 * 7, 3)

    def forward(self, x):
        n = x.shape[0]
        y = self.conv(x).reshape(n, 4, x.shape[2] - 2, -1)
        batch, channels, height, width = y.size()
        y = torch.transpose(y.view(batch, 2, channels // 2, height, width), 1, 2).contiguous()
        y = self.out(y.view(batch, -1, height, width))
        return self.fc(y.reshape(y.shape[0], -1))


def test_shapes_read_in_forward_need_no_probe(recwarn):
    model = _ReadsShapes().eval()
    rf = receptive_field(model, "out", 17, method="analytic")
    assert (rf.size, rf.stride, rf.offset) == ((5, 5), (2, 2), (0, 0))
    assert receptive_field(model, "fc", 17, method="analytic").whole_image
    probed = probe_receptive_field(model, "out", 17)
    assert (probed.size, probed.stride, probed.offset) == (rf.size, rf.stride, rf.offset)


@pytest.mark.parametrize("stacked, probed_equal", [
    (lambda a, b: torch.stack([a, b], -1).amax(-1), True),  # the probe's amax is a mean: both branches
    (lambda a, b: torch.stack([a, b], dim=2).mean(2), True),
    (lambda a, b: torch.stack((a, b), 1).flatten(1, 2)[:, 1:3], True),  # a's channel 1 and b's channel 0
])
def test_stack_moves_the_positions(stacked, probed_equal):
    # stack(..., -1) puts the positions on dimensions 2 and 3 of a 5-d tensor: the walk took it as
    # pointwise, so the amax over the last dimension reduced a position axis: "whole image"
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Conv2d(3, 2, 3), nn.Conv2d(3, 2, 5, padding=1), nn.Conv2d(2, 2, 3, stride=2)

        def forward(self, x):
            return self.out(stacked(self.a(x), self.b(x)))

    # a: 3x3; b: 5x5 padding 1 (offset -1); out 3x3/2: the union 5 + 2 = 7, offset -1
    model = Stacked().eval()
    rf = receptive_field(model, "out", 17, method="analytic")
    assert (rf.size, rf.stride, rf.offset, rf.whole_image) == ((7, 7), (2, 2), (-1, -1), False)
    seen = _bounds(probe_gradient(model, "out", 17, [(3, 3)])[0])
    box = rf.box(3, 3)
    assert seen == box if probed_equal else (box[0] <= seen[0] and box[1] <= seen[1] and seen[2] <= box[2]
                                             and seen[3] <= box[3])


@pytest.mark.parametrize("model, missed", [
    (nn.Sequential(nn.Conv2d(3, 2, 3, padding=2, padding_mode="reflect"), nn.Conv2d(2, 2, 1)),
     r"module '0' \(Conv2d\) pads by reflection.*map row 0 \(boxes over input rows -2 to 0\) also see input rows "
     "1 to 2"),
    (nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(3, 2, 3)), r"module '0' \(ReflectionPad2d\)"),
    (nn.Sequential(nn.ReflectionPad2d((0, 0, 3, 0)), nn.Conv2d(3, 2, 3)),
     r"rows -3 to -1\) also see input rows 1 to 3"),
    (nn.Sequential(nn.ReplicationPad2d((0, 0, 3, 0)), nn.Conv2d(3, 2, 3)), "replication.*also see input rows 0 to 0"),
    (_Wrapped(lambda x: torch.cat([F.pad(x, (0, 3, 0, 0), mode="reflect")] * 2, 1)),
     r"pad\(mode='reflect'\).*columns"),
    (nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, 2, 3)), None),
    (nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 2, 7)), None),  # CycleGAN's first layer
    (nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 3, stride=2)), None),
    (nn.Sequential(nn.ReplicationPad2d(2), nn.Conv2d(3, 2, 3)), None),  # copies of row 0, inside the box
])
def test_reflection_and_replication_wider_than_the_window_are_warned_of(model, missed, recwarn):
    # Unit 0 of a 3x3 conv after a reflection of 2 reads padded rows -2 to 0, that is rows 2, 1 and 0: outside
    # its box's rows -2 to 0; only circular padding was warned of.
    model = model.eval()
    layer = "out" if isinstance(model, _Wrapped) else "1"
    rf = receptive_field(model, layer, 12, method="analytic")
    warned = [str(w.message) for w in recwarn if "pads by" in str(w.message)]
    assert len(warned) == (missed is not None)
    if missed:
        assert re.search(missed, warned[0]), warned[0]
    # the oracle: where the warning says so, the gradient reaches outside a border unit's box
    h, w = rf.map_size
    corners = [(0, 0), (h - 1, w - 1)]
    outside = False
    for (y, x), mask in zip(corners, probe_gradient(model, layer, 12, corners)):
        y0, x0, y1, x1 = _clip(rf.box(y, x), (12, 12))
        mask = mask.clone()
        mask[y0:y1 + 1, x0:x1 + 1] = False
        outside |= bool(mask.any())
    assert outside == (missed is not None)


class _SegNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 2, 3, padding=1), nn.MaxPool2d(2, return_indices=True)
        self.unpool, self.out = nn.MaxUnpool2d(2), nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        pooled, indices = self.pool(self.conv(x))
        return self.out(self.unpool(pooled, indices))


def test_max_unpooling_is_a_clear_error():
    # the probe's average pooling has no indices: max_unpool2d raised a raw TypeError
    with pytest.warns(UserWarning, match="MaxUnpool2d"), pytest.raises(ValueError, match="max unpooling"):
        receptive_field(_SegNetLike().eval(), "out", 16)
    with pytest.raises(ValueError, match="MaxUnpool2d"):
        receptive_field(_SegNetLike().eval(), "out", 16, method="analytic")
    rf = receptive_field(_SegNetLike().eval(), "conv", 16)  # before the unpooling: measured as ever
    assert (rf.size, rf.stride, rf.offset) == ((3, 3), (1, 1), (-1, -1))


def np_int(value):
    np = pytest.importorskip("numpy")
    return np.int64(value)


def test_boxes_and_tops_refuse_positions_outside_the_map():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Conv2d(2, 2, 3)).eval()
    rf = receptive_field(model, "1", 8)  # a 4x4 map
    assert rf.box(3, 3) == (3, 3, 7, 7) and rf.box(torch.tensor(1), np_int(2)) == (1, 2, 5, 6)
    for y, x, message in [(100, 100, "y = 100 is outside the layer's map, whose positions along y are 0 .. 3"),
                          (0, 4, "x = 4 is outside"), (-1, -1, "y = -1 is not a map position"),
                          (1.9, 0, "y must be an integer map position, got 1.9"), ("1", 0, "got '1' \\(str\\)"),
                          (True, 0, "integer map position")]:
        with pytest.raises(ValueError, match=message):
            rf.box(y, x)
    assert rf.tops(torch.tensor([0, 15])).tolist() == [[0, 0], [3, 3]]
    for positions, message in [(torch.tensor([16]), "from 16 to 16, outside the 4x4 map's 0 .. 15"),
                               (torch.tensor([-1, 3]), "from -1 to 3"), (torch.tensor([1.5]), "integer tensor"),
                               (torch.tensor([True, False]), "integer tensor, got torch.bool")]:  # were 1 and 0
        with pytest.raises(ValueError, match=message):
            rf.tops(positions)
    assert rf.tops(torch.tensor([7]), map_width=5).tolist() == [[1, 2]]  # another map's width: no height known
    assert rf.tops(torch.tensor([], dtype=torch.int64)).shape == (0, 2)
    # boxes may still lie outside the image where the network pads (documented)
    padded = receptive_field(nn.Sequential(nn.Conv2d(3, 2, 5, padding=2)).eval(), "0", 8)
    assert padded.box(0, 0) == (-2, -2, 2, 2)


def test_sizes_and_names_are_checked():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Conv2d(2, 2, 3)).eval()
    for size in [(16.7, 16), 16.0, (True, 16), (16, 16, 3)]:
        with pytest.raises(ValueError, match="input_size must be an int or \\(height, width\\) of whole pixels"):
            receptive_field(model, "1", size)
    assert receptive_field(model, "1", (np_int(16), 16)).map_size == (12, 12)
    for call in (lambda: receptive_field(model, "zzzzqq", 16), lambda: probe_receptive_field(model, "zzzzqq", 16),
                 lambda: probe_gradient(model, "zzzzqq", 16, [(0, 0)])):
        with pytest.raises(ValueError, match="unknown layer 'zzzzqq'.*the model's layers include 0, 1$"):
            call()
    many = nn.Sequential(*[nn.ReLU() for _ in range(12)])
    with pytest.raises(ValueError, match=r"include 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\. \(12 in all\)"):
        receptive_field(many, "zzzzqq", 16)


def test_the_walk_does_not_import_the_compiler_on_its_way_out():
    """The walk ends by raising from a node; fx's extra traceback for it imported torch._inductor and
    sympy (about a second, the first time), during which a Ctrl-C was lost and the walk fell back to the
    probe. Run in a fresh interpreter, where nothing else has imported them."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "import neuroidx_fast as nx\n"
            "from neuroidx_fast.demo_model import demo_model\n"
            "rf = nx.receptive_field(demo_model().eval(), 'conv2', 48)\n"
            "print(rf.method, 'torch._inductor' in sys.modules, 'sympy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["analytic", "False", "False"]


class _Picks(nn.Module):
    """A 3x3 and a 7x7 branch of ``channels`` channels each, merged by ``pick``, then an output named "out"."""

    def __init__(self, pick, out=None, channels=1):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, channels, 3, padding=1), nn.Conv2d(3, channels, 7, padding=3)
        self.pick, self.out = pick, out or nn.Identity()

    def forward(self, x):
        return self.out(self.pick(self.a(x), self.b(x)))


@pytest.mark.parametrize("pick", [
    torch.maximum,  # the probe's gradient went to the branch that won, the 3x3 one: 3x3
    torch.max,
    lambda a, b: torch.minimum(-a, -b),
    lambda a, b: torch.stack([a, b]).max(0).values,
    lambda a, b: torch.cat([a, b], 1).topk(1, dim=1).values,
    lambda a, b: torch.cat([a, b], 1).sort(1, descending=True)[0][:, :1],
    lambda a, b: torch.stack([a, b], 2).median(2).values,
])
def test_the_probe_reads_every_input_of_a_pick(pick):
    rf = probe_receptive_field(_Picks(pick).eval(), "out", 16)
    assert (rf.size, rf.stride, rf.offset, rf.whole_image) == ((7, 7), (1, 1), (-3, -3), False)


@pytest.mark.parametrize("global_max", [
    lambda y: y.flatten(2).max(-1).values[:, :, None, None],  # the probe saw the position that won: 3x3
    lambda y: y.flatten(2).amax(2, keepdim=True).unsqueeze(-1),
    lambda y: y.view(y.shape[0], y.shape[1], -1).max(dim=2, keepdim=True)[0].unsqueeze(-1),
    lambda y: y.flatten(2).topk(1, dim=-1).values.unsqueeze(-1),
    lambda y: y.amin(dim=(2, 3), keepdim=True),
])
def test_the_probe_sees_a_global_max_over_positions_mix_them(global_max):
    model = _Picks(lambda a, b: a * global_max(b), nn.Conv2d(4, 2, 1), channels=4).eval()
    assert probe_receptive_field(model, "out", 12).whole_image
    assert probe_gradient(model, "out", 12, [(5, 5)])[0].all()


class _FunctionalNorm(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.conv, self.out, self.kwargs = nn.Conv2d(3, 4, 3), nn.Identity(), kwargs
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        if "training" in self.kwargs:
            return self.out(F.batch_norm(self.conv(x), self.mean, self.var, **self.kwargs))
        stats = (None, None) if self.kwargs["use_input_stats"] else (self.mean, self.var)
        return self.out(F.instance_norm(self.conv(x), *stats, **self.kwargs))


@pytest.mark.parametrize("model, whole", [
    # eval mode without running statistics normalises by the batch's: the walk said 3x3, the probe crashed
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), True),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), False),
    # with running statistics, pointwise in eval mode: the walk said whole image
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True)), False),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)), True),
    (_FunctionalNorm(training=True), True),
    (_FunctionalNorm(training=False), False),
    (_FunctionalNorm(use_input_stats=False), False),
    (_FunctionalNorm(use_input_stats=True), True),
])
def test_norms_mix_positions_where_they_take_the_input_statistics(model, whole):
    model, layer = model.eval(), "out" if isinstance(model, _FunctionalNorm) else "1"
    for method in ("analytic", "probe"):
        rf = receptive_field(model, layer, 9, method=method)
        assert rf.whole_image == whole and (whole or (rf.size, rf.stride, rf.offset) == ((3, 3), (1, 1), (0, 0)))
    # the real model's gradient, on a random positive input, agrees
    x = torch.rand(1, 3, 9, 9, requires_grad=True)
    out = model(x) if isinstance(model, _FunctionalNorm) else model[:2](x)
    out[0, :, 3, 3].sum().backward()
    rows = (x.grad[0] != 0).any(0).any(1).nonzero().flatten().tolist()
    assert rows == (list(range(9)) if whole else [3, 4, 5])


def _negative_conv(cin, cout, k):
    conv = nn.Conv2d(cin, cout, k)
    with torch.no_grad():
        conv.weight.copy_(-conv.weight.abs() - 0.01)  # as a trained conv may be, in part
        conv.bias.zero_()
    return conv


@pytest.mark.parametrize("normalised", [
    lambda conv: torch.nn.utils.parametrizations.weight_norm(conv),
    lambda conv: torch.nn.utils.parametrizations.spectral_norm(conv),
    lambda conv: torch.nn.utils.weight_norm(conv),  # the old hook, deprecated
    lambda conv: torch.nn.utils.spectral_norm(conv),
])
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_the_probe_makes_computed_weights_positive(normalised):
    # weight_norm recomputes the weight each forward: the probe's positive weights went into a temporary,
    # the negative ones stayed, the ReLU zeroed everything: "no input pixel reaches '2'"
    model = nn.Sequential(normalised(_negative_conv(3, 4, 3)), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    x = torch.ones(1, 3, 9, 9)
    model(x)  # with gradients: the old weight_norm's weight is then a tensor that deepcopy refuses
    with torch.no_grad():
        before = model(x)
    rf = probe_receptive_field(model, "2", 9)
    assert (rf.size, rf.stride, rf.offset) == ((5, 5), (1, 1), (0, 0))
    assert probe_gradient(model, "2", 9, [(2, 2)])[0].sum() == 25
    with torch.no_grad():  # the user's model untouched (removing a parametrization edits its shared class)
        assert torch.equal(model(x), before)


class _SharedUntraceable(nn.Module):
    """A conv called twice, behind a branch on the data that torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        if x.sum() >= 0:
            x = x * 1
        return self.c(self.c(x))


def test_the_probe_refuses_a_shared_module():
    # the probe measured the first call (3x3) where the walk and the indexing refuse a shared module
    model = _SharedUntraceable().eval()
    with pytest.warns(UserWarning, match="gradient probe"), pytest.raises(SharedModuleError, match="'c' runs more"):
        receptive_field(model, "c", 9)
    with pytest.raises(SharedModuleError):
        probe_receptive_field(model, "c", 9)
    with pytest.raises(SharedModuleError):
        probe_gradient(model, "c", 9, [(1, 1)])


def test_the_probe_of_no_positions_is_empty():
    # it crashed reshaping a batch of no images
    masks = probe_gradient(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), "0", (8, 6), [])
    assert masks.shape == (0, 8, 6) and masks.dtype == torch.bool


@pytest.mark.parametrize("model, layer, size, expected", [
    # a 1x1 map at these sizes, no layer that mixes positions: the probe said "whole image"
    (nn.Sequential(nn.Conv2d(3, 3, 7, padding=3), nn.Conv2d(3, 3, 7, padding=3, stride=4)), "1", 3,
     ((13, 13), (4, 4), (-6, -6))),
    (vgg_m(10, input_size=224, width=0.05, fc_width=8), "conv5", 35, ((139, 139), (16, 16), (-52, -52))),
    # five 3x3/2 convs at 16 px: a 1x1 map at 32 px too, whose field spans it; it was called whole there
    (nn.Sequential(*[m for i in range(5) for m in (nn.Conv2d(3 if i == 0 else 4, 4, 3, 2, 1), nn.ReLU())]), "8", 16,
     ((63, 63), (32, 32), (-31, -31))),
])
def test_a_one_position_map_is_whole_only_if_a_larger_input_says_so(model, layer, size, expected):
    model = model.eval()
    analytic = receptive_field(model, layer, size, method="analytic")
    probed = probe_receptive_field(model, layer, size)
    for rf in (analytic, probed):
        assert (rf.size, rf.stride, rf.offset, rf.whole_image, rf.map_size) == expected + (False, (1, 1))
    # global pooling: a one-position map at every size, whole
    pooled = nn.Sequential(nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1)).eval()
    assert probe_receptive_field(pooled, "1", 5).whole_image


@pytest.mark.parametrize("size", [40, (40, 72)])
def test_fields_cut_by_rows_the_pooling_leaves_unread_count_as_cut(size, recwarn):
    # at 160 px, conv5's field of map row 5 spans rows 28 to 158: cut by the last row, which no pooling
    # window reads, it counted as uncut: stride 12, offset -36 and an "approximation" warning
    model = vgg_m(10, input_size=224, width=0.05, fc_width=8).eval()
    analytic = receptive_field(model, "conv5", size, method="analytic")
    probed = probe_receptive_field(model, "conv5", size)
    assert (analytic.size, analytic.stride, analytic.offset) == ((139, 139), (16, 16), (-52, -52))
    assert (probed.size, probed.stride, probed.offset, probed.map_size) == (
        analytic.size, analytic.stride, analytic.offset, analytic.map_size)
    assert not [w for w in recwarn if "approximation" in str(w.message)]
    # a field smaller than its neighbours elsewhere than at the last rows read is no cut one: adaptive pooling's
    # uneven windows (12 -> 5: rows 0-2, 2-4, 4-7, 7-9, 9-11) are still an approximation, said
    with pytest.warns(UserWarning, match="no single size and stride describe"):
        probe_receptive_field(_adaptive_model(5), "1", 12)


class _FixedPositionBesideAFlatten(nn.Module):
    """A head on fixed positions of a map (``read``: one position, a slice, an indexed crop), after a linear
    sized for 12 px inputs: no larger input reaches the head."""

    def __init__(self, read):
        super().__init__()
        self.read = read
        self.conv, self.fc = nn.Conv2d(3, 2, 3, stride=2), nn.Linear(2 * 5 * 5, 2)
        self.head = nn.Linear(read(torch.zeros(1, 2, 5, 5)).shape[1], 2)

    def forward(self, x):
        y = self.conv(x)
        z = self.fc(y.flatten(1))
        return self.head(self.read(y)) + 0 * z


def test_a_flatten_before_a_linear_sized_for_the_input_is_the_whole_image():
    # VGG-M's fc6 at 64 px reads rows 0 to 62 (no conv reads row 63) and accepts no larger input: the probe
    # gave a 63x63 box at offset 0
    model = vgg_m(10, input_size=64, width=0.05, fc_width=8).eval()
    for method in ("analytic", "probe"):
        rf = receptive_field(model, "fc6", 64, method=method)
        assert (rf.whole_image, rf.size, rf.box(0, 0)) == (True, (64, 64), (0, 0, 63, 63))


@pytest.mark.parametrize("read, expected", [
    (lambda y: y[:, :, 1, 1], ((3, 3), (2, 2))),
    # a crop of the map, flattened: it was called the whole image, as the crop was the last map
    (lambda y: y[:, :, 1:3, 1:3].flatten(1), ((5, 5), (2, 2))),
    (lambda y: y[:, :, [1, 2]][:, :, :, [2, 3]].flatten(1), ((5, 5), (2, 4))),
])
def test_a_unit_that_reads_fixed_positions_of_a_map_is_no_whole_image(read, expected):
    rf = probe_receptive_field(_FixedPositionBesideAFlatten(read).eval(), "head", 12)
    assert (rf.whole_image, rf.size, rf.offset) == (False,) + expected


def test_a_small_input_grows_past_4_times_while_its_fields_span_it():
    # an 89 px field at stride 4: at 8 px the map is 2x2, and at 32 px every field spans the image; the probe
    # stopped there and called the layer the whole image (ResNet18's layer3 at 16 to 32 px likewise)
    model = nn.Sequential(nn.Conv2d(3, 3, 9, 2, 4), nn.Conv2d(3, 3, 9, 2, 4), nn.Conv2d(3, 3, 9, padding=4),
                          nn.Conv2d(3, 3, 9, padding=4)).eval()
    for rf in (receptive_field(model, "3", 8, method="analytic"), probe_receptive_field(model, "3", 8)):
        assert (rf.size, rf.stride, rf.offset, rf.map_size, rf.whole_image) == ((89, 89), (4, 4), (-44, -44), (2, 2),
                                                                               False)


def _probed_sizes(monkeypatch):
    """The input sizes that the probe tries, in order."""
    import neuroidx_fast.rf_probe as rf_probe
    sizes, probe = [], rf_probe.probe_gradient
    monkeypatch.setattr(rf_probe, "probe_gradient", lambda model, layer, size, *rest: (
        sizes.append(tuple(size)), probe(model, layer, size, *rest))[1])
    return sizes


def test_the_probe_grows_each_axis_apart_and_an_axis_of_one_position_is_whole_along_it(monkeypatch):
    # pooling to (1, None): the map stays one row high at every height, and the probe doubled both sides up to
    # (256, 1024), then gave a field 256 rows high at stride 1 for a 32 px high input
    sizes = _probed_sizes(monkeypatch)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(3, 3, 3, padding=1),
                          nn.AdaptiveAvgPool2d((1, None)), nn.Conv2d(3, 3, (1, 3), padding=(0, 1))).eval()
    rf = probe_receptive_field(model, "4", (32, 64))
    assert (rf.size, rf.stride, rf.offset, rf.map_size, rf.whole_image) == ((32, 12), (1, 2), (0, -5), (1, 32), False)
    assert rf.box(0, 5) == (0, 5, 31, 16)
    assert sizes == [(32, 64), (64, 64), (128, 64), (256, 64)]
    # a thin input grows along its short side alone, up to a bound: VGG-M's conv5 at 27x300 went to 216x2400
    sizes.clear()
    rf = probe_receptive_field(vgg_m(10, input_size=224, width=0.05, fc_width=8).eval(), "conv5", (27, 300))
    assert (rf.size, rf.stride, rf.offset) == ((139, 139), (16, 16), (-52, -52))
    assert sizes == [(27, 300), (54, 300), (108, 300), (216, 300)]


class _Recorder(nn.Module):
    """Records, for each call, the batch size and whether gradients are on."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return x


def test_the_probe_runs_the_layers_after_the_target_once_without_gradients(monkeypatch):
    # to see a shared module, it ran the whole forward on every position's image with gradients
    import neuroidx_fast.rf_probe as rf_probe
    model = nn.Sequential(nn.Conv2d(3, 3, 3), _Recorder(), nn.Conv2d(3, 3, 3), _Recorder()).eval()
    probe = rf_probe._positive_copy(model)
    monkeypatch.setattr(rf_probe, "_positive_copy", lambda m: probe)
    masks = probe_gradient(model, "2", 9, [(0, 0), (2, 3), (4, 4)])
    assert [m.sum().item() for m in masks] == [25, 25, 25]
    # (batch, gradients on): the check for a second call on one image, then the probe's 3 images up to the layer
    assert probe[1].calls == [(1, False), (3, True)] and probe[3].calls == [(1, False)]
