"""The static HTML report of a run directory (layout: ``neuroidx_fast.outdir``).

``build_report(out_dir)`` writes ``report/index.html`` (run summary, layers, summary plots),
``report/layers/<layer>.html`` (the layer's Neuron Features with their selectivity, and a sortable,
filterable neuron table) and ``report/units/<layer>/<unit>.html`` (a unit's NF, top crops with their
activations and classes, maximisation image, indices and largest per-class ablation drops).

The pages are offline: they reference the run's PNGs by relative paths (nothing is copied or embedded)
and load one CSS and one JS file written under ``report/static/``; no external URL appears anywhere.
Every text goes through Jinja2's autoescaping. Whatever part of the run is missing (features, neuron
table, ablation, maximisation images, the index itself) is left out, and the page says which
``neuroidx`` subcommand makes it. So is a layer's step whose files are not as its record says they were
made (``<step>/.done/<layer>.json``: each file's size and SHA-256), which the report's notes name with
what differs and the command that remakes it, and ablation files without a record (an interrupted
remake). Outputs nothing vouches for (records of earlier versions, features saved without one) are
shown as found.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from .atomic import public_mode, write_atomic
from .outdir import OutDir, read_json
# (pipeline imports this module only inside step_report: no cycle)
from .pipeline import ABLATION_COLUMNS, _output_problems
from .storage import replace_directory, writer_lock
from .table import read_ablation_csv

__all__ = ["build_report", "HINTS"]

# The subcommand that makes each part of a run directory: what a page names when that part is missing.
HINTS = {
    "index": "index",
    "features": "features",
    "table": "selectivity",
    "plots": "selectivity",
    "ablation": "ablate",
    "visualize": "visualize",
}

DASH = "\u2013"
# The indices shown on every NF card of a layer page and at the top of a unit page: (column, label).
CARD_COLUMNS = (("color_selectivity", "color"), ("class_selectivity", "class"),
                ("class_selectivity_morcos", "Morcos"), ("top_class_name", "top class"))
# Columns of the neuron table that get a "minimum" box in the layer page's filters.
MIN_FILTER_COLUMNS = ("color_selectivity", "class_selectivity", "class_selectivity_morcos", "overall_drop",
                      "max_class_drop")
SUMMARY_KEYS = ("model", "data", "layers", "k", "num_images", "created")
# Columns that hold a class number, -1 where there is none (a dead unit's top class, a unit whose ablation
# lowers no class): a negative one is shown and sorted as missing, not as a class number.
CLASS_COLUMNS = ("top_class", "max_drop_class")
TOP_DROPS = 5
# The steps whose outputs the pages show, checked against the record their command writes once a layer's
# outputs are all saved (``OutDir.step_record``: each file's size and SHA-256): step -> (subcommand, what
# the outputs are). Not the selectivity step: its record vouches for no content of neurons.csv, which
# `ablate` rewrites too (the pipeline checks the table's rows instead).
CHECKED_STEPS = {"features": ("features", "Neuron Features"), "ablation": ("ablate", "ablation results"),
                 "visualize": ("visualize", "maximisation images")}
# How many of a step's damaged files a note names (a layer's PNGs can number thousands).
NAMED_FILES = 3
# A step's outputs that no checksum vouches for, shown as found: those of a record written by an
# earlier version (no checksums), and features or maximisation images with no record (saved through
# the Python API, or by a version before the records), as reports showed them before.
UNVERIFIED = "unverified"


# ---------------------------------------------------------------------------------------------- helpers
def fmt(value, digits: int = 4) -> str:
    """A cell's text: numbers to ``digits`` significant digits, missing values (None, NaN, '') as '–'."""
    if value is None or value is pd.NA:  # (pd.NA: an empty cell of an integer column, e.g. max_drop_class)
        return DASH
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return DASH
        return f"{value:.{digits}g}"
    text = str(value)
    return text if text.strip() else DASH


def _sort_key(value) -> str:
    """What the table's JS sorts a cell by: the number to 9 digits or the text; '' when missing."""
    if value is None or value is pd.NA:  # (pd.NA: an empty cell of an integer column, e.g. max_drop_class)
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(float(value)):
            return ""
        if math.isinf(float(value)):  # what JavaScript's parseFloat reads (it gives NaN for "inf")
            return "Infinity" if value > 0 else "-Infinity"
        return f"{float(value):.9g}"
    return str(value)


