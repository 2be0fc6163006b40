"""One-way ANOVA per activation: does the transformation have an effect on the unit's mean?

For an activation a with ST matrix A_ij = a(t_j(x_i)) (n samples i, m transformations j), the
transformations are the m groups and the samples the n observations of each group:

* μ_j = (1/n) Σ_i A_ij (group means), μ = (1/m) Σ_j μ_j (grand mean, the design is balanced);
* MSB = n Σ_j (μ_j − μ)² / (m − 1)                      — between-transformation mean square;
* MSW = Σ_j Σ_i (A_ij − μ_j)² / (m (n − 1))             — within-transformation mean square,
  i.e. the mean over j of the unbiased column variances;
* F = MSB / MSW, with p = P[F(m − 1, m (n − 1)) ≥ F] (``scipy.stats.f.sf``).

H0 is "the transformation has no effect on the unit's mean". It is rejected when p < α', with
α' = α / (number of activations of the layer) under Bonferroni correction (``bonferroni=True``,
the default, for a family-wise error rate α per layer), else α' = α.

Degenerate cases (decided here; ``scipy.stats.f_oneway`` returns NaN for the first):

* MSW = 0 and MSB = 0 (a constant unit, e.g. a dead ReLU): F = 0, p = 1, not rejected —
  the transformation provably has no effect;
* MSW = 0 and MSB > 0 (each transformation gives a constant, different value): F = +inf, p = 0,
  rejected. Layer means of F skip the inf values (as for NV).

The statistic is the shared :class:`~tmlib.measures.moments.STMoments` (same key as TV/SV/NV), so
ANOVA costs no forwards and no accumulation beyond what the variance measures already do.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
from scipy import stats

from ..results import MeasureResult
from .base import LayerInfo, Measure, PassContext
from .moments import STMoments

__all__ = ["AnovaMeasure", "anova_f"]

_OUTPUTS = ("F", "p", "reject")


def anova_f(state: STMoments) -> tuple[np.ndarray, int, int]:
    """F per activation from accumulated moments: (F [F_count] float64, df_between, df_within)."""
    n, m = state.n, state.m
    means = state.column_mean()  # [m, F]
    # Deviations from the first group, not from the grand mean: identical group means then give
    # exactly 0 (a float mean of m equal numbers need not equal them), so MSB = 0 exactly.
    dev = means - means[:1]
    dev -= dev.mean(axis=0, keepdims=True)
    msb = n * np.square(dev).sum(axis=0) / (m - 1)
    msw = state.column_variance().mean(axis=0)  # exact 0 for constant columns (shifted sums)
    f = np.where(msb > 0, np.inf, 0.0)  # the MSW = 0 cases: x/0 → inf, 0/0 → 0
    np.divide(msb, msw, out=f, where=msw > 0)
    return f, m - 1, m * (n - 1)


class AnovaMeasure(Measure):
    """One-way ANOVA per activation, transformations as groups (see the module docstring).

    Args:
        alpha: significance level, in (0, 1).
        bonferroni: divide ``alpha`` by the number of activations of each layer.
        output: what the per-activation array holds: ``"F"`` (default; layer means skip inf),
            ``"p"`` (p-values) or ``"reject"`` (1.0 where H0 is rejected, else 0.0 — so the layer
            mean is the fraction of activations whose mean depends on the transformation).

    Values are shaped like the activation ([C, H, W] or [F]). Whatever ``output``, the result's
    metadata holds ``rejection_fraction`` ({layer: fraction of activations rejecting H0}),
    ``alpha_per_test`` ({layer: α'}) and the degrees of freedom ``df_between``, ``df_within``.
    """

    short_name = "ANOVA"

    def __init__(self, alpha: float = 0.01, bonferroni: bool = True, output: str = "F") -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
        if not isinstance(bonferroni, bool):
            # Every bad constructor argument is a ValueError (as in tmlib.models).
            raise ValueError(f"bonferroni must be True or False, got {bonferroni!r}")  # noqa: TRY004
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        self.alpha = float(alpha)
        self.bonferroni = bonferroni
        self.output = output

    def options(self) -> dict[str, Any]:
        return {"output": self.output, "alpha": self.alpha, "bonferroni": self.bonferroni}

    def statistic_key(self) -> Hashable:
        return STMoments  # shared with TV/SV/NV: no extra accumulation

    def new_state(self, layer: LayerInfo, context: PassContext) -> STMoments:
        return STMoments(context.m, int(np.prod(layer.shape)), context.device, context.backend)

    def alpha_per_test(self, layer: LayerInfo) -> float:
        """α' for one activation of ``layer``."""
        return self.alpha / int(np.prod(layer.shape)) if self.bonferroni else self.alpha

    def table(self, state: STMoments, layer: LayerInfo) -> dict[str, Any]:
        """The whole table for one layer: F, p, reject (flat float64 arrays) and the dfs."""
        f, df1, df2 = anova_f(state)
        p = stats.f.sf(f, df1, df2)  # sf(inf) = 0, sf(0) = 1
        reject = (p < self.alpha_per_test(layer)).astype(np.float64)
        return {"F": f, "p": p, "reject": reject, "df_between": df1, "df_within": df2}

    def compute_layer(self, state: STMoments, layer: LayerInfo) -> np.ndarray:
        return self.table(state, layer)[self.output].reshape(layer.shape)

    def compute(self, metadata: dict[str, Any] | None = None) -> MeasureResult:
        result = super().compute(metadata)
        fractions, alphas = {}, {}
        for name, info in self._layers.items():
            table = self.table(self._states[name], info)
            fractions[name] = float(table["reject"].mean())
            alphas[name] = self.alpha_per_test(info)
            result.metadata["df_between"] = table["df_between"]
            result.metadata["df_within"] = table["df_within"]
        result.metadata["rejection_fraction"] = fractions
        result.metadata["alpha_per_test"] = alphas
        return result
