"""An interactive layer explorer (ipywidgets) and its static HTML export.

Split along its seams, each part usable on its own:

* :mod:`~tmlib.widgets.data` — :func:`compute` runs *one* pass of the engine for the measures and
  the pictures' statistics (ST means of the first samples, feature maps of one image);
  :class:`ExplorerData` holds the result, :class:`ExplorerCache` keeps it, so choosing another
  layer, unit or measure afterwards only redraws;
* :mod:`~tmlib.widgets.figures` — the panels as matplotlib figures (no pyplot);
* :mod:`~tmlib.widgets.export` — :func:`export_html`, an offline HTML report, and :func:`save_view`,
  the export buttons' PNG and CSV files;
* :mod:`~tmlib.widgets.pointing` — what a click or a hover over a panel means (:func:`layer_at`,
  :func:`channel_at`, the hover texts) and the ipympl canvases they are connected to;
* :mod:`~tmlib.widgets.passes` — how the explorer gets its data: passes for what the cache lacks,
  a selection made in the browser run in a thread, in steps, with a cancel button;
* :mod:`~tmlib.widgets.explorer` — :class:`Explorer`, the widget.
"""

from .data import MEASURES, ExplorerCache, ExplorerData, channel_order, compute
from .explorer import Explorer
from .export import channel_frame, export_html, same_as_previous, save_view
from .figures import (
    FIXED_RANGES,
    channel_bars,
    curve_frame,
    explorer_figure,
    figure_png,
    plot_channel_heatmap,
    plot_channel_values,
    plot_extreme_maps,
    plot_inputs,
    plot_layer_curve,
    plot_st_matrix,
    y_range,
)
from .pointing import channel_at, interactive_canvas, layer_at

__all__ = [
    "FIXED_RANGES",
    "MEASURES",
    "Explorer",
    "ExplorerCache",
    "ExplorerData",
    "channel_at",
    "channel_bars",
    "channel_frame",
    "channel_order",
    "compute",
    "curve_frame",
    "explorer_figure",
    "export_html",
    "figure_png",
    "interactive_canvas",
    "layer_at",
    "plot_channel_heatmap",
    "plot_channel_values",
    "plot_extreme_maps",
    "plot_inputs",
    "plot_layer_curve",
    "plot_st_matrix",
    "same_as_previous",
    "save_view",
    "y_range",
]
