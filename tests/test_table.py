"""The neuron table (rows, columns, values, joins), its storage (CSV, Parquet) and the summary plots."""

import dataclasses
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import neuroidx_fast as nx
from neuroidx_fast import plots
from neuroidx_fast.neuron_index import LayerIndex, NeuronIndex
from neuroidx_fast.selectivity import class_selectivity, class_selectivity_morcos
from neuroidx_fast.table import TABLE_COLUMNS, load_table, neuron_table, save_table
from models import ImageSet, make_model

LAYERS = ["features.2", "features.8", "classifier.2"]


@pytest.fixture(scope="module")
def indexed():
    model, data = make_model("vgg"), ImageSet(n=27, classes=4, seed=4)
    index = nx.index_dataset(model, data, LAYERS, k=5, batch_size=9, progress=False)
    g = torch.Generator().manual_seed(0)
    color = {"features.2": torch.rand(8, generator=g), "features.8": torch.rand(16, generator=g) * 2 - 0.5}
    return data, index, color


def test_rows_columns_and_values(indexed):
    data, index, color = indexed
    df = neuron_table(index, color=color, labels=data, tau=0.5)
    assert tuple(df.columns) == TABLE_COLUMNS
    assert len(df) == 8 + 16 + 10
    assert df["layer"].tolist() == ["features.2"] * 8 + ["features.8"] * 16 + ["classifier.2"] * 10
    assert df["unit"].tolist() == list(range(8)) + list(range(16)) + list(range(10))
    assert df["unit"].dtype == np.int64 and df["top_class"].dtype == np.int64 and df["dead"].dtype == bool
    for column in ("top_activation", "mean_activation", "color_selectivity", "class_selectivity",
                   "class_selectivity_morcos"):
        assert df[column].dtype == np.float64, column
    for name in LAYERS:
        rows = df[df["layer"] == name]
        layer = index[name]
        dead = layer.dead().numpy()
        assert np.array_equal(rows["dead"].to_numpy(), dead)
        assert np.array_equal(rows["top_activation"].to_numpy(), layer.values[:, 0].double().numpy())
        assert np.allclose(rows["mean_activation"].to_numpy(), layer.mean_activation().numpy())
        gamma = class_selectivity(index, name, tau=0.5, labels=data.labels).numpy()
        assert np.array_equal(np.isnan(rows["class_selectivity"].to_numpy()), np.isnan(gamma))
        assert np.allclose(rows["class_selectivity"].to_numpy()[~np.isnan(gamma)], gamma[~np.isnan(gamma)])
        si, top = class_selectivity_morcos(index, name)
        assert np.allclose(rows["class_selectivity_morcos"].to_numpy(), si.numpy(), equal_nan=True)
        assert rows["top_class"].tolist() == top.tolist()
        names = [None if k < 0 else data.classes[k] for k in top.tolist()]
        assert [None if pd.isna(n) else n for n in rows["top_class_name"]] == names
        alpha = rows["color_selectivity"].to_numpy()
        if name in color:
            expected = np.where(dead, np.nan, color[name].double().numpy())
            assert np.allclose(alpha, expected, equal_nan=True)
        else:
            assert np.isnan(alpha).all()
        # dead units: NaN in every index column
        for column in ("color_selectivity", "class_selectivity", "class_selectivity_morcos"):
            assert rows.loc[rows["dead"], column].isna().all()
    assert df["dead"].any() and not df["dead"].all()


def test_query(indexed):
    data, index, color = indexed
    df = neuron_table(index, color=color, labels=data.labels)
    chosen = df.query("layer == 'features.8' and color_selectivity > 0.5")
    expected = [u for u in range(16) if not bool(index["features.8"].dead()[u]) and float(color["features.8"][u]) > 0.5]
    assert chosen["unit"].tolist() == expected and len(expected) > 0
    assert len(df.query("not dead and class_selectivity >= 0")) == int((~df["dead"]).sum())


