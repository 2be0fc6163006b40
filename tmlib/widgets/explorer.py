"""The interactive explorer (ipywidgets): choose what to measure, then browse layers and units.

Dropdowns (checkpoint, dataset, transformation set, measure, layer), a unit slider and a progress
bar drive the figures of :mod:`tmlib.widgets.figures`, rendered as PNG ``Image`` widgets with stable
CSS classes (``tmlib-explorer``, ``tmlib-layer``, ``tmlib-unit``, ``tmlib-curve``, ``tmlib-heatmap``,
``tmlib-st``, ``tmlib-inputs``) for browser tests. The measure dropdown offers the measures defined
for the selected layer (same-equivariance on feature maps only, for instance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch import nn

from .data import MEASURES, ExplorerCache, ExplorerData, applicable_measures, compute
from .figures import explorer_figure, figure_png, panel_3, plot_channel_heatmap, plot_inputs, plot_layer_curve

__all__ = ["Explorer"]


def _image_widget(css: str):
    import ipywidgets as w

    image = w.Image(format="png", layout=w.Layout(max_width="100%", height="auto"))
    image.add_class(css)
    return image


class Explorer:
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
        compute: compute the first selection right away (otherwise call :meth:`compute`).

    Changing the checkpoint, dataset or transformation set computes (once per combination, with
    a progress bar); changing the measure, layer or unit only redraws from the cache.
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
    ) -> None:
        import ipywidgets as w

        if not models:
            raise ValueError("models: give at least one model (label → nn.Module or ModelSpec)")
        unknown = [mm for mm in measures if mm not in MEASURES]
        if unknown or not measures:
            raise ValueError(f"measures: choose from {list(MEASURES)}, got {list(measures)}")
        self.measure_names = list(measures)
        self.models = dict(models)
        self.datasets = self._as_mapping(datasets, "datasets")
        self.transformations = self._as_mapping(transformations, "transformations")
        self.n_samples, self.seed, self.image, self.max_st_samples = n_samples, seed, image, max_st_samples
        self.data_root, self.models_dir = data_root, models_dir
        self.cache = cache if cache is not None else ExplorerCache()
        self.data: ExplorerData | None = None
        self._loaded: dict[str, nn.Module] = {}
        self._initial_layer = layer
        self._quiet = False  # set while the explorer itself moves selectors: one redraw, not several

        style = {"description_width": "110px"}
        self.checkpoint = w.Dropdown(options=list(self.models), description="checkpoint", style=style,
                                     layout=w.Layout(width="420px"))
        self.dataset = w.Dropdown(options=list(self.datasets), description="dataset", style=style)
        self.transformation = w.Dropdown(options=list(self.transformations), description="transformations",
                                         style=style)
        self.measure = w.Dropdown(options=list(measures), description="measure", style=style)
        self.layer = w.Dropdown(options=[], description="layer", style=style)
        self.unit = w.IntSlider(value=0, min=0, max=0, description="channel", style=style,
                                continuous_update=False)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="computing", style=style)
        self.status = w.HTML()
        self.curve, self.heatmap = _image_widget("tmlib-curve"), _image_widget("tmlib-heatmap")
        self.st, self.inputs = _image_widget("tmlib-st"), _image_widget("tmlib-inputs")
        for widget, css in [(self.layer, "tmlib-layer"), (self.unit, "tmlib-unit"),
                            (self.measure, "tmlib-measure"), (self.progress, "tmlib-progress"),
                            (self.status, "tmlib-status")]:
            widget.add_class(css)
        controls = w.VBox([
            w.HBox([self.checkpoint, self.dataset]),
            w.HBox([self.transformation, self.measure]),
            w.HBox([self.layer, self.unit]),
            w.HBox([self.progress, self.status]),
        ])
        panels = w.GridBox([self.curve, self.heatmap, self.st, self.inputs],
                           layout=w.Layout(grid_template_columns="repeat(2, minmax(0, 1fr))", grid_gap="6px"))
        self.widget = w.VBox([controls, panels])
        self.widget.add_class("tmlib-explorer")

        for selector in (self.checkpoint, self.dataset, self.transformation):
            selector.observe(self._on_selection, names="value")
        self.measure.observe(self._on_layer, names="value")
        self.layer.observe(self._on_layer, names="value")
        self.unit.observe(self._on_unit, names="value")
        if compute:
            self.compute()

    @staticmethod
    def _as_mapping(items: Sequence[str] | Mapping[str, Any], name: str) -> dict[str, Any]:
        if isinstance(items, str):
            raise TypeError(f"{name} must be a list of names or a mapping, not a single string")
        mapping = dict(items) if isinstance(items, Mapping) else {item: item for item in items}
        if not mapping:
            raise ValueError(f"{name}: give at least one")
        return mapping

    # -- what the selection means ----------------------------------------------------------------
    def key(self) -> tuple[str, str, str]:
        """The cache key of the current selection: (checkpoint, dataset, transformation set)."""
        return (self.checkpoint.value, self.dataset.value, self.transformation.value)

    def _model(self, label: str) -> nn.Module:
        if label not in self._loaded:
            from .. import experiments

            chosen = self.models[label]
            if isinstance(chosen, experiments.ModelSpec):
                chosen = experiments.trained_model(chosen, str(self.data_root), str(self.models_dir), progress=False)
            if not isinstance(chosen, nn.Module):
                raise TypeError(f"models: {label!r} must be an nn.Module or a ModelSpec, got {type(chosen).__name__}")
            self._loaded[label] = chosen.eval()
        return self._loaded[label]

    def _samples(self, label: str) -> Any:
        chosen = self.datasets[label]
        if isinstance(chosen, str):
            from .. import data
            from ..paths import resolve

            return data.load(chosen, "test", n=self.n_samples, root=resolve(self.data_root), seed=self.seed)
        return chosen

    def _transformation_set(self, label: str):
        chosen = self.transformations[label]
        if isinstance(chosen, str):
            from ..experiments import measurement_set

            return measurement_set(chosen)
        return chosen

    # -- computing and drawing ------------------------------------------------------------------
    def _report(self, done: int, total: int) -> None:
        self.progress.max = total
        self.progress.value = done

    def compute(self) -> ExplorerData:
        """Compute (or take from the cache) the current selection, then draw every panel."""
        key = self.key()
        if key not in self.cache:
            self.status.value = f"computing {' · '.join(key)} …"
            self.progress.value = 0
        checkpoint, dataset, transformation = key

        def make() -> ExplorerData:
            ts = self._transformation_set(transformation)
            measures, unavailable = applicable_measures(self.measure_names, ts)
            data = compute(self._model(checkpoint), self._samples(dataset), ts, measures=measures,
                           image=self.image, max_st_samples=self.max_st_samples, on_progress=self._report,
                           title=f"{checkpoint} | measured on {dataset}, {transformation}")
            data.metadata["unavailable"] = unavailable
            return data

        self.data = self.cache.get(key, make)
        self.progress.max = self.progress.value = max(1, self.data.n_samples)
        self.status.value = (f"{self.data.n_samples} samples × {len(self.data.transformation_labels)} "
                             f"transformations, {self.data.images_forwarded} images forwarded (cached)")
        layer = self.layer.value if self.layer.value in self.data.layers else (
            self._initial_layer if self._initial_layer in self.data.layers else self.data.layers[-1])
        self._quiet = True
        try:
            self.layer.options = self.data.layers
            self.layer.value = layer
        finally:
            self._quiet = False
        self.inputs.value = figure_png(plot_inputs(self.data))
        self._on_layer()
        return self.data

    def _on_selection(self, change: dict | None = None) -> None:
        self.compute()

    def _on_layer(self, change: dict | None = None) -> None:
        """A new layer or measure: redraw panels 1–3 from the cache (no forward). The measure
        dropdown offers the measures defined for the layer (the current one if it is)."""
        if self._quiet or self.data is None or self.layer.value is None:
            return
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
        self.curve.value = figure_png(plot_layer_curve(self.data, self.measure.value, self.layer.value))
        self.heatmap.value = figure_png(plot_channel_heatmap(self.data, self.measure.value, self.layer.value))
        self._on_unit()

    def _on_unit(self, change: dict | None = None) -> None:
        """A new unit: redraw panel 3 only."""
        if self._quiet or self.data is None or self.layer.value is None:
            return
        self.st.value = figure_png(panel_3(self.data, self.measure.value, self.layer.value, self.unit.value))

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
        """The current selection as one static figure (all four panels)."""
        if self.data is None:
            raise ValueError("nothing computed yet; call compute() first")
        return explorer_figure(self.data, self.measure.value, self.layer.value, self.unit.value)

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)
