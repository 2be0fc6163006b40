"""G-empirical equivariance deviation (G-EED) of Kvinge et al. (NeurIPS 2022).

For a group G acting on the inputs (a transformation set ``ts`` of m elements) and optionally on a
layer f, over n samples:

    G-EED(f, D, d) = 1/(n·m) Σ_x Σ_g d( f(g·x), g·f'(x) ).

Every per-sample activation is flattened to one vector of D values ([C, H, W] → [C·H·W]): the
cosine is taken over the *whole* activation, not over its last axis.

* :class:`GEEDInvariance` — G acts trivially on the layer: each f(g·x) is compared with its orbit's
  centroid c_x = mean_h f(h·x) (the identity plays no special role). ``metric="cosine"`` gives
  d = 1 − cos, ``"euclidean"`` d = ‖·‖₂.
  ``normalize=True`` divides the mean cosine *similarity* to the centroid, S = 1 − G-EED, by M, the
  mean cosine similarity of pairs of distinct untransformed samples: ReLU outputs are non-negative,
  so even unrelated samples have cos > 0, and S alone overstates invariance. Ratio S/M: ≈1 means
  the orbit is no tighter than two random samples; larger means more invariant. M is taken over
  *all* n(n−1) ordered pairs, exactly, from the sum of the unit vectors
  (Σ_{i≠j} cos = ‖Σ u_i‖² − Σ ‖u_i‖²): the expectation that random pairs estimate, with no sampling
  noise, mergeable, and independent of the batching. The raw value (1 − S), M and the ratio are all
  reported per layer (``result.layer_metadata``, columns of ``result.to_frame()``: raw, baseline,
  method, relative; also ``result.metadata["raw"]``, ``["baseline"]``; :func:`geed_table`).
  *Guard:* with centred features (e.g. after BatchNorm, no ReLU) M is ≈ 0 or negative, and S/M is
  meaningless. Where M ≤ ``min_baseline`` the layer falls back to Euclidean distances, with a
  warning and ``metadata["method"][layer] = "euclidean-fallback"``: the ratio is then
  RMS‖f(g·x) − c_x‖ / RMS‖f(x_i) − f(x_j)‖ (the RMS has an exact, mergeable form, the mean of
  distances has not), a normalised *deviation*: 0 = invariant, ≈ √½ for an orbit as spread as the
  data. Compare layers by method.
* :class:`GEEDOutputKL` — the output layer: KL( p(g·x) ‖ p̄_x ), p = softmax of the layer,
  p̄_x = mean_g p(g·x). Computed on layers whose activation is a vector [K] (logits); layers with
  spatial dimensions are skipped (``metadata["skipped_layers"]``).
* :class:`GEEDEquivariance` — a known action of G on the layer: d( f(g·x), g·f(x) ), the same g on
  both sides. Default ``action="spatial"``: g moves every channel's map [H, W] as it moves the
  image (``ts.apply`` on the maps, background 0): exact for :func:`~tmlib.transforms.c4`,
  :func:`~tmlib.transforms.d4` and flips (no interpolation), approximate for sampled continuous
  groups (bilinear warps lose the corners). ``action="trivial"``: g·f(x) = f(x). A callable (or a
  ``{layer: callable | "spatial" | "trivial"}`` mapping) gives any other action, e.g. the field
  types of a steerable CNN (:meth:`tmlib.equivariant.SteerableCNN.latent_actions`): it receives
  f(x) [b, *shape] and returns g·f(x) for every g of ``ts``, [b, m, *shape]. Layers without a
  defined action (no spatial dimensions under ``"spatial"``) are skipped.

f(x) of the untransformed sample is the identity column of the pass (``ts`` must contain the
identity, as ``c4()``, ``d4()``, ``rotations(n)`` and the paper's sets do), so the model sees
exactly n·m images; a set without it is refused before the first forward, whatever the order of
the measures. Two zero vectors count as identical (cos = 1), a zero and a non-zero vector as
orthogonal (cos = 0). Every state holds float64 sums over samples, so results do not depend on the
batch size. Jackknife replicates (``evaluate(blocks=K)``) keep each layer's method (cosine or the
Euclidean fallback) of the full data, so that every replicate estimates the same quantity.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from ..results import MeasureResult
from ..transforms import apply_uncopied, identity_index
from .base import LayerInfo, LayerValue, Measure, PassContext, StatSpec
from .functional import cosine_from_products, cosine_similarity
from .geed_kernels import orbit_products, pair_products, unit_sums, warped_pair_products
from .moments import use_numba
from .states import ShiftedMoments, SumState

__all__ = [
    "GEEDEquivariance",
    "GEEDInvariance",
    "GEEDOutputKL",
    "LatentEquivarianceSpec",
    "LatentEquivarianceState",
    "OrbitSpec",
    "OrbitState",
    "cosine_similarity",
    "geed_table",
]

_METRICS = ("cosine", "euclidean")
Action = Callable[[torch.Tensor], torch.Tensor]


def _required_identity(ts: Any, what: str) -> int:
    j = identity_index(ts)
    if j is None:
        raise ValueError(
            f"ts {getattr(ts, 'name', type(ts).__name__)!r} contains no identity transformation; {what} "
            "needs f(x) of the untransformed samples, which is the identity column of the pass: "
            "use a set with the identity (c4(), d4(), rotations(n), the paper's sets)"
        )
    return j


def _check_metric(metric: Any) -> str:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    return metric


# ---------------------------------------------------------------------------- states


class _PairSums(SumState):
    """Float64 sums of cos and ‖·‖ between paired vectors, from their dot products (mergeable).

    Working from a·b, ‖a‖², ‖b‖² keeps one read of the float64 data per product instead of a
    temporary per operation; ‖a − b‖² = ‖a‖² + ‖b‖² − 2a·b then has an absolute rounding floor of
    ~1e-16·‖a‖², i.e. distances below ~1e-8·‖a‖ read as that floor (cosines are unaffected)."""

    reductions: ClassVar[dict[str, str]] = {"cos": "sum", "dist": "sum", "sqdist": "sum", "count": "sum"}

    def __init__(self) -> None:
        self.cos = 0.0
        self.dist = 0.0
        self.sqdist = 0.0
        self.count = 0

    def add_products(self, dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> None:
        sqdist = (sq_a + sq_b - 2 * dot).clamp_min(0.0)
        self.cos += float(cosine_from_products(dot, sq_a, sq_b).sum())
        self.dist += float(sqdist.sqrt().sum())
        self.sqdist += float(sqdist.sum())
        self.count += dot.numel()

    def add(self, a: torch.Tensor, b: torch.Tensor, fused: bool = False) -> None:
        """Pairs (a[..., k, :], b[..., k, :]) of vectors (products in float64; ``fused``: one read
        of both on the CPU, :func:`~.geed_kernels.pair_products`)."""
        self.add_products(*pair_products(a, b, fused))


class OrbitState(SumState):
    """Per layer: orbit deviations from the centroid, the untransformed-pair baseline and, for
    vector layers, the softmax KL to the orbit's mean prediction. ``update(block [b, m, *shape])``.

    Baseline over the untransformed samples (the identity column): Σ of unit vectors (cosine) and
    the :class:`ShiftedMoments` of the vectors (Euclidean: shifted by the first sample, so that close
    vectors do not cancel badly).
    """

    reductions: ClassVar[dict[str, str]] = {
        "orbit": "state", "kl": "sum", "unit_sum": "sum", "unit_sqnorm": "sum", "zeros": "sum", "vectors": "state",
    }

    def __init__(self, layer: LayerInfo, context: PassContext) -> None:
        self.layer = layer
        self.identity = identity_index(context.ts) if context.ts is not None else None
        self.fused = use_numba(context.backend, context.device)
        self.orbit = _PairSums()
        self.kl = 0.0 if len(layer.shape) == 1 else None
        self.unit_sum: torch.Tensor | None = None
        self.unit_sqnorm = 0.0  # Σ ‖u_i‖² (= number of non-zero vectors)
        self.zeros = 0  # all-zero untransformed activations
        self.vectors = ShiftedMoments((layer.size,), context.device, fused=self.fused)

    @property
    def n(self) -> int:
        """Untransformed samples in the baseline."""
        return self.vectors.n

    def update(self, block: torch.Tensor) -> None:
        b, m = block.shape[:2]
        z = block.reshape(b, m, -1)
        # f(g·x) against the centroid c from dot products: z_g·c, ‖z_g‖², ‖c‖² (geed_kernels).
        zc, zz, cc = orbit_products(z, self.fused)
        self.orbit.add_products(zc, zz, cc.unsqueeze(1).expand(b, m))
        if self.kl is not None:  # vector layers only (the logits): small
            z = z.to(torch.float64)
            logp = torch.log_softmax(z, dim=-1)
            log_mean = torch.logsumexp(logp, dim=1, keepdim=True) - math.log(m)
            self.kl += float((logp.exp() * (logp - log_mean)).sum())
        if self.identity is not None:
            self._add_baseline(z[:, self.identity].contiguous())

    def _add_baseline(self, a: torch.Tensor) -> None:
        total, sqnorm, zeros = unit_sums(a, self.fused)
        self.unit_sum = total if self.unit_sum is None else self.unit_sum + total
        self.unit_sqnorm += sqnorm
        self.zeros += zeros
        self.vectors.update(a)

    # ------------------------------------------------------------------ read-outs
    def similarity(self) -> float:
        """S: mean cosine similarity of f(g·x) to its orbit centroid."""
        return self.orbit.cos / self.orbit.count

    def mean_distance(self) -> float:
        return self.orbit.dist / self.orbit.count

    def rms_distance(self) -> float:
        return math.sqrt(self.orbit.sqdist / self.orbit.count)

    def cosine_baseline(self) -> float:
        """M: mean cos over the n(n−1) ordered pairs of distinct untransformed samples."""
        n = self._pairs_available()
        pairs = float(self.unit_sum @ self.unit_sum) - self.unit_sqnorm + self.zeros * (self.zeros - 1)
        return pairs / (n * (n - 1))

    def rms_pair_distance(self) -> float:
        """sqrt(mean over ordered pairs i ≠ j of ‖f(x_i) − f(x_j)‖²), exact from the moments."""
        n = self._pairs_available()
        s1 = self.vectors.s1
        mean_sq = 2 * (n * float(self.vectors.s2.sum()) - float(s1 @ s1)) / (n * (n - 1))
        return math.sqrt(max(mean_sq, 0.0))

    def mean_kl(self) -> float:
        return self.kl / self.orbit.count

    def _pairs_available(self) -> int:
        if self.n < 2:
            raise ValueError(
                f"layer {self.layer.name!r}: the baseline needs at least 2 untransformed samples, got "
                f"{self.n} (the identity column of ts gives them: does ts contain the identity?)"
            )
        return self.n


class LatentEquivarianceState(SumState):
    """Σ over (x, g) of cos and ‖·‖ between f(g·x) and g·f(x), f(x) the identity column."""

    reductions: ClassVar[dict[str, str]] = {"pairs": "state"}

    def __init__(self, layer: LayerInfo, context: PassContext, action: Action | None, spatial: bool = False) -> None:
        self.layer = layer
        self.action = action
        self.spatial_ts = context.ts if spatial and action is not None else None  # the action is its warps
        self.identity = _required_identity(context.ts, "latent equivariance") if action is not None else None
        self.fused = use_numba(context.backend, context.device)
        self.pairs = _PairSums()

    def update(self, block: torch.Tensor) -> None:
        if self.action is None:
            return  # no action defined on this layer: skipped
        b, m = block.shape[:2]
        fused = self.fused and self.spatial_ts is not None  # warps formed inside the kernel, never stored
        if fused and (products := warped_pair_products(block, self.identity, self.spatial_ts)) is not None:
            return self.pairs.add_products(*products)
        expected = self.action(block[:, self.identity])
        if tuple(expected.shape) != tuple(block.shape):
            raise ValueError(
                f"layer {self.layer.name!r}: the action returned {tuple(expected.shape)}, expected "
                f"g·f(x) for every g, {tuple(block.shape)}"
            )
        self.pairs.add(block.reshape(b, m, -1), expected.reshape(b, m, -1), self.fused)

    def update_with(self, other: Any, block: torch.Tensor) -> bool:
        """Update these sums and DSES's state ``other`` of the same layer with one set of warps:
        where this layer's action is the spatial one and DSES reads the identity column of the same
        set, both need t_j f(x_i) (bilinear, zero fill), the same tensor; each set of warps is
        about a third of a pass over feature maps (1.2 s of the explorer's 8.6-s pass of 200 × 16
        rotations). False, with nothing updated, otherwise."""
        warped = getattr(other, "warped", None)
        if (self.spatial_ts is None or warped is None or other.ts is not self.spatial_ts
                or other.identity != self.identity or not other.spatial or not block.is_floating_point()):
            return False
        y, expected = warped(block)
        other.consume(y, expected)
        b, m = block.shape[:2]
        self.pairs.add(block.reshape(b, m, -1), expected.reshape(b, m, -1), self.fused)
        return True

    def __getstate__(self) -> dict[str, Any]:  # the action is needed only while the pass runs
        return {**self.__dict__, "action": None}


@dataclass(frozen=True)
class OrbitSpec(StatSpec):
    """Orbit sums of a layer (:class:`OrbitState`), shared by GEEDInvariance and GEEDOutputKL."""

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> OrbitState:
        return OrbitState(layer, context)


def _action_for(action: Any, layer: LayerInfo) -> Any:
    """The layer's entry of an action spec: a string, a callable or None (no action)."""
    if isinstance(action, tuple):  # a mapping, as sorted (layer, action) pairs
        return dict(action).get(layer.name)
    if action == "spatial" and not layer.spatial:
        return None
    return action


