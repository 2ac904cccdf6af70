"""Neuron Features (SPEC.md section 3) against a brute-force loop that cuts each crop by plain slicing."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import neuroidx_fast as nx
from neuroidx_fast.features import neuron_features, save_grid, save_unit
from neuroidx_fast.neuron_index import NeuronIndex
from tests.conftest import cpu_backends, gpu_backends
from tests.models import ImageSet, make_model

LAYERS = ["features.0", "features.4", "features.8", "classifier.1"]


@pytest.fixture(scope="module")
def indexed():
    model = make_model("vgg")
    with torch.no_grad():
        model.features[0].bias[3] = -100.0  # unit 3 of the first conv never fires: dead after the ReLU
    dataset = ImageSet(n=21, size=18)
    index = nx.index_dataset(model, dataset, ["features.1"] + LAYERS, k=6, batch_size=8, progress=False)
    return model, dataset, index


def _cut(image, y0, x0, rh, rw, pad):
    """One crop by plain slicing of an image padded generously on every side."""
    margin = max(rh, rw) + abs(y0) + abs(x0)
    if pad == "edge":
        big = F.pad(image[None], (margin,) * 4, mode="replicate")[0]
    else:
        values = {"gray": (0.5,) * 3, "zero": (0.0,) * 3}.get(pad, pad)
        big = torch.stack([F.pad(image[c], (margin,) * 4, value=float(values[c])) for c in range(3)])
    return big[:, y0 + margin:y0 + margin + rh, x0 + margin:x0 + margin + rw]


def _brute_force(index, layer, dataset, pad, norm="sum"):
    L, rf = index[layer], index.receptive_field(layer)
    rh, rw = rf.size
    nfs, crops = [], []
    for c in range(L.num_units):
        if L.ids[c, 0] < 0 or not L.values[c, 0] > 0:
            nfs.append(torch.full((3, rh, rw), float("nan")))
            crops.append([])
            continue
        total, weight_sum, count, unit_crops = torch.zeros(3, rh, rw, dtype=torch.float64), 0.0, 0, []
        for j in range(L.k):
            image_id = int(L.ids[c, j])
            if image_id < 0:
                continue
            image = dataset[image_id][0]
            y, x = divmod(int(L.positions[c, j]), L.map_size[1])
            y0, x0, _, _ = rf.box(y, x)
            crop = _cut(image, y0, x0, rh, rw, pad)
            weight = float(L.values[c, j] / L.values[c, 0])
            total += weight * crop.double()
            weight_sum += weight
            count += 1
            unit_crops.append(crop)
        nfs.append((total / (weight_sum if norm == "sum" else count)).float().clamp(0, 1))
        crops.append(unit_crops)
    return torch.stack(nfs), crops


def _to_uint8(crop):
    return (crop * 255).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("pad", ["gray", "edge"])
def test_nf_equals_brute_force_on_every_backend(indexed, layer, pad):
    _, dataset, index = indexed
    expected, expected_crops = _brute_force(index, layer, dataset, pad)
    reference = None
    for backend in cpu_backends():
        feats = neuron_features(index, layer, pad=pad, keep_crops=4, batch_size=5, backend=backend)
        torch.testing.assert_close(feats.nf, expected, atol=1e-6, rtol=0, equal_nan=True)
        for c, unit_crops in enumerate(expected_crops):
            for j, crop in enumerate(unit_crops[:4]):
                assert torch.equal(feats.crops[c, j], _to_uint8(crop)), f"{backend}: crop {j} of unit {c}"
            assert (feats.crops[c, len(unit_crops[:4]):] == 0).all()
        if reference is None:
            reference = feats
        else:  # same batches, same float64 accumulation order: every backend gives the same bits
            assert torch.equal(feats.nf.nan_to_num(-1), reference.nf.nan_to_num(-1)), backend
            assert torch.equal(feats.crops, reference.crops), backend


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in gpu_backends() if b != "torch"] or ["cuda", "triton"])
def test_nf_on_the_gpu_equals_the_cpu_bits(indexed, backend):
    if backend not in gpu_backends():
        pytest.skip(f"backend {backend} unavailable on cuda")
    _, dataset, index = indexed
    for layer in LAYERS:
        for pad in ("gray", "edge"):
            cpu = neuron_features(index, layer, pad=pad, keep_crops=4, batch_size=5, backend="torch")
            gpu = neuron_features(index, layer, pad=pad, keep_crops=4, batch_size=5, backend=backend, device="cuda")
            # float64 sums added in the same order on every backend: the same bits
            assert torch.equal(gpu.nf.nan_to_num(-1), cpu.nf.nan_to_num(-1)), (layer, pad)
            assert torch.equal(gpu.crops, cpu.crops) and torch.equal(gpu.dead, cpu.dead), (layer, pad)


def test_8bit_images_pass_as_pixel_codes_with_the_same_bits(indexed, monkeypatch):
    # A dataset from 8-bit files (pixels k / 255): the cpp backend gets uint8 codes, the torch one float32
    # pixels, and both give the same bits (and the brute force's NFs).
    model, _, _ = indexed
    dataset = ImageSet(n=21, size=18, seed=3)
    dataset.images = (dataset.images * 255).round() / 255
    index = nx.index_dataset(model, dataset, LAYERS, k=6, batch_size=8, progress=False)
    seen, used = [], set()
    accumulate = nx.ops.accumulate_crops

    def spy(sums, images, *args, **kwargs):
        seen.append(images.dtype)
        return accumulate(sums, images, *args, **kwargs)

    monkeypatch.setattr(nx.ops, "accumulate_crops", spy)
    # Batches this small stay in cache, where the codes do not pay (ops/crop_operands.py): force them.
    monkeypatch.setattr(nx.ops.crop_operands, "CODES_MIN_IMAGE_BYTES", {"avx512": 0, "portable": 0})
    for layer in LAYERS:
        for pad in ("gray", "edge"):
            seen.clear()
            want = neuron_features(index, layer, pad=pad, keep_crops=4, batch_size=5, backend="torch")
            assert set(seen) == {torch.float32}
            if "cpp" in cpu_backends():
                seen.clear()
                got = neuron_features(index, layer, pad=pad, keep_crops=4, batch_size=5, backend="cpp")
                used.update(seen)
                assert torch.equal(got.nf.nan_to_num(-1), want.nf.nan_to_num(-1)), (layer, pad)
                assert torch.equal(got.crops, want.crops), (layer, pad)
    if "cpp" in cpu_backends():
        assert torch.uint8 in used  # the codes path ran
    expected, _ = _brute_force(index, "features.8", dataset, "gray")
    torch.testing.assert_close(neuron_features(index, "features.8").nf, expected, atol=1e-6, rtol=0, equal_nan=True)


def test_dead_units_have_nan_features_and_are_flagged(indexed):
    _, _, index = indexed
    feats = neuron_features(index, "features.0", backend="torch")
    assert feats.dead[3] and feats.dead.sum() == 1
    assert torch.isnan(feats.nf[3]).all() and not torch.isnan(feats.nf[~feats.dead]).any()
    assert (feats.crop_ids[3] == -1).all() and (feats.crops[3] == 0).all()
    assert ((feats.nf[~feats.dead] >= 0) & (feats.nf[~feats.dead] <= 1)).all()


@pytest.mark.parametrize("pad", ["zero", "mean", (0.1, 0.7, 0.3)])
def test_pad_modes_and_paper_norm(indexed, pad):
    _, dataset, index = indexed
    expected_pad = tuple(index.meta["pixel_mean"]) if pad == "mean" else pad
    mean = torch.stack([dataset[i][0] for i in range(len(dataset))]).double().mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(index.meta["pixel_mean"], dtype=torch.float64), mean, atol=1e-12)
    for norm in ("sum", "k"):
        expected, _ = _brute_force(index, "features.8", dataset, expected_pad, norm)
        feats = neuron_features(index, "features.8", pad=pad, norm=norm, backend="torch")
        torch.testing.assert_close(feats.nf, expected, atol=1e-6, rtol=0, equal_nan=True)


def test_k_larger_than_images_seen(indexed):
    _, dataset, index = indexed
    L = index["features.4"]
    partial = nx.LayerIndex(L.name, L.values.clone(), L.ids.clone(), L.positions.clone(), L.map_size, 3,
                            L.mean_sum)
    partial.values[:, 3:], partial.ids[:, 3:], partial.positions[:, 3:] = float("-inf"), -1, -1
    small = NeuronIndex({"features.4": partial}, index.k, index.dataset_length, index.input_size,
                        meta=index.meta)
    expected, crops = _brute_force(small, "features.4", dataset, "gray")
    assert all(len(c) <= 3 for c in crops)
    for backend in cpu_backends():
        feats = neuron_features(small, "features.4", dataset, keep_crops=5, backend=backend)
        torch.testing.assert_close(feats.nf, expected, atol=1e-6, rtol=0, equal_nan=True)
        assert (feats.crop_ids[:, 3:] == -1).all() and (feats.crops[:, 3:] == 0).all()


def test_an_infinite_top_activation_weighs_its_equals_only(indexed):
    _, dataset, index = indexed
    L = index["features.8"]
    values = L.values.clone()
    values[0, :2] = float("inf")  # unit 0: two images at +inf (an ordinary value, SPEC.md 1), then finite ones
    values[1, 0] = float("inf")
    layer = nx.LayerIndex(L.name, values, L.ids.clone(), L.positions.clone(), L.map_size, L.images_seen, L.mean_sum)
    infinite = NeuronIndex({"features.8": layer}, index.k, index.dataset_length, index.input_size, meta=index.meta)
    feats = neuron_features(infinite, "features.8", dataset, keep_crops=2)
    plain = neuron_features(index, "features.8", dataset, keep_crops=2)
    crops = feats.crops.float() / 255
    assert not feats.dead[:2].any() and torch.isfinite(feats.nf[:2]).all()
    # the limit of a_j / a_1: weight 1 for every +inf, 0 for the finite ones (crops are 8-bit: 1/255 apart)
    torch.testing.assert_close(feats.nf[0], crops[0, :2].mean(0), atol=1 / 255, rtol=0)
    torch.testing.assert_close(feats.nf[1], crops[1, 0], atol=1 / 255, rtol=0)
    assert torch.equal(feats.nf[2:].nan_to_num(-1), plain.nf[2:].nan_to_num(-1))


def _with_values(index, layer, values, ids=None):
    L = index[layer]
    changed = nx.LayerIndex(L.name, values, L.ids.clone() if ids is None else ids, L.positions.clone(), L.map_size,
                            L.images_seen, L.mean_sum)
    return NeuronIndex({layer: changed}, index.k, index.dataset_length, index.input_size, meta=index.meta)


def test_negative_weights_and_minus_infinity_slots(indexed):
    # Negative top activations (a pre-activation layer) give negative weights: NF = sum_j w_j I_j / sum_j w_j
    # as it is, also where the sum is negative (the old clamp of the denominator to 1e-300 made it black);
    # a sum of 0 leaves the NF undefined: NaN and a warning. Slots at -inf with a real id (all-NaN maps
    # under nan="ignore") count as empty: no weight, no crop.
    _, dataset, index = indexed
    values = index["features.8"].values.clone()
    values[0] = torch.tensor([1.0, 0.5, -2.0, -2.0, 0.25, 0.25])  # weights sum to -2
    values[1] = torch.tensor([1.0, 0.5, -1.0, -0.25, -0.25, 0.0])  # weights sum to 0
    values[2, 3:] = float("-inf")
    # weights 1, -1/3, -2/3: a sum of 0 that weights rounded before they were added made 1e-16 (the NF of
    # rounding noise, clamped black, and no warning)
    values[3] = torch.tensor([3.0, -1.0, -2.0] + [float("-inf")] * 3)
    values[4] = -torch.arange(1.0, 7.0)  # dead (a_1 <= 0): no NF, a NaN weight sum
    changed = _with_values(index, "features.8", values)
    expected, _ = _brute_force(changed, "features.8", dataset, "gray")
    with pytest.warns(UserWarning, match=r"undefined .* units \[1, 3\]"):
        feats = neuron_features(changed, "features.8", dataset, keep_crops=6)
    assert not feats.dead[:4].any() and feats.dead[4] and feats.weight_sum[4].isnan()
    assert feats.nf[3].isnan().all() and feats.weight_sum[3] == 0
    torch.testing.assert_close(feats.nf[0], expected[0], atol=1e-6, rtol=0)
    assert 0 < float(feats.nf[0].mean()) < 1  # not the clamp of a huge number
    assert feats.nf[1].isnan().all() and torch.isfinite(feats.nf[2]).all()
    emptied_ids = index["features.8"].ids.clone()
    emptied_ids[2, 3:] = -1
    emptied = neuron_features(_with_values(index, "features.8", values, emptied_ids), "features.8", dataset,
                              keep_crops=6, units=[2])
    assert torch.equal(feats.nf[2], emptied.nf[0]) and torch.equal(feats.crops[2], emptied.crops[0])
    assert (feats.crop_ids[2, 3:] == -1).all() and (feats.crops[2, 3:] == 0).all()
    torch.testing.assert_close(feats.weight_sum[:3], torch.tensor([-2.0, 0.0, float(feats.weight_sum[2])]))


def test_batch_size_and_unit_subsets_do_not_change_the_result(indexed):
    _, _, index = indexed
    whole = neuron_features(index, "features.8", batch_size=64, backend="torch")
    split = neuron_features(index, "features.8", batch_size=1, units=[5, 2, 11], backend="torch")
    torch.testing.assert_close(split.nf, whole.nf[[5, 2, 11]], atol=1e-12, rtol=0, equal_nan=True)
    assert torch.equal(split.crops, whole.crops[[5, 2, 11]]) and split.units.tolist() == [5, 2, 11]



def test_kept_crops_cut_a_few_at_a_time_are_the_same(indexed, monkeypatch):
    """The kept crops are cut and converted in chunks (all of a batch's at once took 22 GB for 256 units'
    427 px crops): chunks of one crop give the same crops, each in its (unit, slot)."""
    import neuroidx_fast.features as features

    _, _, index = indexed
    whole = neuron_features(index, "features.8", batch_size=64, backend="cpp")
    calls = []
    cut = features.ops.gather_crops
    monkeypatch.setattr(features, "KEPT_CROP_CHUNK_BYTES", 1)
    monkeypatch.setattr(features.ops, "gather_crops", lambda *a, **k: calls.append(a[1].numel()) or cut(*a, **k))
    chunked = neuron_features(index, "features.8", batch_size=64, backend="cpp")
    assert set(calls) == {1} and len(calls) == int((whole.crop_ids >= 0).sum())
    assert torch.equal(chunked.crops, whole.crops) and torch.equal(chunked.nf.nan_to_num(), whole.nf.nan_to_num())

def test_loaded_index_needs_the_dataset_and_keeps_receptive_fields(indexed, tmp_path):
    model, dataset, index = indexed
    index.save(tmp_path / "idx")
    loaded = NeuronIndex.load(tmp_path / "idx")
    assert loaded.receptive_field("features.8") == index.receptive_field("features.8")
    with pytest.raises(ValueError, match="pass the dataset"):
        neuron_features(loaded, "features.8")
    again = neuron_features(loaded, "features.8", dataset, backend="torch")
    first = neuron_features(index, "features.8", backend="torch")
    assert torch.equal(again.nf.nan_to_num(-1), first.nf.nan_to_num(-1))
    with pytest.raises(ValueError, match="was built on 21"):
        neuron_features(loaded, "features.8", ImageSet(n=5, size=18))
    with pytest.raises(TypeError, match="map-style dataset with __len__"):  # (was "has no len()")
        neuron_features(loaded, "features.8", iter(dataset))
    with pytest.raises(ValueError, match="built on 3 x"):
        neuron_features(loaded, "features.8", ImageSet(n=21, size=20))
    loaded.meta.pop("receptive_fields")
    with pytest.raises(ValueError, match="no receptive field"):
        neuron_features(loaded, "features.8", dataset)
    assert neuron_features(loaded, "features.8", dataset, model=model).rf == index.receptive_field("features.8")


def test_bad_arguments(indexed):
    _, _, index = indexed
    # a mean in 0-255 units padded white, silently
    for pad in ((124, 116, 104), -0.1, 1.5):
        with pytest.raises(ValueError, match=r"pad values are pixels in \[0, 1\].*k / 255"):
            neuron_features(index, "features.8", pad=pad)
    with pytest.raises(KeyError, match="indexed layers"):
        neuron_features(index, "features.7")
    with pytest.raises(ValueError, match="norm"):
        neuron_features(index, "features.8", norm="mean")
    with pytest.raises(ValueError, match="pad mode 'blue'; use 'gray', 'zero', 'edge', 'mean', a number"):
        neuron_features(index, "features.8", pad="blue")

    class Unread(ImageSet):  # a bad pad value is refused before the pass over the top images
        def __getitem__(self, i):
            raise AssertionError("read an image")

    with pytest.raises(ValueError, match="pad has 2 values for 3-channel images"):
        neuron_features(index, "features.8", Unread(n=21, size=18), pad=(0.1, 0.2))
    with pytest.raises(IndexError, match="units"):
        neuron_features(index, "features.8", units=[16])
    with pytest.raises(ValueError, match="keep_crops"):
        neuron_features(index, "features.8", keep_crops=-1)
    with pytest.raises(ValueError, match=r"units \(channel indices\) must be integers"):
        neuron_features(index, "features.8", units=[1.5])
    with pytest.raises(ValueError, match="units is empty.*units=None"):
        neuron_features(index, "features.8", units=[])
    numpy_ints = neuron_features(index, "features.8", keep_crops=np.int64(2), batch_size=np.int32(5))
    assert numpy_ints.crops.shape[1] == 2
    with pytest.raises(ValueError, match="batch_size"):
        neuron_features(index, "features.8", batch_size=2.0)
    with pytest.raises(ValueError, match=r"\(9, 9\) maps, but 'features.8' has \(2, 2\) maps"):
        neuron_features(index, "features.8", rf=index.receptive_field("features.4"))


class _CountingSet(ImageSet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = []

    def __getitem__(self, i):
        self.reads.append(int(i))
        return super().__getitem__(i)


def test_second_pass_reads_each_top_image_once_in_id_order(indexed):
    _, dataset, index = indexed
    counting = _CountingSet(n=21, size=18)
    assert torch.equal(counting.images, dataset.images)
    features = neuron_features(index, "features.8", dataset=counting, batch_size=4)
    layer = index["features.8"]
    wanted = sorted(set(layer.ids[layer.live_slots()].tolist()))
    assert counting.reads == wanted  # every unit's top images, each once, in id order
    torch.testing.assert_close(features.nf, neuron_features(index, "features.8").nf, equal_nan=True)


def test_bad_pixels_in_the_second_pass(indexed):
    _, dataset, index = indexed
    top = int(index["features.8"].ids[0, 0])
    broken = ImageSet(n=21, size=18)
    broken.images[top, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=rf"top images \[{top}\] hold NaN"):
        neuron_features(index, "features.8", dataset=broken)
    normalised = ImageSet(n=21, size=18)
    normalised.images = (normalised.images - 0.5) / 0.25
    with pytest.warns(UserWarning, match="outside \\[0, 1\\]"):
        features = neuron_features(index, "features.8", dataset=normalised)
    assert features.nf[~features.dead].min() >= 0 and features.nf[~features.dead].max() <= 1


@pytest.mark.parametrize("pad", ["gray", "mean", 0.25, (0.1, 0.2, 0.3)])
def test_saved_features_load_back_with_their_pad(indexed, tmp_path, pad):
    from neuroidx_fast.artifacts import load_features, save_features
    from neuroidx_fast.outdir import OutDir

    _, _, index = indexed
    made = neuron_features(index, "features.4", pad=pad, keep_crops=2)
    save_features(made, OutDir(tmp_path), pngs=False)
    loaded = load_features(OutDir(tmp_path), "features.4")
    assert loaded.pad == made.pad and type(loaded.pad) is type(made.pad)  # "mean" is kept as its values
    again = neuron_features(index, "features.4", pad=loaded.pad, keep_crops=2)  # a pad that still works
    assert torch.equal(again.nf.nan_to_num(-1), made.nf.nan_to_num(-1))
    for name in ("nf", "crops", "crop_ids", "crop_values", "dead", "units", "weight_sum"):
        assert torch.equal(getattr(loaded, name).nan_to_num(-1), getattr(made, name).nan_to_num(-1)), name


def test_png_outputs(indexed, tmp_path):
    _, _, index = indexed
    feats = neuron_features(index, "features.8", keep_crops=3, backend="torch")
    grid = Image.open(save_grid(feats, tmp_path / "grid.png", ncols=4, scale=2))
    assert grid.size == (4 * 36 + 3 * 2, 4 * 36 + 3 * 2)  # 16 units, 18 px NFs at scale 2, 2 px gaps
    # no more columns than tiles (ncols=50 for 3 units drew a 2500 px wide, mostly blank image)
    assert Image.open(save_grid(feats, tmp_path / "wide.png", units=[0, 1, 2], ncols=50, scale=1)).size == (58, 18)
    alive = int(torch.nonzero(~feats.dead)[0])
    strip = Image.open(feats.save_unit(alive, tmp_path / "unit.png", scale=1))
    shown = 1 + int((feats.crop_ids[alive] >= 0).sum())
    assert strip.size == (shown * 18 + (shown - 1) * 2, 18)
    pixels = torch.from_numpy(np.asarray(strip.convert("RGB")).copy())
    assert torch.equal(pixels[:, 20:38].permute(2, 0, 1), feats.crops[alive, 0])  # the first top crop
    with pytest.raises(IndexError):
        save_unit(feats, 99, tmp_path / "x.png")


class _GraySet(torch.utils.data.Dataset):
    """The first channel of ImageSet's images: 1-channel (gray) images with labels."""

    def __init__(self, n, size):
        self.rgb = ImageSet(n=n, size=size)

    def __len__(self):
        return len(self.rgb)

    def __getitem__(self, i):
        image, label = self.rgb[i]
        return image[:1].clone(), label


