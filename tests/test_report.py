"""The static HTML report: built from a real run directory (index, Neuron Features, neuron table, ablation,
maximisation image), checked for resolving relative links, no external URL, escaping, the values it
shows, graceful degradation, rebuilds; and, when Chromium is found, rendered by a headless browser."""

import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import neuroidx_fast as nx
from neuroidx_fast.artifacts import save_features
from neuroidx_fast.outdir import OutDir, read_json, write_json
from neuroidx_fast.pipeline import _record_made
from neuroidx_fast.png import save_png
from neuroidx_fast.report import DASH, build_report, fmt
from models import ImageSet, make_model

LAYERS = ["features.2", "features.8", "classifier.2"]  # the last one gets no Neuron Features
FEATURE_LAYERS = ["features.2", "features.8"]
EVIL = "<script>alert(1)</script>"
CLASSES = [EVIL, "cat", "dog", "ship", "truck", "frog"]
VISUALIZED = ("features.8", 3)


# ------------------------------------------------------------------------------------------- HTML tree
class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag=None, cls=None, **attrs):
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and (cls is None or cls in n.attrs.get("class", "").split())
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def find(self, *args, **kwargs):
        found = self.find_all(*args, **kwargs)
        return found[0] if found else None


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.node = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, attrs, self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def parse(path) -> Node:
    builder = TreeBuilder()
    builder.feed(Path(path).read_text(encoding="utf-8"))
    builder.close()
    return builder.root


def pages(report: Path):
    return sorted(report.rglob("*.html"))


def local_target(page: Path, url: str) -> Path:
    parts = urlsplit(url)
    assert not parts.scheme and not parts.netloc, f"{page}: non-relative URL {url!r}"
    assert not url.startswith("/"), f"{page}: absolute path {url!r}"
    return (page.parent / unquote(parts.path)).resolve()


def links(page: Path):
    """Every (tag, attribute, URL) of a page that points somewhere (same-page anchors left out)."""
    found = []
    for node in parse(page).iter():
        for attr in ("href", "src"):
            url = node.attrs.get(attr)
            if url is not None and not url.startswith("#"):
                found.append((node.tag, attr, url))
    return found


# ------------------------------------------------------------------------------------------- the run
def _make_run(root: Path):
    model, data = make_model("vgg"), ImageSet(n=23, classes=len(CLASSES), seed=3)
    out = OutDir(root)
    index = nx.index_dataset(model, data, LAYERS, k=5, batch_size=8, progress=False)
    index.save(out.index)
    features = {}
    for layer in FEATURE_LAYERS:
        features[layer] = nx.neuron_features(index, layer, keep_crops=4, batch_size=8, backend="torch")
        save_features(features[layer], out)
        # recorded as `neuroidx features` records them: the report shows no file its record does not vouch for
        _record_made(out, "features", layer, {"pad": "gray", "keep": 4}, [out.features_dir(layer)])

    g = np.random.default_rng(0)
    frames = []
    for layer in FEATURE_LAYERS:
        L = index[layer]
        dead = L.dead().numpy()
        n = L.num_units
        color = g.uniform(-0.2, 1.0, n)
        color[1] = np.nan  # a value the table lacks
        top_class = g.integers(0, len(CLASSES), n)
        top_class[0] = 0  # the class whose name needs escaping
        frames.append(pd.DataFrame({
            "layer": layer, "unit": np.arange(n), "top_activation": L.values[:, 0].double().numpy(), "dead": dead,
            "mean_activation": L.mean_activation().numpy(), "color_selectivity": np.where(dead, np.nan, color),
            "class_selectivity": g.uniform(0, 1, n), "class_selectivity_morcos": g.uniform(0, 1, n),
            "top_class": top_class, "top_class_name": [CLASSES[k] for k in top_class],
            "overall_drop": g.uniform(0, 0.2, n)}))
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(out.table_csv, index=False)

    n8 = index["features.8"].num_units
    drops = pd.DataFrame(g.uniform(-0.05, 0.5, (n8, len(CLASSES))), columns=CLASSES)
    drops.insert(0, "unit", np.arange(n8))
    out.ablation_classes_csv("features.8").parent.mkdir(parents=True, exist_ok=True)
    drops.to_csv(out.ablation_classes_csv("features.8"), index=False)
    matrix = drops[CLASSES].to_numpy()
    pd.DataFrame({"unit": np.arange(n8), "overall_drop": matrix.mean(1), "max_class_drop": matrix.max(1),
                  "max_drop_class": matrix.argmax(1), "max_drop_class_name": [CLASSES[i] for i in matrix.argmax(1)]}
                 ).to_csv(out.ablation_csv("features.8"), index=False)
    _record_made(out, "ablation", "features.8", {"mode": "zero"},  # complete: as `neuroidx ablate` records it
                 [out.ablation_csv("features.8"), out.ablation_classes_csv("features.8")])

    save_png(torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(1)), out.maximized_png(*VISUALIZED))
    _record_made(out, "visualize", VISUALIZED[0], {"units": [VISUALIZED[1]]}, [out.maximized_png(*VISUALIZED).parent])
    save_png(Image.new("RGB", (40, 30), (200, 30, 30)), out.plots_dir / "layer_summary.png")
    write_json(out.run_json, {"model": "vgg-test", "data": "builtin:shapes", "layers": LAYERS, "k": 5,
                              "class_names": CLASSES, "labels": data.labels.tolist(), "num_images": len(data),
                              "created": "2024-01-02T03:04:05", "batch_size": 8, "pad": "gray"})
    return {"out": out, "data": data, "index": index, "features": features, "table": table, "drops": drops}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def built(run):
    return build_report(run["out"].root)


