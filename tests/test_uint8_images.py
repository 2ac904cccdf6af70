"""Datasets of 8-bit images as uint8 tensors (torchvision's read_image, PILToTensor) give exactly what the
same images give as float32 k / 255 (to_tensor): the index, Neuron Features, color selectivity, ablation."""

import pytest
import torch

import neuroidx_fast as nx
from tests.conftest import cpu_backends
from tests.models import make_model

LAYERS = ["features.0", "features.4", "features.8"]


class _EightBit(torch.utils.data.Dataset):
    """The same 8-bit images and labels, as uint8 tensors or as float32 k / 255."""

    def __init__(self, as_uint8: bool, n=14, size=18, classes=4):
        g = torch.Generator().manual_seed(3)
        self.codes = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.classes = [f"class{i}" for i in range(classes)]
        self.as_uint8 = as_uint8

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, i):
        image = self.codes[i] if self.as_uint8 else self.codes[i].float() / 255  # to_tensor's values
        return image, int(self.labels[i])


@pytest.fixture(scope="module")
def both():
    model = make_model("vgg")
    datasets = {kind: _EightBit(kind == "uint8") for kind in ("uint8", "float32")}
    indexes = {kind: nx.index_dataset(model, data, LAYERS, k=5, batch_size=6, progress=False)
               for kind, data in datasets.items()}
    return model, datasets, indexes


def test_the_index_is_the_same(both):
    _, _, indexes = both
    for layer in LAYERS:
        a, b = indexes["uint8"][layer], indexes["float32"][layer]
        for name in ("values", "ids", "positions", "mean_sum"):
            assert torch.equal(getattr(a, name), getattr(b, name)), f"{layer} {name}"
    assert indexes["uint8"].meta["pixel_mean"] == indexes["float32"].meta["pixel_mean"]


@pytest.mark.parametrize("pad", ["gray", "edge", "mean"])
def test_neuron_features_are_the_same_on_every_backend(both, pad, recwarn):
    _, datasets, indexes = both
    for backend in cpu_backends():
        # the Triton interpreter is slow: one layer, one pad mode
        for layer in LAYERS if backend != "triton" else (["features.4"] if pad == "gray" else []):
            a, b = (nx.neuron_features(indexes[kind], layer, datasets[kind], pad=pad, keep_crops=3, batch_size=4,
                                       backend=backend) for kind in ("uint8", "float32"))
            assert torch.equal(a.nf.nan_to_num(-1), b.nf.nan_to_num(-1)), f"{backend} {layer}"
            assert torch.equal(a.crops, b.crops), f"{backend} {layer}"
    assert not [w for w in recwarn if "outside [0, 1]" in str(w.message)]  # 8-bit pixels are in range


def test_color_selectivity_and_ablation_are_the_same(both):
    model, datasets, indexes = both
    colors = [nx.color_selectivity(model, indexes[kind], "features.4", datasets[kind], batch_size=5)
              for kind in ("uint8", "float32")]
    assert torch.equal(colors[0].nan_to_num(-9), colors[1].nan_to_num(-9))
    drops = [nx.ablation_drops(model, datasets[kind], "features.4", units=[0, 3], batch_size=5, progress=False)
             for kind in ("uint8", "float32")]
    assert torch.equal(drops[0].class_counts, drops[1].class_counts)
    assert torch.equal(drops[0].correct, drops[1].correct)


def test_other_integer_images_are_refused(both):
    model, datasets, _ = both
    ints = [(image.to(torch.int16), label) for image, label in datasets["uint8"]]
    with pytest.raises(ValueError, match="uint8 tensors of 8-bit pixels"):
        nx.index_dataset(model, ints, LAYERS, k=2, progress=False)


def test_contributions_training_and_image_sets_read_8bit_images_as_their_float_pixels(both):
    from neuroidx_fast.maximization import _image_batch
    from neuroidx_fast.train import evaluate_classifier

    model, datasets, _ = both
    image_u8, image_f = datasets["uint8"][0][0], datasets["float32"][0][0]
    a, b = nx.contributions(model, image_u8, "features.4"), nx.contributions(model, image_f, "features.4")
    assert torch.equal(a.values, b.values)
    assert torch.equal(_image_batch(datasets["uint8"]), _image_batch(datasets["float32"]))
    assert evaluate_classifier(model, datasets["uint8"]) == evaluate_classifier(model, datasets["float32"])


class _Mixed(torch.utils.data.Dataset):
    """_EightBit's images, uint8 where ``is_uint8(i)`` and float32 k / 255 elsewhere."""

    def __init__(self, is_uint8):
        self.eight_bit, self.is_uint8 = _EightBit(True), is_uint8
        self.classes = self.eight_bit.classes

    def __len__(self):
        return len(self.eight_bit)

    def __getitem__(self, i):
        image, label = self.eight_bit[i]
        return (image if self.is_uint8(i) else image.float() / 255), label


def test_uint8_and_float_images_in_one_batch_are_refused(both):
    # Stacked together, the uint8 images would become floats 0-255: wrong activations, no error.
    model, _, indexes = both
    mixed = _Mixed(lambda i: i % 2 == 0)
    match = r"different dtypes in one batch \(torch.float32, torch.uint8\).*same type"
    with pytest.raises(ValueError, match=match):
        nx.index_dataset(model, mixed, LAYERS, k=2, batch_size=6, progress=False)
    with pytest.raises(ValueError, match=match):
        nx.neuron_features(indexes["uint8"], "features.4", mixed, batch_size=4)
    with pytest.raises(ValueError, match=match):
        nx.ablation_drops(model, mixed, "features.4", units=[0], batch_size=5, progress=False)
    from neuroidx_fast.train import train_classifier

    for cache in (False, True):
        with pytest.raises(ValueError, match=match):
            train_classifier(make_model("vgg"), mixed, epochs=1, batch_size=4, cache=cache)


def test_batches_of_either_type_give_the_index_of_uint8_images(both):
    # Each batch is decoded as its own type: a dataset that changes type between batches is fine.
    model, _, indexes = both
    index = nx.index_dataset(model, _Mixed(lambda i: i < 6), LAYERS, k=5, batch_size=6, progress=False)
    for layer in LAYERS:
        for name in ("values", "ids", "positions"):
            assert torch.equal(getattr(index[layer], name), getattr(indexes["uint8"][layer], name)), f"{layer} {name}"


def test_images_of_different_shapes_in_one_batch_are_refused(both):
    model, datasets, _ = both
    items = [(image if i != 3 else image[:, :, :-2], label) for i, (image, label) in enumerate(datasets["uint8"])]
    with pytest.raises(ValueError, match=r"different shapes in one batch \(\(3, 18, 16\), \(3, 18, 18\)\).*one size"):
        nx.index_dataset(model, items, LAYERS, k=2, batch_size=6, progress=False)