@dataclass(frozen=True)
class LatentEquivarianceSpec(StatSpec):
    """Pair sums of f(g·x) and g·f(x) (:class:`LatentEquivarianceState`) for an action of the group:
    ``"spatial"``, ``"trivial"``, a callable, or sorted ``(layer, action)`` pairs."""

    action: Any

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> LatentEquivarianceState:
        action = _action_for(self.action, layer)
        return LatentEquivarianceState(layer, context, _layer_action(action, layer, context.ts), spatial=action == "spatial")


def _layer_action(action: Any, layer: LayerInfo, ts: Any) -> Action | None:
    if action == "trivial":
        return lambda fx: fx.unsqueeze(1).expand(fx.shape[0], len(ts), *fx.shape[1:])
    if action == "spatial":

        def spatial(fx: torch.Tensor) -> torch.Tensor:
            maps = fx.reshape(fx.shape[0], -1, *layer.shape[-2:])
            # the warps as computed, m outermost: read in place by geed_kernels.pair_products
            return apply_uncopied(ts, maps).reshape(fx.shape[0], len(ts), *layer.shape)

        return spatial
    return action  # a callable, or None


# ---------------------------------------------------------------------------- measures


class GEEDInvariance(Measure):
    """Invariance G-EED: mean d(f(g·x), c_x) over samples and group elements, one value per layer.

    Args:
        metric: ``"cosine"`` (d = 1 − cos, default) or ``"euclidean"``.
        normalize: report S/M, the mean cosine similarity to the centroid over the mean cosine
            similarity of untransformed pairs (cosine metric only); see the module docstring.
        min_baseline: the guard: layers with M ≤ this fall back to normalised Euclidean deviations.

    With ``normalize``, each layer's metadata holds ``raw`` (1 − S), ``baseline`` (M), ``method``
    (``"cosine"`` or ``"euclidean-fallback"``), ``relative`` ((1 − S)/(1 − M), or the fallback's
    ratio) and, on fallback layers, ``pair_distance``.
    """

    short_name = "GEED-inv"
    legacy_metadata = ("raw", "baseline", "method")

    def __init__(self, metric: str = "cosine", normalize: bool = False, min_baseline: float = 1e-3) -> None:
        self.metric = _check_metric(metric)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        if normalize and metric != "cosine":
            raise ValueError("normalize=True divides cosine similarities by their baseline: use metric='cosine'")
        if not (isinstance(min_baseline, (int, float)) and math.isfinite(min_baseline) and min_baseline >= 0):
            raise ValueError(f"min_baseline must be a finite number ≥ 0, got {min_baseline!r}")
        self.normalize = normalize
        self.min_baseline = float(min_baseline)

    def options(self) -> dict[str, Any]:
        return {"metric": self.metric, "normalize": self.normalize}

    def spec(self) -> StatSpec:
        return OrbitSpec()

    def check(self, context: PassContext) -> None:
        if self.normalize:
            _required_identity(context.ts, "the normalised G-EED's baseline M")

    def compute_layer(self, state: OrbitState, layer: LayerInfo, fixed: Mapping[str, Any] | None = None):
        raw = 1.0 - state.similarity() if self.metric == "cosine" else state.mean_distance()
        if not self.normalize:
            return np.array(raw)
        baseline = state.cosine_baseline()
        method = fixed["method"] if fixed else ("cosine" if baseline > self.min_baseline else "euclidean-fallback")
        if method == "cosine":
            with np.errstate(divide="ignore", invalid="ignore"):
                relative = float(np.float64(raw) / (1.0 - np.float64(baseline)))
            meta = {"raw": raw, "baseline": baseline, "method": method, "relative": relative}
            return LayerValue(np.array(state.similarity() / baseline), meta)
        pair = state.rms_pair_distance()
        warnings.warn(
            f"layer {layer.name!r}: mean cosine similarity of untransformed pairs M = {baseline:.3g} ≤ "
            f"min_baseline = {self.min_baseline:g} (centred features), so S/M is meaningless; falling back "
            "to RMS orbit distance / RMS pairwise distance (0 = invariant)",
            stacklevel=2,
        )
        ratio = state.rms_distance() / pair if pair > 0 else (0.0 if state.rms_distance() == 0 else math.inf)
        meta = {"raw": raw, "baseline": baseline, "method": method, "relative": ratio, "pair_distance": pair}
        return LayerValue(np.array(ratio), meta)