def fresh_copy(run, tmp_path) -> OutDir:
    root = tmp_path / "run"
    shutil.copytree(run["out"].root, root, ignore=shutil.ignore_patterns("report"))
    return OutDir(root)


def page_of(out: OutDir, layer: str, unit=None) -> Path:
    name = out.features_dir(layer).name
    if unit is None:
        return out.report_dir / "layers" / f"{name}.html"
    return out.report_dir / "units" / name / f"{unit}.html"


def assert_links_resolve(report: Path):
    checked = 0
    for page in pages(report):
        for tag, attr, url in links(page):
            target = local_target(page, url)
            assert target.is_file(), f"{page.relative_to(report)}: <{tag} {attr}={url!r}> points to nothing"
            checked += 1
    return checked


# ----------------------------------------------------------------------------------------------- tests
def test_pages_exist_and_every_link_resolves(run, built):
    out, index = run["out"], run["index"]
    assert built == out.report_index and built.is_file()
    assert (out.report_dir / "static" / "report.css").is_file() and (out.report_dir / "static" / "report.js").is_file()
    for layer in LAYERS:
        assert page_of(out, layer).is_file()
        for unit in range(index[layer].num_units):
            assert page_of(out, layer, unit).is_file(), (layer, unit)
    expected_pages = 1 + len(LAYERS) + sum(index[name].num_units for name in LAYERS)
    assert len(pages(out.report_dir)) == expected_pages
    assert assert_links_resolve(out.report_dir) > expected_pages * 3
    # the PNGs are referenced where they lie, not copied
    assert not list(out.report_dir.rglob("*.png"))
    nf_srcs = [n.attrs["src"] for n in parse(page_of(out, "features.8")).find_all("img", cls="nf")]
    assert [local_target(page_of(out, "features.8"), s) for s in nf_srcs] == \
        [out.nf_png("features.8", u).resolve() for u in range(16)]


def test_no_external_urls(built):
    report = built.parent
    files = [p for p in report.rglob("*") if p.is_file()]
    assert any(p.suffix == ".js" for p in files) and any(p.suffix == ".css" for p in files)
    for path in files:
        text = path.read_text(encoding="utf-8").lower()
        for bad in ("http://", "https://", "//cdn", "src=\"//", "href=\"//"):
            assert bad not in text, f"{path}: contains {bad!r}"


def test_text_is_escaped(run, tmp_path):
    out = fresh_copy(run, tmp_path)
    build_report(out.root, title="<b>bold</b> & co")
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for page in pages(out.report_dir):
        text = page.read_text(encoding="utf-8")
        assert EVIL not in text and "<b>bold</b>" not in text, page
        assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in text, page
    # the class name shows (escaped) in the summary's table, the layer's neuron table and its cards
    layer_page = page_of(out, "features.8").read_text(encoding="utf-8")
    assert layer_page.count(escaped) >= 2
    # and parsed back it is the original text
    cells = [td.text() for td in parse(page_of(out, "features.8")).find("table", id="neurons").find_all("td")]
    assert EVIL in cells


def _crops(page: Path):
    found = []
    for fig in parse(page).find_all("figure", cls="crop"):
        name = fig.find("span", cls="class-name")
        found.append({"j": int(fig.attrs["data-j"]), "src": fig.find("img").attrs["src"],
                      "value": fig.find("span", cls="value").text(), "id": fig.find("span", cls="image-id").text(),
                      "class": None if name is None else name.text()})
    return found


def test_unit_page_crops_values_and_classes(run, built):
    out, data, feats = run["out"], run["data"], run["features"]["features.8"]
    live = [u for u in range(feats.units.numel()) if not bool(feats.dead[u])]
    assert live, "the test model has no live unit in features.8"
    labels = data.labels.tolist()
    for unit in live[:4]:
        page = page_of(out, "features.8", unit)
        crops = _crops(page)
        ids, values = feats.crop_ids[unit].tolist(), feats.crop_values[unit].tolist()
        expected = [j for j, i in enumerate(ids) if i >= 0]
        assert [c["j"] for c in crops] == expected and len(expected) == 4
        for crop in crops:
            j = crop["j"]
            assert math.isclose(float(crop["value"]), values[j], rel_tol=1e-3, abs_tol=1e-6), (unit, j)
            assert crop["id"] == f"#{ids[j]}"
            assert crop["class"] == CLASSES[labels[ids[j]]]
            assert local_target(page, crop["src"]) == out.crop_png("features.8", unit, j).resolve()
        # values are shown best first
        shown = [float(c["value"]) for c in crops]
        assert shown == sorted(shown, reverse=True)


