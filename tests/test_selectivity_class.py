"""Class selectivity (SPEC.md 5.1 gamma, 5.2 Morcos) against brute-force computations."""

import dataclasses
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

import neuroidx_fast as nx
from neuroidx_fast.neuron_index import LayerIndex, NeuronIndex
from neuroidx_fast.selectivity import class_selectivity, class_selectivity_morcos, top_image_labels
from models import ImageSet, make_model

VGG_LAYERS = ["features.2", "features.5", "features.8", "classifier.2"]


# ----------------------------------------------------------------- oracles (plain Python, exact arithmetic)
def gamma_oracle(values, ids, labels, tau):
    """gamma of one unit from its top-K row, with exact rational arithmetic."""
    slots = [(float(v), int(i)) for v, i in zip(values.tolist(), ids.tolist()) if i >= 0]
    if not slots or not slots[0][0] > 0:
        return math.nan  # dead
    if len(slots) < 2:
        return math.nan  # (K - M) / (K - 1) with K = 1
    a1 = slots[0][0]
    shares = {}
    for value, image in slots:
        w = Fraction(int(value == a1)) if math.isinf(a1) else max(Fraction(value) / Fraction(a1), Fraction(0))
        label = int(labels[image])
        shares[label] = shares.get(label, Fraction(0)) + w
    total = sum(shares.values())
    m, cumulative = 0, Fraction(0)
    for share in sorted(shares.values(), reverse=True):
        if share == 0:
            break
        m += 1
        cumulative += share
        if cumulative / total >= Fraction(tau):
            break
    k = len(slots)
    return (k - m) / (k - 1)


def spatial_means(model, dataset, layer, batch_size=8):
    """[N, C] float64 spatial mean of every unit on every image (full forwards, batched as the index is,
    since a convolution's float32 rounding may depend on the batch size)."""
    out = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: out.append(o.detach().double()))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        for x in images.split(batch_size):
            model(x)
    handle.remove()
    acts = torch.cat(out)
    return acts.mean(dim=(2, 3)) if acts.dim() == 4 else acts


def morcos_oracle(means, labels, num_classes):
    si, top = [], []
    for unit in range(means.shape[1]):
        mu = {k: means[labels == k, unit].mean().item() for k in range(num_classes) if (labels == k).any()}
        best = max(mu, key=lambda k: (mu[k], -k))
        rest = sum(v for k, v in mu.items() if k != best) / (len(mu) - 1)
        si.append((mu[best] - rest) / (mu[best] + rest + 1e-12))
        top.append(best)
    return torch.tensor(si, dtype=torch.float64), torch.tensor(top)


@pytest.fixture(scope="module")
def vgg_index():
    model, data = make_model("vgg"), ImageSet(n=31, classes=4, seed=2)
    return model, data, nx.index_dataset(model, data, VGG_LAYERS, k=6, batch_size=8, progress=False)


# ----------------------------------------------------------------- gamma
@pytest.mark.parametrize("tau", [0.4, 1.0])
def test_gamma_equals_brute_force(vgg_index, tau):
    _, data, index = vgg_index
    for name in VGG_LAYERS:
        layer = index[name]
        got = class_selectivity(index, name, tau=tau, labels=data.labels)
        expected = torch.tensor([gamma_oracle(layer.values[c], layer.ids[c], data.labels, tau)
                                 for c in range(layer.num_units)], dtype=torch.float64)
        assert got.dtype == torch.float64 and got.shape == (layer.num_units,)
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), name
        assert torch.allclose(got.nan_to_num(-7), expected.nan_to_num(-7), rtol=0, atol=1e-12), (name, got, expected)
        assert torch.equal(torch.isnan(got), layer.dead()), "NaN exactly for dead units (k >= 2 everywhere here)"
    # not every unit is trivially selective, else the comparison above would prove little
    all_gamma = torch.cat([class_selectivity(index, n, tau=tau, labels=data.labels) for n in VGG_LAYERS])
    assert all_gamma.nan_to_num(1).min() < 1


