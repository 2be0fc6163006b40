"""The layer explorer without a browser: its data layer, cache, figures, widgets and HTML export."""

import copy
import re
import threading

import harness
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CountingModel
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from tmlib import transforms, widgets
from tmlib.measures import GEEDInvariance, NormalizedVariance, NormalizedVarianceSE, evaluate
from tmlib.widgets.passes import FIRST as FIRST_MEASURES

N, M, ST, IMAGE = 10, 4, 6, 7  # image 7 lies in the third block of 3 samples


@pytest.fixture
def setup(small_cnn):
    torch.manual_seed(1)
    x = torch.randn(N, 1, 8, 8)
    return CountingModel(small_cnn), x, transforms.rotations(M)


@pytest.fixture
def explored(setup):
    model, x, ts = setup
    return model, x, ts, widgets.compute(model, x, ts, image=IMAGE, max_st_samples=ST, batch_size=3)


def test_compute_shapes_and_single_pass(explored):
    model, _, _, data = explored
    assert model.images == N * M == data.images_forwarded  # one pass feeds measures and pictures
    assert data.layers == ["inner.0", "inner.1", "inner.2", "inner.3", "inner.4", "inner.5", "inner.6"]
    assert data.measures == ["NV", "NV (element)", "TV", "SV", "NVSE", "TVSE", "DSES", "GEED-inv", "GEED-eq"]
    assert data.metadata["unavailable"] == {}
    assert data.st_means["inner.0"].shape == (ST, M, 4)
    assert data.st_means["inner.3"].shape == (ST, M, 6)
    assert data.st_means["inner.6"].shape == (ST, M, 5)
    assert data.maps["inner.0"].shape == (M, 4, 8, 8)
    assert data.maps["inner.2"].shape == (M, 4, 4, 4)
    assert data.maps["inner.6"].shape == (M, 5)  # no spatial dimensions: the units themselves
    assert data.inputs.shape == (M, 1, 8, 8)
    assert data.st_matrix("inner.3", 2).shape == (ST, M)
    assert data.transformation_labels == ["0°", "90°", "180°", "270°"]


def test_recorded_activations_match_a_brute_force_recompute(explored):
    model, x, ts, data = explored
    warped = ts.apply(x, fill=0.0)  # [n, m, C, H, W]
    outputs = harness.st_tensor(model, x, ts)  # the stored ST tensor, float64
    for layer in data.layers:
        out = torch.from_numpy(outputs[layer])
        means = out.mean(dim=(-2, -1)) if out.dim() == 5 else out
        np.testing.assert_allclose(data.st_means[layer], means[:ST].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(data.maps[layer], out[IMAGE].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data.inputs, warped[IMAGE].numpy(), atol=1e-6)
    # The measures equal those of a plain evaluate with the same settings.
    direct = evaluate(model, x, ts, NormalizedVariance(mode="channel"), batch_size=3, progress=False)
    nv = next(iter(direct.values()))
    for layer in data.layers:
        np.testing.assert_allclose(data.values("NV", layer), nv[layer], rtol=1e-6)


def test_channel_order_puts_invariant_first_and_nans_last(explored):
    *_, data = explored
    layer = "inner.3"
    values = np.array([0.5, np.nan, 0.1, 0.9, 0.3, 0.2])
    data.results["NV"].values[layer] = values  # a known ranking
    assert widgets.channel_order(data, "NV", layer).tolist() == [2, 5, 4, 0, 3, 1]


def test_bad_names_raise_errors_naming_the_argument(explored, setup):
    *_, data = explored
    with pytest.raises(ValueError, match="layer: unknown layer name 'nope'"):
        data.values("NV", "nope")
    with pytest.raises(ValueError, match="measure: unknown measure 'XX'"):
        data.values("XX", "inner.0")
    with pytest.raises(ValueError, match="unit: layer 'inner.0' has channels 0…3, got 4"):
        data.st_matrix("inner.0", 4)
    with pytest.raises(ValueError, match="layer: unknown layer name"):
        widgets.plot_layer_curve(data, "NV", "conv9")
    model, x, ts = setup
    with pytest.raises(ValueError, match="image: an index into the 10 samples"):
        widgets.compute(model, x, ts, image=10)
    with pytest.raises(ValueError, match="max_st_samples"):
        widgets.compute(model, x, ts, max_st_samples=1)
    with pytest.raises(ValueError, match="measures: choose from"):
        widgets.Explorer({"m": model}, {"x": x}, {"r": ts}, measures=["NV", "ANOVA"], compute=False)


def _labels(fig):
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]