def test_unit_page_visualize_ablation_and_navigation(run, built):
    out, drops = run["out"], run["drops"]
    layer, unit = VISUALIZED
    page = page_of(out, layer, unit)
    tree = parse(page)
    srcs = [local_target(page, img.attrs["src"]) for img in tree.find_all("img", cls="big")]
    assert out.maximized_png(layer, unit).resolve() in srcs and out.nf_png(layer, unit).resolve() in srcs
    rows = [[td.text() for td in tr.find_all("td")] for tr in tree.find("table", cls="drops").find_all("tr")][1:]
    row = drops[drops["unit"] == unit].iloc[0][CLASSES].astype(float)
    best = row.sort_values(ascending=False).index.tolist()[:5]
    assert [r[0] for r in rows] == best and len(rows) == 5
    assert all(math.isclose(float(r[1]), row[name], rel_tol=1e-3) for r, name in zip(rows, best))
    assert tree.find("a", rel="prev").attrs["href"] == f"{unit - 1}.html"
    assert tree.find("a", rel="next").attrs["href"] == f"{unit + 1}.html"
    assert tree.find("nav", cls="pager").find_all("a")[1].attrs["href"].endswith("layers/features.8.html")
    # another unit of the layer has no maximisation image: the page says which subcommand makes one
    other = page_of(out, layer, unit + 1).read_text(encoding="utf-8")
    assert "neuroidx visualize" in other
    assert "neuroidx visualize" not in page.read_text(encoding="utf-8")
    first, last = parse(page_of(out, layer, 0)), parse(page_of(out, layer, 15))
    assert first.find("a", rel="prev") is None and last.find("a", rel="next") is None


def test_layer_page_cards_and_table(run, built):
    out, index, table = run["out"], run["index"], run["table"]
    layer = "features.8"
    tree = parse(page_of(out, layer))
    cards = tree.find_all("a", cls="card")
    dead = index[layer].dead().tolist()
    assert len(cards) == 16 and [int(c.attrs["data-card-unit"]) for c in cards] == list(range(16))
    assert ["dead" in c.attrs["class"].split() for c in cards] == dead
    assert [c.attrs["href"] for c in cards] == [f"../units/features.8/{u}.html" for u in range(16)]
    # unit 1 lacks a color value: shown as a dash, not as 0 or nan
    assert f"color {DASH}" in cards[1].text() and "nan" not in cards[1].text().lower()
    neurons = tree.find("table", id="neurons")
    headers = [th.text() for th in neurons.find("thead").find_all("th")]
    assert headers == [c for c in table.columns if c != "layer"]  # ablation columns included
    kinds = {th.attrs["data-name"]: th.attrs["data-type"] for th in neurons.find("thead").find_all("th")}
    assert kinds["color_selectivity"] == "num" and kinds["top_class_name"] == "text"
    rows = neurons.find("tbody").find_all("tr")
    assert [int(r.attrs["data-unit"]) for r in rows] == list(range(16))
    assert [r.attrs.get("data-dead") == "1" for r in rows] == dead
    col = headers.index("color_selectivity")
    expected = table[table["layer"] == layer]["color_selectivity"].tolist()
    for r, value in zip(rows, expected):
        cell = r.find_all("td")[col]
        key = cell.attrs.get("data-sort", cell.text())  # what the JS sorts and filters by
        assert (key == DASH) if math.isnan(value) else math.isclose(float(key), value, rel_tol=1e-8)
    names = [i.attrs["data-name"] for i in tree.find_all("input", cls="f-min")]
    assert "color_selectivity" in names and "overall_drop" in names
    assert tree.find("input", cls="f-text") is not None and tree.find("input", cls="f-live") is not None


def test_index_page_summary(run, built):
    tree = parse(built)
    rows = {tr.find("th").text(): tr.find("td").text() for tr in tree.find("table", cls="summary").find_all("tr")}
    assert rows["model"] == "vgg-test" and rows["data"] == "builtin:shapes" and rows["k"] == "5"
    assert rows["num_images"] == "23" and rows["layers"] == ", ".join(LAYERS) and rows["classes"] == "6"
    assert rows["batch_size"] == "8" and rows["pad"] == "gray"  # other settings, as key / value
    hrefs = [a.attrs["href"] for a in tree.find("table", cls="layers").find_all("a")]
    assert hrefs == ["layers/features.2.html", "layers/features.8.html", "layers/classifier.2.html"]
    plot = tree.find("div", cls="plots").find("img")
    assert local_target(built, plot.attrs["src"]) == (run["out"].plots_dir / "layer_summary.png").resolve()


def test_layer_without_features_says_so(run, built):
    out = run["out"]
    text = page_of(out, "classifier.2").read_text(encoding="utf-8")
    assert "neuroidx features" in text and "neuroidx selectivity" in text  # no NFs, no table rows
    tree = parse(page_of(out, "classifier.2"))
    assert len(tree.find_all("a", cls="card")) == 10 and not tree.find_all("img")
    # its unit pages still list the index's top images (no crops)
    unit_page = parse(page_of(out, "classifier.2", 0))
    top = run["index"]["classifier.2"].top(0)
    rows = unit_page.find("table", cls="topk").find("tbody").find_all("tr")
    assert len(rows) == len(top) and not unit_page.find_all("figure", cls="crop")
    assert [r.find_all("td")[2].text() for r in rows] == [f"#{i}" for _, i, _, _ in top]
    assert "neuroidx features" in page_of(out, "classifier.2", 0).read_text(encoding="utf-8")


