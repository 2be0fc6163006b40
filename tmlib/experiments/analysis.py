"""Uncertainty of derived numbers: jackknife algebra over layer means, seeds combined.

A result of ``evaluate(..., blocks=K)`` carries K leave-one-block-out replicates of every layer
mean. Any number computed from layer means — a difference between two models, the mean of the last
quarter of the layers, a difference of differences — has a jackknife standard error computed by
applying the same arithmetic to each replicate. :class:`Jack` does exactly that: it holds a value
(per layer, or a scalar) and its K replicates, and every operation acts on both.

Seeds: :func:`seed_mean` averages one :class:`Jack` per seed (same samples and blocks) and returns
an :class:`Estimate` whose variance adds the between-seed spread (var/S) to the jackknife variance
of the seed-mean, with Welch–Satterthwaite degrees of freedom, as :func:`tmlib.stats.seed_summary`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..results import MeasureResult
from ..stats import t_interval

__all__ = ["Estimate", "Jack", "first_quarter", "last_quarter", "profile_distance", "seed_mean", "seed_profile", "seed_spread", "spread_ratio"]


@dataclass(frozen=True)
class Estimate:
    """A number with its standard error and the degrees of freedom of its t interval."""

    value: float
    se: float
    dof: float

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        if not np.isfinite(self.se) or self.se == 0 or not self.dof > 0:
            return self.value, self.value
        return t_interval(self.value, self.se, self.dof, confidence)

    @property
    def low(self) -> float:
        return self.interval()[0]

    @property
    def high(self) -> float:
        return self.interval()[1]

    def excludes_zero(self, confidence: float = 0.95) -> bool:
        low, high = self.interval(confidence)
        return bool(low > 0 or high < 0)

    def __str__(self) -> str:
        low, high = self.interval()
        return f"{self.value:.4g} [{low:.4g}, {high:.4g}]"

    @classmethod
    def of_values(cls, values: Sequence[float]) -> Estimate:
        """The mean of independent repeats (e.g. one number per seed), SE = s/√S, S − 1 dof."""
        values = np.asarray(list(values), dtype=np.float64)
        if len(values) < 2:
            return cls(float(values.mean()), float("nan"), 0.0)
        return cls(float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))), float(len(values) - 1))


class Jack:
    """A value and its K jackknife replicates (the same arithmetic applied to both).

    ``value``: a Series indexed by layer (or a float); ``replicates``: a DataFrame K × layers (or an
    array [K]). Build one from a result with :meth:`of`."""

    def __init__(self, value: pd.Series | float, replicates: pd.DataFrame | np.ndarray):
        self.value = value
        self.replicates = replicates

    @classmethod
    def of(cls, result: MeasureResult, layers: Sequence[str] | None = None) -> Jack:
        """Layer means of ``result`` (computed with ``blocks=K``), optionally some layers only."""
        if result.replicates is None:
            raise ValueError(f"{result.measure}: the result has no jackknife replicates; measure with blocks=K")
        value, replicates = result.layer_means(), result.replicates
        if layers is not None:
            value, replicates = value.loc[list(layers)], replicates[list(layers)]
        return cls(value.astype(float), replicates.astype(float))

    # ------------------------------------------------------------------ shape
    @property
    def k(self) -> int:
        return len(self.replicates)

    @property
    def scalar(self) -> bool:
        return not isinstance(self.value, pd.Series)

    def layers(self, names: Sequence[str]) -> Jack:
        return Jack(self.value.loc[list(names)], self.replicates[list(names)])

    def mean(self, layers: Sequence[str] | None = None) -> Jack:
        """The mean over (some) layers, NaN layers skipped: a scalar Jack."""
        part = self if layers is None else self.layers(layers)
        return Jack(float(np.nanmean(part.value.to_numpy())), np.nanmean(part.replicates.to_numpy(), axis=1))

    # ------------------------------------------------------------------ arithmetic
    def _combine(self, other: Jack | float, op) -> Jack:
        if isinstance(other, Jack):
            if other.k != self.k:
                raise ValueError(f"cannot combine jackknives of {self.k} and {other.k} blocks")
            return Jack(op(self.value, other.value), op(_values(self.replicates), _values(other.replicates))
                        if self.scalar or other.scalar else op(self.replicates, other.replicates))
        return Jack(op(self.value, other), op(self.replicates, other))

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a - b)

    def __add__(self, other):
        return self._combine(other, lambda a, b: a + b)

    def __mul__(self, other):
        return self._combine(other, lambda a, b: a * b)

    def __truediv__(self, other):
        return self._combine(other, lambda a, b: a / b)

    def __neg__(self):
        return Jack(-self.value, -self.replicates)

    # ------------------------------------------------------------------ uncertainty
    def se(self) -> pd.Series | float:
        reps = _values(self.replicates)
        k = len(reps)
        se = np.sqrt((k - 1) / k * np.square(reps - reps.mean(axis=0)).sum(axis=0))
        return pd.Series(se, index=self.value.index) if not self.scalar else float(se)

    def estimate(self) -> Estimate:
        if not self.scalar:
            raise ValueError("estimate() needs a scalar; take .mean(...) or index a layer first")
        return Estimate(float(self.value), self.se(), self.k - 1)

    def frame(self, confidence: float = 0.95) -> pd.DataFrame:
        """Per layer: value, se, low, high."""
        se = self.se()
        low, high = t_interval(self.value.to_numpy(), se.to_numpy(), self.k - 1, confidence)
        return pd.DataFrame({"layer": self.value.index, "value": self.value.to_numpy(), "se": se.to_numpy(),
                             "low": low, "high": high})


def _values(x):
    return x.to_numpy() if isinstance(x, (pd.DataFrame, pd.Series)) else np.asarray(x)


def seed_mean(jacks: Sequence[Jack]) -> Estimate:
    """The mean over seeds of scalar jackknives (same samples and blocks), with an SE combining the
    between-seed variance (s²/S) and the jackknife variance of the seed-mean; Welch–Satterthwaite
    degrees of freedom. One seed: the jackknife alone."""
    jacks = list(jacks)
    if not jacks or not all(j.scalar for j in jacks):
        raise ValueError("seed_mean needs at least one scalar Jack (take .mean(...) first)")
    values = np.array([j.value for j in jacks], dtype=np.float64)
    mean_jack = Jack(float(values.mean()), np.mean([_values(j.replicates) for j in jacks], axis=0))
    var_jk = mean_jack.se() ** 2
    s = len(values)
    if s == 1:
        return Estimate(float(values[0]), float(np.sqrt(var_jk)), mean_jack.k - 1)
    var_seed = values.var(ddof=1) / s
    total = var_seed + var_jk
    denominator = var_seed ** 2 / (s - 1) + var_jk ** 2 / (mean_jack.k - 1)
    dof = total ** 2 / denominator if denominator > 0 else float(s - 1)
    return Estimate(float(values.mean()), float(np.sqrt(total)), float(dof))


def first_quarter(layers: Sequence[str]) -> list[str]:
    """The first quarter of the layers (at least one), in forward order."""
    layers = list(layers)
    return layers[: max(1, round(len(layers) / 4))]


def last_quarter(layers: Sequence[str]) -> list[str]:
    """The last quarter of the layers (at least one), in forward order."""
    layers = list(layers)
    return layers[-max(1, round(len(layers) / 4)):]


def seed_profile(jacks: Sequence[Jack], label: str | None = None, confidence: float = 0.95) -> pd.DataFrame:
    """The per-layer mean over seeds of per-layer :class:`Jack` s (same layers, samples and blocks),
    each layer's interval from :func:`seed_mean`: a tidy frame with columns layer, index, depth,
    value, se, low, high (and label), ready for :func:`tmlib.plots.layer_curves`."""
    jacks = list(jacks)
    layers = list(jacks[0].value.index)
    rows = []
    for layer in layers:
        est = seed_mean([j.mean([layer]) for j in jacks])
        low, high = est.interval(confidence)
        rows.append({"layer": layer, "value": est.value, "se": est.se, "low": low, "high": high})
    out = pd.DataFrame(rows)
    out.insert(1, "index", np.arange(len(out)))
    out.insert(2, "depth", out["index"] / max(len(out) - 1, 1))
    if label is not None:
        out["label"] = label
    return out


def seed_spread(profiles: np.ndarray) -> float:
    """Seed spread of a configuration: the std across seeds (rows) of each layer (columns), averaged
    over layers."""
    return float(np.asarray(profiles, dtype=np.float64).std(axis=0, ddof=1).mean())


def profile_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over layers of |seed-mean of a − seed-mean of b| (rows are seeds, columns layers)."""
    return float(np.abs(np.asarray(a, dtype=np.float64).mean(axis=0) - np.asarray(b, dtype=np.float64).mean(axis=0)).mean())