def _shown(column, value):
    """What a page shows of ``column``'s ``value``: None (missing) for a class column's negative sentinel."""
    if column in CLASS_COLUMNS and isinstance(value, (int, float, np.integer, np.floating)) \
            and not isinstance(value, (bool, np.bool_)) and value < 0:
        return None
    return value


def _missing(value) -> bool:
    return value is None or value is pd.NA or \
        (isinstance(value, (float, np.floating)) and math.isnan(float(value))) or \
        (isinstance(value, str) and not value.strip())


def _is_dead(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return not _missing(value) and bool(value)


def _url(target: Path, page_dir: Path) -> str:
    """A relative URL from a page in ``page_dir`` to ``target`` (both inside the run directory)."""
    rel = os.path.relpath(target, page_dir)
    return "/".join(quote(part) for part in Path(rel).parts)


def _write_text(path: Path, text: str) -> None:
    """Atomic write: a reader sees the old page or the new one, never half of one."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; pages are meant to be read by anyone (web servers too)

    write_atomic(path, write)


def _environment():
    try:
        import jinja2
    except ImportError:
        raise ImportError("the HTML report needs Jinja2 (pip install jinja2)") from None
    loader = jinja2.FileSystemLoader(os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates"))
    return jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


# ------------------------------------------------------------------------------------------ run reading
@dataclass
class _Layer:
    name: str
    page: str                               # file-system name of the layer's pages
    units: list = field(default_factory=list)
    num_units: int | None = None
    feature_rows: dict = field(default_factory=dict)      # unit -> row of features.safetensors
    crop_ids: np.ndarray | None = None
    crop_values: np.ndarray | None = None
    features_dead: np.ndarray | None = None
    features_error: str | None = None
    rf: dict | None = None
    table: dict = field(default_factory=dict)             # unit -> {column: value} from neurons.csv
    ablation: dict = field(default_factory=dict)          # unit -> {column: value} from ablation/<layer>.csv
    drops: dict = field(default_factory=dict)             # unit -> [(class name, drop)] largest first
    has_ablation: bool = False
    ablation_error: str | None = None
    index: object = None                                  # LayerIndex or None
    made: dict = field(default_factory=dict)              # step -> the files its record vouches for, checked

    @property
    def has_features(self) -> bool:
        return self.crop_ids is not None

    def made_file(self, step: str, path) -> bool:
        """Whether ``path`` is one of ``step``'s outputs of this layer to show: one its record lists, as
        made (a file the record does not list, or of a step whose files changed since, is not the run's
        result); where nothing can vouch for the files (``UNVERIFIED``), any that exists."""
        made = self.made.get(step)
        if made is UNVERIFIED:
            return Path(path).exists()
        return made is not None and Path(path) in made

    def dead(self, unit: int):
        """True / False, or None when nothing says."""
        row = self.feature_rows.get(unit)
        if row is not None and self.features_dead is not None:
            return bool(self.features_dead[row])
        if unit in self.table and "dead" in self.table[unit]:
            value = self.table[unit]["dead"]
            return None if _missing(value) else _is_dead(value)
        if self.index is not None and unit < self.index.num_units:
            return bool(self.index.dead()[unit])
        return None


class _Run:
    def __init__(self, out_dir):
        self.out = OutDir(out_dir)
        if not self.out.root.is_dir():
            raise FileNotFoundError(f"{self.out.root} is not a run directory (it does not exist): run "
                                    f"`neuroidx index --model ... --data ... --out {self.out.root}` first")
        settings = self.out.run_settings()  # a clear error for a missing, corrupt or foreign run.json
        self.settings = settings
        self.notes: list[str] = []
        self.index = self._load_index()
        self.class_names = settings.get("class_names") or (self.index.class_names if self.index else None)
        labels = settings.get("labels")
        self.labels = labels if isinstance(labels, list) else None
        names = settings.get("layers")
        if not names and self.index is not None:
            names = list(self.index.layers)
        if not names or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{self.out.run_json} names no layers (key \"layers\": a list of layer names): run "
                             "`neuroidx index` again to rewrite it")
        self.table_columns, table = self._load_table()
        self.layers = [self._load_layer(name, table) for name in names]
        pages = [layer.page for layer in self.layers]
        clash = sorted({p for p in pages if pages.count(p) > 1})
        if clash:
            raise ValueError(f"layers {[l.name for l in self.layers if l.page in clash]} share the file name(s) "
                             f"{clash}: rename them so that their file names differ")

    # The index is optional for the report: it gives unit counts and the full top-K of each unit.
    def _load_index(self):
        if not self.out.index.exists():
            return None
        from .neuron_index import NeuronIndex

        try:
            return NeuronIndex.load(self.out.index)
        except (OSError, ValueError) as exc:
            self.notes.append(f"the index could not be read ({exc}); run `neuroidx {HINTS['index']} --out "
                              f"{self.out.root}` to remake it")
            return None

    def _load_table(self):
        path = self.out.table_csv
        if not path.exists():
            return None, None
        from .table import load_table

        try:
            df = load_table(path)
        except Exception as exc:  # a broken table must not stop the rest of the report
            self.notes.append(f"neurons.csv could not be read ({type(exc).__name__}: {exc}); run "
                              f"`neuroidx {HINTS['table']}` again")
            return None, None
        if "layer" not in df.columns or "unit" not in df.columns:
            self.notes.append(f"neurons.csv has no 'layer' and 'unit' columns; run `neuroidx {HINTS['table']}` again")
            return None, None
        return list(df.columns), df

    def image_class(self, image_id: int):
        """The class name of one dataset image, or None when the run records no labels."""
        if self.labels is None or not 0 <= image_id < len(self.labels):
            return None
        label = self.labels[image_id]
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
            return None
        if self.class_names and 0 <= label < len(self.class_names):
            return str(self.class_names[label])
        return f"class {int(label)}"

    def _load_layer(self, name: str, table) -> _Layer:
        out = self.out
        layer = _Layer(name=name, page=out.features_dir(name).name)
        if self.index is not None and name in self.index.layers:
            layer.index = self.index[name]
            layer.num_units = layer.index.num_units
        units = set(range(layer.num_units or 0))
        for step in CHECKED_STEPS:
            layer.made[step] = self._check_made(layer, step)
        self._read_features(layer)
        units.update(layer.feature_rows)
        if table is not None:
            rows = table[table["layer"].astype(str) == name]
            for record in rows.to_dict("records"):
                try:
                    unit = int(record["unit"])
                except (TypeError, ValueError):
                    continue
                if layer.ablation_error is not None:  # (neurons.csv's copy of the ablation files not shown)
                    record.update({column: None for column in ABLATION_COLUMNS if column in record})
                layer.table[unit] = record
            units.update(layer.table)
        if layer.made_file("features", out.rf_json(name)):
            try:
                layer.rf = read_json(out.rf_json(name))
            except (OSError, ValueError):
                layer.rf = None
        self._read_ablation(layer)
        layer.units = sorted(u for u in units if u >= 0)
        return layer

    def _step_files(self, layer: str, step: str) -> bool:
        """Whether the run holds any output of ``layer``'s ``step``, made whole or not."""
        out = self.out
        if step == "ablation":
            return out.ablation_csv(layer).exists() or out.ablation_classes_csv(layer).exists()
        folder = out.features_dir(layer) if step == "features" else out.maximized_png(layer, 0).parent
        return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))

    def _check_made(self, layer: _Layer, step: str):
        """The files of ``layer``'s ``step`` that its record vouches for, each checked against the size and
        SHA-256 recorded when the step made it; ``UNVERIFIED`` where nothing vouches for them (a record
        without checksums, by an earlier version; features or maximisation images without a record);
        None where there is nothing to show: the step not run, ablation files without a record (an
        interrupted remake leaves old and new side by side), or a file that differs from its record
        (cut short, edited or replaced since), which a note (and the layer's pages) then names."""
        out, name = self.out, layer.name
        command, what = CHECKED_STEPS[step]
        record = out.step_record(step, name)
        where = record.relative_to(out.root).as_posix()
        if not record.exists():
            return UNVERIFIED if step != "ablation" and self._step_files(name, step) else None
        files, problem = _checked_files(out.root, record, f"{name}'s {what} ({where})")
        if problem is None:
            return files
        note = f"{problem}: {name}'s {what} are not shown; run `neuroidx {command} --out {out.root} --layers " \
               f"{name}` to remake them"
        self.notes.append(note)
        if step == "features":
            layer.features_error = note
        elif step == "ablation":
            layer.ablation_error = note
        return None

    def _read_features(self, layer: _Layer) -> None:
        path = self.out.features_file(layer.name)
        if not layer.made_file("features", path):  # none, or not as made (a note says which)
            return
        from safetensors import safe_open

        # Only the small tensors: the crops of a wide layer can weigh hundreds of MB.
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                units = f.get_tensor("units").long().numpy()
                crop_ids = f.get_tensor("crop_ids").long().numpy()
                crop_values = f.get_tensor("crop_values").float().numpy()
                dead = f.get_tensor("dead").bool().numpy()
        except Exception as exc:  # corrupt or foreign file: say so, keep the rest
            layer.features_error = (f"{path.name} could not be read ({type(exc).__name__}: {exc}); run "
                                    f"`neuroidx {HINTS['features']}` again")
            return
        if crop_ids.ndim != 2 or crop_values.shape != crop_ids.shape or len(units) != len(crop_ids) or \
                len(dead) != len(units):
            layer.features_error = f"{path.name} is inconsistent; run `neuroidx {HINTS['features']}` again"
            return
        layer.feature_rows = {int(u): row for row, u in enumerate(units.tolist())}
        layer.crop_ids, layer.crop_values, layer.features_dead = crop_ids, crop_values, dead

    def _read_ablation(self, layer: _Layer) -> None:
        summary, per_class = self.out.ablation_csv(layer.name), self.out.ablation_classes_csv(layer.name)
        # complete files only, as made (an interrupted remake leaves new and old files side by side, and no
        # record; a file changed since differs from its record): _check_made
        summary_made, per_class_made = layer.made_file("ablation", summary), layer.made_file("ablation", per_class)
        layer.has_ablation = summary_made or per_class_made
        if not layer.has_ablation:
            return
        try:
            if summary_made:
                df = read_ablation_csv(summary)
                if "unit" in df.columns:
                    for record in df.to_dict("records"):
                        layer.ablation[int(record.pop("unit"))] = record
            if per_class_made:
                # the unit, then one column per class: the header read as written (a class may be named
                # "unit", which pandas would rename)
                with open(per_class, newline="", encoding="utf-8") as f:
                    header = next(csv.reader(f), [])
                if not header or header[0] != "unit":
                    raise ValueError("no 'unit' column first")
                df = pd.read_csv(per_class, header=None, skiprows=1)
                classes = header[1:]
                matrix = df.iloc[:, 1:].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
                for unit, row in zip(df.iloc[:, 0].astype(int).tolist(), matrix):
                    order = [i for i in np.argsort(-np.nan_to_num(row, nan=-np.inf), kind="stable")
                             if not math.isnan(row[i])][:TOP_DROPS]
                    layer.drops[unit] = [(classes[i], float(row[i])) for i in order]
        except Exception as exc:  # a broken CSV must not stop the rest of the report
            layer.ablation_error = (f"the ablation files of {layer.name} could not be read ({type(exc).__name__}: "
                                    f"{exc}); run `neuroidx {HINTS['ablation']}` again")