def _layer_intro(page: Path) -> str:
    """The layer page's line under its title: unit count and receptive field."""
    return " ".join(parse(page).find("main").find("p").text().split())


def test_whole_image_layer_shows_no_stride(run, tmp_path):
    out = fresh_copy(run, tmp_path)
    features = nx.neuron_features(run["index"], "classifier.2", keep_crops=2, batch_size=8, backend="torch")
    assert features.rf.whole_image  # a fully connected layer: rf.json says stride [0, 0], whole_image true
    save_features(features, out)
    _record_made(out, "features", "classifier.2", {"pad": "gray", "keep": 2}, [out.features_dir("classifier.2")])
    assert read_json(out.rf_json("classifier.2"))["stride"] == [0, 0]
    build_report(out.root)
    h, w = features.rf.size
    intro = _layer_intro(page_of(out, "classifier.2"))
    assert f"receptive field: the whole image ({h}\u00d7{w} px)" in intro, intro
    assert "stride" not in intro, intro
    # a convolutional layer still shows its receptive field's size and stride
    rf8 = read_json(out.rf_json("features.8"))
    intro8 = _layer_intro(page_of(out, "features.8"))
    assert f"receptive field {rf8['size'][0]}\u00d7{rf8['size'][1]} px, stride " \
        f"{rf8['stride'][0]}\u00d7{rf8['stride'][1]}" in intro8 and "whole image" not in intro8, intro8


def _with_class_sentinels(run, tmp_path):
    """A copy of the run whose neuron table gives features.8's dead units (and unit 1) top_class -1, as
    `neuroidx selectivity` writes for a unit with no top class, and whose ablation gives unit 1
    max_drop_class -1; returns (out, the units with top_class -1)."""
    out = fresh_copy(run, tmp_path)
    table = pd.read_csv(out.table_csv)
    rows8 = table["layer"] == "features.8"
    sentinel = sorted(set(table[rows8 & table["dead"]]["unit"].tolist()) | {1})
    where = rows8 & table["unit"].isin(sentinel)
    table.loc[where, "top_class"] = -1
    table.loc[where, "top_class_name"] = np.nan
    table.to_csv(out.table_csv, index=False)
    ablation = pd.read_csv(out.ablation_csv("features.8"))
    ablation.loc[ablation["unit"] == 1, "max_drop_class"] = -1
    ablation.loc[ablation["unit"] == 1, "max_drop_class_name"] = np.nan
    ablation.to_csv(out.ablation_csv("features.8"), index=False)
    _record_made(out, "ablation", "features.8", {"mode": "zero"},  # as `neuroidx ablate` would write them
                 [out.ablation_csv("features.8"), out.ablation_classes_csv("features.8")])
    return out, sentinel


def test_class_sentinel_is_shown_and_sorted_as_missing(run, tmp_path):
    out, sentinel = _with_class_sentinels(run, tmp_path)
    build_report(out.root)
    table = run["table"]
    top_class = table[table["layer"] == "features.8"]["top_class"].tolist()
    # the layer's neuron table: a dash, sorted as missing (no key of -1), like a NaN
    neurons = parse(page_of(out, "features.8")).find("table", id="neurons")
    headers = [th.attrs["data-name"] for th in neurons.find("thead").find_all("th")]
    col = headers.index("top_class")
    for row in neurons.find("tbody").find_all("tr"):
        unit = int(row.attrs["data-unit"])
        cell = row.find_all("td")[col]
        key = cell.attrs.get("data-sort", cell.text())  # what the JS sorts and filters by
        if unit in sentinel:
            assert cell.text() == DASH and key == DASH, (unit, cell.text(), key)
        else:
            assert cell.text() == str(top_class[unit]) and key == str(top_class[unit]), (unit, cell.text())
    # the unit page: every column of the neuron table, and the ablation values
    unit_page = parse(page_of(out, "features.8", 1))
    details = {tr.find("th").text(): tr.find("td").text()
               for tr in unit_page.find("table", cls="summary").find_all("tr")}
    assert details["top_class"] == DASH and details["top_class_name"] == DASH, details
    ablation = {d.find("dt").text(): d.find("dd").text()
                for d in unit_page.find_all("dl", cls="values")[1].find_all("div")}
    assert ablation["max_drop_class"] == DASH and ablation["max_drop_class_name"] == DASH, ablation
    assert "-1" not in details.values() and "-1" not in ablation.values()
    # a unit with a class keeps its number
    live = parse(page_of(out, "features.8", 2)).find("table", cls="summary")
    assert {tr.find("th").text(): tr.find("td").text() for tr in live.find_all("tr")}["top_class"] == \
        str(top_class[2])


