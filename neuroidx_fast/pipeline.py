"""The steps behind the ``neuroidx`` subcommands, each reading and writing one run directory
(``neuroidx_fast.outdir``). ``run.json`` remembers how to rebuild the model and the dataset, so later
steps need only ``--out``."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ._version import __version__
from .outdir import OutDir, read_json, write_json
from .storage import BundleError, is_bundle, remove_bundle

__all__ = ["Run", "open_run", "step_index", "step_features", "step_selectivity", "step_ablate", "step_visualize",
           "step_report", "run_demo"]

ABLATION_COLUMNS = ("overall_drop", "max_class_drop", "max_drop_class", "max_drop_class_name")
BUILTIN_SHAPES = "builtin:shapes"


@dataclass
class Run:
    out: OutDir
    settings: dict
    model: torch.nn.Module
    dataset: object
    preprocess: object
    device: torch.device


def _device(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1 ...)") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {name!r}: use cpu or cuda (cuda:1 ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but torch sees no CUDA device here")
    return device


def _dataset(settings: dict):
    from torch.utils.data import Subset

    data = settings["data"]
    if data == BUILTIN_SHAPES:
        from .data import Shapes

        dataset = Shapes(settings.get("images") or 600, size=settings["size"], seed=settings.get("data_seed", 1))
    else:
        from .imagefolder import ImageFolder

        dataset = ImageFolder(data, size=settings["size"], resize=settings.get("resize"),
                              crop=not settings.get("no_crop", False), uint8=True)  # 8-bit: a quarter of the bytes
    limit = settings.get("images")
    if limit is not None and limit < len(dataset):
        classes = getattr(dataset, "classes", None)
        dataset = Subset(dataset, range(limit))
        dataset.classes = classes
    return dataset


def _model(settings: dict):
    from .loading import is_weights_format, load_model, load_weights

    if settings["model"] == "demo":
        from .demo_model import demo_model

        model = demo_model()
    else:
        root = settings.get("import_root")  # where `index` was run: a package.module:factory found from there
        # Seeded: a model without --weights (vgg_m, a torchvision name) gets the same initial weights every
        # time it is built, so that the later steps rebuild the model the index saw (the global RNG is kept)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = load_model(settings["model"], settings.get("model_args") or {}, import_root=root)
            except ValueError:  # (its own messages name the option)
                raise
            except Exception as exc:  # raised by the factory itself: alone, "KeyError: 'x'" names no option
                given = f" with --model-args '{json.dumps(settings['model_args'])}'" if settings.get("model_args") \
                    else ""
                raise ValueError(f"--model {settings['model']!r}{given} failed: {type(exc).__name__}: "
                                 f"{_first_line(exc)}; check --model and --model-args") from None
    if settings.get("weights"):
        try:
            load_weights(model, settings["weights"])
        except ValueError:
            if is_weights_format(settings["weights"]):
                raise
            # (torch's unpickler fails on other files with errors such as "KeyError: 105")
            raise ValueError(f"--weights {settings['weights']!r} is neither a safetensors file nor a torch file (a "
                             "state dict saved with torch.save): give the model's weights in one of those") from None
    return model.eval()


def open_run(out_dir, device=None, need_index: bool = True) -> tuple[Run, object]:
    """The run's model, dataset and preprocessing rebuilt from run.json, and its index."""
    from .loading import parse_normalize
    from .neuron_index import NeuronIndex

    out = OutDir(out_dir)
    settings = out.run_settings()
    device = _device(device)
    preprocess = parse_normalize(settings.get("normalize"))
    run = Run(out, settings, _model(settings).to(device), _dataset(settings),
              preprocess.to(device) if preprocess is not None else None, device)
    index = None
    if need_index:
        if not (out.index / "manifest.json").exists():
            raise FileNotFoundError(f"{out.root} holds no finished index: run `neuroidx index --out {out.root}` "
                                    "(it resumes if it was interrupted)")
        _check_same_inputs(out, settings, run)
        try:
            index = NeuronIndex.load(out.index)
        except BundleError as exc:  # (corrupt or truncated: `index` removes it and makes it again)
            raise BundleError(f"{out.index} is damaged ({_first_line(exc)}): run `neuroidx index --out {out.root}` "
                              "to remake it") from None
        _check_index_of_run(out, settings, index)
        index.dataset = run.dataset
    return run, index


def _first_line(exc) -> str:
    from .prepare import first_line

    return first_line(exc) or type(exc).__name__


def _check_index_of_run(out: OutDir, settings: dict, index) -> None:
    """The index in DIR/index is the one this run.json made (not another run's, copied in): the run it
    records (run.json's run_id), its size, k and layers."""
    made_by = index.meta.get("run_id")
    differ = []
    if made_by != settings.get("run_id"):
        differ.append(f"made by run {made_by}, not this run {settings.get('run_id')}")
    if settings.get("num_images") is not None and index.dataset_length != settings["num_images"]:
        differ.append(f"{index.dataset_length} images indexed, not {settings['num_images']}")
    if settings.get("k") is not None and index.k != settings["k"]:
        differ.append(f"k={index.k}, not {settings['k']}")
    if settings.get("layers") and [str(n) for n in index.layers] != [str(n) for n in settings["layers"]]:
        differ.append(f"layers {list(index.layers)}, not {list(settings['layers'])}")
    if differ:
        raise ValueError(f"{out.index} is not this run's index ({'; '.join(differ)}): put back its own, or index "
                         "again (--force)")