def test_gamma_tau_one_counts_distinct_classes(vgg_index):
    _, data, index = vgg_index
    layer = index["classifier.2"]  # a Linear: activations of any sign, top values here all positive or not
    gamma = class_selectivity(index, "classifier.2", labels=data.labels)
    checked = 0
    for c in range(layer.num_units):
        if bool((layer.values[c] > 0).all()):
            distinct = len(set(data.labels[layer.ids[c]].tolist()))
            assert gamma[c].item() == (layer.k - distinct) / (layer.k - 1)
            checked += 1
    assert checked > 0


def _layer(values, ids, name="L", map_size=(1, 1)):
    values = torch.tensor(values, dtype=torch.float32)
    ids = torch.tensor(ids, dtype=torch.int64)
    positions = torch.where(ids >= 0, torch.zeros_like(ids), torch.full_like(ids, -1))
    seen = int(ids.max()) + 1
    return LayerIndex(name, values, ids, positions, map_size, seen, torch.zeros(values.shape[0], dtype=torch.float64))


NINF = float("-inf")
# (values, ids) of hand-made units; labels: image i has class LABELS[i]
LABELS = torch.tensor([0, 1, 1, 2, 3, 0, 1, 0, 0, 2, 3])
HAND_UNITS = [
    ([1.0, 0.5, 0.5, 0.25], [0, 1, 2, 3]),        # f = 4/9, 4/9, 1/9 over classes 0, 1, 2
    ([3.0, 2.0, 1.0, 0.5], [0, 5, 7, 8]),         # one class
    ([2.0, 2.0, 2.0, 2.0], [0, 1, 3, 4]),         # four classes, equal shares
    ([0.0, -1.0, -2.0, -3.0], [0, 1, 2, 3]),      # dead: a_1 <= 0
    ([3.0, 1.0, NINF, NINF], [5, 6, -1, -1]),     # two valid slots: K = 2
    ([3.0, NINF, NINF, NINF], [5, -1, -1, -1]),   # one valid slot: undefined
    ([NINF, NINF, NINF, NINF], [-1, -1, -1, -1]),  # no image seen: dead
    ([2.0, 1.0, -1.0, -3.0], [0, 5, 4, 9]),       # negative activations weigh 0
    ([2.0, 0.0, 0.0, 0.0], [0, 1, 4, 9]),         # zero activations weigh 0
    ([math.inf, math.inf, 5.0, 4.0], [0, 1, 4, 9]),  # a_1 = +inf: the other +inf weighs 1, the rest 0
]
EXPECTED = {
    1.0: [1 / 3, 1.0, 0.0, math.nan, 0.0, math.nan, math.nan, 1.0, 1.0, 2 / 3],
    0.4: [1.0, 1.0, 2 / 3, math.nan, 1.0, math.nan, math.nan, 1.0, 1.0, 1.0],
}