def test_gray_images_give_gray_rgb_features(recwarn):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.ReLU()).eval()
    gray = _GraySet(n=9, size=12)
    index = nx.index_dataset(model, gray, ["1", "3"], k=4, batch_size=4, progress=False)
    assert not [w for w in recwarn if "receptive field" in str(w.message)]  # found at the images' 1 channel
    assert index.image_channels == 1 and index.receptive_field("3").size == (7, 7)
    as_rgb = [(image.expand(3, -1, -1), label) for image, label in gray]  # a gray image is (g, g, g) in RGB
    mean = tuple(index.meta["pixel_mean"]) * 3
    for pad in ("gray", "mean", "edge"):
        expected, expected_crops = _brute_force(index, "3", as_rgb, mean if pad == "mean" else pad)
        for backend in cpu_backends():
            feats = neuron_features(index, "3", pad=pad, keep_crops=2, backend=backend)
            assert feats.nf.shape[1:] == (3, 7, 7) and feats.crops.shape[2] == 3
            torch.testing.assert_close(feats.nf, expected, atol=1e-6, rtol=0, equal_nan=True)
            for c, unit_crops in enumerate(expected_crops):
                for j, crop in enumerate(unit_crops[:2]):
                    assert torch.equal(feats.crops[c, j], _to_uint8(crop)), f"{backend} {pad}: crop {j} of unit {c}"
    with_model = neuron_features(index, "3", model=model)  # the field found again, at 1 channel
    assert with_model.rf.size == (7, 7) and torch.equal(with_model.nf.nan_to_num(-1),
                                                        neuron_features(index, "3").nf.nan_to_num(-1))
    with pytest.raises(ValueError, match=r"built on 1 x \(12, 12\)"):
        neuron_features(index, "3", dataset=ImageSet(n=9, size=12))  # RGB images: not the indexed dataset
    with pytest.raises(ValueError, match="needs RGB images"):
        nx.color_selectivity(model, index, "3")