class GEEDOutputKL(Measure):
    """Output-layer G-EED: mean KL( softmax f(g·x) ‖ mean_h softmax f(h·x) ), in nats, per vector layer."""

    short_name = "GEED-KL"
    restricted = True

    def spec(self) -> StatSpec:
        return OrbitSpec()

    def skip_reason(self, layer: LayerInfo) -> str | None:
        return None if len(layer.shape) == 1 else "not a vector of logits"

    def compute_layer(self, state: OrbitState, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        return np.array(state.mean_kl())


class GEEDEquivariance(Measure):
    """Latent-equivariance G-EED: mean d(f(g·x), g·f(x)) per layer, for a known action of G.

    Args:
        metric: ``"cosine"`` (1 − cos, default) or ``"euclidean"``.
        action: ``"spatial"`` (default; every channel's map moved like the image), ``"trivial"``,
            a callable ``f(x) [b, *shape] → g·f(x) [b, m, *shape]``, or a mapping from layer name to
            one of these; layers missing from the mapping are skipped.
    """

    short_name = "GEED-eq"
    restricted = True

    def __init__(self, metric: str = "cosine", action: str | Action | Mapping[str, str | Action] = "spatial") -> None:
        self.metric = _check_metric(metric)
        if isinstance(action, Mapping):
            for name, one in action.items():
                self._check_action(one, f"action[{name!r}]")
        else:
            self._check_action(action, "action")
        self.action = action

    @staticmethod
    def _check_action(action: Any, what: str) -> None:
        if not (callable(action) or action in ("spatial", "trivial")):
            raise ValueError(f"{what} must be 'spatial', 'trivial' or a callable, got {action!r}")

    def options(self) -> dict[str, Any]:
        kind = self.action if isinstance(self.action, str) else "custom"
        return {"metric": self.metric, "action": kind}

    def spec(self) -> StatSpec:
        action = tuple(sorted(self.action.items())) if isinstance(self.action, Mapping) else self.action
        return LatentEquivarianceSpec(action)

    def check(self, context: PassContext) -> None:
        if context.ts is None:
            raise ValueError("GEEDEquivariance needs the transformation set: use tmlib.measures.evaluate")
        _required_identity(context.ts, "latent equivariance")

    def skip_reason(self, layer: LayerInfo) -> str | None:
        action = self.spec().action
        return None if _action_for(action, layer) is not None else "no action of the group defined on this layer"

    def compute_layer(self, state: LatentEquivarianceState, layer: LayerInfo,
                      fixed: Mapping[str, Any] | None = None) -> np.ndarray:
        p = state.pairs
        return np.array(1.0 - p.cos / p.count if self.metric == "cosine" else p.dist / p.count)


def geed_table(result: MeasureResult) -> pd.DataFrame:
    """One row per layer of a normalised :class:`GEEDInvariance` result: raw G-EED (1 − S),
    baseline M, ratio S/M, the method used (cosine, or the Euclidean fallback), and
    ``relative`` = (1 − S)/(1 − M), the deviation in units of a random pair's (0 = invariant,
    1 = an orbit as dissimilar as two different samples; the fallback's ratio on fallback rows).
    A selection of the columns of ``result.to_frame()`` (the per-layer metadata).

    Why ``relative`` as well: S/M reads well on non-negative (ReLU) features, for which M is well
    above 0, but on signed features such as logits M can be small and positive, which inflates
    S/M without any guard firing (measured: a plain CNN's logits, M = 0.045, S/M = 12.2, the
    *least* invariant layer reading the largest ratio). (1 − S)/(1 − M) has no such pole."""
    frame = result.to_frame()
    if not all(key in frame for key in ("raw", "baseline", "method", "relative")):
        raise ValueError(
            f"result must come from GEEDInvariance(normalize=True); {result.measure!r} has no raw/baseline/method"
        )
    frame["ratio"] = [float(result[k]) for k in result.layer_names]  # the value itself, inf included
    columns = ["layer", "index", "depth", "raw", "baseline", "ratio", "relative", "method"]
    return frame[columns].astype({"raw": float, "baseline": float, "relative": float})
