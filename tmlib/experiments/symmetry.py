"""What the Lie-group notebooks (10 LieGG, 11 LEE) need beyond :mod:`tmlib.lie`: the images a
polarization matrix is computed on, jackknives of LieGG numbers, and trends over a sweep of models.

* :func:`training_images`: the models' own training images (the validation hold-out left out),
  class-balanced, each transformed once by a member of the augmentation set with fixed draws, so
  that every model of a notebook is measured on the same images (paired jackknife blocks).
* :func:`liegg_jack`: a scalar of :meth:`tmlib.lie.LieGGResult.summary` as a
  :class:`~tmlib.experiments.analysis.Jack` (value and delete-one-block replicates), so that a
  difference between two models measured on the same images has a jackknife SE.
* :func:`directional_claim`: a claim whose sign the paper predicts, asserted as what the data show
  (supported, contradicted, or not detected), with the verdict that follows.
* :func:`sweep_trend`: an ordinary least-squares fit of a number over a sweep of architectures
  (e.g. ``log10 variance ~ depth + log2 width``): each slope with its standard error, t interval
  and degrees of freedom (:class:`~tmlib.experiments.analysis.Estimate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import data
from ..paths import resolve
from .analysis import Estimate, Jack, seed_mean
from .profiles import augmentation_set

__all__ = ["directional_claim", "liegg_jack", "seed_profile", "sweep_trend", "training_images"]

# Seed of the transformation drawn for each image of :func:`training_images` (fixed for every model).
_DRAW_SEED = 20221009


def training_images(dataset: str = "mnist", n: int | None = None, augment: str | None = None,
                    data_root: str = "data", seed: int = 0, n_validation: int = 5000) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``n`` images of the training split that the models trained on (the ``n_validation`` images
    of the early-stopping hold-out left out, as :mod:`tmlib.experiments.zoo` does), class-balanced
    (None: all of them), each transformed once by a member of ``augment``'s set (None: as they
    are; fixed draws). Returns (images [n, C, H, W], labels [n], fill)."""
    full = data.load(dataset, "train", root=resolve(data_root))
    rest, _ = data.holdout(full, n_validation, seed=0)
    if n is not None and n < len(rest):
        gen = torch.Generator().manual_seed(seed)
        index = data._stratified_indices(rest.labels, n, rest.num_classes, gen)
        rest = rest.subset(torch.sort(index).values)
    x, y = rest.tensors()
    ts = augmentation_set(augment)
    if ts is not None:
        choice = torch.randint(len(ts), (len(x),), generator=torch.Generator().manual_seed(_DRAW_SEED + seed))
        x = torch.cat([ts.apply_indexed(x[i:i + 4096], choice[i:i + 4096], fill=rest.fill)
                       for i in range(0, len(x), 4096)])
    return x, y, rest.fill


def liegg_jack(result: Any, column: str = "symmetry_variance", log10: bool = False) -> Jack:
    """``column`` of a :class:`tmlib.lie.LieGGResult` measured with ``blocks`` (``symmetry_variance``,
    ``relative_variance`` or ``symmetry_bias`` of the most symmetric generator) as a scalar
    :class:`~tmlib.experiments.analysis.Jack`; ``log10`` takes the logarithm of value and replicates."""
    replicates = result.replicates()
    if replicates is None:
        raise ValueError("the LieGG result has no jackknife replicates; compute it with liegg(..., blocks=K)")
    if column not in replicates:
        raise ValueError(f"column must be one of {list(replicates.columns)}, got {column!r}")
    value, reps = float(result.summary()[column]), replicates[column].to_numpy(dtype=np.float64)
    if log10:
        value, reps = float(np.log10(value)), np.log10(reps)
    return Jack(value, reps)


def seed_profile(results: Sequence[Any], label: str | None = None) -> pd.DataFrame:
    """The seed-mean layer profile of one configuration: ``results`` holds one
    :class:`~tmlib.results.MeasureResult` per seed (same layers, same samples and blocks); per layer
    the mean over seeds with its 95 % interval (between-seed variance + jackknife,
    :func:`~tmlib.experiments.analysis.seed_mean`). Columns layer, index, depth, value, se, low,
    high (and label): what :func:`tmlib.plots.layer_curves` draws."""
    results = list(results)
    if not results:
        raise ValueError("results must hold at least one MeasureResult (one per seed)")
    layers = results[0].layer_names
    rows = []
    for i, layer in enumerate(layers):
        est = seed_mean([Jack.of(r).mean([layer]) for r in results])
        rows.append({"layer": layer, "index": i, "depth": i / max(len(layers) - 1, 1), "value": est.value,
                     "se": est.se, "low": est.low, "high": est.high})
    frame = pd.DataFrame(rows)
    return frame if label is None else frame.assign(label=label)


def sweep_trend(frame: pd.DataFrame, y: str, x: Sequence[str] = ("depth", "log2 width")) -> dict[str, Estimate]:
    """Least-squares fit ``y ~ 1 + x[0] + x[1] + …`` over the rows of ``frame`` (one row per model):
    for each term of ``x`` its slope with the classical standard error (residual variance, n − p
    degrees of freedom). In an additive fit over a full depth × width grid the depth slope is the
    effect of depth at fixed width, and the width slope the effect of width at fixed depth.

    Returns:
        ``{term: Estimate}`` (``.value``, ``.se``, ``.dof``, ``.low``/``.high``: 95 % t interval);
        with no residual degree of freedom the SE is NaN.
    """
    columns = list(x)
    missing = [c for c in [y, *columns] if c not in frame]
    if missing:
        raise ValueError(f"frame has no column(s) {missing}; columns: {list(frame.columns)}")
    part = frame[[y, *columns]].astype(float)
    if not np.isfinite(part.to_numpy()).all():
        raise ValueError(f"sweep_trend: {y} or {columns} hold non-finite values")
    design = np.column_stack([np.ones(len(part)), part[columns].to_numpy()])
    target = part[y].to_numpy()
    n, p = design.shape
    if np.linalg.matrix_rank(design) < p:
        raise ValueError(f"sweep_trend: the terms {columns} are collinear (or constant) over these {n} rows")
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    dof = n - p
    if dof > 0:
        residual = target - design @ coef
        sigma2 = float(residual @ residual) / dof
        cov = sigma2 * np.linalg.inv(design.T @ design)
        se = np.sqrt(np.diag(cov))
    else:
        se = np.full(p, np.nan)
    return {term: Estimate(float(coef[i + 1]), float(se[i + 1]), float(dof)) for i, term in enumerate(columns)}


def directional_claim(claims: Any, paper: str, statement: str, estimate: Estimate, expected: str = "negative",
                      verdict: str | None = None, observed: str | None = None) -> Any:
    """:meth:`tmlib.experiments.claims.Claims.directional` (kept under this name for the notebooks)."""
    return claims.directional(paper, statement, estimate, expected, observed, verdict)
