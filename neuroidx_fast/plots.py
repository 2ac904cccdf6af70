"""Per-layer summary plots of a neuron table (after Rafegas et al.'s figures), written as PNG.

- ``plot_index_distributions``: for each index (color selectivity, gamma, Morcos SI), its distribution
  over the units of each layer (box plot with the units as points).
- ``plot_selective_share``: per layer, the share of units that are color selective (index above
  ``color_threshold``) and class selective (above ``class_threshold``).
- ``plot_layer_summary``: both in one figure. ``plot_all``: the three files in one folder.

Drawn with matplotlib's Agg canvas (no pyplot, no display, no global backend change); every file is
written atomically (a temporary file, then a rename). Each function returns the path(s) it wrote.
"""

from __future__ import annotations

import io
import numbers
import os

import numpy as np

from .atomic import write_atomic

__all__ = ["plot_index_distributions", "plot_selective_share", "plot_layer_summary", "plot_all", "INDEX_LABELS"]

INDEX_LABELS = {
    "color_selectivity": "color selectivity (alpha)",
    "class_selectivity": "class selectivity (gamma)",
    "class_selectivity_morcos": "class selectivity (Morcos SI)",
}
_COLORS = {"color": "#d1495b", "class": "#00798c"}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib (pip install matplotlib)") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> str:
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() != ".png":
        raise ValueError(f"plots are written as PNG: give a path ending in .png, got {path!r}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())

    return write_atomic(path, write, suffix=".png")


def _check_table(table, needed) -> None:
    import pandas as pd

    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"expected a neuron table (pandas DataFrame), got {type(table).__name__}")
    missing = [c for c in ("layer", *needed) if c not in table.columns]
    if missing:
        raise ValueError(f"the table lacks the column(s) {missing}; make it with neuron_table")
    if table.empty:
        raise ValueError("the table is empty: nothing to plot")


def _layers(table, layers) -> list[str]:
    present = list(dict.fromkeys(table["layer"].astype(str)))  # the table's order (network order)
    if layers is None:
        return present
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [layer for layer in layers if layer not in present]
    if unknown:
        raise ValueError(f"layers {unknown} are not in the table; its layers: {present}")
    return layers


def _tick_labels(layers) -> list[str]:
    """Layer names as literal text: matplotlib reads a pair of '$' as mathematics (and fails on most)."""
    return [str(layer).replace("$", r"\$") for layer in layers]


def _values(table, layer: str, column: str) -> np.ndarray:
    v = table.loc[table["layer"].astype(str) == layer, column].to_numpy(dtype=np.float64)
    return v[np.isfinite(v)]