def _check_same_inputs(out: OutDir, settings: dict, run: Run) -> None:
    """Image ids are positions in the dataset and the index holds the model's activations: a later step
    on another file list or other weights would pair them with the wrong images or units, silently."""
    from .indexing import dataset_fingerprint, model_fingerprint, structure_fingerprint

    recorded = settings.get("num_images")
    if recorded is not None and recorded != len(run.dataset):
        raise ValueError(f"{settings['data']} now holds {len(run.dataset)} images, but {recorded} were indexed: the "
                         "ids no longer name the same images. Restore the folder, or index again (--force)")
    data = settings.get("data_fingerprint")
    if data is not None and data != dataset_fingerprint(run.dataset):
        raise ValueError(f"the files of {settings['data']} changed since the index was made (added, removed, "
                         "replaced or edited): the ids no longer name the same images. Restore them (with their "
                         "modification times: cp -p), or index again (--force)")
    weights = settings.get("model_fingerprint")
    if weights is not None and weights != model_fingerprint(run.model):
        source = settings.get("weights") or "the model's definition"
        raise ValueError(f"the model's weights differ from the indexed ones ({source} changed): restore them, or "
                         "index again (--force)")
    structure = settings.get("model_structure")
    if structure is not None and structure != structure_fingerprint(run.model, run.preprocess):
        raise ValueError(f"the model's modules differ from the indexed ones ({settings['model']}'s definition "
                         "changed: a layer type or setting): restore it, or index again (--force)")


def _layers(args, index) -> list[str]:
    layers = args.layers or list(index.layers)
    unknown = [name for name in layers if name not in index.layers]
    if unknown:
        raise ValueError(f"layer(s) {unknown} were not indexed in this run; indexed: {list(index.layers)}")
    return layers


def _check_units(units, index, layers) -> None:
    """--units lie in every selected layer (checked before the first layer's long part)."""
    for layer in layers if units else ():
        count = index[layer].num_units
        outside = [u for u in units if not 0 <= u < count]
        if outside:
            raise ValueError(f"--units {outside[:5]} out of range for layer {layer!r}, which has {count} units "
                             f"(0 .. {count - 1})")


def _forget_made(out: OutDir, step: str, layers, args) -> None:
    """--force: every selected layer's record goes before the first is made again, so that a forced remake
    interrupted half way and run again without --force does not skip the layers not yet remade."""
    if getattr(args, "force", False):
        for layer in layers:
            out.step_record(step, layer).unlink(missing_ok=True)


def _already_made(out: OutDir, step: str, layer: str, settings: dict, args) -> bool:
    """Whether ``layer``'s outputs of ``step`` are complete and were made with ``settings``: a rerun (after
    an interruption, or with more layers) then skips the layer, saying so; --force makes them again. The
    record lists the files made with their sizes and SHA-256 (``_record_made``): one deleted, cut short
    or changed since makes the layer again, said so; so does a record of an earlier version, which lists
    the files without their checksums (nothing vouches for their content)."""
    made = _read_record(out, step, layer)
    if getattr(args, "force", False) or made is None or made.get("settings") != settings:
        return False
    changed = _changed_output(out, made)
    if changed is not None:
        print(f"{layer}: {step} outputs {changed}: made again")
        return False
    print(f"{layer}: {step} already made with these settings, skipped (--force makes it again)")
    return True


def _file_check(path: Path) -> dict:
    """A file's size, SHA-256 and modification time (ns), as a step's record keeps them (``_record_made``)."""
    import hashlib

    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": stat.st_size, "sha256": digest.hexdigest(), "mtime_ns": stat.st_mtime_ns}


def _changed_output(out: OutDir, made: dict) -> str | None:
    """None where every file of a step's record ``made`` is as it was saved (its size and SHA-256), else
    what differs, e.g. "changed since they were made (ablation/conv5.csv is 812 bytes, not 9046)"."""
    files, checks = made.get("files"), made.get("checks")
    if not isinstance(files, list) or not files or not all(isinstance(name, str) for name in files):
        return "are not listed in their record"
    if not isinstance(checks, dict):
        return "were recorded without checksums (by an earlier version)"
    for name, kind, differs in _output_problems(out.root, files, checks):  # (the first one is enough)
        if kind == "unchecked":
            return f"were recorded without the checksum of {name}"
        return f"changed since they were made ({name} {differs})"
    return None


def _output_problems(root: Path, files, checks: dict):
    """Yield (name, kind, how) for each file of a step's record (``files``, relative to ``root``) that is not
    as its ``checks`` say it was saved, lazily (a caller that needs one reads no further file): kind
    "missing" (how: "is missing"), "unchecked" (the record holds no check of it; how None) or "differs"
    (how: ``_differs_from``)."""
    for name in files:
        path, check = root / name, checks.get(name)
        if not path.is_file():
            yield name, "missing", "is missing"
        elif not isinstance(check, dict):
            yield name, "unchecked", None
        else:
            differs = _differs_from(path, check)
            if differs is not None:
                yield name, "differs", differs


