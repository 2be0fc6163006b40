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

The statistic is the shared :class:`~tmlib.measures.moments.Moments` (the spec of TV/SV/NV), so
ANOVA costs no forwards and no accumulation beyond what the variance measures already do. F comes
from :func:`~tmlib.measures.functional.anova_f`, computed once per layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats

from .base import LayerInfo, LayerValue, Measure, StatSpec
from .functional import anova_f as _anova_f_of_moments
from .moments import Moments, STMoments

__all__ = ["AnovaMeasure", "anova_f"]

_OUTPUTS = ("F", "p", "reject")


def anova_f(state: STMoments) -> tuple[np.ndarray, int, int]:
    """F per activation from accumulated moments: (F [F_count] float64, df_between, df_within)."""
    return _anova_f_of_moments(state.column_mean(), state.column_variance(), state.n)


class AnovaMeasure(Measure):
    """One-way ANOVA per activation, transformations as groups (see the module docstring).

    Args:
        alpha: significance level, in (0, 1).
        bonferroni: divide ``alpha`` by the number of activations of each layer.
        output: what the per-activation array holds: ``"F"`` (default; layer means skip inf),
            ``"p"`` (p-values) or ``"reject"`` (1.0 where H0 is rejected, else 0.0 — so the layer
            mean is the fraction of activations whose mean depends on the transformation).

    Values are shaped like the activation ([C, H, W] or [F]). Whatever ``output``, each layer's
    metadata (``result.layer_metadata``, columns of ``to_frame()``) holds ``rejection_fraction``
    (fraction of activations rejecting H0) and ``alpha_per_test`` (α'); ``result.metadata`` holds
    them too as {layer: value}, and the degrees of freedom ``df_between``, ``df_within``.
    """

    short_name = "ANOVA"
    legacy_metadata = ("rejection_fraction", "alpha_per_test")

    def __init__(self, alpha: float = 0.01, bonferroni: bool = True, output: str = "F") -> None:
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

    def spec(self) -> StatSpec:
        return Moments()  # shared with TV/SV/NV: no extra accumulation

    def alpha_per_test(self, layer: LayerInfo) -> float:
        """α' for one activation of ``layer``."""
        return self.alpha / layer.size if self.bonferroni else self.alpha

    def table(self, state: STMoments, layer: LayerInfo) -> dict[str, Any]:
        """The whole table for one layer: F, p, reject (flat float64 arrays) and the dfs."""
        f, df1, df2 = anova_f(state)
        p = stats.f.sf(f, df1, df2)  # sf(inf) = 0, sf(0) = 1
        reject = (p < self.alpha_per_test(layer)).astype(np.float64)
        return {"F": f, "p": p, "reject": reject, "df_between": df1, "df_within": df2}

    def compute_layer(self, state: STMoments, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> LayerValue:
        table = self.table(state, layer)
        meta = {"rejection_fraction": float(table["reject"].mean()), "alpha_per_test": self.alpha_per_test(layer)}
        return LayerValue(table[self.output].reshape(layer.shape), meta)

    def result_metadata(self, states: Mapping[str, Any]) -> dict[str, Any]:
        state = next(iter(states.values()))
        return {"df_between": state.m - 1, "df_within": state.m * (state.n - 1)}
