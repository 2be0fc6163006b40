"""Same-equivariance measures (Quiroga, CLEI EJ 2021): does a feature map follow its input?

A feature map F is *same-equivariant* to a transformation t when F(t x) = t F(x): rotating the
input rotates the map the same way. Two views of it:

* Variance-based (TVSE, SVSE, NVSE). Every output of the ST pass is transformed back,
  B_ij = t_j⁻¹(F(t_j(x_i))), spatially on every channel of the [C, H, W] map, with the exact
  inverse of the full affine matrix (``ts.inverse().apply_each(block, fill=0)``; the normalised
  matrix acts on any H×W, so a 7×7 map is de-transformed by the same matrix as the 28×28 input).
  Then TV, SV and NV exactly as in :mod:`tmlib.measures.variance`, on B instead of A
  (``mode="element"|"channel"``, ``stat="std"|"var"``). TVSE = 0: perfectly same-equivariant.
* Distance-based (DSES): per channel, d_ij = sqrt(mean_hw (F(t_j x_i) − t_j F(x_i))²), averaged
  over all n·m pairs (i, j); ``normalize=True`` L2-normalises both maps before comparing them (as
  the reference library does; all-zero maps stay zero). Output [C] per layer. The warps of
  F(x_i) use ``ts.apply(·, fill=0)``.

Only feature maps can be same-equivariant: layers whose activation has no spatial dimensions
([F], e.g. Linear outputs) are skipped — their states do nothing, and results list them under
``metadata["skipped_layers"]``. A pass in which no layer has spatial dimensions is an error, raised
after the first block (when the layers are known); a set without exact inverses, or DSES without
the identity and without ``reference=True``, is an error before the first forward.

Bilinear warps lose content at the borders and interpolate, so only exact groups (``c4()``,
``d4()``, ``flips()``) can give exactly 0; affine sets give small positive values even for a
perfectly equivariant map. ``ExactTransformationSet`` shifts (``cyclic_shifts``) are in pixels of
the *input*: on a downsampled feature map they are not the same translation.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..transforms import apply_uncopied, identity_index
from .base import LayerInfo, Measure, PassContext, StatSpec
from .functional import divide_nv
from .moments import STMoments, use_numba
from .se_kernels import map_distance_sums, warped_distance_sums
from .states import SumState
from .variance import VarianceMeasure

__all__ = [
    "DetransformedMoments",
    "DetransformedMomentsSpec",
    "DistanceSameEquivariance",
    "NormalizedVarianceSE",
    "ReferenceOutputs",
    "ReferenceOutputsSpec",
    "SameEquivarianceDistanceSpec",
    "SameEquivarianceDistanceState",
    "SampleVarianceSE",
    "TransformationVarianceSE",
]

_SKIP_NOTE = "no spatial dimensions"


def _inverse_set(ts: Any):
    """The set of exact inverses of ``ts``, or a ValueError that says what is missing."""
    inverse = getattr(ts, "inverse", None)
    if ts is None or not callable(inverse):
        raise ValueError(
            f"ts: same-equivariance needs a transformation set with an exact inverse (ts.inverse(), "
            f"e.g. tmlib.transforms.rotations(...) or c4()), got {type(ts).__name__ if ts is not None else None}"
        )
    try:
        inv = inverse()
    except NotImplementedError:
        inv = None
    if inv is None or not callable(getattr(inv, "apply_each", None)):
        raise ValueError(
            f"ts: same-equivariance needs a transformation set with an exact inverse; "
            f"{type(ts).__name__}.inverse() gives no set with apply_each"
        )
    return inv


def _maps(block: torch.Tensor, layer: LayerInfo, leading: int) -> torch.Tensor:
    """[*lead, *shape] → [*lead, C', H, W] (all dims before H, W merged into channels), float."""
    x = block.reshape(*block.shape[:leading], -1, layer.shape[-2], layer.shape[-1])
    return x if x.is_floating_point() else x.float()


# ---------------------------------------------------------------------------- states


class DetransformedMoments(SumState):
    """STMoments of B_ij = t_j⁻¹(F(t_j(x_i))) for a spatial layer; a no-op for other layers.

    ``update(block [b, m, *shape])`` de-transforms slice j by the exact inverse of matrix j
    (``ts.inverse().apply_each``, background 0) and feeds the result to an :class:`STMoments`.
    """

    reductions: ClassVar[dict[str, str]] = {"moments": "state"}

    def __init__(self, layer: LayerInfo, context: PassContext) -> None:
        self.layer = layer
        self.inverse = _inverse_set(context.ts) if layer.spatial else None
        self.moments = (
            STMoments(context.m, layer.size, context.device, context.backend) if layer.spatial else None
        )

    def update(self, block: torch.Tensor) -> None:
        if self.moments is None:
            return  # non-spatial layer: skipped, see the module docstring
        self.moments.update(self.inverse.apply_each(_maps(block, self.layer, 2), fill=0.0))


class ReferenceOutputs(SumState):
    """Reference-pass state: the outputs F(x_i) of the untransformed samples, for DSES.

    Kept as float32 [b, *shape] blocks, in order: n·C·H·W·4 bytes per spatial layer (e.g. 1 GB for
    10,000 samples of a 32×28×28 layer), capped by ``max_memory_mb``. Nothing is kept for
    non-spatial layers, nor when ``ts`` contains the identity (that column of the main pass is
    F(x_i) already). Read with :meth:`read` by (global) sample index: both passes see the samples
    in the same order, so the main pass's k-th sample is row k here, whatever the block sizes.
    Parts of a dataset merge (their blocks are concatenated, keeping their sample indices).
    """

    reductions: ClassVar[dict[str, str]] = {"blocks": "cat", "starts": "cat", "n": "sum"}

    def __init__(self, layer: LayerInfo, context: PassContext, max_memory_mb: float) -> None:
        self.layer = layer
        self.active = layer.spatial and identity_index(context.ts) is None
        self.max_bytes = float(max_memory_mb) * 2**20
        self.blocks: list[torch.Tensor] = []
        self.starts: list[int] = []  # global index of the first sample of each block
        self.n = 0
        self.start = 0  # global index of this state's first sample

    def seek(self, start: int, stop: int | None = None) -> None:
        self.start = start

    def update(self, block: torch.Tensor) -> None:
        if not self.active:
            return
        needed = (self.n + block.shape[0]) * self.layer.size * 4
        if needed > self.max_bytes:
            raise ValueError(
                f"layer {self.layer.name!r}: DistanceSameEquivariance's reference pass keeps F(x) of every "
                f"untransformed sample, more than {needed / 2**20:.1f} MB after {self.n + block.shape[0]} "
                f"samples, over max_memory_mb={self.max_bytes / 2**20:g}; include the identity in ts "
                "(then nothing is stored), observe fewer layers (layers=[...]), or raise max_memory_mb"
            )
        self.starts.append(self.start + self.n)
        self.blocks.append(block.to(torch.float32, copy=True))  # copy: in-place ops may follow
        self.n += block.shape[0]

    def merge(self, other: ReferenceOutputs) -> ReferenceOutputs:
        super().merge(other)
        order = sorted(range(len(self.starts)), key=self.starts.__getitem__)
        self.starts, self.blocks = [self.starts[i] for i in order], [self.blocks[i] for i in order]
        return self

    def read(self, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) (global sample indices) as [count, *shape]."""
        k = bisect.bisect_right(self.starts, start) - 1
        parts = []
        while count > 0:
            if k < 0 or k >= len(self.blocks) or not 0 <= start - self.starts[k] < self.blocks[k].shape[0]:
                raise RuntimeError(
                    f"layer {self.layer.name!r}: the main pass reached sample {start + count} but the reference "
                    f"pass stored only {self.n}; both passes must see the same samples in the same order"
                )
            offset = start - self.starts[k]
            take = min(count, self.blocks[k].shape[0] - offset)
            parts.append(self.blocks[k][offset : offset + take])
            start, count, k = start + take, count - take, k + 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class SameEquivarianceDistanceState(SumState):
    """Σ over (i, j) of d_ij = sqrt(mean_hw (F(t_j x_i) − t_j F(x_i))²) per channel, float64 [C'].

    F(x_i) is the identity column of the block when ``ts`` has one, else read from the
    :class:`ReferenceOutputs` of the same layer at the sample index (``seek`` tells a state of one
    sample block where its samples start).
    """

    reductions: ClassVar[dict[str, str]] = {"total": "sum", "count": "sum", "n": "sum"}

    def __init__(
        self,
        layer: LayerInfo,
        context: PassContext,
        normalize: bool,
        reference: ReferenceOutputs | None,
    ) -> None:
        self.layer = layer
        self.ts = context.ts
        self.normalize = normalize
        self.m = context.m
        self.identity = identity_index(context.ts)
        self.reference = reference if self.identity is None else None
        self.spatial = layer.spatial
        self.fused = use_numba(context.backend, context.device)
        self.total: torch.Tensor | None = None
        self.count = 0  # pairs (i, j) seen
        self.n = 0  # samples seen
        self.cursor = 0  # index of the next sample: the row of the reference outputs to read
        self.stop: int | None = None  # the end of this state's samples (None: all of them)

    def seek(self, start: int, stop: int | None = None) -> None:
        """This state is fed samples ``start`` … ``stop`` − 1 (a state of one sample block)."""
        self.cursor, self.stop = start, stop

    def update(self, block: torch.Tensor) -> None:
        if not self.spatial:
            return
        if self.fused and self.identity is not None:  # t_j F(x_i) formed inside the kernel, never stored
            d = warped_distance_sums(_maps(block, self.layer, 2), self.identity, self.ts, self.normalize)
            if d is not None:
                return self._add(d, block.shape[0])
        self.consume(*self.warped(block))

    def warped(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's maps y = F(t_j x_i) and t_j F(x_i), both [b, m, C', H, W] (the warps as
        computed, m outermost: read in place by the kernel); G-EED's spatial action of the same
        set on the identity column is the same tensor (``LatentEquivarianceState.update_with``)."""
        y = _maps(block, self.layer, 2)
        if self.identity is not None:
            fx = y[:, self.identity]
        else:
            fx = _maps(self.reference.read(self.cursor, block.shape[0]), self.layer, 1).to(
                device=y.device, dtype=y.dtype
            )
        return y, apply_uncopied(self.ts, fx)

    def consume(self, y: torch.Tensor, expected: torch.Tensor) -> None:
        """Add the distances of one block: y and expected as :meth:`warped` gives them."""
        self._add(map_distance_sums(y, expected, self.normalize, self.fused), y.shape[0])

    def _add(self, d: torch.Tensor, b: int) -> None:
        self.total = d if self.total is None else self.total + d  # d: [C']
        self.count += b * self.m
        self.n += b
        self.cursor += b
        if self.reference is not None and self.stop is not None and self.cursor == self.stop:
            self.reference = None  # everything read: let the stored outputs be freed with the pass

    def mean(self) -> np.ndarray:
        return (self.total / self.count).cpu().numpy()


@dataclass(frozen=True)
class DetransformedMomentsSpec(StatSpec):
    """ST moments of the de-transformed feature maps (:class:`DetransformedMoments`)."""

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> DetransformedMoments:
        return DetransformedMoments(layer, context)


@dataclass(frozen=True)
class ReferenceOutputsSpec(StatSpec):
    """F(x) of the n untransformed samples, kept per spatial layer (:class:`ReferenceOutputs`)."""

    max_memory_mb: float

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> ReferenceOutputs:
        return ReferenceOutputs(layer, context, self.max_memory_mb)


@dataclass(frozen=True)
class SameEquivarianceDistanceSpec(StatSpec):
    """DSES sums per channel (:class:`SameEquivarianceDistanceState`); with ``reference``, F(x) of
    a set without the identity comes from an extra pass over the untransformed samples."""

    normalize: bool
    reference: bool
    max_memory_mb: float

    def reference_spec(self) -> StatSpec | None:
        return ReferenceOutputsSpec(self.max_memory_mb) if self.reference else None

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> SameEquivarianceDistanceState:
        if identity_index(context.ts) is None and reference is None and layer.spatial:
            raise ValueError(
                f"layer {layer.name!r}: no reference-pass outputs; DistanceSameEquivariance(reference=True) "
                "must be evaluated with tmlib.measures.evaluate"
            )
        return SameEquivarianceDistanceState(layer, context, self.normalize, reference)


# ---------------------------------------------------------------------------- measures


class _SpatialOnly(Measure):
    """Computes spatial layers only; the others go to ``metadata["skipped_layers"]``."""

    restricted = True

    def skip_reason(self, layer: LayerInfo) -> str | None:
        return None if layer.spatial else _SKIP_NOTE

    def all_skipped_message(self, skipped: dict[str, str]) -> str:
        return (
            f"{self.name}: no observed layer has spatial dimensions [C, H, W]; same-equivariance "
            f"compares feature maps with transformed feature maps. Skipped layers: {list(skipped)}"
        )


class _VarianceSE(_SpatialOnly, VarianceMeasure):
    """TV/SV/NV of the de-transformed ST matrix; options ``mode`` and ``stat`` as the variance family."""

    def spec(self) -> StatSpec:
        return DetransformedMomentsSpec()

    def check(self, context: PassContext) -> None:
        _inverse_set(context.ts)

    def moments(self, state: DetransformedMoments) -> STMoments:
        return state.moments


class TransformationVarianceSE(_VarianceSE):
    """TVSE: mean over samples of the spread over transformations of t_j⁻¹ F(t_j x_i); 0 when F is
    same-equivariant. Per activation (``mode="element"``, [C, H, W]) or channel ([C])."""

    short_name = "TVSE"

    def compute_layer(self, state: DetransformedMoments, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return self.tv(state, layer)


class SampleVarianceSE(_VarianceSE):
    """SVSE: mean over transformations of the spread over samples of t_j⁻¹ F(t_j x_i)."""

    short_name = "SVSE"

    def compute_layer(self, state: DetransformedMoments, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return self.sv(state, layer)


class NormalizedVarianceSE(_VarianceSE):
    """NVSE = TVSE / SVSE with NV's convention (0/0 → 1, x/0 → +inf); channel mode divides the
    channel means."""

    short_name = "NVSE"

    def compute_layer(self, state: DetransformedMoments, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return divide_nv(self.tv(state, layer), self.sv(state, layer))


class DistanceSameEquivariance(_SpatialOnly):
    """DSES: mean over samples and transformations of sqrt(mean_hw (F(t_j x) − t_j F(x))²), per channel.

    Args:
        normalize: L2-normalise both maps before comparing them.
        reference: how F(x) of the *untransformed* samples is obtained. ``False`` (default): from the
            identity transformation of ``ts`` (a matrix equal to eye(3)), so the model still sees
            exactly n·m images; a ``ts`` without the identity then raises a ValueError (before any
            forward). ``True``: one extra forward of the n untransformed samples (the engine's
            reference pass), whose outputs are kept per spatial layer as float32 [n, C, H, W]
            (≤ ``max_memory_mb`` each) and read back in order; with an identity in ``ts`` the pass
            still runs but nothing is stored and the identity column is used.
        max_memory_mb: cap on the reference outputs kept per layer.

    Returns per spatial layer a float64 array [C]; non-spatial layers are skipped (metadata).
    """

    short_name = "DSES"

    def __init__(
        self, normalize: bool = False, reference: bool = False, max_memory_mb: float = 1024.0
    ) -> None:
        if not isinstance(normalize, bool) or not isinstance(reference, bool):
            raise TypeError(
                f"normalize and reference must be True or False, got {normalize!r}, {reference!r}"
            )
        if not max_memory_mb > 0:
            raise ValueError(f"max_memory_mb must be positive, got {max_memory_mb!r}")
        self.normalize = normalize
        self.reference = reference
        self.max_memory_mb = float(max_memory_mb)

    def options(self) -> dict:
        return {"normalize": self.normalize}

    def spec(self) -> StatSpec:
        return SameEquivarianceDistanceSpec(self.normalize, self.reference, self.max_memory_mb)

    def check(self, context: PassContext) -> None:
        ts = context.ts
        if ts is None or not callable(getattr(ts, "apply", None)):
            raise ValueError(
                "ts: DistanceSameEquivariance transforms F(x) by the set itself, so it needs a "
                f"transformation set with apply(), got {type(ts).__name__ if ts is not None else None}"
            )
        if identity_index(ts) is None and not self.reference:
            raise ValueError(
                f"ts {getattr(ts, 'name', type(ts).__name__)!r} contains no identity transformation, so "
                "F(x) of the untransformed samples is not among the n·m forwards; use "
                "DistanceSameEquivariance(reference=True) (one extra forward of the n samples, storing "
                "[n, C, H, W] float32 per layer) or include the identity in ts"
            )

    def compute_layer(self, state: SameEquivarianceDistanceState, layer: LayerInfo,
                      fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return state.mean()

    def result_metadata(self, states: Mapping[str, Any]) -> dict[str, Any]:
        return {"reference_pass": self.reference}