def test_panel_figures_have_labelled_axes_and_the_right_data(explored):
    *_, data = explored
    layer = "inner.3"
    curve = widgets.plot_layer_curve(data, "NV", layer)
    (ax,) = curve.axes
    assert ax.get_xlabel() == "layer (forward order)" and ax.get_ylabel() == "NV (mean over channels)"
    assert [t.get_text() for t in ax.get_xticklabels()] == data.layers
    highlighted = ax.lines[-1]  # the selected layer's marker sits at its index and layer mean
    assert highlighted.get_xdata()[0] == 3
    assert highlighted.get_ydata()[0] == pytest.approx(data.results["NV"].layer_means()[layer])

    assert ax.get_ylim() == widgets.FIXED_RANGES["NV"] == (0.0, 1.4)  # NV on the papers' fixed scale

    bars = widgets.plot_channel_values(data, "NV", layer)
    (ax,) = bars.axes
    assert ax.get_xlabel() and ax.get_ylabel() == "NV (channel)" and ax.get_ylim() == (0.0, 1.4)
    heights, _ = widgets.channel_bars(bars)  # ascending: the most invariant left
    np.testing.assert_allclose(heights, np.sort(data.values("NV", layer)))
    order = widgets.channel_order(data, "NV", layer)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(c) for c in order]

    st = widgets.plot_st_matrix(data, layer, 2, measure="NV")
    ax, colorbar = st.axes
    assert ax.get_title() == f"(3) ST matrix of {layer}, channel 2 (NV = {data.values('NV', layer)[2]:.3f})"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("transformation", f"sample (first {ST} of {N})")
    assert colorbar.get_ylabel() == "mean activation"
    np.testing.assert_array_equal(ax.images[0].get_array(), data.st_matrix(layer, 2))

    maps = widgets.plot_extreme_maps(data, "NV", layer)
    assert len(maps.axes) == 2  # one row of maps side by side per channel
    order = widgets.channel_order(data, "NV", layer)
    width = data.maps[layer].shape[-1]
    for row, channel in enumerate([order[0], order[-1]]):
        strip = maps.axes[row].images[0].get_array()
        for j in range(M):  # map j, then a blank column
            np.testing.assert_array_equal(strip[:, j * (width + 1) : j * (width + 1) + width],
                                          data.maps[layer][j, channel])
        assert np.ma.getmaskarray(strip)[:, width :: width + 1].all() or np.isnan(strip[:, width :: width + 1]).all()
    assert maps.axes[0].get_title(loc="left") == "most invariant (lowest NV)"
    assert [t.get_text() for t in maps.axes[1].get_xticklabels()] == data.transformation_labels
    dense = widgets.plot_extreme_maps(data, "NV", "inner.6")  # a linear layer: one line per unit
    assert len(dense.axes) == 1 and len(dense.axes[0].lines) == 2

    inputs = widgets.plot_inputs(data)  # one mosaic: every warped input, its transformation under it
    assert len(inputs.axes) == 1 and [t.get_text() for t in inputs.axes[0].texts] == data.transformation_labels
    mosaic = inputs.axes[0].images[0].get_array()
    lo, hi = data.inputs.min(), data.inputs.max()
    h, w = data.inputs.shape[-2:]
    np.testing.assert_allclose(mosaic[:h, w + 2 : 2 * w + 2], (data.inputs[1, 0] - lo) / (hi - lo), rtol=1e-6)

    full = widgets.explorer_figure(data, "NV", layer, 2)
    assert len(full.axes) == 1 + 1 + 2 + 2 + 1 and all(x or y for x, y in _labels(full)[:1])
    png = widgets.figure_png(full)
    again = widgets.figure_png(widgets.explorer_figure(data, "NV", layer, 2))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == again  # deterministic: same data, same bytes


