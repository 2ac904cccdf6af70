"""Bad arguments to the public API get an error that names the argument, where torch's or Python's own
("too many dimensions 'str'", "'NoneType' object has no attribute 'named_modules'", "Overflow when
unpacking long long", "Expected one of cpu, cuda, ... device type") named neither it nor the fix."""

import numpy as np
import pytest
import torch
from torch import nn

import neuroidx_fast as nx
from neuroidx_fast import ops
from neuroidx_fast.data import Digits, Shapes
from neuroidx_fast.maximization import save_maximized
from neuroidx_fast.prepare import canonical_device, integer_tensor
from neuroidx_fast.table import load_table
from neuroidx_fast.train import evaluate_classifier, train_classifier
from tests.models import ImageSet, make_model


@pytest.fixture(scope="module")
def index():
    return nx.index_dataset(make_model("vgg"), ImageSet(n=6), ["features.2"], k=2, batch_size=3, progress=False)


@pytest.mark.parametrize("values", [["a"], [2**64], None, [0.5], [True]])
def test_integer_tensor_names_the_argument(values):
    with pytest.raises(ValueError, match="units must be integers"):
        integer_tensor("units", values)


def test_index_arguments(index):
    with pytest.raises(ValueError, match="units .* must be integers"):
        nx.neuron_features(index, "features.2", units=["a"])
    with pytest.raises(TypeError, match="index must be a NeuronIndex"):
        nx.neuron_features(None, "features.2")
    with pytest.raises(TypeError, match="unit must be an int"):
        index["features.2"].top(1.5)
    with pytest.raises(TypeError, match="unit must be an int"):
        index["features.2"].top(True)
    assert index["features.2"].top(np.int64(0)) == index["features.2"].top(0)


def test_models_and_layers_that_are_not_given():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
        nx.receptive_field(None, "conv", 32)
    with pytest.raises(TypeError, match="layers must be a module name or a list of them"):
        nx.index_dataset(make_model("vgg"), ImageSet(n=4), None, k=1, progress=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        evaluate_classifier(None, [(torch.rand(3, 8, 8), 0)])


def test_topk_ids_and_positions():
    top = nx.TopK(2, 1)
    for ids in (["a", "b"], [2**64, 1], None):
        with pytest.raises(TypeError, match="ids must be integers"):
            top.update(torch.rand(2, 2), ids)
    with pytest.raises(TypeError, match="positions must be integers"):
        top.update(torch.rand(2, 2), [0, 1], positions=[["a", "b"], ["c", "d"]])


def test_ops_fill_and_pad():
    with pytest.raises(TypeError, match="fill must be None, a number or one number per unit"):
        ops.mask_replicas(torch.rand(1, 2, 2, 2), torch.tensor([[True, False]]), "a")
    with pytest.raises(TypeError, match="pad must be 'gray', 'zero', 'edge', a number"):
        ops.pad_value(["a"], 3, "cpu")
    with pytest.raises(TypeError, match="units must be integer unit indices"):
        nx.ablation_drops(make_model("vgg"), ImageSet(n=4, size=16, classes=4), "features.2", units=[2**63],
                          progress=False)


def test_device_names():
    with pytest.raises(ValueError, match="device must be a torch device or its name.*'gpu'"):
        canonical_device("gpu")
    assert canonical_device("cpu") == torch.device("cpu")


def test_save_maximized_sizes(tmp_path):
    images = torch.rand(3, 3, 4, 4)
    for kwargs, name in ((dict(scale=0), "scale"), (dict(scale=1.5), "scale"), (dict(ncols=0), "ncols"),
                         (dict(gap=-1), "gap")):
        with pytest.raises(ValueError, match=f"{name} must be"):
            save_maximized(images, tmp_path / "m.png", **kwargs)
    save_maximized(images, tmp_path / "m.png", ncols=9, titles=["a", "b", "c"])


def test_built_in_datasets():
    assert Shapes(4, size=16, classes="red disk").classes == ["red disk"]
    with pytest.raises(ValueError, match="noise and color_jitter must be finite"):
        Shapes(4, noise="a")
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match="test_fraction must be a number"):
        Digits(test_fraction="a")
    with pytest.raises(ValueError, match="leaves the test split empty"):
        Digits(test_fraction=1e-9, split="test")


def test_tables_that_are_not_tables(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00garbage\x81")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for name in ("empty.csv", "binary.csv", "other.csv"):
        with pytest.raises(ValueError, match="is not a neuron table"):
            load_table(tmp_path / name)


def test_training_counts_accept_numpy_ints():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    data = [(torch.rand(3, 8, 8), i % 2) for i in range(4)]
    history = train_classifier(model, data, epochs=np.int64(1), batch_size=np.int32(2))
    assert len(history["loss"]) == 1


def test_a_preprocess_that_is_not_callable():
    """preprocess="imagenet" (the CLI's --normalize word) failed with "'str' object is not callable"."""
    model, data = make_model("vgg"), ImageSet(n=4, size=16, classes=4)
    calls = (lambda: nx.index_dataset(model, data, ["features.2"], k=1, preprocess="imagenet", progress=False),
             lambda: nx.ablation_drops(model, data, "features.2", preprocess="imagenet", progress=False),
             lambda: train_classifier(model, data, epochs=1, preprocess="imagenet"))
    for call in calls:
        with pytest.raises(TypeError, match="preprocess must be None or a callable"):
            call()
