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

from collections.abc import Hashable

import numpy as np

from .base import LayerInfo, Measure, PassContext
from .moments import STMoments

__all__ = ["TransformationVariance", "SampleVariance", "NormalizedVariance", "divide_nv", "channel_mean"]

_MODES = ("element", "channel", "aggregate")
_AGGREGATES = ("mean", "sum", "max")
_STATS = ("std", "var")


def divide_nv(tv: np.ndarray, sv: np.ndarray) -> np.ndarray:
    """TV/SV with the published convention: 0/0 → 1, x/0 → +inf."""
    tv, sv = np.asarray(tv, dtype=np.float64), np.asarray(sv, dtype=np.float64)
    out = np.where(tv == 0, 1.0, np.inf)
    np.divide(tv, sv, out=out, where=sv > 0)
    return out


def channel_mean(values: np.ndarray, layer: LayerInfo) -> np.ndarray:
    """Mean over the two spatial dimensions of an activation-shaped array: [.., H, W] → [channels]."""
    values = values.reshape(layer.shape)
    if not layer.spatial:
        return values
    return values.reshape(-1, layer.shape[-2] * layer.shape[-1]).mean(axis=1)


class AggregatedMoments(STMoments):
    """STMoments of each feature map collapsed to one value (mean, sum or max over H, W)."""

    def __init__(self, m: int, layer: LayerInfo, agg: str, device, backend: str):
        self.spatial = layer.spatial
        self.agg = agg
        channels = int(np.prod(layer.shape[:-2])) if layer.spatial else int(np.prod(layer.shape))
        super().__init__(m, channels, device, backend)

    def update(self, block) -> None:
        if self.spatial:
            maps = block.flatten(-2)  # [b, m, ..., H·W]
            block = maps.amax(-1) if self.agg == "max" else maps.sum(-1) if self.agg == "sum" else maps.mean(-1)
        super().update(block)


class _VarianceMeasure(Measure):
    def __init__(self, mode: str = "element", stat: str = "std", agg: str = "mean") -> None:
        super().__init__()
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

    def statistic_key(self) -> Hashable:
        return ("aggregate", self.agg) if self.mode == "aggregate" else STMoments

    def new_state(self, layer: LayerInfo, context: PassContext) -> STMoments:
        if self.mode == "aggregate":
            return AggregatedMoments(context.m, layer, self.agg, context.device, context.backend)
        return STMoments(context.m, int(np.prod(layer.shape)), context.device, context.backend)

    def _shape(self, layer: LayerInfo) -> tuple[int, ...]:
        if self.mode == "aggregate" and layer.spatial:
            return (int(np.prod(layer.shape[:-2])),)
        return layer.shape

    def _tv(self, state: STMoments, layer: LayerInfo) -> np.ndarray:
        return state.transformational(self.stat).reshape(self._shape(layer))

    def _sv(self, state: STMoments, layer: LayerInfo) -> np.ndarray:
        return state.sample(self.stat).reshape(self._shape(layer))

    def _finish(self, values: np.ndarray, layer: LayerInfo) -> np.ndarray:
        return channel_mean(values, layer) if self.mode == "channel" else values


class TransformationVariance(_VarianceMeasure):
    """TV: mean over samples of the spread over transformations (per activation or channel)."""

    short_name = "TV"

    def compute_layer(self, state: STMoments, layer: LayerInfo) -> np.ndarray:
        return self._finish(self._tv(state, layer), layer)


class SampleVariance(_VarianceMeasure):
    """SV: mean over transformations of the spread over samples (per activation or channel)."""

    short_name = "SV"

    def compute_layer(self, state: STMoments, layer: LayerInfo) -> np.ndarray:
        return self._finish(self._sv(state, layer), layer)


class NormalizedVariance(_VarianceMeasure):
    """NV = TV / SV; in channel mode the ratio of the channel means of TV and SV."""

    short_name = "NV"

    def compute_layer(self, state: STMoments, layer: LayerInfo) -> np.ndarray:
        tv = self._finish(self._tv(state, layer), layer)
        sv = self._finish(self._sv(state, layer), layer)
        return divide_nv(tv, sv)