def test_explorer_redraws_from_the_cache_without_forwards(setup):
    model, x, ts = setup
    other = transforms.rotations(3)
    explorer = widgets.Explorer({"tiny": model}, {"random": x}, {"4 rotations": ts, "3 rotations": other},
                                n_samples=N, image=2, max_st_samples=ST, layer="inner.0")
    assert model.images == N * M and explorer.cache.computations == 1
    assert explorer.layer.options == tuple(explorer.data.layers) and explorer.layer.value == "inner.0"
    assert explorer.unit.max == 3 and explorer.progress.value == explorer.progress.max == N
    assert explorer.progress.layout.visibility == "hidden"  # idle: no "computing" bar
    assert re.fullmatch(r"computed tiny in \d+\.\d s: 10 samples × 4 transformations, 40 images .*",
                        explorer.status.value)
    panels = ("curve", "heatmap", "st", "maps", "inputs")
    before = {name: explorer.panel_png(name) for name in panels}
    assert all(len(v) > 1000 for v in before.values())

    explorer.layer.value = "inner.3"  # the layer selector's callback redraws panels 1–3
    assert model.images == N * M
    assert explorer.unit.max == 5
    now = {name: explorer.panel_png(name) for name in panels}
    assert all(now[name] != before[name] for name in ("curve", "heatmap", "st", "maps"))
    assert now["inputs"] == before["inputs"]
    # A canvas shows what the static panel function draws (the same function, the same margins).
    size = explorer.curve.figure.get_size_inches()
    assert now["heatmap"] == widgets.figure_png(widgets.plot_channel_values(
        explorer.data, "NV", "inner.3", explorer.unit.value, Figure(figsize=size), ylim=explorer.ylim()))
    assert now["curve"] == widgets.figure_png(widgets.plot_layer_curve(
        explorer.data, "NV", "inner.3", Figure(figsize=size), label="tiny", ylim=explorer.ylim()))

    explorer.select(unit=4)  # a unit redraws its marked bar and its ST matrix only
    after = {name: explorer.panel_png(name) for name in panels}
    assert after["heatmap"] != now["heatmap"] and after["st"] != now["st"] and explorer.unit.value == 4
    assert after["curve"] == now["curve"] and after["maps"] == now["maps"]
    explorer.select(measure="TV")
    assert explorer.panel_png("heatmap") != after["heatmap"] and model.images == N * M
    with pytest.raises(ValueError, match="name: one of"):
        explorer.panel_png("nope")
    with pytest.raises(ValueError, match="layer: unknown layer name"):
        explorer.select(layer="conv9")

    explorer.transformation.value = "3 rotations"  # a new selection computes once …
    assert model.images == N * M + N * 3 and explorer.cache.computations == 2
    assert explorer.layer.value == "inner.3" and explorer.data.transformation_labels == ["0°", "120°", "240°"]
    assert explorer.status.value.startswith("computed tiny in ")
    explorer.transformation.value = "4 rotations"  # … and going back is a cache hit
    assert model.images == N * M + N * 3 and explorer.cache.computations == 2
    assert explorer.status.value.startswith("from cache: 10 samples × 4 transformations")
    assert explorer.figure().axes  # the static figure of the current selection
    assert "tmlib-explorer" in explorer.widget._dom_classes and "tmlib-heatmap" in explorer.heatmap._dom_classes
    assert "tmlib-layer" in explorer.layer._dom_classes


def test_export_html_is_offline_and_inlines_every_layer(explored, tmp_path):
    *_, data = explored
    path = widgets.export_html(data, tmp_path / "report" / "explorer.html", layers=["inner.0", "inner.6"])
    html = path.read_text()
    # The overview of every measure, one section per layer, the inputs once.
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) == 1 + 2 + 1
    assert "Layer <code>inner.6</code>" in html
    # Nothing to fetch: no script, stylesheet, image or import from the network.
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', html)
    assert not re.findall(r"import [^;]*https?://|@import|<script[^>]+src=", html)
    assert not list(path.parent.glob("*.tmp*"))  # written atomically
    with pytest.raises(ValueError, match="layer: unknown layer name"):
        widgets.export_html(data, tmp_path / "x.html", layers=["nope"])


def test_every_family_that_applies_to_the_layer_is_offered(explored, setup):
    model, x, ts, data = explored
    spatial = ["inner.0", "inner.1", "inner.2", "inner.3", "inner.4"]
    for layer in data.layers:
        expected = ["NV", "NV (element)", "TV", "SV"] + (["NVSE", "TVSE", "DSES"] if layer in spatial else [])
        expected += ["GEED-inv"]
        expected += ["GEED-eq"] if layer in spatial else []
        assert data.measures_for(layer) == expected, layer
    # The same numbers as evaluate with the same measures (one pass fed them all).
    direct = evaluate(model, x, ts, {"NVSE": NormalizedVarianceSE(mode="channel"), "G": GEEDInvariance(),
                                     "NVe": NormalizedVariance(mode="element")}, batch_size=3, progress=False)
    for layer in spatial:
        np.testing.assert_allclose(data.values("NVSE", layer), direct["NVSE"][layer], rtol=1e-12)
        # Element mode: one NV per activation, shown per channel as the mean of its finite values.
        element = np.asarray(direct["NVe"][layer], dtype=float)
        assert element.shape[0] == data.channels(layer) and element.ndim == 3
        means = [np.mean(e[np.isfinite(e)]) if np.isfinite(e).any() else np.nan for e in element]
        np.testing.assert_allclose(data.values("NV (element)", layer), means, rtol=1e-12)
        assert data.per_channel("NV (element)", layer)
        assert data.results["NV (element)"].layer_means()[layer] == pytest.approx(np.mean(element[np.isfinite(element)]))
    for layer in data.layers:
        assert data.values("GEED-inv", layer) == pytest.approx([float(direct["G"][layer])], rel=1e-12)
        assert not data.per_channel("GEED-inv", layer) and data.per_channel("NV", layer)
    with pytest.raises(ValueError, match="measure: 'NVSE' is not defined for layer 'inner.6' \\(no spatial"):
        data.values("NVSE", "inner.6")
    heat = widgets.plot_channel_values(data, "GEED-inv", "inner.3", 2)  # one value per layer: one bar, unmarked
    heights, colours = widgets.channel_bars(heat)
    assert heights == pytest.approx(data.values("GEED-inv", "inner.3"))
    assert colours[0] == pytest.approx(to_rgba("tab:blue"))
    maps = widgets.plot_extreme_maps(data, "GEED-inv", "inner.3")  # channels ordered by NV instead
    order = widgets.channel_order(data, "NV", "inner.3")
    np.testing.assert_array_equal(maps.axes[0].images[0].get_array()[:, :4], data.maps["inner.3"][0, order[0]])
    # A set without the identity: the measures that need it are not offered, and say why.
    no_identity = transforms.rotations(4).subset([1, 2, 3])
    partial = widgets.compute(model, x, no_identity, max_st_samples=ST, batch_size=3)
    assert set(partial.metadata["unavailable"]) == {"DSES", "GEED-eq"}
    assert "no identity" in partial.metadata["unavailable"]["GEED-eq"]
    assert partial.measures == ["NV", "NV (element)", "TV", "SV", "NVSE", "TVSE", "GEED-inv"]


