"""Clustering of units and image categories, and per-unit contributions to a prediction (Dai 2020;
SPEC.md section 7)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

import neuroidx_fast as nx
from neuroidx_fast.clustering import cluster_categories, cluster_units, purity
from neuroidx_fast.contributions import contributions
from neuroidx_fast.hooks import SharedModuleError

GROUPS, COPIES, DEAD = 3, 4, 2
TINTS = torch.tensor([[1.0, 0.15, 0.15], [0.15, 1.0, 0.15], [0.15, 0.15, 1.0]])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted_model(seed=0):
    """One conv layer whose units are noisy copies of 3 colour detectors (R, G, B: units 4g..4g+3), plus
    2 units that never fire (a large negative bias), then ReLU."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, GROUPS * COPIES + DEAD, 3, padding=1)
    with torch.no_grad():
        for group in range(GROUPS):
            base = torch.full((3, 3, 3), -0.5 / 9)
            base[group] = 1.0 / 9
            for c in range(COPIES):
                unit = group * COPIES + c
                conv.weight[unit] = base + 0.03 * torch.randn(3, 3, 3, generator=g)
                conv.bias[unit] = 0.05 * torch.randn((), generator=g)
        conv.weight[GROUPS * COPIES:] = -0.1
        conv.bias[GROUPS * COPIES:] = -5.0
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(conv.out_channels, 6)).eval()


class TintedImages(torch.utils.data.Dataset):
    """6 classes: tint (R, G, B) x brightness (bright, dim); class = 2 * tint + dim. Textured noise."""

    def __init__(self, per_class=6, size=12, labels=True):
        g = torch.Generator().manual_seed(1)
        images, targets = [], []
        for cls in range(6):
            tint, dim = divmod(cls, 2)
            brightness = 0.55 if dim else 0.95
            for _ in range(per_class):
                noise = 0.6 + 0.4 * torch.rand(3, size, size, generator=g)
                images.append((noise * TINTS[tint][:, None, None] * brightness).clamp(0, 1))
                targets.append(cls)
        self.images, self.targets, self.labels = torch.stack(images), targets, labels
        self.classes = [f"{c}-{b}" for c in "RGB" for b in ("bright", "dim")]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return (self.images[i], self.targets[i]) if self.labels else self.images[i]


@pytest.fixture(scope="module")
def model():
    return planted_model()


@pytest.fixture(scope="module")
def index(model):
    return nx.index_dataset(model, TintedImages(), ["1"], k=4, batch_size=16, progress=False)


def planted_groups():
    return torch.arange(GROUPS * COPIES) // COPIES


# ---------------------------------------------------------------------------------------------- units
def test_units_cluster_by_class_profile_into_the_planted_groups(index):
    result = cluster_units(index, "1", 3)
    live = GROUPS * COPIES
    assert (result.labels[live:] == -1).all()  # never active: constant profile, left out
    assert adjusted_rand_score(planted_groups(), result.labels[:live]) == 1.0
    # the preferred class of a red unit is a red class, etc.: clusters are pure
    assert result.purity == 1.0
    assert result.silhouette is not None and result.silhouette > 0.5
    assert sorted(result.sizes) == [COPIES] * GROUPS
    frame = result.to_frame()
    assert list(frame.columns) == ["unit", "cluster", "reference"] and len(frame) == live + DEAD
    assert result.members(int(result.labels[0])) == list(range(COPIES))
    # Too many clusters for the usable units
    with pytest.raises(ValueError, match="n_clusters=13 is more than the 12 units"):
        cluster_units(index, "1", 13)


def test_seeds_are_checked_and_any_int_is_taken(index):
    """seed went to scikit-learn as it was: None gave other clusters at every call, -1 or 2**32 an error about
    a random_state the caller never passed."""
    base = cluster_units(index, "1", 3, seed=0)
    for call in (lambda seed: cluster_units(index, "1", 3, seed=seed),
                 lambda seed: cluster_categories(index, "1", 2, seed=seed)):
        for bad in (None, True, 1.5, "0"):
            with pytest.raises(ValueError, match="seed must be an int"):
                call(bad)
        for seed in (-1, 2 ** 32, np.int64(7)):
            assert call(seed).labels.shape[0] > 0
        with pytest.raises(ValueError, match="n_init must be a positive int"):
            cluster_units(index, "1", 3, n_init=0)
    assert torch.equal(cluster_units(index, "1", 3, seed=2 ** 32).labels, base.labels)  # 2**32 is seed 0


