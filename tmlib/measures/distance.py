"""The distance family: TV/SV/NV with a mean pairwise distance in place of the standard deviation.

For a unit u (an activation, or a whole feature map) with ST matrix A_ij = u(t_j(x_i)), n samples
and m transformations:

* TD(u) = (1/n) Σ_i  mean_{j<j'} d(A_ij, A_ij')   — distance caused by the transformations;
* SD(u) = (1/m) Σ_j  mean_{i<i'} d(A_ij, A_i'j)   — distance caused by the data;
* ND(u) = TD(u) / SD(u), with NV's division convention (0/0 → 1, x/0 → +inf; :func:`divide_nv`).

Rows and columns are always *whole*: the reference library averages distances inside batches, so
its values depend on the batch size; these do not.

Options:

* ``unit="element"``: every activation is a scalar, d = |a − b| (or (a − b)²); output shaped like
  the activation. ``unit="channel"``: every feature map [H, W] is one vector of H·W values, d the
  Euclidean (or squared Euclidean) distance between the flattened maps; one value per channel
  ([C]). On layers without spatial dimensions ([F]) both units agree (each channel is a scalar).
* ``normalize=True``: every feature map is divided by its L2 norm first (all-zero maps stay zero);
  the element unit then compares the activations of the normalised maps. Layers without spatial
  dimensions are not normalised (a scalar "map" would become its sign), as in the reference library.
* ``metric="sqeuclidean"`` (default) or ``"euclidean"``.

How it is computed — the two metrics are deliberately different code paths:

* ``sqeuclidean`` is *exact from moments*: the mean pairwise squared distance of P vectors is
  2 × Σ_coordinates (unbiased variance), so TD = 2·TV[var] and SD = 2·SV[var] per activation,
  summed over H·W for the channel unit. Single pass, no storage; without ``normalize`` the spec is
  the very :class:`~tmlib.measures.moments.Moments` that TV/SV/NV declare, so asking for both
  costs nothing extra.
* ``euclidean`` needs the raw values. TD is complete inside a block (every sample comes with all
  its m transformations). SD needs all n samples of each column: the state keeps every value in a
  float32 buffer (n·m·F·4 bytes per layer, ``max_memory_mb`` per layer, 1024 by default; exceeding
  it raises a ValueError naming the layer) and computes the column distances at the end, chunked,
  in float64. The cost of SD is O(n²·m·F): fine for hundreds or a few thousand samples, prohibitive
  for tens of thousands — use ``sqeuclidean`` there. Pairwise scalar distances use the sorted-sum
  identity Σ_{p<p'} |x_p − x_p'| = Σ_k (2k − P − 1) x_(k) (O(P log P), exact); vectors use a float64
  Gram matrix of the values shifted by the first member of their row/column (so constant rows and
  columns give exactly 0, which NV's convention needs; otherwise the absolute error is ≲ 1e-8 × the
  vectors' spread); the kernels are :func:`~tmlib.measures.functional.pairwise_distance_sum`.
  TD keeps no buffer (its own state); SD and ND share one, which also sums the rows for ND, so
  TD + ND with ``euclidean`` compute the row distances twice (cheap next to SD). Jackknife
  replicates (``evaluate(blocks=K)``) recompute SD's column distances for every left-out block:
  K + 1 times the SD computation, no extra forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .base import LayerInfo, Measure, PassContext, StatSpec
from .functional import CHUNK_ELEMENTS, divide_nv, l2_normalize_maps, pairwise_distance_sum
from .moments import Moments, STMoments
from .states import SumState

__all__ = [
    "L2NormalizedMoments",
    "NormalizedDistance",
    "NormalizedMapMoments",
    "PairwiseDistanceSpec",
    "PairwiseDistances",
    "SampleDistance",
    "TransformationDistance",
    "l2_normalize_maps",
    "pairwise_distance_sum",
]

_UNITS = ("element", "channel")
_METRICS = ("sqeuclidean", "euclidean")


def _units(
    block: torch.Tensor, layer: LayerInfo, unit: str, normalize: bool, dtype: torch.dtype
) -> torch.Tensor:
    """[b, m, *shape] → [b, m, G, D]: G units of D coordinates each, in ``dtype``.

    Channel unit on a spatial layer: G = C (all leading dims), D = H·W; otherwise D = 1.
    ``normalize`` divides each [H, W] map by its norm before the element/channel split.
    """
    b, m = block.shape[:2]
    x = block.to(dtype)
    if layer.spatial:
        maps = x.reshape(b, m, -1, layer.shape[-2] * layer.shape[-1])
        if normalize:
            maps = l2_normalize_maps(maps)
        return maps if unit == "channel" else maps.reshape(b, m, -1, 1)
    return x.reshape(b, m, -1, 1)


# ---------------------------------------------------------------------------- states


class L2NormalizedMoments(SumState):
    """:class:`STMoments` of the ST matrix after L2-normalising every feature map of the block.

    The block [b, m, *shape] is normalised per [H, W] map in its own dtype (float32 activations:
    normalised values to ~1e-7, like the activations themselves), then fed to an ordinary STMoments,
    which accumulates in float64 as usual. Layers without spatial dimensions are passed through
    unchanged (see the module docstring).
    """

    reductions: ClassVar[dict[str, str]] = {"moments": "state"}

    def __init__(self, layer: LayerInfo, context: PassContext) -> None:
        self.layer = layer
        self.moments = STMoments(context.m, layer.size, context.device, context.backend)

    def update(self, block: torch.Tensor) -> None:
        if self.layer.spatial:
            b, m = block.shape[:2]
            maps = block.reshape(b, m, -1, self.layer.shape[-2] * self.layer.shape[-1])
            block = l2_normalize_maps(maps)
        self.moments.update(block)


class PairwiseDistances(SumState):
    """Exact mean pairwise Euclidean distances over whole rows and (optionally) whole columns.

    Units are G groups of D coordinates (see :func:`_units`). Rows are summarised per block as
    Σ_i mean_{j<j'} d(A_ij, A_ij') [G] (float64). With ``keep_columns`` every block is also kept as
    float32 [m·G, b, D] on the state's device (n·m·G·D·4 bytes in all, at most ``max_memory_mb``)
    for the column distances, computed once in :meth:`sample` and cached. Merging adds the row
    sums and concatenates the kept blocks (exact: pairs across the parts are formed in ``sample``).
    """

    reductions: ClassVar[dict[str, str]] = {"row_sum": "sum", "columns": "cat", "n": "sum"}

    def __init__(
        self,
        layer: LayerInfo,
        context: PassContext,
        unit: str,
        normalize: bool,
        keep_columns: bool,
        max_memory_mb: float | None,
    ) -> None:
        if context.m < 2:
            raise ValueError(
                f"the transformation set must have at least 2 transformations, got m={context.m}"
            )
        self.layer, self.unit, self.normalize = layer, unit, normalize
        self.m = context.m
        self.device = torch.device(context.device)
        self.keep_columns = keep_columns
        self.max_bytes = float(max_memory_mb) * 2**20 if max_memory_mb is not None else float("inf")
        self.n = 0
        self.row_sum: torch.Tensor | None = None  # [G] float64, created with the first block
        self.columns: list[torch.Tensor] = []  # float32 [m·G, b, D] blocks, column-major
        self._sample_cache: np.ndarray | None = None

    def update(self, block: torch.Tensor) -> None:
        b, m = block.shape[:2]
        if m != self.m:
            raise ValueError(f"expected blocks of {self.m} transformations, got {m}")
        x = _units(block, self.layer, self.unit, self.normalize, block.dtype)
        _, _, g, d = x.shape
        if self.keep_columns:
            needed = (self.n + b) * m * g * d * 4
            if needed > self.max_bytes:
                raise ValueError(
                    f"layer {self.layer.name!r}: metric='euclidean' keeps every value of the layer for the "
                    f"sample distance, which needs more than {needed / 2**20:.1f} MB after {self.n + b} samples "
                    f"(n·m·F·4 bytes, m={m}, F={g * d}), over max_memory_mb={self.max_bytes / 2**20:g}; "
                    "use metric='sqeuclidean' (exact from moments, no storage), observe fewer layers "
                    "(layers=[...]), use fewer samples, or raise max_memory_mb"
                )
            # Stored column-major, [m·G, b, D]: at the end, a chunk of columns is then a run of
            # contiguous rows of every block. A fresh tensor: the hooked output may be overwritten
            # later by an in-place op (ReLU(inplace=True)), so it must never be aliased.
            cols = torch.empty(m * g, b, d, dtype=torch.float32, device=x.device)
            self.columns.append(cols.copy_(x.reshape(b, m * g, d).transpose(0, 1)))
        rows = x.permute(0, 2, 1, 3).reshape(b * g, m, d)
        per_row = pairwise_distance_sum(rows).reshape(b, g) / (m * (m - 1) / 2)
        self.row_sum = per_row.sum(0) if self.row_sum is None else self.row_sum + per_row.sum(0)
        self.n += b
        self._sample_cache = None

    def merge(self, other: PairwiseDistances) -> PairwiseDistances:
        super().merge(other)
        self._sample_cache = None
        return self

    def copy(self) -> PairwiseDistances:
        new = super().copy()
        new._sample_cache = None
        return new

    def transformational(self) -> np.ndarray:
        """[G]: (1/n) Σ_i mean_{j<j'} ‖A_ij − A_ij'‖."""
        return (self.row_sum / self.n).cpu().numpy()

    def sample(self) -> np.ndarray:
        """[G]: (1/m) Σ_j mean_{i<i'} ‖A_ij − A_i'j‖, over all n samples of each column."""
        if not self.keep_columns:
            raise RuntimeError(
                "this state keeps no columns (it serves TransformationDistance only)"
            )
        if self.n < 2:
            raise ValueError(f"the sample distance needs at least 2 samples, got n={self.n}")
        if self._sample_cache is None:
            q_total, _, d = self.columns[0].shape
            sums = torch.empty(q_total, dtype=torch.float64, device=self.device)
            q_chunk = max(1, CHUNK_ELEMENTS // (self.n * d))
            buffer = torch.empty(min(q_chunk, q_total), self.n, d, device=self.device)
            for q0 in range(0, q_total, q_chunk):
                # Gather only this chunk of columns from all blocks: [q, n, D], into one reused
                # buffer (a fresh allocation per chunk cost more than the copy itself).
                part = buffer[: min(q_chunk, q_total - q0)]
                torch.cat([c[q0 : q0 + q_chunk] for c in self.columns], dim=1, out=part)
                sums[q0 : q0 + q_chunk] = pairwise_distance_sum(part)
            means = sums / (self.n * (self.n - 1) / 2)
            self._sample_cache = means.reshape(self.m, -1).mean(0).cpu().numpy()
        return self._sample_cache


@dataclass(frozen=True)
class NormalizedMapMoments(StatSpec):
    """ST moments of the L2-normalised feature maps (:class:`L2NormalizedMoments`)."""

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> L2NormalizedMoments:
        return L2NormalizedMoments(layer, context)


@dataclass(frozen=True)
class PairwiseDistanceSpec(StatSpec):
    """Euclidean row (and, with ``keep_columns``, column) distances (:class:`PairwiseDistances`)."""

    unit: str
    normalize: bool
    keep_columns: bool
    max_memory_mb: float | None = None

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> PairwiseDistances:
        return PairwiseDistances(layer, context, self.unit, self.normalize, self.keep_columns, self.max_memory_mb)


# ---------------------------------------------------------------------------- measures


class _DistanceMeasure(Measure):
    """Shared options and states of TD, SD and ND (see the module docstring)."""

    _needs_columns = True

    def __init__(
        self,
        unit: str = "element",
        metric: str = "sqeuclidean",
        normalize: bool = False,
        max_memory_mb: float = 1024.0,
    ) -> None:
        if unit not in _UNITS:
            raise ValueError(f"unit must be one of {_UNITS}, got {unit!r}")
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        if not max_memory_mb > 0:
            raise ValueError(f"max_memory_mb must be positive, got {max_memory_mb!r}")
        self.unit, self.metric, self.normalize = unit, metric, normalize
        self.max_memory_mb = float(max_memory_mb)

    def options(self) -> dict:
        return {"unit": self.unit, "metric": self.metric, "normalize": self.normalize}

    def spec(self) -> StatSpec:
        if self.metric == "sqeuclidean":
            # Unnormalised: the same moments as TV/SV/NV (the variance family's spec).
            return NormalizedMapMoments() if self.normalize else Moments()
        if self._needs_columns:
            return PairwiseDistanceSpec(self.unit, self.normalize, True, self.max_memory_mb)
        return PairwiseDistanceSpec(self.unit, self.normalize, False)

    # Both return [G]-or-activation-shaped float64 arrays.
    def _shape(self, values: np.ndarray, layer: LayerInfo, summed: bool) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if self.unit == "element" or not layer.spatial:
            return values.reshape(layer.shape)
        if summed:  # moments give per-activation values: a map's squared distance sums them
            return values.reshape(-1, layer.shape[-2] * layer.shape[-1]).sum(axis=1)
        return values

    def _td(self, state, layer: LayerInfo) -> np.ndarray:
        if self.metric == "sqeuclidean":
            moments = state.moments if isinstance(state, L2NormalizedMoments) else state
            return self._shape(2.0 * moments.transformational("var"), layer, summed=True)
        return self._shape(state.transformational(), layer, summed=False)

    def _sd(self, state, layer: LayerInfo) -> np.ndarray:
        if self.metric == "sqeuclidean":
            moments = state.moments if isinstance(state, L2NormalizedMoments) else state
            return self._shape(2.0 * moments.sample("var"), layer, summed=True)
        return self._shape(state.sample(), layer, summed=False)


class TransformationDistance(_DistanceMeasure):
    """TD: mean over samples of the mean pairwise distance over transformations.

    Args:
        unit: ``"element"`` (one value per activation) or ``"channel"`` (one per feature map).
        metric: ``"sqeuclidean"`` (exact from moments, the default) or ``"euclidean"``.
        normalize: L2-normalise every feature map first.
        max_memory_mb: unused by TD (it stores nothing); accepted for symmetry with SD/ND.
    """

    short_name = "TD"
    _needs_columns = False

    def compute_layer(self, state, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return self._td(state, layer)


class SampleDistance(_DistanceMeasure):
    """SD: mean over transformations of the mean pairwise distance over all n samples.

    Args: as :class:`TransformationDistance`; with ``metric="euclidean"`` every value of the layer
    is kept (float32, n·m·F·4 bytes per layer) up to ``max_memory_mb`` per layer.
    """

    short_name = "SD"

    def compute_layer(self, state, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return self._sd(state, layer)


class NormalizedDistance(_DistanceMeasure):
    """ND = TD / SD, with NV's convention (0/0 → 1, x/0 → +inf). Args as :class:`SampleDistance`."""

    short_name = "ND"

    def compute_layer(self, state, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return divide_nv(self._td(state, layer), self._sd(state, layer))
