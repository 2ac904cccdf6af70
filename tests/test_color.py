"""Color selectivity (SPEC.md section 4) against the authors' loop: every top image re-run one at a time."""

import numpy as np
import pytest
import torch
from torch import nn

import neuroidx_fast as nx
from neuroidx_fast.color import color_selectivity, luminance
from neuroidx_fast.hooks import LayerCapture
from tests.models import ImageSet, make_model

LAYERS = ["features.1", "features.5", "features.8"]


def _normalise(x):
    return (x - 0.45) / 0.25


@pytest.fixture(scope="module")
def indexed():
    model = make_model("resnet")
    dataset = ImageSet(n=17, size=14, seed=3)
    layers = ["stem", "layer1", "layer2.conv1", "layer2"]
    index = nx.index_dataset(model, dataset, layers, k=4, batch_size=5, preprocess=_normalise, progress=False)
    return model, dataset, index, layers


def _activation(model, layer, image, preprocess):
    with torch.no_grad(), LayerCapture(model, [layer]) as capture:
        out = capture.run(preprocess(image[None]))[layer]
    return out[0].reshape(out.shape[1], -1)


def _pca_gray(image, box):
    """One crop by hand with numpy: project the box's pixels on their first principal component."""
    y0, x0, y1, x1 = box
    h, w = image.shape[1:]
    ya, yb, xa, xb = max(y0, 0), min(y1, h - 1) + 1, max(x0, 0), min(x1, w - 1) + 1
    crop = image[:, ya:yb, xa:xb].double().numpy()
    pixels = crop.reshape(3, -1).T
    centred = pixels - pixels.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred / len(pixels))
    axis = vectors[:, -1] * (1 if vectors[:, -1] @ np.array([0.299, 0.587, 0.114]) >= 0 else -1)
    t = centred @ axis
    gray = (t - t.min()) / (t.max() - t.min())
    out = image.clone()
    out[:, ya:yb, xa:xb] = torch.from_numpy(gray.reshape(yb - ya, xb - xa)).float()
    return out


def _brute_force(model, index, layer, dataset, gray, preprocess):
    L, rf = index[layer], index.receptive_field(layer)
    alphas = []
    for c in range(L.num_units):
        if L.ids[c, 0] < 0 or not L.values[c, 0] > 0:
            alphas.append(float("nan"))
            continue
        top, again = 0.0, 0.0
        for j in range(L.k):
            image = dataset[int(L.ids[c, j])][0]
            pos = int(L.positions[c, j])
            if gray == "luminance":
                grayed = luminance(image[None])[0]
            else:
                grayed = _pca_gray(image, rf.box(*divmod(pos, L.map_size[1])))
            top += float(L.values[c, j])
            again += float(_activation(model, layer, grayed, preprocess)[c, pos])
        alphas.append(1 - again / top)
    return torch.tensor(alphas)


@pytest.mark.parametrize("gray", ["luminance", "pca"])
def test_equals_the_per_image_loop(indexed, gray):
    model, dataset, index, layers = indexed
    result = color_selectivity(model, index, layers, gray=gray, batch_size=3, preprocess=_normalise)
    for layer in layers:
        expected = _brute_force(model, index, layer, dataset, gray, _normalise)
        torch.testing.assert_close(result[layer], expected, atol=2e-5, rtol=1e-5, equal_nan=True)


def test_one_layer_matches_the_shared_pass(indexed):
    model, _, index, layers = indexed
    together = color_selectivity(model, index, layers, preprocess=_normalise)
    alone = color_selectivity(model, index, "layer2", preprocess=_normalise, batch_size=2)
    torch.testing.assert_close(alone, together["layer2"], atol=1e-5, rtol=1e-5, equal_nan=True)


def test_in_place_ops_after_a_layer_do_not_change_its_alpha():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True)).eval()
    index = nx.index_dataset(model, ImageSet(n=12), ["0", "2"], k=3, batch_size=5, progress=False)
    together = color_selectivity(model, index, ["0", "2"])
    alone = color_selectivity(model, index, "0")  # the deepest layer asked: the forward stops there
    torch.testing.assert_close(together["0"], alone, atol=1e-6, rtol=1e-6, equal_nan=True)