def test_grid_of_chosen_units(indexed, tmp_path):
    _, _, index = indexed
    feats = neuron_features(index, "features.0", keep_crops=0, backend="torch")
    assert bool(feats.dead.any()) and not bool(feats.dead.all())
    live = torch.nonzero(~feats.dead).flatten()
    by_mask = np.asarray(Image.open(save_grid(feats, tmp_path / "mask.png", units=~feats.dead, scale=1)))
    by_rows = np.asarray(Image.open(save_grid(feats, tmp_path / "rows.png", units=live.tolist(), scale=1)))
    assert np.array_equal(by_mask, by_rows)
    alone = np.asarray(Image.open(save_grid(feats, tmp_path / "alone.png", units=live[:1], ncols=1, scale=1)))
    assert np.array_equal(alone[..., :3], (feats.nf[live[0]] * 255).round().byte().permute(1, 2, 0).numpy())
    for units, error, match in ((torch.ones(3, dtype=torch.bool), ValueError, "one entry per unit"),
                                ([0.5], ValueError, "ints"), ([feats.nf.shape[0]], IndexError, "positions in"),
                                ([-feats.nf.shape[0] - 1], IndexError, "positions in"), ([], ValueError, "no unit")):
        with pytest.raises(error, match=match):
            save_grid(feats, tmp_path / "bad.png", units=units)
    assert not (tmp_path / "bad.png").exists()


