"""The explorer's data: one pass of the engine for the measures *and* the pictures.

The pictures' data are statistics like any other, declared as specs and fed by the same pass as
the measures (:func:`tmlib.engine.collect`): :class:`ChannelMeansSpec` keeps the spatial mean of
every channel for the first samples ([n_st, m, C], the ST matrix of every channel) and
:class:`FeatureMapsSpec` the full feature maps of one chosen image under every transformation
([m, C, H, W]). No second observer, no guess of the engine's block size: the engine tells each
state where its samples start.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..adapters import default_fill, images_of
from ..checks import check_int
from ..engine import collect
from ..measures import (
    DistanceSameEquivariance,
    GEEDEquivariance,
    GEEDInvariance,
    Measure,
    NormalizedVariance,
    NormalizedVarianceSE,
    SampleVariance,
    TransformationVariance,
    TransformationVarianceSE,
)
from ..measures.base import LayerInfo, PassContext, StatSpec
from ..measures.states import SumState
from ..results import MeasureResult

__all__ = ["MEASURES", "ChannelMeansSpec", "ExplorerCache", "ExplorerData", "FeatureMapsSpec",
           "applicable_measures", "channel_order", "compute"]

# Measures offered by the explorer (per channel where the measure has channels, as in Quiroga et al.
# 2023). For all but SV a low value means "invariant" (or "equivariant"); SV is a reference scale.
# "NV (element)" is NV per activation (the element mode), shown per channel as the mean over the
# channel's positions; it is read from the same moments as channel-mode NV: no extra state.
MEASURES: dict[str, Callable[[], Measure]] = {
    "NV": lambda: NormalizedVariance(mode="channel"),
    "NV (element)": lambda: NormalizedVariance(mode="element"),
    "TV": lambda: TransformationVariance(mode="channel"),
    "SV": lambda: SampleVariance(mode="channel"),
    "NVSE": lambda: NormalizedVarianceSE(mode="channel"),
    "TVSE": lambda: TransformationVarianceSE(mode="channel"),
    "DSES": lambda: DistanceSameEquivariance(),
    "GEED-inv": lambda: GEEDInvariance(),
    "GEED-eq": lambda: GEEDEquivariance(),
}
#: What a low value of each measure means (titles of the extreme-channel panel).
LOW_MEANS = {"NV": "invariant", "NV (element)": "invariant", "TV": "invariant", "NVSE": "same-equivariant", "TVSE": "same-equivariant",
             "DSES": "same-equivariant", "GEED-inv": "invariant", "GEED-eq": "equivariant"}


# ----------------------------------------------------------------------------------- statistics


class ChannelMeans(SumState):
    """Spatial mean of every channel (the unit itself for layers without spatial dimensions) for
    samples 0 … limit − 1: float32 [limit, m, C]. Merging fills the rows the other part holds."""

    def __init__(self, layer: LayerInfo, m: int, limit: int) -> None:
        channels = int(np.prod(layer.shape[:-2])) if len(layer.shape) == 3 else layer.size
        self.spatial = len(layer.shape) == 3
        self.values = np.zeros((limit, m, channels), dtype=np.float32)
        self.filled = np.zeros(limit, dtype=bool)
        self.cursor = 0

    def seek(self, start: int, stop: int | None = None) -> None:
        self.cursor = start

    def update(self, block: torch.Tensor) -> None:
        b, limit = block.shape[0], len(self.values)
        stop = min(self.cursor + b, limit)
        if stop > self.cursor:
            part = block[: stop - self.cursor]
            means = part.float().mean(dim=(-2, -1)) if self.spatial else part.reshape(*part.shape[:2], -1).float()
            self.values[self.cursor : stop] = means.cpu().numpy()
            self.filled[self.cursor : stop] = True
        self.cursor += b

    def merge(self, other: ChannelMeans) -> ChannelMeans:
        self.values[other.filled] = other.values[other.filled]
        self.filled |= other.filled
        return self

    def copy(self) -> ChannelMeans:
        new = super().copy()
        new.values, new.filled = self.values.copy(), self.filled.copy()
        return new


class FeatureMaps(SumState):
    """The layer's output for sample ``image`` under every transformation: float32 [m, C, H, W]
    (or [m, units]); None until that sample has passed."""

    reductions: ClassVar[dict[str, str]] = {}

    def __init__(self, image: int) -> None:
        self.image = image
        self.maps: np.ndarray | None = None
        self.cursor = 0

    def seek(self, start: int, stop: int | None = None) -> None:
        self.cursor = start

    def update(self, block: torch.Tensor) -> None:
        if self.cursor <= self.image < self.cursor + block.shape[0]:
            # A copy: a later in-place op (ReLU(inplace=True)) would overwrite a view of the output.
            chosen = block[self.image - self.cursor].float().cpu().clone()
            self.maps = (chosen if chosen.dim() == 4 else chosen.reshape(chosen.shape[0], -1)).numpy()
        self.cursor += block.shape[0]

    def merge(self, other: FeatureMaps) -> FeatureMaps:
        if other.maps is not None:
            self.maps = other.maps
        return self


@dataclass(frozen=True)
class ChannelMeansSpec(StatSpec):
    """:class:`ChannelMeans` of the first ``samples`` samples."""

    samples: int

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> ChannelMeans:
        return ChannelMeans(layer, context.m, self.samples)


@dataclass(frozen=True)
class FeatureMapsSpec(StatSpec):
    """:class:`FeatureMaps` of sample ``image``."""

    image: int

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> FeatureMaps:
        return FeatureMaps(self.image)


# ----------------------------------------------------------------------------------- data


@dataclass
class ExplorerData:
    """Everything the explorer draws, computed by one pass (see :func:`compute`).

    Attributes:
        results: measure name ("NV", "TV", …) → MeasureResult (per-channel values where the
            measure has channels, one value per layer for G-EED; measures defined on some layers
            only, e.g. same-equivariance on feature maps, miss the others).
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
        metadata: ``unavailable``: {measure: why it cannot run on this transformation set}.
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

    def extend(self, other: ExplorerData) -> ExplorerData:
        """Add the measures of ``other`` (a later pass of the same model, samples and set) to these."""
        if other.layers != self.layers or other.n_samples != self.n_samples:
            raise ValueError("other: a pass over other layers or samples cannot extend this one")
        self.results.update(other.results)
        self.images_forwarded += other.images_forwarded
        self.metadata.setdefault("unavailable", {}).update(other.metadata.get("unavailable", {}))
        return self

    def measures_for(self, layer: str) -> list[str]:
        """The measures that have values for ``layer``, in :attr:`measures` order."""
        self.check(layer=layer)
        return [name for name, result in self.results.items() if layer in result.values]

    def check(self, layer: str | None = None, measure: str | None = None, unit: int | None = None) -> None:
        """Raise ValueError naming the argument when a layer, measure or unit is not available."""
        if measure is not None and measure not in self.results:
            raise ValueError(f"measure: unknown measure {measure!r}; available: {self.measures}")
        if layer is not None and layer not in self.st_means:
            raise ValueError(f"layer: unknown layer name {layer!r}; available: {self.layers}")
        if measure is not None and layer is not None and layer not in self.results[measure].values:
            reason = self.results[measure].metadata.get("skipped_layers", {}).get(layer, "not measured")
            raise ValueError(f"measure: {measure!r} is not defined for layer {layer!r} ({reason}); "
                             f"available there: {self.measures_for(layer)}")
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
        """float [C] (or [1] for a measure with one value per layer): the measure's values of
        ``layer``; a measure with one value per activation ([C, H, W], the element mode) as the
        mean of each channel's finite values (NaN for a channel with none)."""
        self.check(layer=layer, measure=measure)
        values = np.asarray(self.results[measure][layer], dtype=float)
        if values.ndim == 3 and values.shape[0] == self.st_means[layer].shape[-1]:
            finite = np.isfinite(values)
            count = finite.sum(axis=(1, 2))
            total = np.where(finite, values, 0.0).sum(axis=(1, 2))
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)
        return values.reshape(-1)

    def per_channel(self, measure: str, layer: str) -> bool:
        """Whether the measure has one value per channel of ``layer`` (not one per layer)."""
        return self.values(measure, layer).size == self.channels(layer)

    def st_matrix(self, layer: str, unit: int) -> np.ndarray:
        """float32 [n_st, m]: channel ``unit`` of ``layer`` for each sample × transformation."""
        self.check(layer=layer, unit=unit)
        return self.st_means[layer][:, :, unit]


