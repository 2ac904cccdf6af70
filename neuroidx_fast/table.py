"""The neuron table: one row per (layer, unit) with every index, as a pandas DataFrame.

Queries are plain ``DataFrame.query`` strings, e.g.::

    df = neuron_table(index, color=alphas, labels=dataset)
    df.query("layer == 'conv4' and color_selectivity > 0.5")
    df.query("not dead and class_selectivity > 0.8 and top_class_name == 'red disk'")
    df.sort_values("class_selectivity_morcos", ascending=False).groupby("layer").head(5)

``save_table`` / ``load_table`` write and read Parquet (``.parquet``, needs pyarrow) or CSV (``.csv``).
"""

from __future__ import annotations

import importlib.util
import numbers
import os
from collections.abc import Mapping

import numpy as np
import torch

from .atomic import write_atomic

from .neuron_index import NeuronIndex
from .selectivity import class_selectivity, class_selectivity_morcos

__all__ = ["neuron_table", "save_table", "load_table", "TABLE_COLUMNS"]

TABLE_COLUMNS = ("layer", "unit", "top_activation", "dead", "mean_activation", "color_selectivity",
                 "class_selectivity", "class_selectivity_morcos", "top_class", "top_class_name")


def _pandas():
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("the neuron table needs pandas (pip install pandas)") from None
    return pd


def _per_unit(values, name: str, layer: str, units: int) -> np.ndarray:
    t = torch.as_tensor(values).detach().cpu()
    if t.dim() != 1 or t.shape[0] != units:
        raise ValueError(f"{name}[{layer!r}] must be a [C] vector with C = {units} units, got shape {tuple(t.shape)}")
    return t.to(torch.float64).numpy()


def _color_by_layer(color, names: list) -> dict:
    """``color`` as {layer: alphas}: a dict as it is; one [C] tensor or array (what ``color_selectivity``
    returns for one layer name) belongs to the table's one layer, and to no layer when there are several."""
    if color is None:
        return {}
    if isinstance(color, Mapping):
        return dict(color)
    given = f"a {type(color).__name__}" + (f" of shape {tuple(color.shape)}" if hasattr(color, "shape") else "")
    if isinstance(color, (torch.Tensor, np.ndarray)):
        if len(names) == 1:
            return {names[0]: color}
        raise TypeError(f"color must be a dict {{layer: [C] tensor}} (as color_selectivity returns for a list of "
                        f"layers) when the table has several layers {names}; got {given}: pass "
                        "{layer: alphas}, or layers= the one layer they belong to")
    raise TypeError(f"color must be a dict {{layer: [C] tensor}} (as color_selectivity returns for a list of layers), "
                    f"or one [C] tensor for a table of one layer; got {given}")