def test_layers_subset_and_missing_inputs(indexed):
    data, index, _ = indexed
    df = neuron_table(index, layers="features.8")
    assert set(df["layer"]) == {"features.8"} and len(df) == 16
    # gamma from the labels the index recorded
    given = neuron_table(index, layers="features.8", labels=data.labels)
    pd.testing.assert_series_equal(df["class_selectivity"], given["class_selectivity"])
    assert df.loc[~df["dead"], "class_selectivity"].notna().all()
    df = neuron_table(dataclasses.replace(index, labels=None), layers="features.8")
    assert df["class_selectivity"].isna().all()  # no labels anywhere: gamma not computed
    assert df["color_selectivity"].isna().all()
    assert df.loc[~df["dead"], "class_selectivity_morcos"].notna().all()  # class means are in the index
    with pytest.raises(KeyError, match="nope"):
        neuron_table(index, layers=["nope"])
    with pytest.raises(ValueError, match="no layers"):
        neuron_table(index, layers=[])
    with pytest.raises(ValueError, match="C = 8"):
        neuron_table(index, color={"features.2": torch.rand(5)})
    with pytest.raises(ValueError, match="not in the index"):
        neuron_table(index, color={"fc9": torch.rand(5)})
    with pytest.raises(TypeError, match="NeuronIndex"):
        neuron_table({"a": 1})


def test_index_without_labels():
    model, data = make_model("vgg"), ImageSet(n=10, labels=False)
    index = nx.index_dataset(model, data, ["features.2"], k=3, batch_size=5, progress=False)
    df = neuron_table(index)
    assert df["class_selectivity_morcos"].isna().all() and (df["top_class"] == -1).all()
    assert df["top_class_name"].isna().all()
    labelled = neuron_table(index, labels=torch.arange(10) % 2)
    assert labelled.loc[~labelled["dead"], "class_selectivity"].notna().all()


def test_extra_join(indexed):
    data, index, _ = indexed
    extra = pd.DataFrame({"layer": ["features.8", "features.8", "classifier.2"], "unit": [3, 0, 9],
                          "drop": [0.25, -0.5, 1.0]})
    other = pd.DataFrame({"layer": ["features.2"], "unit": [1], "l1_norm": [3.0]})
    df = neuron_table(index, extra=[extra, other])
    assert len(df) == 34 and list(df.columns) == list(TABLE_COLUMNS) + ["drop", "l1_norm"]
    got = df.set_index(["layer", "unit"])
    assert got.loc[("features.8", 3), "drop"] == 0.25 and got.loc[("features.8", 0), "drop"] == -0.5
    assert got.loc[("classifier.2", 9), "drop"] == 1.0 and got.loc[("features.2", 1), "l1_norm"] == 3.0
    assert df["drop"].notna().sum() == 3 and df["l1_norm"].notna().sum() == 1
    assert df["layer"].tolist() == neuron_table(index)["layer"].tolist()  # row order kept
    with pytest.raises(ValueError, match="'unit'"):
        neuron_table(index, extra=pd.DataFrame({"layer": ["features.2"], "drop": [1.0]}))
    with pytest.raises(ValueError, match="dead"):
        neuron_table(index, extra=pd.DataFrame({"layer": ["features.2"], "unit": [0], "dead": [True]}))
    with pytest.raises(ValueError, match="several rows"):
        neuron_table(index, extra=pd.DataFrame({"layer": ["features.2"] * 2, "unit": [0, 0], "x": [1, 2]}))


def test_class_indices_of_a_partial_join_stay_integers(indexed, tmp_path):
    """Ablation columns joined for some units only: max_drop_class is a class index (8, -1), not 8.0,
    in the frame, in the CSV and read back; the units without a row get an empty cell."""
    _, index, _ = indexed
    ablation = pd.DataFrame({"layer": ["features.8", "features.8"], "unit": [3, 0], "max_drop_class": [2, -1],
                             "max_class_drop": [0.5, 0.0]})
    df = neuron_table(index, extra=ablation)
    assert str(df["max_drop_class"].dtype) == "Int64" and df["max_drop_class"].isna().sum() == 32
    got = df.set_index(["layer", "unit"])["max_drop_class"]
    assert got[("features.8", 3)] == 2 and got[("features.8", 0)] == -1
    path = tmp_path / "neurons.csv"
    save_table(df, path)
    column = pd.read_csv(path, dtype=str, keep_default_na=False)["max_drop_class"].tolist()
    assert sorted(set(column)) == ["", "-1", "2"]  # not "2.0"
    back = load_table(path)
    assert str(back["max_drop_class"].dtype) == "Int64" and back["max_drop_class"].isna().sum() == 32
    # a table written as floats before (8.0), or merged by hand, is read and saved with integers too
    floats = df.astype({"max_drop_class": "float64"})
    floats.to_csv(path, index=False)
    assert str(load_table(path)["max_drop_class"].dtype) == "Int64"
    save_table(floats, path)
    assert "2.0" not in path.read_text()
    # a column that is not class indices is left alone
    odd = df.astype({"max_drop_class": "float64"}).assign(max_drop_class=0.5)
    assert load_table(save_table(odd, tmp_path / "odd.csv"))["max_drop_class"].dtype == np.float64


