"""An interactive layer explorer (ipywidgets) and its static HTML export.

Three layers, each usable on its own:

* **Data** — :func:`compute` runs *one* pass of ``evaluate`` over the samples × transformations
  and, in the same forwards, keeps what the pictures need: every layer's per-channel spatial means
  for the first ``max_st_samples`` samples ([n_st, m, C], the ST matrix of every channel) and the
  full feature maps of one chosen image under all transformations ([m, C, H, W]). The result,
  :class:`ExplorerData`, lives in an :class:`ExplorerCache`; choosing another layer, unit or
  measure afterwards only redraws.
* **Figures** — ``plot_*`` functions draw the four panels from an :class:`ExplorerData` into a
  matplotlib ``Figure`` (or ``SubFigure``), without pyplot, so nothing is shown twice in a
  notebook and everything is testable without a browser; :func:`explorer_figure` puts all four on
  one page; :func:`export_html` writes one page per layer into an offline HTML report (nbconvert).
* **Widgets** — :class:`Explorer` wires dropdowns (checkpoint, dataset, transformation set,
  measure, layer), a unit slider and a progress bar to the figures, rendered as PNG ``Image``
  widgets with stable CSS classes (``tmlib-explorer``, ``tmlib-layer``, ``tmlib-unit``,
  ``tmlib-curve``, ``tmlib-heatmap``, ``tmlib-st``, ``tmlib-inputs``) for browser tests.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import MaxNLocator
from torch import nn

from .activations import LayerObserver
from .measures import Measure, NormalizedVariance, SampleVariance, TransformationVariance, evaluate
from .results import MeasureResult, atomic_write

__all__ = [
    "MEASURES",
    "Explorer",
    "ExplorerCache",
    "ExplorerData",
    "channel_order",
    "compute",
    "explorer_figure",
    "export_html",
    "figure_png",
    "plot_channel_heatmap",
    "plot_extreme_maps",
    "plot_inputs",
    "plot_layer_curve",
    "plot_st_matrix",
]

# Measures offered by the explorer (channel mode, as in Quiroga et al. 2023). For the invariance
# measures a low value means "invariant"; SV is a reference scale, not an invariance measure.
MEASURES: dict[str, Callable[[], Measure]] = {
    "NV": lambda: NormalizedVariance(mode="channel"),
    "TV": lambda: TransformationVariance(mode="channel"),
    "SV": lambda: SampleVariance(mode="channel"),
}
INVARIANCE_MEASURES = ("NV", "TV")

Canvas = Figure | SubFigure


@dataclass
class ExplorerData:
    """Everything the explorer draws, computed by one pass (see :func:`compute`).

    Attributes:
        results: measure name ("NV", "TV", …) → MeasureResult with [C] values per layer.
        layers: layer names in forward order.
        st_means: layer → float32 [n_st, m, C]: spatial mean of each channel (the unit itself for
            layers without spatial dimensions) for sample i under transformation j.
        maps: layer → float32 [m, C, H, W] (or [m, C]): the layer's output for the chosen image.
        inputs: float32 [m, C, H, W]: the chosen image under each transformation, as fed in.
        transformation_labels: m short labels ("45°", "×(0.8,0.8)", …).
        image: index of the chosen image among the samples.
        n_samples: samples measured (n ≥ n_st).
        images_forwarded: images the model saw in the pass (n·m).
        title: what was measured, for figure titles.
    """

    results: dict[str, MeasureResult]
    layers: list[str]
    st_means: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    inputs: np.ndarray
    transformation_labels: list[str]
    image: int
    n_samples: int
    images_forwarded: int
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def measures(self) -> list[str]:
        return list(self.results)

    def check(self, layer: str | None = None, measure: str | None = None, unit: int | None = None) -> None:
        """Raise ValueError naming the argument when a layer, measure or unit is not available."""
        if measure is not None and measure not in self.results:
            raise ValueError(f"measure: unknown measure {measure!r}; available: {self.measures}")
        if layer is not None and layer not in self.st_means:
            raise ValueError(f"layer: unknown layer name {layer!r}; available: {self.layers}")
        if unit is not None:
            if layer is None:
                raise ValueError("unit: a layer is needed to check a unit")
            channels = self.channels(layer)
            if isinstance(unit, bool) or not isinstance(unit, (int, np.integer)) or not 0 <= unit < channels:
                raise ValueError(f"unit: layer {layer!r} has channels 0…{channels - 1}, got {unit!r}")

    def channels(self, layer: str) -> int:
        """Number of channels (units, for layers without spatial dimensions) of ``layer``."""
        self.check(layer=layer)
        return self.st_means[layer].shape[-1]

    def values(self, measure: str, layer: str) -> np.ndarray:
        """float [C]: the measure's per-channel values of ``layer``."""
        self.check(layer=layer, measure=measure)
        return np.asarray(self.results[measure][layer], dtype=float).reshape(-1)

    def st_matrix(self, layer: str, unit: int) -> np.ndarray:
        """float32 [n_st, m]: channel ``unit`` of ``layer`` for each sample × transformation."""
        self.check(layer=layer, unit=unit)
        return self.st_means[layer][:, :, unit]