def _checked_files(root: Path, record: Path, shown: str):
    """(the files the step record ``record`` lists, None) where each is as the record says it was made (its
    size and SHA-256, ``pipeline._record_made``); (UNVERIFIED, None) for a record without checksums; else
    (None, what is wrong) for a note, ``shown`` naming the outputs."""
    try:
        made = read_json(record)
    except (OSError, ValueError) as exc:
        return None, f"the record of {shown} cannot be read ({exc})"
    files = made.get("files") if isinstance(made, dict) else None
    checks = made.get("checks") if isinstance(made, dict) else None
    if not isinstance(files, list) or not files or not all(isinstance(file, str) for file in files):
        return None, f"the record of {shown} lists no files"
    if not isinstance(checks, dict):  # (written by an earlier version: shown as found, as it was then)
        return UNVERIFIED, None
    wrong = [f"{name} {_problem_text(kind, how)}" for name, kind, how in _output_problems(root, files, checks)]
    if wrong:
        more = f" (and {len(wrong) - NAMED_FILES} more)" if len(wrong) > NAMED_FILES else ""
        return None, "; ".join(wrong[:NAMED_FILES]) + more
    return {root / file for file in files}, None


def _problem_text(kind: str, how: str | None) -> str:
    """A note's words for one of ``pipeline._output_problems``' files."""
    if kind == "unchecked":
        return "has no size nor checksum in the record"
    if kind == "differs":
        return f"{how} recorded when it was made (cut short, edited or replaced since)"
    return how