def test_explorer_measure_menu_follows_the_layer(setup):
    model, x, ts = setup
    explorer = widgets.Explorer({"tiny": model}, {"random": x}, {"4 rotations": ts}, n_samples=N, image=2,
                                max_st_samples=ST, layer="inner.3")
    assert list(explorer.measure.options) == explorer.data.measures_for("inner.3")
    explorer.select(measure="DSES")
    before = model.images
    explorer.select(layer="inner.6")  # DSES is not defined there: the menu falls back to its first entry
    assert list(explorer.measure.options) == ["NV", "NV (element)", "TV", "SV", "GEED-inv"]
    assert explorer.measure.value == "NV"
    explorer.select(measure="GEED-inv")
    assert explorer.panel_png("heatmap") == widgets.figure_png(widgets.plot_channel_values(
        explorer.data, "GEED-inv", "inner.6", explorer.unit.value, Figure(figsize=explorer.heatmap.figure.get_size_inches()),
        ylim=explorer.ylim()))
    with pytest.raises(ValueError, match="not defined for layer 'inner.6'"):
        explorer.select(measure="NVSE")
    assert model.images == before  # menus and redraws: no forward


@pytest.fixture
def two_checkpoints(small_cnn):
    torch.manual_seed(1)
    x = torch.randn(N, 1, 8, 8)
    torch.manual_seed(5)
    other = copy.deepcopy(small_cnn)  # the same architecture …
    with torch.no_grad():  # … other weights
        for parameter in other.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    models = {"untrained": CountingModel(small_cnn), "trained": CountingModel(other), "third": CountingModel(other)}
    return models, x, transforms.rotations(M)


def test_compare_overlay_draws_every_checkpoint_on_one_fixed_scale(two_checkpoints, tmp_path):
    models, x, ts = two_checkpoints
    explorer = widgets.Explorer(models, {"random": x}, {"rot": ts}, n_samples=N, max_st_samples=ST,
                                layer="inner.3", checkpoint="trained", compare="third", export_dir=tmp_path)
    assert explorer.baseline == "untrained" and explorer.overlays() == ["third", "untrained"]
    assert explorer.cache.computations == 3 and set(explorer.others) == {"third", "untrained"}
    # The curve's lines are the three checkpoints' layer means (the selection, then the overlays).
    fig = widgets.plot_layer_curve(explorer.data, "NV", "inner.3", others=explorer.others, label="trained")
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.lines}
    for label in ("trained", "third", "untrained"):
        data = explorer.data if label == "trained" else explorer.others[label]
        means = data.results["NV"].layer_means()
        np.testing.assert_allclose(lines[label].get_ydata(), means.to_numpy())
        np.testing.assert_array_equal(lines[label].get_xdata(), [data.layers.index(k) for k in means.index])
    frame = widgets.curve_frame(explorer.data, "NV", explorer.others, "trained")
    assert list(frame["label"].unique()) == ["trained", "third", "untrained"] and len(frame) == 3 * 7
    # Switching the checkpoint keeps the y range (NV: fixed 0–1.4) and computes nothing new.
    before = explorer.ylim()
    assert before == (0.0, 1.4) == ax.get_ylim()
    explorer.checkpoint.value = "untrained"
    assert explorer.ylim() == before and explorer.cache.computations == 3
    assert explorer.overlays() == ["third"] and explorer.status.value.startswith("from cache")
    # An unnormalised measure: the range spans every checkpoint drawn, the same from either one.
    explorer.select(measure="TV")
    tv = explorer.ylim()
    explorer.checkpoint.value = "third"
    explorer.compare.value = "untrained"
    assert explorer.overlays() == ["untrained"]
    explorer.compare.value = "trained"
    assert set(explorer.overlays()) == {"trained", "untrained"}
    everything = widgets.y_range("TV", [explorer.data, *explorer.others.values()])
    assert everything == explorer.ylim() and everything[1] >= tv[1] - 1e-12
    explorer.compare.value = "(none)"
    assert explorer.overlays() == ["untrained"]