def _tricky_index():
    """Layer names and class names that CSV readers like to misread ("3" as a number, "NA" as missing)."""
    values = torch.tensor([[2.0, 1.0], [0.0, 0.0], [3.0, 2.5]])
    ids = torch.tensor([[0, 1], [0, 1], [2, 3]])
    layer = LayerIndex("3", values, ids, torch.zeros_like(ids), (1, 1), 4, torch.tensor([1.0, 0.0, 2.5]).double(),
                       torch.tensor([[1.0, 0.0, 4.0], [2.0, 0.0, 6.0]]).double(), torch.tensor([2, 2]))
    return NeuronIndex({"3": layer}, k=2, dataset_length=4, class_names=["NA", "None"])


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_save_load_round_trip(indexed, tmp_path, ext):
    data, index, color = indexed
    extra = pd.DataFrame({"layer": ["features.8"], "unit": [2], "drop": [0.5]})
    for df in (neuron_table(index, color=color, labels=data, extra=extra), neuron_table(_tricky_index())):
        path = tmp_path / f"table.{ext}"
        assert save_table(df, path) == str(path)
        back = load_table(path)
        pd.testing.assert_frame_equal(back, df, check_dtype=False)
        for column in ("unit", "top_class", "dead", "mean_activation"):
            assert back[column].dtype == df[column].dtype
        assert back["layer"].map(type).eq(str).all()
        assert sorted(os.listdir(tmp_path)) == [f"table.{ext}"]  # no temporary file left
    assert load_table(path)["top_class_name"].tolist()[0] in ("NA", "None")


def test_a_foreign_or_corrupt_parquet_file_is_not_a_neuron_table(tmp_path):
    # the CSV path checked both; Parquet returned any frame, or raised pyarrow's own error
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "foreign.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    for name, why in (("foreign", "no layer and unit columns"), ("corrupt", "ArrowInvalid|ValueError|OSError")):
        with pytest.raises(ValueError, match=rf"{name}.parquet is not a neuron table \(({why})"):
            load_table(tmp_path / f"{name}.parquet")


def test_class_names_that_look_like_numbers_stay_text(tmp_path):
    # e.g. GTSRB's folders 00000, 00001, ...: the ablation columns joined into the table too
    df = pd.DataFrame({"layer": ["3"], "unit": [0], "top_class_name": ["00"], "max_drop_class_name": ["007"],
                       "max_class_drop": [0.5]})
    save_table(df, tmp_path / "t.csv")
    back = load_table(tmp_path / "t.csv")
    assert back.loc[0, ["layer", "top_class_name", "max_drop_class_name"]].tolist() == ["3", "00", "007"]


def test_save_errors(indexed, tmp_path, monkeypatch):
    _, index, _ = indexed
    df = neuron_table(index)
    with pytest.raises(ValueError, match=".parquet or .csv"):
        save_table(df, tmp_path / "table.xlsx")
    with pytest.raises(TypeError, match="DataFrame"):
        save_table({"a": [1]}, tmp_path / "table.csv")
    with pytest.raises(FileNotFoundError):
        load_table(tmp_path / "missing.csv")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(ImportError, match="pyarrow"):
        save_table(df, tmp_path / "table.parquet")
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------- plots
def _check_png(path):
    assert os.path.getsize(path) > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width > 100 and image.height > 100
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 5  # something was drawn


def test_plots_write_pngs(indexed, tmp_path):
    data, index, color = indexed
    df = neuron_table(index, color=color, labels=data)
    summary = plots.plot_layer_summary(df, tmp_path / "summary.png", color_threshold=0.3, class_threshold=0.6)
    assert summary == str(tmp_path / "summary.png")
    paths = plots.plot_all(df, tmp_path / "figs", prefix="run1_")
    assert [os.path.basename(p) for p in paths] == ["run1_layer_summary.png", "run1_index_distributions.png",
                                                     "run1_selective_share.png"]
    for path in [summary, *paths]:
        _check_png(path)
    _check_png(plots.plot_selective_share(df, tmp_path / "morcos.png", class_column="class_selectivity_morcos",
                                          layers=["features.8"]))
    _check_png(plots.plot_index_distributions(neuron_table(index), tmp_path / "nan.png"))  # all-NaN columns
    dollars = df.assign(layer=df["layer"].astype(str) + r"$\x$")  # a pair of '$' is mathematics to matplotlib
    _check_png(plots.plot_index_distributions(dollars, tmp_path / "dollars.png"))
    assert sorted(os.listdir(tmp_path)) == ["dollars.png", "figs", "morcos.png", "nan.png", "summary.png"]


