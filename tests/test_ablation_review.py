"""Ablation and the training loop on cases found in review: results that must equal the naive loop's
(SPEC.md section 6) where the engine's shortcuts do not apply, exact ties between drops, and clear
errors (NaN under ablation, empty datasets, bad arguments)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

import neuroidx_fast.ablation as abl
from neuroidx_fast.train import evaluate_classifier, train_classifier
from tests.test_ablation import one_thread  # noqa: F401 (autouse: one thread, as in test_ablation.py)


class Pairs(torch.utils.data.Dataset):
    """(image, int label) pairs from two tensors; ``classes`` when given."""

    def __init__(self, images, labels, classes=None):
        self.images, self.labels = images, labels
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def one_set_result(correct, intact_correct, class_counts) -> abl.AblationResult:
    return abl.AblationResult(layer="l", mode="zero", masks=torch.tensor([[True]]), units=torch.tensor([0]),
                              correct=torch.tensor([correct]), intact_correct=torch.tensor(intact_correct),
                              class_counts=torch.tensor(class_counts))


def test_equal_drops_are_a_tie():
    # class 0: 3 -> 2 of 3 correct, class 1: 1 -> 0 of 3: both drop 1/3; 5 -> 4 of 5 and 2 -> 0 of 10: both 1/5
    for correct, intact, counts, drop in (([2, 0], [3, 1], [3, 3], 1 / 3), ([0, 2], [1, 3], [3, 3], 1 / 3),
                                          ([4, 0], [5, 2], [5, 10], 1 / 5)):
        result = one_set_result(correct, intact, counts)
        assert result.drop.tolist() == [[drop, drop]]
        assert result.max_drop_class.tolist() == [-1]
        assert result.max_drop.tolist() == [drop]
    # overall: 4 of 6 correct -> 2 of 6, exactly 1/3
    assert one_set_result([2, 0], [3, 1], [3, 3]).overall_drop.tolist() == [1 / 3]
    assert one_set_result([1, 0], [3, 1], [3, 3]).max_drop_class.tolist() == [0]


def small_head(seed: int = 0, channels: int = 4, classes: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, channels, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, classes)).eval()


def test_naive_loop_on_an_empty_dataset_says_so():
    empty = Pairs(torch.zeros(0, 3, 5, 5), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="the dataset is empty: nothing to measure"):
        abl.naive_ablation_counts(small_head(), empty, "1", torch.eye(4, dtype=torch.bool))


def test_subset_keeps_the_class_names():
    data = Pairs(torch.rand(8, 3, 5, 5), torch.arange(8) % 2, classes=["cat", "dog"])
    result = abl.ablation_drops(small_head(), Subset(data, range(6)), "1", units=[0], batch_size=4, progress=False)
    assert result.class_names == ["cat", "dog"]
    assert [c for c in result.to_frame(per_class=True).columns if c.startswith("drop[")] == ["drop[cat]", "drop[dog]"]
    assert result.class_counts.tolist() == [3, 3]


def test_mean_fill_arguments_are_checked():
    data = Pairs(torch.rand(6, 3, 5, 5), torch.tensor([0, 1] * 3))
    with pytest.raises(ValueError, match="give means= or index=.*not both"):
        abl.ablation_drops(small_head(), data, "1", mode="mean", means=[0.0] * 4, index=object(), progress=False)
    with pytest.raises(TypeError, match=r"means= must be numbers, one mean per unit .*\['a', 'a'"):
        abl.ablation_drops(small_head(), data, "1", mode="mean", means=["a"] * 4, progress=False)


class NumpyLabels(torch.utils.data.Dataset):
    def __init__(self):
        self.images = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        self.labels = np.arange(8) % 2

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.images[i], self.labels[i]  # a numpy.int64 label


def test_training_takes_numpy_labels_cached_or_not():
    histories = []
    for cache in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
        histories.append(train_classifier(model, NumpyLabels(), epochs=2, batch_size=4, cache=cache))
    assert histories[0] == histories[1]
    assert len(histories[1]["loss"]) == 2


def test_training_preprocesses_before_the_model_dtype():
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def normalize(x):  # float32 constants, as the usual ImageNet normalisation
        return (x - mean) / std

    model = small_head(channels=4).to(torch.bfloat16)
    images, labels = torch.rand(6, 3, 5, 5), torch.tensor([0, 1] * 3)
    with torch.no_grad():
        expected = (model(normalize(images).to(torch.bfloat16)).argmax(1) == labels).double().mean().item()
    data = Pairs(images, labels)
    assert evaluate_classifier(model, data, preprocess=normalize) == expected
    ablated = abl.ablation_drops(model, data, "1", units=[0], preprocess=normalize, batch_size=3, progress=False)
    assert ablated.overall_intact_accuracy == expected
    history = train_classifier(model, data, epochs=1, batch_size=3, preprocess=normalize)
    assert len(history["loss"]) == 1 and next(model.parameters()).dtype == torch.bfloat16


def naive(result, model, data, layer, batch_size):
    return abl.naive_ablation_counts(model, data, layer, result.masks, fill=result.fill, batch_size=batch_size)


def test_default_batch_size_is_not_refused_where_convolutions_round_with_the_batch_size():
    # a 1x1 conv to 512 channels on 2x2 images: on 64 images, rows 0-7 of its output are not bit for bit
    # its output on those 8 images alone; the check under ablation compared the two and refused the model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 512, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(512, 10)).eval()
    data = Pairs(torch.rand(64, 3, 2, 2), torch.arange(64) % 10)
    for path in ("readout", "general"):
        result = abl.ablation_drops(model, data, "1", units=range(4), progress=False, path=path)
        intact, correct, counts = naive(result, model, data, "1", 64)
        assert torch.equal(result.correct, correct) and torch.equal(result.intact_correct, intact)
        assert result.class_counts.tolist() == [7, 7, 7, 7] + [6] * 6


class NormalisesInPlace(nn.Module):
    """Normalises its input in place (as Normalize(..., inplace=True) inside a model does)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.relu, self.pool, self.fc = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

    def forward(self, x):
        x = x.sub_(0.5).div_(0.25)
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def test_a_forward_that_writes_into_its_input():
    torch.manual_seed(0)
    data = Pairs(torch.rand(6, 3, 5, 5), torch.tensor([0, 1] * 3))
    model = NormalisesInPlace().eval()
    for path in ("readout", "general"):
        result = abl.ablation_drops(model, data, "relu", batch_size=3, progress=False, path=path)
        intact, correct, _ = naive(result, model, data, "relu", 3)
        assert result.correct.tolist() == correct.tolist() == [[3, 1], [1, 3], [2, 1], [3, 0]]
        assert result.intact_correct.tolist() == intact.tolist() == [3, 1]


