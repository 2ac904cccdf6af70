"""Known answer: a CNN trained on Shapes has class-selective units, an untrained one much less so, and
color-selective units whose Neuron Features show the planted colors.

Shapes' classes are planted (color x shape), so after training: each class-probability unit ranks the
images of its own class first, some hidden units have top images from one class only, and both class
selectivity indexes are clearly higher than in the same network before training. Seconds on one CPU thread.
"""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import neuroidx_fast as nx
from neuroidx_fast.data import SHAPES_COLORS, Shapes
from neuroidx_fast.selectivity import class_selectivity, class_selectivity_morcos, top_image_labels
from neuroidx_fast.train import evaluate_classifier, train_classifier

LAYERS = ["net.relu3", "net.relu4", "softmax"]
K = 20


def small_cnn(classes=10, seed=0):
    torch.manual_seed(seed)
    layers = [("conv1", nn.Conv2d(3, 16, 5, 2, 2)), ("relu1", nn.ReLU()),
              ("conv2", nn.Conv2d(16, 32, 3, 2, 1)), ("relu2", nn.ReLU()),
              ("conv3", nn.Conv2d(32, 48, 3, 2, 1)), ("relu3", nn.ReLU()),
              ("conv4", nn.Conv2d(48, 48, 3, 1, 1)), ("relu4", nn.ReLU()),
              ("pool", nn.AdaptiveMaxPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(48, classes))]
    return nn.Sequential(OrderedDict(layers))