def test_marked_channel_and_its_value(explored):
    *_, data = explored
    layer, unit = "inner.3", 4
    values = data.values("NV", layer)
    panel = widgets.plot_channel_values(data, "NV", layer, unit)
    (ax,) = panel.axes
    order = widgets.channel_order(data, "NV", layer)
    rank = int(np.flatnonzero(order == unit)[0])
    heights, colours = widgets.channel_bars(panel)
    red = [i for i, c in enumerate(colours) if c == pytest.approx(to_rgba("tab:red"))]
    assert red == [rank] and heights[rank] == pytest.approx(values[unit])
    (note,) = ax.texts
    assert note.get_text() == f"ch {unit}: {values[unit]:.3f}, rank {rank + 1}"
    assert note.xy == (rank, pytest.approx(values[unit])) and ax.get_title().startswith(f"(2) {layer}: NV of its")


def test_transformations_are_shown_at_evenly_spaced_parameters(small_cnn):
    torch.manual_seed(1)
    x = torch.randn(4, 1, 8, 8)
    data = widgets.compute(small_cnn, x, transforms.rotations(16), max_st_samples=2)
    maps = widgets.plot_extreme_maps(data, "NV", "0")
    shown = [t.get_text() for t in maps.axes[-1].get_xticklabels()]
    assert shown == ["0°", "45°", "90°", "135°", "180°", "225°", "270°", "315°"]
    (ax, _) = widgets.plot_st_matrix(data, "0", 0).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == shown
    odd = widgets.compute(small_cnn, x, transforms.rotations(18), max_st_samples=2)
    labels = [t.get_text() for t in widgets.plot_extreme_maps(odd, "NV", "0").axes[-1].get_xticklabels()]
    assert labels == ["0°", "60°", "120°", "180°", "240°", "300°"]  # every third of 18: evenly spaced


def test_export_buttons_write_the_view_and_its_values(two_checkpoints, tmp_path):
    models, x, ts = two_checkpoints
    folder = tmp_path / "figs"
    explorer = widgets.Explorer(models, {"random": x}, {"rot 4": ts}, n_samples=N, max_st_samples=ST,
                                layer="inner.3", checkpoint="trained", export_dir=folder)
    explorer.select(unit=2)
    explorer.save_png.click()
    (png,) = folder.glob("*.png")
    assert png.name == "explorer_trained_random_rot_4_nv_inner.3_ch2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (png.stat().st_mode & 0o777) == 0o644
    assert str(png) in explorer.saved.value and not list(folder.glob(".*tmp*"))
    paths = explorer.export(("csv",))
    assert [p.name for p in paths] == [png.stem + "_layers.csv", png.stem + "_channels.csv"]
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in paths) and all(str(p) in explorer.saved.value for p in paths)
    curves, channels = (pd.read_csv(p) for p in paths)
    # The CSV rows are the values drawn: the curve's lines and the channel panel's bars.
    (ax,) = widgets.plot_layer_curve(explorer.data, "NV", "inner.3", others=explorer.others, label="trained").axes
    for label, line in ((ln.get_label(), ln) for ln in ax.lines[:2]):
        np.testing.assert_allclose(curves.loc[curves["label"] == label, "value"], line.get_ydata())
    assert set(curves["label"]) == {"trained", "untrained"} and set(curves["measure"]) == {"NV"}
    np.testing.assert_allclose(channels["value"],
                               widgets.channel_bars(widgets.plot_channel_values(explorer.data, "NV", "inner.3", 2))[0])
    assert channels["channel"].tolist() == widgets.channel_order(explorer.data, "NV", "inner.3").tolist()
    assert channels.loc[channels["selected"], "channel"].tolist() == [2]
    assert channels.loc[channels["selected"], "value"].item() == pytest.approx(explorer.data.values("NV", "inner.3")[2])


