"""index_dataset, NeuronIndex.load and collate_images on inputs a review found mishandled: non-tensor state,
preprocess values that only their repr tells apart, bundles and checkpoints whose numbers disagree, a layer
the forward never reaches, datasets whose items are of mixed or wrong kinds."""

import enum
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import neuroidx_fast as nx
from neuroidx_fast.indexing import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, _preprocess_code, model_fingerprint
from neuroidx_fast.neuron_index import INDEX_FORMAT, INDEX_VERSION
from neuroidx_fast.prepare import collate_images
from neuroidx_fast.storage import BundleError, read_bundle, write_bundle
from tests.models import ImageSet, make_model
from tests.test_indexing import _Listed

ARGS = dict(k=2, batch_size=2, progress=False)


class _WithExtraState(nn.Conv2d):
    """A conv whose state dict holds a dict (``get_extra_state``): "<name>._extra_state"."""

    def __init__(self, version):
        super().__init__(3, 2, 3)
        self.version = version

    def get_extra_state(self):
        return {"version": self.version}

    def set_extra_state(self, state):
        self.version = state["version"]


def test_a_model_with_non_tensor_state_can_be_checkpointed(tmp_path):
    """model_fingerprint read .shape of every state dict entry: any checkpoint= run of such a model failed
    with "'dict' object has no attribute 'shape'"."""
    torch.manual_seed(0)
    model = nn.Sequential(_WithExtraState(2), nn.ReLU())
    data = ImageSet(n=4, size=6, labels=False)
    index = nx.index_dataset(model, data, ["1"], checkpoint=str(tmp_path / "ck"), **ARGS)
    assert index["1"].images_seen == 4
    assert torch.equal(index["1"].values, nx.index_dataset(model, data, ["1"], **ARGS)["1"].values)
    before = model_fingerprint(model)
    model[0].version = 3  # (the extra state is part of the model: another one is another model)
    assert model_fingerprint(model) != before
    model[0].version = 2
    assert model_fingerprint(model) == before


def test_a_quantised_model_has_a_fingerprint_of_its_packed_parameters():
    """A quantised Linear keeps a dtype and a tuple of tensors in its state dict (the same crash); its scale
    counts, not only the integers."""
    import torch.ao.nn.quantized as quantized

    def linear(scale):
        layer = quantized.Linear(2, 1)
        weight = torch.quantize_per_tensor(torch.tensor([[1.0, 2.0]]) * scale / 0.5, scale, 0, torch.qint8)
        layer.set_weight_bias(weight, None)
        return layer

    with warnings.catch_warnings():  # (torch's deprecation of quantised tensors: given once per process)
        warnings.simplefilter("ignore", UserWarning)
        half, quarter, again = linear(0.5), linear(0.25), linear(0.5)
    assert torch.equal(half.weight().int_repr(), quarter.weight().int_repr())  # the same integers
    assert model_fingerprint(half) != model_fingerprint(quarter)
    assert model_fingerprint(half) == model_fingerprint(again)


def _rounding(dtype):
    return lambda x: x.to(dtype).float()


class _Mode(enum.Enum):
    FLAT = 1
    SHARP = 2


def _describing(value):
    return lambda x: x if value is None else x


def test_values_told_apart_only_by_their_repr_make_another_preprocess():
    """A dtype, device, memory format, enum, slice or range that a preprocess closes over (or a partial
    passes) was described by its type alone: float16 and bfloat16 rounding looked the same."""
    pairs = [(torch.float16, torch.bfloat16), (torch.device("cpu"), torch.device("meta")),
             (torch.channels_last, torch.contiguous_format), (_Mode.FLAT, _Mode.SHARP), (slice(0, 2), slice(0, 3)),
             (range(3), range(4))]
    for one, other in pairs:
        assert _preprocess_code(_describing(one), reprs=True) != _preprocess_code(_describing(other), reprs=True)
        assert _preprocess_code(_describing(one), reprs=True) == _preprocess_code(_describing(one), reprs=True)
        # (the key of earlier checkpoints keeps its rule: their resumes go on as before)
        assert _preprocess_code(_describing(one)) == _preprocess_code(_describing(other))
    # objects whose repr shows an address: their type alone, the same in every process
    assert _preprocess_code(_describing(object()), reprs=True) == _preprocess_code(_describing(object()), reprs=True)


class _Settings:
    """A settings object a preprocess closes over; its repr changes on every call, as a set's order
    changes with the hash seed in every process."""

    shown = 0

    def __init__(self, channels, scale):
        self.channels, self.scale = channels, scale

    def __repr__(self):
        _Settings.shown += 1
        return f"_Settings(call {_Settings.shown})"


