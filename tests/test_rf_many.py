"""receptive_fields(): several layers' receptive fields from one trace and one walk of the graph, the same
fields, warnings and errors as receptive_field() layer by layer (SPEC.md section 2)."""

import importlib
import warnings

import pytest
import torch
from torch import nn

import neuroidx_fast.rf_walk as rf_walk
from neuroidx_fast.receptive_fields import receptive_field, receptive_fields
from neuroidx_fast.hooks import SharedModuleError
from neuroidx_fast.indexing import _receptive_fields
from tests.models import make_model
from tests.test_receptive_fields import (CASES, AlexNetLike, Dilated, _adaptive_model, _AuxiliaryInTraining,
                                         _ConcatNet, _MixFFN, _SaturatingResidualNet, _SharedRelu, _WidenedInPlace)

rf_module = importlib.import_module("neuroidx_fast.receptive_fields")


def _outcome(value):
    """A field, or an error as its type and message (errors are not equal to one another)."""
    return (type(value), str(value)) if isinstance(value, Exception) else value


def _recorded(call):
    """(the call's value, its warnings as (category, message), in order), every warning kept."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = call()
    return value, [(w.category, str(w.message)) for w in caught]


def _layer_by_layer(model, layers, input_size, channels=3):
    def loop():
        found = {}
        for name in layers:
            try:
                found[name] = receptive_field(model, name, input_size, channels=channels)
            except Exception as exc:
                found[name] = exc
        return found

    found, warned = _recorded(loop)
    return {name: _outcome(v) for name, v in found.items()}, warned


def _together(model, layers, input_size, channels=3):
    found, warned = _recorded(lambda: receptive_fields(model, layers, input_size, channels=channels,
                                                       errors="return"))
    return {name: _outcome(v) for name, v in found.items()}, warned


def _assert_same_as_layer_by_layer(model, layers, input_size, channels=3):
    expected = _layer_by_layer(model, layers, input_size, channels)
    assert _together(model, layers, input_size, channels) == expected
    return expected[0]


@pytest.mark.parametrize("factory,layers,input_size,dilated", CASES)
def test_the_fields_of_the_receptive_field_tests_are_those_of_each_layer_alone(factory, layers, input_size, dilated):
    torch.manual_seed(0)
    found = _assert_same_as_layer_by_layer(factory().eval(), layers, input_size)
    assert all(rf.method == "analytic" for rf in found.values())


class _TwoFields(nn.Module):
    """A block that gives two maps of different fields (a tuple: its own walk reads the first)."""

    def __init__(self):
        super().__init__()
        self.small, self.big = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 7, padding=3)

    def forward(self, x):
        return self.small(x), self.big(x)


class _ReadsTheSecondField(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.pair, self.out = nn.Conv2d(3, 4, 3), _TwoFields(), nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x):
        return self.out(self.pair(self.stem(x))[1])


def _preactivated():
    """A block that changes its input in place (a pre-activation ReLU): its own walk fails, the graph
    inlining it does not."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3)),
                         nn.Conv2d(4, 4, 3, stride=2)).eval()