def test_saved_notebook_text_says_the_widget_needs_a_kernel(setup):
    model, x, ts = setup
    explorer = widgets.Explorer({"tiny": model}, {"random": x}, {"r": ts}, n_samples=N, max_st_samples=ST)
    bundle = explorer._repr_mimebundle_()
    assert "needs a running kernel" in bundle["text/plain"] and "VBox" not in bundle["text/plain"]
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_export_html_covers_every_checkpoint_and_measure_and_skips_repeated_layers(two_checkpoints, tmp_path):
    models, x, ts = two_checkpoints
    explorer = widgets.Explorer(models, {"random": x}, {"rot": ts}, n_samples=N, max_st_samples=ST,
                                checkpoint="trained", compare="third")
    data = explorer.data
    for name in data.measures_for("inner.4"):  # inner.4 repeats inner.3 in every measure
        data.results[name].values["inner.4"] = np.copy(data.results[name].values["inner.3"])
    assert widgets.same_as_previous(data, data.measures, data.layers) == {"inner.4": "inner.3"}
    path = widgets.export_html(data, tmp_path / "r.html", others=explorer.others, label="trained")
    html = path.read_text()
    sections = re.findall(r"<h2[^>]*>Layer <code>([^<]+)</code>", html)
    assert sections == [k for k in data.layers if k != "inner.4"]
    assert "the same values as inner.4" in html and "also inner.4: same values" in html
    # A table of contents whose links all land on an anchor of the page.
    links = re.findall(r'<a href="#([^"]+)"', html)
    assert {"overview", "means"} | {f"layer-inner-{i}" for i in (0, 3, 6)} <= set(links)
    assert all(f'id="{link}"' in html for link in links)
    # The layer means of every measure and checkpoint, as a table.
    part = html[html.index('id="means"'):]
    part = part[part.index("<table"):part.index("</table>")]
    head, body = part.split("<tbody>")
    columns = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<th>(.*?)</th>", head, re.S)]
    assert len(columns) == 1 + 3 * len(data.measures)
    rows = [re.findall(r"<t[hd]>(.*?)</t[hd]>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]
    assert [row[0] for row in rows] == data.layers
    column = [float(row[columns.index("NV · untrained")]) for row in rows]
    np.testing.assert_allclose(column, explorer.others["untrained"].results["NV"].layer_means().to_numpy(), rtol=1e-2)
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', html)) == 1 + 6 + 1


def test_a_view_seen_before_is_not_drawn_again(setup, monkeypatch):
    model, x, ts = setup
    explorer = widgets.Explorer({"tiny": model}, {"random": x}, {"r": ts}, n_samples=N, max_st_samples=ST,
                                layer="inner.0")
    first = explorer.maps.value
    explorer.select(layer="inner.3")
    drawn, redrawn = [], []
    monkeypatch.setattr("tmlib.widgets.explorer.figure_png", lambda fig: drawn.append(fig) or b"new")
    for name in ("curve", "heatmap", "st"):
        monkeypatch.setattr(getattr(explorer, name), "draw_idle", lambda name=name: redrawn.append(name))
    explorer.select(layer="inner.0")  # back: the maps from the PNG cache; the canvases drawn anew
    assert drawn == [] and explorer.maps.value == first and sorted(redrawn) == ["curve", "heatmap", "st"]
    redrawn.clear()
    explorer.select(unit=1)  # a new channel: its bar and its ST matrix, nothing else
    assert drawn == [] and sorted(redrawn) == ["heatmap", "st"]
    redrawn.clear()
    explorer.select(unit=1)  # the same view: nothing drawn
    assert drawn == [] and redrawn == []
    monkeypatch.setattr("tmlib.widgets.explorer.PNG_CACHE", 1)
    explorer.select(layer="inner.1")
    explorer.select(layer="inner.2")
    assert len(drawn) == 2 and len(explorer._pngs) == 1  # bounded


def test_a_new_layer_moves_the_curve_s_mark_instead_of_drawing_it_anew(setup):
    model, x, ts = setup
    explorer = widgets.Explorer({"tiny": model}, {"random": x}, {"r": ts}, n_samples=N, max_st_samples=ST,
                                layer="inner.0")
    axes = explorer.curve.figure.axes[0]
    lines = len(axes.lines)
    explorer.select(layer="inner.3")
    value = float(explorer.data.results["NV"].layer_means()["inner.3"])
    assert explorer.curve.figure.axes[0] is axes and len(axes.lines) == lines  # the same curves, one mark
    point = next(line for line in axes.lines if line.get_label().startswith("inner.3"))
    assert list(point.get_xdata()) == [3] and np.isclose(point.get_ydata()[0], value)
    assert f"inner.3: {value:.3f}" in [t.get_text() for t in axes.get_legend().get_texts()]
    assert not any(line.get_label().startswith("inner.0:") for line in axes.lines)
    explorer.select(measure="TV")  # another measure: drawn anew
    assert explorer.curve.figure.axes[0] is not axes and "TV" in explorer.curve.figure.axes[0].get_title()


def _pixels(figure) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if hasattr(figure.canvas, "buffer_rgba") else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def test_panels_updated_in_place_look_as_drawn_anew(setup):
    # The channel bars, the ST matrix and the maps keep their axes across channels, layers (of
    # another width or without maps too) and measures; what is on screen is what a new drawing of
    # the same view gives, pixel for pixel.
    model, x, ts = setup
    explorer = widgets.Explorer({"tiny": model}, {"random": x}, {"r": ts}, n_samples=N, max_st_samples=ST,
                                layer="inner.0")
    channels, st = explorer.heatmap.figure.axes[0], explorer.st.figure.axes[0]
    widths = {explorer.data.channels(layer) for layer in explorer.data.layers}
    assert len(widths) > 1  # a layer of another width is among the views
    for layer, unit, measure in [("inner.0", 2, "NV"), ("inner.3", 1, "TV"), (explorer.data.layers[-1], 0, "NV"),
                                 ("inner.1", 3, "SV")]:
        explorer.select(layer=layer, measure=measure, unit=unit)
        assert explorer.heatmap.figure.axes[0] is channels and explorer.st.figure.axes[0] is st
        fresh = Figure(figsize=explorer.heatmap.figure.get_size_inches(), dpi=explorer.heatmap.figure.dpi)
        widgets.figures.plot_channel_values(explorer.data, measure, layer, unit, fresh, ylim=explorer.ylim())
        np.testing.assert_array_equal(_pixels(explorer.heatmap.figure), _pixels(fresh))
        fresh = Figure(figsize=explorer.st.figure.get_size_inches(), dpi=explorer.st.figure.dpi)
        widgets.figures.plot_st_matrix(explorer.data, layer, unit, fresh, measure=measure)
        np.testing.assert_array_equal(_pixels(explorer.st.figure), _pixels(fresh))
        fresh = widgets.figures.plot_extreme_maps(explorer.data, measure, layer)  # the maps' PNG: the same bytes
        assert explorer.maps.value == widgets.figures.figure_png(fresh)


def _point(canvas, x: float, y: float, kind: str = "button_press") -> None:
    """What JupyterLab's ipympl view sends for a click (or a hover) at data point (x, y) of the
    panel's axes: figure pixels, y from the top."""
    px, py = canvas.figure.axes[0].transData.transform((x, y))
    canvas._handle_message(None, {"type": kind, "x": px, "y": canvas.figure.bbox.height - py, "button": 0,
                                  "buttons": 1 if kind == "button_press" else 0, "guiEvent": {},
                                  "modifiers": []}, [])


def test_clicks_on_the_plots_choose_the_layer_and_the_channel(two_checkpoints):
    models, x, ts = two_checkpoints
    explorer = widgets.Explorer({label: models[label] for label in ("untrained", "trained")}, {"random": x},
                                {"rot": ts}, n_samples=N, max_st_samples=ST, layer="inner.0", checkpoint="trained")
    data = explorer.data
    assert explorer.layer.value != "inner.3" and data.layers.index("inner.3") == 3
    _point(explorer.curve, 3.3, 0.5)  # nearest point: layer 3
    assert explorer.layer.value == "inner.3" and "inner.3" in explorer.heatmap.figure.axes[0].get_title()
    _point(explorer.curve, 3.3, 0.5, "motion_notify")  # hover: the layer means of both checkpoints drawn
    means = [f"{float(d.results['NV'].layer_means()['inner.3']):.3f}" for d in (data, *explorer.others.values())]
    assert explorer.curve._message.startswith("inner.3: trained ")
    assert all(mean in explorer.curve._message for mean in means) and len(explorer.others) == 1

    order = widgets.channel_order(data, "NV", "inner.3")
    chosen = int(order[2]) if int(order[2]) != explorer.unit.value else int(order[3])
    rank = int(np.flatnonzero(order == chosen)[0])
    _point(explorer.heatmap, rank + 0.2, 0.1)  # a click on the bar at that rank
    assert explorer.unit.value == chosen and f"channel {chosen}" in explorer.st.figure.axes[0].get_title()
    _point(explorer.heatmap, rank, 0.1, "motion_notify")
    value = data.values("NV", "inner.3")[chosen]
    assert explorer.heatmap._message == f"channel {chosen}: NV = {value:.4g}, rank {rank + 1} of 6"
    _point(explorer.st, 2, 1, "motion_notify")  # the ST cell under the pointer
    cell = data.st_matrix("inner.3", chosen)[1, 2]
    assert explorer.st._message == f"sample 1, {data.transformation_labels[2]}: mean activation {cell:.4g}"

    before = (explorer.layer.value, explorer.unit.value)
    _point(explorer.curve, -3.0, 0.5)  # outside the axes: nothing chosen
    _point(explorer.heatmap, -3.0, 0.1)
    assert (explorer.layer.value, explorer.unit.value) == before
    # The curve's points are the layers the measure has: a click by a linear layer, for a
    # same-equivariance measure, chooses the nearest layer with feature maps.
    assert widgets.layer_at(data, "NVSE", 6.0) == "inner.4" and widgets.layer_at(data, "NV", 6.0) == "inner.6"
    assert widgets.layer_at(data, "NV", None) is None and widgets.channel_at(data, "GEED-inv", "inner.3", 0) is None
    assert widgets.channel_at(data, "NV", "inner.3", 9.0) is None


class _Gated(torch.nn.Module):
    """A model whose forwards wait until the test lets them go: a pass that is still running."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.entered, self.go = inner, threading.Event(), threading.Event()

    def forward(self, x):
        self.entered.set()
        assert self.go.wait(30), "the test never released the forward"
        return self.inner(x)


def test_a_background_pass_can_be_cancelled_and_keeps_the_view(two_checkpoints):
    models, x, ts = two_checkpoints
    gated = _Gated(models["trained"].inner)
    gated.go.set()
    explorer = widgets.Explorer({"trained": models["trained"], "gated": gated}, {"random": x},
                                {"rot": ts, "rot3": transforms.rotations(3)}, n_samples=N, max_st_samples=ST,
                                layer="inner.3", baseline=None, background=True, batch_size=3)
    explorer.checkpoint.value = "gated"  # set by code: computed in this thread, seen by the next line
    assert explorer.worker is None and explorer.data.title.startswith("gated") and len(explorer.cache) == 2
    shown, curve = explorer.data, explorer.panel_png("curve")
    assert explorer.cancel.layout.display == "none"

    gated.go.clear()
    gated.entered.clear()
    explorer.transformation.set_state({"index": 1})  # what JupyterLab sends: the pass runs in a thread
    assert gated.entered.wait(30) and explorer.worker.is_alive()
    assert explorer.checkpoint.disabled and explorer.layer.disabled and explorer.cancel.layout.display is None
    assert explorer.status.value.startswith("computing gated · random · rot3")
    explorer.cancel.click()  # what the button does in JupyterLab
    gated.go.set()
    explorer.worker.join(30)
    assert not explorer.worker.is_alive()
    # Stopped at the end of the block: the previous view and its selection, nothing cached.
    assert explorer.status.value.startswith("cancelled after 3 of 10 samples"), explorer.status.value
    assert explorer.transformation.value == "rot" and explorer.data is shown
    assert explorer.panel_png("curve") == curve and len(explorer.cache) == 2
    assert not explorer.checkpoint.disabled and explorer.cancel.layout.display == "none"

    explorer.transformation.set_state({"index": 1})  # again, not cancelled: it finishes and is shown
    explorer.worker.join(60)
    assert explorer.transformation.value == "rot3" and explorer.data.transformation_labels == ["0°", "120°", "240°"]
    assert explorer.status.value.startswith("computed gated in ") and not explorer.layer.disabled
    assert len(explorer.cache) == 3


def test_a_failing_background_pass_says_why(two_checkpoints):
    models, x, ts = two_checkpoints

    def broken(images):
        raise RuntimeError("out of memory (pretend)")

    explorer = widgets.Explorer({"trained": models["trained"], "broken": broken_module(broken)}, {"random": x},
                                {"rot": ts}, n_samples=N, max_st_samples=ST, baseline=None, background=True)
    explorer.checkpoint.set_state({"index": 1})
    explorer.worker.join(30)
    assert "failed: RuntimeError: out of memory (pretend)" in explorer.status.value
    assert explorer.checkpoint.value == "trained" and not explorer.checkpoint.disabled


def broken_module(function):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return function(self.conv(x))

    return Broken()


def test_a_browser_selection_shows_the_view_first_then_the_rest(two_checkpoints):
    models, x, ts = two_checkpoints
    gated = _Gated(models["third"].inner)
    gated.go.set()
    explorer = widgets.Explorer({"untrained": models["untrained"], "trained": models["trained"], "gated": gated},
                                {"random": x}, {"rot": ts, "rot3": transforms.rotations(3)}, n_samples=N,
                                max_st_samples=ST, layer="inner.3", checkpoint="trained", compare="gated",
                                batch_size=5)
    assert set(explorer.data.measures) == set(widgets.MEASURES) and explorer.cache.computations == 3
    explorer.select(measure="GEED-inv")  # a measure outside the moments family on screen: first as well
    assert explorer.first_measures() == (*FIRST_MEASURES, "GEED-inv")
    explorer.select(measure="NV")
    assert explorer.first_measures() == FIRST_MEASURES
    gated.go.clear()
    gated.entered.clear()
    explorer.transformation.set_state({"index": 1})  # from the browser: the selected checkpoint first …
    assert gated.entered.wait(30)  # … the overlay's pass has started: the view of rot3 is already shown
    assert explorer.data.transformation_labels == ["0°", "120°", "240°"] and explorer.transformation.value == "rot3"
    assert explorer.data.measures == list(FIRST_MEASURES) and explorer.others == {}  # NV on screen: the moments
    assert not explorer.layer.disabled and explorer.checkpoint.disabled  # browsing while the rest is computed
    explorer.select(layer="inner.0")
    explorer.cancel.click()
    gated.go.set()
    explorer.worker.join(30)
    # Cancelled in the second step: the new view stays, with what was computed; the rest can follow.
    assert explorer.transformation.value == "rot3" and explorer.layer.value == "inner.0"
    assert "cancelled after 5 of 10 samples: the rest not computed" in explorer.status.value
    assert explorer.data.measures == list(FIRST_MEASURES) and not explorer.checkpoint.disabled

    explorer.transformation.set_state({"index": 0})  # back (cached) and forward again: now to the end
    explorer.worker.join(30)
    explorer.transformation.set_state({"index": 1})
    explorer.worker.join(60)
    assert set(explorer.data.measures) == set(widgets.MEASURES) and set(explorer.others) == {"gated", "untrained"}
    assert all(set(d.measures) == set(widgets.MEASURES) for d in explorer.others.values())
    assert list(explorer.measure.options) == explorer.data.measures_for("inner.0")
    # The measures of two passes equal those of one.
    whole = widgets.compute(models["trained"], x, transforms.rotations(3), max_st_samples=ST)
    for name in widgets.MEASURES:
        for layer in whole.results[name].values:
            np.testing.assert_allclose(explorer.data.values(name, layer), whole.values(name, layer), rtol=1e-12)
    assert explorer.status.value.startswith("computed ") and "computing" not in explorer.status.value