def test_units_cluster_by_neuron_features_dead_ones_left_out(index):
    g = torch.Generator().manual_seed(2)
    bases = torch.rand(GROUPS, 3, 5, 5, generator=g)
    nf = torch.cat([bases[planted_groups()] + 0.03 * torch.randn(GROUPS * COPIES, 3, 5, 5, generator=g),
                    torch.full((DEAD, 3, 5, 5), float("nan"))])
    for given in (nf, SimpleNamespace(nf=nf)):  # a tensor or a neuron_features result
        result = cluster_units(index, "1", 3, features="nf", nf=given)
        assert (result.labels[GROUPS * COPIES:] == -1).all()
        assert adjusted_rand_score(planted_groups(), result.labels[:GROUPS * COPIES]) == 1.0
        assert result.purity is None and result.silhouette > 0.5
    reference = torch.cat([planted_groups(), torch.full((DEAD,), -1)])
    assert cluster_units(index, "1", 3, features="nf", nf=nf, reference=reference).purity == 1.0
    # 2 clusters of 3 planted groups: impure, and purity says so
    assert cluster_units(index, "1", 2, features="nf", nf=nf, reference=reference).purity < 1.0
    with pytest.raises(ValueError, match="needs the Neuron Features"):
        cluster_units(index, "1", 3, features="nf")
    with pytest.raises(ValueError, match="nf has 5 units but layer '1' has 14"):
        cluster_units(index, "1", 3, features="nf", nf=nf[:5])
    with pytest.raises(ValueError, match="features must be one of"):
        cluster_units(index, "1", 3, features="weights")


def test_dead_units_are_left_out_even_with_a_varying_profile(model):
    # Before the ReLU the never-firing units are always negative (LayerIndex.dead()) yet their class
    # means vary with the tint: SPEC.md 3 makes every index of a dead unit NaN, so no cluster either.
    pre_relu = nx.index_dataset(model, TintedImages(), ["0"], k=4, batch_size=16, progress=False)
    live = GROUPS * COPIES
    assert pre_relu["0"].dead().tolist() == [False] * live + [True] * DEAD
    assert (pre_relu["0"].class_means()[:, live:].std(0) > 1e-3).all()  # not a constant profile
    result = cluster_units(pre_relu, "0", 3)
    assert (result.labels[live:] == -1).all() and (result.reference[live:] == -1).all()
    assert adjusted_rand_score(planted_groups(), result.labels[:live]) == 1.0 and result.purity == 1.0
    finite_nf = torch.rand(live + DEAD, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    assert (cluster_units(pre_relu, "0", 3, features="nf", nf=finite_nf).labels[live:] == -1).all()
    with pytest.raises(ValueError, match=f"more than the {live} units .*{DEAD} dead units left out"):
        cluster_units(pre_relu, "0", live + 1)


def test_categories_cluster_by_tint(index):
    result = cluster_categories(index, "1", 3, groups=[0, 0, 1, 1, 2, 2])
    assert adjusted_rand_score([0, 0, 1, 1, 2, 2], result.labels) == 1.0
    assert result.purity == 1.0 and result.silhouette > 0.3
    assert result.names == index.class_names
    assert cluster_categories(index, "1", 2, groups=[0, 0, 1, 1, 2, 2]).purity < 1.0
    with pytest.raises(ValueError, match="n_clusters=7 is more than the 6 classes"):
        cluster_categories(index, "1", 7)



def test_float_or_text_groups_are_refused_not_cut_to_ints(index):
    """groups=[0.7, 1.2, ...] had become [0, 1, ...] and a purity of the wrong grouping."""
    import numpy as np

    for groups in ([0.7, 0.2, 1.2, 1.9, 2.5, 2.1], np.array([0.0, 0, 1, 1, 2, 2]), ["a"] * 6):
        with pytest.raises(ValueError, match="groups must hold one int group index per categories"):
            cluster_categories(index, "1", 3, groups=groups)
    with pytest.raises(ValueError, match="reference must hold one int group index per units"):
        cluster_units(index, "1", 2, reference=[0.5] * index["1"].num_units)
    assert cluster_categories(index, "1", 3, groups=np.array([0, 0, 1, 1, 2, 2], dtype=np.int32)).purity == 1.0

def test_clear_errors_without_labels_or_layer(model):
    unlabelled = nx.index_dataset(model, TintedImages(labels=False), ["1"], k=4, batch_size=16, progress=False)
    with pytest.raises(ValueError, match="indexed without labels"):
        cluster_categories(unlabelled, "1", 2)
    with pytest.raises(ValueError, match="indexed without labels"):
        cluster_units(unlabelled, "1", 2)
    with pytest.raises(KeyError, match="not in this index"):
        cluster_units(unlabelled, "0", 2)
    labelled = nx.index_dataset(model, TintedImages(), ["1"], k=4, batch_size=16, progress=False)
    with pytest.raises(ValueError, match="n_clusters must be a positive int, got 2.0"):
        cluster_units(labelled, "1", 2.0)
    assert torch.equal(cluster_units(labelled, "1", np.int64(2)).labels, cluster_units(labelled, "1", 2).labels)


def test_preferred_class_is_a_class_id_when_a_class_has_no_images():
    from neuroidx_fast.neuron_index import LayerIndex, NeuronIndex

    count = torch.tensor([5, 0, 5, 5])  # class 1 has no images
    means = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.float64)
    slots = torch.zeros(4, 1, dtype=torch.int64)
    layer = LayerIndex("L", torch.ones(4, 1), slots, slots, (1, 1), 15, torch.ones(4, dtype=torch.float64),
                       means * count[:, None], count)
    index = NeuronIndex({"L": layer}, 1, 15, class_names=["a", "b", "c", "d"])
    assert cluster_units(index, "L", 2).reference.tolist() == [0, 2, 3, 2]  # it was [0, 1, 2, 1]
    # fewer distinct profiles than clusters: an error, not empty clusters
    with pytest.raises(ValueError, match="n_clusters=4 but the 4 units have only 3 distinct .*at most 3"):
        cluster_units(index, "L", 4)