def test_missing_parts_degrade_with_hints(run, tmp_path):
    out = fresh_copy(run, tmp_path)
    out.table_csv.unlink()
    shutil.rmtree(out.root / "ablation")
    shutil.rmtree(out.root / "visualize")
    shutil.rmtree(out.plots_dir)
    shutil.rmtree(out.features_dir("features.2"))
    settings = read_json(out.run_json)
    del settings["labels"]
    write_json(out.run_json, settings)
    build_report(out.root)
    assert_links_resolve(out.report_dir)
    index_text = out.report_index.read_text(encoding="utf-8")
    assert "neuroidx selectivity" in index_text  # neither table nor plots
    assert "neuroidx features" in page_of(out, "features.2").read_text(encoding="utf-8")
    layer8 = page_of(out, "features.8").read_text(encoding="utf-8")
    assert "neuroidx selectivity" in layer8 and "neuroidx features" not in layer8.split("<h2>Neuron Features")[1] \
        .split("<h2>")[0]
    assert parse(page_of(out, "features.8")).find("table", id="neurons") is None
    unit = next(u for u in range(16) if not bool(run["features"]["features.8"].dead[u]))
    text = page_of(out, "features.8", unit).read_text(encoding="utf-8")
    for command in ("neuroidx ablate", "neuroidx visualize", "neuroidx selectivity"):
        assert command in text, command
    assert DASH in parse(page_of(out, "features.8", unit)).find("dl", cls="values").text()
    crops = _crops(page_of(out, "features.8", unit))
    assert crops and all(c["class"] is None for c in crops)  # without labels: the image id only
    # a unit of the layer whose features are gone: no crops, the hint instead
    text2 = page_of(out, "features.2", 0).read_text(encoding="utf-8")
    assert "neuroidx features" in text2 and not _crops(page_of(out, "features.2", 0))


def test_sort_keys_are_what_javascript_parses():
    from neuroidx_fast.report import _sort_key

    assert [_sort_key(v) for v in (float("inf"), float("-inf"), float("nan"), 0.25, 3, True, None, "a")] == \
        ["Infinity", "-Infinity", "", "0.25", "3", "1", "", "a"]