@pytest.fixture
def one_thread():
    # Two OpenMP threads on cores shared with other jobs can be ten times slower than one.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_training_is_deterministic_and_keeps_global_rng(one_thread):
    data = Shapes(96, size=32, seed=5)
    runs = []
    for _ in range(2):
        model = small_cnn(seed=3)
        state = torch.random.get_rng_state()
        history = train_classifier(model, data, epochs=2, lr=1e-3, batch_size=16, seed=11)
        assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
        assert not model.training and len(history["loss"]) == 2 and len(history["accuracy"]) == 2
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][key], runs[1][key]) for key in runs[0])
    uncached = small_cnn(seed=3)
    train_classifier(uncached, data, epochs=2, lr=1e-3, batch_size=16, seed=11, cache=False)
    # the same images in the same order from the dataset as from the in-memory cache: the same model
    assert all(torch.allclose(runs[0][key].float(), uncached.state_dict()[key].float(), atol=1e-6) for key in runs[0])
    other = small_cnn(seed=3)
    train_classifier(other, data, epochs=2, lr=1e-3, batch_size=16, seed=12, cache=False)  # another shuffle
    assert not all(torch.equal(runs[0][key], other.state_dict()[key]) for key in runs[0])
    with pytest.raises(ValueError, match="label"):
        train_classifier(small_cnn(), [torch.rand(3, 32, 32)], epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(small_cnn(), data, epochs=0)



def test_training_and_evaluation_refuse_bad_labels_and_pixels(one_thread):
    """Float labels are not cut to ints, labels past the outputs or negative are refused (they had counted
    as errors or crashed the loss), NaN pixels are refused (NaN logits argmax to class 0), and a float64
    model takes float64 inputs."""
    image = torch.rand(3, 32, 32)

    def run(items, **kw):
        model = small_cnn(classes=3)
        train_classifier(model, items, epochs=1, batch_size=2, **kw)
        return evaluate_classifier(model, items)

    for cache in (True, False):
        with pytest.raises(ValueError, match="label"):
            run([(image, 1.9)] * 2, cache=cache)
        for label in (7, -1):
            with pytest.raises(ValueError, match=f"label {label}"):
                run([(image, label)] * 2, cache=cache)
        with pytest.raises(ValueError, match="NaN"):
            run([(torch.full((3, 32, 32), float("nan")), 0)] * 2, cache=cache)
    model = small_cnn(classes=3)
    for bad, message in (([(image, 1.9)] * 2, "label"), ([(image, 7)] * 2, "label 7 is not a class"),
                         ([(image.clone().fill_(float("nan")), 0)] * 2, "NaN")):
        with pytest.raises(ValueError, match=message):
            evaluate_classifier(model, bad)
    double = small_cnn(classes=3).double()
    train_classifier(double, [(image, 1), (image, 2)], epochs=1, batch_size=2)
    assert 0.0 <= evaluate_classifier(double, [(image, 1), (image, 2)]) <= 1.0
    with pytest.raises(ValueError, match="PIL|to_tensor"):
        from PIL import Image
        evaluate_classifier(model, [(Image.new("RGB", (32, 32)), 0)])

# The softmax is not a layer the receptive-field walk knows; its RF (the whole image) is not used here.
def test_trained_net_is_class_selective(one_thread):
    train, test = Shapes(1000, size=48, seed=1), Shapes(400, size=48, seed=2)
    model = small_cnn(len(train.classes), seed=0)
    untrained = copy.deepcopy(model)
    history = train_classifier(model, train, epochs=8, lr=3e-3, batch_size=32, seed=0, eval_dataset=test)
    accuracy = evaluate_classifier(model, test)
    assert accuracy == history["eval_accuracy"][-1]
    assert accuracy > 0.6, f"training failed: test accuracy {accuracy:.3f} (chance 0.1)"

    index, gamma, morcos, own_class, probes = {}, {}, {}, {}, {}
    for name, net in (("trained", model), ("untrained", untrained)):
        # Class probabilities, not logits: a logit's scale differs across images, a probability's does not.
        probe = probes[name] = nn.Sequential(OrderedDict(net=net, softmax=nn.Softmax(dim=1)))
        index[name] = nx.index_dataset(probe, test, LAYERS, k=K, batch_size=100, progress=False)
        gamma[name] = {layer: class_selectivity(index[name], layer, labels=test) for layer in LAYERS}
        morcos[name] = {layer: class_selectivity_morcos(index[name], layer) for layer in LAYERS}
        # how many of the 10 class-probability units rank (nearly) only their own class's images on top
        labels = top_image_labels(index[name], "softmax", test)
        own_class[name] = sum(int((labels[k] == k).sum()) >= K - 2 for k in range(len(test.classes)))

    # Known answer: the probability of class k ranks images of class k first, once trained.
    assert own_class["trained"] >= 5 and own_class["untrained"] <= 1, own_class
    assert (morcos["trained"]["softmax"][1] == torch.arange(10)).sum() >= 8  # mu_max is the unit's own class

    # Hidden units whose top images all come from one class, with gamma exactly 1.
    labels = top_image_labels(index["trained"], "net.relu4", test)
    pure = (labels == labels[:, :1]).all(dim=1) & ~index["trained"]["net.relu4"].dead()
    assert pure.sum() >= 3
    assert (gamma["trained"]["net.relu4"][pure] == 1).all()

    # Training makes units clearly more class selective than the same net before training.
    for layer in ("net.relu4", "softmax"):
        assert gamma["trained"][layer].nanmean() > gamma["untrained"][layer].nanmean() + 0.05, layer
    for layer in LAYERS:
        assert morcos["trained"][layer][0].nanmean() > morcos["untrained"][layer][0].nanmean() + 0.15, layer

    # Color: some units of the trained net lose most of their response on gray images, and their Neuron
    # Features show the planted color of the classes their top images come from.
    layer = "net.relu3"
    alpha = nx.color_selectivity(probes["trained"], index["trained"], layer, test)
    features = nx.neuron_features(index["trained"], layer, test)
    assert int((alpha > 0.5).sum()) >= 3, alpha
    planted = {c.split()[0] for c in test.classes} - {"white"}
    names = sorted(planted)
    palette = torch.tensor([SHAPES_COLORS[c] for c in names])
    labels = top_image_labels(index["trained"], layer, test)
    checked = 0
    for unit in alpha.nan_to_num(-1).argsort(descending=True)[:5].tolist():
        nf = features.nf[unit]
        r = nf.shape[-1] // 2
        centre = nf[:, r - 2:r + 3, r - 2:r + 3].mean(dim=(1, 2))
        if float(centre.max() - centre.min()) < 0.08:
            continue  # a color-selective unit may still average to a washed-out NF; skip those
        nearest = names[int(((palette - centre) ** 2).sum(dim=1).argmin())]
        top_colors = [test.classes[int(k)].split()[0] for k in labels[unit] if k >= 0]
        assert max(set(top_colors), key=top_colors.count) == nearest, (unit, nearest, top_colors)
        checked += 1
    assert checked >= 2, "fewer than two color-selective units have a colored NF"