def one_layer_index(means, count):
    """A NeuronIndex of one layer "L", every unit live, whose class means are ``means`` [classes, C] (NaN
    where a unit's maps were NaN on whole images, indexed with nan="ignore") over ``count`` images per class."""
    from neuroidx_fast.neuron_index import LayerIndex, NeuronIndex

    units, count = means.shape[1], torch.as_tensor(count)
    slots = torch.zeros(units, 1, dtype=torch.int64)
    class_sum = torch.where(count[:, None] > 0, means * count[:, None], torch.zeros_like(means))
    layer = LayerIndex("L", torch.ones(units, 1), slots, slots, (1, 1), int(count.sum()),
                       torch.ones(units, dtype=torch.float64), class_sum, count)
    return NeuronIndex({"L": layer}, 1, int(count.sum()))


def test_a_nan_class_mean_of_one_unit_leaves_that_unit_out_not_the_class():
    # 6 classes in 3 tint groups (+ class 6 without images); units 2g, 2g+1 prefer the second class of group g.
    # Unit 6's mean is NaN on class 1: cluster_units dropped class 1 from every unit's profile (units 0, 1
    # then preferred class 0), cluster_categories gave class 1 the label -1.
    group = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    means = torch.ones(7, 7, dtype=torch.float64)
    for u in range(6):
        means[:6, u] += 3.0 * (group[:6] == u // 2) + 1.0 * (torch.arange(6) == 2 * (u // 2) + 1) + 0.01 * u
    means[:, 6] = torch.tensor([2.0, float("nan"), 2.5, 9.0, 1.0, 4.0, 0.0])
    count = [5, 5, 5, 5, 5, 5, 0]
    with_nan, without = one_layer_index(means, count), one_layer_index(means[:, :6], count)
    units = cluster_units(with_nan, "L", 3)
    assert units.reference.tolist() == [1, 1, 3, 3, 5, 5, -1] and units.labels[6] == -1
    assert torch.equal(units.labels[:6], cluster_units(without, "L", 3).labels)
    assert adjusted_rand_score([0, 0, 1, 1, 2, 2], units.labels[:6]) == 1.0
    for normalize in (True, False):
        categories = cluster_categories(with_nan, "L", 3, normalize=normalize)
        assert categories.labels[6] == -1 and (categories.labels[:6] >= 0).all()
        assert torch.equal(categories.labels, cluster_categories(without, "L", 3, normalize=normalize).labels)
        assert adjusted_rand_score([0, 0, 1, 1, 2, 2], categories.labels[:6]) == 1.0
    means[1] = float("nan")  # no unit is finite on class 1
    with pytest.raises(ValueError, match="every unit of layer 'L' has a NaN or infinite mean on some class"):
        cluster_categories(one_layer_index(means, count), "L", 3)


def test_purity():
    assert purity([0, 0, 1, 1], [5, 5, 6, 7]) == 0.75
    assert purity([0, -1, 1, 1], [5, 6, 6, -1]) == 1.0
    with pytest.raises(ValueError, match="3 labels for 2"):
        purity([0, 0, 1], [0, 1])
    # any int names a group: bincount of the raw ids asked for 8 TB
    assert purity([0, 0, 1, 1], [10**12, 10**12, 7, 7]) == 1.0
    assert purity([0, 0, 1, 1], [2**40, 3, 3, 3]) == 0.75


def test_categories_of_an_index_with_one_class_say_so():
    # it said "every unit has the same mean on every class", even for n_clusters=1
    index = one_layer_index(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64), [4, 0])
    with pytest.raises(ValueError, match="only one class has images in the index of layer 'L'.*normalize=False"):
        cluster_categories(index, "L", 1)
    with pytest.raises(ValueError, match="n_clusters=2 is more than the 1 classes with images"):
        cluster_categories(index, "L", 2)
    assert cluster_categories(index, "L", 1, normalize=False).labels.tolist() == [0, -1]


