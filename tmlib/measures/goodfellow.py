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

Cost: n extra forwards (the reference pass); in the main pass one fused compare-and-count over
the block (numba on the CPU, torch ops elsewhere), next to nothing for ``local="firing"``.

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

Merging and jackknife: the thresholds are a function of all n untransformed samples, so counts
merge only within one reference pass (:class:`GoodfellowCounts`), not across passes over other
samples, and ``evaluate(blocks=K)`` is refused (a replicate would need its own threshold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import stats

from .base import LayerInfo, LayerValue, Measure, PassContext, StatSpec
from .moments import numba_available, use_numba
from .states import ShiftedMoments, SumState

if numba_available():  # moments.py already chose numba's threading layer
    import numba

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
_SLACK = 16  # extra entries kept per unit while n is unknown


def firing_count(rate: float, n: int) -> int:
    """q = ceil(rate·n), clamped to [1, n − 1]: samples above a percentile threshold."""
    # The 1e-9 absorbs float products such as 0.07·100 = 7.000000000000001.
    return min(max(math.ceil(rate * n - 1e-9), 1), n - 1)


if numba_available():

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _count_above(x, t, counts, tile):  # pragma: no cover - compiled
        # x: [rows, F] float32/64 C-contiguous; t: [F] same dtype; counts: [F] int64, added to.
        # Returns how many values were NaN or ±inf. Each work item owns `tile` units, so its
        # counters stay in L1 while every value is read once (as in moments._fused_update).
        rows, nf = x.shape
        bad = 0
        for k in numba.prange((nf + tile - 1) // tile):
            f0 = k * tile
            w = min(nf, f0 + tile) - f0
            c = np.zeros(w, np.int64)
            nonfinite = 0
            for i in range(rows):
                for f in range(w):
                    v = x[i, f0 + f]
                    c[f] += v > t[f0 + f]
                    nonfinite += (v - v) != 0.0  # NaN for NaN and ±inf
            for f in range(w):
                counts[f0 + f] += c[f]
            bad += nonfinite
        return bad


def _below(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of ``dtype`` ≤ t (float64): for v of that dtype, v > t ⇔ v > result.
    Saves comparing a whole float32 block in float64."""
    low = t.to(dtype)
    return torch.where(low.double() > t, torch.nextafter(low, torch.full_like(low, -math.inf)), low)


class GoodfellowReference(SumState):
    """Reference-pass state of one layer: per-unit moments (normal threshold) and a running top-K.

    ``update(block [b, *shape])`` with the untransformed samples' activations, in sample order.
    New blocks wait in a buffer and are merged into the top-K (one ``topk`` over [F, K + P]) once
    P ≥ max(K, 64) samples are pending, so the cost per sample does not grow as blocks shrink
    (the engine's blocks hold 256/m samples: one for m = 504). Memory per unit: K kept entries
    (value + int32 sample index) and up to max(K, 64) + b pending values.

    After :meth:`finalize`: ``threshold`` [F] float64, ``fires`` [F] int64 (|Z|), ``n``, and the
    pairs of Z, ``fire_sample`` / ``fire_unit`` (int64, sorted by sample).

    Not mergeable: the top-K of each part is sized for that part, not for the union (merging would
    lose values above the union's threshold), so the reference pass always covers all n samples.
    """

    def __init__(
        self,
        num_features: int,
        threshold: str,
        firing_rate: float,
        device: torch.device | str = "cpu",
        n: int | None = None,
    ):
        self.num_features = num_features
        self.threshold_type = threshold
        self.rate = firing_rate
        self.z = float(stats.norm.isf(firing_rate))
        self.device = torch.device(device)
        self.n_expected = n
        self.n = 0
        self._finite = True
        self.moments = ShiftedMoments((num_features,), self.device)  # μ and σ of the normal threshold
        self.top_values: torch.Tensor | None = None  # [F, K], activation dtype, unordered
        self.top_index = torch.zeros(num_features, 0, dtype=torch.int32, device=self.device)
        self.pending: list[torch.Tensor] = []  # blocks [b, F] not merged yet
        self.merged = 0  # samples merged into the top-K; pending ones are merged … n − 1
        self.dropped_max = torch.full(
            (num_features,), -math.inf, dtype=torch.float64, device=self.device
        )
        self._final = False

    def _need(self, n: int) -> int:
        q1 = firing_count(self.rate, n) + 1 if n >= 2 else 1
        if self.threshold_type == "percentile":
            return q1
        cantelli = n // (1 + self.z * self.z) + 1 if self.z > 0 else n
        return max(q1, int(cantelli))

    def capacity(self, n_seen: int) -> int:
        """How many values per unit to keep after ``n_seen`` samples."""
        if self.n_expected is not None:
            return min(n_seen, self._need(self.n_expected))
        if self.threshold_type == "percentile":
            return min(n_seen, 2 * (math.ceil(self.rate * n_seen) + 1) + _SLACK)
        return min(n_seen, self._need(n_seen) + _SLACK)

    def update(self, block: torch.Tensor) -> None:
        if self._final:
            raise RuntimeError("the reference pass is over; create a new state")
        b = block.shape[0]
        x = block.reshape(b, -1)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} activations per sample, got {x.shape[1]}"
            )
        if not x.is_floating_point():
            x = x.float()
        if self.threshold_type == "normal":  # μ and σ; the percentile needs only the top-K
            self.moments.update(x)
        self._finite = self._finite and bool(torch.isfinite(x.sum()))
        # A copy, never a view: the block is the layer's output, which a later in-place
        # activation (ReLU(inplace=True)) overwrites.
        self.pending.append(x.clone())
        self.n += b
        if self.n - self.merged >= max(self.capacity(self.n), 64):
            self._merge(self.capacity(self.n))

    def _merge(self, keep: int | None) -> None:
        """Move the pending samples into the top-K, keeping ``keep`` per unit (None: all)."""
        if not self.pending:
            return
        new = torch.cat(self.pending).T  # [F, P]
        index = torch.arange(self.merged, self.n, dtype=torch.int32, device=new.device)
        index = index.expand_as(new)
        if self.top_values is not None:
            new = torch.cat([self.top_values, new.to(self.top_values.dtype)], dim=1)
            index = torch.cat([self.top_index, index], dim=1)
        if keep is not None and keep < new.shape[1]:
            kept, pos = torch.topk(new, keep, dim=1, sorted=False)  # unsorted: twice as fast
            self.dropped_max = torch.maximum(
                self.dropped_max, new.scatter(1, pos, -math.inf).amax(1).double()
            )
            new, index = kept, torch.gather(index, 1, pos)
        self.top_values, self.top_index = new.contiguous(), index.contiguous()
        self.pending, self.merged = [], self.n

    def is_finite(self) -> bool:
        """False once a NaN or ±inf activation was seen (they propagate into the block sums)."""
        return self._finite

    def merge(self, other: GoodfellowReference) -> GoodfellowReference:
        raise ValueError(
            "GoodfellowMeasure: reference-pass states do not merge (each part's top-K is sized for that "
            "part, so the union's threshold could be lost); run the reference pass over all samples"
        )

    def finalize(self) -> GoodfellowReference:
        """Thresholds, G and Z from the accumulated samples (idempotent)."""
        if self._final:
            return self
        n = self.n
        if n < 2:
            raise ValueError(f"the reference pass needs at least 2 samples, got n={n}")
        if self.n_expected is not None and n != self.n_expected:
            raise ValueError(f"the reference pass expected n={self.n_expected} samples, got {n}")
        self._merge(None)  # the last pending samples: nothing more to drop
        if self.threshold_type == "percentile":
            q = firing_count(self.rate, n)
            self.threshold = torch.topk(self.top_values, q + 1, dim=1).values[:, q].double()
        else:
            self.threshold = self.moments.mean() + self.z * self.moments.variance().sqrt()
        # Every value above t must still be in the top-K, or G and Z would be wrong.
        lost = int((self.dropped_max > self.threshold).sum())
        if lost:
            raise ValueError(
                f"GoodfellowMeasure: for {lost} units, values above the threshold were dropped from "
                "the running top-K, which sizes itself from the samples seen so far; this happens "
                "when the sample order is far from random (e.g. sorted by class). Shuffle the "
                "samples (e.g. x[torch.randperm(len(x))] or dataset.subset(torch.randperm(n)))."
            )
        t = _below(self.threshold, self.top_values.dtype).unsqueeze(1)
        fires = self.top_values > t  # [F, K]
        self.fires = fires.sum(1)
        unit, k = fires.nonzero(as_tuple=True)
        sample = self.top_index[unit, k].long()
        order = torch.argsort(sample, stable=True)
        self.fire_sample, self.fire_unit = sample[order], unit[order]  # int64, ≈ rate·n·F pairs
        self.top_values = self.top_index = None  # no longer needed
        self._final = True
        return self

    @property
    def global_rate(self) -> torch.Tensor:
        """G per unit, float64 [F]."""
        return self.fires.double() / self.n


class GoodfellowCounts(SumState):
    """Main-pass state of one layer: per-unit firing counts over the ST matrix.

    ``update(block [b, m, *shape])``, samples in the same order as in the reference pass.
    ``count_all`` [F]: #{(i, j) : A_ij > t}; ``count_firing`` [F]: the same restricted to i ∈ Z.
    Counts merge by addition, but only between states of the *same* reference pass (the same
    thresholds and Z): parts of one pass, not two passes over different samples.
    """

    reductions: ClassVar[dict[str, str]] = {"count_all": "sum", "count_firing": "sum", "seen": "sum"}

    def __init__(self, reference: GoodfellowReference, m: int, backend: str = "auto"):
        self.reference = reference.finalize()
        self.m = m
        self.num_features = reference.num_features
        self.threshold = reference.threshold
        device = self.threshold.device
        self.numba = use_numba(backend, device)
        self.count_all = torch.zeros(self.num_features, dtype=torch.int64, device=device)
        self.count_firing = torch.zeros(self.num_features, dtype=torch.int64, device=device)
        self.cursor = 0  # index of the block's first sample: its rows are cursor … cursor + b − 1
        self.seen = 0  # samples counted
        self._finite = True
        self._below: dict[torch.dtype, torch.Tensor] = {}

    def seek(self, start: int, stop: int | None = None) -> None:
        """The next block starts at sample ``start`` (a state of one sample block)."""
        self.cursor = start

    def merge(self, other: GoodfellowCounts) -> GoodfellowCounts:
        if other.reference is not self.reference:
            raise ValueError(
                "GoodfellowMeasure: counts of different reference passes do not merge (their thresholds "
                "were set on different samples); measure all the samples in one pass"
            )
        return super().merge(other)

    def update(self, block: torch.Tensor) -> None:
        b = block.shape[0]
        x = block.reshape(b, self.m, -1)
        if x.shape[2] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} activations per sample, got {x.shape[2]}"
            )
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        t = self._below.get(x.dtype)
        if t is None:
            t = self._below[x.dtype] = _below(self.threshold, x.dtype)
        rows = x.reshape(b * self.m, -1)
        # Fused compare-count-check: 3.5 ms against 6.6 ms for the torch ops below on a
        # [256, 25088] float32 block, 2 cores (best of 30); both ≈ 8× summing a bool tensor.
        if self.numba:
            bad = _count_above(
                np.ascontiguousarray(rows.numpy()), t.numpy(), self.count_all.numpy(), 256
            )
            self._finite = self._finite and bad == 0
        else:
            # Column sums of the 0/1 matrix as one BLAS product: 3-5× faster than summing a bool
            # tensor over its leading dimension on the CPU, and exact (integers below 2^24).
            ones = torch.ones(b * self.m, dtype=x.dtype, device=x.device)
            self.count_all += (ones @ (rows > t).to(x.dtype)).long()
            # One sum is cheaper than isfinite(x) and is NaN or inf as soon as one value is.
            self._finite = self._finite and bool(torch.isfinite(rows.sum()))
        # Z's pairs (sample, unit) in this block: a contiguous run of the sorted sample indices.
        ref = self.reference
        lo, hi = torch.searchsorted(
            ref.fire_sample,
            torch.tensor([self.cursor, self.cursor + b], device=ref.fire_sample.device),
        ).tolist()
        sample, unit = ref.fire_sample[lo:hi] - self.cursor, ref.fire_unit[lo:hi]
        hits = (x[sample, :, unit] > t[unit].unsqueeze(1)).sum(1)  # [pairs]: over the m transforms
        self.count_firing.index_add_(0, unit, hits)
        self.cursor += b
        self.seen += b

    def is_finite(self) -> bool:
        return self._finite

    def local_rate(self, local: str) -> torch.Tensor:
        """L per unit, float64 [F] (NaN for ``local="firing"`` where Z is empty)."""
        if self.seen != self.reference.n:
            raise ValueError(
                f"the main pass saw {self.seen} samples but the reference pass {self.reference.n}"
            )
        if local == "all":
            return self.count_all.double() / (self.reference.n * self.m)
        return self.count_firing.double() / (self.reference.fires.double() * self.m)  # 0/0 → NaN


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