def test_not_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neuroidx index"):
        build_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run.json"):
        build_report(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_report(tmp_path / "broken")
    (tmp_path / "nolayers").mkdir()
    write_json(tmp_path / "nolayers" / "run.json", {"model": "m"})
    with pytest.raises(ValueError, match=r"run.json is not a run's record \(no data, layers\).*--force"):
        build_report(tmp_path / "nolayers")
    write_json(tmp_path / "nolayers" / "run.json", [])
    with pytest.raises(ValueError, match=r"not a run's record \(no model, data, layers\)"):
        build_report(tmp_path / "nolayers")


def test_an_interrupted_rebuild_leaves_the_old_report_whole(run, tmp_path, monkeypatch):
    import neuroidx_fast.report as report_module

    out = fresh_copy(run, tmp_path)
    build_report(out.root)
    before = {p: p.read_bytes() for p in out.report_dir.rglob("*") if p.is_file()}
    table = pd.read_csv(out.table_csv)
    table["color_selectivity"] *= 10  # every page showing it would change
    table.to_csv(out.table_csv, index=False)
    (out.root / "report.tmp-killed").mkdir()  # what a build killed earlier left
    write = report_module._write_text
    pages = []

    def interrupted(path, text):
        pages.append(path)
        if len(pages) == 6:
            raise KeyboardInterrupt
        write(path, text)

    monkeypatch.setattr(report_module, "_write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_report(out.root)
    assert {p: p.read_bytes() for p in out.report_dir.rglob("*") if p.is_file()} == before  # its 5 new pages went elsewhere
    assert sorted(p.name for p in out.root.iterdir() if p.name.startswith("report")) == ["report", "report.tmp-killed"]
    monkeypatch.setattr(report_module, "_write_text", write)
    build_report(out.root)
    assert {p: p.read_bytes() for p in out.report_dir.rglob("*") if p.is_file()} != before
    assert sorted(p.name for p in out.root.iterdir() if p.name.startswith("report")) == ["report"]
    assert oct(out.report_dir.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_rebuild_over_an_old_report(run, tmp_path):
    out = fresh_copy(run, tmp_path)
    build_report(out.root)
    stale_layer = out.report_dir / "layers" / "gone.html"
    stale_unit = out.report_dir / "units" / "gone" / "1.html"
    stale_layer.write_text("old")
    stale_unit.parent.mkdir()
    stale_unit.write_text("old")
    (out.report_dir / "layers" / "features.8.html").write_text("half a page")
    (out.report_dir / "units" / "features.8" / "99.html").write_text("a unit that no longer exists")
    build_report(out.root)
    assert not stale_layer.exists() and not stale_unit.parent.exists()
    assert not (out.report_dir / "units" / "features.8" / "99.html").exists()
    assert "half a page" not in (out.report_dir / "layers" / "features.8.html").read_text(encoding="utf-8")
    assert not [p for p in out.report_dir.rglob(".tmp-*")]
    assert_links_resolve(out.report_dir)


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_concurrent_builds_of_one_report_both_finish_whole(run, tmp_path, monkeypatch):
    # before, a build made its report.tmp-* folder outside the writer lock: another build of the same report
    # that swapped its own in meanwhile deleted that folder as the leftover of a killed build, and the first
    # then failed or shipped the pages it wrote after (a report without its first pages)
    import fcntl
    import tempfile
    import threading

    import neuroidx_fast.report as report_module

    out = fresh_copy(run, tmp_path)
    build_report(out.root)
    whole = _files(out.report_dir)
    write, mkdtemp, flock = report_module._write_text, tempfile.mkdtemp, fcntl.flock
    started = set()  # the builds that made their report.tmp- folder
    first_paused, go_on = threading.Event(), threading.Event()

    def making(*args, **kwargs):
        folder = mkdtemp(*args, **kwargs)
        if os.path.basename(folder).startswith("report.tmp-"):
            started.add(threading.current_thread().name)
        return folder

    def locking(fd, operation):
        # the second build waits for the lock before it makes its folder: the first, which holds the lock,
        # goes on then (the first waits for the second below: without the lock, until it is done)
        if threading.current_thread().name == "second" and "second" not in started:
            go_on.set()
        return flock(fd, operation)

    def writing(path, text):
        write(path, text)
        if threading.current_thread().name == "first" and not first_paused.is_set():
            first_paused.set()  # its first page written: the second build starts now
            assert go_on.wait(60)

    monkeypatch.setattr(tempfile, "mkdtemp", making)
    monkeypatch.setattr(fcntl, "flock", locking)
    monkeypatch.setattr(report_module, "_write_text", writing)
    errors = []

    def build(name):
        try:
            build_report(out.root)
        except BaseException as exc:  # (said by the assertion below)
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            (first_paused if name == "first" else go_on).set()

    threads = [threading.Thread(target=build, args=(name,), name=name) for name in ("first", "second")]
    threads[0].start()
    assert first_paused.wait(60)
    threads[1].start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads) and started == {"first", "second"}
    assert errors == []
    assert _files(out.report_dir) == whole  # one complete report, every page of it
    assert sorted(p.name for p in out.root.iterdir() if "report" in p.name) == ["report"]  # no leftovers


def _notes(out: OutDir) -> list[str]:
    """The notes at the top of the report's index page (and its other "missing" lines)."""
    return [" ".join(p.text().split()) for p in parse(out.report_index).find_all("p", cls="missing")]


def _note(out: OutDir, *parts) -> str:
    found = [note for note in _notes(out) if all(part in note for part in parts)]
    assert len(found) == 1, (parts, _notes(out))
    return found[0]


def _status(out: OutDir, layer: str) -> list[str]:
    """A layer's "what the run holds" list on the index page."""
    row = [tr for tr in parse(out.report_index).find("table", cls="layers").find("tbody").find_all("tr")
           if tr.find("a").text() == layer][0]
    return [" ".join(li.text().split()) for li in row.find_all("li")]


def _same_size_edit(text: str) -> str:
    """``text`` (a number) with its first digit after the point changed: the file keeps its size."""
    at = text.index(".") + 1
    return text[:at] + str((int(text[at]) + 5) % 10) + text[at + 1:]


def test_outputs_changed_since_they_were_made_are_not_shown(run, tmp_path):
    # before, the report read a layer's features file, ablation CSVs and PNGs without their step's record
    # (each file's size and SHA-256 when it was made): one cut short, edited or replaced since was shown as
    # the run's result, or as a parse failure at best
    from safetensors.torch import load_file, save_file

    out, feats = fresh_copy(run, tmp_path), run["features"]["features.8"]
    root = out.root
    unit = next(u for u in range(16) if not bool(feats.dead[u]) and int(feats.crop_ids[u, 0]) >= 0)
    # features.8: its features file replaced by one that reads fine, one crop value changed
    tensors = load_file(out.features_file("features.8"))
    tensors["crop_values"][unit, 0] = 987.654
    save_file(tensors, out.features_file("features.8"))
    # its ablation CSV with one number changed, the file as long as before (only the checksum tells)
    path = out.ablation_csv("features.8")
    lines = path.read_text().splitlines(keepends=True)
    cells = lines[1 + 2].split(",")  # unit 2's row: unit, overall_drop, ...
    assert cells[0] == "2"
    cells[1] = _same_size_edit(cells[1])
    changed = float(cells[1])
    lines[1 + 2] = ",".join(cells)
    size = path.stat().st_size
    path.write_text("".join(lines))
    assert path.stat().st_size == size
    # features.2: one crop PNG cut short; features.8's maximisation image replaced
    crop = out.crop_png("features.2", 0, 0)
    whole_crop = crop.stat().st_size
    os.truncate(crop, 40)
    save_png(torch.zeros(3, 20, 20), out.maximized_png(*VISUALIZED))
    build_report(root)

    # the notes name the file, what differs from its record, and the command that remakes it
    note = _note(out, "features/features.8/features.safetensors")
    assert "recorded when it was made" in note and "features.8's Neuron Features are not shown" in note
    assert note.endswith(f"run `neuroidx features --out {root} --layers features.8` to remake them")
    note = _note(out, "ablation/features.8.csv")
    assert "ablation/features.8.csv does not match its checksum recorded when it was made" in note
    assert note.endswith(f"run `neuroidx ablate --out {root} --layers features.8` to remake them")
    note = _note(out, "features/features.2/crops/0_0.png")
    assert f"crops/0_0.png is 40 bytes, not {whole_crop} recorded when it was made" in note
    assert note.endswith(f"run `neuroidx features --out {root} --layers features.2` to remake them")
    note = _note(out, "visualize/features.8/3.png")
    assert note.endswith(f"run `neuroidx visualize --out {root} --layers features.8` to remake them")
    # and the steps are shown as not made: none of their numbers or images
    assert _status(out, "features.8") == ["no features (neuroidx features)", "neuron table",
                                          "no ablation (neuroidx ablate)",
                                          "no maximisation images (neuroidx visualize)"]
    assert _status(out, "features.2")[0] == "no features (neuroidx features)"
    assert _status(out, "classifier.2")[0] == "no features (neuroidx features)"  # (none made: no note)
    assert not any("classifier.2" in n for n in _notes(out))
    for layer in FEATURE_LAYERS:
        page = page_of(out, layer)
        assert not parse(page).find_all("img"), layer  # no NF, no grid
        assert "are not shown" in page.read_text(encoding="utf-8")
    unit_page = page_of(out, "features.8", unit)
    assert not _crops(unit_page) and "987.7" not in unit_page.read_text(encoding="utf-8")
    assert not parse(unit_page).find_all("img")
    assert not _crops(page_of(out, "features.2", 0))
    page = page_of(out, "features.8", 2)
    text = page.read_text(encoding="utf-8")
    assert parse(page).find("table", cls="drops") is None and fmt(changed) not in text
    assert "ablation/features.8.csv does not match its checksum" in text
    # nor neurons.csv's copy of the layer's ablation columns (another layer's stay)
    table = pd.read_csv(out.table_csv)
    shown = table[(table["layer"] == "features.8") & (table["unit"] == 2)]["overall_drop"].iloc[0]
    assert fmt(shown) not in text
    other = table[(table["layer"] == "features.2") & (table["unit"] == 0)]["overall_drop"].iloc[0]
    assert fmt(other) in page_of(out, "features.2", 0).read_text(encoding="utf-8")
    assert not parse(page_of(out, *VISUALIZED)).find_all("img")
    assert_links_resolve(out.report_dir)


def test_outputs_nothing_vouches_for_are_shown_as_found(run, tmp_path):
    """Features or maximisation images without a record (saved through the Python API, or by a version
    before the records) and steps whose record holds no checksums (an earlier version) are shown as
    reports showed them before, with no note; ablation files without a record are not (an interrupted
    remake leaves new files beside the old); nor is a file a checked record does not list."""
    out = fresh_copy(run, tmp_path)
    root = out.root
    out.step_record("features", "features.8").unlink()
    out.step_record("ablation", "features.8").unlink()
    record = read_json(out.step_record("features", "features.2"))
    write_json(out.step_record("features", "features.2"), {"settings": record["settings"], "files": record["files"]})
    save_png(torch.zeros(3, 20, 20), out.maximized_png("features.8", 5))  # not in visualize's record
    build_report(root)
    assert _notes(out) == []
    assert _status(out, "features.8") == ["features", "neuron table", "no ablation (neuroidx ablate)",
                                          "maximisation images"]
    assert _status(out, "features.2")[0] == "features"
    assert _crops(page_of(out, "features.8", 3)) and _crops(page_of(out, "features.2", 0))
    assert parse(page_of(out, "features.8", 3)).find("table", cls="drops") is None
    # the maximisation image its record lists is shown; the one it does not, not
    srcs = [local_target(page_of(out, "features.8", 3), img.attrs["src"])
            for img in parse(page_of(out, "features.8", 3)).find_all("img")]
    assert out.maximized_png(*VISUALIZED).resolve() in srcs
    assert not any(src == out.maximized_png("features.8", 5).resolve() for src in srcs)
    assert out.maximized_png("features.8", 5).resolve() not in [
        local_target(page_of(out, "features.8", 5), img.attrs["src"])
        for img in parse(page_of(out, "features.8", 5)).find_all("img")]


def test_an_untouched_run_shows_every_output_and_no_note(run, built):
    out = run["out"]
    assert _notes(out) == []
    for layer in FEATURE_LAYERS:
        assert _status(out, layer)[0] == "features" and "are not shown" not in page_of(out, layer).read_text()
    assert _status(out, "features.8") == ["features", "neuron table", "ablation", "maximisation images"]


# -------------------------------------------------------------------------------------------- browser
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser(binary, tmp_path, *args, timeout=60):
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.browser
def test_layer_page_in_headless_chromium(run, built, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found on PATH (chromium, chromium-browser, google-chrome)")
    out, table = run["out"], run["table"]
    page = page_of(out, "features.8").resolve()
    url = page.as_uri() + "#sort=color_selectivity&desc=1&hidedead=1"
    done = _browser(binary, tmp_path, "--virtual-time-budget=5000", "--dump-dom", url)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = TreeBuilder()
    dom.feed(done.stdout)
    body = dom.root.find("body")
    assert body is not None, done.stdout[:500]
    assert body.attrs.get("data-images-total") == "16", body.attrs
    assert body.attrs.get("data-images-loaded") == "16", body.attrs
    # the JS sorted the table by color selectivity (descending, missing last) and hid the dead units
    rows = dom.root.find("table", id="neurons").find("tbody").find_all("tr")
    rows8 = table[table["layer"] == "features.8"]
    color = rows8["color_selectivity"].tolist()
    expected = sorted(range(16), key=lambda u: (math.isnan(color[u]), -color[u] if not math.isnan(color[u]) else 0, u))
    assert [int(r.attrs["data-unit"]) for r in rows] == expected
    dead = set(rows8[rows8["dead"]]["unit"].tolist())
    assert {int(r.attrs["data-unit"]) for r in rows if "hidden" in r.attrs} == dead
    assert {int(c.attrs["data-card-unit"]) for c in dom.root.find_all("a", cls="card") if "hidden" in c.attrs} == dead
    count = dom.root.find("span", cls="f-count").text()
    assert count == f"{16 - len(dead)} of 16 units shown"

    shot = tmp_path / "shot.png"
    done = _browser(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 10


def _dump_dom(binary, tmp_path, url) -> Node:
    done = _browser(binary, tmp_path, "--virtual-time-budget=5000", "--dump-dom", url)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = TreeBuilder()
    dom.feed(done.stdout)
    assert dom.root.find("body") is not None, done.stdout[:500]
    return dom.root


@pytest.mark.browser
def test_malformed_deep_link_still_applies_in_headless_chromium(run, built, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found on PATH (chromium, chromium-browser, google-chrome)")
    page = page_of(run["out"], "features.8").resolve()
    # "5%" is no valid percent-encoding (decodeURIComponent throws): the filter is taken as written and
    # the link's other parameters still apply
    dom = _dump_dom(binary, tmp_path, page.as_uri() + "#sort=unit&desc=1&filter=5%")
    rows = dom.find("table", id="neurons").find("tbody").find_all("tr")
    assert [int(r.attrs["data-unit"]) for r in rows] == list(range(15, -1, -1))
    assert all("hidden" in r.attrs for r in rows)  # no cell holds the text "5%"
    assert dom.find("span", cls="f-count").text() == "0 of 16 units shown"
    # a valid encoding is still decoded: "%2E" is "."
    dom = _dump_dom(binary, tmp_path, page.as_uri() + "#sort=unit&desc=1&min.color_selectivity=0%2E5")
    rows = dom.find("table", id="neurons").find("tbody").find_all("tr")
    assert [int(r.attrs["data-unit"]) for r in rows] == list(range(15, -1, -1))
    color = run["table"].set_index(["layer", "unit"])["color_selectivity"]["features.8"]
    shown = {int(r.attrs["data-unit"]) for r in rows if "hidden" not in r.attrs}
    assert shown == {u for u in range(16) if color[u] >= 0.5} and 0 < len(shown) < 16


@pytest.mark.browser
def test_class_sentinel_sorts_last_in_headless_chromium(run, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found on PATH (chromium, chromium-browser, google-chrome)")
    out, sentinel = _with_class_sentinels(run, tmp_path)
    build_report(out.root)
    table = run["table"]
    top_class = table[table["layer"] == "features.8"]["top_class"].tolist()
    page = page_of(out, "features.8").resolve()
    for desc in (False, True):
        dom = _dump_dom(binary, tmp_path, page.as_uri() + f"#sort=top_class&desc={int(desc)}")
        units = [int(r.attrs["data-unit"]) for r in dom.find("table", id="neurons").find("tbody").find_all("tr")]
        # by class number (stable: by unit within one class), the units without a class last either way
        known = sorted((u for u in range(16) if u not in sentinel), key=lambda u: -top_class[u] if desc else top_class[u])
        assert units == known + sentinel, (desc, units)


def test_an_empty_integer_cell_shows_as_missing():
    """neurons.csv's max_drop_class is a nullable integer column (units not ablated: empty cells); pandas
    versions give its missing values as None or pd.NA: both show as missing and sort as such."""
    from neuroidx_fast.report import _missing, _sort_key

    for value in (None, pd.NA, float("nan")):
        assert fmt(value) == DASH and _missing(value) and _sort_key(value) == ""
    assert fmt(8) == "8" and not _missing(0)


def test_a_file_of_the_recorded_size_and_time_is_not_read_again(tmp_path):
    """Checks of a step's files read a file only where its size and modification time are not those
    recorded: gigabytes of features are not hashed at every report build or rerun."""
    from neuroidx_fast.pipeline import _differs_from, _file_check

    path = tmp_path / "drops.csv"
    path.write_text("unit,overall_drop\n0,0.25\n")
    check = _file_check(path)
    assert set(check) == {"size", "sha256", "mtime_ns"} and _differs_from(path, check) is None
    stat = path.stat()
    path.write_text("unit,overall_drop\n0,0.75\n")  # same size, new time: read, and found changed
    assert _differs_from(path, check) is not None
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # its old time back: taken as unchanged, unread
    assert _differs_from(path, check) is None
    older = {"size": check["size"], "sha256": check["sha256"]}  # a record of an earlier version: hashed
    assert _differs_from(path, older) is not None