def _differs_from(path: Path, check: dict) -> str | None:
    """How the file ``path`` differs from its record's ``check`` (``_file_check``): None where it does not.
    A file of the recorded size and modification time (to the nanosecond) is taken as unchanged without
    reading it: a run's features and PNGs can weigh gigabytes, hashed at each rerun and report build; an
    edit, a truncation or a replacement moves the time (records of earlier versions, without one: hashed)."""
    stat = path.stat()
    if stat.st_size != check.get("size"):
        return f"is {stat.st_size} bytes, not {check.get('size')}"
    if check.get("mtime_ns") is not None and check.get("mtime_ns") == stat.st_mtime_ns:
        return None
    if _file_check(path)["sha256"] != check.get("sha256"):
        return "does not match its checksum"
    return None


def _ends_with_newline(path: Path) -> bool:
    """Whether a CSV ends as every one written whole does (a file cut short ends inside a row)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _replacing(out: OutDir, step: str, layer: str) -> None:
    """``layer``'s outputs of ``step`` are about to be written: until they all are, no record may vouch
    for them. (Not sooner: a remake that fails before it writes, e.g. on a bad option, keeps the layer's
    finished outputs and their record.)"""
    out.step_record(step, layer).unlink(missing_ok=True)


def _read_record(out: OutDir, step: str, layer: str) -> dict | None:
    """``layer``'s record of ``step`` (``_record_made``), or None: none yet, or unreadable."""
    try:
        made = read_json(out.step_record(step, layer))
    except (OSError, ValueError):
        return None
    return made if isinstance(made, dict) else None


def _record_settings(out: OutDir, step: str, layer: str):
    """The settings ``layer``'s ``step`` was last made with (its record), or None."""
    return (_read_record(out, step, layer) or {}).get("settings")


def _record_made(out: OutDir, step: str, layer: str, settings: dict, outputs, checks: bool = True) -> None:
    """Once every output of ``layer``'s ``step`` is saved: the settings it was made with and its files
    (those in ``outputs``, files or folders), each with its size and SHA-256 (``checks``), for
    ``_already_made``. Without ``checks`` for a file other steps rewrite (neurons.csv, of every layer):
    its record names it, but vouches for no content."""
    files = []
    for path in outputs:
        path = Path(path)
        # (not the temporary file of a write that a killed command left: no output, and deleted by hand, it
        # would make the layer again)
        found = (sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))
                 if path.is_dir() else [path])
        files += [p.relative_to(out.root).as_posix() for p in found]
    record = {"settings": settings, "files": files}
    if checks:
        record["checks"] = {name: _file_check(out.root / name) for name in files}
    write_json(out.step_record(step, layer), record)


# ----------------------------------------------------------------------------------------------- index
def _recorded_settings(out: OutDir, args) -> dict:
    """`neuroidx index --out DIR` alone: the settings DIR's run.json records (to resume that run)."""
    if not out.run_json.exists():
        raise ValueError(f"--model and --data are required: {out.root} holds no run to resume")
    given = [f"--{key.replace('_', '-')}" for key in ("model_args", "weights", "size", "resize", "no_crop",
                                                       "normalize", "layers", "k", "images")
             if getattr(args, key, None) not in (None, False)]
    if given:  # they would be ignored: the run's own settings are resumed
        raise ValueError(f"{' '.join(given)} given without --model and --data: `index --out DIR` alone resumes the "
                         "run's recorded settings; to index with others, give --model and --data too (and --force "
                         "to replace the run)")
    old = out.run_settings()
    return {key: old.get(key) for key in _RECIPE + ("import_root",)}


def _settings_from(args) -> dict:
    if args.model is None or args.data is None:
        raise ValueError("--model and --data are required (or neither: `neuroidx index --out DIR` resumes DIR's run)")
    try:
        model_args = json.loads(args.model_args) if isinstance(args.model_args, str) else (args.model_args or {})
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model-args is not JSON: {exc}") from None
    if not isinstance(model_args, dict):
        raise ValueError(f"--model-args must be a JSON object of keyword arguments ('{{\"num_classes\": 10}}'), got "
                         f"{args.model_args}")
    if not args.layers:
        raise ValueError("--layers is required for `index`: comma-separated module names of the model")
    return {"model": args.model, "model_args": model_args, "weights": _absolute(args.weights),
            "data": _absolute(args.data),
            "size": args.size or 224, "resize": args.resize, "no_crop": bool(args.no_crop),
            "normalize": args.normalize or "imagenet", "layers": list(args.layers), "k": args.k or 100,
            "images": args.images, "data_seed": getattr(args, "data_seed", 1), "import_root": os.getcwd()}


def _absolute(path):
    """A file or folder argument as an absolute path, so that later steps run from anywhere read the same
    files (builtin: data and None pass as they are)."""
    if path is None or str(path).startswith("builtin:"):
        return path
    return os.path.abspath(os.path.expanduser(str(path)))


def _comparable(key: str, value):
    """A recorded setting as it compares with a new one (runs before paths were absolute: relative)."""
    return _absolute(value) if key in ("data", "weights") else value