# ---------------------------------------------------------------------------------------------- contributions
def linear_head_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 3)).eval()


@pytest.mark.parametrize("layer", ["0", "1"])
def test_contributions_sum_to_the_logit_change_against_zero(layer):
    # The logit is positively homogeneous in the conv output F (ReLU, mean, linear): logit(F) - logit(0)
    # equals sum of F * dlogit/dF exactly; unit c contributes w[target, c] * mean(relu(F_c)).
    model = linear_head_model()
    image = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(4))
    result = contributions(model, image, layer, top=2)
    with torch.no_grad():
        logits = model(image[None])[0]
        pooled = torch.relu(model[0](image[None]))[0].mean(dim=(1, 2))
    assert result.target == int(logits.argmax())
    head = model[4]
    with torch.no_grad():
        baseline = float(head(torch.zeros(1, 6))[0, result.target])  # the logit with F = 0
    assert result.logit == pytest.approx(float(logits[result.target]), abs=1e-6)
    assert result.total == pytest.approx(result.logit - baseline, abs=1e-5)
    assert torch.allclose(result.values, (head.weight[result.target] * pooled).double(), atol=1e-6)
    curve = result.domination_curve()
    positive = result.values.clamp(min=0)
    assert curve[-1] == pytest.approx(1.0) and (curve[1:] >= curve[:-1]).all()
    assert result.domination() == pytest.approx(float(positive.sort(descending=True).values[:2].sum() / positive.sum()))
    assert result.top_units()[0][0] == int(result.values.argmax()) and len(result.top_units(np.int64(2))) == 2
    with pytest.raises(ValueError, match="n must be a positive int, got 2.0"):
        result.top_units(2.0)
    other = contributions(model, image, layer, target=(result.target + 1) % 3)
    assert other.total == pytest.approx(float(logits[other.target]) - float(head.bias[other.target].detach()), abs=1e-5)


