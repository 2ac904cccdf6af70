"""Color selectivity (SPEC.md section 4) against the authors' loop: every top image re-run one at a time."""

import re

import numpy as np
import pytest
import torch
from torch import nn

import neuroidx_fast as nx
from neuroidx_fast.color import color_selectivity, luminance, pca_gray_crops
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


def _normalise_in_place(x):
    return x.sub_(0.45).div_(0.25)


@pytest.mark.parametrize("gray", ["luminance", "pca"])
def test_a_preprocess_that_works_in_place_gives_the_same_alpha(indexed, gray):
    """The check that the model gives back the index ran the first batch through preprocess, which may
    work in place (Normalize(inplace=True)): the gray versions of that batch were then made from
    normalised pixels, and its alphas were wrong without a word."""
    model, _, index, layers = indexed
    expected = color_selectivity(model, index, layers, gray=gray, batch_size=64, preprocess=_normalise)
    got = color_selectivity(model, index, layers, gray=gray, batch_size=64, preprocess=_normalise_in_place)
    for layer in layers:
        assert torch.equal(got[layer].isnan(), expected[layer].isnan())
        torch.testing.assert_close(got[layer], expected[layer], atol=1e-6, rtol=1e-6, equal_nan=True)


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
    # (said, where it makes the unit's mean activation NaN for good)
    with pytest.warns(UserWarning, match=r"'0': the spatial mean of unit\(s\) \[0\] is NaN on image id\(s\) \[0, 1\]"):
        index = nx.index_dataset(model, data, ["0"], k=8, progress=False, nan="ignore")
    L = index["0"]
    assert L.values[0, -2:].tolist() == [float("-inf")] * 2 and bool((L.ids[0] >= 0).all())
    assert L.mean_activation()[0].isnan() and not L.mean_activation()[1:].isnan().any()
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


class _NaNWhere(nn.Module):
    """Units R and G of each pixel; with ``nan_on`` "gray" (or "color"), unit 0 is NaN at the gray pixels
    (R == G == B), or at the others."""

    nan_on = None

    def forward(self, x):
        out = x[:, :2].clone()
        gray = (x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])
        if self.nan_on is not None:
            out[:, 0][gray if self.nan_on == "gray" else ~gray] = float("nan")
        return out


@pytest.fixture(scope="module")
def nan_where():
    torch.manual_seed(0)
    model = nn.Sequential(_NaNWhere()).eval()
    data = [(image, i % 2) for i, image in enumerate(torch.rand(6, 3, 5, 5))]
    return model, data, nx.index_dataset(model, data, ["0"], k=3, progress=False)


@pytest.mark.parametrize("gray", ["luminance", "pca"])
def test_nan_gray_activations_and_pixels_are_errors(nan_where, gray, monkeypatch):
    # SPEC.md 3 keeps NaN for dead units: a NaN a'_j of a live unit gave a NaN alpha silently
    model, data, index = nan_where
    monkeypatch.setattr(model[0], "nan_on", "gray")
    top = re.escape(str(sorted(index["0"].ids[0].tolist())))
    with pytest.raises(ValueError, match=rf"'0': the model gives NaN .* top image\(s\) {top} for unit\(s\) \[0\] .*"
                                         "check the model"):
        color_selectivity(model, index, "0", gray=gray)
    monkeypatch.setattr(model[0], "nan_on", None)
    poisoned = [(image.clone().index_put_((torch.tensor(0),) * 3, torch.tensor(float("nan"))), label)
                for image, label in data]
    with pytest.raises(ValueError, match="hold NaN or infinite pixels"):
        color_selectivity(model, index, "0", poisoned, gray=gray)


def test_a_model_that_gives_nan_on_the_top_images_is_warned_of(nan_where, monkeypatch):
    model, _, index = nan_where
    monkeypatch.setattr(model[0], "nan_on", "color")  # NaN on the color images only: the gray ones pass
    with pytest.warns(UserWarning, match=r"does not give back the index's top activations on 3 of 6"):
        color_selectivity(model, index, "0")


def test_luminance_and_pca_of_8_bit_pixels():
    # uint8 images are 8-bit pixels (k / 255): the weights cast to uint8 were 0, the pca gray cast back to 0 or 1
    codes = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels = codes.float() / 255
    tops = torch.tensor([[0, 1], [2, 2]])
    assert torch.equal(luminance(codes), luminance(pixels)) and luminance(codes).dtype == torch.float32
    assert torch.equal(pca_gray_crops(codes, tops, (2, 3)), pca_gray_crops(pixels, tops, (2, 3)))
    for function in (luminance, lambda x: pca_gray_crops(x, tops, (2, 3))):
        with pytest.raises(ValueError, match="pixel-space images in .* or uint8 8-bit pixels, got torch.int64"):
            function(codes.long())


