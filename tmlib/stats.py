"""Uncertainty of layer means: delete-one-block jackknife, t intervals, paired and seed summaries.

Pure functions of numbers (numpy / pandas). A result of ``evaluate(..., blocks=K)`` carries
``replicates``: a K × layers frame whose row k holds every layer mean computed from all sample
blocks but block k (:func:`tmlib.engine.block_bounds`). From them:

* :func:`jackknife_se` — SE = sqrt((K − 1)/K · Σ_k (θ_k − θ̄)²), θ̄ = mean_k θ_k;
* :func:`t_interval` — value ± t_{dof, (1 + confidence)/2} · se (Student t; dof = K − 1 for a
  jackknife);
* :func:`paired_difference` — a − b for two results measured on the *same* samples and blocks:
  the jackknife of the per-replicate differences θ_k(a) − θ_k(b), which cancels the sampling
  noise the two share;
* :func:`seed_summary` — several results of one configuration over seeds (e.g. trained models),
  the mean over seeds with an SE combining the between-seed spread and the samples' jackknife.

NaN replicates (a layer with no finite value in some replicate) give a NaN SE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _scipy_stats

__all__ = ["jackknife_se", "paired_difference", "seed_summary", "t_interval"]


def _check_confidence(confidence: Any) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95, got {confidence!r}")
    return float(confidence)


def jackknife_se(replicates: pd.DataFrame | np.ndarray) -> pd.Series | np.ndarray:
    """Delete-one-block jackknife standard error per column.

    Args:
        replicates: [K, L] leave-one-block-out estimates (rows = the block left out), K ≥ 2;
            a DataFrame (columns = layers) or an array.

    Returns:
        sqrt((K − 1)/K · Σ_k (θ_k − θ̄)²) per column: a Series indexed like the columns for a
        DataFrame, else an array [L] (a float for a 1-D input).
    """
    values = np.asarray(replicates, dtype=np.float64)
    one_d = values.ndim == 1
    values = values.reshape(len(values), -1)
    k = values.shape[0]
    if k < 2:
        raise ValueError(f"replicates: a jackknife needs at least 2 replicates, got {k}")
    se = np.sqrt((k - 1) / k * np.square(values - values.mean(axis=0)).sum(axis=0))
    if isinstance(replicates, pd.DataFrame):
        return pd.Series(se, index=replicates.columns, name="se")
    return float(se[0]) if one_d else se


def t_interval(value: Any, se: Any, dof: Any, confidence: float = 0.95) -> tuple[Any, Any]:
    """Student-t interval value ± t_{dof, (1 + confidence)/2} · se (arrays broadcast).

    Returns:
        (low, high), of the broadcast shape of the inputs (floats for scalars).
    """
    confidence = _check_confidence(confidence)
    dof = np.asarray(dof, dtype=np.float64)
    if np.any(~(dof > 0)):
        raise ValueError(f"dof must be > 0, got {dof}")
    half = _scipy_stats.t.ppf(0.5 + confidence / 2, dof) * np.asarray(se, dtype=np.float64)
    low, high = np.asarray(value, dtype=np.float64) - half, np.asarray(value, dtype=np.float64) + half
    if np.ndim(low) == 0:
        return float(low), float(high)
    return low, high


def _frame(layers, value, se, dof, confidence: float, column: str = "value") -> pd.DataFrame:
    low, high = t_interval(np.asarray(value, dtype=np.float64), se, dof, confidence)
    return pd.DataFrame({"layer": list(layers), column: np.asarray(value, dtype=np.float64),
                         "se": np.asarray(se, dtype=np.float64), "low": np.asarray(low), "high": np.asarray(high)})


def _replicates_of(result: Any, argument: str) -> pd.DataFrame:
    replicates = getattr(result, "replicates", None)
    if replicates is None:
        raise ValueError(f"{argument}: the result has no replicates; measure it with evaluate(..., blocks=K)")
    return replicates


def paired_difference(a: Any, b: Any, confidence: float = 0.95) -> pd.DataFrame:
    """Layer means of ``a`` minus those of ``b``, with the jackknife of the paired differences.

    ``a`` and ``b`` are MeasureResults from ``evaluate(..., blocks=K)`` on the *same* samples and
    blocks (e.g. a trained and an untrained model, or two measures): replicate k of the difference
    is θ_k(a) − θ_k(b), its SE :func:`jackknife_se` of those K values, the interval Student t with
    K − 1 dof around the full-data difference.

    Returns:
        DataFrame with columns layer, difference, se, low, high (one row per layer, a's order).

    Raises:
        ValueError: a result without replicates, or n, K, block sizes or layers that differ.
    """
    confidence = _check_confidence(confidence)
    ra, rb = _replicates_of(a, "a"), _replicates_of(b, "b")
    for key in ("n", "blocks", "block_sizes"):
        va, vb = a.metadata.get(key), b.metadata.get(key)
        if va != vb:
            raise ValueError(f"a and b must be measured on the same samples and blocks: {key} {va!r} != {vb!r}")
    if list(a.layer_names) != list(b.layer_names):
        raise ValueError(f"a and b must have the same layers: {a.layer_names} != {b.layer_names}")
    diff = a.layer_means().to_numpy() - b.layer_means().to_numpy()
    se = jackknife_se(ra.to_numpy() - rb[ra.columns].to_numpy())
    return _frame(a.layer_names, diff, se, len(ra) - 1, confidence, column="difference")


def seed_summary(results: Sequence[Any], confidence: float = 0.95) -> pd.DataFrame:
    """Per layer, the mean over S seeds of their layer means, with an SE and a t interval.

    With θ_s the layer mean of seed s and θ̄ = mean_s θ_s:

    * ``between_std`` = the between-seed standard deviation (ddof 1) of the θ_s;
    * ``se`` = sqrt(between_std²/S + SE_jk²), where SE_jk is :func:`jackknife_se` of the
      seed-mean's replicates (replicate k = mean over seeds of their k-th replicate) when every
      result has replicates (the same K), else 0. The first term is the spread of models, the
      second the sampling noise of the samples the seeds share;
    * the interval is Student t with the Welch–Satterthwaite dof
      (v₁ + v₂)² / (v₁²/(S − 1) + v₂²/(K − 1)), v₁ = between_std²/S, v₂ = SE_jk² (S − 1 with no
      replicates, K − 1 for a single seed).

    Returns:
        DataFrame with columns layer, mean, between_std, se, low, high, seeds (S).

    Raises:
        ValueError: an empty list, results with different layers, a single result without
        replicates, or replicates of different K.
    """
    confidence = _check_confidence(confidence)
    results = list(results)
    if not results:
        raise ValueError("results: give at least one result (one per seed)")
    layers = list(results[0].layer_names)
    for r in results[1:]:
        if list(r.layer_names) != layers:
            raise ValueError(f"results must have the same layers: {r.layer_names} != {layers}")
    s = len(results)
    means = np.stack([r.layer_means().to_numpy(dtype=np.float64) for r in results])  # [S, L]
    mean = means.mean(axis=0)
    between = means.std(axis=0, ddof=1) if s > 1 else np.full(len(layers), np.nan)
    v1 = between**2 / s if s > 1 else np.zeros(len(layers))
    reps = [getattr(r, "replicates", None) for r in results]
    if all(rep is not None for rep in reps):
        ks = {len(rep) for rep in reps}
        if len(ks) != 1:
            raise ValueError(f"results: replicates of different block counts K {sorted(ks)}")
        k = ks.pop()
        seed_mean = np.mean([rep[layers].to_numpy(dtype=np.float64) for rep in reps], axis=0)  # [K, L]
        v2 = jackknife_se(seed_mean) ** 2
    elif s == 1:
        raise ValueError("results: a single seed needs replicates (evaluate(..., blocks=K)) for an SE")
    else:
        k, v2 = None, np.zeros(len(layers))
    with np.errstate(divide="ignore", invalid="ignore"):
        if k is None:
            dof = np.full(len(layers), s - 1.0)
        elif s == 1:
            dof = np.full(len(layers), k - 1.0)
        else:
            dof = (v1 + v2) ** 2 / (v1**2 / (s - 1) + v2**2 / (k - 1))
            dof = np.where(np.isfinite(dof) & (dof > 0), dof, float(max(s - 1, k - 1)))
    se = np.sqrt(v1 + v2)
    frame = _frame(layers, mean, se, dof, confidence, column="mean")
    frame.insert(2, "between_std", between)
    frame["seeds"] = s
    return frame