_SET_HOLDER = """
import dataclasses, sys
sys.path.insert(0, {repo!r})
from neuroidx_fast.indexing import _preprocess_code

@dataclasses.dataclass
class Cfg:
    channels: set

cfg = Cfg({{"red", "green", "blue", "alpha", "beta", "gamma"}})
print(repr(cfg))
print(_preprocess_code(lambda x: x if cfg is None else x, reprs=True))
"""


def test_objects_a_preprocess_holds_are_described_the_same_in_every_process():
    """An object was described by its repr, which can hold a set in hash order: a checkpoint interrupted
    in one process was refused in the next ("the preprocess function differs")."""
    same = _preprocess_code(_describing(_Settings({"a", "b"}, 1.0)), reprs=True)
    assert _preprocess_code(_describing(_Settings({"b", "a"}, 1.0)), reprs=True) == same
    assert _preprocess_code(_describing(_Settings({"a", "b"}, 2.0)), reprs=True) != same  # (its values count)
    repo = str(Path(__file__).resolve().parents[1])
    outputs = [subprocess.run([sys.executable, "-c", _SET_HOLDER.format(repo=repo)], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout.splitlines()
               for seed in ("1", "2")]
    assert outputs[0][0] != outputs[1][0]  # (the set's repr does change with the seed)
    assert outputs[0][1] == outputs[1][1]


def test_a_resume_with_a_preprocess_of_another_dtype_is_refused(tmp_path):
    """The resumed index mixed images rounded to float16 with images rounded to bfloat16."""
    model, ckpt = make_model("vgg"), str(tmp_path / "ck")
    args = dict(layers=["features.2"], checkpoint=ckpt, checkpoint_every=1, **ARGS)
    with pytest.raises(RuntimeError, match="disk gone"):
        nx.index_dataset(model, _Listed("files A", fail=5, n=8), preprocess=_rounding(torch.float16), **args)
    with pytest.raises(ValueError, match="the preprocess function differs"):
        nx.index_dataset(model, _Listed("files A", n=8), preprocess=_rounding(torch.bfloat16), **args)
    resumed = nx.index_dataset(model, _Listed("files A", n=8), preprocess=_rounding(torch.float16), **args)
    whole = nx.index_dataset(model, _Listed("files A", n=8), preprocess=_rounding(torch.float16), **{**args, "checkpoint": None})
    assert resumed["features.2"].images_seen == 8
    assert torch.equal(resumed["features.2"].values, whole["features.2"].values)


def test_checkpoints_without_the_preprocess_values_still_resume(tmp_path):
    """A checkpoint written before the key preprocess_values resumes (its preprocess_code still checked)."""
    model, ckpt = make_model("vgg"), str(tmp_path / "ck")
    args = dict(layers=["features.2"], checkpoint=ckpt, checkpoint_every=1, **ARGS)
    with pytest.raises(RuntimeError, match="disk gone"):
        nx.index_dataset(model, _Listed("files A", fail=5, n=8), preprocess=_rounding(torch.float16), **args)
    manifest, tensors = read_bundle(ckpt, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    assert manifest["fingerprint"].pop("preprocess_values") is not None
    _rewrite(ckpt, CHECKPOINT_FORMAT, manifest, tensors)
    with pytest.raises(ValueError, match="the preprocess function differs"):  # (another code)
        nx.index_dataset(model, _Listed("files A", n=8), preprocess=lambda x: x.half().float(), **args)
    resumed = nx.index_dataset(model, _Listed("files A", n=8), preprocess=_rounding(torch.float16), **args)
    assert resumed["features.2"].images_seen == 8


def _rewrite(path, kind, manifest, tensors, version=None):
    """Write ``manifest`` and ``tensors`` back as a bundle of ``kind`` (valid checksums: what another program
    or version could write)."""
    manifest = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "tensors_sha256",
                                                                "manifest_sha256")}
    version = version or (INDEX_VERSION if kind == INDEX_FORMAT else CHECKPOINT_VERSION)
    write_bundle(str(path), kind, version, manifest, dict(tensors))


def _set_layer(key, value):
    def tamper(manifest, tensors):
        manifest["layers"][0][key] = value
    return tamper


def _set(key, value):
    def tamper(manifest, tensors):
        manifest[key] = value
    return tamper


def _set_tensor(key, change):
    def tamper(manifest, tensors):
        tensors[key] = change(tensors[key].clone())
    return tamper


def _no_top_images(manifest, tensors):
    manifest["k"] = 0
    for key in ("0.values", "0.ids", "0.positions"):
        tensors[key] = tensors[key][:, :0].contiguous()


