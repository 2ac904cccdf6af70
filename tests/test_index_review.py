"""index_dataset, NeuronIndex.load and collate_images on inputs a review found mishandled: non-tensor state,
preprocess values that only their repr tells apart, bundles and checkpoints whose numbers disagree, a layer
the forward never reaches, datasets whose items are of mixed or wrong kinds."""

import enum

import pytest
import torch
from torch import nn

import neuroidx_fast as nx
from neuroidx_fast.indexing import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, _preprocess_code, model_fingerprint
from neuroidx_fast.neuron_index import INDEX_FORMAT, INDEX_VERSION
from neuroidx_fast.prepare import collate_images
from neuroidx_fast.storage import BundleError, read_bundle, write_bundle
from models import ImageSet, make_model

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

