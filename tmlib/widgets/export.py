"""The explorer's static export: an offline HTML report with one page of panels per layer."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

from ..files import atomic_write
from .data import ExplorerData
from .figures import explorer_figure, figure_png

__all__ = ["export_html"]


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
