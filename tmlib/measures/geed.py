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
  reported (``result.metadata["raw"]``, ``["baseline"]``; :func:`geed_table`).
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
exactly n·m images. Two zero vectors count as identical (cos = 1), a zero and a non-zero vector as
orthogonal (cos = 0). Every state holds float64 sums over samples, so results do not depend on the
batch size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..results import MeasureResult
from .base import LayerInfo, LayerSkippingMeasure, PassContext
from .same_equivariance import identity_index

__all__ = [
    "GEEDEquivariance",
    "GEEDInvariance",
    "GEEDOutputKL",
    "LatentEquivarianceState",
    "OrbitState",
    "cosine_similarity",
    "geed_table",
]

_METRICS = ("cosine", "euclidean")
Action = Callable[[torch.Tensor], torch.Tensor]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b) over the last dimension, with two zero vectors → 1 and one zero vector → 0."""
    return _cosine_from_products((a * b).sum(dim=-1), a.square().sum(dim=-1), b.square().sum(dim=-1))


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


def _cosine_from_products(dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
    """cos from a·b, ‖a‖², ‖b‖² with :func:`cosine_similarity`'s conventions for zero vectors."""
    both = (sq_a > 0) & (sq_b > 0)
    denominator = torch.where(both, (sq_a * sq_b).sqrt(), torch.ones_like(dot))
    cos = torch.where(both, dot / denominator, torch.zeros_like(dot)).clamp(-1.0, 1.0)
    return torch.where((sq_a == 0) & (sq_b == 0), torch.ones_like(cos), cos)