def _set_element(key, where, value):
    def change(t):
        t[where] = value
        return t
    return _set_tensor(key, change)


@pytest.mark.parametrize("tamper, message", [
    (_set_layer("images_seen", -1), "layer 'features.2' saw -1 images of a dataset of 6"),
    (_set_layer("images_seen", 7), "layer 'features.2' saw 7 images of a dataset of 6"),
    (_set("input_size", [0, 16]), r"input size \[0, 16\], not two positive ints"),
    (_set("input_size", [16]), r"input size \[16\], not two positive ints"),
    (_set("input_size", None), "saw 6 images, but the index records no input size"),
    (_no_top_images, "k is 0; an index keeps k >= 1"),
    (_set("class_names", ["a", "b"]), "class statistics of 3 classes, but the index names 2 classes"),
    (_set("class_names", [1, 2, 3]), r"class names \[1, 2, 3\], not a list of strings"),
    (_set_element("0.class_count", 0, -1), "a class counts -1 images"),
    (_set_element("labels", 2, 3), r"an image has label 3, not -1 \(unseen\) or a class in \[0, 3\)"),
    (_set_element("labels", 2, -2), r"an image has label -2"),
    (_set_element("0.values", (0, 0), float("nan")), "layer 'features.2' ranks NaN top-K values"),
    (_set("k", 5.7), "k is 5.7, not a whole number"),  # (was read as 5)
    (_set("dataset_length", float("inf")), "dataset_length is inf, not a whole number"),  # (was an OverflowError)
    (_set_layer("images_seen", 6.0), "images_seen is 6.0, not a whole number"),
    (_set_layer("num_units", True), "num_units is True, not a whole number"),
])
def test_load_refuses_a_bundle_whose_numbers_disagree(tmp_path, tamper, message):
    """Such bundles loaded, and failed later: k=0 with an IndexError in neuron_features, no input size with
    a TypeError, a label past the class rows in class selectivity."""
    data = ImageSet(n=6, size=8, classes=3)
    nx.index_dataset(make_model("vgg"), data, ["features.2"], **ARGS).save(tmp_path / "good")
    manifest, tensors = read_bundle(tmp_path / "good", INDEX_FORMAT, INDEX_VERSION)
    tensors = dict(tensors)
    tamper(manifest, tensors)
    _rewrite(tmp_path / "bad", INDEX_FORMAT, manifest, tensors)
    with pytest.raises(BundleError, match=message):
        nx.NeuronIndex.load(tmp_path / "bad")


@pytest.mark.parametrize("batches_done, message", [
    (1, r"layer 'features.2' saw 6 images \(its class counts add up to 6\), but 1 batch\(es\) of 2 of its shard of 6 "
        "are 2"),
    (0, r"it records 0 batches done, not an int in \[1, 3\]"), (4, r"it records 4 batches done"),
    (True, r"it records True batches done"), (None, r"it records None batches done")])
