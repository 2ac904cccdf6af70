"""index_dataset and ImageFolder on inputs a review found mishandled: a bound method as the preprocess
(its object's settings went unrecorded), folders linked inside a class folder, empty class folders,
and inputs whose errors blamed something else (a layer that is not batch-first, a layer of no
channel, a DataLoader or an IterableDataset as the dataset, a ``__len__`` that says too much, a
broken link under checkpoint=)."""

import enum
import functools
import logging
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import neuroidx_fast as nx
from neuroidx_fast.imagefolder import ImageFolder
from neuroidx_fast.indexing import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, _preprocess_code
from neuroidx_fast.loading import Normalize
from neuroidx_fast.storage import read_bundle
from tests.models import ImageSet, make_model
from tests.test_index_review import _rewrite
from tests.test_indexing import _Listed, check_preprocess_resumes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARGS = dict(layers=["features.2"], k=2, batch_size=2, checkpoint_every=1, progress=False)


class _Scale:
    def __init__(self, by):
        self.by = by

    def apply(self, x):
        return x * self.by


class InterpolationMode(enum.Enum):  # (as torchvision's)
    NEAREST = "nearest"
    BILINEAR = "bilinear"


class _Cached(_Scale):
    """A preprocess object as found in the wild: a cache filled as it is used, a logger, a long list."""

    def __init__(self, by, files=1000, offset=0.0):
        super().__init__(by)
        self._offset = offset  # (a setting under a private name)
        self._on = {}  # (a cache by device)
        self.log = logging.getLogger(f"neuroidx-test-{by}")
        self.files = [f"image{i}.png" for i in range(files)]

    def apply(self, x):
        self._on.setdefault(x.device, torch.tensor(self.by))
        return x * self._on[x.device]


def _interrupted(model, ckpt, preprocess):
    with pytest.raises(RuntimeError, match="disk gone"):
        nx.index_dataset(model, _Listed("files A", fail=5, n=8), preprocess=preprocess, checkpoint=ckpt, **ARGS)


def test_a_resume_with_a_bound_method_of_other_settings_is_refused(tmp_path):
    """A bound method was recorded by its function and its object's type: a run interrupted with
    _Scale(1.0).apply resumed with _Scale(100.0).apply (or one Normalize's forward with another's) and
    returned a mix of two preprocessings."""
    cases = [(_Scale(1.0).apply, [_Scale(100.0).apply], _Scale(1.0).apply),
             (Normalize([0.5] * 3, [0.25] * 3).forward, [Normalize([0.4] * 3, [0.25] * 3).forward],
              Normalize([0.5] * 3, [0.25] * 3).forward)]
    check_preprocess_resumes(make_model("vgg"), tmp_path, cases,
                             refused="the preprocess function differs .*the object it is a method of")


