"""The variance family of Quiroga et al. [Q23]: transformational, sample and normalized variance.

For an activation a with ST matrix A_ij = a(t_j(x_i)), n samples and m transformations:

* TV(a) = (1/n) Σ_i s_j(A_ij)   — spread caused by the transformations;
* SV(a) = (1/m) Σ_j s_i(A_ij)   — spread caused by the data;
* NV(a) = TV(a) / SV(a)         — 0: invariant; ≈1: transformations move the unit as much as data.

s is the unbiased standard deviation (``stat="std"``, the published default) or the unbiased
variance (``stat="var"``). NV's division follows the published code: SV > 0 → TV/SV; SV = 0 and
TV = 0 (a dead or constant unit) → 1; SV = 0 and TV > 0 → +inf. Layer means skip non-finite values.

``mode="element"`` gives one value per activation (shape [C, H, W] or [F]); ``mode="channel"``
gives one per feature map, the ratio of the spatial means (NV_c = mean_hw TV / mean_hw SV), the
default of the [Q23] experiments; ``mode="aggregate"`` first collapses each feature map to one
value (``agg="mean"``, ``"sum"`` or ``"max"`` over H, W) and then measures that value, as in the
2019 paper. On layers without spatial dimensions all modes agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import LayerInfo, Measure, PassContext, StatSpec
from .functional import channel_mean, divide_nv
from .moments import Moments, STMoments

__all__ = [
    "AggregatedMoments",
    "AggregatedMomentsSpec",
    "NormalizedVariance",
    "SampleVariance",
    "TransformationVariance",
    "VarianceMeasure",
    "channel_mean",
    "divide_nv",
]

_MODES = ("element", "channel", "aggregate")
_AGGREGATES = ("mean", "sum", "max")
_STATS = ("std", "var")


class AggregatedMoments(STMoments):
    """STMoments of each feature map collapsed to one value (mean, sum or max over H, W)."""

    def __init__(self, m: int, layer: LayerInfo, agg: str, device, backend: str):
        self.spatial = layer.spatial
        self.agg = agg
        channels = int(np.prod(layer.shape[:-2])) if layer.spatial else layer.size
        super().__init__(m, channels, device, backend)

    def update(self, block: torch.Tensor) -> None:
        if self.spatial:
            maps = block.flatten(-2)  # [b, m, ..., H·W]
            block = maps.amax(-1) if self.agg == "max" else maps.sum(-1) if self.agg == "sum" else maps.mean(-1)
        super().update(block)


@dataclass(frozen=True)
class AggregatedMomentsSpec(StatSpec):
    """ST moments of every feature map collapsed to one value by ``agg`` (the 2019 paper's mode)."""

    agg: str

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> AggregatedMoments:
        return AggregatedMoments(context.m, layer, self.agg, context.device, context.backend)


class VarianceMeasure(Measure):
    """Options (``mode``, ``stat``, ``agg``) and read-outs shared by the variance family and by
    the same-equivariance variances (which read the same quantities from de-transformed maps)."""

    def __init__(self, mode: str = "element", stat: str = "std", agg: str = "mean") -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if stat not in _STATS:
            raise ValueError(f"stat must be one of {_STATS}, got {stat!r}")
        if agg not in _AGGREGATES:
            raise ValueError(f"agg must be one of {_AGGREGATES}, got {agg!r}")
        self.mode = mode
        self.stat = stat
        self.agg = agg

    def options(self) -> dict:
        options = {"mode": self.mode, "stat": self.stat}
        return {**options, "agg": self.agg} if self.mode == "aggregate" else options

    def spec(self) -> StatSpec:
        return AggregatedMomentsSpec(self.agg) if self.mode == "aggregate" else Moments()

    def moments(self, state: Any) -> STMoments:
        """The STMoments inside the layer's state (the state itself here)."""
        return state

    def _shape(self, layer: LayerInfo) -> tuple[int, ...]:
        if self.mode == "aggregate" and layer.spatial:
            return (int(np.prod(layer.shape[:-2])),)
        return layer.shape

    def tv(self, state: Any, layer: LayerInfo) -> np.ndarray:
        """TV per activation (per channel in channel mode)."""
        return self._finish(self.moments(state).transformational(self.stat).reshape(self._shape(layer)), layer)

    def sv(self, state: Any, layer: LayerInfo) -> np.ndarray:
        """SV per activation (per channel in channel mode)."""
        return self._finish(self.moments(state).sample(self.stat).reshape(self._shape(layer)), layer)

    def _finish(self, values: np.ndarray, layer: LayerInfo) -> np.ndarray:
        return channel_mean(values, layer.shape) if self.mode == "channel" else values


class TransformationVariance(VarianceMeasure):
    """TV: mean over samples of the spread over transformations (per activation or channel)."""

    short_name = "TV"

    def compute_layer(self, state: Any, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return self.tv(state, layer)


class SampleVariance(VarianceMeasure):
    """SV: mean over transformations of the spread over samples (per activation or channel)."""

    short_name = "SV"

    def compute_layer(self, state: Any, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return self.sv(state, layer)


class NormalizedVariance(VarianceMeasure):
    """NV = TV / SV; in channel mode the ratio of the channel means of TV and SV."""

    short_name = "NV"

    def compute_layer(self, state: Any, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return divide_nv(self.tv(state, layer), self.sv(state, layer))