@pytest.mark.parametrize("tau", [0.4, 1.0])
def test_gamma_known_values(tau):
    layer = _layer([u[0] for u in HAND_UNITS], [u[1] for u in HAND_UNITS])
    got = class_selectivity(layer, tau=tau, labels=LABELS)
    expected = torch.tensor(EXPECTED[tau], dtype=torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.allclose(got.nan_to_num(-7), expected.nan_to_num(-7), atol=1e-12)
    for c, (values, ids) in enumerate(HAND_UNITS):  # the oracle agrees with the hand-computed values
        oracle = gamma_oracle(torch.tensor(values), torch.tensor(ids), LABELS, tau)
        assert (math.isnan(oracle) and math.isnan(EXPECTED[tau][c])) or abs(oracle - EXPECTED[tau][c]) < 1e-12


def test_gamma_dominant_class():
    layer = _layer([u[0] for u in HAND_UNITS], [u[1] for u in HAND_UNITS])
    gamma, dominant = class_selectivity(layer, labels=LABELS, return_class=True)
    # unit 0: classes 0 and 1 tie at 4/9: the lower class; unit 2: four-way tie; unit 7: class 0 only
    assert dominant.tolist() == [0, 0, 0, -1, 0, 0, -1, 0, 0, 0]
    assert dominant.dtype == torch.int64



def test_gamma_huge_class_labels_cost_no_more_than_small_ones():
    """Shares are kept over the classes present only: labels of 2^40 asked for terabytes (an allocator
    error), and gamma and the dominant class are those of the same labels made small."""
    layer = _layer([u[0] for u in HAND_UNITS], [u[1] for u in HAND_UNITS])
    huge = LABELS * (1 << 40) + 3
    for tau in (0.4, 1.0):
        small_gamma, small_dominant = class_selectivity(layer, tau=tau, labels=LABELS, return_class=True)
        gamma, dominant = class_selectivity(layer, tau=tau, labels=huge, return_class=True)
        assert torch.equal(gamma.nan_to_num(-7), small_gamma.nan_to_num(-7))
        assert dominant.tolist() == [-1 if d < 0 else d * (1 << 40) + 3 for d in small_dominant.tolist()]

def test_gamma_dominant_class_ties_survive_rounding():
    # classes 0 and 1 both sum to 6 (3 + 2 + 1 and 3 + 1.5 + 1.5): as sums of a_j / a_1 they differed in
    # the last bit, and class 1 won
    layer = _layer([[3.0, 3.0, 2.0, 2.0, 1.5, 1.5, 1.0, 0.5]], [list(range(8))])
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 0, 2])
    gamma, dominant = class_selectivity(layer, labels=labels, return_class=True)
    assert dominant.tolist() == [0] and gamma.tolist() == [5 / 7]


def test_gamma_minus_inf_slots_holding_an_image_take_no_part():
    # nan="ignore" makes an all-NaN map -inf with its image's id: no image that drives the unit, so K = 2
    # (classes 0 and 1: M = 2, gamma 0), not K = 4 (gamma 2/3)
    layer = _layer([[3.0, 2.0, NINF, NINF]], [[0, 1, 2, 3]])
    assert class_selectivity(layer, labels=torch.tensor([0, 1, 2, 2])).tolist() == [0.0]


def test_gamma_tau_one_is_exact_under_rounding():
    """Shares whose float64 cumulative sum ends just under 1.0 must still give M = all classes."""
    g = torch.Generator().manual_seed(0)
    for _ in range(10000):
        values = torch.rand(7, generator=g).sort(descending=True).values
        w = values.double() / values.double()[0]
        if (w / w.sum()).sort(descending=True).values.cumsum(0)[-1] < 1.0:
            break
    else:
        pytest.fail("no hard case found")
    layer = _layer([values.tolist()], [list(range(7))])
    labels = torch.arange(7)  # every image its own class: M = 7, gamma = 0
    assert class_selectivity(layer, tau=1.0, labels=labels).item() == 0.0
    # and a share landing exactly on tau < 1 counts as reaching it: shares 1/2, 1/2 -> M = 1 at tau 0.5
    half = _layer([[1.0, 1.0]], [[0, 1]])
    assert class_selectivity(half, tau=0.5, labels=torch.tensor([0, 1])).item() == 1.0


def test_gamma_k_one_is_nan():
    layer = _layer([[2.0], [0.0]], [[0], [1]])
    assert torch.isnan(class_selectivity(layer, labels=torch.tensor([0, 1]))).all()