def _draw_distribution(ax, table, layers, column) -> None:
    data = [_values(table, layer, column) for layer in layers]
    positions = np.arange(1, len(layers) + 1)
    drawn = [(p, d) for p, d in zip(positions, data) if d.size]
    if drawn:
        ax.boxplot([d for _, d in drawn], positions=[p for p, _ in drawn], widths=0.5, showfliers=False,
                   medianprops={"color": "black"})
        rng = np.random.default_rng(0)  # fixed jitter: the same table gives the same image
        for p, d in drawn:
            shown = d if d.size <= 2000 else rng.choice(d, 2000, replace=False)
            ax.scatter(p + rng.uniform(-0.18, 0.18, shown.size), shown, s=6, alpha=0.45, color="#30638e",
                       linewidths=0)
    for p, d in zip(positions, data):
        if not d.size:
            ax.text(p, 0.5, "n/a", ha="center", va="center", color="gray", transform=ax.get_xaxis_transform())
    ax.set_xticks(positions, _tick_labels(layers), rotation=30 if len(layers) > 4 else 0)
    ax.set_xlim(0.4, len(layers) + 0.6)
    ax.set_title(INDEX_LABELS.get(column, column), fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _shares(table, layers, column, threshold):
    """Per layer: (share of units with a defined index above threshold, number with a defined index)."""
    out = []
    for layer in layers:
        v = _values(table, layer, column)
        out.append((float((v > threshold).mean()) if v.size else float("nan"), v.size))
    return out


def _draw_shares(ax, table, layers, color_threshold, class_threshold, class_column) -> None:
    x = np.arange(len(layers))
    bars = []
    if "color_selectivity" in table.columns:
        bars.append(("color", f"color selective (alpha > {color_threshold:g})",
                     _shares(table, layers, "color_selectivity", color_threshold)))
    short = {"class_selectivity": "gamma", "class_selectivity_morcos": "Morcos SI"}.get(class_column, class_column)
    bars.append(("class", f"class selective ({short} > {class_threshold:g})",
                 _shares(table, layers, class_column, class_threshold)))
    width = 0.8 / len(bars)
    for i, (kind, label, shares) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        heights = [100 * s if s == s else 0.0 for s, _ in shares]
        ax.bar(x + offset, heights, width * 0.95, label=label, color=_COLORS[kind])
        for xi, (s, n) in zip(x + offset, shares):
            ax.text(xi, (100 * s if s == s else 0) + 1, f"{100 * s:.0f}%" if s == s else "n/a", ha="center",
                    va="bottom", fontsize=7, color="black" if s == s else "gray")
    ax.set_xticks(x, _tick_labels(layers), rotation=30 if len(layers) > 4 else 0)
    # headroom above the 100% bars and their labels for the legend, which must not cover any of them
    ax.set_ylim(0, 135)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("% of units (index defined)")
    ax.set_title("selective units per layer", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=len(bars), frameon=False)
    ax.grid(axis="y", alpha=0.3)


def _index_columns(table, columns) -> list[str]:
    if columns is None:
        return [c for c in INDEX_LABELS if c in table.columns]
    columns = [columns] if isinstance(columns, str) else list(columns)
    if not columns:
        raise ValueError("no index columns given")
    return columns


def _check_threshold(name, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def plot_index_distributions(table, path, columns=None, layers=None) -> str:
    """One panel per index column (default: those of ``INDEX_LABELS`` present), one box per layer with
    every unit as a point (NaN, i.e. dead or not computed, left out; "n/a" where a layer has none)."""
    columns = _index_columns(table, columns)
    if not columns:  # (matplotlib said "Number of columns must be a positive integer, not 0")
        raise ValueError(f"the table has none of the index columns {list(INDEX_LABELS)}: compute them first "
                         "(index.table(color=...), or neuroidx selectivity), or name columns=")
    _check_table(table, columns)
    layers = _layers(table, layers)
    fig = _figure(max(3.5, 1.0 + 0.7 * len(layers)) * len(columns), 3.6)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, column in zip(axes, columns):
        _draw_distribution(ax, table, layers, column)
    return _save(fig, path)


def plot_selective_share(table, path, color_threshold: float = 0.25, class_threshold: float = 0.5,
                         class_column: str = "class_selectivity", layers=None) -> str:
    """Bars per layer: the percentage of units whose color selectivity exceeds ``color_threshold`` and whose
    ``class_column`` (gamma, or "class_selectivity_morcos") exceeds ``class_threshold``, among the units
    where that index is defined (not dead, computed)."""
    color_threshold = _check_threshold("color_threshold", color_threshold)
    class_threshold = _check_threshold("class_threshold", class_threshold)
    _check_table(table, [class_column])
    layers = _layers(table, layers)
    fig = _figure(max(4.0, 1.5 + 0.9 * len(layers)), 3.6)
    _draw_shares(fig.subplots(), table, layers, color_threshold, class_threshold, class_column)
    return _save(fig, path)


def plot_layer_summary(table, path, color_threshold: float = 0.25, class_threshold: float = 0.5,
                       class_column: str = "class_selectivity", columns=None, layers=None) -> str:
    """One figure: the distribution of every index per layer (top row) and the share of color- and
    class-selective units per layer (bottom). The thresholds are parameters, not constants of the method."""
    color_threshold = _check_threshold("color_threshold", color_threshold)
    class_threshold = _check_threshold("class_threshold", class_threshold)
    columns = _index_columns(table, columns)
    _check_table(table, [*columns, class_column])
    layers = _layers(table, layers)
    panel = max(3.5, 1.0 + 0.7 * len(layers))
    fig = _figure(panel * max(len(columns), 1), 7.4)
    grid = fig.add_gridspec(2, max(len(columns), 1))
    for i, column in enumerate(columns):
        _draw_distribution(fig.add_subplot(grid[0, i]), table, layers, column)
    _draw_shares(fig.add_subplot(grid[1, :]), table, layers, color_threshold, class_threshold, class_column)
    return _save(fig, path)


def plot_all(table, folder, color_threshold: float = 0.25, class_threshold: float = 0.5,
             class_column: str = "class_selectivity", layers=None, prefix: str = "") -> list[str]:
    """Write ``layer_summary.png``, ``index_distributions.png`` and ``selective_share.png`` (each name
    preceded by ``prefix``) into ``folder``; returns their paths."""
    folder = os.fspath(folder)
    return [
        plot_layer_summary(table, os.path.join(folder, f"{prefix}layer_summary.png"), color_threshold,
                           class_threshold, class_column, layers=layers),
        plot_index_distributions(table, os.path.join(folder, f"{prefix}index_distributions.png"), layers=layers),
        plot_selective_share(table, os.path.join(folder, f"{prefix}selective_share.png"), color_threshold,
                             class_threshold, class_column, layers=layers),
    ]