def channel_order(data: ExplorerData, measure: str, layer: str) -> np.ndarray:
    """Channel indices sorted by the measure, lowest (most invariant) first; NaNs last."""
    values = data.values(measure, layer)
    key = np.where(np.isfinite(values), values, np.inf)
    return np.argsort(key, kind="stable")


def applicable_measures(names: Sequence[str], ts: Any) -> tuple[dict[str, Measure], dict[str, str]]:
    """The measures of :data:`MEASURES` named in ``names`` whose checks pass for ``ts``, and why
    the others cannot run on it (e.g. G-EED's latent equivariance needs the identity in the set)."""
    context = PassContext(m=len(ts), ts=ts)
    ok, unavailable = {}, {}
    for name in names:
        measure = MEASURES[name]()
        try:
            measure.check(context)
            ok[name] = measure
        except ValueError as error:
            unavailable[name] = str(error)
    return ok, unavailable


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
        measures: name → measure (default: every measure of :data:`MEASURES` that can run on
            ``ts``; the others are listed in ``metadata["unavailable"]``); all are computed, so
            switching the measure later is a redraw.
        layers: layer names (default: those ``evaluate`` observes).
        image: index of the sample whose feature maps and transformed versions are kept.
        max_st_samples: rows of the ST matrices kept (the first samples), n_st = min(n, this).
        on_progress: called as ``on_progress(samples_done, n)`` after every block.

    Returns:
        ExplorerData; the model has seen exactly n·m images (plus n if a measure needs a
        reference pass).
    """
    unavailable: dict[str, str] = {}
    if measures is None:
        measures, unavailable = applicable_measures(list(MEASURES), ts)
    if not measures:
        raise ValueError("measures: give at least one measure")
    images = images_of(x)
    n, m = images.shape[0], len(ts)
    image = check_int("image", image)
    if not 0 <= image < n:
        raise ValueError(f"image: an index into the {n} samples is needed, got {image!r}")
    max_st_samples = check_int("max_st_samples", max_st_samples, 2)
    fill = default_fill(x, fill)
    named = dict(measures)
    st_spec, maps_spec = ChannelMeansSpec(min(n, max_st_samples)), FeatureMapsSpec(image)
    states = collect(model, images, ts, named, layers=layers, fill=fill, batch_size=batch_size,
                     progress=on_progress if on_progress is not None else False, statistics=[st_spec, maps_spec])
    results = states.compute(named)
    device = next(iter(model.parameters()), images).device
    inputs = ts.apply(images[image : image + 1].to(device), fill=fill)[0].float().cpu().numpy()
    return ExplorerData(
        results=results,
        layers=list(states.layers),
        st_means={layer: s.values for layer, s in states.layer_states(st_spec).items()},
        maps={layer: s.maps for layer, s in states.layer_states(maps_spec).items()},
        inputs=inputs,
        transformation_labels=list(ts.labels()),
        image=image,
        n_samples=n,
        images_forwarded=int(states.metadata.get("images_forwarded", n * m)),
        title=title,
        metadata={"unavailable": unavailable},
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

    def peek(self, key: Hashable) -> ExplorerData | None:
        """The cached data for ``key``, or None (nothing computed)."""
        return self._items.get(key)

    def add(self, key: Hashable, data: ExplorerData) -> ExplorerData:
        """Keep ``data`` (a pass just run) for ``key``, or add its measures to what is kept there."""
        self.computations += 1
        if key in self._items:
            return self._items[key].extend(data)
        self._items[key] = data
        return data

    def get(self, key: Hashable, make: Callable[[], ExplorerData]) -> ExplorerData:
        """The cached data for ``key``, computing it with ``make()`` the first time."""
        if key not in self._items:
            self._items[key] = make()
            self.computations += 1
        return self._items[key]