# ------------------------------------------------------------------------------------------- page data
def _value_cells(record: dict | None):
    """The card indices of one unit: [(label, text)], '–' where the table or the column is missing."""
    record = record or {}
    return [(label, fmt(_shown(column, record.get(column)))) for column, label in CARD_COLUMNS]


def _summary(run: _Run):
    s = run.settings
    rows = []
    for key in SUMMARY_KEYS:
        value = s.get(key)
        if key == "layers" and isinstance(value, list):
            value = ", ".join(map(str, value))
        rows.append((key, fmt(value)))
    names = run.class_names
    rows.append(("classes", str(len(names)) if names else DASH))
    if run.labels is not None:
        rows.append(("labels", f"{len(run.labels)} per-image labels"))
    for key, value in s.items():
        if key in SUMMARY_KEYS or key in ("class_names", "labels"):
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        rows.append((key, text if len(text) <= 400 else text[:400] + " \u2026"))
    return rows


def _layer_status(run: _Run, layer: _Layer):
    """What the run holds for one layer: [(part, present, hint command)]."""
    visualize = run.out.maximized_png(layer.name, 0).parent
    made = layer.made.get("visualize")
    if made is UNVERIFIED:
        images = visualize.is_dir() and any(visualize.glob("*.png"))
    else:
        images = any(path.parent == visualize and path.suffix == ".png" for path in made or ())
    return [
        ("features", layer.has_features, HINTS["features"]),
        ("neuron table", bool(layer.table), HINTS["table"]),
        ("ablation", layer.has_ablation, HINTS["ablation"]),
        ("maximisation images", images, HINTS["visualize"]),
    ]