def channel_order(data: ExplorerData, measure: str, layer: str) -> np.ndarray:
    """Channel indices sorted by the measure, lowest (most invariant) first; NaNs last."""
    values = data.values(measure, layer)
    key = np.where(np.isfinite(values), values, np.inf)
    return np.argsort(key, kind="stable")


# ----------------------------------------------------------------------------------------------
# Data


def _as_tensor(x: Any) -> torch.Tensor:
    """Images [n, C, H, W] from a tensor, an ImageDataset or any dataset of (image, label)."""
    if isinstance(x, torch.Tensor):
        return x
    if callable(getattr(x, "tensors", None)):
        return x.tensors()[0]
    if hasattr(x, "__getitem__") and hasattr(x, "__len__"):
        items = [x[i] for i in range(len(x))]
        return torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])
    raise TypeError(f"x must be a tensor [n, C, H, W] or a dataset of images, got {type(x).__name__}")


class _Recorder:
    """Forward hooks that run alongside ``evaluate``'s own: keep the ST spatial means of the first
    ``n_st`` samples and the full maps of sample ``image`` (the model runs once for both)."""

    def __init__(self, model: nn.Module, layers: Sequence[str] | None, m: int, n: int, n_st: int,
                 image: int, on_progress: Callable[[int, int], None] | None):
        self.m, self.n, self.n_st, self.image = m, n, n_st, image
        self.on_progress = on_progress
        self.offset = 0  # index of the first sample of the current block
        self.block = 0   # samples in the current block
        self.means: dict[str, np.ndarray] = {}
        self.maps: dict[str, np.ndarray] = {}
        self.observer = LayerObserver(model, layers, self._keep)
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after)]

    def _before(self, module, args) -> None:
        rows = args[0].shape[0]
        if rows % self.m:
            raise ValueError(f"measures: a forward of {rows} images is not a block of samples × {self.m} "
                             "transformations (measures with a reference pass are not supported)")
        self.block = rows // self.m

    def _after(self, module, args, output) -> None:
        self.offset += self.block
        if self.on_progress is not None:
            self.on_progress(self.offset, self.n)

    def _keep(self, name: str, out: torch.Tensor) -> None:
        b, m = self.block, self.m
        per_sample = out.reshape(b, m, *out.shape[1:])
        if per_sample.dim() == 5:  # [b, m, C, H, W]: a channel is the spatial mean of its map
            means = per_sample.float().mean(dim=(-2, -1))
        else:
            means = per_sample.reshape(b, m, -1).float()
        if name not in self.means:
            self.means[name] = np.empty((self.n_st, m, means.shape[-1]), dtype=np.float32)
        stop = min(self.offset + b, self.n_st)
        if stop > self.offset:
            self.means[name][self.offset:stop] = means[: stop - self.offset].cpu().numpy()
        if self.offset <= self.image < self.offset + b:
            # A copy: a later in-place op (ReLU(inplace=True)) would overwrite a view of the output.
            chosen = per_sample[self.image - self.offset].float().cpu().clone()
            self.maps[name] = (chosen if chosen.dim() == 4 else chosen.reshape(m, -1)).numpy()

    def __enter__(self) -> Self:
        self.observer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.observer.__exit__(*exc)
        for handle in self._handles:
            handle.remove()