_RECIPE = ("model", "model_args", "weights", "data", "size", "resize", "no_crop", "normalize", "layers", "k",
           "images", "data_seed")


def _checkpoint_batch_size(out: OutDir):
    """The batch size DIR's checkpoint was made with (run.json records it only since 2026-11-22)."""
    try:
        return read_json(out.checkpoint / "manifest.json")["fingerprint"]["batch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_out_outside_data(out: OutDir, data) -> None:
    """A run directory inside the image folder it indexes would be read as a class of it (its PNGs)."""
    if data is None or str(data).startswith("builtin:"):
        return
    root, folder = os.path.realpath(out.root), os.path.realpath(str(data))
    if os.path.commonpath([root, folder]) == folder:
        raise ValueError(f"--out {out.root} lies inside --data {data}: the run's images would be read as images of "
                         "the dataset; put the run directory elsewhere")


def _finish_index_record(out: OutDir, record: dict, index=None) -> None:
    """What a finished index step does after saving ``index`` (labels into run.json, the checkpoint gone,
    with what killed checkpoint writes left beside it); also where an interruption right after the save
    left it undone (``index`` None: read from DIR/index)."""
    from .neuron_index import NeuronIndex

    if record.get("labels") is None:
        labels = (index if index is not None else NeuronIndex.load(out.index)).labels
        if labels is not None:
            write_json(out.run_json, dict(record, labels=labels.tolist()))
    remove_bundle(out.checkpoint)


def _saved_index(out: OutDir):
    """DIR/index, read back whole (its checksums verified), or None where it is damaged (corrupt or
    truncated files): then it is removed, said so, and the caller indexes again, from the checkpoint if
    one is left, else from the start, with the run's recorded settings and inputs (checked against the
    fingerprints in run.json), so what was made from the old index still holds. Only a folder shaped as
    an index (``is_bundle``) is removed: one holding other files is the user's to move."""
    from .neuron_index import NeuronIndex

    try:
        return NeuronIndex.load(out.index)
    except BundleError as exc:
        reason = _first_line(exc)
        if not is_bundle(out.index):
            raise BundleError(f"{out.index} is damaged ({reason}) and holds files that are not an index's: move it "
                              f"away, then run `neuroidx index --out {out.root}` again") from None
        remove_bundle(out.index)
        start = "its checkpoint" if out.checkpoint.exists() else "the start"
        print(f"{out.index} is damaged ({reason}): removed, indexing again from {start}")
        return None


@contextlib.contextmanager
def _nan_said_for_the_cli():
    """index_dataset's NaN error, whose advice (nan='ignore') is the Python API's, with the command line's."""
    try:
        yield
    except ValueError as exc:
        text = str(exc)
        if not text.startswith("NaN activation in ") or "nan='ignore'" not in text:
            raise
        where = text.split(". Check the model", 1)[0]
        raise ValueError(f"{where}: the command line indexes finite activations only; check --model and --weights "
                         "(or index with the Python API's index_dataset(..., nan='ignore'), which ranks NaN as "
                         "-inf)") from None


def _index_first_batch(model, dataset, settings: dict, preprocess, batch_size: int, device) -> None:
    """Index the first batch of ``dataset`` as the run will (its errors are the run's own)."""
    import warnings

    from torch.utils.data import Subset

    from .indexing import index_dataset

    first = Subset(dataset, range(min(batch_size, len(dataset))))
    preprocess = copy.deepcopy(preprocess).to(device) if preprocess is not None else None  # (the run's stays)
    with warnings.catch_warnings(), _nan_said_for_the_cli():
        warnings.simplefilter("ignore")  # (the run itself says them)
        index_dataset(model, first, settings["layers"], k=min(settings["k"], len(first)), preprocess=preprocess,
                      batch_size=batch_size, device=device, progress=False)


def step_index(args) -> object:
    """Index the run's layers (resuming from DIR/index.checkpoint) and save DIR/index."""
    from .hooks import resolve_layers
    from .indexing import _holds_other_than_checkpoint, index_dataset
    from .loading import parse_normalize

    out = OutDir(args.out)
    if out.root.exists() and not out.root.is_dir():
        raise ValueError(f"--out {out.root} is a file: give a directory (new, or a run's)")
    if out.root.is_dir() and not out.run_json.exists() and any(p != out.lock_file for p in out.root.iterdir()):
        # a run replaces its index/, features/, plots/, report/ ... (a user's files among them would go)
        raise ValueError(f"--out {out.root} holds files but no run (no run.json): give a new or empty directory")
    settings = _recorded_settings(out, args) if args.model is None and args.data is None else _settings_from(args)
    _check_out_outside_data(out, settings.get("data"))
    # The run DIR holds, unless it never wrote anything (then simply replaced) or --force replaces it. Its
    # index may be gone (deleted, or a damaged one's remake interrupted before its first checkpoint) while
    # what was made from it is not: other settings would delete that too, so they need --force as well.
    started = (out.checkpoint.exists() or os.path.lexists(out.index)
               or any(os.path.lexists(path) for path in out.derived()))
    old = out.run_settings() if out.run_json.exists() and started and not args.force else None
    if old is not None:
        differ = [key for key in _RECIPE if _comparable(key, old.get(key)) != _comparable(key, settings.get(key))]
        if differ:
            raise ValueError(f"{out.root} holds a run made with other settings ({', '.join(differ)}): use another "
                             "--out, or --force to replace it")
        # None: missing, or damaged and removed: made again below from the same settings and inputs (checked
        # against run.json's fingerprints), so what was made from the old index stays
        saved = _saved_index(out) if os.path.lexists(out.index) else None
        if saved is not None:
            _finish_index_record(out, old, saved)
            print(f"{out.root}: the index is already complete (use --force to index again)")
            return None
    model = _model(settings)
    resolve_layers(model, settings["layers"])
    dataset = _dataset(settings)
    preprocess = parse_normalize(settings["normalize"])
    device = _device(args.device)
    if settings["k"] > len(dataset):
        raise ValueError(f"--k {settings['k']} is larger than the dataset ({len(dataset)} images); choose k <= "
                         f"{len(dataset)}")
    batch_size = args.batch_size
    # a resume (or `index --out DIR` alone) goes on with the batches the run began with (a forced run given its
    # settings does not read the run.json it replaces: it may be damaged)
    recorded = ((out.run_settings().get("batch_size") or _checkpoint_batch_size(out))
                if old is not None or args.model is None else None)
    if recorded:
        if not getattr(args, "batch_size_given", True):
            batch_size = recorded
        elif args.batch_size != recorded and old is not None:  # refused before run.json is rewritten
            raise ValueError(f"{out.root}'s index began in batches of {recorded}: resume with --batch-size {recorded} "
                             "(or without --batch-size), or index again from the start (--force)")
    if not args.force and os.path.lexists(out.checkpoint) and _holds_other_than_checkpoint(out.checkpoint):
        raise ValueError(f"{out.checkpoint} holds something other than this run's index checkpoint (another "
                         f"program's files, or an index put there): move it away, then run `neuroidx index --out "
                         f"{out.root}` again")
    if args.force:
        for bundle in (out.index, out.checkpoint):  # both checked before either goes
            if os.path.lexists(bundle) and not is_bundle(bundle):
                raise ValueError(f"--force would delete {bundle}, which is not a neuroidx_fast index: move it away, "
                                 "or use another --out")
        if out.run_json.exists():
            # Nothing of the old run goes before the new settings have indexed their first batch: settings that
            # fail at once (NaN activations, an unreadable image, a layer's output) leave it whole. (One that
            # fails in a later batch ends with it replaced, as --force says.)
            _index_first_batch(model, dataset, settings, preprocess, batch_size, device)
        for bundle in (out.index, out.checkpoint):
            remove_bundle(bundle)
    if out.run_json.exists() and (args.force or old is None):
        # A new index (forced, or its run's old one deleted): everything made from the old one is stale.
        for path in out.derived():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
    classes = getattr(dataset, "classes", None)
    from .indexing import dataset_fingerprint, model_fingerprint, structure_fingerprint

    record = dict(settings, class_names=list(classes) if classes else None, num_images=len(dataset),
                  data_fingerprint=dataset_fingerprint(dataset), model_fingerprint=model_fingerprint(model),
                  model_structure=structure_fingerprint(model, preprocess),
                  batch_size=batch_size, created=dt.datetime.now().isoformat(timespec="seconds"),
                  package_version=__version__, run_id=uuid.uuid4().hex)
    if old is not None:  # a resume (a finished index returned above): of the same inputs?
        for key, what in (("data_fingerprint", f"the files of {settings['data']}"),
                          ("model_fingerprint", "the model's weights"),
                          ("model_structure", "the model's modules")):
            if old.get(key) is not None and old[key] != record[key]:
                raise ValueError(f"{what} changed since this run's index began: the indexed part would mix old and "
                                 "new; restore them, or index again from the start (--force)")
    write_json(out.run_json, record)
    if preprocess is not None:
        preprocess = preprocess.to(device)
    with _nan_said_for_the_cli():
        index = index_dataset(model, dataset, settings["layers"], k=settings["k"], preprocess=preprocess,
                              batch_size=batch_size, num_workers=args.workers, device=device,
                              checkpoint=str(out.checkpoint), checkpoint_every=args.checkpoint_every,
                              progress=not args.no_progress)
    index.meta["run_id"] = record["run_id"]  # which run.json this index belongs to
    index.save(out.index)
    _finish_index_record(out, record, index)
    print(f"indexed {len(dataset)} images, {len(index)} layers -> {out.index}")
    return index


# -------------------------------------------------------------------------------------------- features
def step_features(args) -> None:
    from .artifacts import save_features
    from .features import neuron_features, resolve_pad

    run, index = open_run(args.out, args.device)
    pad = args.pad
    resolve_pad(pad, index)  # a bad --pad is an error before any layer's record goes
    layers = _layers(args, index)
    _forget_made(run.out, "features", layers, args)
    for layer in layers:
        made_with = {"pad": pad, "keep": args.keep}
        if _already_made(run.out, "features", layer, made_with, args):
            continue
        features = neuron_features(index, layer, run.dataset, pad=pad, keep_crops=args.keep,
                                   batch_size=args.batch_size, num_workers=args.workers, device=run.device,
                                   progress=not args.no_progress)
        _replacing(run.out, "features", layer)
        save_features(features, run.out)
        _record_made(run.out, "features", layer, made_with, [run.out.features_dir(layer)])
        print(f"{layer}: {features.nf.shape[0]} NFs ({int(features.dead.sum())} dead units), RF "
              f"{features.rf.size[0]}x{features.rf.size[1]} -> {run.out.features_dir(layer)}")


# ----------------------------------------------------------------------------------------- selectivity
def _ablation_frame(out: OutDir, layers, index):
    """The ablation columns of every layer of ``layers`` that has them, as one frame (rows of all layers),
    or None. A file changed since it was made (its record's checksum), or that does not hold one row
    per ablated unit of the layer (every unit of ``index[layer]``, or the record's --units), is an error
    naming the command that remakes it: its rows are never merged, cut short or not."""
    import numpy as np
    import pandas as pd

    from .table import read_ablation_csv

    frames = []
    for layer in layers:
        path = out.ablation_csv(layer)
        if not (path.exists() and out.made("ablation", layer)):  # complete (not an interrupted remake)
            continue
        again = f"run `neuroidx ablate --out {out.root} --layers {layer}` to remake it"
        made = _read_record(out, "ablation", layer) or {}
        name = path.relative_to(out.root).as_posix()
        frame = read_ablation_csv(path).assign(layer=layer)  # the file's own name for it, or none
        check = (made.get("checks") or {}).get(name) if isinstance(made.get("checks"), dict) else None
        if isinstance(check, dict) and _differs_from(path, check) is not None:
            raise ValueError(f"{path} changed since it was made (cut short or edited): {again}")
        units = (made.get("settings") or {}).get("units")
        expected = sorted(units) if isinstance(units, list) else list(range(index[layer].num_units))
        found = pd.to_numeric(frame["unit"], errors="coerce").to_numpy(dtype=np.float64)
        if not _ends_with_newline(path) or sorted(found.tolist()) != [float(u) for u in expected]:
            raise ValueError(f"{path} does not hold one row per ablated unit of {layer} ({len(frame)} rows for "
                             f"{len(expected)} units): the file is damaged; {again}")
        frame = frame.assign(unit=found.astype(np.int64))
        frames.append(frame[["layer", "unit"] + [c for c in ABLATION_COLUMNS if c in frame]])
    return pd.concat(frames, ignore_index=True) if frames else None


def _run_table(out: OutDir, index, layers=None):
    """DIR's neuron table (neurons.csv), checked before any of it is kept: a file cut short (it does not
    end with a newline, as every CSV written whole does) or a layer of ``layers`` (default: every layer it
    holds) that has not exactly one row per unit 0 .. C-1 of ``index[layer]`` is an error naming the
    command that remakes the table; never merged and saved again as if whole."""
    import numpy as np
    import pandas as pd

    from .table import load_table

    path = out.table_csv
    again = f"run `neuroidx selectivity --out {out.root}` (all layers) to remake it"
    try:
        whole = _ends_with_newline(path)
        table = load_table(path)
    except ValueError:
        raise ValueError(f"{path} is damaged (not a readable neuron table): {again}") from None
    if not whole:
        raise ValueError(f"{path} is damaged (cut short: its last row is incomplete): {again}")
    names = table["layer"].astype(str)
    for layer in dict.fromkeys(names) if layers is None else [n for n in layers if (names == n).any()]:
        if layer not in index.layers:
            raise ValueError(f"{path} is damaged (rows of layer {layer!r}, which this run did not index): {again}")
        units = pd.to_numeric(table.loc[names == layer, "unit"], errors="coerce").to_numpy(dtype=np.float64)
        count = index[layer].num_units
        if not np.array_equal(np.sort(units), np.arange(count, dtype=np.float64)):
            raise ValueError(f"{path} is damaged ({layer} has {len(units)} rows, not one per unit 0 .. {count - 1}): "
                             f"{again}")
    return table


def _other_layers_rows(out: OutDir, index, layers, made_with: dict):
    """The rows the run's neuron table holds for the indexed layers other than ``layers`` (`selectivity
    --layers X` remakes X's rows only), of those made with the same settings (``made_with``); the others
    are dropped, said so (one table, one tau and gray). None when there are none; the table is then not
    read (a damaged one is simply replaced). Read before the long part: a damaged table is an error then."""
    if not out.table_csv.exists() or set(index.layers) <= set(layers):
        return None
    others = [name for name in index.layers if name not in layers]
    old = _run_table(out, index, others)
    others = [name for name in others if name in set(old["layer"])]
    same = [name for name in others if _record_settings(out, "selectivity", name) == made_with]
    if len(same) < len(others):
        print(f"rows of {', '.join(n for n in others if n not in same)} dropped from the table: made with other "
              "settings (or before they were recorded); run selectivity for them with these")
    kept = old[old["layer"].isin(same)]
    return None if kept.empty else kept


def _with_other_layers(table, kept, order):
    """``table`` (rows of the layers just made) with the rows ``kept`` of the others
    (``_other_layers_rows``), in the index's layer ``order``."""
    import pandas as pd

    if kept is None:
        return table
    merged = pd.concat([kept, table], ignore_index=True)
    rank = merged["layer"].map({name: i for i, name in enumerate(order)})
    return merged.assign(_rank=rank).sort_values(["_rank", "unit"], kind="stable").drop(columns="_rank") \
        .reset_index(drop=True)


def _class_threshold(given, index) -> float:
    """The gamma above which the plots and the summary count a unit as class selective: ``given``, or by
    default halfway from ``gamma_floor`` (the least gamma the index's K top images of the dataset's
    classes allow) to 1, said once. A threshold under that floor counts every live unit: said too."""
    from .selectivity import gamma_floor

    labels = index.labels
    classes = int(torch.unique(labels[labels >= 0]).numel()) if labels is not None else 0
    floor = gamma_floor(index.k, classes) if classes else float("nan")
    if given is None:
        if not math.isfinite(floor):
            return 0.5
        # (1 + floor) / 2 = (2K - 1 - c) / (2K - 2), c = min(K, classes), as one rounded division: the very
        # float of a unit whose gamma is that fraction (M = (c + 1) / 2 for odd c), which then does not
        # count (gamma > threshold), whatever the rounding of a sum of roundings would have said
        k, c = index.k, min(index.k, classes)
        threshold = (2 * k - 1 - c) / (2 * k - 2)
        if floor > 0:
            print(f"class selective: gamma > {threshold:.3g}, halfway from {floor:.3g} (the least gamma of K = "
                  f"{index.k} top images of {classes} classes: every unit reaches it) to 1; --class-threshold "
                  "sets another")
        return threshold
    if math.isfinite(floor) and given < floor:
        print(f"note: --class-threshold {given:g} is below {floor:.3g}, the least gamma of K = {index.k} top images "
              f"of {classes} classes: every live unit counts as class selective; choose one above it")
    return given


def step_selectivity(args) -> None:
    from .color import color_selectivity
    from .plots import plot_all
    from .table import save_table, neuron_table

    if not args.tau > 0 or args.tau > 1:  # before the long part
        raise ValueError(f"--tau must be in (0, 1], got {args.tau}")
    for name in ("color_threshold", "class_threshold"):
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be a number, got {getattr(args, name)}")
    run, index = open_run(args.out, args.device)
    layers = _layers(args, index)
    ablation = _ablation_frame(run.out, layers, index)  # read first: a broken file is an error before the long part
    made_with = {"tau": args.tau, "gray": args.gray}
    kept = _other_layers_rows(run.out, index, layers, made_with)  # (so is a damaged neurons.csv)
    color = color_selectivity(run.model, index, layers, run.dataset, gray=args.gray, batch_size=args.batch_size,
                              preprocess=run.preprocess, num_workers=args.workers, device=run.device,
                              progress=not args.no_progress)
    table = neuron_table(index, layers, color=color, tau=args.tau, extra=ablation)
    table = _with_other_layers(table, kept, list(index.layers))
    for layer in layers:
        _replacing(run.out, "selectivity", layer)
    save_table(table, run.out.table_csv)
    for layer in layers:
        _record_made(run.out, "selectivity", layer, made_with, [run.out.table_csv], checks=False)
    class_threshold = _class_threshold(args.class_threshold, index)
    plot_all(table, run.out.plots_dir, color_threshold=args.color_threshold, class_threshold=class_threshold)
    for layer in layers:
        rows = table[table["layer"] == layer]
        color, gamma = rows["color_selectivity"], rows["class_selectivity"]
        # out of the units whose index is defined (not dead), as the plots count them
        print(f"{layer}: {int((color > args.color_threshold).sum())} of {int(color.notna().sum())} live units "
              f"color selective (> {args.color_threshold}), {int((gamma > class_threshold).sum())} of "
              f"{int(gamma.notna().sum())} class selective (gamma > {class_threshold:.3g})")
    print(f"table -> {run.out.table_csv}; plots -> {run.out.plots_dir}")


# ---------------------------------------------------------------------------------------------- ablate
def step_ablate(args) -> None:
    import pandas as pd

    from .ablation import ablation_drops
    from .table import save_table

    run, index = open_run(args.out, args.device)
    if index.labels is None:
        raise ValueError("ablation needs labelled images: this run's data has no classes (use one subfolder per "
                         "class)")
    layers = _layers(args, index)
    _check_units(args.units, index, layers)
    _forget_made(run.out, "ablation", layers, args)
    for layer in layers:
        # the batch size too: a convolution's rounding, and so a borderline prediction, can depend on it
        made_with = {"mode": args.mode, "units": args.units, "batch_size": args.batch_size}
        if _already_made(run.out, "ablation", layer, made_with, args):
            continue
        result = ablation_drops(run.model, run.dataset, layer, units=args.units, mode=args.mode,
                                preprocess=run.preprocess, batch_size=args.batch_size, device=run.device,
                                progress=not args.no_progress, index=index if args.mode == "mean" else None,
                                num_workers=args.workers)
        frame = result.to_frame()
        names = [result.class_name(k) for k in range(result.drop.shape[1])]
        per_class = pd.DataFrame(result.drop.numpy(), columns=names)
        # the first column is the unit, whatever the class names (a class folder may be named "unit")
        per_class.insert(0, "unit", frame["unit"].to_numpy(), allow_duplicates=True)
        _replacing(run.out, "ablation", layer)
        save_table(per_class, run.out.ablation_classes_csv(layer))
        save_table(frame, run.out.ablation_csv(layer))
        _record_made(run.out, "ablation", layer, made_with,
                     [run.out.ablation_csv(layer), run.out.ablation_classes_csv(layer)])
        worst = frame.sort_values("max_class_drop", ascending=False).head(1)
        name = worst["max_drop_class_name"].iloc[0]  # empty where classes share the drop (e.g. all at 0)
        print(f"{layer}: intact accuracy {float(result.overall_intact_accuracy):.3f}; largest class drop "
              f"{float(worst['max_class_drop'].iloc[0]):.3f} (unit {int(worst['unit'].iloc[0])}, "
              f"{'class ' + name if name else 'no single class'}) -> {run.out.ablation_csv(layer)}")
    if run.out.table_csv.exists():  # refresh the neuron table's ablation columns
        table = _run_table(run.out, index)  # (a damaged one is an error: never saved again as if whole)
        table = table.drop(columns=[c for c in ABLATION_COLUMNS if c in table])
        frame = _ablation_frame(run.out, list(index.layers), index)
        if frame is not None:
            table = table.merge(frame, on=["layer", "unit"], how="left")  # (save_table keeps class indices ints)
        save_table(table, run.out.table_csv)


# ------------------------------------------------------------------------------------------- visualize
def step_visualize(args) -> None:
    from .maximization import maximize
    from .png import save_png

    run, index = open_run(args.out, args.device)
    size = args.image_size or run.settings["size"]
    layers = _layers(args, index)
    _check_units(args.units, index, layers)
    _forget_made(run.out, "visualize", layers, args)
    for layer in layers:
        units = args.units if args.units is not None else list(range(min(args.max_units, index[layer].num_units)))
        made_with = {"units": list(units), "size": size, "steps": args.steps, "batch_size": args.batch_size}
        if _already_made(run.out, "visualize", layer, made_with, args):
            continue
        images = maximize(run.model, layer, units, size=size, steps=args.steps, preprocess=run.preprocess,
                          batch_size=args.batch_size, device=run.device, progress=not args.no_progress)
        _replacing(run.out, "visualize", layer)
        shutil.rmtree(run.out.maximized_png(layer, 0).parent, ignore_errors=True)  # an earlier run's other units
        for unit, image in zip(units, images):
            save_png(image, run.out.maximized_png(layer, unit))
        _record_made(run.out, "visualize", layer, made_with, [run.out.maximized_png(layer, 0).parent])
        print(f"{layer}: {len(units)} maximisation images -> {run.out.maximized_png(layer, units[0]).parent}")


# ---------------------------------------------------------------------------------------------- report
def step_report(out_dir):
    from .report import build_report

    OutDir(out_dir).run_settings()  # a clear error when DIR is not a run
    return build_report(out_dir)


# ------------------------------------------------------------------------------------------------ demo
def run_demo(out_dir="neuroidx-demo", device=None, images=None, quick: bool = False, progress: bool = True):
    """Index, NFs, selectivity, ablation, maximisation and the report, on the built-in model and data."""
    from .demo_model import DEMO_DATA, DEMO_LAYERS

    n = images or (120 if quick else 600)
    out = OutDir(out_dir)
    made = out.run_settings() if out.run_json.exists() else {"model": "demo", "data": BUILTIN_SHAPES}
    if (made.get("model"), made.get("data")) != ("demo", BUILTIN_SHAPES):
        raise ValueError(f"{out.root} holds a run of model {made.get('model')!r} on {made.get('data')!r}, not the "
                         "demo's (the demo model on its built-in images): give the demo another --out")
    common = dict(out=out_dir, device=device, workers=0, no_progress=not progress, debug=False)
    step_index(SimpleNamespace(**common, model="demo", model_args={}, weights=None, data=BUILTIN_SHAPES,
                               size=DEMO_DATA["size"], resize=None, no_crop=False, normalize="none",
                               layers=DEMO_LAYERS, k=min(8 if quick else 20, n), images=n,
                               data_seed=DEMO_DATA["test"]["seed"],
                               batch_size=64, checkpoint_every=50, force=True))
    step_features(SimpleNamespace(**common, layers=None, pad="gray", keep=6, batch_size=64))
    step_selectivity(SimpleNamespace(**common, layers=None, gray="luminance", tau=1.0, color_threshold=0.25,
                                     class_threshold=None, batch_size=64))
    step_ablate(SimpleNamespace(**common, layers=["conv4"] if quick else ["conv4", "conv5"], mode="zero",
                                units=None, batch_size=64))
    step_visualize(SimpleNamespace(**common, layers=["conv3", "conv5"], units=None, max_units=4 if quick else 12,
                                   steps=16 if quick else 96, image_size=None, batch_size=64))
    return step_report(out_dir)