@pytest.mark.parametrize("gray", ["luminance", "pca"])
def test_a_training_model_gives_the_eval_alpha(gray):
    # eval mode matters (SPEC.md 4): BatchNorm's batch statistics and Dropout would change a'_j
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    index = nx.index_dataset(model.eval(), ImageSet(n=10, size=8), ["5"], k=3, progress=False)
    expected = color_selectivity(model, index, "5", gray=gray)
    alpha = color_selectivity(model.train(), index, "5", gray=gray, batch_size=4)
    assert model.training
    torch.testing.assert_close(alpha, expected, atol=1e-6, rtol=1e-6, equal_nan=True)


def test_batch_size_takes_numpy_integers(nan_where):
    model, _, index = nan_where
    assert torch.equal(color_selectivity(model, index, "0", batch_size=np.int64(2)),
                       color_selectivity(model, index, "0", batch_size=2))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            color_selectivity(model, index, "0", batch_size=bad)


class _RedMinusGreenPlusBlue(nn.Module):
    """A 1x1 conv without a ReLU: R - G + B, so a red image gives +1 and a green one -1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.conv(x)


def _flat(r, g, b):
    return torch.tensor([r, g, b]).view(3, 1, 1).expand(3, 4, 4).clone()


def test_a_live_unit_whose_top_activations_sum_to_zero_or_less_is_named():
    # a_1 = 1 > 0 (live), a_2 = -1: sum_j a_j = 0, and 1 - sum a' / sum a was -inf without a word; SPEC.md 4
    # reports the value as is
    model = _RedMinusGreenPlusBlue().eval()
    data = [(_flat(1.0, 0.0, 0.0), 0), (_flat(0.0, 1.0, 0.0), 1)]
    index = nx.index_dataset(model, data, ["conv"], k=2, progress=False)
    assert index["conv"].values.tolist() == [[1.0, -1.0]] and not bool(index["conv"].dead()[0])
    with pytest.warns(UserWarning, match=r"'conv': 1 live unit\(s\) \(0\) have top activations that sum to 0 or less"):
        alpha = color_selectivity(model, index, "conv", data)
    assert alpha.tolist() == [float("-inf")]  # the gray images give l = 0.299 and 0.587: 1 - 0.886 / 0
    # a positive sum keeps its value: red (+1) and blue (+1) tops, whose gray images give 1/3 and -0.473
    data = [(_flat(1.0, 0.0, 0.0), 0), (_flat(0.0, 0.0, 1.0), 1)]
    index = nx.index_dataset(model, data, ["conv"], k=2, progress=False)
    alpha = color_selectivity(model, index, "conv", data)
    assert torch.isfinite(alpha).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_luminance_of_half_images_is_rounded_once(dtype):
    images = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    in_float32 = torch.einsum("bchw,c->bhw", images.float(), torch.tensor([0.299, 0.587, 0.114]))
    gray = luminance(images)
    assert gray.dtype == dtype
    assert torch.equal(gray[:, 0], in_float32.to(dtype))  # weighted in float32, then one rounding to the half dtype


def test_the_checks_of_later_batches_are_read_once_the_pass_is_over(nan_where, monkeypatch):
    """The luminance pass checks the first batch's pixels at once and every other check at its end (a
    sync a batch kept a GPU from overlapping loading and forward): the errors are the same."""
    model, data, index = nan_where
    last = int(index["0"].ids[index["0"].ids >= 0].max())  # the last batch, with batch_size=1
    poisoned = list(data)
    poisoned[last] = (torch.full_like(data[last][0], float("nan")), data[last][1])
    with pytest.raises(ValueError, match=rf"top images \[{last}\] hold NaN or infinite pixels"):
        color_selectivity(model, index, "0", poisoned, batch_size=1)
    monkeypatch.setattr(model[0], "nan_on", "gray")
    top = re.escape(str(sorted(index["0"].ids[0].tolist())))
    with pytest.raises(ValueError, match=rf"the model gives NaN .* top image\(s\) {top} for unit\(s\) \[0\]"):
        color_selectivity(model, index, "0", batch_size=1)
    monkeypatch.setattr(model[0], "nan_on", None)
    torch.testing.assert_close(color_selectivity(model, index, "0", batch_size=1),
                               color_selectivity(model, index, "0", batch_size=64), rtol=0, atol=0, equal_nan=True)