def test_gray_images_made_rgb_by_preprocess(recwarn):
    # a model of RGB inputs over gray images: its fields are found at the 3 channels it reads
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, 2),
                                torch.nn.ReLU()).eval()
    gray = _GraySet(n=8, size=16)
    index = nx.index_dataset(model, gray, ["3"], k=2, preprocess=lambda x: x.expand(-1, 3, -1, -1), progress=False)
    assert not [w for w in recwarn if "receptive field" in str(w.message)]
    rf = index.receptive_field("3")
    assert (rf.size, rf.stride, rf.offset) == ((5, 5), (2, 2), (0, 0))
    assert index.image_channels == 1 and index.meta["input_channels"] == 3
    found = neuron_features(index, "3", model=model)  # the field found again, at the model's 3 channels
    assert found.rf.size == (5, 5) and torch.equal(found.nf.nan_to_num(-1), neuron_features(index, "3").nf.nan_to_num(-1))


def test_weights_are_exact_for_tiny_and_huge_ratios(indexed):
    # w_j = a_j / a_1 (SPEC.md 3) where a_1 is below float32's normal range, or a_j / a_1 beyond its range
    _, _, index = indexed
    layer = "features.8"
    unit = int(torch.nonzero((index[layer].values > 0).all(dim=1))[0])  # a live unit, every top value > 0
    _, dataset, _ = indexed
    base = neuron_features(index, layer, keep_crops=2, norm="k", units=[unit], backend="torch")
    values = index[layer].values.clone()
    values[unit] = (values[unit].double() / values[unit, 0] * 1e-40).float()
    scaled = neuron_features(_with_values(index, layer, values), layer, dataset, keep_crops=2, norm="k",
                             units=[unit], backend="torch")
    torch.testing.assert_close(scaled.weight_sum, base.weight_sum, rtol=1e-3, atol=0)
    torch.testing.assert_close(scaled.nf, base.nf, rtol=0, atol=2e-3)
    # a_2 / a_1 = -1e40: NF = (I_1 - 1e40 I_2) / (1 - 1e40), the second top image's crop
    values = index[layer].values.clone()
    values[unit] = torch.tensor([1e-30, -1e10] + [float("-inf")] * (index.k - 2))  # (-inf: no weight, no crop)
    feats = neuron_features(_with_values(index, layer, values), layer, dataset, keep_crops=2, units=[unit],
                            backend="torch")
    assert not feats.dead[0] and torch.isfinite(feats.nf).all()
    torch.testing.assert_close(feats.nf[0], feats.crops[0, 1].float() / 255, rtol=0, atol=0.5 / 255 + 1e-6)  # uint8 crop


