"""The neuroidx command end to end on a tiny image folder made here, and its one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from neuroidx_fast import NeuronIndex
from neuroidx_fast.cli import build_parser, main
from neuroidx_fast.outdir import OutDir, safe_name
from tests.models import make_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tests.models:make_model"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "<i>fish&"]):
        os.makedirs(root / name)
        for i in range(5):
            pixels = (rng.random((20 + i, 18, 3)) * 255).astype(np.uint8)
            pixels[..., c] = 255 - i * 20  # each class leans to one color channel
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def _cli(*argv):
    return main([str(a) for a in argv])


def _index_args(folder, out, *extra):
    return ["index", "--model", MODEL, "--data", folder, "--size", 16, "--normalize", "0.5,0.25",
            "--layers", "features.4,features.8", "--k", 4, "--batch-size", 4, "--out", out, "--no-progress", *extra]


def test_whole_pipeline_on_an_image_folder(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(*_index_args(folder, out)) == 0
    run = OutDir(out)
    settings = json.loads(run.run_json.read_text())
    assert settings["class_names"] == ["<i>fish&", "cat", "dog"] and settings["num_images"] == 15
    assert settings["labels"] == [0] * 5 + [1] * 5 + [2] * 5
    index = NeuronIndex.load(run.index)
    assert index.k == 4 and list(index.layers) == ["features.4", "features.8"] and index.input_size == (16, 16)
    assert not run.checkpoint.exists()
    assert _cli(*_index_args(folder, out)) == 0  # finished: nothing to redo
    assert "already complete" in capsys.readouterr().out

    assert _cli("features", "--out", out, "--keep", 3, "--no-progress") == 0
    assert run.grid_png("features.8").exists() and run.nf_png("features.4", 0).exists()
    capsys.readouterr()
    assert _cli("selectivity", "--out", out, "--no-progress", "--batch-size", 5) == 0
    table = pd.read_csv(run.table_csv)
    assert len(table) == 12 + 16 and table["color_selectivity"].notna().any()
    # counted out of the units whose index is defined, as the plots count them (not out of dead ones too)
    alpha = table[table["layer"] == "features.8"]["color_selectivity"]
    gamma = table[table["layer"] == "features.8"]["class_selectivity"]
    printed = capsys.readouterr().out
    assert f"features.8: {int((alpha > 0.25).sum())} of {int(alpha.notna().sum())} live units color selective" in printed
    # K = 4 top images of 3 classes: gamma >= 1/3 for every unit, so the default threshold is halfway to 1
    assert "halfway from 0.333 (the least gamma of K = 4 top images of 3 classes" in printed
    assert f"{int((gamma > 2 / 3).sum())} of {int(gamma.notna().sum())} class selective (gamma > 0.667)" in printed
    assert (gamma.dropna() >= 1 / 3 - 1e-12).all()
    assert list(run.plots_dir.glob("*.png"))
    capsys.readouterr()
    assert _cli("ablate", "--out", out, "--layers", "features.8", "--no-progress") == 0
    # a warning is one line for a person: 3 class folders, a 4-output test model
    assert "neuroidx: warning: the dataset names 3 classes but the model has 4 outputs" in capsys.readouterr().err
    drops = pd.read_csv(run.ablation_csv("features.8"))
    assert len(drops) == 16 and {"overall_drop", "max_class_drop"} <= set(drops.columns)
    assert "max_class_drop" in pd.read_csv(run.table_csv).columns
    saved = run.ablation_csv("features.8").read_bytes()
    run.ablation_csv("features.8").write_text("garbage\n1\n")
    assert "is not an ablation table (no unit column)" in _error(capsys, "selectivity", "--out", out, "--no-progress")
    run.ablation_csv("features.8").write_bytes(saved)
    # a second layer ablated, then the table made again: one set of ablation columns over both layers
    assert _cli("ablate", "--out", out, "--layers", "features.4", "--no-progress") == 0
    assert _cli("selectivity", "--out", out, "--no-progress", "--batch-size", 5) == 0
    table = pd.read_csv(run.table_csv)
    assert len(table) == 12 + 16 and table["max_class_drop"].notna().all()
    assert _cli("visualize", "--out", out, "--layers", "features.8", "--units", "0,3", "--steps", 4) == 0
    assert run.maximized_png("features.8", 3).exists()
    assert _cli("report", out) == 0
    html = (run.report_dir / "index.html").read_text()
    assert "features.8" in html and "<i>fish&" not in html

    # --force with a wrong argument deletes nothing: the arguments are checked first
    bad = _index_args(folder, out, "--force")
    bad[bad.index("--layers") + 1] = "features.4,featurs.8"
    capsys.readouterr()
    assert "featurs.8" in _error(capsys, *bad)
    assert NeuronIndex.load(run.index).k == 4 and run.grid_png("features.8").exists()
    # indexing again with --force: what was made from the old index goes with it
    assert _cli(*_index_args(folder, out, "--force")) == 0
    assert (run.index / "manifest.json").exists()
    assert not [p for p in run.derived() if p.exists()]


def test_layers_named_by_numbers_go_through_every_step(folder, tmp_path):
    out = tmp_path / "numbers"
    args = ["index", "--model", "tests.models:make_sequential", "--data", folder, "--size", 16, "--layers", "0,2",
            "--k", 3, "--batch-size", 4, "--out", out, "--no-progress"]
    assert _cli(*args) == 0
    assert _cli("selectivity", "--out", out, "--no-progress", "--batch-size", 5) == 0
    assert _cli("ablate", "--out", out, "--layers", "2", "--no-progress") == 0  # merged on a text "layer" column
    table = pd.read_csv(OutDir(out).table_csv, dtype={"layer": str})
    assert table.loc[table["layer"] == "2", "overall_drop"].notna().all()
    assert OutDir(out).ablation_classes_csv("2").exists() and _cli("report", out) == 0


def test_layer_file_names_are_one_per_layer():
    assert safe_name("layer1.0.conv1") == "layer1.0.conv1"  # a module path is a fine file name
    names = ["a.b", "a_b", "a b", "a/b", "a:b", "a_b-1"]
    assert len({safe_name(n) for n in names}) == len(names)
    assert all("/" not in safe_name(n) and " " not in safe_name(n) for n in names)


def test_index_resumes_after_an_interruption(folder, tmp_path):
    out = tmp_path / "resume"
    code = ("import sys, time, torch; sys.path.insert(0, {repo!r});"
            "from tests import models;"
            "orig = models.make_model\n"
            "def slow(*a, **k):\n"
            "    m = orig(*a, **k)\n"
            "    m.features[0].register_forward_hook(lambda *_: time.sleep(0.4))\n"
            "    return m\n"
            "models.make_model = slow\n"
            "from neuroidx_fast.cli import main; sys.exit(main({argv!r}))")
    argv = [str(a) for a in _index_args(folder, out, "--checkpoint-every", 1)]
    proc = subprocess.Popen([sys.executable, "-c", code.format(repo=REPO, argv=argv)], cwd=REPO)
    manifest = OutDir(out).checkpoint / "manifest.json"
    for _ in range(600):
        if manifest.exists() or proc.poll() is not None:
            break
        import time

        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert manifest.exists(), "no checkpoint was written before the kill"
    assert not (OutDir(out).index / "manifest.json").exists()
    # what the interruption message says to run: the run's own settings, its batch size (4) included
    assert _cli("index", "--out", out, "--no-progress") == 0
    resumed = NeuronIndex.load(OutDir(out).index)
    fresh_out = tmp_path / "fresh"
    assert _cli(*_index_args(folder, fresh_out)) == 0
    fresh = NeuronIndex.load(OutDir(fresh_out).index)
    for name in fresh:
        assert torch.equal(resumed[name].values, fresh[name].values)
        assert torch.equal(resumed[name].ids, fresh[name].ids)



def test_per_layer_steps_skip_layers_already_made(folder, tmp_path, monkeypatch, capsys):
    # features, ablate and visualize: a rerun (after an interruption, say) skips the layers whose outputs
    # are complete and were made with the same settings; other settings or --force make them again.
    from neuroidx_fast import ablation, features, maximization

    out = tmp_path / "layers"
    assert _cli(*_index_args(folder, out)) == 0
    calls, originals = [], {}

    def counted(module, name, fail_on=None):
        original = originals.setdefault(name, getattr(module, name))

        def wrapper(*args, **kwargs):
            layer = args[2] if name == "ablation_drops" else args[1]
            if layer == fail_on:
                raise KeyboardInterrupt  # an interruption half way through the layers
            calls.append((name, layer))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(features, "neuron_features", fail_on="features.8")
    assert _cli("features", "--out", out, "--keep", 2, "--no-progress") == 130
    # the same command, its options kept (without them the finished layers would be remade otherwise)
    assert (f"interrupted (run again: `neuroidx features --out {out} --keep 2 --no-progress` skips the layers it "
            "finished)") in capsys.readouterr().err
    assert calls == [("neuron_features", "features.4")]
    record = OutDir(out).step_record("features", "features.4")
    made = json.loads(record.read_text())
    assert made["settings"] == {"pad": "gray", "keep": 2}
    assert "features/features.4/features.safetensors" in made["files"] and len(made["files"]) == 3 + 12 + 12 * 2
    assert not OutDir(out).step_record("features", "features.8").exists()

    counted(features, "neuron_features")
    capsys.readouterr()
    assert _cli("features", "--out", out, "--keep", 2, "--no-progress") == 0
    assert calls[1:] == [("neuron_features", "features.8")]  # features.4 was done
    assert "features.4: features already made with these settings, skipped" in capsys.readouterr().out
    assert _cli("features", "--out", out, "--keep", 3, "--layers", "features.4", "--no-progress") == 0
    assert _cli("features", "--out", out, "--keep", 3, "--layers", "features.4", "--no-progress", "--force") == 0
    assert calls[2:] == [("neuron_features", "features.4")] * 2
    # fewer crops kept: the earlier run's extra crop PNGs go; an output deleted since: the layer is made again
    assert _cli("features", "--out", out, "--keep", 1, "--layers", "features.4", "--no-progress") == 0
    assert len(list(OutDir(out).crop_png("features.4", 0, 0).parent.iterdir())) == 12
    OutDir(out).nf_png("features.4", 5).unlink()
    assert _cli("features", "--out", out, "--keep", 1, "--layers", "features.4", "--no-progress") == 0
    assert OutDir(out).nf_png("features.4", 5).exists()
    assert calls[4:] == [("neuron_features", "features.4")] * 2
    del calls[4:]

    # a remake with other settings interrupted before it writes keeps the layer's finished outputs and their
    # record (before, the record went first: a failed remake, e.g. on a bad option, lost the layer); one
    # interrupted while it writes leaves no record of the old settings behind
    counted(features, "neuron_features", fail_on="features.8")
    assert _cli("features", "--out", out, "--keep", 5, "--layers", "features.8", "--no-progress") == 130
    made = json.loads(OutDir(out).step_record("features", "features.8").read_text())
    assert made["settings"] == {"pad": "gray", "keep": 2} and all((out / name).is_file() for name in made["files"])
    capsys.readouterr()
    assert "out of range for layer 'features.4'" in _error(capsys, "ablate", "--out", out, "--units", "0,999")
    counted(features, "neuron_features")
    from neuroidx_fast import artifacts

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt

    save_features = artifacts.save_features
    monkeypatch.setattr(artifacts, "save_features", interrupted_save)
    assert _cli("features", "--out", out, "--keep", 5, "--layers", "features.8", "--no-progress") == 130
    assert not OutDir(out).step_record("features", "features.8").exists()
    monkeypatch.setattr(artifacts, "save_features", save_features)
    del calls[4:]

    counted(ablation, "ablation_drops")
    counted(maximization, "maximize")
    for _ in range(2):
        assert _cli("ablate", "--out", out, "--layers", "features.8", "--units", "0,1", "--no-progress") == 0
        assert _cli("visualize", "--out", out, "--layers", "features.8", "--units", "1", "--steps", 2) == 0
    assert calls[4:] == [("ablation_drops", "features.8"), ("maximize", "features.8")]
    assert _cli("ablate", "--out", out, "--layers", "features.8", "--units", "0,2", "--no-progress") == 0
    assert _cli("visualize", "--out", out, "--layers", "features.8", "--units", "1", "--steps", 3) == 0
    assert calls[6:] == [("ablation_drops", "features.8"), ("maximize", "features.8")]

    # --pad takes numbers (it offered them, and argparse passed them on as strings: 'unknown pad mode 0.3')
    for pad, recorded in (("0.3", 0.3), ("0.1,0.2,0.3", [0.1, 0.2, 0.3])):
        assert _cli("features", "--out", out, "--pad", pad, "--layers", "features.4", "--keep", 1, "--no-progress") == 0
        made = json.loads(OutDir(out).step_record("features", "features.4").read_text())
        assert made["settings"]["pad"] == recorded
    with pytest.raises(SystemExit):
        build_parser().parse_args(["features", "--out", str(out), "--pad", "grey"])
    assert "mean" in capsys.readouterr().err
    # thresholds checked before the long part: the table is not rewritten
    assert "--color-threshold must be a number" in _error(capsys, "selectivity", "--out", out, "--color-threshold",
                                                          "nan")
    assert not OutDir(out).table_csv.exists()

    # indexing again (--force) removes the records with everything made from the old index
    assert _cli(*_index_args(folder, out, "--force")) == 0
    assert not list(out.rglob(".done"))

def _error(capsys, *argv):
    code = _cli(*argv)
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("neuroidx: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_input_gives_one_line_errors(folder, tmp_path, capsys):
    out = tmp_path / "bad"
    assert "does not exist" in _error(capsys, *_index_args(tmp_path / "nowhere", out))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert "no JPEG or PNG images" in _error(capsys, *_index_args(tmp_path / "empty", out))
    err = _error(capsys, "index", "--model", "tests.models:nothing_here", "--data", folder, "--layers", "x",
                 "--out", out)
    assert "has no 'nothing_here'" in err
    assert "unknown model 'resnet999'" in _error(capsys, "index", "--model", "resnet999", "--data", folder,
                                                 "--layers", "x", "--out", out)
    assert "closest names: features.4" in _error(capsys, "index", "--model", MODEL, "--data", folder, "--layers",
                                                 "feature.4", "--size", 16, "--out", out, "--no-progress")
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in make_model("resnet").state_dict().items()}, str(weights))
    assert "do not fit the model" in _error(capsys, *_index_args(folder, out, "--weights", weights))
    assert "holds no run" in _error(capsys, "features", "--out", tmp_path / "nothing")
    assert "holds no run" in _error(capsys, "report", tmp_path / "nothing")
    assert "--normalize" in _error(capsys, *_index_args(folder, tmp_path / "norm")[:-1], "--normalize", "bogus")
    assert "applies only with cropping" in _error(capsys, *_index_args(folder, tmp_path / "r", "--resize", 20,
                                                                     "--no-crop"))
    pickled = tmp_path / "whole.pt"
    torch.save(make_model("vgg"), pickled)
    assert "holds pickled Python objects" in _error(capsys, *_index_args(folder, tmp_path / "p", "--weights", pickled))
    for spec in ("0.5,0", "nan,1", "0.4,0.4,0.4,1,-1,1"):
        assert "standard deviations numbers > 0" in _error(capsys, *_index_args(folder, tmp_path / "n"),
                                                           "--normalize", spec)
    assert "--model-args must be a JSON object" in _error(capsys, *_index_args(folder, tmp_path / "m"),
                                                          "--model-args", "[1]")
    assert "use cpu or cuda" in _error(capsys, *_index_args(folder, tmp_path / "d"), "--device", "meta")
    (tmp_path / "a_file").write_text("x")
    assert "is a file: give a directory" in _error(capsys, *_index_args(folder, tmp_path / "a_file"))


def test_later_steps_refuse_a_changed_folder_or_model(folder, tmp_path, capsys):
    import shutil

    data, out = tmp_path / "data", tmp_path / "changed"
    shutil.copytree(folder, data)
    assert _cli(*_index_args(data, out)) == 0
    extra = data / "cat" / "0extra.png"  # sorts first in its class: every later id would shift
    Image.fromarray(np.zeros((18, 18, 3), np.uint8)).save(extra)
    assert "now holds 16 images, but 15 were indexed" in _error(capsys, "features", "--out", out, "--no-progress")
    extra.unlink()
    victim = data / "dog" / "1.png"
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(victim)  # same count, another image
    assert "changed since the index was made" in _error(capsys, "features", "--out", out, "--no-progress")
    shutil.copy2(folder / "dog" / "1.png", victim)
    assert _cli("features", "--out", out, "--no-progress") == 0  # restored (with its time): fine again
    # written again in place (by an editor, say): the same size, here even the same bytes, a new time
    victim.write_bytes(victim.read_bytes())
    os.utime(victim, ns=(os.stat(victim).st_atime_ns, os.stat(victim).st_mtime_ns + 10**9))
    assert "changed since the index was made" in _error(capsys, "features", "--out", out, "--no-progress")
    shutil.copy2(folder / "dog" / "1.png", victim)
    settings = json.loads(OutDir(out).run_json.read_text())
    settings["model_fingerprint"] = "0" * 64  # as if the weights file had been replaced
    OutDir(out).run_json.write_text(json.dumps(settings))
    assert "weights differ from the indexed ones" in _error(capsys, "features", "--out", out, "--no-progress")


def test_a_new_index_clears_the_old_runs_outputs_and_nothing_else(folder, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    run = OutDir(out)
    assert _cli(*_index_args(folder, out, "--images", 12)) == 0
    assert _cli("features", "--out", out, "--layers", "features.8", "--no-progress") == 0
    # the index deleted by hand and made again with other settings: refused without --force (the old run's
    # outputs would go), and with it the old run's Neuron Features (of other images) are not taken for this run's
    shutil.rmtree(run.index)
    assert "holds a run made with other settings (images)" in _error(capsys, *_index_args(folder, out, "--images", 8))
    assert run.grid_png("features.8").exists()
    assert _cli(*_index_args(folder, out, "--images", 8, "--force")) == 0
    assert not run.grid_png("features.8").exists()
    assert _cli("features", "--out", out, "--layers", "features.8", "--no-progress") == 0
    assert "already made" not in capsys.readouterr().out
    # a folder that holds files but no run is refused, --force or not, and keeps them (before, a first index
    # that failed there left a run.json, and the next one deleted the folder's plots/, features/, report/ ...)
    mine = tmp_path / "project"
    (mine / "plots").mkdir(parents=True)
    (mine / "plots" / "figure.txt").write_text("mine")
    (mine / "neurons.csv").write_text("mine")
    for force in ((), ("--force",)):
        assert "holds files but no run (no run.json)" in _error(capsys, *_index_args(folder, mine, *force))
        assert "holds files but no run" in _error(capsys, "demo", "--quick", "--out", mine)
    assert (mine / "plots" / "figure.txt").read_text() == "mine" and (mine / "neurons.csv").read_text() == "mine"
    assert sorted(p.name for p in mine.iterdir()) == ["neurons.csv", "plots"]
    other = tmp_path / "other"
    (other / "index").mkdir(parents=True)
    (other / "index" / "notes.txt").write_text("mine")
    OutDir(other).run_json.write_text("{}")  # (a run's directory whose index folder is not an index)
    assert "not a neuroidx_fast index" in _error(capsys, *_index_args(folder, other, "--force"))
    assert (other / "index" / "notes.txt").read_text() == "mine"
    # a run directory inside the image folder would be read as a class of it
    assert "lies inside --data" in _error(capsys, *_index_args(folder, folder / "run"))
    assert not (folder / "run").exists()


def test_an_interrupted_index_refuses_to_resume_on_changed_files(folder, tmp_path, capsys):
    import shutil

    data, out = tmp_path / "data", tmp_path / "resumed"
    shutil.copytree(folder, data)
    assert _cli(*_index_args(data, out, "--checkpoint-every", 1)) == 0
    shutil.rmtree(OutDir(out).index)  # as if interrupted: a checkpoint, no index
    OutDir(out).checkpoint.mkdir()
    victim = data / "dog" / "1.png"
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(victim)  # same count, another image
    err = _error(capsys, *_index_args(data, out))
    assert f"the files of {data} changed since this run's index began" in err and "--force" in err
    assert _cli(*_index_args(data, out, "--force")) == 0


def test_another_runs_index_copied_in_is_refused(folder, tmp_path, capsys):
    import shutil

    first, second = tmp_path / "first", tmp_path / "second"
    assert _cli(*_index_args(folder, first)) == 0
    assert _cli(*_index_args(folder, second, "--k", 3)) == 0
    shutil.rmtree(OutDir(second).index)
    shutil.copytree(OutDir(first).index, OutDir(second).index)
    err = _error(capsys, "features", "--out", second, "--no-progress")
    assert f"{OutDir(second).index} is not this run's index (made by run " in err and "k=4, not 3" in err
    assert _cli("features", "--out", first, "--no-progress") == 0


def test_index_out_alone_resumes_the_recorded_run_from_anywhere(folder, tmp_path, capsys, monkeypatch):
    import shutil

    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(folder, data)
    monkeypatch.chdir(tmp_path)
    assert _cli(*_index_args("data", "run", "--checkpoint-every", 1)) == 0  # relative paths
    assert json.loads(OutDir(out).run_json.read_text())["data"] == str(data)  # recorded absolute
    shutil.rmtree(OutDir(out).index)  # as if interrupted before the index was saved
    monkeypatch.chdir(folder)  # elsewhere: "data" means nothing here
    assert _cli("index", "--out", out, "--no-progress") == 0  # what the interruption message says to run
    assert NeuronIndex.load(OutDir(out).index).k == 4
    assert _cli("features", "--out", out, "--no-progress") == 0
    assert "--model and --data are required (or neither" in _error(capsys, "index", "--out", out, "--model", MODEL)
    assert "holds no run to resume" in _error(capsys, "index", "--out", tmp_path / "none")
    OutDir(out).run_json.write_text("{")
    assert "run.json is not valid JSON" in _error(capsys, "features", "--out", out)


def test_unreadable_image_is_named(tmp_path, capsys):
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (8, 8)).save(broken / "a" / f"ok{i}.png")
    (broken / "a" / "zz.jpg").write_bytes(b"not a jpeg at all")
    err = _error(capsys, *_index_args(broken, tmp_path / "out"))
    assert "cannot read image" in err and "zz.jpg" in err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "neuroidx_fast", "features", "--out", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "holds no run" in proc.stderr
    info = subprocess.run([sys.executable, "-m", "neuroidx_fast", "info"], capture_output=True, text=True, cwd=REPO)
    assert info.returncode == 0 and "backends" in info.stdout.lower()


def test_demo_reduced_setting(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _cli("demo", "--quick", "--images", 60, "--out", out, "--no-progress") == 0
    run = OutDir(out)
    assert run.report_index.exists() and run.grid_png("conv5").exists()
    assert run.ablation_csv("conv4").exists() and run.maximized_png("conv5", 0).exists()
    table = pd.read_csv(run.table_csv)
    assert set(table["layer"]) == {"conv1", "conv2", "conv3", "conv4", "conv5"}
    assert "demo finished" in capsys.readouterr().out


def test_index_arguments_and_resumes_from_a_review(folder, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    run = OutDir(out)
    assert _cli(*_index_args(folder, out, "--checkpoint-every", 1)) == 0
    # --force with a k larger than the dataset: refused before the finished run is deleted
    assert "larger than the dataset (15 images)" in _error(capsys, *_index_args(folder, out, "--force", "--k", 99))
    assert NeuronIndex.load(run.index).k == 4
    # index options without --model and --data would be ignored (the recorded run is resumed): refused
    err = _error(capsys, "index", "--out", out, "--force", "--k", 7, "--layers", "features.8")
    assert "--layers --k given without --model and --data" in err
    # interrupted right after the index was saved: the rerun finishes what the step left undone
    record = json.loads(run.run_json.read_text())
    run.run_json.write_text(json.dumps({k: v for k, v in record.items() if k != "labels"}))
    run.checkpoint.mkdir()
    assert _cli("index", "--out", out, "--no-progress") == 0
    assert json.loads(run.run_json.read_text())["labels"] == record["labels"] and not run.checkpoint.exists()
    # a resume with another batch size is refused before run.json is rewritten
    shutil.copytree(run.index, tmp_path / "kept-index")
    shutil.rmtree(run.index)
    run.checkpoint.mkdir()  # as if interrupted: a checkpoint, no index
    assert "began in batches of 4" in _error(capsys, "index", "--out", out, "--batch-size", 3)
    assert json.loads(run.run_json.read_text())["batch_size"] == 4
    shutil.rmtree(run.checkpoint)
    shutil.copytree(tmp_path / "kept-index", run.index)
    # --force checks both bundles before deleting either: a stray file in the checkpoint folder keeps the index
    (run.checkpoint / "notes.txt").parent.mkdir(exist_ok=True)
    (run.checkpoint / "notes.txt").write_text("mine")
    assert "not a neuroidx_fast index" in _error(capsys, *_index_args(folder, out, "--force"))
    assert (run.index / "manifest.json").exists() and (run.checkpoint / "notes.txt").exists()
    shutil.rmtree(run.checkpoint)
    # the demo does not replace another model's run, nor a run of the demo model on the user's images
    assert "not the demo's" in _error(capsys, "demo", "--out", out, "--quick", "--no-progress")
    settings = json.loads(run.run_json.read_text())
    run.run_json.write_text(json.dumps(dict(settings, model="demo")))
    assert f"of model 'demo' on '{folder}', not the demo's" in _error(capsys, "demo", "--out", out, "--quick",
                                                                      "--no-progress")
    assert (run.index / "manifest.json").exists()


def test_a_model_without_weights_is_rebuilt_the_same_by_later_steps(folder, tmp_path):
    # vgg_m (or a torchvision name) without --weights: its random initial weights must be the index's
    out = tmp_path / "vggm"
    args = ["index", "--model", "vgg_m", "--model-args", '{"num_classes": 3, "width": 0.05, "fc_width": 8, '
            '"input_size": 48}', "--data", folder, "--size", 48, "--normalize", "none", "--layers", "conv2",
            "--k", 3, "--out", out, "--no-progress"]
    assert _cli(*args) == 0
    assert _cli("features", "--out", out, "--no-progress") == 0


def test_selectivity_and_ablation_tables_from_a_review(folder, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    os.rename(data / "cat", data / "unit")  # a class named like the per-class table's first column
    shutil.copytree(data / "dog", data / "fox")  # 4 classes, as the test model's 4 outputs: named columns
    out = tmp_path / "run"
    run = OutDir(out)
    assert _cli(*_index_args(data, out)) == 0
    assert "--tau must be in (0, 1]" in _error(capsys, "selectivity", "--out", out, "--tau", 0)
    with pytest.raises(SystemExit):
        _cli("ablate", "--out", out, "--units", "1,1")
    assert "given more than once" in capsys.readouterr().err
    assert _cli("ablate", "--out", out, "--layers", "features.8", "--units", "0,1", "--no-progress") == 0
    assert _cli("selectivity", "--out", out, "--no-progress") == 0
    assert _cli("selectivity", "--out", out, "--layers", "features.4", "--no-progress") == 0
    table = pd.read_csv(run.table_csv)
    assert sorted(set(table["layer"])) == ["features.4", "features.8"] and len(table) == 12 + 16  # both kept
    # another tau for one layer: the other layer's rows (of the old tau) are not mixed in
    capsys.readouterr()
    assert _cli("selectivity", "--out", out, "--layers", "features.4", "--tau", 0.5, "--no-progress") == 0
    assert "rows of features.8 dropped" in capsys.readouterr().out
    assert set(pd.read_csv(run.table_csv)["layer"]) == {"features.4"}
    assert _cli("selectivity", "--out", out, "--no-progress") == 0
    assert table.loc[table["layer"] == "features.8", "max_class_drop"].notna().sum() == 2
    header = run.ablation_classes_csv("features.8").read_text().splitlines()[0].split(",")
    assert header[0] == "unit" and "unit" in header[1:]  # the unit first, then every class, "unit" too
    assert _cli("report", out) == 0
    pages = "".join(p.read_text() for p in run.report_dir.rglob("*.html"))
    unit_page = (run.report_dir / "units" / "features.8" / "0.html").read_text()
    assert "could not be read" not in pages and 'class="drops"' in unit_page
    # an ablation remade and interrupted (no record): its files are not read as complete
    run.step_record("ablation", "features.8").unlink()
    assert _cli("selectivity", "--out", out, "--no-progress") == 0
    assert "max_class_drop" not in pd.read_csv(run.table_csv).columns


def test_a_forced_remake_interrupted_and_run_again_remakes_every_layer(folder, tmp_path, capsys, monkeypatch):
    import neuroidx_fast.features as features_module

    out = tmp_path / "run"
    assert _cli(*_index_args(folder, out)) == 0
    assert _cli("features", "--out", out, "--no-progress") == 0
    real, calls = features_module.neuron_features, []

    def interrupted(index, layer, *args, **kwargs):
        calls.append(layer)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(index, layer, *args, **kwargs)

    monkeypatch.setattr(features_module, "neuron_features", interrupted)
    assert _cli("features", "--out", out, "--keep", 2, "--force", "--no-progress") == 130
    monkeypatch.setattr(features_module, "neuron_features", real)
    capsys.readouterr()
    assert _cli("features", "--out", out, "--keep", 2, "--no-progress") == 0
    printed = capsys.readouterr().out
    # the first layer was remade under --force: skipped; the second was not: made now, not kept from before
    assert "features.4: features already made" in printed and "features.8: features already made" not in printed


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_damaged_index_is_remade_by_the_command_its_messages_name(folder, tmp_path, capsys):
    # before, `index --out DIR` took an index with a manifest for finished ("already complete") and every
    # message pointed to it: a corrupt index could not be repaired without --force (which loses the outputs)
    from neuroidx_fast.report import build_report

    out = tmp_path / "run"
    run = OutDir(out)
    assert _cli(*_index_args(folder, out)) == 0
    assert _cli("features", "--out", out, "--layers", "features.8", "--no-progress") == 0
    good = NeuronIndex.load(run.index)["features.8"].ids.clone()  # (not a view of the file damaged below)
    for damage in (lambda: _flip_byte(run.index / "tensors.safetensors"),
                   lambda: os.truncate(run.index / "manifest.json", 100)):
        damage()
        err = _error(capsys, "features", "--out", out, "--no-progress")
        assert f"{run.index} is damaged (" in err and f"run `neuroidx index --out {out}` to remake it" in err
        build_report(out)
        assert f"run `neuroidx index --out {out}` to remake it" in (run.report_dir / "index.html").read_text()
        assert _cli("index", "--out", out, "--no-progress") == 0
        printed = capsys.readouterr().out
        assert f"{run.index} is damaged (" in printed and "removed, indexing again from the start" in printed
        assert "already complete" not in printed
        remade = NeuronIndex.load(run.index)  # the same inputs: the same index
        assert torch.equal(remade["features.8"].ids, good)
        assert _cli("index", "--out", out, "--no-progress") == 0
        assert "already complete" in capsys.readouterr().out
        # the outputs made from it stay (the same images and weights, checked), and the steps run again
        assert run.grid_png("features.8").exists()
        assert _cli("features", "--out", out, "--no-progress") == 0
        assert "features.8: features already made" in capsys.readouterr().out
    # a damaged index folder that holds other files too is not this package's to delete
    _flip_byte(run.index / "tensors.safetensors")
    (run.index / "notes.txt").write_text("mine")
    err = _error(capsys, "index", "--out", out, "--no-progress")
    assert "is damaged" in err and "move it away" in err and (run.index / "notes.txt").read_text() == "mine"


def test_outputs_damaged_after_their_step_are_made_again_not_skipped(folder, tmp_path, capsys):
    # before, a layer whose record listed existing files was skipped: a cut-short ablation CSV was merged
    # into neurons.csv as NaN drops, a cut-short features file or PNG stayed (the report could not read it)
    out = tmp_path / "run"
    run = OutDir(out)
    assert _cli(*_index_args(folder, out)) == 0
    assert _cli("features", "--out", out, "--keep", 2, "--no-progress") == 0
    assert _cli("selectivity", "--out", out, "--no-progress") == 0
    assert _cli("ablate", "--out", out, "--no-progress") == 0
    table = pd.read_csv(run.table_csv)
    saved = run.ablation_csv("features.8").read_bytes()
    os.truncate(run.ablation_csv("features.8"), len(saved) // 3)
    capsys.readouterr()
    assert _cli("ablate", "--out", out, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "features.4: ablation already made with these settings, skipped" in printed
    assert (f"features.8: ablation outputs changed since they were made (ablation/features.8.csv is "
            f"{len(saved) // 3} bytes, not {len(saved)}): made again") in printed
    assert run.ablation_csv("features.8").read_bytes() == saved
    pd.testing.assert_frame_equal(pd.read_csv(run.table_csv), table)
    assert table["overall_drop"].notna().all()
    made = json.loads(run.step_record("ablation", "features.8").read_text())
    assert made["checks"]["ablation/features.8.csv"]["size"] == len(saved)
    # the same bytes edited in place (same size): the checksum tells
    _flip_byte(run.ablation_csv("features.8"))
    assert _cli("ablate", "--out", out, "--layers", "features.8", "--no-progress") == 0
    assert "does not match its checksum): made again" in capsys.readouterr().out
    assert run.ablation_csv("features.8").read_bytes() == saved

    features = run.features_file("features.8").read_bytes()
    os.truncate(run.features_file("features.8"), 1000)
    nf = run.nf_png("features.4", 3).read_bytes()
    os.truncate(run.nf_png("features.4", 3), 40)
    os.truncate(run.crop_png("features.4", 5, 1), 40)
    assert _cli("features", "--out", out, "--keep", 2, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "features.4: features outputs changed since they were made" in printed
    assert "features.8: features outputs changed since they were made (features/features.8/features.safetensors is" \
        in printed and "skipped" not in printed
    assert run.features_file("features.8").read_bytes() == features and run.nf_png("features.4", 3).read_bytes() == nf
    assert _cli("features", "--out", out, "--keep", 2, "--no-progress") == 0
    assert capsys.readouterr().out.count("already made with these settings, skipped") == 2

    # a record of an earlier version (file names, no sizes nor checksums): nothing vouches for the files,
    # so the layer is made again, said so; its ablation CSV is read for the table only if it holds one row
    # per unit of the layer (a file cut at a line end, here)
    record = run.step_record("ablation", "features.8")
    old = json.loads(record.read_text())
    record.write_text(json.dumps({"settings": old["settings"], "files": old["files"]}))
    lines = saved.decode().splitlines(keepends=True)
    run.ablation_csv("features.8").write_text("".join(lines[:-3]))
    err = _error(capsys, "selectivity", "--out", out, "--no-progress")
    assert (f"{run.ablation_csv('features.8')} does not hold one row per ablated unit of features.8 (13 rows for 16 "
            f"units): the file is damaged; run `neuroidx ablate --out {out} --layers features.8` to remake it") in err
    pd.testing.assert_frame_equal(pd.read_csv(run.table_csv), table)
    assert _cli("ablate", "--out", out, "--layers", "features.8", "--no-progress") == 0
    assert "were recorded without checksums (by an earlier version): made again" in capsys.readouterr().out
    assert run.ablation_csv("features.8").read_bytes() == saved and "checks" in json.loads(record.read_text())
    # a finished file changed under a finished record: not merged into the table either
    run.ablation_csv("features.8").write_bytes(saved[:-1])
    assert "changed since it was made (cut short or edited)" in _error(capsys, "selectivity", "--out", out,
                                                                        "--no-progress")


def test_a_damaged_neuron_table_is_never_merged_and_saved_again(folder, tmp_path, capsys):
    # before, `selectivity --layers X` and ablate's refresh of the table kept the rows of a cut-short
    # neurons.csv (a layer with half its units, a cut "-0." read as -0.0) and saved them as whole
    out = tmp_path / "run"
    run = OutDir(out)
    assert _cli(*_index_args(folder, out)) == 0
    assert _cli("selectivity", "--out", out, "--no-progress") == 0
    assert _cli("ablate", "--out", out, "--layers", "features.8", "--units", "0,1", "--no-progress") == 0
    whole = run.table_csv.read_bytes()
    lines = whole.decode().splitlines(keepends=True)
    again = f"run `neuroidx selectivity --out {out}` (all layers) to remake it"
    for cut, why in ((len("".join(lines[:8])) + 5, "cut short: its last row is incomplete"),
                     (len("".join(lines[:8])), "features.4 has 7 rows, not one per unit 0 .. 11")):
        run.table_csv.write_bytes(whole[:cut])
        for argv in (("selectivity", "--out", out, "--layers", "features.8", "--no-progress"),
                     ("ablate", "--out", out, "--layers", "features.8", "--units", "0,1", "--no-progress")):
            assert _cli(*argv) == 2  # (ablate warns first: 3 class folders, a 4-output test model)
            err = capsys.readouterr().err.splitlines()
            assert err[-1] == f"neuroidx: error: {run.table_csv} is damaged ({why}): {again}"
            assert run.table_csv.read_bytes() == whole[:cut]  # not saved again as if whole
    # the command named remakes it (every layer: the damaged file is not read)
    assert _cli("selectivity", "--out", out, "--no-progress") == 0
    assert run.table_csv.read_bytes() == whole
    # rows of a layer the run did not index
    run.table_csv.write_bytes(whole + whole.decode().splitlines(keepends=True)[-1].replace("features.8", "x").encode())
    assert _cli("ablate", "--out", out, "--units", "0,1", "--layers", "features.8", "--no-progress") == 2
    assert "rows of layer 'x', which this run did not index" in capsys.readouterr().err


def test_an_error_in_a_dataloader_worker_is_shown_as_the_workers_own(tmp_path, capsys):
    # before: "neuroidx: error: Caught ValueError in DataLoader worker process 0." (torch's first line),
    # naming no file; with --workers 0 the same image gave "cannot read image '<path>': ..."
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(broken / "a" / f"ok{i}.png")
    whole = (broken / "a" / "ok3.png").read_bytes()
    (broken / "a" / "ok3.png").write_bytes(whole[:len(whole) // 2])  # cut short: "image file is truncated"
    shown = [_error(capsys, *_index_args(broken, tmp_path / f"out{workers}", "--workers", workers))
             for workers in (0, 1)]
    assert shown[1] == shown[0] and f"cannot read image '{broken / 'a' / 'ok3.png'}'" in shown[1]
    # torch's re-raised message: the last exception of the worker's traceback, a chained one's too
    from neuroidx_fast.cli import _worker_error

    text = ("Caught KeyError in DataLoader worker process 2.\nOriginal Traceback (most recent call last):\n"
            '  File "w.py", line 1, in f\n    x = d["a: b"]\n        ~^^^\nValueError: inner: cause\n\n'
            "During handling of the above exception, another exception occurred:\n\n"
            "Traceback (most recent call last):\n"
            '  File "w.py", line 3, in f\n    raise KeyError("no such key")\nKeyError: \'no such key\'\n')
    assert _worker_error(text) == "no such key"
    assert _worker_error(text.replace("KeyError: 'no such key'", "mod.Custom")) == "mod.Custom"
    assert _worker_error("a message: with a colon\nOriginal text") is None
