import functools
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Subset

import neuroidx_fast as nx
from neuroidx_fast.storage import BundleError, read_bundle, write_bundle
from models import ImageSet, make_model
from oracles import assert_same_topk, spatial_reduce_oracle, topk_oracle

HERE = os.path.dirname(os.path.abspath(__file__))


def brute_force(model, dataset, layers, k, preprocess=None, batch_size=5):
    """Every activation of every image kept (full forwards, no early stop), then full sorts. Batched as the
    index is, since a convolution's float rounding may depend on the batch size."""
    outputs = {name: [] for name in layers}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs[n].append(o)) for n in layers]
    with torch.no_grad():
        items = [dataset[i] for i in range(len(dataset))]
        images = torch.stack([item[0] if isinstance(item, tuple) else item for item in items])
        for x in images.split(batch_size):
            model(preprocess(x) if preprocess else x)
    for h in handles:
        h.remove()
    result = {}
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))]) if isinstance(dataset[0], tuple) else None
    for name in layers:
        acts = torch.cat(outputs[name])
        vmax, arg, vmean = spatial_reduce_oracle(acts)
        top = topk_oracle(vmax, torch.arange(len(dataset)), arg, k)
        class_means = None
        if labels is not None:
            class_means = torch.stack([vmean[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
        result[name] = (top, vmean.mean(0), class_means)
    return result


def check_index(index, expected, k):
    for name, (top, mean, class_means) in expected.items():
        layer = index[name]
        assert_same_topk((layer.values, layer.ids, layer.positions), top)
        assert torch.allclose(layer.mean_activation(), mean, rtol=1e-5, atol=1e-6)
        if class_means is not None:
            assert torch.allclose(layer.class_means()[: class_means.shape[0]], class_means, rtol=1e-5, atol=1e-6)
        assert layer.k == k


@pytest.mark.parametrize("model_name, layers", [
    ("vgg", ["features.2", "features.5", "features.8", "classifier.2"]),
    ("resnet", ["stem", "layer1", "layer2.conv1", "layer2"]),
])
def test_equals_brute_force(model_name, layers):
    model, data = make_model(model_name), ImageSet(n=23)
    index = nx.index_dataset(model, data, layers, k=6, batch_size=5, progress=False)
    check_index(index, brute_force(model, data, layers, 6), 6)
    assert index.class_names == data.classes and index.input_size == (16, 16) and index.dataset_length == 23
    assert index["features.2" if model_name == "vgg" else "stem"].images_seen == 23


def test_a_training_model_is_indexed_in_eval_mode_and_keeps_its_modes():
    # BatchNorm in train mode would normalise each batch by its own statistics (and update the running
    # ones): the index is the eval-mode one, and afterwards every module has its own mode back.
    model, data = make_model("vgg"), ImageSet(n=23)
    layers = ["features.2", "classifier.2"]
    expected = brute_force(model.eval(), data, layers, 3)
    model.train()
    frozen = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][:1]
    frozen[0].eval()
    running = frozen[0].running_mean.clone()
    index = nx.index_dataset(model, data, layers, k=3, batch_size=5, progress=False)
    check_index(index, expected, 3)
    assert model.training and not frozen[0].training
    assert all(m.training for m in model.modules() if m is not frozen[0])
    assert torch.equal(frozen[0].running_mean, running)


def test_linear_layer_ties_plain_tensors_and_preprocess():
    model, data = make_model("vgg"), ImageSet(n=17, labels=False, quantise=True)
    preprocess = lambda x: (x - 0.5) / 0.25  # noqa: E731
    index = nx.index_dataset(model, data, ["classifier.1", "features.0"], k=17, batch_size=4,
                             preprocess=preprocess, progress=False)
    check_index(index, brute_force(model, data, ["classifier.1", "features.0"], 17, preprocess, 4), 17)
    assert not index.has_labels and index["classifier.1"].map_size == (1, 1)
    with pytest.raises(ValueError, match="without labels"):
        index["features.0"].class_means()


def test_forward_stops_after_the_deepest_layer():
    model = make_model("vgg")
    calls = []
    # (the receptive-field walk traces the model with torch.fx: proxies, not tensors, do not count)
    model.classifier.register_forward_pre_hook(lambda m, inputs: calls.append(isinstance(inputs[0], torch.Tensor)))
    index = nx.index_dataset(model, ImageSet(n=10), ["features.5", "features.2"], k=2, batch_size=4, progress=False)
    assert set(index.layers) == {"features.5", "features.2"}
    # only the first batch runs past the deepest layer (the check for shared modules), not the two others
    assert sum(calls) == 1


def test_a_head_that_cannot_run_at_the_indexed_size_is_no_error():
    model = make_model("vgg")

    def wrong_size(module, inputs):
        if isinstance(inputs[0], torch.Tensor):  # (not the receptive-field walk's torch.fx proxies)
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    model.classifier.register_forward_pre_hook(wrong_size)
    data = ImageSet(n=23)
    index = nx.index_dataset(model, data, ["features.2"], k=3, batch_size=4, progress=False)
    check_index(index, brute_force(make_model("vgg"), data, ["features.2"], 3), 3)


def _relu_chain(inplace: bool):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=inplace), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.ReLU(inplace=inplace)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-0.4)  # negative pre-activations: a ReLU after the layer changes them
    return model