def neuron_table(index: NeuronIndex, layers=None, color=None, labels=None, tau: float = 1.0, extra=None):
    """One row per (layer, unit) of ``index``, in layer then unit order. Columns:

    - ``layer`` (str), ``unit`` (int64), ``top_activation`` (a_1, NaN when no image was seen), ``dead``
      (bool, SPEC.md section 3), ``mean_activation`` (mean of the spatial means over the dataset);
    - ``color_selectivity``: from ``color``, a dict {layer: [C] tensor} (e.g. computed by the color
      selectivity module), or one [C] tensor when the table has one layer (``layers="conv4"``, as
      ``color_selectivity(model, index, "conv4")`` returns it); NaN for layers it does not cover;
    - ``class_selectivity``: Rafegas gamma at ``tau`` (``selectivity.class_selectivity``); needs
      ``labels`` (a [N] int tensor or the dataset) unless the index recorded its images' labels
      (``NeuronIndex.labels``); NaN when neither gives them;
    - ``class_selectivity_morcos``, ``top_class`` (int64, -1 when undefined), ``top_class_name`` (the
      index's class name, or the class number as text without names; missing when undefined): from the
      index's class means; NaN / -1 / missing for an index built without labels (or with images of fewer
      than two classes);
    - ``extra``: a DataFrame, or a list of them, with columns ``layer`` and ``unit`` and one row per
      (layer, unit) at most, left-joined (e.g. ablation drops); their other column names must be new.

    Dead units have NaN in every index column (never a silent 0).
    """
    pd = _pandas()
    if not isinstance(index, NeuronIndex):
        raise TypeError(f"index must be a NeuronIndex, got {type(index).__name__}")
    names = list(index.layers) if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    if not names:
        raise ValueError(f"no layers given; indexed layers: {list(index.layers)}")
    for name in names:
        index[name]  # raises a KeyError naming the indexed layers
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < float(tau) <= 1:
        raise ValueError(f"tau must be a number in (0, 1], got {tau!r}")
    color = _color_by_layer(color, names)
    unknown = [k for k in color if k not in index.layers]
    if unknown:
        raise ValueError(f"color has layers that are not in the index: {unknown}; indexed layers: {list(index.layers)}")
    has_labels = labels is not None or getattr(index, "labels", None) is not None
    frames = []
    for name in names:
        lay = index[name]
        c = lay.num_units
        dead = lay.dead()
        top = lay.values[:, 0].to(torch.float64)
        top = torch.where(lay.ids[:, 0] >= 0, top, torch.full_like(top, float("nan")))
        nan = np.full(c, np.nan)
        alpha = _per_unit(color[name], "color", name, c) if name in color else nan.copy()
        alpha = np.where(dead.numpy(), np.nan, alpha)
        gamma = class_selectivity(index, name, tau=tau, labels=labels).numpy() if has_labels else nan.copy()
        if lay.class_sum is not None and int((lay.class_count > 0).sum()) >= 2:
            si, top_class = class_selectivity_morcos(index, name)
            si, top_class = si.numpy(), top_class.numpy()
        else:
            si, top_class = nan.copy(), np.full(c, -1, dtype=np.int64)
        class_names = index.class_names
        top_name = [None if k < 0 else (class_names[k] if class_names and k < len(class_names) else str(k))
                    for k in top_class.tolist()]
        frames.append(pd.DataFrame({
            "layer": [name] * c,
            "unit": np.arange(c, dtype=np.int64),
            "top_activation": top.numpy(),
            "dead": dead.numpy().astype(bool),
            "mean_activation": lay.mean_activation().to(torch.float64).numpy(),
            "color_selectivity": alpha.astype(np.float64),
            "class_selectivity": gamma.astype(np.float64),
            "class_selectivity_morcos": si.astype(np.float64),
            "top_class": top_class.astype(np.int64),
            "top_class_name": top_name,
        }))
    df = pd.concat(frames, ignore_index=True)
    for other in ([] if extra is None else [extra] if isinstance(extra, pd.DataFrame) else list(extra)):
        df = _join(df, other, pd)
    return df


def _join(df, other, pd):
    if not isinstance(other, pd.DataFrame):
        raise TypeError(f"extra must be DataFrames, got {type(other).__name__}")
    missing = [k for k in ("layer", "unit") if k not in other.columns]
    if missing:
        raise ValueError(f"an extra table lacks the key column(s) {missing}: it must have 'layer' and 'unit'")
    clash = sorted(set(other.columns) & set(df.columns) - {"layer", "unit"})
    if clash:
        raise ValueError(f"an extra table repeats the column(s) {clash}: rename them before joining")
    if other.duplicated(["layer", "unit"]).any():
        raise ValueError("an extra table has several rows for one (layer, unit)")
    other = other.assign(layer=other["layer"].astype(str), unit=other["unit"].astype(np.int64))
    return _class_indices_as_integers(df.merge(other, on=["layer", "unit"], how="left", validate="one_to_one"))