def _table_columns(run: _Run, layer: _Layer):
    """The neuron table's columns for a layer page: [(name, 'num' | 'text')]."""
    columns = [c for c in (run.table_columns or []) if c != "layer"]
    kinds = []
    for column in columns:
        values = [v for v in (_shown(column, r.get(column)) for r in layer.table.values()) if not _missing(v)]
        numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                      for v in values)
        kinds.append((column, "num" if numeric else "text"))
    return kinds


def _layer_page(run: _Run, layer: _Layer, page_dir: Path, root: str):
    out = run.out
    cards = []
    for unit in layer.units:
        nf = out.nf_png(layer.name, unit)
        cards.append({"unit": unit, "href": f"../units/{quote(layer.page)}/{unit}.html",
                      "src": _url(nf, page_dir) if layer.made_file("features", nf) else None,
                      "dead": layer.dead(unit), "indices": _value_cells(layer.table.get(unit))})
    columns = _table_columns(run, layer)
    rows = []
    for unit in sorted(layer.table):
        record = layer.table[unit]
        cells = []
        for column, _ in columns:
            value = _shown(column, record.get(column))
            text, key = fmt(value), _sort_key(value)
            if key == text or (key == "" and text == DASH):
                key = None  # the JS sorts by the cell's text (a dash: missing), which says the same
            cells.append({"text": text, "key": key,
                          "href": f"../units/{quote(layer.page)}/{unit}.html" if column == "unit" else None})
        rows.append({"unit": unit, "dead": layer.dead(unit), "cells": cells})
    min_filters = [(i, column) for i, (column, kind) in enumerate(columns)
                   if column in MIN_FILTER_COLUMNS and kind == "num"]
    grid = out.grid_png(layer.name)
    return {
        "layer": layer, "root": root, "cards": cards, "columns": columns, "rows": rows,
        "min_filters": min_filters, "has_dead_column": any(c == "dead" for c, _ in columns),
        "grid_src": _url(grid, page_dir) if layer.made_file("features", grid) else None, "rf": layer.rf,
        "status": _layer_status(run, layer), "hints": HINTS,
    }


