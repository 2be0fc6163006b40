"""Pointing at the explorer's plots: what a click or a hover over a panel means.

The per-layer curve, the channel bars and the ST matrix are ipympl canvases (matplotlib's own
figures, drawn by the same functions as the static export, sent to JupyterLab as a widget): a click
reports the data coordinates under the pointer, and ipympl's footer shows what ``format_coord``
says about the point under it. ipympl was chosen over plotly and bqplot because the panels already
are matplotlib figures (the PNG export and the offline report draw exactly the same ones, with no
second renderer to keep in step), it adds ~100 kB of prebuilt JupyterLab extension and no other
dependency, and it works offline (nothing is fetched at run time).

The functions here are pure: data and an x (or x, y) in data coordinates in, a choice or a text
out, so they are tested without a browser; the explorer connects them to the canvases.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import numpy as np
from matplotlib.figure import Figure

from .data import ExplorerData, channel_order

__all__ = ["channel_at", "channel_text", "interactive_canvas", "layer_at", "curve_text", "st_text"]

#: Screen resolution (pixels per inch) of the interactive panels: 7–9 pt labels at 8–10 px.
CANVAS_DPI = 80


def interactive_canvas(css: str, size: tuple[float, float], dpi: int = CANVAS_DPI):
    """An ipympl canvas around a new figure of ``size`` inches at ``dpi``: no toolbar, no title
    header, not resizable, the footer kept (it shows the hover text); CSS class ``css``.

    No pyplot: the figure is registered nowhere, so a notebook never shows it twice, and it works
    without a kernel (the widget's comm is then a dummy; tests feed it events directly)."""
    from ipympl.backend_nbagg import Canvas, FigureManager

    canvas = Canvas(Figure(figsize=size, dpi=dpi))
    with warnings.catch_warnings():  # ipympl 0.10's Toolbar passes its canvas on to traitlets (its own affair)
        warnings.filterwarnings("ignore", "Passing unrecognized arguments", DeprecationWarning)
        FigureManager(canvas, 0)  # the event plumbing and the (hidden) toolbar that writes the hover text
    canvas.toolbar_visible, canvas.header_visible, canvas.resizable = False, False, False
    canvas.footer_visible, canvas.capture_scroll = True, False
    canvas.add_class(css)
    return canvas


def _measured(data: ExplorerData, measure: str) -> list[int]:
    """Indices (in ``data.layers``) of the layers the measure has values for: the curve's points."""
    values = data.results[measure].values
    return [k for k, layer in enumerate(data.layers) if layer in values]


def layer_at(data: ExplorerData, measure: str, x: float | None) -> str | None:
    """The layer of the curve's point nearest to ``x`` (the curve's x is the layer index); None
    outside the axes (``x`` None) or when the measure has no layer."""
    if x is None or not np.isfinite(x):
        return None
    points = _measured(data, measure)
    if not points:
        return None
    return data.layers[min(points, key=lambda k: (abs(k - x), k))]


def channel_at(data: ExplorerData, measure: str, layer: str, x: float | None) -> int | None:
    """The channel of the bar under ``x`` (bars stand at the ranks 0 … C − 1 of the sorted values);
    None outside the bars or for a measure with one value per layer."""
    if x is None or not np.isfinite(x) or not data.per_channel(measure, layer):
        return None
    order = channel_order(data, measure, layer)
    rank = int(round(x))
    return int(order[rank]) if 0 <= rank < len(order) and abs(x - rank) <= 0.5 else None


def curve_text(data: ExplorerData, measure: str, others: Mapping[str, ExplorerData] | None = None,
               label: str = "selected") -> Callable[[float, float], str]:
    """Hover text of the curve: the nearest layer and its mean for every checkpoint drawn (short:
    the footer is one panel wide)."""
    curves = [(label, data), *(others or {}).items()]

    def text(x: float, y: float) -> str:
        layer = layer_at(data, measure, x)
        if layer is None:
            return ""
        parts = [f"{name} {float(d.results[measure].layer_means()[layer]):.3f}" for name, d in curves
                 if measure in d.results and layer in d.results[measure].values]
        return f"{layer}: " + ", ".join(parts)

    return text


def channel_text(data: ExplorerData, measure: str, layer: str) -> Callable[[float, float], str]:
    """Hover text of the channel bars: the channel under the pointer, its rank and value."""
    values = data.values(measure, layer)

    def text(x: float, y: float) -> str:
        channel = channel_at(data, measure, layer, x)
        if channel is None:
            return f"{layer}: {measure} = {values[0]:.4g} (one value per layer)" if values.size == 1 else ""
        rank = int(np.flatnonzero(channel_order(data, measure, layer) == channel)[0])
        return f"channel {channel}: {measure} = {values[channel]:.4g}, rank {rank + 1} of {values.size}"

    return text


def st_text(data: ExplorerData, layer: str, unit: int) -> Callable[[float, float], str]:
    """Hover text of the ST matrix: the sample, the transformation and the channel's mean there."""
    st = data.st_matrix(layer, unit)

    def text(x: float, y: float) -> str:
        row, col = int(round(y)), int(round(x))
        if not (0 <= row < st.shape[0] and 0 <= col < st.shape[1]):
            return ""
        return f"sample {row}, {data.transformation_labels[col]}: mean activation {st[row, col]:.4g}"

    return text
