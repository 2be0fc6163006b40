"""The explorer's exports: an offline HTML report, and the export buttons' PNG and CSV files."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..files import atomic_write
from .data import ExplorerData, channel_order
from .figures import curve_frame, explorer_figure, figure_png

__all__ = ["channel_frame", "export_html", "same_as_previous", "save_view", "view_stem"]


def view_stem(*parts: object) -> str:
    """A file name stem from the view's parts ("explorer", checkpoint, …): lower case, runs of
    anything but letters, digits, dots and dashes as one "_"."""
    return "_".join(re.sub(r"[^a-z0-9.\-]+", "_", str(part).lower()).strip("_") for part in parts)


def channel_frame(data: ExplorerData, measure: str, layer: str, unit: int | None = None) -> pd.DataFrame:
    """Panel 2's values: one row per channel in the order drawn (rank 1 = lowest), its value and
    whether it is the selected one."""
    values, order = data.values(measure, layer), channel_order(data, measure, layer)
    channels = order if data.per_channel(measure, layer) else np.array([-1])
    return pd.DataFrame({"layer": layer, "measure": measure, "rank": np.arange(1, len(order) + 1),
                         "channel": channels, "value": values[order], "selected": channels == unit})


def save_view(folder: str | Path, stem: str, data: ExplorerData, measure: str, layer: str, unit: int,
              others: Mapping[str, ExplorerData] | None = None, label: str = "selected",
              what: Sequence[str] = ("png", "csv")) -> list[Path]:
    """Write the view (:func:`explorer_figure`) as ``stem.png`` and its values as
    ``stem_layers.csv`` (panel 1: every curve's layer means) and ``stem_channels.csv`` (panel 2)
    into ``folder``, each atomically with mode 0644; → the paths written."""
    folder, written = Path(folder), []
    if "png" in what:
        png = figure_png(explorer_figure(data, measure, layer, unit, others=others, label=label), dpi=100)
        written.append(atomic_write(folder / f"{stem}.png", lambda tmp: Path(tmp).write_bytes(png)))
    if "csv" in what:
        curves = curve_frame(data, measure, others, label).assign(measure=measure)
        channels = channel_frame(data, measure, layer, unit).assign(checkpoint=label)
        for name, frame in [("layers", curves), ("channels", channels)]:
            text = frame.to_csv(index=False)
            written.append(atomic_write(folder / f"{stem}_{name}.csv",
                                        lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8")))
    return written


def same_as_previous(data: ExplorerData, measures: Sequence[str], layers: Sequence[str],
                     atol: float = 1e-9) -> dict[str, str]:
    """Layers whose values equal the previous layer's for every measure in ``measures`` (an
    activation after an in-place op, a flatten): layer → the layer it repeats."""
    repeats, previous = {}, None
    for layer in layers:
        if previous is not None and all(
                (mm in data.measures_for(layer)) == (mm in data.measures_for(previous)) for mm in measures):
            same = [mm for mm in measures if mm in data.measures_for(layer)]
            a_values = [data.values(mm, layer) for mm in same]
            b_values = [data.values(mm, previous) for mm in same]
            if same and all(a.shape == b.shape and np.allclose(a, b, rtol=0, atol=atol, equal_nan=True)
                            for a, b in zip(a_values, b_values, strict=True)):
                repeats[layer] = repeats.get(previous, previous)
                continue
        previous = layer
    return repeats


def _overview(data: ExplorerData, measures: Sequence[str], others: Mapping[str, ExplorerData] | None,
              label: str) -> bytes:
    """Every measure's per-layer curve, every checkpoint on each (2 columns)."""
    from matplotlib.figure import Figure

    from .figures import PANEL, plot_layer_curve

    rows = -(-len(measures) // 2)
    fig = Figure(figsize=(2 * PANEL[0], rows * PANEL[1]), layout="constrained")
    cells = fig.subfigures(rows, 2, squeeze=False).flat
    for measure, cell in zip(measures, cells, strict=False):
        plot_layer_curve(data, measure, None, cell, others=others, label=label)
    return figure_png(fig, dpi=72)


def _layer_figure(data: ExplorerData, measure: str, layer: str, unit: int,
                  others: Mapping[str, ExplorerData] | None, label: str) -> bytes:
    """One layer: its channels under every checkpoint (one y range), the ST matrix of ``unit`` and
    the extreme channels' maps of the selected checkpoint."""
    from matplotlib.figure import Figure

    from .figures import PANEL, plot_channel_values, plot_extreme_maps, plot_st_matrix, y_range

    shown = {label: data, **{k: d for k, d in (others or {}).items() if measure in d.measures_for(layer)}}
    ylim = y_range(measure, list(shown.values()))
    fig = Figure(figsize=(2 * PANEL[0], 2 * PANEL[1]), layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    for (name, d), cell in zip(shown.items(), top.subfigures(1, len(shown), squeeze=False).flat, strict=True):
        plot_channel_values(d, measure, layer, unit if name == label else None, cell, ylim=ylim)
        cell.axes[0].set_title(f"{name}: {measure} of {layer}'s channels", fontsize=9)
    st, maps = bottom.subfigures(1, 2)
    plot_st_matrix(data, layer, unit, st, measure=measure)
    plot_extreme_maps(data, measure, layer, maps)
    return figure_png(fig, dpi=72)


def _anchor(layer: str) -> str:
    return "layer-" + re.sub(r"[^a-z0-9]+", "-", layer.lower())


def export_html(data: ExplorerData, path: str | Path, measure: str = "NV", layers: Sequence[str] | None = None,
                unit: int = 0, title: str = "Layer explorer", others: Mapping[str, ExplorerData] | None = None,
                label: str = "selected", measures: Sequence[str] | None = None) -> Path:
    """An offline HTML report, images inline (base64): a table of contents; every measure's
    per-layer curve with every checkpoint (``label`` for ``data``, ``others``: label → data of the
    other checkpoints); a table of the layer means (layer × measure × checkpoint); then one section
    per layer whose values differ from the previous layer's (the others are listed as repeats):
    its channels under each checkpoint by ``measure``, the ST matrix of channel ``unit`` and the
    extreme channels' maps; the transformed inputs once at the end.

    Built as a notebook of outputs and converted by nbconvert's HTMLExporter; the page needs no
    kernel and no network (no scripts from CDNs: no MathJax, no require.js, no widgets).
    """
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    from .figures import plot_inputs

    layers = list(data.layers if layers is None else layers)
    for layer in layers:
        data.check(layer=layer, measure=measure)
    measures = [mm for mm in (data.measures if measures is None else measures) if mm in data.results]
    others = dict(others or {})
    repeats = same_as_previous(data, measures, layers)
    sections = [layer for layer in layers if layer not in repeats]
    nb = nbformat.v4.new_notebook()

    def image(png: bytes, text: str) -> None:
        output = nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png).decode(),
                                                              "text/plain": text})
        nb.cells.append(nbformat.v4.new_code_cell("", outputs=[output]))

    checkpoints = ", ".join([label, *others])
    subtitle = f"{data.title}\n\n" if data.title and data.title not in title else ""
    toc = "\n".join([f"* [{layer}](#{_anchor(layer)})" + (
        f" (also {', '.join(k for k, v in repeats.items() if v == layer)}: same values)"
        if layer in repeats.values() else "") for layer in sections])
    nb.cells.append(nbformat.v4.new_markdown_cell(
        f"# {title}\n\n{subtitle}Checkpoints: {checkpoints}. {data.n_samples} samples × "
        f"{len(data.transformation_labels)} transformations ({', '.join(data.transformation_labels)}).\n\n"
        "## Contents\n\n* [Every measure per layer](#overview)\n* [Layer means](#means)\n"
        f"* Layers, by {measure}:\n" + "\n".join("  " + line for line in toc.splitlines())
        + "\n* [The inputs](#inputs)"))
    nb.cells.append(nbformat.v4.new_markdown_cell('<a id="overview"></a>\n## Every measure per layer\n\n'
                                                  f"Checkpoints: {checkpoints}; NV and NVSE on 0–1.4."))
    image(_overview(data, measures, others, label), "<overview>")
    means = {(mm, name): d.results[mm].layer_means() for mm in measures
             for name, d in [(label, data), *others.items()] if mm in d.results}
    table = pd.DataFrame(means).reindex(layers)
    table.columns = [f"{mm} · {name}" for mm, name in table.columns]
    output = nbformat.v4.new_output("display_data", data={
        "text/html": table.rename_axis("layer").reset_index().to_html(index=False, float_format=lambda v: f"{v:.3g}",
                                                                      na_rep="–"), "text/plain": "<means>"})
    nb.cells.append(nbformat.v4.new_markdown_cell('<a id="means"></a>\n## Layer means (mean over channels)'))
    nb.cells.append(nbformat.v4.new_code_cell("", outputs=[output]))
    for layer in sections:
        channel = min(unit, data.channels(layer) - 1)
        also = [k for k, v in repeats.items() if v == layer]
        note = f" (the same values as {', '.join(also)})" if also else ""
        nb.cells.append(nbformat.v4.new_markdown_cell(
            f'<a id="{_anchor(layer)}"></a>\n## Layer `{layer}`{note}\n\n{measure} per channel for each '
            f"checkpoint; the ST matrix of channel {channel} and the extreme channels' maps of {label}."))
        image(_layer_figure(data, measure, layer, channel, others, label), f"<{layer}>")
    nb.cells.append(nbformat.v4.new_markdown_cell('<a id="inputs"></a>\n## The inputs'))
    image(figure_png(plot_inputs(data), dpi=72), "<inputs>")
    exporter = HTMLExporter(extra_loaders=[DictLoader({"tmlib_report.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="tmlib_report.html.j2", exclude_input=True,
                            exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))


# JupyterLab's look, minus the scripts it would fetch from CDNs (require.js, MathJax, mermaid): the
# report holds only images and text, and must render offline without waiting for the network.
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