def test_the_share_legend_covers_no_bar_or_label():
    table = pd.DataFrame({"layer": ["a"] * 2 + ["b"] * 2, "unit": [0, 1, 0, 1], "color_selectivity": [0.9] * 4,
                          "class_selectivity": [0.9] * 4})  # every bar at 100%, with its "100%" label above
    fig = plots._figure(4.0, 3.6)
    ax = fig.subplots()
    plots._draw_shares(ax, table, ["a", "b"], 0.25, 0.5, "class_selectivity")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    covered = [artist for artist in list(ax.patches) + list(ax.texts)
               if artist.get_window_extent(renderer).overlaps(legend)]
    assert not covered
    assert legend.y1 <= ax.get_window_extent(renderer).y1  # and it stays inside the axes


def test_plot_shares_and_errors(indexed, tmp_path):
    df = pd.DataFrame({"layer": ["a"] * 4 + ["b"] * 3, "unit": [0, 1, 2, 3, 0, 1, 2],
                       "color_selectivity": [0.1, 0.5, np.nan, 0.9, np.nan, np.nan, np.nan],
                       "class_selectivity": [1.0, 0.2, 0.7, np.nan, 0.6, 0.61, 0.9]})
    assert plots._shares(df, ["a", "b"], "color_selectivity", 0.4)[0] == (2 / 3, 3)
    assert math.isnan(plots._shares(df, ["a", "b"], "color_selectivity", 0.4)[1][0])
    assert plots._shares(df, ["a", "b"], "class_selectivity", 0.6) == [(2 / 3, 3), (2 / 3, 3)]
    with pytest.raises(ValueError, match=".png"):
        plots.plot_layer_summary(df, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="lacks"):
        plots.plot_selective_share(df.drop(columns="class_selectivity"), tmp_path / "x.png")
    with pytest.raises(ValueError, match="not in the table"):
        plots.plot_index_distributions(df, tmp_path / "x.png", layers=["c"])
    with pytest.raises(ValueError, match="empty"):
        plots.plot_layer_summary(df.iloc[:0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="threshold"):
        plots.plot_selective_share(df, tmp_path / "x.png", class_threshold=float("nan"))
    with pytest.raises(ValueError, match="threshold"):
        plots.plot_selective_share(df, tmp_path / "x.png", class_threshold=np.bool_(True))
    # (it failed inside matplotlib: "Number of columns must be a positive integer, not 0")
    with pytest.raises(ValueError, match="the table has none of the index columns.*compute them first"):
        plots.plot_index_distributions(df[["layer", "unit"]], tmp_path / "x.png")
    assert not os.listdir(tmp_path)
    # a summary of a table without the usual index columns is still drawn (its share panel's column named)
    custom = pd.DataFrame({"layer": ["a"] * 4, "unit": range(4), "my_si": [0.1, 0.6, 0.9, 0.2]})
    _check_png(plots.plot_layer_summary(custom, tmp_path / "custom.png", class_column="my_si"))
    # NumPy numbers are numbers (np.float32(0.5) was "must be a finite number")
    _check_png(plots.plot_selective_share(df, tmp_path / "np.png", color_threshold=np.float32(0.4),
                                          class_threshold=np.int64(0)))


def test_color_as_one_layers_tensor(indexed):
    # color_selectivity(model, index, "layer") returns a [C] tensor: `dict(color or {})` failed on it with
    # "Boolean value of Tensor with more than one value is ambiguous"
    _, index, color = indexed
    alpha = color["features.8"]
    expected = neuron_table(index, layers="features.8", color={"features.8": alpha})
    pd.testing.assert_frame_equal(neuron_table(index, layers="features.8", color=alpha), expected)
    pd.testing.assert_frame_equal(neuron_table(index, layers=["features.8"], color=alpha.numpy()), expected)
    with pytest.raises(TypeError, match=r"color must be a dict \{layer: \[C\] tensor\}.*several layers.*got a Tensor "
                                        r"of shape \(16,\)"):
        neuron_table(index, color=alpha)
    with pytest.raises(TypeError, match=r"color must be a dict .*got a list"):
        neuron_table(index, layers="features.8", color=alpha.tolist())
