"""receptive_field on graphs a review found mishandled: branches the layer does not read, a map whose last
unit reads padding alone, layers that move positions across the map, subclasses of pointwise modules that
override their forward, and sizes given as numpy ints; and what a second review found of those fixes."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroidx_fast import receptive_field
from neuroidx_fast.receptive_fields import probe_receptive_field, receptive_fields


def _field(model, layer, size, method="auto"):
    """(the field, the messages of the warnings it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rf = receptive_field(model.eval(), layer, size, method=method)
    return rf, [str(w.message) for w in caught]


class _SideBranch(nn.Module):
    """Returns the target ``b``'s map and a side branch it never reads, traced before it."""

    def __init__(self, side):
        super().__init__()
        self.side = side
        self.a = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular" if side == "circular" else "zeros")
        self.valid, self.strided = nn.Conv2d(3, 4, 17), nn.Conv2d(3, 4, 3, 2, 1)  # 32 -> 16 at strides 1 and 2
        self.b = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if self.side == "circular":
            side = self.a(x)
        elif self.side == "interpolate":
            side = F.interpolate(self.a(x), scale_factor=0.5)
        elif self.side == "uneven":
            side = F.adaptive_avg_pool2d(self.a(x), 10)  # (32 -> 10: windows of unequal sizes, warned of)
        else:
            side = torch.cat([self.valid(x), self.strided(x)], 1)  # no field: strides differ
        return self.b(x), side


@pytest.mark.parametrize("side", ["circular", "interpolate", "strides", "uneven"])
def test_a_branch_the_layer_does_not_read_changes_nothing(side):
    # before: a circular-padding warning, a fall back to the probe, or "cannot merge branches"
    rf, messages = _field(_SideBranch(side), "b", 32)
    assert (rf.size, rf.stride, rf.offset, rf.method) == ((3, 3), (1, 1), (-1, -1), "analytic")
    assert messages == []
    with warnings.catch_warnings(record=True) as caught:  # the layers of one model in one walk: the same
        warnings.simplefilter("always")
        assert receptive_fields(_SideBranch(side).eval(), ["b"], 32) == {"b": rf}
    assert caught == []


def test_the_probe_takes_a_last_unit_that_reads_padding_alone():
    # the conv pads by 1 with a 1x1 kernel: the map's border units read padding alone (before: "found no
    # input pixel"); Softsign is unknown to the walk, so the default method falls back to the probe too
    model = nn.Sequential(nn.Conv2d(3, 4, 1, padding=1), nn.Softsign())
    for method in ("probe", "auto"):
        rf, _ = _field(model, "1", 20, method)
        assert (rf.size, rf.stride, rf.offset, rf.method) == ((1, 1), (1, 1), (-1, -1), "probe")


class _Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.roll(self.c1(x), shifts=2, dims=3))