FALLBACKS = [
    # (model factory, layers, input size, channels, {layer: method or error type expected})
    (lambda: _ConcatNet(True).eval(), ["stem", "block", "block.b5"], 32, 3,
     {"stem": "analytic", "block": "probe", "block.b5": "probe"}),  # torch.roll: the walk stops, the probe measures
    (lambda: AlexNetLike().eval(), ["features.0", "features.10", "avgpool", "classifier.1"], 99, 3,
     {"features.0": "analytic", "avgpool": ValueError, "classifier.1": "probe"}),  # an upsampling adaptive pool
    (lambda: _WidenedInPlace().eval(), ["small", "big", "out"], 24, 3, {"small": "analytic", "out": "probe"}),
    (lambda: _SharedRelu().eval(), ["conv1", "r", "conv2"], 16, 3, {"conv2": "analytic", "r": SharedModuleError}),
    (Dilated, ["conv1", "nope", "conv4"], 31, 3, {"conv4": "analytic", "nope": ValueError}),  # a wrong name
    (lambda: _MixFFN(lambda x: x.flatten(2)).eval(), ["stem", "fc", "dw"], 16, 3, {"dw": "probe"}),
    (lambda: _AuxiliaryInTraining().train(), ["conv", "aux", "down"], 16, 3,
     {"down": "analytic", "aux": RuntimeError}),  # never called in eval mode
    (lambda: _SaturatingResidualNet(nn.ReLU6(inplace=True)).eval(), ["stem", "blocks.0", "blocks", "blocks.3", "out"],
     64, 3, {"blocks": "analytic", "out": "analytic"}),  # blocks nested in a requested block
    (lambda: _adaptive_model(4, then_conv=True), ["0", "1", "2"], 10, 3, {"2": "analytic"}),  # uneven: warned of
    (lambda: nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"), nn.Conv2d(2, 2, 3)).eval(),
     ["0", "1"], 12, 3, {"1": "analytic"}),  # circular padding: warned of for each layer
    (lambda: nn.Sequential(nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(3, 2, 3)), nn.Conv2d(2, 2, 3)).eval(),
     ["0", "1"], 12, 3, {"1": "analytic"}),  # a reflection inside a block, wider than the window after it
    (lambda: nn.Sequential(nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(3, 2, 3)), nn.Conv2d(2, 2, 3)).eval(),
     ["0", "0.1", "1"], 12, 3, {"1": "analytic"}),
    (lambda: _ReadsTheSecondField().eval(), ["stem", "pair", "out"], 20, 3, {"out": "analytic"}),
    (lambda: nn.Sequential(nn.Conv2d(3, 2, 3, padding=2, padding_mode="reflect"), nn.Conv2d(2, 2, 1)).eval(),
     ["0", "1"], 12, 3, {"1": "analytic"}),
    (_preactivated, ["0", "1", "2"], 16, 3, {"1": "probe", "2": "analytic"}),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 7), nn.Conv2d(4, 4, 7)).eval(), ["0", "1"], 8, 3,
     {"0": "analytic", "1": ValueError}),  # too small an input for layer 1
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2)).eval(), ["0", "2"], 16, 3,
     {"2": ValueError}),  # a gray model given the default 3 channels
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2)).eval(), ["0", "2"], 16, 1,
     {"2": "analytic"}),
    (lambda: make_model("resnet"), ["stem", "layer1"], (0, 14), 3, {"stem": ValueError}),  # a wrong input size
]


@pytest.mark.parametrize("factory,layers,input_size,channels,expected", FALLBACKS)
def test_fallbacks_warnings_and_errors_are_those_of_each_layer_alone(factory, layers, input_size, channels, expected):
    torch.manual_seed(0)
    found = _assert_same_as_layer_by_layer(factory(), layers, input_size, channels)
    for name, what in expected.items():  # the cases are the ones meant: a probe, an error
        assert issubclass(found[name][0], what) if isinstance(what, type) else (found[name].method == what), name


@pytest.mark.parametrize("action", ["default", "once", "ignore"])
def test_warnings_shown_under_other_filters_are_those_of_each_layer_alone(action):
    # a warning during the shared walk is left for each layer's own walk to give, where the filters decide
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"), nn.Conv2d(2, 2, 3)).eval()

    def shown(call):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter(action)
            call()
        return [str(w.message) for w in caught]

    alone = shown(lambda: [receptive_field(model, name, 12) for name in ("0", "1")])
    assert shown(lambda: receptive_fields(model, ["0", "1"], 12)) == alone
    assert len(alone) == {"default": 1, "once": 1, "ignore": 0}[action]


def test_the_resnet50_shaped_blocks_of_the_benchmark():
    from bench.bench_index import resnet50_shaped

    torch.manual_seed(0)
    model, names = resnet50_shaped()
    found = _assert_same_as_layer_by_layer(model.eval(), names, 64)
    assert [rf.stride for rf in found.values()] == [(4, 4)] * 3 + [(8, 8)] * 4 + [(16, 16)] * 6 + [(32, 32)] * 3