@pytest.mark.parametrize("batch_size", [4, 64])
def test_in_place_ops_after_a_layer_do_not_change_its_index(batch_size):
    # conv -> ReLU(inplace=True): the ReLU rewrites the conv's output tensor once the forward goes past
    # it (every layer but the deepest, and every layer on the first batch, which runs the whole forward)
    data = ImageSet(n=23)
    layers = ["0", "2"]
    got = nx.index_dataset(_relu_chain(True), data, layers, k=4, batch_size=batch_size, progress=False)
    check_index(got, brute_force(_relu_chain(False), data, layers, 4, batch_size=batch_size), 4)
    assert float(got["0"].mean_sum.min()) < 0  # pre-activation means, not the ReLU's


class _SharedReLU(torch.nn.Module):
    """conv -> relu -> conv -> the same relu (as torchvision's residual blocks reuse theirs)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.c2 = torch.nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x):
        return self.relu(self.c2(self.relu(self.c1(x))))


@pytest.mark.parametrize("layers", [["relu"], ["relu", "c2"], ["c2", "relu"]])
def test_a_shared_module_is_refused_whatever_else_is_indexed(layers):
    # its first and second calls differ (16 x 16 and 7 x 7 maps): which one the index held would depend
    # on the other layers requested, and its receptive field would be the first call's
    with pytest.raises(ValueError, match="'relu' runs more than once in one forward"):
        nx.index_dataset(_SharedReLU(), ImageSet(n=5), layers, k=2, batch_size=4, progress=False)
    index = nx.index_dataset(_SharedReLU(), ImageSet(n=5), ["c1", "c2"], k=2, batch_size=4, progress=False)
    assert index["c2"].map_size == (7, 7)


def test_bfloat16_model_and_autocast():
    data = ImageSet(n=9)
    model = make_model("vgg").to(torch.bfloat16)
    index = nx.index_dataset(model, data, ["features.5"], k=3, batch_size=4, progress=False)
    assert index["features.5"].values.dtype == torch.float32 and index["features.5"].images_seen == 9
    auto = nx.index_dataset(make_model("vgg"), data, ["features.5"], k=3, batch_size=4, progress=False,
                            autocast_dtype=torch.bfloat16)
    assert (auto["features.5"].ids >= 0).all()


@pytest.mark.parametrize("kwargs, error, words", [
    ({"layers": ["features.9"]}, ValueError, "closest names: features"),
    ({"layers": ["clasifier.1"]}, ValueError, "classifier.1"),
    ({"k": 100}, ValueError, "larger than the dataset"),
    ({"dataset": ImageSet(n=0)}, ValueError, "empty"),
    ({"batch_size": 0}, ValueError, "batch_size"),
])
def test_bad_arguments(kwargs, error, words):
    args = {"model": make_model("vgg"), "dataset": ImageSet(n=5), "layers": ["features.2"], "k": 2,
            "progress": False, **kwargs}
    with pytest.raises(error, match=words):
        nx.index_dataset(**args)


def test_integer_images_other_than_8bit_are_rejected():  # uint8: tests/test_uint8_images.py
    for dtype in (torch.int32, torch.bool):
        data = [(torch.zeros(3, 8, 8, dtype=dtype), 0)] * 3
        with pytest.raises(ValueError, match="pixel space"):
            nx.index_dataset(make_model("vgg"), data, ["features.0"], k=1, progress=False)


def test_images_whose_size_changes_are_refused():
    # 24 and 25 px images give the same maps at a strided layer: the index would hold positions of two
    # input sizes under one receptive field, and crops cut at the wrong places
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.ReLU())
    data = [(torch.rand(3, 24 + (i >= 4), 24 + (i >= 4)), 0) for i in range(6)]
    with pytest.raises(ValueError, match=r"images 4..5 are \(25, 25\) but the first ones are \(24, 24\).*one size"):
        nx.index_dataset(model, data, ["1"], k=2, batch_size=2, progress=False)


def test_a_preprocess_that_moves_positions_is_refused():
    model, data = make_model("vgg"), ImageSet(n=5)
    pad = lambda x: torch.nn.functional.pad(x, (4, 4, 4, 4))  # noqa: E731 (a resize or crop would do the same)
    with pytest.raises(ValueError, match=r"preprocess turns images \(3, 16, 16\) into \(3, 24, 24\).*in the dataset"):
        nx.index_dataset(model, data, ["features.2"], k=2, preprocess=pad, progress=False)
    # changing values and channels is what preprocess is for
    gray = [(image[:1], label) for image, label in data]
    index = nx.index_dataset(model, gray, ["features.2"], k=2, progress=False,
                             preprocess=lambda x: (x.expand(-1, 3, -1, -1) - 0.5) / 0.25)
    assert index.meta["input_channels"] == 3


class _Listed(ImageSet):
    """ImageSet with a fingerprint of its contents (as ImageFolder's file list), failing at item ``fail``."""

    def __init__(self, tag, fail=None, **kwargs):
        super().__init__(**kwargs)
        self.tag, self.fail = tag, fail

    def fingerprint(self):
        return self.tag

    def __getitem__(self, i):
        if i == self.fail:
            raise RuntimeError("disk gone")
        return super().__getitem__(i)


def test_a_checkpoint_resumes_only_on_the_same_dataset_contents(tmp_path):
    model, checkpoint = make_model("vgg"), str(tmp_path / "ck")
    args = dict(layers=["features.2"], k=2, batch_size=2, checkpoint=checkpoint, checkpoint_every=1, progress=False)
    with pytest.raises(RuntimeError, match="disk gone"):
        nx.index_dataset(model, _Listed("files A", fail=5, n=8), **args)
    with pytest.raises(ValueError, match=r"the dataset's contents differ \(its file list changed\)"):
        nx.index_dataset(model, _Listed("files B", n=8), **args)
    with pytest.raises(ValueError, match="dataset's contents differ"):  # another subset of the same files
        nx.index_dataset(model, torch.utils.data.Subset(_Listed("files A", n=9), range(1, 9)), **args)
    resumed = nx.index_dataset(model, _Listed("files A", n=8), **args)
    whole = nx.index_dataset(model, _Listed("files A", n=8), **{**args, "checkpoint": None})
    assert torch.equal(resumed["features.2"].values, whole["features.2"].values)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_a_checkpoint_resumes_only_with_the_same_quantisation_scales(tmp_path):
    """A quantised tensor's bytes are its integers: requantised at another scale with the same integers,
    the model computes otherwise, and only its scales tell."""
    def quantised(scale):
        model = make_model("vgg")
        model.register_buffer("q", torch.quantize_per_tensor(torch.arange(4.0) * scale, scale, 0, torch.qint8))
        return model

    assert torch.equal(quantised(0.1).q.int_repr(), quantised(0.2).q.int_repr())
    assert nx.indexing.model_fingerprint(quantised(0.1)) != nx.indexing.model_fingerprint(quantised(0.2))
    assert nx.indexing.model_fingerprint(quantised(0.1)) == nx.indexing.model_fingerprint(quantised(0.1))
    checkpoint = str(tmp_path / "ck")
    args = dict(layers=["features.2"], k=2, batch_size=2, checkpoint=checkpoint, checkpoint_every=1, progress=False)
    with pytest.raises(RuntimeError, match="disk gone"):
        nx.index_dataset(quantised(0.1), _Listed("files A", fail=5, n=8), **args)
    with pytest.raises(ValueError, match="the model's weights differ"):
        nx.index_dataset(quantised(0.2), _Listed("files A", n=8), **args)
    resumed = nx.index_dataset(quantised(0.1), _Listed("files A", n=8), **args)
    assert resumed["features.2"].images_seen == 8


def test_images_too_small_for_the_model_say_so():
    with pytest.raises(ValueError, match=r"fails on the first images, \(3, 2, 2\) \(RuntimeError: .*use larger ones"):
        nx.index_dataset(make_model("vgg"), ImageSet(n=4, size=2), ["features.8"], k=1, progress=False)



def test_other_first_batch_failures_are_not_blamed_on_the_image_size():
    """Any failure of the first batch had been called "images too small ... use larger ones"."""
    gray = ImageSet(n=4)
    gray.images = gray.images[:, :1]
    with pytest.raises(ValueError, match=r"have 1 channel\(s\).*preprocess= that makes them RGB") as info:
        nx.index_dataset(make_model("vgg"), gray, ["features.2"], k=1, progress=False)
    assert "larger" not in str(info.value)
    head = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(10, 2))
    with pytest.raises(ValueError, match=r"mat1 and mat2.*check that the model takes images of this size") as info:
        nx.index_dataset(head, ImageSet(n=4), ["2"], k=1, progress=False)
    assert "too small" not in str(info.value)


