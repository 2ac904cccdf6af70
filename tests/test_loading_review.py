"""Models, weights and normalisation named on the command line, on inputs a review found mishandled: a
factory module of the same name in the working directory, empty or wrapped weights files, gray images
under '--normalize mean,std', and malformed --model strings."""

import sys

import pytest
import torch
from torch import nn

from neuroidx_fast.loading import Normalize, load_model, load_weights, parse_normalize

FACTORY = '''import torch.nn as nn
def make():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model.made_in = {where!r}
    return model
'''


def test_a_factory_comes_from_the_recorded_folder_before_the_working_one(tmp_path, monkeypatch):
    # before, a later step run from another folder with a module of the same name built that one's model
    for where in ("recorded", "elsewhere"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "review_nets.py").write_text(FACTORY.format(where=where))
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "review_nets", raising=False)
    assert load_model("review_nets:make", import_root=str(tmp_path / "recorded")).made_in == "recorded"
    monkeypatch.delitem(sys.modules, "review_nets")
    assert load_model("review_nets:make").made_in == "elsewhere"  # (no folder recorded: the working one)
    monkeypatch.delitem(sys.modules, "review_nets")


@pytest.mark.parametrize("spec", [":x", "review_nowhere:make"])
def test_a_model_that_cannot_be_imported_is_named(spec):
    with pytest.raises(ValueError, match=f"cannot import .* for --model '{spec}'"):  # (was "Empty module name")
        load_model(spec)


def test_weights_files_empty_wrapped_prefixed_or_a_folder(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read weights .*: EOFError"):  # (was IndexError: list index...)
        load_weights(model, empty)
    with pytest.raises(ValueError, match="is a folder"):  # (was "does not exist")
        load_weights(model, tmp_path)
    state = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, tmp_path / "checkpoint.pt")
    loaded = load_weights(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp_path / "checkpoint.pt")
    assert torch.equal(loaded[0].weight, state["0.weight"])  # (was "hold no state dict of tensors")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "parallel.pt")
    with pytest.raises(ValueError, match="saved from DataParallel"):
        load_weights(model, tmp_path / "parallel.pt")


def test_one_mean_and_std_normalise_gray_images_as_gray():
    gray = torch.rand(2, 1, 5, 5)
    out = parse_normalize("0.5,0.25")(gray)
    assert out.shape == gray.shape and torch.equal(out, (gray - 0.5) / 0.25)  # (was [2, 3, 5, 5])
    color = torch.rand(2, 3, 5, 5)
    assert torch.equal(parse_normalize("0.5,0.25")(color), (color - 0.5) / 0.25)
    with pytest.raises(ValueError, match="holds 3 channels' means and stds, but the images have 1"):
        Normalize([0.4, 0.5, 0.6], [0.2, 0.2, 0.2])(gray)