def test_labels_sources_agree(vgg_index):
    _, data, index = vgg_index
    by_tensor = class_selectivity(index, "features.5", labels=data.labels)

    class Targets(torch.utils.data.Dataset):  # labels read from .targets, images never loaded
        targets = data.labels.tolist()

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            raise AssertionError("images should not be loaded when targets exist")

    class Loaded(torch.utils.data.Dataset):  # no targets: only the top images are loaded
        def __init__(self):
            self.loaded = set()

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            self.loaded.add(i)
            return data[i]

    loaded = Loaded()
    for labels in (data.labels.numpy(), data.labels.tolist(), Targets(), loaded, data.labels.to(torch.int32)):
        assert torch.equal(class_selectivity(index, "features.5", labels=labels).nan_to_num(-1),
                           by_tensor.nan_to_num(-1))
    top_ids = set(index["features.5"].ids[index["features.5"].ids >= 0].tolist())
    assert loaded.loaded == top_ids
    expected = torch.where(index["features.5"].ids >= 0, data.labels[index["features.5"].ids.clamp(min=0)],
                           torch.tensor(-1))
    assert torch.equal(top_image_labels(index, "features.5", data.labels), expected)


def test_labels_recorded_by_the_index(vgg_index):
    _, data, index = vgg_index
    assert index.labels is not None and torch.equal(index.labels, data.labels)
    for name in VGG_LAYERS:
        assert torch.equal(class_selectivity(index, name, tau=0.4).nan_to_num(-1),
                           class_selectivity(index, name, tau=0.4, labels=data.labels).nan_to_num(-1))
    # explicit labels win over the recorded ones
    other = (data.labels + 1) % 4
    expected = torch.tensor([gamma_oracle(index["features.8"].values[c], index["features.8"].ids[c], other, 0.4)
                             for c in range(16)], dtype=torch.float64)
    got = class_selectivity(index, "features.8", tau=0.4, labels=other)
    assert torch.allclose(got.nan_to_num(-7), expected.nan_to_num(-7), atol=1e-12)
    # an index with class sums but no per-image labels (e.g. saved by an older version) needs labels=
    without = dataclasses.replace(index, labels=None)
    assert without.has_labels
    with pytest.raises(ValueError, match="no record of each image's label.*labels="):
        class_selectivity(without, "features.5")


def test_labels_errors(vgg_index):
    model, data, index = vgg_index
    with pytest.raises(ValueError, match="31 images"):
        class_selectivity(index, "features.5", labels=data.labels[:20])
    with pytest.raises(ValueError, match="integer"):
        class_selectivity(index, "features.5", labels=data.labels.float())
    with pytest.raises(ValueError, match=">= 0"):
        class_selectivity(index, "features.5", labels=-torch.ones(31, dtype=torch.int64))
    for tau in (0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="tau"):
            class_selectivity(index, "features.5", tau=tau, labels=data.labels)
    with pytest.raises(KeyError, match="features.5"):
        class_selectivity(index, "nope", labels=data.labels)
    with pytest.raises(ValueError, match="name the layer"):
        class_selectivity(index, labels=data.labels)
    with pytest.raises(TypeError, match="NeuronIndex"):
        class_selectivity("index", "features.5", labels=data.labels)
    for wrong in ("abcdefg", {0: 1}, b"ab"):
        with pytest.raises(TypeError, match="labels must be a \\[N\\] int tensor / array / list or a dataset"):
            class_selectivity(index, "features.5", labels=wrong)
    # the dataset as a list of (image, label) items is a dataset
    items = [data[i] for i in range(len(data))]
    assert torch.equal(class_selectivity(index, "features.5", labels=items).nan_to_num(-1),
                       class_selectivity(index, "features.5", labels=data.labels).nan_to_num(-1))
    table = nx.neuron_table(index, ["features.5"], tau=np.float32(0.5))
    assert table["class_selectivity"].equals(nx.neuron_table(index, ["features.5"], tau=0.5)["class_selectivity"])