def test_checkpoints_of_a_bound_method_made_before_its_object_was_recorded_still_resume(tmp_path):
    """The keys recorded before keep their rule (a bound method by its object's type): a checkpoint that
    lacks the key of the object resumes as before."""
    assert _preprocess_code(_Scale(1.0).apply) == _preprocess_code(_Scale(100.0).apply)
    assert _preprocess_code(_Scale(1.0).apply, reprs=True) == _preprocess_code(_Scale(100.0).apply, reprs=True)
    model, ckpt = make_model("vgg"), str(tmp_path / "ck")
    _interrupted(model, ckpt, _Scale(1.0).apply)
    manifest, tensors = read_bundle(ckpt, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    assert manifest["fingerprint"].pop("preprocess_objects") is not None
    _rewrite(ckpt, CHECKPOINT_FORMAT, manifest, tensors)
    resumed = nx.index_dataset(model, _Listed("files A", n=8), preprocess=_Scale(1.0).apply, checkpoint=ckpt, **ARGS)
    assert resumed["features.2"].images_seen == 8


def _image(path, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(path)


def test_image_folder_follows_folders_linked_inside_a_class_once(tmp_path):
    """A linked class folder was followed, a folder linked inside a class folder was left out without a
    word; followed now, a link back up (a cycle) or a second link to a folder walked only once."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    for folder in (root / "cats", root / "dogs", outside):
        folder.mkdir(parents=True)
    _image(root / "cats" / "a.png")
    _image(root / "dogs" / "b.png")
    for i in range(2):
        _image(outside / f"{i}.png", seed=i + 1)
    os.symlink(outside, root / "cats" / "more")
    os.symlink(outside, root / "cats" / "same")  # (a second link to the same folder)
    os.symlink(root / "cats", root / "cats" / "more" / "up")  # (a cycle: cats/more/up/more/up/...)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = ImageFolder(root, size=8)
    assert [(os.path.relpath(path, root), label) for path, label in folder.samples] == [
        ("cats/a.png", 0), ("cats/more/0.png", 0), ("cats/more/1.png", 0), ("dogs/b.png", 1)]


def test_an_empty_class_folder_stays_a_class_and_is_named(tmp_path):
    """A class folder without images became a class without a word (a typo in a folder, images not yet
    copied); it stays a class, so that class indices stay those of the folder names."""
    for name in ("birds", "cats", "dogs", "eels"):
        (tmp_path / name).mkdir()
    _image(tmp_path / "cats" / "a.png")
    _image(tmp_path / "eels" / "b.png")
    with pytest.warns(UserWarning, match=r"2 class folder\(s\) of .* hold no JPEG or PNG images \(birds, dogs\)"):
        folder = ImageFolder(tmp_path, size=8)
    assert folder.classes == ["birds", "cats", "dogs", "eels"] and folder.targets == [1, 3]


class _Through(nn.Module):
    """A conv, then ``change`` of its output, at the module ``a``."""

    def __init__(self, change):
        super().__init__()
        self.change, self.conv, self.a = change, nn.Conv2d(3, 4, 3), nn.Identity()

    def forward(self, x):
        return self.a(self.change(self.conv(x)))


_IMAGES = [torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]


def test_a_layer_whose_first_dimension_is_not_the_batch_is_named():
    """It was reported as wrong image ids: "ids must be a [B] = [1] tensor of image ids"."""
    with pytest.raises(ValueError, match=r"layer 'a' outputs shape \(1, 4, 6, 6\) for a batch of 3 images: its first "
                                         "dimension must be the batch"):
        nx.index_dataset(_Through(lambda y: y[:1]).eval(), _IMAGES, ["a"], k=2, batch_size=3, progress=False)


def test_a_layer_of_no_channel_is_named():
    """It was reported as "TopK: num_units must be a positive int, got 0", no layer named."""
    with pytest.raises(ValueError, match=r"layer 'a' outputs shape \(3, 0, 6, 6\): it has no units \(0 channels\)"):
        nx.index_dataset(_Through(lambda y: y[:, :0]).eval(), _IMAGES, ["a"], k=2, batch_size=3, progress=False)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, images):
        self.images = images

    def __iter__(self):
        return iter(self.images)

    def __len__(self):
        return len(self.images)


class _Overstated(ImageSet):
    def __len__(self):
        return 10  # (it holds 6)


_DATASET_ARGS = dict(layers=["features.2"], k=2, batch_size=4, progress=False)


def test_a_dataloader_given_as_the_dataset_is_refused():
    """Its batch count was taken as its number of images, then: "'DataLoader' object is not subscriptable"."""
    with pytest.raises(TypeError, match="not a DataLoader .*pass loader.dataset, and batch_size= and num_workers="):
        nx.index_dataset(make_model("vgg"), torch.utils.data.DataLoader(ImageSet(n=6), batch_size=4), **_DATASET_ARGS)


def test_an_iterable_dataset_is_refused():
    """It failed with torch's "Subclasses of Dataset should implement __getitem__" (NotImplementedError)."""
    data = ImageSet(n=6)
    with pytest.raises(TypeError, match=r"the dataset is an IterableDataset \(_Stream\): .*map-style dataset"):
        nx.index_dataset(make_model("vgg"), _Stream([data[i] for i in range(6)]), **_DATASET_ARGS)


def test_a_dataset_shorter_than_its_len_is_named(tmp_path):
    """The dataset's own IndexError came out as it was, naming neither the image nor the length (with
    checkpoint=, from the hash of its last image)."""
    for checkpoint in (None, str(tmp_path / "ck")):
        last = 6 if checkpoint is None else 9
        with pytest.raises(IndexError, match=rf"reading image {last} \(.*\), though its __len__ says it holds 10"):
            nx.index_dataset(make_model("vgg"), _Overstated(n=6), checkpoint=checkpoint, **_DATASET_ARGS)


def test_a_broken_link_is_named_with_a_checkpoint_as_without(tmp_path):
    """With checkpoint=, ImageFolder.fingerprint() stat-ed a broken link: a bare FileNotFoundError."""
    (tmp_path / "a").mkdir()
    for i in range(3):
        _image(tmp_path / "a" / f"{i}.png", seed=i)
    os.symlink(tmp_path / "nowhere.png", tmp_path / "a" / "broken.png")
    folder, model = ImageFolder(tmp_path, size=16), make_model("vgg")
    for checkpoint in (None, str(tmp_path / "ck")):
        with pytest.raises(ValueError, match="cannot read image .*broken.png"):
            nx.index_dataset(model, folder, ["features.2"], k=2, batch_size=2, checkpoint=checkpoint, progress=False)


def test_a_bound_methods_object_is_known_by_its_settings_alone(tmp_path):
    """A first fix described the whole object: its cache, filled by the interrupted run, made the resume's
    fresh object differ; a logger's attributes reach every logger of the process; a list of a million files
    took seconds to hash at every start."""
    model, ckpt = make_model("vgg"), str(tmp_path / "ck")
    _interrupted(model, ckpt, _Cached(1.0).apply)
    logging.getLogger("neuroidx-test-another")  # (a logger made since: the manager's dict grew)
    resumed = nx.index_dataset(model, _Listed("files A", n=8), preprocess=_Cached(1.0).apply, checkpoint=ckpt,
                               **ARGS)
    assert resumed["features.2"].images_seen == 8
    _interrupted(model, str(tmp_path / "ck2"), _Cached(1.0).apply)
    with pytest.raises(ValueError, match="the preprocess function differs"):  # (its setting still counts)
        nx.index_dataset(model, _Listed("files A", n=8), preprocess=_Cached(2.0).apply,
                         checkpoint=str(tmp_path / "ck2"), **ARGS)
    code = functools.partial(_preprocess_code, reprs=True, selves=True)
    assert code(_Cached(1.0, files=10 ** 6).apply) == code(_Cached(1.0, files=100).apply)
    assert code(_Cached(1.0, offset=0.5).apply) != code(_Cached(1.0).apply)
    for name, one, other in (("mode", InterpolationMode.BILINEAR, InterpolationMode.NEAREST),
                             ("fn", torch.sigmoid, torch.tanh), ("fn", lambda x: x, lambda x: -x),
                             ("norm", Normalize([0.5] * 3, [0.25] * 3), Normalize([0.4] * 3, [0.25] * 3))):
        first, second = _Cached(1.0), _Cached(1.0)
        setattr(first, name, one)
        setattr(second, name, other)
        assert code(first.apply) != code(second.apply), name  # (an enum, a function or a module: dropped once)
