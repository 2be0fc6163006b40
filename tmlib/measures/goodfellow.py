"""Goodfellow et al.'s invariance score (NIPS 2009, "Measuring invariances in deep networks").

For a unit a, a threshold t is set on the *untransformed* samples x_1…x_n so that the unit fires
(a > t) on a fraction ``firing_rate`` of them. With f(v) = 1[v > t] and A_ij = a(t_j(x_i)):

* G = (1/n) Σ_i f(a(x_i))                           — realised global firing rate, on the n
  untransformed samples of the reference pass;
* L = (1/(n m)) Σ_i Σ_j f(A_ij)                     — ``local="all"``: firing rate over the
  whole ST matrix (as in the reference library of [Q23]);
* L = (1/(|Z| m)) Σ_{i∈Z} Σ_j f(A_ij), Z = {i : a(x_i) > t}
                                                    — ``local="firing"``: the 2009 original,
  the rate over the transformed versions of the samples that make the unit fire;
* score = L / G. Larger is more invariant: ``local="all"`` gives 1 for a unit that ignores the
  transformations, ``local="firing"`` gives 1/G for it.

Thresholds (``threshold=``):

* ``"normal"``: t = μ + z σ, z = Φ⁻¹(1 − rate), μ and the unbiased σ over the n untransformed
  samples. G can be far from the rate for non-normal units: Cantelli's inequality bounds it by
  1/(1 + z²) (0.156 for rate 0.01), which sparse ReLU units approach.
* ``"percentile"``: t = the (q+1)-th largest of a(x_1)…a(x_n), q = ceil(rate·n) clamped to
  [1, n − 1]. That is the order statistic x_(n−q), i.e. ``np.quantile(a, 1 − q/n,
  method="inverted_cdf")``; exactly q samples lie above t unless there are ties, so G = q/n,
  the smallest achievable rate ≥ ``firing_rate`` (never 0, so small n still gives scores).

Units with G = 0 (constant or dead units: nothing lies strictly above t) get NaN, which layer
means skip.

Cost (measured, SimpleConv, 500 MNIST images × 25 rotations, 2 cores): n extra forwards (the
reference pass: 0.04 of the n·m forwards) and its running top-K (``topk`` and ``cat``: ≈ 0.55 s,
0.75 s while a ``scatter`` found the largest dropped value); in the main pass a compare-and-count
per value. With a moments measure in the same
pass (TV, SV, NV, ANOVA, ND) the moments kernel counts in its own read of the block
(:meth:`~.goodfellow_states.GoodfellowCounts.update_with`: ≈ 0.2 ms more on a [256, 25088] block,
where a separate read cost 7.5 ms as first written and 1.6-1.9 ms vectorised); alone, its own
numba kernel (torch ops off the CPU). The counts over Z's pairs (``local="firing"``) are a
gather of ≈ rate·n·F values per pass (≈ 0.4 s, mostly per-block overhead), done for both modes:
they share one state.

Memory: per unit, a running top-K of the untransformed activations with their sample indices
(8 bytes an entry: float32 value, int32 index). It yields the exact percentile, G and the set Z
(every value above t is kept), so no [n, units] mask is stored and no identity transformation is
needed in the set. K is what the threshold needs: q + 1 (percentile) or ⌊n/(1+z²)⌋ + 1 (normal:
by Cantelli no more samples can lie above t). The engine tells states n (PassContext.n), which
fixes K and makes it exact; when n is unknown (a state fed by hand), K follows the samples seen so far, n_s, with slack: K = min(n_s, 2 (ceil(rate·n_s) + 1) + 16)
for percentile (36 entries at n = 1000, rate 0.01) and min(n_s, ⌊n_s/(1+z²)⌋ + 17) for normal
(≈ 0.16 n at rate 0.01). Keeping a prefix's top-K is exact unless the sample order is far from
random (e.g. sorted by class, with the first class making the unit fire); the largest dropped
value is tracked and the result certified: if a dropped value lies above t,
:class:`GoodfellowMeasure` raises instead of answering.

Merging and jackknife: the thresholds are a function of all n untransformed samples. Parts of a
dataset measured apart therefore share one reference pass: run it on every part with
:func:`tmlib.engine.collect_references` (sized for the whole dataset), merge those states, and
pass them to each part's :func:`~tmlib.engine.collect` (``references=``); the parts' counts then
merge exactly. Counts of passes with different thresholds refuse to merge. ``evaluate(blocks=K)``
is refused: a delete-one-block replicate would need a threshold of its own. The states live in
:mod:`tmlib.measures.goodfellow_states`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import LayerInfo, LayerValue, Measure, PassContext, StatSpec
from .goodfellow_states import GoodfellowCounts, GoodfellowReference, firing_count

__all__ = [
    "GoodfellowCounts",
    "GoodfellowCountsSpec",
    "GoodfellowMeasure",
    "GoodfellowReference",
    "GoodfellowReferenceSpec",
    "firing_count",
]

_THRESHOLDS = ("normal", "percentile")
_LOCALS = ("all", "firing")
_OUTPUTS = ("score", "local", "global", "threshold")


class GoodfellowMeasure(Measure):
    """Goodfellow et al.'s invariance score L/G per unit (see the module docstring).

    Args:
        firing_rate: target global firing rate of every unit, in (0, 1); default 0.01.
        threshold: ``"percentile"`` (default; exact empirical quantile) or ``"normal"``.
        local: ``"all"`` (default; local rate over every sample) or ``"firing"`` (2009: only over
            the samples that make the unit fire).
        output: per-unit array returned: ``"score"`` (L/G, default), ``"local"`` (L),
            ``"global"`` (G) or ``"threshold"`` (t).

    Values are shaped like the activation ([C, H, W] or [F]); NaN where G = 0. The metadata holds
    the options (threshold type, rate, local variant) and ``global_firing_rate`` ({layer: mean G})
    and ``silent_units`` ({layer: #units with G = 0}), also per layer in ``result.layer_metadata``.
    Needs a reference pass: :func:`tmlib.measures.evaluate` runs it (n + n·m forwards in all).
    """

    short_name = "Goodfellow"
    # Jackknife replicates (evaluate(blocks=K)) would need thresholds set on all samples but block k,
    # i.e. a threshold per replicate and a main pass counting against each: not implemented.
    supports_blocks = False
    legacy_metadata = ("global_firing_rate", "silent_units")

    def __init__(
        self,
        firing_rate: float = 0.01,
        threshold: str = "percentile",
        local: str = "all",
        output: str = "score",
    ) -> None:
        if (
            isinstance(firing_rate, bool)
            or not isinstance(firing_rate, (int, float))
            or not 0 < firing_rate < 1
        ):
            raise ValueError(f"firing_rate must be a number in (0, 1), got {firing_rate!r}")
        if threshold not in _THRESHOLDS:
            raise ValueError(f"threshold must be one of {_THRESHOLDS}, got {threshold!r}")
        if local not in _LOCALS:
            raise ValueError(f"local must be one of {_LOCALS}, got {local!r}")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        self.firing_rate = float(firing_rate)
        self.threshold = threshold
        self.local = local
        self.output = output

    def options(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "firing_rate": self.firing_rate,
            "local": self.local,
            "output": self.output,
        }

    def spec(self) -> StatSpec:
        # Both local variants and all outputs come from one state (it counts both).
        return GoodfellowCountsSpec(self.threshold, self.firing_rate)

    def compute_layer(self, state: GoodfellowCounts, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> LayerValue:
        ref = state.reference
        g = ref.global_rate
        if self.output == "threshold":
            values = ref.threshold
        elif self.output == "global":
            values = g
        else:
            values = state.local_rate(self.local)
            if self.output == "score":
                values = torch.where(g > 0, values / g, math.nan)
        meta = {"global_firing_rate": float(g.mean()), "silent_units": int((g == 0).sum())}
        return LayerValue(values.cpu().numpy().reshape(layer.shape), meta)


@dataclass(frozen=True)
class GoodfellowReferenceSpec(StatSpec):
    """Thresholds of every unit on the n untransformed samples (the reference pass)."""

    threshold: str
    firing_rate: float

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> GoodfellowReference:
        return GoodfellowReference(layer.size, self.threshold, self.firing_rate, context.device, context.n)


@dataclass(frozen=True)
class GoodfellowCountsSpec(StatSpec):
    """Firing counts of every unit over the ST matrix, against the reference pass's thresholds."""

    threshold: str
    firing_rate: float

    def reference_spec(self) -> StatSpec:
        return GoodfellowReferenceSpec(self.threshold, self.firing_rate)

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> GoodfellowCounts:
        if reference is None:
            raise ValueError(
                f"Goodfellow: no reference-pass state for layer {layer.name!r}; use tmlib.measures.evaluate"
            )
        return GoodfellowCounts(reference, context.m, context.backend)