def test_no_labels_index():
    model, data = make_model("vgg"), ImageSet(n=12, labels=False)
    index = nx.index_dataset(model, data, ["features.2"], k=3, batch_size=4, progress=False)
    assert not index.has_labels
    with pytest.raises(ValueError, match="without labels.*labels="):
        class_selectivity(index, "features.2")
    with pytest.raises(ValueError, match="without labels"):
        class_selectivity_morcos(index, "features.2")
    # gamma only needs the labels of the top images: given, it works
    gamma = class_selectivity(index, "features.2", labels=torch.arange(12) % 3)
    assert gamma.shape == (8,)
    with pytest.raises(ValueError, match="no \\(image, label\\) pairs"):
        class_selectivity(index, "features.2", labels=data)


# ----------------------------------------------------------------- Morcos
def test_morcos_equals_brute_force(vgg_index):
    model, data, index = vgg_index
    for name in VGG_LAYERS:
        si, top = class_selectivity_morcos(index, name)
        expected_si, expected_top = morcos_oracle(spatial_means(model, data, name), data.labels, 4)
        dead = index[name].dead()
        assert si.dtype == torch.float64 and top.dtype == torch.int64
        assert torch.isnan(si[dead]).all() and (top[dead] == -1).all()
        assert (si[~dead] - expected_si[~dead]).abs().max() < 1e-7, (name, (si[~dead] - expected_si[~dead]).abs().max())
        assert torch.equal(top[~dead], expected_top[~dead]), name


def test_morcos_leaves_out_empty_classes():
    model = make_model("vgg")
    data = ImageSet(n=20, classes=3, seed=5)
    data.classes = [f"class{i}" for i in range(6)]  # classes 3..5 named but without images
    index = nx.index_dataset(model, data, ["features.8"], k=4, batch_size=8, progress=False)
    assert index["features.8"].class_sum.shape[0] == 6
    assert index["features.8"].class_count[3:].tolist() == [0, 0, 0]
    si, top = class_selectivity_morcos(index, "features.8")
    expected_si, expected_top = morcos_oracle(spatial_means(model, data, "features.8"), data.labels, 3)
    dead = index["features.8"].dead()
    assert (si[~dead] - expected_si[~dead]).abs().max() < 1e-7
    assert torch.equal(top[~dead], expected_top[~dead])
    assert (top[~dead] < 3).all()


def test_morcos_known_values_and_dead():
    layer = _layer([[2.0, 1.0], [0.0, -1.0], [5.0, 4.0]], [[0, 1], [0, 1], [1, 0]])
    layer.class_count = torch.tensor([2, 0, 2, 4])
    # per-class means (rows: classes; class 1 has no image and a stale sum that must be ignored)
    means = torch.tensor([[3.0, 1.0, 1.0], [100.0, 100.0, 100.0], [1.0, 1.0, 2.0], [2.0, 1.0, 2.0]],
                         dtype=torch.float64)
    layer.class_sum = means * layer.class_count.double()[:, None]
    layer.class_sum[1] = 100.0
    si, top = class_selectivity_morcos(layer, eps=0.0)
    assert top.tolist() == [0, -1, 2]  # unit 2: classes 2 and 3 tie at 2.0: the lower class
    assert si[0].item() == pytest.approx((3 - 1.5) / (3 + 1.5))
    assert math.isnan(si[1].item())  # dead
    assert si[2].item() == pytest.approx((2 - 1.5) / (2 + 1.5))
    layer.class_sum[0, 2] = float("nan")  # (nan="ignore", an image whose whole map was NaN): no top class
    si, top = class_selectivity_morcos(layer, eps=0.0)
    assert math.isnan(si[2].item()) and top.tolist() == [0, -1, -1]
    layer.class_sum[3, 0] = float("inf")  # +inf is an ordinary value (SPEC.md 1): its class is the top one
    si, top = class_selectivity_morcos(layer, eps=0.0)
    assert math.isnan(si[0].item()) and top.tolist() == [3, -1, -1]  # (si: inf / inf)
    one_class = _layer([[1.0]], [[0]])
    one_class.class_sum, one_class.class_count = torch.ones(2, 1, dtype=torch.float64), torch.tensor([1, 0])
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_selectivity_morcos(one_class)