def compute(
    model: nn.Module,
    x: torch.Tensor | Any,
    ts,
    measures: Mapping[str, Measure] | None = None,
    layers: Sequence[str] | None = None,
    image: int = 0,
    max_st_samples: int = 32,
    fill: float | Sequence[float] | None = None,
    batch_size: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    title: str = "",
) -> ExplorerData:
    """One pass over samples × transformations: the measures and the pictures' activations.

    Args:
        model: any module taking images [B, C, H, W].
        x: samples, a tensor [n, C, H, W] or a dataset (an ImageDataset also gives the fill).
        ts: a transformation set with m ≥ 2 transformations.
        measures: name → measure (default: NV, TV, SV in channel mode, :data:`MEASURES`); all are
            computed, so switching the measure later is a redraw.
        layers: layer names (default: those ``evaluate`` observes).
        image: index of the sample whose feature maps and transformed versions are kept.
        max_st_samples: rows of the ST matrices kept (the first samples), n_st = min(n, this).
        on_progress: called as ``on_progress(samples_done, n)`` after every block.

    Returns:
        ExplorerData; the model has seen exactly n·m images.
    """
    if measures is None:
        measures = {name: make() for name, make in MEASURES.items()}
    if not measures:
        raise ValueError("measures: give at least one measure")
    if any(mm.reference_key() is not None for mm in measures.values()):
        raise ValueError("measures: measures that need an untransformed reference pass are not supported")
    images = _as_tensor(x)
    n, m = images.shape[0], len(ts)
    if isinstance(image, bool) or not isinstance(image, int) or not 0 <= image < n:
        raise ValueError(f"image: an index into the {n} samples is needed, got {image!r}")
    if isinstance(max_st_samples, bool) or not isinstance(max_st_samples, int) or max_st_samples < 2:
        raise ValueError(f"max_st_samples must be an integer ≥ 2, got {max_st_samples!r}")
    if fill is None:
        fill = getattr(x, "fill", 0.0)
    if layers is None and callable(getattr(model, "layer_names", None)):
        layers = model.layer_names()
    names = list(measures)
    with _Recorder(model, layers, m, n, min(n, max_st_samples), image, on_progress) as recorder:
        results = evaluate(model, images, ts, list(measures.values()), layers=layers, fill=fill,
                           batch_size=batch_size, progress=False)
    results = dict(zip(names, results.values(), strict=True))
    first = next(iter(results.values()))
    device = next(iter(model.parameters()), images).device
    inputs = ts.apply(images[image : image + 1].to(device), fill=fill)[0].float().cpu().numpy()
    return ExplorerData(
        results=results,
        layers=list(first.layer_names),
        st_means={layer: recorder.means[layer] for layer in first.layer_names},
        maps={layer: recorder.maps[layer] for layer in first.layer_names},
        inputs=inputs,
        transformation_labels=list(ts.labels()),
        image=image,
        n_samples=n,
        images_forwarded=int(first.metadata.get("images_forwarded", n * m)),
        title=title,
    )


class ExplorerCache:
    """Computed :class:`ExplorerData` by key (e.g. (checkpoint, dataset, transformation set)).

    ``computations`` counts the passes actually run, so a test can see that a redraw ran none."""

    def __init__(self) -> None:
        self._items: dict[Hashable, ExplorerData] = {}
        self.computations = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, make: Callable[[], ExplorerData]) -> ExplorerData:
        """The cached data for ``key``, computing it with ``make()`` the first time."""
        if key not in self._items:
            self._items[key] = make()
            self.computations += 1
        return self._items[key]


# ----------------------------------------------------------------------------------------------
# Figures (no pyplot: figures are drawn into Figure/SubFigure objects and rendered to PNG)


def _canvas(canvas: Canvas | None, size: tuple[float, float]) -> Canvas:
    return canvas if canvas is not None else Figure(figsize=size, layout="constrained")


def _direction(measure: str) -> tuple[str, str]:
    """Titles for the lowest- and highest-valued channels."""
    if measure in INVARIANCE_MEASURES:
        return f"most invariant (lowest {measure})", f"least invariant (highest {measure})"
    return f"lowest {measure}", f"highest {measure}"


