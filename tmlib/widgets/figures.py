"""The explorer's four panels, drawn from an :class:`~tmlib.widgets.data.ExplorerData` into a
matplotlib ``Figure`` (or ``SubFigure``) without pyplot, so nothing is shown twice in a notebook and
everything is testable without a browser. The per-layer curve is :func:`tmlib.plots.layer_curves`."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import MaxNLocator

from ..plots import layer_curves
from .data import LOW_MEANS, ExplorerData, channel_order

__all__ = [
    "explorer_figure",
    "figure_png",
    "panel_3",
    "plot_channel_heatmap",
    "plot_extreme_maps",
    "plot_inputs",
    "plot_layer_curve",
    "plot_st_matrix",
]

Canvas = Figure | SubFigure


def _canvas(canvas: Canvas | None, size: tuple[float, float]) -> Canvas:
    return canvas if canvas is not None else Figure(figsize=size, layout="constrained")


def _direction(measure: str) -> tuple[str, str]:
    """Titles for the lowest- and highest-valued channels."""
    if measure in LOW_MEANS:
        word = LOW_MEANS[measure]
        return f"most {word} (lowest {measure})", f"least {word} (highest {measure})"
    return f"lowest {measure}", f"highest {measure}"


def plot_layer_curve(data: ExplorerData, measure: str, layer: str, canvas: Canvas | None = None) -> Canvas:
    """Panel 1: the measure's layer means over the layers, the selected layer highlighted
    (drawn by :func:`tmlib.plots.layer_curves`; layers the measure skips are left out)."""
    data.check(layer=layer, measure=measure)
    canvas = _canvas(canvas, (6.4, 3.6))
    ax = canvas.subplots()
    means = data.results[measure].layer_means()
    count = len(data.layers)
    frame = pd.DataFrame({"layer": list(means.index), "index": [data.layers.index(k) for k in means.index],
                          "value": means.to_numpy(), "label": measure})
    frame["depth"] = frame["index"] / max(count - 1, 1)
    layer_curves(frame, ax=ax, ylabel=f"{measure} (mean over channels)", title=f"(1) {measure} per layer")
    k = data.layers.index(layer)
    ax.axvline(k, color="tab:red", alpha=0.5, linestyle="--")
    ax.plot([k], [means[layer]], marker="o", markersize=11, color="tab:red", label=f"selected: {layer}")
    ax.tick_params(axis="x", labelsize=8)
    ax.title.set_fontsize(10)
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
    what = f"of its {c} channels, sorted descending" if data.per_channel(measure, layer) else "(one value per layer)"
    ax.set_title(f"(2) {layer}: {measure} {what}", fontsize=10)
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
    and least invariant channel (by ``measure``, or, for a measure with one value per layer such as
    G-EED, by the first per-channel measure of the layer); a line per channel for layers without maps."""
    data.check(layer=layer, measure=measure)
    if not data.per_channel(measure, layer):
        measure = next((mm for mm in data.measures_for(layer) if data.per_channel(mm, layer)), measure)
    order = channel_order(data, measure, layer) if data.per_channel(measure, layer) else np.arange(data.channels(layer))
    lowest, highest = int(order[0]), int(order[-1])
    maps = data.maps[layer]
    values = data.values(measure, layer) if data.per_channel(measure, layer) else np.full(data.channels(layer), np.nan)
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


def panel_3(data: ExplorerData, measure: str, layer: str, unit: int) -> Figure:
    """Panel 3 alone: the ST matrix of ``unit`` and the extreme channels' maps."""
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