def spread_ratio(configurations: dict[str, np.ndarray], pairs: Sequence[tuple[str, str]], n_boot: int = 2000,
                 seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """How far apart configurations are relative to how much seeds spread within one.

    ``configurations``: name → [seeds, layers] profiles (e.g. trained − untrained NV per seed).
    Returns the smallest :func:`profile_distance` over ``pairs``, the largest :func:`seed_spread`,
    their ratio, and a percentile bootstrap interval of the ratio (seeds resampled with replacement
    within each configuration, ``n_boot`` times)."""
    def ratio(confs: dict[str, np.ndarray]) -> tuple[float, float, float]:
        distance = min(profile_distance(confs[a], confs[b]) for a, b in pairs)
        spread = max(seed_spread(p) for p in confs.values())
        return distance, spread, distance / spread if spread > 0 else float("inf")

    distance, spread, value = ratio(configurations)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        resampled = {name: p[rng.integers(0, len(p), len(p))] for name, p in configurations.items()}
        if any(len(np.unique(p, axis=0)) < 2 for p in resampled.values()):
            continue  # a resample of one distinct seed has no spread
        boots.append(ratio(resampled)[2])
    low, high = np.percentile(boots, [50 * (1 - confidence), 50 * (1 + confidence)]) if boots else (np.nan, np.nan)
    return {"distance": distance, "spread": spread, "ratio": value, "low": float(low), "high": float(high)}