def test_nan_activation_names_layer_and_ids():
    model = make_model("vgg")
    with torch.no_grad():
        model.features[0].bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"features.0.*unit\(s\) 3"):
        nx.index_dataset(model, ImageSet(n=4), ["features.0"], k=1, progress=False)


def test_save_load_round_trip_and_corruption(tmp_path):
    index = nx.index_dataset(make_model("resnet"), ImageSet(n=11), ["layer1", "layer2"], k=4, batch_size=3,
                             progress=False)
    path = tmp_path / "idx"
    index.save(path)
    index.save(path)  # overwrite atomically
    loaded = nx.NeuronIndex.load(path)
    assert loaded.class_names == index.class_names and loaded.k == 4 and loaded.input_size == (16, 16)
    for name in index:
        a, b = index[name], loaded[name]
        for key in ("values", "ids", "positions", "mean_sum", "class_sum", "class_count"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
        assert a.map_size == b.map_size and a.images_seen == b.images_seen
        assert loaded.receptive_field(name) == index.receptive_field(name) is not None
    assert torch.equal(loaded.labels, ImageSet(n=11).labels) and torch.equal(index.labels, loaded.labels)
    assert loaded.meta["pixel_mean"] == index.meta["pixel_mean"]
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        nx.NeuronIndex.load(path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.json").write_text('{"format": "something.else"}')
    with pytest.raises(BundleError, match="not a neuroidx_fast.NeuronIndex"):
        nx.NeuronIndex.load(tmp_path / "foreign")
    (tmp_path / "foreign" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        nx.NeuronIndex.load(tmp_path / "foreign")
    with pytest.raises(BundleError, match="not a directory"):
        nx.NeuronIndex.load(tmp_path / "missing")


RESUME_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import neuroidx_fast as nx
from models import ImageSet, make_model
nx.index_dataset(make_model("resnet"), ImageSet(n=40, delay={delay}), ["layer1", "layer2"], k=5, batch_size=3,
                 checkpoint={ckpt!r}, checkpoint_every=1, progress=False).save({out!r})
"""


def test_a_write_killed_between_its_renames_is_recovered(tmp_path):
    # write_bundle moves the old bundle aside (<name>.old-*), then its finished new one (<name>.tmp-*) in:
    # killed in between, neither is at the path; the next read or write puts the right one back
    path = tmp_path / "bundle"
    write_bundle(path, "test bundle", 1, {"n": 1}, {"x": torch.zeros(3)})
    import shutil

    from neuroidx_fast.storage import recover_interrupted_write, remove_bundle

    os.replace(path, tmp_path / "bundle.old-abc")
    assert read_bundle(path, "test bundle", 1)[0]["n"] == 1  # only the old one: read where it lies
    assert not path.exists()  # a reader moves nothing (it could be a writer's own folder, mid-swap)
    assert recover_interrupted_write(path) and read_bundle(path, "test bundle", 1)[0]["n"] == 1  # a writer does
    write_bundle(tmp_path / "next", "test bundle", 1, {"n": 2}, {"x": torch.ones(3)})
    os.replace(path, tmp_path / "bundle.old-def")
    os.replace(tmp_path / "next", tmp_path / "bundle.tmp-ghi")
    assert read_bundle(path, "test bundle", 1)[0]["n"] == 2  # the new one was complete: it wins
    assert recover_interrupted_write(path) and read_bundle(path, "test bundle", 1)[0]["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # and the old copy is gone
    write_bundle(path, "test bundle", 1, {"n": 3}, {"x": torch.ones(3)})
    assert read_bundle(path, "test bundle", 1)[0]["n"] == 3
    # a .tmp- folder with no old one set aside is a write killed before its renames, or the leftover of
    # a bundle deleted since: never put back (a deleted checkpoint must stay deleted)
    shutil.copytree(path, tmp_path / "bundle.tmp-pqr")
    shutil.rmtree(path)
    with pytest.raises(BundleError, match="not a directory"):
        read_bundle(path, "test bundle", 1)
    assert not recover_interrupted_write(path)
    write_bundle(path, "test bundle", 1, {"n": 3}, {"x": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    # killed mid-write while the bundle itself stayed: a complete .tmp- copy was left beside it; the
    # next complete write (or remove_bundle) clears such leftovers, not other bundles' (bundle2)

    shutil.copytree(path, tmp_path / "bundle.tmp-jkl")
    write_bundle(tmp_path / "bundle2", "test bundle", 1, {"n": 5}, {"x": torch.ones(3)})
    shutil.copytree(path, tmp_path / "bundle2.tmp-mno")
    write_bundle(path, "test bundle", 1, {"n": 4}, {"x": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle2", "bundle2.tmp-mno"]
    remove_bundle(tmp_path / "bundle2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_read_racing_a_save_gets_one_bundle_whole(tmp_path, monkeypatch):
    # the save replaces the bundle after the reader has its manifest, before it has its tensors: the reader
    # must not pair the old manifest with the new tensors (nor call the bundle corrupt)
    from neuroidx_fast import storage

    path = tmp_path / "bundle"
    write_bundle(path, "test bundle", 1, {"n": 1}, {"x": torch.zeros(3)})
    real_read_in, saves = storage._read_in, []

    def read_in(folder, name):
        data = real_read_in(folder, name)
        if name == storage.MANIFEST and not saves:
            saves.append(2)
            write_bundle(path, "test bundle", 1, {"n": 2}, {"x": torch.full((3,), 2.0)})
        return data

    monkeypatch.setattr(storage, "_read_in", read_in)
    manifest, tensors = read_bundle(path, "test bundle", 1)
    assert saves and float(tensors["x"][0]) == manifest["n"] == 2


def test_foreign_folders_and_links(tmp_path):
    index = nx.index_dataset(make_model("vgg"), ImageSet(n=6), ["features.5"], k=2, batch_size=3, progress=False)
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "my app"}')
    (app / "src" / "main.js").write_text("1")
    with pytest.raises(BundleError, match="refusing to overwrite"):
        index.save(app)
    assert (app / "src" / "main.js").read_text() == "1" and (app / "manifest.json").exists()
    # a link to an index: the index it points at is replaced, the link stays and nothing is left beside it
    index.save(tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "link")
    bigger = nx.index_dataset(make_model("vgg"), ImageSet(n=6), ["features.5"], k=3, batch_size=3, progress=False)
    bigger.save(tmp_path / "link")
    assert os.path.islink(tmp_path / "link") and nx.NeuronIndex.load(tmp_path / "real").k == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app", "link", "real"]
    # a directory where the tensors file should be: a BundleError, not an OS error
    (tmp_path / "real" / "tensors.safetensors").unlink()
    (tmp_path / "real" / "tensors.safetensors").mkdir()
    with pytest.raises(BundleError, match="tensors.safetensors"):
        nx.NeuronIndex.load(tmp_path / "link")


def test_a_changed_manifest_is_detected(tmp_path):
    # a flipped digit keeps the JSON valid: images_seen 9 -> 8 would load silently wrong
    import json

    index = nx.index_dataset(make_model("vgg"), ImageSet(n=9), ["features.2"], k=3, progress=False)
    index.save(tmp_path / "index")
    manifest = tmp_path / "index" / "manifest.json"
    text = manifest.read_text()
    assert '"images_seen": 9' in text
    manifest.write_text(text.replace('"images_seen": 9', '"images_seen": 8'))
    with pytest.raises(BundleError, match="manifest.json does not match its checksum"):
        nx.NeuronIndex.load(tmp_path / "index")
    manifest.write_text(text)
    assert nx.NeuronIndex.load(tmp_path / "index")["features.2"].images_seen == 9
    # a bundle of an earlier version, without the checksum, still loads
    old = json.loads(text)
    del old["manifest_sha256"]
    manifest.write_text(json.dumps(old))
    assert nx.NeuronIndex.load(tmp_path / "index")["features.2"].images_seen == 9


def test_outputs_are_not_private(tmp_path):
    from neuroidx_fast.outdir import write_json

    old = os.umask(0o022)
    try:
        write_bundle(tmp_path / "bundle", "test bundle", 1, {}, {"x": torch.zeros(1)})
        write_json(tmp_path / "run.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755
    for inside in (tmp_path / "bundle").iterdir():  # the tensors too (safetensors makes them 0600)
        assert inside.stat().st_mode & 0o777 == 0o644, inside.name
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == 0o644


def test_kill_and_resume_gives_the_uninterrupted_index(tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    script = RESUME_SCRIPT.format(here=HERE, delay=0.03, ckpt=ckpt, out=out)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(ckpt, "manifest.json")) and time.time() < deadline:
        assert proc.poll() is None, "the indexing subprocess ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(0.4)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out)
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT.format(here=HERE, delay=0.0, ckpt=ckpt, out=out)], check=True)
    resumed = nx.NeuronIndex.load(out)
    whole = nx.index_dataset(make_model("resnet"), ImageSet(n=40), ["layer1", "layer2"], k=5, batch_size=3,
                             progress=False)
    for name in whole:
        for key in ("values", "ids", "positions", "mean_sum", "class_sum", "class_count"):
            assert torch.equal(getattr(whole[name], key), getattr(resumed[name], key)), key
    assert torch.equal(resumed.labels, whole.labels) and resumed.meta["pixel_sum"] == whole.meta["pixel_sum"]
    with pytest.raises(ValueError, match=r"other arguments \(k: checkpoint 5 vs now 6"):
        nx.index_dataset(make_model("resnet"), ImageSet(n=40), ["layer1", "layer2"], k=6, batch_size=3,
                         checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="model's weights differ"):
        nx.index_dataset(make_model("resnet", seed=1), ImageSet(n=40), ["layer1", "layer2"], k=5, batch_size=3,
                         checkpoint=ckpt, progress=False)
    swapped = make_model("resnet")
    swapped.layer1.relu = torch.nn.LeakyReLU()  # the same state dict: only the modules tell
    with pytest.raises(ValueError, match="model's modules"):
        nx.index_dataset(swapped, ImageSet(n=40), ["layer1", "layer2"], k=5, batch_size=3, checkpoint=ckpt,
                         progress=False)
    # what else changes the activations: autocast, and the normalisation applied before the model
    with pytest.raises(ValueError, match=r"autocast_dtype: checkpoint 'None' vs now 'torch.bfloat16'"):
        nx.index_dataset(make_model("resnet"), ImageSet(n=40), ["layer1", "layer2"], k=5, batch_size=3,
                         checkpoint=ckpt, progress=False, autocast_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"preprocess: checkpoint None vs now"):
        nx.index_dataset(make_model("resnet"), ImageSet(n=40), ["layer1", "layer2"], k=5, batch_size=3,
                         checkpoint=ckpt, progress=False, preprocess=lambda x: x * 2)


class _Scale(torch.nn.Module):
    """A preprocess whose setting is a plain attribute (as torchvision's Normalize keeps mean and std)."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor

    def extra_repr(self):
        return f"factor={self.factor}"


def test_a_resume_with_other_preprocess_settings_is_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")

    def index(factor):
        return nx.index_dataset(make_model("vgg"), ImageSet(n=8), ["features.5"], k=3, batch_size=4, checkpoint=ckpt,
                                progress=False, preprocess=_Scale(factor))

    index(2.0)
    assert os.path.exists(ckpt)
    index(2.0)  # the same: the finished checkpoint resumes
    with pytest.raises(ValueError, match="preprocess's settings"):
        index(3.0)


def test_a_resume_on_another_dataset_of_the_same_length_is_refused(tmp_path):
    # a dataset without fingerprint(): its first and last items stand for it
    ckpt = str(tmp_path / "ckpt")

    def index(data):
        return nx.index_dataset(make_model("vgg"), data, ["features.5"], k=3, batch_size=4, checkpoint=ckpt,
                                progress=False)

    index(ImageSet(n=8, seed=0))
    index(ImageSet(n=8, seed=0))  # the same images: resumes
    with pytest.raises(ValueError, match="first or last image differs"):
        index(ImageSet(n=8, seed=1))


def _distributed_worker(rank, world, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        index = nx.index_dataset(make_model("vgg"), ImageSet(n=29), ["features.5", "classifier.1"], k=7,
                                 batch_size=4, progress=False)
        if rank == 0:
            index.save(out)
        else:
            assert index is None
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    out = str(tmp_path / "dist")
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    merged = nx.NeuronIndex.load(out)
    single = nx.index_dataset(make_model("vgg"), ImageSet(n=29), ["features.5", "classifier.1"], k=7, batch_size=4,
                              progress=False)
    for name in single:
        a, b = single[name], merged[name]
        for key in ("values", "ids", "positions", "class_count"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
        assert a.images_seen == b.images_seen == 29
        # Sums of float64 means, added in another order: equal to float64 rounding.
        assert torch.allclose(a.mean_sum, b.mean_sum, rtol=1e-12) and torch.allclose(a.class_sum, b.class_sum, rtol=1e-12)
    assert torch.equal(merged.labels, single.labels) and (single.labels >= 0).all()
    assert torch.allclose(torch.tensor(merged.meta["pixel_mean"]), torch.tensor(single.meta["pixel_mean"]), rtol=1e-12)


def test_index_on_a_device_named_with_an_index():
    index = nx.index_dataset(make_model("vgg"), ImageSet(n=6), ["features.5"], k=2, batch_size=3, device="cpu:0",
                             progress=False)
    assert index.k == 2 and index["features.5"].images_seen == 6


def test_pixel_batches_are_checked_on_every_batch():
    model = make_model("vgg")
    data = ImageSet(n=8)
    data.images[5, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"images \[5\] hold NaN or infinite pixels"):
        nx.index_dataset(model, data, ["features.5"], k=2, batch_size=3, progress=False)
    data = ImageSet(n=8)
    data.images[4:] *= 255  # 0..255 from the second batch on
    with pytest.warns(UserWarning, match=r"outside \[0, 1\]"):
        nx.index_dataset(model, data, ["features.5"], k=2, batch_size=3, progress=False)
    channels_last = ImageSet(n=4)
    channels_last.images = channels_last.images.permute(0, 2, 3, 1).contiguous()  # [H, W, 3] images
    with pytest.raises(ValueError, match=r"channels last"):
        nx.index_dataset(model, channels_last, ["features.5"], k=2, batch_size=2, progress=False)


class _Labelled(torch.utils.data.Dataset):
    """ImageSet's images with the labels given (any type)."""

    def __init__(self, labels, classes=None):
        self.images, self.labels = ImageSet(n=len(labels)).images, labels
        if classes is not None:
            self.classes = classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_labels_are_class_indices_of_the_dataset():
    def index(data):
        return nx.index_dataset(make_model("vgg"), data, ["features.5"], k=2, batch_size=2, progress=False)

    with pytest.raises(ValueError, match=r"image 3 has label 7: labels must be class indices in \[0, 2\)"):
        index(_Labelled([0, 1, 0, 7], classes=["a", "b"]))
    with pytest.raises(ValueError, match=r"at most 1048576 classes"):
        index(_Labelled([0, 1, 2 ** 40, 0]))
    with pytest.raises(ValueError, match="labels must be integer class indices .* torch.bool"):
        index(_Labelled([True, False, True, False]))
    one_element = index(_Labelled([torch.tensor([1]), torch.tensor([0]), torch.tensor([1]), torch.tensor([0])]))
    assert one_element.labels.tolist() == [1, 0, 1, 0]


def test_pil_images_and_none_labels_are_refused_naming_the_fix():
    """default_collate's own TypeError named neither the dataset nor the fix."""
    from PIL import Image

    model = make_model("vgg")
    pil = [Image.new("RGB", (16, 16))] * 4
    with pytest.raises(ValueError, match="Image image.*to_tensor or PILToTensor"):
        nx.index_dataset(model, pil, ["features.5"], k=2, batch_size=2, progress=False)
    unlabelled = [(img, None) for img in ImageSet(n=4).images]
    with pytest.raises(ValueError, match=r"\(image, None\) pairs"):
        nx.index_dataset(model, unlabelled, ["features.5"], k=2, batch_size=2, progress=False)


def test_a_checkpoint_path_holding_something_else_is_not_to_be_deleted(tmp_path):
    """A saved index or a user's folder at checkpoint= is refused with "give it a path of its own" (the
    message had said "Delete it to start over"); an empty directory starts a fresh run; a corrupt
    checkpoint is still one to delete."""
    model, data = make_model("vgg"), ImageSet(n=6)
    args = dict(layers=["features.2"], k=2, batch_size=2, progress=False)
    index = nx.index_dataset(model, data, **args)
    index.save(tmp_path / "saved")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for path in (tmp_path / "saved", user):
        with pytest.raises(BundleError, match="is not an index checkpoint .* a path of its own") as info:
            nx.index_dataset(model, data, checkpoint=str(path), **args)
        assert "Delete it" not in str(info.value)
    assert (user / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    resumed = nx.index_dataset(model, data, checkpoint=str(empty), **args)
    assert torch.equal(resumed["features.2"].values, index["features.2"].values)
    ckpt = tmp_path / "ck"
    nx.index_dataset(model, data, checkpoint=str(ckpt), checkpoint_every=1, **args)
    with open(ckpt / "tensors.safetensors", "r+b") as f:  # the finished checkpoint stays
        f.truncate(10)
    with pytest.raises(BundleError, match="Delete it to start over"):
        nx.index_dataset(model, data, checkpoint=str(ckpt), **args)


def _tamper_duplicate(manifest, tensors):
    manifest["layers"][1]["name"] = manifest["layers"][0]["name"]


def _tamper_class_sum(manifest, tensors):
    tensors["1.class_sum"] = tensors["1.class_sum"][:, :2].contiguous()


def _tamper_class_count(manifest, tensors):
    tensors["1.class_count"] = tensors["1.class_count"].double()


def _tamper_map_size(manifest, tensors):
    manifest["layers"][1]["map_size"] = [0, 0]


def _tamper_map_rank(manifest, tensors):
    manifest["layers"][1]["map_size"] = [8]


def _tamper_length(manifest, tensors):
    manifest["dataset_length"] = 3
    tensors.pop("labels", None)
    for layer in manifest["layers"]:  # (else "saw 6 images of a dataset of 3": _tamper_images_seen)
        layer["images_seen"] = 3


def _tamper_positions(manifest, tensors):
    tensors["1.positions"] = tensors["1.positions"] + 1000


@pytest.mark.parametrize("tamper, message", [
    (_tamper_duplicate, "recorded twice"), (_tamper_class_sum, "class statistics"),
    (_tamper_class_count, "class statistics"), (_tamper_map_size, "two positive ints"),
    (_tamper_map_rank, "two positive ints"), (_tamper_length, "image id .* in a dataset of 3 images"),
    (_tamper_positions, "positions out of range"), (None, "format version 0")])
def test_load_refuses_a_bundle_whose_parts_disagree(tmp_path, tamper, message):
    """Bundles with valid checksums (another program's, another version's) whose parts disagree had
    loaded: a layer silently dropped, or a crash later in Morcos / yx() / neuron_features."""
    from neuroidx_fast.neuron_index import INDEX_FORMAT, INDEX_VERSION

    index = nx.index_dataset(make_model("vgg"), _Labelled([0, 1, 2, 0, 1, 2]), ["features.2", "features.5"], k=2,
                             batch_size=3, progress=False)
    index.save(tmp_path / "good")
    manifest, tensors = read_bundle(tmp_path / "good", INDEX_FORMAT, INDEX_VERSION)
    manifest = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "tensors_sha256",
                                                                "manifest_sha256")}
    tensors = dict(tensors)
    if tamper is not None:
        tamper(manifest, tensors)
    write_bundle(str(tmp_path / "bad"), INDEX_FORMAT, INDEX_VERSION if tamper else 0, manifest, tensors)
    with pytest.raises(BundleError, match=message):
        nx.NeuronIndex.load(tmp_path / "bad")


class _Mixed(torch.utils.data.Dataset):
    """16 images, labelled; from id 8 on (the second rank's shard of two, in batches of 4) they are 20 px
    instead of 16 (mode "size"), unlabelled ("labels"), or gray ("channels")."""

    def __init__(self, mode):
        self.mode, self.images = mode, ImageSet(n=16).images

    def __len__(self):
        return 16

    def __getitem__(self, i):
        image, label = self.images[i], i % 3
        if i < 8:
            return image, label
        if self.mode == "size":
            return torch.nn.functional.pad(image, (2, 2, 2, 2)), label
        if self.mode == "labels":
            return image
        return image[:1], label


def _to_rgb(x):
    return x.expand(-1, 3, -1, -1)  # (gray images to RGB; RGB ones stay)


_MIXED_SAID = {"size": r"images 8..15 are \(20, 20\) but the first ones are \(16, 16\): give every image",
               "labels": "some dataset items have labels and others do not",
               "channels": r"images 8..15 have 1 channel\(s\) but the first ones have 3"}


def _mismatch_worker(rank, world, init_file, out):
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
        said = {}
        for mode in _MIXED_SAID:
            try:
                nx.index_dataset(model, _Mixed(mode), ["1"], k=2, batch_size=4, preprocess=_to_rgb, progress=False)
                said[mode] = "no error"
            except ValueError as exc:
                said[mode] = str(exc)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(said, f)
    finally:
        dist.destroy_process_group()


def test_ranks_whose_shards_disagree_are_refused_on_every_rank(tmp_path):
    """Each rank compared its images only with its own first ones, and rank 0 took its own image and map
    sizes, and class statistics from the ranks with labels: positions of 20 px maps were labelled 16 px
    (the saved index then failed to load), labels -1 for half the data. Now every rank raises what a
    single process does (none left waiting in a collective)."""
    import json

    out = str(tmp_path / "said")
    mp.spawn(_mismatch_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    said = [json.loads(open(f"{out}.{rank}").read()) for rank in range(2)]
    assert said[0] == said[1]
    for mode, message in _MIXED_SAID.items():
        assert re.search(message, said[0][mode]), (mode, said[0][mode])


def test_images_whose_channels_change_are_refused():
    # the per-channel pixel sums of gray and RGB images broadcast into nonsense
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"images 8..11 have 1 channel\(s\) but the first ones have 3"):
        nx.index_dataset(model, _Mixed("channels"), ["1"], k=2, batch_size=4, preprocess=_to_rgb, progress=False)


def test_a_read_that_finds_a_save_between_its_renames_looks_again(tmp_path, monkeypatch):
    """A reader that finds the path missing reads the folder a write left beside it; the write may move it
    in (or delete it) before the reader opens it: that is a bundle being replaced, to read again, not
    "not a directory written by neuroidx_fast"."""
    from neuroidx_fast import storage

    path = tmp_path / "bundle"
    write_bundle(path, "test bundle", 1, {"n": 1}, {"x": torch.zeros(3)})
    write_bundle(tmp_path / "next", "test bundle", 1, {"n": 2}, {"x": torch.full((3,), 2.0)})
    os.replace(path, tmp_path / "bundle.old-abc")  # a save between its two renames
    os.replace(tmp_path / "next", tmp_path / "bundle.tmp-def")
    real = storage._interrupted_write

    def interrupted_write(where):
        found = real(where)
        if found is not None and not path.exists():  # the save goes on meanwhile: its second rename, cleanup
            os.replace(tmp_path / "bundle.tmp-def", path)
            storage._discard(str(tmp_path / "bundle.old-abc"))
        return found

    monkeypatch.setattr(storage, "_interrupted_write", interrupted_write)
    manifest, tensors = read_bundle(path, "test bundle", 1)
    assert manifest["n"] == 2 and float(tensors["x"][0]) == 2.0
    # what stays no directory is still said so, at once
    (tmp_path / "file").write_text("x")
    for where in (tmp_path / "file", tmp_path / "missing"):
        with pytest.raises(BundleError, match="is not a directory written by neuroidx_fast"):
            read_bundle(where, "test bundle", 1)


def _add(x, by):
    return x + by


def _adder(by):
    return lambda x: x + by


def check_preprocess_resumes(model, folder, cases, refused: str = "the preprocess function differs") -> None:
    """For each (first, others, same) of ``cases``: a run interrupted with preprocess ``first`` (checkpoints
    under ``folder``) is refused (``refused``) with each of ``others`` and, resumed with ``same``, equals a
    whole run with it."""
    args = dict(layers=["features.2"], k=2, batch_size=2, checkpoint_every=1, progress=False)
    for case, (first, others, same) in enumerate(cases):
        ckpt = str(folder / f"ckpt{case}")
        with pytest.raises(RuntimeError, match="disk gone"):
            nx.index_dataset(model, _Listed("files A", fail=5, n=8), preprocess=first, checkpoint=ckpt, **args)
        for other in others:
            with pytest.raises(ValueError, match=refused):
                nx.index_dataset(model, _Listed("files A", n=8), preprocess=other, checkpoint=ckpt, **args)
        resumed = nx.index_dataset(model, _Listed("files A", n=8), preprocess=same, checkpoint=ckpt, **args)
        whole = nx.index_dataset(model, _Listed("files A", n=8), preprocess=same, **args)
        for key in ("values", "ids", "positions"):
            assert torch.equal(getattr(resumed["features.2"], key), getattr(whole["features.2"], key)), (case, key)


def test_a_resume_with_another_preprocess_function_is_refused(tmp_path):
    """A function preprocess was recorded by its name alone: <lambda> for every lambda, partial for every
    functools.partial; a run resumed with another one returned a mix of two computations."""
    cases = [(lambda x: x * 2, [lambda x: x * 3, lambda x: x.sin()], lambda x: x * 2),  # code, constants, names
             (_adder(0.5), [_adder(1.0), _adder(torch.tensor(0.5))], _adder(0.5)),  # what it closes over
             (functools.partial(_add, by=0.5), [functools.partial(_add, by=1.0), functools.partial(_add, 0.5)],
              functools.partial(_add, by=0.5))]  # a partial's arguments
    check_preprocess_resumes(make_model("vgg"), tmp_path, cases)


def test_checkpoints_without_the_preprocess_code_still_resume(tmp_path):
    """Checkpoints of earlier versions record the preprocess by name only: they resume as before."""
    from neuroidx_fast.indexing import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    model, ckpt = make_model("vgg"), str(tmp_path / "ckpt")
    args = dict(layers=["features.2"], k=2, batch_size=2, checkpoint=ckpt, checkpoint_every=1, progress=False)
    with pytest.raises(RuntimeError, match="disk gone"):
        nx.index_dataset(model, _Listed("files A", fail=5, n=8), preprocess=_adder(0.5), **args)
    manifest, tensors = read_bundle(ckpt, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    assert manifest["fingerprint"]["preprocess_code"] is not None
    del manifest["fingerprint"]["preprocess_code"]
    manifest = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "tensors_sha256",
                                                                "manifest_sha256")}
    write_bundle(ckpt, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, manifest, tensors)
    with pytest.raises(ValueError, match=r"preprocess: checkpoint '.*_adder.<locals>.<lambda>' vs now 'functools"):
        nx.index_dataset(model, _Listed("files A", n=8), preprocess=functools.partial(_add, by=0.5), **args)
    resumed = nx.index_dataset(model, _Listed("files A", n=8), preprocess=_adder(0.5), **args)
    assert resumed["features.2"].images_seen == 8


def test_a_subset_keeps_the_class_names_of_its_dataset():
    """index_dataset read ``classes`` of the Subset itself (it has none): the names were lost, and classes
    without an image in the subset got no row of class statistics."""
    data = ImageSet(n=12, classes=4)
    assert 3 in data.labels.tolist()
    kept = [i for i in range(12) if int(data.labels[i]) != 3]
    counts = [data.labels[kept].tolist().count(c) for c in range(4)]
    for subset in (Subset(data, kept), Subset(Subset(data, range(12)), kept)):
        index = nx.index_dataset(make_model("vgg"), subset, ["features.2"], k=2, batch_size=4, progress=False)
        assert index.class_names == data.classes
        assert index["features.2"].class_count.tolist() == counts and counts[3] == 0


class _Huge(torch.nn.Module):
    """Maps of 3e37 everywhere: their float32 sums (16 elements) overflow."""

    def forward(self, x):
        return x[:, :2, :4, :4] * 0 + 3e37


def test_an_overflowing_layer_gets_finite_means_through_the_one_sync_per_batch():
    index = nx.index_dataset(torch.nn.Sequential(_Huge()), ImageSet(n=5), ["0"], k=2, batch_size=2, progress=False,
                             backend="torch")
    mean = float(torch.tensor(3e37))  # (3e37 rounded to float32)
    assert torch.equal(index["0"].mean_sum, torch.full((2,), 5 * mean, dtype=torch.float64))
    assert torch.equal(index["0"].class_sum.sum(dim=0), index["0"].mean_sum)


class _RefusesNonFinite(torch.nn.Module):
    """A model that refuses non-finite inputs (as models with input asserts do)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if not torch.isfinite(x).all():
            raise RuntimeError("non-finite input")
        return self.conv(x)


def test_nan_pixels_are_named_before_what_they_break():
    """The pixel range is read with the batch's other device checks, after the forward; an error of the
    batch before then must still give way to the pixel error, as when pixels were checked first."""
    data = ImageSet(n=4)
    data.images[3, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"images \[3\] hold NaN or infinite pixels"):
        nx.index_dataset(_RefusesNonFinite().eval(), data, ["conv"], k=1, batch_size=2, progress=False)
    data.labels[2] = -3  # a bad label in the same batch
    with pytest.raises(ValueError, match=r"images \[3\] hold NaN or infinite pixels"):
        nx.index_dataset(make_model("vgg"), data, ["features.0"], k=1, batch_size=2, progress=False)


def test_images_in_0_255_are_warned_of_before_the_first_batch_fails():
    data = ImageSet(n=2)
    data.images = data.images * 255
    four_channels = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 3))  # fails on these RGB images
    with pytest.warns(UserWarning, match=r"images are outside \[0, 1\]"), \
            pytest.raises(ValueError, match="the model fails on the first images"):
        nx.index_dataset(four_channels, data, ["0"], k=1, progress=False)
