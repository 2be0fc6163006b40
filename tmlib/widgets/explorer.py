"""The interactive explorer (ipywidgets): choose what to measure, then browse layers and units.

A left column of controls (checkpoint, "compare with" checkpoint, dataset, transformation set,
measure, layer, channel, progress, status, export buttons) beside the figures of
:mod:`tmlib.widgets.figures`, with stable CSS classes (``tmlib-explorer``, ``tmlib-layer``,
``tmlib-unit``, ``tmlib-compare``, ``tmlib-curve``, ``tmlib-heatmap`` (the channel panel),
``tmlib-st``, ``tmlib-maps``, ``tmlib-inputs``, ``tmlib-save-png``, ``tmlib-save-csv``) for browser
tests. The measure dropdown offers the measures defined for the selected layer (same-equivariance
on feature maps only, for instance). Every change first computes what it needs (a pass, or
nothing), then renders every panel that changed, then updates them together.

The plots drive the selection: the per-layer curve, the channel bars and the ST matrix are ipympl
canvases (:mod:`tmlib.widgets.pointing`): a click on the curve chooses the nearest layer, a click
on a bar chooses that channel, and the footer under each says what is under the pointer (layer
means of every checkpoint drawn, a channel's value and rank, an ST cell). The extreme channels'
maps and the inputs, where there is nothing to choose, are PNG images kept in a cache by what they
show, so revisiting a view renders them not again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch import nn

from .data import MEASURES, ExplorerCache, ExplorerData
from .export import save_view, view_stem
from .figures import (
    PANEL,
    explorer_figure,
    figure_png,
    mark_layer,
    plot_channel_values,
    plot_extreme_maps,
    plot_inputs,
    plot_layer_curve,
    plot_st_matrix,
    y_range,
)
from .passes import SELECTORS, PassCancelled, Passes
from .pointing import channel_at, channel_text, curve_text, interactive_canvas, layer_at, st_text

__all__ = ["Explorer", "PassCancelled"]

NONE = "(none)"
PNG_CACHE = 256  # the image panels' PNGs kept (a few MB): revisiting a layer or measure is instant
CANVASES = ("curve", "heatmap", "st")  # the panels one points at (ipympl canvases)
#: Size (inches, at pointing.CANVAS_DPI) of a panel on screen: the 290-px controls and two 344-px
#: columns (990 px) fit beside JupyterLab's open file browser in a 1440-px window.
SCREEN_PANEL = (4.3, 2.55)
IMAGES = ("maps", "inputs")  # the panels shown as PNG images


def _image_widget(css: str):
    import ipywidgets as w

    image = w.Image(format="png", layout=w.Layout(width="100%", height="auto", object_fit="contain"))
    image.add_class(css)
    return image


class Explorer(Passes):
    """The interactive explorer: choose what to measure, then browse layers and units.

    Args:
        models: label → ``nn.Module``, or → ``experiments.ModelSpec`` (trained or loaded from the
            checkpoint cache on first use).
        datasets: dataset names for :func:`tmlib.data.load` (test split, ``n_samples`` stratified),
            or label → tensor/dataset.
        transformations: names for :func:`tmlib.experiments.measurement_set`, or label →
            transformation set.
        n_samples, seed, data_root, models_dir: how datasets are loaded and models cached.
        image: the sample whose feature maps and transformed inputs are shown.
        max_st_samples: rows of the ST matrices.
        layer, checkpoint, compare: the starting selection (``compare``: a checkpoint whose curve
            is drawn on the same axis, default none).
        baseline: a checkpoint always drawn on the curve (default: the first whose label contains
            "untrained"; None for none).
        export_dir: where the export buttons write (default ``figures``).
        compute: compute the first selection right away (otherwise call :meth:`compute`).
        background: run the passes that a selection made in the browser starts in a thread, so that
            the kernel stays free for the cancel button (default). A selector set by code
            (``explorer.checkpoint.value = …``), :meth:`compute` and the first selection run in
            the caller's thread: the next line of a notebook sees their result.
        batch_size: samples per block of the passes (default: the engine's, 256 images a
            forward); a cancel takes effect at the end of the block running.

    Changing the checkpoint, compare checkpoint, dataset or transformation set computes (once per
    combination, with a progress bar and a cancel button; a cancelled pass leaves the previous
    view and selection); changing the measure, layer or unit only redraws.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        datasets: Sequence[str] | Mapping[str, Any] = ("mnist",),
        transformations: Sequence[str] | Mapping[str, Any] = ("rotation",),
        measures: Sequence[str] = tuple(MEASURES),
        n_samples: int = 100,
        seed: int = 0,
        data_root: str | Path = "data",
        models_dir: str | Path = "data/models",
        image: int = 0,
        max_st_samples: int = 32,
        layer: str | None = None,
        compute: bool = True,
        cache: ExplorerCache | None = None,
        checkpoint: str | None = None,
        compare: str | None = None,
        baseline: str | None = "auto",
        export_dir: str | Path = "figures",
        background: bool = True,
        batch_size: int | None = None,
    ) -> None:
        import ipywidgets as w

        if not models:
            raise ValueError("models: give at least one model (label → nn.Module or ModelSpec)")
        unknown = [mm for mm in measures if mm not in MEASURES]
        if unknown or not measures:
            raise ValueError(f"measures: choose from {list(MEASURES)}, got {list(measures)}")
        self.measure_names = list(measures)
        self.models = dict(models)
        for name, value in [("checkpoint", checkpoint), ("compare", compare)]:
            if value is not None and value not in self.models:
                raise ValueError(f"{name}: choose from {list(self.models)}, got {value!r}")
        if baseline == "auto":
            baseline = next((label for label in self.models if "untrained" in label.lower()), None)
        elif baseline is not None and baseline not in self.models:
            raise ValueError(f"baseline: choose from {list(self.models)}, got {baseline!r}")
        self.baseline = baseline
        self.datasets = self._as_mapping(datasets, "datasets")
        self.transformations = self._as_mapping(transformations, "transformations")
        self.n_samples, self.seed, self.image, self.max_st_samples = n_samples, seed, image, max_st_samples
        self.batch_size = batch_size
        self.data_root, self.models_dir, self.export_dir = data_root, models_dir, Path(export_dir)
        self.cache = cache if cache is not None else ExplorerCache()
        self.data: ExplorerData | None = None
        self.others: dict[str, ExplorerData] = {}
        self.timings: dict[str, float] = {}  # what the last update took: "pass …", "draw"
        self._loaded: dict[str, nn.Module] = {}
        self._pngs: OrderedDict[tuple, bytes] = OrderedDict()
        self._drawn: dict[str, tuple] = {}  # canvas → what it shows now (not redrawn for the same view)
        self._maps_figure = Figure(figsize=PANEL)  # the maps' PNGs are rendered from it, updated in place
        self._initial_layer = layer
        self._quiet = False  # set while the explorer itself moves selectors: one redraw, not several
        self.background = bool(background)
        self._cancel = threading.Event()
        self._lock = threading.RLock()  # drawing vs. a background pass adding to the data drawn
        self.worker: threading.Thread | None = None  # the background pass running now, if any
        self._shown: dict[str, Any] = {}  # the selectors' values of the view on screen (reverted to on cancel)

        full = w.Layout(width="100%")
        style = {"description_width": "110px"}
        self.checkpoint = w.Dropdown(options=list(self.models), value=checkpoint or next(iter(self.models)),
                                     description="checkpoint", style=style, layout=full)
        self.compare = w.Dropdown(options=[NONE, *self.models], value=compare or NONE, description="compare with",
                                  style=style, layout=full)
        self.dataset = w.Dropdown(options=list(self.datasets), description="dataset", style=style, layout=full)
        self.transformation = w.Dropdown(options=list(self.transformations), description="transformations",
                                         style=style, layout=full)
        self.measure = w.Dropdown(options=list(measures), description="measure", style=style, layout=full)
        self.layer = w.Dropdown(options=[], description="layer", style=style, layout=full)
        self.unit = w.IntSlider(value=0, min=0, max=0, description="channel", style=style,
                                continuous_update=False, layout=full)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="computing", style=style,
                                      layout=w.Layout(width="100%", visibility="hidden"))
        self.status = w.HTML(layout=full)
        self.cancel = w.Button(description="cancel", icon="stop", tooltip="stop the pass; keep the view shown",
                               button_style="warning", layout=w.Layout(width="100%", display="none"))
        self.save_png = w.Button(description="save PNG", icon="image", tooltip="the view as a PNG file",
                                 layout=w.Layout(width="48%"))
        self.save_csv = w.Button(description="save CSV", icon="table", tooltip="the view's values as CSV files",
                                 layout=w.Layout(width="48%"))
        self.saved = w.HTML(layout=full)
        self.curve, self.heatmap, self.st = (interactive_canvas(f"tmlib-{name}", SCREEN_PANEL) for name in CANVASES)
        self.maps, self.inputs = _image_widget("tmlib-maps"), _image_widget("tmlib-inputs")
        for canvas in (self.curve, self.heatmap, self.st):  # rendered (on the browser's request) under the lock
            canvas.draw = self._locked(canvas.draw)
        self.curve.mpl_connect("button_press_event", self._on_curve_click)
        self.heatmap.mpl_connect("button_press_event", self._on_channel_click)
        for widget, css in [(self.layer, "tmlib-layer"), (self.unit, "tmlib-unit"), (self.measure, "tmlib-measure"),
                            (self.compare, "tmlib-compare"), (self.checkpoint, "tmlib-checkpoint"),
                            (self.progress, "tmlib-progress"), (self.status, "tmlib-status"),
                            (self.cancel, "tmlib-cancel"),
                            (self.save_png, "tmlib-save-png"), (self.save_csv, "tmlib-save-csv"),
                            (self.saved, "tmlib-saved")]:
            widget.add_class(css)
        controls = w.VBox([self.checkpoint, self.compare, self.dataset, self.transformation, self.measure,
                           self.layer, self.unit, self.progress, self.cancel, self.status,
                           w.HBox([self.save_png, self.save_csv], layout=w.Layout(justify_content="space-between")),
                           self.saved], layout=w.Layout(width="290px", min_width="290px", margin="0 8px 0 0"))
        column = round(SCREEN_PANEL[0] * self.curve.figure.dpi)  # the canvases' width: the images take the same
        for canvas in (self.curve, self.heatmap, self.st):  # a long hover text is cut, not spilt on the next panel
            canvas.layout = w.Layout(width=f"{column}px", overflow="hidden")
        grid = w.GridBox([self.curve, self.heatmap, self.st, self.maps],
                         layout=w.Layout(grid_template_columns=f"repeat(2, {column}px)", grid_gap="4px"))
        panels = w.VBox([grid, self.inputs], layout=w.Layout(width=f"{2 * column + 4}px", min_width="0"))
        self.widget = w.HBox([controls, panels], layout=w.Layout(width="100%", align_items="flex-start"))
        self.widget.add_class("tmlib-explorer")

        for name in SELECTORS:
            getattr(self, name).observe(self._on_selection, names="value")
        self.measure.observe(self._on_layer, names="value")
        self.layer.observe(self._on_layer, names="value")
        self.unit.observe(self._on_unit, names="value")
        self.cancel.on_click(lambda _: self._cancel.set())
        self.save_png.on_click(lambda _: self.export(("png",)))
        self.save_csv.on_click(lambda _: self.export(("csv",)))
        if compute:
            self.compute()

    def _locked(self, function):
        """``function`` run under the explorer's lock: matplotlib figures are not thread-safe."""

        def run(*args, **kwargs):
            with self._lock:
                return function(*args, **kwargs)

        return run

    @staticmethod
    def _as_mapping(items: Sequence[str] | Mapping[str, Any], name: str) -> dict[str, Any]:
        if isinstance(items, str):
            raise TypeError(f"{name} must be a list of names or a mapping, not a single string")
        mapping = dict(items) if isinstance(items, Mapping) else {item: item for item in items}
        if not mapping:
            raise ValueError(f"{name}: give at least one")
        return mapping

    # -- what the selection means ----------------------------------------------------------------
    def key(self, checkpoint: str | None = None) -> tuple[str, str, str]:
        """The cache key of the current selection (or of ``checkpoint`` with the current dataset
        and transformation set): (checkpoint, dataset, transformation set)."""
        return (checkpoint or self.checkpoint.value, self.dataset.value, self.transformation.value)

    def overlays(self) -> list[str]:
        """The checkpoints drawn beside the selected one: the compare checkpoint, the baseline."""
        shown = [self.compare.value, self.baseline]
        return [c for i, c in enumerate(shown) if c not in (None, NONE, self.checkpoint.value) and c not in shown[:i]]

    def compute(self, names: Sequence[str] | None = None, overlays: bool = True) -> ExplorerData:
        """Compute (or take from the cache) the current selection and the checkpoints drawn beside
        it, then draw every panel and say in the status what was computed and how long it took.
        Nothing on screen changes until every pass it needs has finished.

        Args:
            names: the measures to have (default: all the explorer's).
            overlays: also the checkpoints drawn beside it (otherwise those already computed).
        """
        self.timings = {}
        self._cancel.clear()
        data = self._get(self.checkpoint.value, names)
        labels = self.overlays()
        others = {label: self._get(label, names) for label in labels} if overlays else {
            label: cached for label in labels if (cached := self.cache.peek(self.key(label))) is not None}
        self.data, self.others = data, others
        self._shown = {name: getattr(self, name).value for name in SELECTORS}
        self._say()
        layer = self.layer.value if self.layer.value in self.data.layers else (
            self._initial_layer if self._initial_layer in self.data.layers else self.data.layers[-1])
        self._quiet = True
        try:
            self.layer.options = self.data.layers
            self.layer.value = layer
        finally:
            self._quiet = False
        self._on_layer(inputs=True)
        return self.data

    def ylim(self) -> tuple[float, float]:
        """The y range of panels 1 and 2: :func:`~tmlib.widgets.figures.y_range` of the measure
        over the selected and overlaid checkpoints (fixed for NV and NVSE)."""
        return y_range(self.measure.value, [self.data, *self.others.values()])

    def _draw(self, panels: Sequence[str]) -> None:
        """Draw ``panels`` (names of the panel widgets), then update them all at once. A canvas
        showing the same view already is left alone; each image panel's PNG is kept by what it
        shows (the last :data:`PNG_CACHE` of them): a view seen before is not drawn again."""
        start = time.perf_counter()
        d, measure, layer, unit = self.data, self.measure.value, self.layer.value, self.unit.value
        ylim = self.ylim()
        shown = (self.key(), tuple(self.others))
        depends = {"curve": (measure, ylim, layer), "heatmap": (measure, layer, unit, ylim),
                   "st": (measure, layer, unit), "maps": (measure, layer), "inputs": ()}
        make = {
            "curve": lambda fig=None: plot_layer_curve(d, measure, layer, fig, others=self.others,
                                                       label=self.checkpoint.value, ylim=ylim),
            "heatmap": lambda fig=None: plot_channel_values(d, measure, layer, unit, fig, ylim=ylim),
            "st": lambda fig=None: plot_st_matrix(d, layer, unit, fig, measure=measure),
            "maps": lambda: plot_extreme_maps(d, measure, layer, self._maps_figure),
            "inputs": lambda: plot_inputs(d),
        }
        hover = {
            "curve": lambda: curve_text(d, measure, self.others, self.checkpoint.value),
            "heatmap": lambda: channel_text(d, measure, layer),
            "st": lambda: st_text(d, layer, unit),
        }
        pngs, redrawn = {}, []
        for name in panels:
            key = (name, *shown, *depends[name])
            if name in CANVASES:
                canvas = getattr(self, name)
                if name == "curve" and self._drawn.get(name, ())[:-1] == key[:-1]:  # the layer alone
                    if self._drawn[name] != key:
                        mark_layer(canvas.figure.axes[0], d, measure, layer)
                        self._drawn[name] = key
                        redrawn.append(canvas)
                elif self._drawn.get(name) != key:  # each panel clears, or updates in place, itself
                    make[name](canvas.figure)
                    axes = canvas.figure.axes[0]  # the panel's own axes (a colorbar comes after it)
                    axes.format_coord = hover[name]()
                    for image in axes.images:
                        image.set_mouseover(False)  # the hover text says the value (not "[0.31]" too)
                    self._drawn[name] = key
                    redrawn.append(canvas)
                continue
            if key not in self._pngs:
                self._pngs[key] = figure_png(make[name]())
                while len(self._pngs) > PNG_CACHE:
                    self._pngs.popitem(last=False)
            self._pngs.move_to_end(key)
            pngs[name] = self._pngs[key]
        for canvas in redrawn:
            canvas.draw_idle()  # the browser asks for the new image; all of them within one round trip
        for name, png in pngs.items():
            getattr(self, name).value = png
        self.timings["draw"] = time.perf_counter() - start

    def panel_png(self, name: str) -> bytes:
        """PNG bytes of what panel ``name`` shows now (a canvas's figure rendered, an image's value)."""
        if name not in (*CANVASES, *IMAGES):
            raise ValueError(f"name: one of {[*CANVASES, *IMAGES]}, got {name!r}")
        return figure_png(getattr(self, name).figure) if name in CANVASES else getattr(self, name).value

    def _on_curve_click(self, event) -> None:
        """A click on the curve chooses the layer of the nearest point (the layer selector follows)."""
        if self.data is None or event.inaxes is not self.curve.figure.axes[0]:
            return
        layer = layer_at(self.data, self.measure.value, event.xdata)
        if layer is not None and layer != self.layer.value:
            self.layer.value = layer

    def _on_channel_click(self, event) -> None:
        """A click on a bar chooses its channel (the channel slider follows)."""
        if self.data is None or event.inaxes is not self.heatmap.figure.axes[0]:
            return
        channel = channel_at(self.data, self.measure.value, self.layer.value, event.xdata)
        if channel is not None and channel != self.unit.value:
            self.unit.value = channel

    def _on_layer(self, change: dict | None = None, inputs: bool = False) -> None:
        """A new layer or measure: redraw panels 1–3 (no forward). The measure dropdown offers
        the measures defined for the layer (the current one if it is)."""
        if self._quiet or self.data is None or self.layer.value is None:
            return
        with self._lock:
            self._layer_changed(inputs)

    def _layer_changed(self, inputs: bool) -> None:
        channels = self.data.channels(self.layer.value)
        offered = self.data.measures_for(self.layer.value)
        self._quiet = True
        try:
            self.unit.max = channels - 1  # the slider clamps its value into range itself
            if list(self.measure.options) != offered:
                current = self.measure.value
                self.measure.options = offered
                self.measure.value = current if current in offered else offered[0]
        finally:
            self._quiet = False
        self._draw(["curve", "heatmap", "st", "maps", *(["inputs"] if inputs else [])])

    def _on_unit(self, change: dict | None = None) -> None:
        """A new unit: redraw the channel panel (its marked bar) and the ST matrix only."""
        if self._quiet or self.data is None or self.layer.value is None:
            return
        with self._lock:
            self._draw(["heatmap", "st"])

    def select(self, layer: str | None = None, unit: int | None = None, measure: str | None = None) -> None:
        """Programmatic selection (as a person would with the widgets); validates the names."""
        if self.data is None:
            raise ValueError("layer: nothing computed yet; call compute() first")
        self.data.check(layer=layer if layer is not None else self.layer.value, measure=measure)
        if layer is not None:
            self.layer.value = layer
        if measure is not None:
            self.measure.value = measure
        if unit is not None:
            self.data.check(layer=self.layer.value, unit=unit)
            self.unit.value = unit

    def figure(self) -> Figure:
        """The current view as one static figure (every panel, the overlaid curves)."""
        if self.data is None:
            raise ValueError("nothing computed yet; call compute() first")
        return explorer_figure(self.data, self.measure.value, self.layer.value, self.unit.value,
                               others=self.others, label=self.checkpoint.value, ylim=self.ylim())

    def export(self, what: Sequence[str] = ("png", "csv")) -> list[Path]:
        """Write the current view as PNG and/or its values as CSV into ``export_dir`` (see
        :func:`~tmlib.widgets.export.save_view`); the paths written are shown under the buttons."""
        if self.data is None:
            raise ValueError("nothing computed yet; call compute() first")
        stem = view_stem("explorer", *self.key(), self.measure.value, self.layer.value, f"ch{self.unit.value}")
        paths = save_view(self.export_dir, stem, self.data, self.measure.value, self.layer.value, self.unit.value,
                          others=self.others, label=self.checkpoint.value, what=what)
        self.saved.value = ('<div style="word-break: break-all; line-height: 1.3">wrote '
                            + ", ".join(f"<code>{path}</code>" for path in paths) + "</div>")
        return paths

    def _repr_mimebundle_(self, **kwargs: Any):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict) and "text/plain" in bundle:  # what a saved notebook shows without a kernel
            bundle["text/plain"] = ("Layer explorer (an interactive widget: it needs a running kernel; "
                                    "the static figure of this view is shown further down)")
        return bundle