class Planted(nn.Module):
    """Unit 0 sees red minus green and blue; unit 1 sees luminance exactly; unit 2 never fires."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, :, 0, 0] = torch.tensor([1.0, -0.5, -0.5])
            self.conv.weight[1, :, 0, 0] = torch.tensor([0.299, 0.587, 0.114])
            self.conv.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


class _NaNMaps(nn.Module):
    """A conv whose unit 0 map is all NaN on the images whose first pixel is exactly 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        poisoned = (x[:, 0, 0, 0] == 1.0)[:, None, None, None] & (torch.arange(3) == 0)[None, :, None, None]
        return torch.where(poisoned, torch.full_like(h, float("nan")), h)


@pytest.mark.parametrize("gray", ["luminance", "pca"])
def test_minus_inf_slots_take_no_part(gray):
    # nan="ignore" ranks an all-NaN map at -inf with its image: not an image that drives the unit. With K
    # above the finite images the -inf entered sum_j a_j (alpha 1.0 or NaN for a live unit).
    torch.manual_seed(0)
    model = nn.Sequential(_NaNMaps(), nn.ReLU()).eval()
    images = torch.rand(8, 3, 10, 10) * 0.9
    images[:2, 0, 0, 0] = 1.0
    data = [(images[i], i % 2) for i in range(8)]
    index = nx.index_dataset(model, data, ["0"], k=8, progress=False, nan="ignore")
    L = index["0"]
    assert L.values[0, -2:].tolist() == [float("-inf")] * 2 and bool((L.ids[0] >= 0).all())
    alpha = color_selectivity(model, index, "0", gray=gray)
    assert torch.isfinite(alpha).all()
    # the same as with those slots empty
    L.ids[L.values == float("-inf")] = -1
    assert torch.equal(color_selectivity(model, index, "0", gray=gray), alpha)


@pytest.mark.parametrize("gray", ["luminance", "pca"])
def test_a_model_call_that_does_not_give_back_the_index_is_warned_of(indexed, gray, recwarn):
    model, dataset, index, layers = indexed
    color_selectivity(model, index, layers, dataset, gray=gray, preprocess=_normalise)
    assert not [w for w in recwarn if "give back" in str(w.message)]
    with pytest.warns(UserWarning, match=r"color selectivity of 'stem': the model does not give back the "
                                         r"index's top activations.*pass the preprocess= and autocast_dtype="):
        color_selectivity(model, index, "stem", dataset, gray=gray)  # the index was built with _normalise


def test_planted_color_and_gray_units():
    model = Planted().eval()
    dataset = ImageSet(n=12, size=6, seed=1)
    index = nx.index_dataset(model, dataset, ["relu"], k=5, progress=False)
    alpha = color_selectivity(model, index, "relu")
    assert alpha[0] > 0.99  # a gray image has R = G = B: the red detector goes silent
    assert abs(float(alpha[1])) < 1e-5  # the luminance unit sees the same value on the gray image
    assert torch.isnan(alpha[2])
    pca = color_selectivity(model, index, "relu", gray="pca")
    assert pca[0] > 0.99 and torch.isnan(pca[2])


def test_model_mode_is_restored_and_bad_input(indexed, tmp_path):
    model, dataset, index, _ = indexed
    model.train()
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][:1]
    for m in frozen:
        m.eval()  # a frozen part of a training model stays frozen
    color_selectivity(model, index, "stem", preprocess=_normalise)
    assert model.training and frozen and not any(m.training for m in frozen)
    model.eval()
    with pytest.raises(ValueError, match="gray must be"):
        color_selectivity(model, index, "stem", gray="hsv")
    with pytest.raises(ValueError, match="closest names"):
        color_selectivity(model, index, "stemm")
    index.save(tmp_path / "i")
    loaded = nx.NeuronIndex.load(tmp_path / "i")
    with pytest.raises(ValueError, match="pass the dataset"):
        color_selectivity(model, loaded, "stem")
    # images of another size: pos_j would be read from maps of another width
    with pytest.raises(ValueError, match="index was built on 3 x"):
        color_selectivity(model, loaded, "stem", ImageSet(n=len(dataset), size=dataset[0][0].shape[-1] + 4))
    assert torch.allclose(color_selectivity(model, loaded, "stem", dataset, preprocess=_normalise),
                          color_selectivity(model, index, "stem", preprocess=_normalise), equal_nan=True)