class _PairSums:
    """Float64 sums of cos and ‖·‖ between paired vectors, from their dot products (mergeable).

    Working from a·b, ‖a‖², ‖b‖² keeps one read of the float64 data per product instead of a
    temporary per operation; ‖a − b‖² = ‖a‖² + ‖b‖² − 2a·b then has an absolute rounding floor of
    ~1e-16·‖a‖², i.e. distances below ~1e-8·‖a‖ read as that floor (cosines are unaffected)."""

    def __init__(self) -> None:
        self.cos = 0.0
        self.dist = 0.0
        self.sqdist = 0.0
        self.count = 0

    def add_products(self, dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> None:
        sqdist = (sq_a + sq_b - 2 * dot).clamp_min(0.0)
        self.cos += float(_cosine_from_products(dot, sq_a, sq_b).sum())
        self.dist += float(sqdist.sqrt().sum())
        self.sqdist += float(sqdist.sum())
        self.count += dot.numel()

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Pairs (a[..., k, :], b[..., k, :]) of float64 vectors."""
        self.add_products(torch.einsum("...d,...d->...", a, b), torch.einsum("...d,...d->...", a, a),
                          torch.einsum("...d,...d->...", b, b))

    def merge(self, other: _PairSums) -> None:
        self.cos += other.cos
        self.dist += other.dist
        self.sqdist += other.sqdist
        self.count += other.count

    def is_finite(self) -> bool:
        return math.isfinite(self.cos + self.dist + self.sqdist)


class OrbitState:
    """Per layer: orbit deviations from the centroid, the untransformed-pair baseline and, for
    vector layers, the softmax KL to the orbit's mean prediction. ``update(block [b, m, *shape])``.
    """

    def __init__(self, layer: LayerInfo, context: PassContext) -> None:
        self.layer = layer
        self.identity = identity_index(context.ts) if context.ts is not None else None
        self.orbit = _PairSums()
        self.kl = 0.0 if len(layer.shape) == 1 else None
        # Baseline over untransformed samples: Σ unit vectors (cosine), shifted Σ a and Σ ‖a‖²
        # (Euclidean; shifted by the first sample so that close vectors do not cancel badly).
        self.unit_sum: torch.Tensor | None = None
        self.unit_sqnorm = 0.0  # Σ ‖u_i‖² (= number of non-zero vectors)
        self.zeros = 0  # all-zero untransformed activations
        self.shift: torch.Tensor | None = None
        self.vec_sum: torch.Tensor | None = None
        self.sq_sum = 0.0
        self.n = 0

    def update(self, block: torch.Tensor) -> None:
        b, m = block.shape[:2]
        z = block.reshape(b, m, -1).to(torch.float64)
        # f(g·x) against the centroid c from dot products: z_g·c, ‖z_g‖², ‖c‖², three reads of z
        # (a Gram matrix z zᵀ would cost m reads: 25 for the paper's sets).
        centroid = z.mean(dim=1)
        self.orbit.add_products(torch.einsum("bmd,bd->bm", z, centroid), torch.einsum("bmd,bmd->bm", z, z),
                                torch.einsum("bd,bd->b", centroid, centroid).unsqueeze(1).expand(b, m))
        if self.kl is not None:
            logp = torch.log_softmax(z, dim=-1)
            log_mean = torch.logsumexp(logp, dim=1, keepdim=True) - math.log(m)
            self.kl += float((logp.exp() * (logp - log_mean)).sum())
        if self.identity is not None:
            self._add_baseline(z[:, self.identity])

    def _add_baseline(self, a: torch.Tensor) -> None:
        norms = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
        units = torch.where(norms > 0, a / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0)
        if self.shift is None:
            self.shift = a[0].clone()
            self.unit_sum = torch.zeros_like(self.shift)
            self.vec_sum = torch.zeros_like(self.shift)
        shifted = a - self.shift
        self.unit_sum += units.sum(dim=0)
        self.unit_sqnorm += float(units.square().sum())
        self.zeros += int((norms == 0).sum())
        self.vec_sum += shifted.sum(dim=0)
        self.sq_sum += float(shifted.square().sum())
        self.n += a.shape[0]

    def merge(self, other: OrbitState) -> OrbitState:
        self.orbit.merge(other.orbit)
        if self.kl is not None:
            self.kl += other.kl
        if other.n:
            if self.shift is None:
                self.shift, self.unit_sum = other.shift.clone(), other.unit_sum.clone()
                self.vec_sum = other.vec_sum.clone()
                self.unit_sqnorm, self.zeros, self.sq_sum, self.n = other.unit_sqnorm, other.zeros, other.sq_sum, other.n
            else:
                # Re-express the other's shifted sums around this state's shift.
                delta = other.shift.to(self.shift.device) - self.shift
                other_vec = other.vec_sum.to(self.shift.device)
                self.sq_sum += other.sq_sum + 2 * float(delta @ other_vec) + other.n * float(delta @ delta)
                self.vec_sum += other_vec + other.n * delta
                self.unit_sum += other.unit_sum.to(self.shift.device)
                self.unit_sqnorm += other.unit_sqnorm
                self.zeros += other.zeros
                self.n += other.n
        return self

    def is_finite(self) -> bool:
        return self.orbit.is_finite() and (self.kl is None or math.isfinite(self.kl))

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
        """sqrt(mean over ordered pairs i ≠ j of ‖f(x_i) − f(x_j)‖²), exact from the sums."""
        n = self._pairs_available()
        mean_sq = 2 * (n * self.sq_sum - float(self.vec_sum @ self.vec_sum)) / (n * (n - 1))
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


class LatentEquivarianceState:
    """Σ over (x, g) of cos and ‖·‖ between f(g·x) and g·f(x), f(x) the identity column."""

    def __init__(self, layer: LayerInfo, context: PassContext, action: Action | None) -> None:
        self.layer = layer
        self.action = action
        self.identity = _required_identity(context.ts, "latent equivariance") if action is not None else None
        self.pairs = _PairSums()

    def update(self, block: torch.Tensor) -> None:
        if self.action is None:
            return  # no action defined on this layer: skipped
        b, m = block.shape[:2]
        expected = self.action(block[:, self.identity])
        if tuple(expected.shape) != tuple(block.shape):
            raise ValueError(
                f"layer {self.layer.name!r}: the action returned {tuple(expected.shape)}, expected "
                f"g·f(x) for every g, {tuple(block.shape)}"
            )
        self.pairs.add(block.reshape(b, m, -1).to(torch.float64), expected.reshape(b, m, -1).to(torch.float64))

    def merge(self, other: LatentEquivarianceState) -> LatentEquivarianceState:
        self.pairs.merge(other.pairs)
        return self

    def is_finite(self) -> bool:
        return self.pairs.is_finite()


# ---------------------------------------------------------------------------- measures


class GEEDInvariance(LayerSkippingMeasure):
    """Invariance G-EED: mean d(f(g·x), c_x) over samples and group elements, one value per layer.

    Args:
        metric: ``"cosine"`` (d = 1 − cos, default) or ``"euclidean"``.
        normalize: report S/M, the mean cosine similarity to the centroid over the mean cosine
            similarity of untransformed pairs (cosine metric only); see the module docstring.
        min_baseline: the guard: layers with M ≤ this fall back to normalised Euclidean deviations.
    """

    short_name = "GEED-inv"

    def __init__(self, metric: str = "cosine", normalize: bool = False, min_baseline: float = 1e-3) -> None:
        super().__init__()
        self.metric = _check_metric(metric)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        if normalize and metric != "cosine":
            raise ValueError("normalize=True divides cosine similarities by their baseline: use metric='cosine'")
        if not (isinstance(min_baseline, (int, float)) and math.isfinite(min_baseline) and min_baseline >= 0):
            raise ValueError(f"min_baseline must be a finite number ≥ 0, got {min_baseline!r}")
        self.normalize = normalize
        self.min_baseline = float(min_baseline)
        self._diagnostics: dict[str, dict[str, Any]] = {}

    def options(self) -> dict[str, Any]:
        return {"metric": self.metric, "normalize": self.normalize}

    def statistic_key(self) -> Hashable:
        return ("geed-orbit",)

    def new_state(self, layer: LayerInfo, context: PassContext) -> OrbitState:
        if self.normalize:
            _required_identity(context.ts, "the normalised G-EED's baseline M")
        return OrbitState(layer, context)

    def compute_layer(self, state: OrbitState, layer: LayerInfo) -> np.ndarray:
        raw = 1.0 - state.similarity() if self.metric == "cosine" else state.mean_distance()
        if not self.normalize:
            return np.array(raw)
        baseline = state.cosine_baseline()
        if baseline > self.min_baseline:
            self._diagnostics[layer.name] = {"raw": raw, "baseline": baseline, "method": "cosine"}
            return np.array(state.similarity() / baseline)
        pair = state.rms_pair_distance()
        warnings.warn(
            f"layer {layer.name!r}: mean cosine similarity of untransformed pairs M = {baseline:.3g} ≤ "
            f"min_baseline = {self.min_baseline:g} (centred features), so S/M is meaningless; falling back "
            "to RMS orbit distance / RMS pairwise distance (0 = invariant)",
            stacklevel=2,
        )
        self._diagnostics[layer.name] = {
            "raw": raw, "baseline": baseline, "method": "euclidean-fallback", "pair_distance": pair,
        }
        ratio = state.rms_distance() / pair if pair > 0 else (0.0 if state.rms_distance() == 0 else math.inf)
        return np.array(ratio)

    def compute(self, metadata: dict[str, Any] | None = None) -> MeasureResult:
        self._diagnostics = {}
        return super().compute(metadata)

    def extra_metadata(self, values: dict[str, np.ndarray]) -> dict[str, Any]:
        if not self.normalize:
            return {}
        d = self._diagnostics
        return {
            "raw": {k: d[k]["raw"] for k in values},
            "baseline": {k: d[k]["baseline"] for k in values},
            "method": {k: d[k]["method"] for k in values},
        }


class GEEDOutputKL(LayerSkippingMeasure):
    """Output-layer G-EED: mean KL( softmax f(g·x) ‖ mean_h softmax f(h·x) ), in nats, per vector layer."""

    short_name = "GEED-KL"

    def statistic_key(self) -> Hashable:
        return ("geed-orbit",)

    def new_state(self, layer: LayerInfo, context: PassContext) -> OrbitState:
        return OrbitState(layer, context)

    def skip_reason(self, state: OrbitState, layer: LayerInfo) -> str | None:
        return None if state.kl is not None else "not a vector of logits"

    def compute_layer(self, state: OrbitState, layer: LayerInfo) -> np.ndarray:
        return np.array(state.mean_kl())


class GEEDEquivariance(LayerSkippingMeasure):
    """Latent-equivariance G-EED: mean d(f(g·x), g·f(x)) per layer, for a known action of G.

    Args:
        metric: ``"cosine"`` (1 − cos, default) or ``"euclidean"``.
        action: ``"spatial"`` (default; every channel's map moved like the image), ``"trivial"``,
            a callable ``f(x) [b, *shape] → g·f(x) [b, m, *shape]``, or a mapping from layer name to
            one of these; layers missing from the mapping are skipped.
    """

    short_name = "GEED-eq"

    def __init__(self, metric: str = "cosine", action: str | Action | Mapping[str, str | Action] = "spatial") -> None:
        super().__init__()
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

    def statistic_key(self) -> Hashable:
        action = self.action if isinstance(self.action, str) else id(self.action)
        return ("geed-equivariance", action)

    def _layer_action(self, layer: LayerInfo, ts: Any) -> Action | None:
        action = self.action.get(layer.name) if isinstance(self.action, Mapping) else self.action
        if action == "trivial":
            return lambda fx: fx.unsqueeze(1).expand(fx.shape[0], len(ts), *fx.shape[1:])
        if action == "spatial":
            if not layer.spatial:
                return None

            def spatial(fx: torch.Tensor) -> torch.Tensor:
                maps = fx.reshape(fx.shape[0], -1, *layer.shape[-2:])
                return ts.apply(maps, fill=0.0).reshape(fx.shape[0], len(ts), *layer.shape)

            return spatial
        return action  # a callable, or None (not in the mapping)

    def new_state(self, layer: LayerInfo, context: PassContext) -> LatentEquivarianceState:
        if context.ts is None:
            raise ValueError("GEEDEquivariance needs the transformation set: use tmlib.measures.evaluate")
        return LatentEquivarianceState(layer, context, self._layer_action(layer, context.ts))

    def skip_reason(self, state: LatentEquivarianceState, layer: LayerInfo) -> str | None:
        return None if state.action is not None else "no action of the group defined on this layer"

    def compute_layer(self, state: LatentEquivarianceState, layer: LayerInfo) -> np.ndarray:
        p = state.pairs
        return np.array(1.0 - p.cos / p.count if self.metric == "cosine" else p.dist / p.count)


def geed_table(result: MeasureResult) -> pd.DataFrame:
    """One row per layer of a normalised :class:`GEEDInvariance` result: raw G-EED (1 − S),
    baseline M, ratio S/M, the method used (cosine, or the Euclidean fallback), and
    ``relative`` = (1 − S)/(1 − M), the deviation in units of a random pair's (0 = invariant,
    1 = an orbit as dissimilar as two different samples; the fallback's ratio on fallback rows).

    Why ``relative`` as well: S/M reads well on non-negative (ReLU) features, for which M is well
    above 0, but on signed features such as logits M can be small and positive, which inflates
    S/M without any guard firing (measured: a plain CNN's logits, M = 0.045, S/M = 12.2, the
    *least* invariant layer reading the largest ratio). (1 − S)/(1 − M) has no such pole."""
    meta = result.metadata
    if not all(key in meta for key in ("raw", "baseline", "method")):
        raise ValueError(
            f"result must come from GEEDInvariance(normalize=True); {result.measure!r} has no raw/baseline/method"
        )
    layers = result.layer_names
    raw = np.array([meta["raw"][k] for k in layers], dtype=float)
    baseline = np.array([meta["baseline"][k] for k in layers], dtype=float)
    ratio = np.array([float(result[k]) for k in layers])
    method = [meta["method"][k] for k in layers]
    cosine = np.array([m == "cosine" for m in method])
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(cosine, raw / (1.0 - baseline), ratio)
    return pd.DataFrame(
        {
            "layer": layers,
            "index": np.arange(len(layers)),
            "depth": np.arange(len(layers)) / max(len(layers) - 1, 1),
            "raw": raw,
            "baseline": baseline,
            "ratio": ratio,
            "relative": relative,
            "method": method,
        }
    )