class _RowsConvolvedAsTokens(nn.Module):
    """A 1-d conv over the flattened positions: a unit at a row's end reads the next row's start."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.tokens = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.c1(x)
        return self.c2(self.tokens(x.flatten(2)).view(x.shape))


@pytest.mark.parametrize("model", [_Rolled, _RowsConvolvedAsTokens])
def test_the_probe_warns_of_fields_that_move_across_the_map(model):
    # before: boxes from the fields near the centre, and the corner units' fields outside them unsaid
    _, messages = _field(model(), "c2", 16)
    assert any("corners of its map" in m for m in messages), messages


def test_the_probe_of_an_ordinary_net_gives_no_corner_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 5, 2, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                          nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.ZeroPad2d((1, 0, 2, 0)), nn.Conv2d(4, 4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probed = probe_receptive_field(model.eval(), "5", 40)
    assert (probed.size, probed.stride) == (receptive_field(model, "5", 40).size, (4, 4))


class _BlurDropout(nn.Dropout):
    """A Dropout whose forward blurs (5x5): not pointwise, though a Dropout."""

    def forward(self, x):
        return F.avg_pool2d(x, 5, 1, 2)


class _ScaledReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x) * 2


def test_a_pointwise_subclass_that_overrides_forward_is_walked_through():
    blurred = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _BlurDropout(), nn.Conv2d(4, 4, 3, padding=1))
    rf, messages = _field(blurred, "2", 16)
    assert (rf.size, rf.offset, rf.method) == ((9, 9), (-4, -4), "analytic") and messages == []  # was 5x5
    assert probe_receptive_field(blurred, "2", 16).size == (9, 9)
    scaled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _ScaledReLU(), nn.Conv2d(4, 4, 3, padding=1))
    rf, messages = _field(scaled, "2", 16)
    assert (rf.size, rf.method) == ((5, 5), "analytic") and messages == []
    patched = nn.Dropout()
    patched.forward = lambda x: F.avg_pool2d(x, 3, 1, 1)  # a forward set on the instance
    rf, _ = _field(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), patched, nn.Conv2d(4, 4, 1)), "2", 16)
    assert rf.size == (5, 5)


def test_numpy_sizes_are_taken():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert receptive_field(model, "0", np.int64(32)).input_size == receptive_field(model, "0", 32).input_size
    with pytest.raises(ValueError, match="input_size"):
        receptive_field(model, "0", np.float64(32.0))


def test_a_layer_with_a_forward_set_on_it_is_probed():
    patched = nn.Conv2d(4, 4, 1)
    patched.forward = lambda x: F.avg_pool2d(x, 3, 1, 1)  # conv geometry no more: 1x1 -> 3x3
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), patched)
    rf, messages = _field(model, "1", 16)
    assert (rf.size, rf.method) == ((5, 5), "probe") and any("set on the Conv2d" in m for m in messages)


class _InPlaceFromABranch(nn.Module):
    """The layer's input changed in place by a value the walk does not know (a roll of it)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.c1(x)
        a.mul_(torch.roll(a, 5, dims=3))  # (the roll's node is read by the in-place product alone)
        return self.c2(a)


def test_an_in_place_change_by_an_unknown_branch_stops_the_walk():
    # a first fix took the roll, which the layer does not read itself, for a value of no field: 5x5, analytic
    rf, messages = _field(_InPlaceFromABranch(), "c2", 16)
    assert rf.method == "probe" and any("gradient probe" in m for m in messages)
    assert rf.size[1] > 5


class _CoordinateAttention(nn.Module):
    def __init__(self, reduce):
        super().__init__()
        self.reduce = reduce
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.c1(x)
        return self.c2(a * torch.sigmoid(self.reduce(a)))


@pytest.mark.parametrize("reduce", [lambda a: a.mean(3, keepdim=True), lambda a: a.amax(2, keepdim=True)])
def test_a_reduction_over_one_axis_broadcast_back_sees_the_whole_image(reduce):
    # a first fix made the reduced map a window over that axis, which the product then refused to merge
    rf, messages = _field(_CoordinateAttention(reduce), "c2", 32)
    assert (rf.whole_image, rf.method, messages) == (True, "analytic", [])


def test_sizes_given_as_arrays_of_two_are_taken():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    for size in (np.array([32, 24]), torch.tensor([32, 24]), (np.int64(32), 24)):
        assert receptive_field(model, "0", size).input_size == (32, 24)


class _ViewChangedInPlace(nn.Module):
    """Half of the layer's input changed in place through a view (narrow: an op the walk does not know)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.c1(x)
        half = a.narrow(3, 0, 8)
        half.mul_(torch.roll(half, 5, 3))
        return self.c2(a)


class _UnreadChangedInPlace(nn.Module):
    """A second output, a constant, changed in place by a roll: the layer reads neither."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        a = self.c1(x)
        aux = torch.zeros(1, 4, 1, 1).repeat(x.shape[0], 1, x.shape[2], x.shape[3])
        aux.add_(torch.roll(a, 5, 3))
        return self.c2(a), aux


def test_in_place_changes_count_where_the_layer_reads_their_memory():
    # a view of the layer's input changed in place by an unknown op: the walk said 5x5 (the probe: 5x10); a
    # value the layer never reads, changed so: the walk stopped, warning of a widened field
    rf, _ = _field(_ViewChangedInPlace(), "c2", 16)
    with pytest.warns(UserWarning, match="corners of its map"):  # (the roll's)
        probed = probe_receptive_field(_ViewChangedInPlace().eval(), "c2", 16)
    assert rf.method == "probe" and rf.size == probed.size
    rf, messages = _field(_UnreadChangedInPlace(), "c2", 16)
    assert (rf.size, rf.method, messages) == ((5, 5), "analytic", [])