def test_a_receptive_field_of_another_input_size_is_refused(indexed):
    model, _, index = indexed
    other = nx.receptive_field(model, "features.8", (36, 36))
    with pytest.raises(ValueError, match=r"for \(36, 36\) inputs, but the index saw \(18, 18\)"):
        neuron_features(index, "features.8", rf=other)
    import dataclasses

    bad = dataclasses.replace(index.receptive_field("features.8"), stride=(-1, 1))
    with pytest.raises(ValueError, match="must be positive"):
        neuron_features(index, "features.8", rf=bad)


def test_save_unit_takes_a_unit_index_and_options_are_checked(indexed, tmp_path):
    _, _, index = indexed
    feats = neuron_features(index, "features.8", keep_crops=2, units=[5, 2, 11], backend="torch")
    strip = np.asarray(Image.open(feats.save_unit(11, tmp_path / "u11.png", scale=1)).convert("RGB"))
    assert torch.equal(torch.from_numpy(strip[:, 20:38].copy()).permute(2, 0, 1), feats.crops[2, 0])  # unit 11
    with pytest.raises(IndexError, match=r"unit 3 of layer 'features.8' is not among the 3 units .*\[5, 2, 11\]"):
        feats.save_unit(3, tmp_path / "u3.png")
    for unit in (1.9, "2", True):
        with pytest.raises(ValueError, match="unit must be a unit index"):
            feats.save_unit(unit, tmp_path / "bad.png")
    for options in ({"ncols": 0}, {"ncols": -1}, {"scale": 0}, {"scale": 2.5}):
        with pytest.raises(ValueError, match="must be a positive int"):
            feats.save_grid(tmp_path / "bad.png", **options)


def test_an_index_without_an_input_size_says_so(indexed):
    # neuron_features advised rf=, then failed on tuple(None)
    _, dataset, index = indexed
    bare = copy.copy(index)
    bare.input_size = None
    with pytest.raises(ValueError, match="the index records no input size.*index the dataset again"):
        neuron_features(bare, "features.8", dataset, rf=index.receptive_field("features.8"))