def test_a_checkpoint_whose_progress_disagrees_with_its_counts_is_refused(tmp_path, batches_done, message):
    """A checkpoint saying 1 batch done of 3 when its layers had seen all 6 images resumed from the second
    batch: images_seen 10 of a dataset of 6, every class counted twice; no batches_done was a KeyError."""
    model, data, ckpt = make_model("vgg"), ImageSet(n=6, size=8, classes=3), tmp_path / "ck"
    args = dict(layers=["features.2"], checkpoint=str(ckpt), **ARGS)
    whole = nx.index_dataset(model, data, **args)
    manifest, tensors = read_bundle(ckpt, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    assert manifest["batches_done"] == 3
    if batches_done is None:
        del manifest["batches_done"]
    else:
        manifest["batches_done"] = batches_done
    _rewrite(ckpt, CHECKPOINT_FORMAT, manifest, tensors)
    with pytest.raises(BundleError, match=f"cannot resume from checkpoint .*: {message}.*Delete it to start over"):
        nx.index_dataset(model, data, **args)
    manifest["batches_done"] = 3  # (as written: it resumes, with nothing left to do)
    _rewrite(ckpt, CHECKPOINT_FORMAT, manifest, tensors)
    resumed = nx.index_dataset(model, data, **args)
    assert resumed["features.2"].images_seen == 6
    assert resumed["features.2"].class_count.tolist() == whole["features.2"].class_count.tolist()


def test_a_dataset_naming_no_classes_in_an_empty_list_gives_an_index_that_loads(tmp_path):
    """classes = [] was saved as class_names [] beside 3 class rows (the labels were checked as unnamed), and
    NeuronIndex.load and a checkpoint resume refused it: "class statistics of 3 classes, but the index
    names 0 classes"."""
    model, data, ckpt = make_model("vgg"), ImageSet(n=6, size=8, classes=3), tmp_path / "ck"
    data.classes = []
    index = nx.index_dataset(model, data, ["features.2"], checkpoint=str(ckpt), **ARGS)
    assert index.class_names is None and index["features.2"].class_count.tolist() == [1, 4, 1]
    index.save(tmp_path / "index")
    assert nx.NeuronIndex.load(tmp_path / "index")["features.2"].class_count.tolist() == [1, 4, 1]
    # indexes and checkpoints written so before still load and resume, naming no classes
    manifest, tensors = read_bundle(tmp_path / "index", INDEX_FORMAT, INDEX_VERSION)
    manifest["class_names"] = []
    _rewrite(tmp_path / "earlier", INDEX_FORMAT, manifest, dict(tensors))
    assert nx.NeuronIndex.load(tmp_path / "earlier").class_names is None
    manifest, tensors = read_bundle(ckpt, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    manifest["class_names"] = []
    _rewrite(ckpt, CHECKPOINT_FORMAT, manifest, tensors)
    resumed = nx.index_dataset(model, data, ["features.2"], checkpoint=str(ckpt), **ARGS)
    assert resumed.class_names is None and resumed["features.2"].class_count.tolist() == [1, 4, 1]


def test_a_layer_the_forward_never_reaches_is_not_blamed_on_the_images():
    """The error was wrapped as "the model fails on the first images ... check that the model takes images of
    this size": the size was fine, the layer is not used by forward."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.used(x)

    data = ImageSet(n=4, size=4, labels=False)
    with pytest.raises(RuntimeError, match=r"^the forward never reached layer\(s\) \['unused'\]") as info:
        nx.index_dataset(Unused(), data, ["used", "unused"], **ARGS)
    assert "first images" not in str(info.value) and not isinstance(info.value, ValueError)


def test_items_with_and_without_labels_in_one_batch_are_refused():
    """torch's "each element in list of batch should be of equal size" where the kinds met in one batch."""
    images = ImageSet(n=4, size=4, labels=False).images
    mixed = [(images[0], 0), (images[1], 1), images[2], (images[3], 0)]
    for batch_size in (2, 4):
        with pytest.raises(ValueError, match=r"some dataset items have labels and others do not \(one batch holds "
                                             r"both \(image, label\) pairs and bare images\)"):
            nx.index_dataset(make_model("vgg"), mixed, ["features.0"], k=1, batch_size=batch_size, progress=False)
    assert collate_images([(images[0], 0), (images[1], 1)])[1].tolist() == [0, 1]
    assert collate_images([images[0], images[1]]).shape == (2, 3, 4, 4)


def test_dict_items_and_short_tuples_are_refused_naming_what_they_are():
    """A dict item was told to "add a transform such as to_tensor", a 1-tuple "got a batch of list"."""
    image = torch.rand(3, 4, 4)
    with pytest.raises(ValueError, match=r"dict items \(keys \['image', 'label'\]\): datasets must yield an image "
                                         r"tensor or an \(image, label\) pair; wrap it") as info:
        collate_images([{"image": image, "label": 0}] * 2)
    assert "to_tensor" not in str(info.value)
    for item, what in (((image,), "tuples of 1 item"), ([], "lists of 0 item")):
        with pytest.raises(ValueError, match=f"the dataset gives {what}\\(s\\): datasets must yield an image tensor "
                                             r"or an \(image, label\) pair"):
            collate_images([item, item])
    with pytest.raises(ValueError, match="tuples of 1 item"):
        nx.index_dataset(make_model("vgg"), [(image,)] * 4, ["features.0"], k=1, batch_size=2, progress=False)
    assert collate_images([(image, 1, "meta")] * 2)[1].tolist() == [1, 1]  # (further entries: left alone)


def test_load_refuses_a_manifest_nested_too_deep_or_of_version_true(tmp_path):
    """A RecursionError and a load that took ``format_version: true`` for version 1."""
    data = ImageSet(n=6, size=8, classes=3)
    nx.index_dataset(make_model("vgg"), data, ["features.2"], **ARGS).save(tmp_path / "good")
    manifest, tensors = read_bundle(tmp_path / "good", INDEX_FORMAT, INDEX_VERSION)
    _rewrite(tmp_path / "true", INDEX_FORMAT, manifest, tensors, version=True)
    with pytest.raises(BundleError, match="format version True"):
        nx.NeuronIndex.load(tmp_path / "true")
    (tmp_path / "good" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nested too deep"):
        nx.NeuronIndex.load(tmp_path / "good")