def test_layer_index_by_name_mismatch():
    layer = _layer([[1.0, 0.5]], [[0, 1]], name="a")
    with pytest.raises(ValueError, match="'a'"):
        class_selectivity(layer, "b", labels=torch.tensor([0, 1]))
    index = NeuronIndex({"a": layer}, k=2, dataset_length=2)
    assert class_selectivity(index, "a", labels=torch.tensor([0, 1])).item() == 0.0


def test_morcos_eps_must_be_a_finite_number_at_least_zero():
    # eps=nan gave NaN for every unit, eps=-1 negative SIs, eps="a" a TypeError from inside the arithmetic
    layer = _layer([[2.0, 1.0]], [[0, 1]])
    layer.class_sum, layer.class_count = torch.tensor([[3.0], [1.0]], dtype=torch.float64), torch.tensor([1, 1])
    for bad in (float("nan"), float("inf"), -1.0, "a", True, None):
        with pytest.raises(ValueError, match=f"eps must be a finite number >= 0.*got {re.escape(repr(bad))}"):
            class_selectivity_morcos(layer, eps=bad)
    assert class_selectivity_morcos(layer, eps=np.float32(0))[0].item() == 0.5
    assert class_selectivity_morcos(layer, eps=0)[0].item() == 0.5


def test_gamma_floor_is_the_least_gamma_the_classes_allow(vgg_index):
    from neuroidx_fast.selectivity import gamma_floor

    assert gamma_floor(20, 10) == 10 / 19 and gamma_floor(4, 3) == 1 / 3
    assert gamma_floor(100, 1000) == 0.0 and gamma_floor(5, 5) == 0.0
    assert gamma_floor(5, 1) == 1.0 and math.isnan(gamma_floor(1, 3))
    _, data, index = vgg_index
    classes = int(torch.unique(data.labels).numel())
    floor = gamma_floor(index.k, classes)
    assert floor > 0  # a case where it binds
    for name in VGG_LAYERS:
        gamma = class_selectivity(index, name, labels=data)
        live = gamma[~gamma.isnan()]
        assert live.numel() and bool((live >= floor - 1e-12).all()), name


def test_the_cli_default_class_threshold_sits_above_the_floor(capsys):
    from neuroidx_fast.pipeline import _class_threshold

    index = type("Index", (), {"k": 20, "labels": torch.arange(200) % 10})()
    assert _class_threshold(None, index) == 29 / 38  # (1 + 10 / 19) / 2, as one division
    assert "halfway from 0.526 (the least gamma of K = 20 top images of 10 classes" in capsys.readouterr().out
    assert _class_threshold(0.5, index) == 0.5
    assert "below 0.526" in capsys.readouterr().out and _class_threshold(0.9, index) == 0.9
    assert capsys.readouterr().out == ""
    many = type("Index", (), {"k": 20, "labels": torch.arange(200) % 50})()
    assert _class_threshold(None, many) == 0.5 and capsys.readouterr().out == ""  # no floor: as before
    unlabelled = type("Index", (), {"k": 20, "labels": None})()
    assert _class_threshold(None, unlabelled) == 0.5


def test_a_gamma_exactly_at_the_default_threshold_never_counts():
    """With an odd number of classes c, units with M = (c + 1) / 2 have gamma exactly halfway from the
    floor to 1: they must compare equal to the threshold (not above by a rounding), for every K."""
    from neuroidx_fast.pipeline import _class_threshold

    for k in range(3, 120):
        for classes in range(1, k, 2):
            index = type("Index", (), {"k": k, "labels": torch.arange(4 * k) % classes})()
            threshold = _class_threshold(None, index)
            m = (classes + 1) // 2
            gamma = torch.tensor([(k - m) / (k - 1)], dtype=torch.float64)  # as class_selectivity rounds it
            assert not bool(gamma > threshold) and float(gamma) == threshold, (k, classes)
