"""Where the command-line pipeline keeps what it makes: one directory per run, laid out here only.

    run.json                          the run's settings (model, weights, data, layers, k, ...) and class names
    index/                            the NeuronIndex (NeuronIndex.load)
    index.checkpoint/                 the resumable checkpoint while indexing runs
    features/<layer>/features.safetensors   nf, crops, crop_ids, crop_values, dead, units, weight_sum
    features/<layer>/rf.json          the layer's receptive field
    features/<layer>/grid.png         all NFs of the layer
    features/<layer>/nf/<unit>.png    one NF
    features/<layer>/crops/<unit>_<j>.png   the unit's j-th top crop (j = 0 is the best)
    neurons.csv                       the neuron table (one row per (layer, unit); selectivity, ablation)
    plots/<name>.png                  per-layer summary plots
    ablation/<layer>.csv              per unit: overall_drop, max_class_drop, max_drop_class, max_drop_class_name
    ablation/per_class/<layer>.csv    per unit (rows) and class (columns): accuracy drop
    visualize/<layer>/<unit>.png      the unit's activation-maximisation image
    <step>/.done/<layer>.json         features, selectivity, ablation, visualize: the settings a layer's
                                      outputs were made with and each output file's size and sha256, written
                                      once they are complete (a rerun skips the layer while they match, and
                                      remakes it, saying why, where a file changed)
    report/index.html                 the HTML report (report/layers/<layer>.html, report/units/<layer>/<unit>.html)
    .neuroidx.lock                    held (flock) by the command writing in the run, deleted when it ends
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from .atomic import write_atomic

try:
    import fcntl
except ImportError:  # (not on Windows: commands on one run directory are then not kept apart)
    fcntl = None

__all__ = ["OutDir", "RunBusyError", "safe_name", "write_json", "read_json"]

LOCK_NAME = ".neuroidx.lock"


class RunBusyError(RuntimeError):
    """Another neuroidx command holds the run directory's lock (``OutDir.writing``)."""


def safe_name(layer: str) -> str:
    """A file-system name for a layer, one per layer name: the name itself when it holds only letters,
    digits, '_', '-' and '.' (a module path such as ``layer1.0.conv1``); otherwise the unusual characters
    become '_' and a hash of the whole name follows, so that two names never share one."""
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", layer) and layer not in (".", ".."):
        return layer
    digest = hashlib.sha1(layer.encode("utf-8")).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', layer).lstrip('.') or '_'}-{digest}"


def write_json(path, data) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)

    write_atomic(path, write, suffix=".json")


def read_json(path):
    with open(path) as f:
        return json.load(f)


class OutDir:
    """Paths inside one run directory (see the module docstring)."""

    def __init__(self, root):
        self.root = Path(root)

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def checkpoint(self) -> Path:
        return self.root / "index.checkpoint"

    def features_dir(self, layer: str) -> Path:
        return self.root / "features" / safe_name(layer)

    def features_file(self, layer: str) -> Path:
        return self.features_dir(layer) / "features.safetensors"

    def rf_json(self, layer: str) -> Path:
        return self.features_dir(layer) / "rf.json"

    def grid_png(self, layer: str) -> Path:
        return self.features_dir(layer) / "grid.png"

    def nf_png(self, layer: str, unit: int) -> Path:
        return self.features_dir(layer) / "nf" / f"{int(unit)}.png"

    def crop_png(self, layer: str, unit: int, j: int) -> Path:
        return self.features_dir(layer) / "crops" / f"{int(unit)}_{int(j)}.png"

    @property
    def table_csv(self) -> Path:
        return self.root / "neurons.csv"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def ablation_csv(self, layer: str) -> Path:
        return self.root / "ablation" / f"{safe_name(layer)}.csv"

    def ablation_classes_csv(self, layer: str) -> Path:
        return self.root / "ablation" / "per_class" / f"{safe_name(layer)}.csv"  # (apart: a layer may be "x_per_class")

    def maximized_png(self, layer: str, unit: int) -> Path:
        return self.root / "visualize" / safe_name(layer) / f"{int(unit)}.png"

    def step_record(self, step: str, layer: str) -> Path:
        """The settings ``layer``'s outputs of ``step`` ("features", "selectivity", "ablation", "visualize") were
        made with, written once they are all saved. A dot folder: no layer's own file or folder name starts with a dot."""
        return self.root / step / ".done" / f"{safe_name(layer)}.json"

    def made(self, step: str, layer: str) -> bool:
        """Whether ``layer``'s outputs of ``step`` are complete: its record exists (an interrupted remake
        leaves new and old files side by side, and none)."""
        return self.step_record(step, layer).exists()

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report_index(self) -> Path:
        return self.report_dir / "index.html"

    def derived(self) -> list[Path]:
        """Everything the later steps make from the index: stale once the index is made again."""
        return [self.root / "features", self.table_csv, self.plots_dir, self.root / "ablation",
                self.root / "visualize", self.report_dir, self.root / "selectivity"]

    def run_settings(self) -> dict:
        if not self.run_json.exists():
            raise FileNotFoundError(f"{self.root} holds no run (no run.json): run `neuroidx index --model ... --data "
                                    f"... --out {self.root}` first")
        # (`index --out DIR --force` alone would read the settings back from this very file: the fix named
        # gives them again)
        again = f"index again with its settings given: `neuroidx index --model ... --data ... --out {self.root} " \
                "--force`"
        try:
            settings = read_json(self.run_json)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.run_json} is not valid JSON ({exc}): {again}") from None
        missing = [key for key in ("model", "data", "layers") if not isinstance(settings, dict) or key not in settings]
        if missing:
            raise ValueError(f"{self.run_json} is not a run's record (no {', '.join(missing)}): {again}")
        return settings

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_NAME

    @contextlib.contextmanager
    def writing(self, create: bool = False):
        """Hold the run directory's lock for the block: one command at a time writes in a run (two would
        each replace the other's files, and both say they succeeded); another one fails at once with
        ``RunBusyError``. ``create``: make the directory first if it is missing (`index`), and remove it
        again if the block left it empty (a command refused before it wrote anything leaves no folder).
        The lock file is deleted on release (a folder refused as a run keeps only its own files); one left
        by a killed command (whose lock the system released) is taken and deleted by the next. No lock
        where the system offers none (``fcntl`` missing, a folder that cannot hold the file)."""
        made = []  # the folders made here, deepest first
        if create:
            folder = self.root
            while not os.path.lexists(folder) and folder != folder.parent:
                made.append(folder)
                folder = folder.parent
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError:  # (a file in the way: the command says so)
                made = []
        fd = self._lock() if self.root.is_dir() else None
        try:
            yield
        finally:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.lock_file)  # (before the unlock: a command that opened it then looks again)
                os.close(fd)
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:  # not empty: the command wrote in it
                    break

    def _lock(self):
        """The open, locked lock file (``writing``), or None where it cannot be locked."""
        if fcntl is None:
            return None
        while True:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError:  # read-only, another user's file: as without the lock
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunBusyError(f"another neuroidx command is writing in {self.root} (it holds {self.lock_file}): "
                                   "wait for it to end, or use another --out") from None
            except OSError:  # no flock on this file system
                os.close(fd)
                return None
            try:
                # the holder before deletes the file on release: if it did after this open, another command
                # may have locked a new file of that name meanwhile, so lock that one instead
                if os.path.samestat(os.fstat(fd), os.stat(self.lock_file)):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