class SumNormalised(nn.Module):
    """The layer's units divided by their sum over channels: with every unit ablated, 0 / 0 = NaN logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.relu, self.fc = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.bias.fill_(1.0)

    def forward(self, x):
        h = self.relu(self.conv(x))
        return self.fc((h / h.sum(1, keepdim=True)).mean((2, 3)))


def test_nan_logits_under_ablation_name_the_set_and_images():
    data = Pairs(torch.rand(9, 3, 5, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2] * 3))
    model = SumNormalised().eval()
    masks = torch.tensor([[True, False, False, False], [True, True, True, True]])
    for masks_per_batch in (1, 2):
        with pytest.raises(ValueError, match=re.escape(
                "the model's outputs hold NaN with unit(s) [0, 1, 2, 3] of layer 'relu' ablated (set 1) for image "
                "id(s) [0, 1, 2, 3]: no class is predicted there")):
            abl.ablation_drops(model, data, "relu", masks=masks, batch_size=4, masks_per_batch=masks_per_batch,
                               progress=False)
    # the sets whose outputs stay finite count as the naive loop does
    result = abl.ablation_drops(model, data, "relu", masks=masks[:1], batch_size=4, progress=False)
    assert torch.equal(result.correct, naive(result, model, data, "relu", 4)[1])
    # the naive loop refuses them too (it counted them as predictions of class 0)
    with pytest.raises(ValueError, match=re.escape("the model's outputs hold NaN with unit(s) [0, 1, 2, 3] of layer "
                                                   "'relu' ablated for image id(s) [0, 1, 2, 3]")):
        abl.naive_ablation_counts(model, data, "relu", masks, batch_size=4)


def test_mean_mode_names_nan_activations():
    images = torch.rand(6, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    images[4, 0, 2, 2] = float("nan")
    data = Pairs(images, torch.tensor([0, 1] * 3))
    for mode in ("zero", "mean"):
        with pytest.raises(ValueError, match=re.escape("NaN activation in layer '1': unit(s) [0, 1, 2, 3] on image "
                                                       "id(s) [4]; check the model and inputs")):
            abl.ablation_drops(small_head(), data, "1", mode=mode, batch_size=2, progress=False)


class CosineLinear(nn.Linear):
    """A cosine classifier: an nn.Linear subclass with its own forward (normalised features and weights)."""

    def forward(self, x):
        assert x.dim() == 2, "features must be [B, C]"  # (torch.fx cannot trace it: the module stays one call)
        return 10.0 * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class Flatten2(nn.Module):
    def forward(self, x):
        return x.flatten(2)


def labelled_by_model(model, n=24, classes=3, seed=1):
    images = torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        predicted = model(images).argmax(1)
    return Pairs(images, torch.where(torch.arange(n) % 3 == 0, torch.arange(n) % classes, predicted))


def readout_case(name):
    torch.manual_seed(0)
    if name == "subclass":
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             CosineLinear(6, 3)).eval(), "1"
    if name == "pool1d_on_2d":  # torch pools a [B, C] input as one unbatched [B, L=C] signal: across channels
        return nn.Sequential(nn.Flatten(), nn.Linear(108, 6), nn.AvgPool1d(3, stride=1, padding=1),
                             nn.Linear(6, 3)).eval(), "1"
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()

    def restrict(_module, _inputs, out):
        out = out.clone()
        out[:, 2] = out[:, 2] * 0.5 - 1.0
        return out

    if name == "head_hook":
        model[4].register_forward_hook(restrict)
    elif name == "chain_pre_hook":
        model[2].register_forward_pre_hook(lambda _module, inputs: (inputs[0] * torch.linspace(0.5, 2, 6).view(1, 6, 1, 1),))
    return model, "0"


@pytest.mark.parametrize("name, reason", [
    ("subclass", "the read-out CosineLinear has a forward of its own"),
    ("pool1d_on_2d", "call module '2' gets a 2-D input, which torch pools as one unbatched signal across channels"),
    ("head_hook", "call module '4' after the layer runs forward hooks"),
    ("chain_pre_hook", "call module '2' after the layer runs forward hooks"),
])
def test_readout_path_only_where_the_head_is_a_plain_linear(name, reason):
    model, layer = readout_case(name)
    data = labelled_by_model(model)
    result = abl.ablation_drops(model, data, layer, batch_size=8, progress=False)
    assert result.stats["path"] == "general" and result.stats["readout"].startswith(reason)
    intact, correct, _ = naive(result, model, data, layer, 8)
    assert torch.equal(result.correct, correct) and torch.equal(result.intact_correct, intact)
    with pytest.raises(ValueError, match="path='readout' does not apply"):
        abl.ablation_drops(model, data, layer, batch_size=8, progress=False, path="readout")


def test_readout_path_with_per_channel_1d_pooling_and_global_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), Flatten2(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                          nn.Linear(6, 3)).eval()
    data = labelled_by_model(model)
    result = abl.ablation_drops(model, data, "1", batch_size=8, progress=False)
    assert result.stats["path"] == "readout"
    assert torch.equal(result.correct, naive(result, model, data, "1", 8)[1])
    handle = nn.modules.module.register_module_forward_hook(lambda _module, _inputs, out: None)
    try:
        hooked = abl.ablation_drops(model, data, "1", batch_size=8, progress=False)
    finally:
        handle.remove()
    assert hooked.stats["path"] == "general" and "runs forward hooks" in hooked.stats["readout"]
    assert torch.equal(hooked.correct, result.correct)


def test_the_general_path_checks_nan_once_per_batch_not_once_per_mask(monkeypatch):
    # one bool() of a device tensor per mask chunk waited for a GPU once per mask (74 waits for 16 masks
    # x 4 batches one mask at a time, against 10 before the NaN check); now one per batch
    data = Pairs(torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 2)
    model = small_head(channels=16)
    args = dict(path="general", verify=None, batch_size=8, progress=False)
    syncs = {}
    real = torch.Tensor.__bool__
    for per_batch in (1, 16):
        abl.ablation_drops(model, data, "1", masks_per_batch=per_batch, **args)  # (first-call work aside)
        count = [0]

        def counting(self, count=count):
            count[0] += 1
            return real(self)

        monkeypatch.setattr(torch.Tensor, "__bool__", counting)
        abl.ablation_drops(model, data, "1", masks_per_batch=per_batch, **args)
        monkeypatch.setattr(torch.Tensor, "__bool__", real)
        syncs[per_batch] = count[0]
    assert syncs[1] == syncs[16] and syncs[1] < 20


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __iter__(self):
        return iter(self.pairs)


def test_the_naive_loop_reads_an_iterable_dataset():
    data = Pairs(torch.rand(6, 3, 5, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 3))
    masks = torch.eye(4, dtype=torch.bool)
    want = abl.naive_ablation_counts(small_head(), data, "1", masks, batch_size=4)
    got = abl.naive_ablation_counts(small_head(), _Stream([data[i] for i in range(6)]), "1", masks, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="the dataset is empty: nothing to measure"):
        abl.naive_ablation_counts(small_head(), _Stream([]), "1", masks)


class _MinusInfUnit(nn.Module):
    def forward(self, x):
        x = x.clone()
        x[:, 3] = float("-inf")
        return x


def test_mean_mode_says_why_a_mean_is_not_finite():
    # it said "never seen?" of a unit seen on every image, whose activations are -inf
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _MinusInfUnit(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    data = Pairs(torch.rand(6, 3, 5, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1] * 3))
    with pytest.raises(ValueError, match=re.escape("units [3] of layer '1' have no finite mean ([-inf]: their "
                                                   "activations hold +-inf")):
        abl.ablation_drops(model, data, "1", mode="mean", batch_size=2, progress=False)
    abl.ablation_drops(model, data, "1", mode="zero", batch_size=2, progress=False)