def test_contributions_errors_and_state():
    model = planted_model().train()
    image = torch.rand(3, 12, 12)
    with pytest.raises(ValueError, match="target must be a class index in 0..5"):
        contributions(model, image, "0", target=6)
    with pytest.raises(ValueError, match="unknown layer"):
        contributions(model, image, "conv")
    with pytest.raises(ValueError, match="one image"):
        contributions(model, torch.rand(2, 3, 12, 12), "0")
    broken = image.clone()
    broken[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite pixels"):
        contributions(model, broken, "0")
    with pytest.raises(ValueError, match="target must be a class index"):
        contributions(model, image, "0", target=1.0)
    # an image already normalised, or of 0-255 values, would be normalised again without a word
    for wrong in ((image - 0.45) / 0.25, image * 255):
        with pytest.raises(ValueError, match=r"pixel space \[0, 1\].*preprocess="):
            contributions(model, wrong, "0", preprocess=lambda x: (x - 0.45) / 0.25)
    with pytest.raises(TypeError, match="preprocess must be None or a callable"):
        contributions(model, image, "0", preprocess="imagenet")
    # NumPy integers are integers
    assert torch.equal(contributions(model, image, "0", target=np.int64(2)).values,
                       contributions(model, image, "0", target=2).values)
    result = contributions(model, image, "0")
    assert model.training and model[0].training  # restored
    assert result.values.shape == (GROUPS * COPIES + DEAD,)
    assert 0 < result.domination(3) <= 1


class SideBranch(nn.Module):
    """``aux`` runs in the forward, but the logits do not use its output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.aux, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 2, 3), nn.Linear(4, 3)

    def forward(self, x):
        self.aux(x)
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_contributions_of_a_layer_the_logits_do_not_use_is_a_clear_error():
    # it was autograd's "element 0 of tensors does not require grad and does not have a grad_fn"
    with pytest.raises(ValueError, match="the logits do not depend on layer 'aux'"):
        contributions(SideBranch().eval(), torch.rand(3, 8, 8), "aux")


def test_contributions_top_takes_numpy_integers():
    model, image = SideBranch().eval(), torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    result = contributions(model, image, "conv", top=np.int64(2))
    assert result.top == 2 and type(result.top) is int
    assert result.domination(np.int64(3)) == result.domination(3) == float(result.domination_curve()[2])
    assert result.domination(torch.tensor(3)) == result.domination(3)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"top must be a positive int, got {bad!r}"):
            contributions(model, image, "conv", top=bad)
        with pytest.raises(ValueError, match=f"top must be a positive int, got {bad!r}"):
            result.domination(bad)
    with pytest.raises(ValueError, match=r"top must be an int in 1..4 \(the layer's units\), got 5"):
        result.domination(5)


def test_contributions_inside_inference_mode_and_with_a_module_preprocess():
    # Inside torch.inference_mode() it failed with "element 0 of tensors does not require grad"; a module
    # preprocess was left in train mode (its Dropout made runs differ)
    model = linear_head_model()
    image = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(4))
    want = contributions(model, image, "0").values
    with torch.inference_mode():
        assert torch.equal(contributions(model, image.clone(), "0").values, want)
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5)).train()
    first = contributions(model, image, "0", preprocess=pre).values
    assert torch.equal(contributions(model, image, "0", preprocess=pre).values, first)
    assert pre.training and pre[1].training and pre[0].weight.requires_grad


class SharedConv(nn.Module):
    """One conv applied twice in the forward: which call would be the layer?"""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 2)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_contributions_refuse_a_module_called_twice_as_indexing_does():
    model, image = SharedConv().eval(), torch.rand(3, 8, 8)
    with pytest.raises(SharedModuleError, match="'conv' runs more than once in one forward"):
        nx.index_dataset(model, [image], ["conv"], k=1, progress=False)
    with pytest.raises(SharedModuleError, match="'conv' runs more than once in one forward"):
        contributions(model, image, "conv", target=0)
    assert not model.conv._forward_hooks  # the hook is gone after the error
    assert contributions(model, image, "fc", target=0).values.shape == (2,)


class _NaNCorner(nn.Module):
    def forward(self, x):
        x = x.clone()
        x[:, 0, 0, 0] = float("nan")
        return x


class _CropCorner(nn.Module):
    def forward(self, x):
        return x[:, :, 1:, 1:]


def test_contributions_of_a_layer_holding_nan_name_the_units():
    # the NaN sits where the rest of the model crops it away: finite logits, yet unit 0's contribution was
    # NaN (NaN * 0), ranked first without a word
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _NaNCorner(), _CropCorner(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match=r"NaN in layer '1''s output on this image, unit\(s\) 0:"):
        contributions(model, torch.rand(3, 8, 8), "1")
    assert contributions(model, torch.rand(3, 8, 8), "2").values.isfinite().all()  # cropped: no NaN there
    everywhere = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3), _NaNLogits()).eval()
    with pytest.raises(ValueError, match="the model's logits hold NaN on this image"):
        contributions(everywhere, torch.rand(3, 8, 8), "0", target=0)


class _NaNLogits(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_contributions_of_a_gray_model():
    # the image had to have 3 channels, though gray models index
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    image = torch.rand(1, 8, 8)
    result = contributions(model, image, "1", target=1)
    with torch.no_grad():
        pooled = model[:4](image[None])[0]
    assert torch.allclose(result.values, (model[4].weight[1] * pooled).double(), atol=1e-6)


class _Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


def test_contributions_of_infinite_activations_with_zero_gradient_are_refused():
    # unit 3 is log(0) = -inf, cut by the ReLU after it: inf * 0 = NaN, ranked first without a word
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), _Log(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.fill_(1.0)
        model[0].weight[3] = 0
        model[0].bias[3] = 0
    with pytest.raises(ValueError, match=r"unit\(s\) \[3\] of layer '2' are undefined: their activations are infinite"):
        contributions(model, torch.rand(3, 4, 4), "2", target=0)


def test_contributions_of_an_image_the_model_cannot_take_say_which():
    # an [H, W, C] image: torch's "expected input[1, 8, 8, 3] to have 3 channels" named no fix
    with pytest.raises(ValueError, match=r"the model fails on this image of shape \(8, 8, 3\) .*\[C, H, W\]"):
        contributions(linear_head_model(), torch.rand(8, 8, 3), "0")