def _unit_page(run: _Run, layer: _Layer, position: int, page_dir: Path, root: str):
    out = run.out
    unit = layer.units[position]
    nf = out.nf_png(layer.name, unit)
    maximized = out.maximized_png(layer.name, unit)
    crops = []
    row = layer.feature_rows.get(unit)
    if row is not None:
        for j, (image_id, value) in enumerate(zip(layer.crop_ids[row].tolist(), layer.crop_values[row].tolist())):
            if image_id < 0:
                continue
            path = out.crop_png(layer.name, unit, j)
            crops.append({"j": j, "src": _url(path, page_dir) if layer.made_file("features", path) else None,
                          "value": fmt(value), "image_id": image_id, "class_name": run.image_class(image_id)})
    top = []
    if layer.index is not None and unit < layer.index.num_units:
        for value, image_id, y, x in layer.index.top(unit):
            top.append({"value": fmt(value), "image_id": image_id, "class_name": run.image_class(image_id),
                        "where": f"({y}, {x})"})
    record = layer.table.get(unit)
    details = [(k, fmt(_shown(k, v))) for k, v in record.items() if k not in ("layer", "unit")] if record else []
    ablation = [(k, fmt(_shown(k, v))) for k, v in layer.ablation.get(unit, {}).items()]
    drops = [(name, fmt(drop)) for name, drop in layer.drops.get(unit, [])]
    prev_unit = layer.units[position - 1] if position > 0 else None
    next_unit = layer.units[position + 1] if position + 1 < len(layer.units) else None
    return {
        "layer": layer, "unit": unit, "root": root, "dead": layer.dead(unit),
        "nf_src": _url(nf, page_dir) if layer.made_file("features", nf) else None,
        "max_src": _url(maximized, page_dir) if layer.made_file("visualize", maximized) else None,
        "crops": crops, "in_features": row is not None, "top": top, "has_labels": run.labels is not None,
        "values": _value_cells(record), "details": details, "has_record": record is not None,
        "ablation": ablation, "drops": drops,
        "prev": f"{prev_unit}.html" if prev_unit is not None else None, "prev_unit": prev_unit,
        "next": f"{next_unit}.html" if next_unit is not None else None, "next_unit": next_unit,
        "layer_href": f"../../layers/{quote(layer.page)}.html", "hints": HINTS,
    }


# ------------------------------------------------------------------------------------------------ build
def build_report(out_dir, title: str | None = None) -> Path:
    """Write the HTML report of the run directory ``out_dir`` under ``out_dir/report/``; returns the path
    of ``report/index.html``. The report is built in a folder beside it and swapped in whole: a build
    that is interrupted leaves the old report as it was, and no page of a layer or unit the run no
    longer has survives a rebuild."""
    run = _Run(out_dir)
    out = run.out
    env = _environment()
    s = run.settings
    title = title or f"neuroidx report: {s.get('model', '?')} on {s.get('data', '?')}"
    env.globals.update(title=title, dash=DASH)
    out.root.mkdir(parents=True, exist_ok=True)
    # Builds of one report take turns, from before the temporary folder is made to after it is swapped in:
    # replace_directory deletes every report.tmp-* beside report/ as the leftover of a killed build, and
    # would take a build still under way for one (which then fails, or ships half its pages).
    with writer_lock(os.path.realpath(out.report_dir)):
        _build(run, env, out)
    return out.report_index


def _build(run: _Run, env, out: OutDir) -> None:
    """Write the report's pages into a new folder beside report/ and swap it in (under the writer lock)."""
    # a sibling of report/: the pages' relative links to the run's files are the same from both
    report = Path(tempfile.mkdtemp(prefix=out.report_dir.name + ".tmp-", dir=out.root))
    try:
        os.chmod(report, public_mode(directory=True))
        for name in ("report.css", "report.js"):
            source = env.loader.get_source(env, name)[0]
            _write_text(report / "static" / name, source)

        unit_template = env.get_template("unit.html")
        for layer in run.layers:
            folder = report / "units" / layer.page
            for position, unit in enumerate(layer.units):
                path = folder / f"{unit}.html"
                _write_text(path, unit_template.render(**_unit_page(run, layer, position, folder, "../../")))

        layer_template = env.get_template("layer.html")
        for layer in run.layers:
            path = report / "layers" / f"{layer.page}.html"
            _write_text(path, layer_template.render(**_layer_page(run, layer, path.parent, "../")))

        plots = sorted(out.plots_dir.glob("*.png")) if out.plots_dir.is_dir() else []
        layers = []
        for layer in run.layers:
            dead = [layer.dead(u) for u in layer.units]
            layers.append({"layer": layer, "href": f"layers/{quote(layer.page)}.html", "units": len(layer.units),
                           "dead": sum(1 for d in dead if d) if any(d is not None for d in dead) else None,
                           "status": _layer_status(run, layer)})
        page = env.get_template("index.html").render(
            root="", summary=_summary(run), layers=layers, notes=run.notes, hints=HINTS,
            plots=[{"name": p.stem, "src": _url(p, report)} for p in plots], has_table=run.table_columns is not None,
            has_index=run.index is not None)
        _write_text(report / out.report_index.name, page)
    except BaseException:
        shutil.rmtree(report, ignore_errors=True)
        raise
    replace_directory(report, out.report_dir)  # whole: the old report, or the new one