# Class-index columns that a left join leaves empty for the units it has no row of (e.g. units not
# ablated): pandas makes them float to hold NaN, so that neurons.csv said class 8.0.
CLASS_INDEX_COLUMNS = ("max_drop_class",)


def _class_indices_as_integers(frame):
    """``frame`` with its CLASS_INDEX_COLUMNS that are float but hold only whole numbers and NaN as
    pandas' nullable Int64 (8, and an empty cell or <NA> where there is none); other columns as they are."""
    kinds = {}
    for column in CLASS_INDEX_COLUMNS:
        if column in frame.columns and frame[column].dtype.kind == "f":
            values = frame[column].astype("float64").to_numpy()  # (pandas < 2.2: no to_numpy(float) of a NA)
            whole = values[~np.isnan(values)]
            if np.all(np.isfinite(whole) & (whole == np.round(whole))):
                kinds[column] = "Int64"
    return frame.astype(kinds) if kinds else frame


def _format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".parquet", ".csv"):
        raise ValueError(f"unknown table format {ext or '(no extension)'!r} in {path!r}: use .parquet or .csv")
    if ext == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ImportError("Parquet tables need pyarrow (pip install pyarrow), or use a .csv path")
    return ext


def save_table(df, path) -> str:
    """Write ``df`` to ``path`` (.parquet or .csv) atomically (a temporary file, then a rename); returns it."""
    pd = _pandas()
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"save_table needs a DataFrame, got {type(df).__name__}")
    path = os.fspath(path)
    df = _class_indices_as_integers(df)
    if _format(path) == ".parquet":
        return write_atomic(path, lambda tmp: df.to_parquet(tmp, engine="pyarrow", index=False))
    return write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))


def _read_csv_with_text(path, text_columns):
    """A CSV whose ``text_columns`` stay text: layer names such as "3" are not read as numbers, class
    names such as "NA" not as missing (only empty cells are)."""
    return _pandas().read_csv(path, dtype={c: str for c in text_columns}, keep_default_na=False, na_values=[""])


def read_ablation_csv(path):
    """An ablation summary CSV (ablation/<layer>.csv), ``layer`` and ``max_drop_class_name`` as text."""
    pd = _pandas()
    try:
        frame = _read_csv_with_text(path, ("layer", "max_drop_class_name"))
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise ValueError(f"{path} is not an ablation table ({type(exc).__name__}): make it again (neuroidx ablate "
                         "--force)") from None
    if "unit" not in frame.columns:
        raise ValueError(f"{path} is not an ablation table (no unit column): make it again (neuroidx ablate --force)")
    return frame


def _read_parquet(pd, path):
    """A Parquet file's frame; a file pyarrow cannot read (not Parquet, truncated) is a ValueError."""
    import pyarrow

    try:
        return pd.read_parquet(path, engine="pyarrow").reset_index(drop=True)
    except (pyarrow.ArrowException, OSError) as exc:
        raise ValueError(str(exc)) from None


def load_table(path):
    """Read a table written by ``save_table``. From CSV, ``layer`` and the class names (``top_class_name``,
    ``max_drop_class_name``) stay text (layer names such as "3" are not read as numbers, class names
    such as "00" or "NA" not as 0 or missing)."""
    pd = _pandas()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no table at {path!r}")
    try:
        if _format(path) == ".parquet":
            frame = _read_parquet(pd, path)
        else:
            frame = _read_csv_with_text(path, ("layer", "top_class_name", "max_drop_class_name"))
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        raise ValueError(f"{path} is not a neuron table ({type(exc).__name__}: {str(exc)[:120]}): make it again "
                         "(save_table, or neuroidx selectivity)") from None
    if not {"layer", "unit"} <= set(frame.columns):
        raise ValueError(f"{path} is not a neuron table (no layer and unit columns): make it again (save_table, "
                         "or neuroidx selectivity)")
    return _class_indices_as_integers(frame)  # (a CSV cell left empty reads as NaN, and the column as float)
