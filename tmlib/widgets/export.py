"""The explorer's static export: an offline HTML report with one page of panels per layer."""

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

__all__ = ["channel_frame", "export_html", "save_view", "view_stem"]


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


def export_html(data: ExplorerData, path: str | Path, measure: str = "NV", layers: Sequence[str] | None = None,
                unit: int = 0, title: str = "Layer explorer") -> Path:
    """An offline HTML report: one :func:`explorer_figure` per layer, images inline (base64).

    Built as a notebook of image outputs and converted by nbconvert's HTMLExporter; the page
    needs no kernel and no network (no scripts from CDNs: no MathJax, no require.js, no widgets).
    """
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    layers = list(data.layers if layers is None else layers)
    for layer in layers:
        data.check(layer=layer, measure=measure)
    nb = nbformat.v4.new_notebook()
    subtitle = f"{data.title}\n\n" if data.title and data.title not in title else ""
    intro = (f"# {title}\n\n{subtitle}{measure} per layer and channel, {data.n_samples} samples × "
             f"{len(data.transformation_labels)} transformations ({', '.join(data.transformation_labels)}).\n"
             "Each section shows (1) the per-layer curve with the layer highlighted, (2) its channels sorted, "
             "(3) the ST matrix of one channel and the feature maps of the most and least invariant channel, "
             "(4) the transformed inputs.")
    nb.cells.append(nbformat.v4.new_markdown_cell(intro))
    for layer in layers:
        channel = min(unit, data.channels(layer) - 1)
        png = base64.b64encode(figure_png(explorer_figure(data, measure, layer, channel), dpi=80)).decode()
        nb.cells.append(nbformat.v4.new_markdown_cell(f"## Layer `{layer}` (ST matrix of channel {channel})"))
        output = nbformat.v4.new_output("display_data", data={"image/png": png, "text/plain": f"<{layer}>"})
        nb.cells.append(nbformat.v4.new_code_cell("", outputs=[output]))
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
