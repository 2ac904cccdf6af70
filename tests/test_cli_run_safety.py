"""The neuroidx command never loses a finished run's outputs by surprise: other settings need --force
even where the index is gone, --force keeps the old run until the new settings have indexed a batch, a
damaged run.json is replaced by the command its message names, options are checked before anything
goes, two commands never write in one run at once, and errors name command-line options."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from neuroidx_fast import NeuronIndex
from neuroidx_fast.outdir import OutDir
from tests.models import make_model
from tests.test_cli import _cli

MODEL = "tests.models:make_model"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        os.makedirs(root / name)
        for i in range(4):
            Image.fromarray((rng.random((18, 18, 3)) * 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _index_args(folder, out, *extra):
    return ["index", "--model", MODEL, "--data", folder, "--size", 16, "--normalize", "0.5,0.25",
            "--layers", "features.4,features.8", "--k", 3, "--batch-size", 4, "--out", out, "--no-progress", *extra]


def _error(capsys, *argv):
    code = _cli(*argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("neuroidx: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.fixture
def run_with_features(folder, tmp_path):
    out = tmp_path / "run"
    assert _cli(*_index_args(folder, out)) == 0
    assert _cli("features", "--out", out, "--keep", 2, "--no-progress") == 0
    return out


def _intact(out, k=3):
    """The finished run of ``run_with_features`` is all there."""
    run = OutDir(out)
    assert json.loads(run.run_json.read_text())["k"] == k
    assert NeuronIndex.load(run.index).k == k
    assert run.grid_png("features.8").exists() and run.made("features", "features.8")


def test_other_settings_are_refused_where_the_index_is_gone(folder, run_with_features, capsys):
    # before, only index/manifest.json (or a checkpoint) said the run had begun: without it, --k 4 went
    # ahead without --force and deleted features/, neurons.csv, plots/ ... without a word
    out, run = run_with_features, OutDir(run_with_features)
    for lose in (lambda: (run.index / "manifest.json").unlink(), lambda: shutil.rmtree(run.index)):
        lose()
        err = _error(capsys, *_index_args(folder, out, "--k", 4))
        assert "holds a run made with other settings (k)" in err and "--force" in err
        assert run.grid_png("features.8").exists() and run.made("features", "features.8")
        # the same settings remake the index as for a damaged one: the outputs made from it stay
        assert _cli(*_index_args(folder, out)) == 0
        _intact(out)
    capsys.readouterr()
    assert _cli("features", "--out", out, "--keep", 2, "--no-progress") == 0
    assert "features.8: features already made" in capsys.readouterr().out


def test_a_damaged_run_json_is_replaced_by_the_command_its_message_names(folder, run_with_features, capsys):
    # before, every command (`index --force` too) said "index again with --force", and that attempt deleted
    # the index and the later outputs, then failed on the same file
    out, run = run_with_features, OutDir(run_with_features)
    whole = run.run_json.read_text()
    for damaged in (whole[:len(whole) // 2], '{"model": "x"}'):
        run.run_json.write_text(damaged)
        assert _cli(*_index_args(folder, out, "--force")) == 0  # replaced, as --force says
        assert run.run_settings()["k"] == 3 and NeuronIndex.load(run.index).k == 3
        assert _cli("features", "--out", out, "--keep", 2, "--no-progress") == 0
        run.run_json.write_text(damaged)
        for argv in (("features", "--out", out, "--no-progress"), _index_args(folder, out),
                     ("index", "--out", out, "--no-progress", "--force")):
            err = _error(capsys, *argv)
            assert f"`neuroidx index --model ... --data ... --out {out} --force`" in err  # (what works)
        assert run.grid_png("features.8").exists() and NeuronIndex.load(run.index).k == 3  # (nothing went)


def test_force_keeps_the_old_run_when_the_new_settings_fail_at_once(folder, run_with_features, tmp_path, capsys):
    # before, --force deleted the finished run, then the first batch met NaN activations, and the message
    # advised nan='ignore', an argument of the Python API that the command line does not have
    out = run_with_features
    state = {name: value.clone().contiguous() for name, value in make_model().state_dict().items()}
    state["features.0.weight"].fill_(float("nan"))
    weights = tmp_path / "nan.safetensors"
    save_file(state, str(weights))
    code = _cli(*_index_args(folder, out, "--k", 4, "--weights", weights, "--force"))
    err = capsys.readouterr().err
    _intact(out)
    assert sorted(p.name for p in out.iterdir()) == ["features", "index", "run.json"]
    assert code == 2 and err.count("\n") == 1
    assert "NaN activation in layer 'features.4'" in err and "check --model and --weights" in err
    assert "pass nan=" not in err


def test_options_are_checked_before_anything_goes(run_with_features, capsys):
    # before, `features --force --workers -1` deleted every layer's record, then failed with torch's
    # "num_workers option should be non-negative; use num_workers=0" (an API name)
    out = run_with_features
    for argv in (("features", "--out", out, "--force", "--workers", -1),
                 ("index", "--out", out, "--workers", -2),
                 ("features", "--out", out, "--force", "--keep", -1)):
        with pytest.raises(SystemExit) as exit_:
            _cli(*argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument {argv[-2]}: expected an integer >= 0, got {argv[-1]}" in err
    _intact(out)
    assert _cli("features", "--out", out, "--keep", 0, "--no-progress") == 0  # (0: no crops, which is fine)


def test_a_second_command_on_a_run_fails_at_once(folder, run_with_features, capsys):
    # before, two `index` runs on one --out could both report success while one's result was lost, and two
    # `features --force` failed with "[Errno 2] No such file or directory: '.../nf/.tmp-....png'"
    fcntl = pytest.importorskip("fcntl")  # (without it, commands are not kept apart)
    out, run = run_with_features, OutDir(run_with_features)
    lock_file = out / ".neuroidx.lock"  # (the run directory's lock, outdir.py)
    with open(lock_file, "w") as held:  # (as another command holds it)
        fcntl.flock(held, fcntl.LOCK_EX)
        for argv in (("features", "--out", out, "--keep", 2, "--force", "--no-progress"),
                     _index_args(folder, out, "--k", 4, "--force"),
                     ("report", out)):
            err = _error(capsys, *argv)
            assert f"another neuroidx command is writing in {out}" in err
        _intact(out)
        assert not run.report_dir.exists()
    os.unlink(lock_file)
    assert _cli("report", out) == 0 and not lock_file.exists()  # released: taken, and deleted after
    # a command refused before it wrote anything leaves no folder behind (the lock's own)
    fresh = out.parent / "new" / "run"
    assert "unknown layer" in _error(capsys, *_index_args(folder, fresh, "--layers", "nope"))
    assert not fresh.parent.exists()


def test_a_failing_model_factory_is_named_with_its_options(folder, tmp_path, capsys):
    # the factory's own KeyError was "neuroidx: error: xx"
    err = _error(capsys, *_index_args(folder, tmp_path / "run", "--model-args", '{"name": "xx"}'))
    assert "--model 'tests.models:make_model' with --model-args '{\"name\": \"xx\"}' failed: KeyError" in err


def test_a_file_that_holds_no_weights_is_named_so(folder, tmp_path, capsys):
    # was "cannot read weights '...': KeyError: 105" (torch's unpickler on a text file)
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    err = _error(capsys, *_index_args(folder, tmp_path / "run", "--weights", text))
    assert f"--weights '{text}' is neither a safetensors file nor a torch file" in err


def test_something_else_in_the_checkpoint_folder_is_named_with_the_cli_fix(run_with_features, capsys):
    # an index put where the checkpoint goes was "give checkpoint= a path of its own" (index_dataset's)
    out, run = run_with_features, OutDir(run_with_features)
    shutil.copytree(run.index, run.checkpoint)
    shutil.rmtree(run.index)
    err = _error(capsys, "index", "--out", out, "--no-progress")
    assert f"{run.checkpoint} holds something other than this run's index checkpoint" in err
    assert "move it away" in err and "checkpoint=" not in err
    assert NeuronIndex.load(run.checkpoint).k == 3  # (the user's to move)


def test_a_temporary_file_left_by_a_killed_write_is_no_output(run_with_features, capsys):
    # before, a .tmp-* file that a killed command left in a layer's folder was listed among the layer's
    # outputs: deleted by hand afterwards, it made the layer again
    run = OutDir(run_with_features)
    left = run.grid_png("features.8").parent / ".tmp-killed.png"
    left.write_bytes(b"half a png")
    assert _cli("features", "--out", run.root, "--keep", 2, "--force", "--layers", "features.8", "--no-progress") == 0
    left.unlink()
    capsys.readouterr()
    assert _cli("features", "--out", run.root, "--keep", 2, "--layers", "features.8", "--no-progress") == 0
    assert "already made" in capsys.readouterr().out