def plot_layer_curve(data: ExplorerData, measure: str, layer: str, canvas: Canvas | None = None) -> Canvas:
    """Panel 1: the measure's layer means over the layers, the selected layer highlighted."""
    data.check(layer=layer, measure=measure)
    canvas = _canvas(canvas, (6.4, 3.6))
    ax = canvas.subplots()
    means = data.results[measure].layer_means()
    xs = np.arange(len(means))
    ax.plot(xs, means.to_numpy(), marker="o", markersize=4, color="tab:blue", label=measure)
    k = data.layers.index(layer)
    ax.axvline(k, color="tab:red", alpha=0.5, linestyle="--")
    ax.plot([k], [means.iloc[k]], marker="o", markersize=11, color="tab:red", label=f"selected: {layer}")
    ax.set_xticks(xs, list(means.index), rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel(f"{measure} (mean over channels)")
    ax.set_title(f"(1) {measure} per layer", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return canvas


def plot_channel_heatmap(data: ExplorerData, measure: str, layer: str, canvas: Canvas | None = None,
                         columns: int | None = None) -> Canvas:
    """Panel 2: the layer's per-channel values sorted descending, read row by row (``columns``
    cells per row, default a near-square grid); each cell is labelled with its channel index."""
    values = data.values(measure, layer)
    canvas = _canvas(canvas, (6.4, 3.6))
    ax = canvas.subplots()
    order = np.argsort(-np.where(np.isfinite(values), values, -np.inf), kind="stable")
    c = len(values)
    cols = min(c, columns or min(16, math.ceil(math.sqrt(c))))
    rows = math.ceil(c / cols)
    grid = np.full(rows * cols, np.nan)
    grid[:c] = values[order]
    image = ax.imshow(grid.reshape(rows, cols), cmap="viridis", aspect="auto")
    if c <= 256:  # which channel each cell is; unreadable beyond that
        middle = np.nanmean(values[np.isfinite(values)]) if np.isfinite(values).any() else 0.0
        for i, channel in enumerate(order):
            dark = not values[channel] > middle  # viridis is dark below the middle: white text there
            ax.text(i % cols, i // cols, str(channel), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows), [f"{r * cols}" for r in range(rows)])
    ax.set_xlabel("rank within row (cell text = channel index)")
    ax.set_ylabel("rank of the row's first cell")
    ax.set_title(f"(2) {layer}: {measure} of its {c} channels, sorted descending", fontsize=10)
    canvas.colorbar(image, ax=ax, label=f"{measure} (channel)")
    return canvas


def plot_st_matrix(data: ExplorerData, layer: str, unit: int, canvas: Canvas | None = None) -> Canvas:
    """Panel 3a: the ST matrix of one channel: spatial mean for sample × transformation."""
    st = data.st_matrix(layer, unit)
    canvas = _canvas(canvas, (4.5, 4.0))
    ax = canvas.subplots()
    image = ax.imshow(st, cmap="magma", aspect="auto", interpolation="nearest")
    labels = data.transformation_labels
    step = max(1, math.ceil(len(labels) / 8))
    ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("transformation")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"sample (first {st.shape[0]} of {data.n_samples})")
    ax.set_title(f"(3) ST matrix of {layer}, channel {unit}", fontsize=10)
    canvas.colorbar(image, ax=ax, label="mean activation")
    return canvas


def _columns(m: int, limit: int) -> list[int]:
    """At most ``limit`` transformation indices, evenly spread over the m."""
    if m <= limit:
        return list(range(m))
    return sorted({round(i * (m - 1) / (limit - 1)) for i in range(limit)})


def plot_extreme_maps(data: ExplorerData, measure: str, layer: str, canvas: Canvas | None = None,
                      limit: int = 8) -> Canvas:
    """Panel 3b: the chosen image's feature maps under the transformations for the layer's most
    and least invariant channel (by ``measure``); a line per channel for layers without maps."""
    order = channel_order(data, measure, layer)
    lowest, highest = int(order[0]), int(order[-1])
    maps = data.maps[layer]
    values = data.values(measure, layer)
    titles = _direction(measure)
    canvas = _canvas(canvas, (6.4, 3.0))
    labels = data.transformation_labels
    if maps.ndim == 4:
        cols = _columns(maps.shape[0], limit)
        axes = canvas.subplots(2, len(cols), squeeze=False)
        for row, (channel, title) in enumerate([(lowest, titles[0]), (highest, titles[1])]):
            chosen = maps[:, channel]
            vmin, vmax = float(chosen.min()), float(chosen.max())
            for col, j in enumerate(cols):
                ax = axes[row, col]
                ax.imshow(chosen[j], cmap="gray", vmin=vmin, vmax=vmax)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 1:
                    ax.set_xlabel(labels[j], fontsize=7)
            axes[row, 0].set_ylabel(f"ch {channel}\n{measure}={values[channel]:.2f}", fontsize=8)
            axes[row, 0].set_title(title, fontsize=8, loc="left")
    else:
        ax = canvas.subplots()
        for channel, title in [(lowest, titles[0]), (highest, titles[1])]:
            ax.plot(maps[:, channel], marker="o", markersize=3,
                    label=f"unit {channel}, {title} = {values[channel]:.2f}")
        step = max(1, math.ceil(len(labels) / 8))
        ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("transformation")
        ax.set_ylabel("activation")
        ax.legend(fontsize=7)
    what = "feature maps" if maps.ndim == 4 else "units"
    canvas.suptitle(f"(3) {layer}: {what} of image {data.image} under the transformations", fontsize=10)
    return canvas


def plot_inputs(data: ExplorerData, canvas: Canvas | None = None, columns: int = 8) -> Canvas:
    """Panel 4: the chosen image under every transformation (channels shown as grey or RGB)."""
    m = data.inputs.shape[0]
    cols = min(m, columns)
    rows = math.ceil(m / cols)
    canvas = _canvas(canvas, (max(5.5, 1.0 * cols + 0.5), 1.1 * rows + 0.6))  # room for the title
    axes = canvas.subplots(rows, cols, squeeze=False)
    lo, hi = float(data.inputs.min()), float(data.inputs.max())
    for j, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if j >= m:
            ax.axis("off")
            continue
        image = (data.inputs[j] - lo) / max(hi - lo, 1e-12)  # one scale for all: warps stay comparable
        ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
        ax.set_xlabel(data.transformation_labels[j], fontsize=7)
    canvas.suptitle(f"(4) the inputs: image {data.image} under the {m} transformations", fontsize=10)
    return canvas


def explorer_figure(data: ExplorerData, measure: str, layer: str, unit: int = 0) -> Figure:
    """All four panels on one figure (for the static export and the notebook's PNG)."""
    data.check(layer=layer, measure=measure, unit=unit)
    fig = Figure(figsize=(15, 10.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
    curve, heat = top.subfigures(1, 2)
    third, inputs = bottom.subfigures(1, 2, width_ratios=[1.25, 1])
    st, extreme = third.subfigures(2, 1, height_ratios=[1.1, 1])
    plot_layer_curve(data, measure, layer, curve)
    plot_channel_heatmap(data, measure, layer, heat)
    plot_st_matrix(data, layer, unit, st)
    plot_extreme_maps(data, measure, layer, extreme)
    plot_inputs(data, inputs, columns=min(8, math.ceil(math.sqrt(len(data.inputs)))))
    if data.title:
        fig.suptitle(data.title, fontsize=12)
    return fig


def _panel_3(data: ExplorerData, measure: str, layer: str, unit: int) -> Figure:
    fig = Figure(figsize=(6.6, 6.4), layout="constrained")
    st, extreme = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    plot_st_matrix(data, layer, unit, st)
    plot_extreme_maps(data, measure, layer, extreme)
    return fig


def figure_png(fig: Canvas, dpi: int = 90) -> bytes:
    """PNG bytes of a figure (deterministic for the same figure: no timestamps in the metadata)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Static export


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


# ----------------------------------------------------------------------------------------------
# Widgets


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
            from . import experiments

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
            from . import data
            from .paths import resolve

            return data.load(chosen, "test", n=self.n_samples, root=resolve(self.data_root), seed=self.seed)
        return chosen

    def _transformation_set(self, label: str):
        chosen = self.transformations[label]
        if isinstance(chosen, str):
            from .experiments import measurement_set

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
            return compute(self._model(checkpoint), self._samples(dataset), self._transformation_set(transformation),
                           image=self.image, max_st_samples=self.max_st_samples, on_progress=self._report,
                           title=f"{checkpoint} | measured on {dataset}, {transformation}")

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
        """A new layer or measure: redraw panels 1–3 from the cache (no forward)."""
        if self._quiet or self.data is None or self.layer.value is None:
            return
        channels = self.data.channels(self.layer.value)
        self._quiet = True
        try:
            self.unit.max = channels - 1  # the slider clamps its value into range itself
        finally:
            self._quiet = False
        self.curve.value = figure_png(plot_layer_curve(self.data, self.measure.value, self.layer.value))
        self.heatmap.value = figure_png(plot_channel_heatmap(self.data, self.measure.value, self.layer.value))
        self._on_unit()

    def _on_unit(self, change: dict | None = None) -> None:
        """A new unit: redraw panel 3 only."""
        if self._quiet or self.data is None or self.layer.value is None:
            return
        self.st.value = figure_png(_panel_3(self.data, self.measure.value, self.layer.value, self.unit.value))

    def select(self, layer: str | None = None, unit: int | None = None, measure: str | None = None) -> None:
        """Programmatic selection (as a person would with the widgets); validates the names."""
        if self.data is None:
            raise ValueError("layer: nothing computed yet; call compute() first")
        self.data.check(layer=layer, measure=measure)
        if measure is not None:
            self.measure.value = measure
        if layer is not None:
            self.layer.value = layer
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
