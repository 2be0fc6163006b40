"""Figures from results: per-layer curves (the papers' main plot) and saving them reproducibly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and "ipykernel" not in os.environ.get("MPLBACKEND", ""):
    # Headless runs (papermill, CI) must not need a display; notebooks keep their inline backend.
    try:
        import IPython

        if IPython.get_ipython() is None:
            matplotlib.use("Agg")
    except ImportError:  # pragma: no cover
        matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .results import MeasureResult, atomic_write  # noqa: E402

__all__ = ["layer_curves", "layer_bands", "heatmap", "save_figure"]


def _as_frame(curves: Mapping[str, MeasureResult] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(curves, pd.DataFrame):
        return curves
    frames = []
    for label, result in curves.items():
        frame = result.to_frame()
        frame["label"] = label
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _label_layer_axis(ax: plt.Axes, frame: pd.DataFrame, x: str) -> None:
    """Layer names as ticks (one architecture) or depth in % (several architectures)."""
    if x == "layer":
        first = frame.drop_duplicates("index").sort_values("index")
        ax.set_xticks(first["index"], first["layer"], rotation=60, ha="right")
        ax.set_xlabel("layer (forward order)")
    else:
        ax.set_xlabel("depth (% of layers)")


def _finish_axes(ax, frame, x, ylabel, ylim, title) -> plt.Axes:
    """Axis labels, limits, title, grid and legend shared by the per-layer plots."""
    _label_layer_axis(ax, frame, x)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def layer_curves(
    curves: Mapping[str, MeasureResult] | pd.DataFrame,
    ax: plt.Axes | None = None,
    x: str = "layer",
    ylabel: str | None = None,
    ylim: tuple[float, float] | None = None,
    title: str | None = None,
) -> plt.Axes:
    """Plot the layer means of several results as one curve each, with a band where the frame has
    an interval (columns ``low`` and ``high``, e.g. from ``evaluate(..., blocks=K)``).

    Args:
        curves: ``{legend label: MeasureResult}`` or a tidy frame with columns
            layer, index, depth, value, label (and optionally low, high).
        x: ``"layer"`` (layer names on the axis, for one architecture) or ``"depth"``
            (0–100 % of the depth, to compare architectures).
        ylim: y range, e.g. (0, 1.4) as in [Q23]'s NV plots.
    """
    frame = _as_frame(curves)
    if ax is None:
        width = max(6.0, 0.45 * frame["index"].max() + 3) if x == "layer" else 7.0
        _, ax = plt.subplots(figsize=(width, 4))
    bands = {"low", "high"} <= set(frame.columns)
    for label, group in frame.groupby("label", sort=False):
        xs = group["index"] if x == "layer" else 100 * group["depth"]
        (line,) = ax.plot(xs, group["value"], marker="o", markersize=4, label=label)
        if bands and group["low"].notna().any():
            ax.fill_between(xs, group["low"], group["high"], color=line.get_color(), alpha=0.2, linewidth=0)
    measure = frame["measure"].iloc[0] if "measure" in frame and len(frame) else "value"
    return _finish_axes(ax, frame, x, ylabel or f"{measure} (layer mean)", ylim, title)


def layer_bands(
    frame: pd.DataFrame,
    group: str,
    ax: plt.Axes | None = None,
    x: str = "layer",
    ylabel: str = "value (layer mean)",
    ylim: tuple[float, float] | None = None,
    title: str | None = None,
) -> plt.Axes:
    """Mean ± one standard deviation per layer over repeated runs (e.g. seeds), one band per value
    of the ``group`` column. ``frame`` is tidy: layer, index, depth, value, and ``group``."""
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.45 * frame["index"].max() + 3), 4))
    for label, part in frame.groupby(group, sort=False):
        stats = part.groupby("index")["value"].agg(["mean", "std"]).sort_index()
        xs = stats.index if x == "layer" else 100 * stats.index / max(stats.index.max(), 1)
        runs = part.groupby("index").size().iloc[0]
        ax.plot(xs, stats["mean"], marker="o", markersize=3, label=f"{label} (mean ± std of {runs})")
        ax.fill_between(xs, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.25)
    return _finish_axes(ax, frame, x, ylabel, ylim, title)


def heatmap(
    table: pd.DataFrame,
    ax: plt.Axes | None = None,
    title: str | None = None,
    cbar_label: str = "",
    fmt: str = ".2f",
    cmap: str = "viridis",
) -> plt.Axes:
    """An annotated heatmap of a small table (rows × columns), with a labelled colour bar."""
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 * table.shape[1] + 3, 0.8 * table.shape[0] + 2))
    sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, ax=ax, cbar_kws={"label": cbar_label})
    if title:
        ax.set_title(title)
    return ax


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a figure atomically (PNG/PDF/SVG by suffix), creating the folder."""
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix[1:]))