def test_the_model_is_traced_and_walked_once(monkeypatch):
    traced, alone = [], []
    trace, analytic = rf_walk._trace, rf_module._analytic
    monkeypatch.setattr(rf_walk, "_trace", lambda module, leaves=(): traced.append(module) or trace(module, leaves))
    monkeypatch.setattr(rf_module, "_analytic", lambda model, layer, *args: alone.append(layer)
                        or analytic(model, layer, *args))
    model = make_model("resnet")
    layers = ["stem", "layer1", "layer2"]
    fields = receptive_fields(model, layers, (17, 14))
    # the model once, and each block walked inside once; no layer walked alone
    assert traced == [model, model.layer1, model.layer2] and alone == []
    assert fields == {name: receptive_field(model, name, (17, 14)) for name in layers}
    traced.clear(), alone.clear()
    receptive_fields(model, ["stem", "layer1.conv1", "layer1", "layer1.conv2", "layer2.down"], (17, 14))
    # a layer that holds another one asked for is no leaf of the shared trace: it alone is walked alone
    assert alone == ["layer1"] and [m for m in traced if m is model] == [model, model]


def test_errors_raise_stops_at_the_first_layer_without_a_field():
    with pytest.raises(SharedModuleError, match="runs more than once"):
        receptive_fields(_SharedRelu().eval(), ["conv1", "r", "conv2"], 16)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        receptive_fields(_SharedRelu().eval(), ["nope"], 16)
    with pytest.raises(ValueError, match="errors must be 'raise' or 'return'"):
        receptive_fields(_SharedRelu().eval(), ["conv1"], 16, errors="ignore")


def test_warnings_point_at_the_caller():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=2, padding_mode="reflect"), nn.Conv2d(2, 2, 1)).eval()
    for call in (lambda: receptive_field(model, "1", 12), lambda: receptive_fields(model, ["1"], 12),
                 lambda: receptive_field(_ConcatNet(True).eval(), "block", 32),
                 lambda: receptive_fields(_ConcatNet(True).eval(), ["block"], 32)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [w.filename for w in caught if "pads by" in str(w.message) or "graph walk" in str(w.message)] == [
            __file__]


def test_the_index_records_the_fields_it_finds_and_warns_of_the_others():
    with pytest.warns(UserWarning, match="no receptive field recorded for 'r'"):
        found = _receptive_fields(_SharedRelu().eval(), ["conv1", "r", "conv2"], (16, 16), 3)
    assert found == {name: {"size": list(rf.size), "stride": list(rf.stride), "offset": list(rf.offset),
                            "whole_image": rf.whole_image, "method": rf.method}
                     for name, rf in ((n, receptive_field(_SharedRelu().eval(), n, 16)) for n in ("conv1", "conv2"))}


class _TransposedAfter(nn.Module):
    """Transposes a layer's output in place after the layer: the shared walk goes on past the layer and
    must keep the map size it had there."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = self.a(x)
        y.transpose_(2, 3)
        return self.b(y)


def test_an_output_changed_in_place_after_its_layer_keeps_the_layers_map_size():
    found = _assert_same_as_layer_by_layer(_TransposedAfter().eval(), ["a", "b"], (16, 24))
    assert found["a"].map_size == (14, 22)


class _WarnsOnce(nn.Module):
    """Warns once per process between its two layers (as models do with a 'warned' flag)."""

    warned = False

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = self.a(x)
        if not _WarnsOnce.warned:
            _WarnsOnce.warned = True
            warnings.warn("model: deprecated input convention")
        return self.b(y)


def test_a_warning_given_once_is_shown_though_the_shared_walk_met_it():
    """The shared walk records warnings (each stops it) and the layers' own walks give theirs again; one
    that the model gives once per process is not given again, and was lost."""
    model = _WarnsOnce().eval()
    _WarnsOnce.warned = False
    together = _together(model, ["a", "b"], 16)
    _WarnsOnce.warned = False
    assert together == _layer_by_layer(model, ["a", "b"], 16)
    assert (UserWarning, "model: deprecated input convention") in together[1]
