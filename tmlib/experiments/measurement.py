"""Helpers of the measurement notebooks (05 sample size, 07 measure comparison, 08 same-equivariance).

* Sample size ([Q23] §5.5): :func:`phased_rotations` (m rotations evenly over the circle from a
  random phase, so that two sets share no angle), :class:`Partition` (disjoint class-stratified
  subsets of a split: a reference and every cell of the grid draw different images),
  :func:`relative_error` (the paper's |x − y| / (|x| + |y|), averaged over layers),
  :func:`grid_errors`, :func:`error_table` and :func:`error_trend` (per-repeat log-log slopes of
  the error against n and m, their mean and standard error over the repeats).
* Measure comparison ([Q23] §5.2): :func:`seed_effect` — a difference between two models measured
  on every seed, its standard error over the seeds and the effect size difference / SE;
  :func:`effect_profile` per layer.
* Seeds without jackknife replicates (e.g. Goodfellow's score): :func:`seed_values_profile`, the
  counterpart of :func:`tmlib.experiments.seed_profile` (per-layer mean over seeds, t interval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import transforms
from .analysis import Estimate

__all__ = [
    "Part",
    "Partition",
    "axis_contrast",
    "constant_regression_error",
    "edge_trend",
    "effect_profile",
    "error_table",
    "error_trend",
    "grid_errors",
    "min_angle_gap",
    "phased_rotations",
    "random_phase",
    "relative_error",
    "seed_effect",
    "seed_values_profile",
]


# ------------------------------------------------------------------------------------- sample size


def phased_rotations(m: int, phase: float = 0.0) -> transforms.TransformationSet:
    """m rotations evenly over the full circle starting at ``phase`` degrees: phase, phase + 360/m, …

    With a random phase two sets (of any sizes) share no angle with probability 1, so a grid cell
    is never nested in the reference; each set is still an exact quadrature of the circle."""
    if isinstance(m, bool) or int(m) != m or m < 1:
        raise ValueError(f"m must be a positive integer, got {m!r}")
    if not math.isfinite(phase):
        raise ValueError(f"phase must be a finite number of degrees, got {phase!r}")
    angles = [float(phase) + 360.0 * k / m for k in range(int(m))]
    return transforms.TransformationSet(
        torch.stack([transforms.rotation_matrix(a) for a in angles]),
        [{"degrees": a} for a in angles],
        f"rotation{int(m)}+{float(phase) % 360:.3f}deg",
    )


def random_phase(m: int, seed: int) -> float:
    """A phase in [0, 360/m) degrees, deterministic for ``seed`` (a set of m angles is periodic in 360/m)."""
    gen = torch.Generator().manual_seed(int(seed))
    return float(torch.rand((), generator=gen, dtype=torch.float64)) * 360.0 / m


def min_angle_gap(a: transforms.TransformationSet, b: transforms.TransformationSet) -> float:
    """The smallest angular distance in degrees between a rotation of ``a`` and one of ``b``."""
    ang = lambda ts: torch.atan2(ts.matrices[:, 1, 0], ts.matrices[:, 0, 0])  # noqa: E731
    diff = ang(a)[:, None] - ang(b)[None, :]
    diff = torch.remainder(diff + math.pi, 2 * math.pi) - math.pi
    return float(diff.abs().min()) * 180 / math.pi


@dataclass(frozen=True)
class Partition:
    """``len(sizes)`` class-stratified subsets of a split (``n // classes`` images per class, the
    remainder one each to the first classes, as :func:`tmlib.data.load`), drawn with ``seed``.

    Disjoint where the split has enough images of every class; otherwise only the first subset
    (the reference) is kept apart and every other subset is an independent stratified draw from the
    rest (subsets may then share images with each other, never with the first). :meth:`disjoint`
    says which. ``Partition(...).part(k)`` is the k-th subset, to pass as ``subset=`` to
    :func:`tmlib.experiments.measure` (or a :class:`~tmlib.experiments.Measurement`'s options)."""

    sizes: tuple[int, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or any(isinstance(n, bool) or int(n) != n or n < 1 for n in self.sizes):
            raise ValueError(f"sizes must be positive integers, got {self.sizes!r}")

    def part(self, k: int) -> Part:
        if not 0 <= k < len(self.sizes):
            raise IndexError(f"part {k} of a partition of {len(self.sizes)} subsets")
        return Part(self, k)

    @staticmethod
    def _wants(n: int, classes: int) -> list[int]:
        per, extra = divmod(n, classes)
        return [per + (1 if c < extra else 0) for c in range(classes)]

    def disjoint(self, labels: torch.Tensor, classes: int | None = None) -> bool:
        """Whether the split (its ``labels``) holds every subset without sharing an image."""
        classes = classes or int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=classes).tolist()
        need = np.sum([self._wants(n, classes) for n in self.sizes], axis=0)
        return bool(all(need[c] <= counts[c] for c in range(classes)))

    def indices(self, labels: torch.Tensor, classes: int | None = None) -> list[torch.Tensor]:
        """Every subset's indices into the split (sorted), deterministic for ``seed`` and ``labels``."""
        labels = torch.as_tensor(labels)
        classes = classes or int(labels.max()) + 1
        gen = torch.Generator().manual_seed(int(self.seed))
        members = [torch.nonzero(labels == c).flatten() for c in range(classes)]
        perms = [mm[torch.randperm(len(mm), generator=gen)] for mm in members]
        wants = [self._wants(n, classes) for n in self.sizes]
        for c in range(classes):
            if wants[0][c] > len(members[c]):
                raise ValueError(f"subset 0 needs {wants[0][c]} images of class {c}; the split has {len(members[c])}")
        out = [[] for _ in self.sizes]
        if self.disjoint(labels, classes):
            for c in range(classes):
                start = 0
                for k, want in enumerate(wants):
                    out[k].append(perms[c][start:start + want[c]])
                    start += want[c]
        else:
            for c in range(classes):
                out[0].append(perms[c][:wants[0][c]])
                rest = perms[c][wants[0][c]:]
                for k in range(1, len(self.sizes)):
                    if wants[k][c] > len(rest):
                        raise ValueError(f"subset {k} needs {wants[k][c]} images of class {c}; "
                                         f"{len(rest)} are left besides subset 0")
                    out[k].append(rest[torch.randperm(len(rest), generator=gen)[:wants[k][c]]])
        return [torch.sort(torch.cat(parts)).values for parts in out]


@dataclass(frozen=True)
class Part:
    """One subset of a :class:`Partition`: ``select(split)`` returns those images of the split."""

    partition: Partition
    k: int

    @property
    def n(self) -> int:
        return self.partition.sizes[self.k]

    def select(self, dataset: Any) -> Any:
        index = self.partition.indices(dataset.labels, getattr(dataset, "num_classes", None))[self.k]
        return dataset.subset(index)


def relative_error(x: pd.Series | Sequence[float], y: pd.Series | Sequence[float]) -> float:
    """[Q23]'s mean relative error between two layer profiles: the mean over layers of
    |x − y| / (|x| + |y|) (0 = identical, 1 = opposite or one of them 0); 0/0 counts as 0, layers
    where either value is not finite are skipped."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return float("nan")
    den = np.abs(x[ok]) + np.abs(y[ok])
    num = np.abs(x[ok] - y[ok])
    return float(np.mean(np.divide(num, den, out=np.zeros_like(num), where=den > 0)))


def grid_errors(profiles: Mapping[tuple[int, int, int], pd.Series], reference: pd.Series) -> pd.DataFrame:
    """One row per cell and repeat: n, m, repeat, error (:func:`relative_error` against ``reference``).

    ``profiles``: (n, m, repeat) → layer means."""
    rows = [{"n": n, "m": m, "repeat": r, "error": relative_error(p.loc[reference.index], reference)}
            for (n, m, r), p in profiles.items()]
    return pd.DataFrame(rows).sort_values(["n", "m", "repeat"], ignore_index=True)


def error_table(errors: pd.DataFrame) -> pd.DataFrame:
    """Per cell (n, m): the mean error over the repeats, its standard error and 95 % interval."""
    rows = []
    for (n, m), part in errors.groupby(["n", "m"]):
        est = Estimate.of_values(part["error"])
        rows.append({"n": n, "m": m, "repeats": len(part), "error": est.value, "se": est.se,
                     "low": est.low, "high": est.high})
    return pd.DataFrame(rows)


def error_trend(errors: pd.DataFrame) -> dict[str, Estimate]:
    """How the error falls with n and with m: in every repeat, the least-squares fit
    log(error) = a + b_n·log(n) + b_m·log(m) over the grid's cells; the slopes b_n and b_m are
    averaged over the (independent) repeats, with their standard error over the repeats (R − 1
    degrees of freedom). Returns ``{"n": Estimate, "m": Estimate}`` (−0.5: error ∝ 1/√size)."""
    slopes: dict[str, list[float]] = {"n": [], "m": []}
    for _, part in errors.groupby("repeat"):
        part = part[part["error"] > 0]
        if part["n"].nunique() < 2 or part["m"].nunique() < 2:
            raise ValueError("error_trend needs at least two values of n and of m with a positive error")
        design = np.column_stack([np.ones(len(part)), np.log(part["n"]), np.log(part["m"])])
        coef, *_ = np.linalg.lstsq(design, np.log(part["error"].to_numpy()), rcond=None)
        slopes["n"].append(float(coef[1]))
        slopes["m"].append(float(coef[2]))
    return {axis: Estimate.of_values(values) for axis, values in slopes.items()}


def edge_trend(errors: pd.DataFrame, axis: str) -> Estimate:
    """How the error falls along ``axis`` ("n" or "m") with the other axis at its largest value (the
    grid's edge, where the other axis' own sampling error is smallest and cannot mask it): in every
    repeat the least-squares slope of log(error) on log(axis) over that edge's cells; mean and
    standard error over the repeats."""
    if axis not in ("n", "m"):
        raise ValueError(f"axis must be 'n' or 'm', got {axis!r}")
    other = "m" if axis == "n" else "n"
    edge = errors[(errors[other] == errors[other].max()) & (errors["error"] > 0)]
    slopes = []
    for _, part in edge.groupby("repeat"):
        if part[axis].nunique() < 2:
            raise ValueError(f"edge_trend needs at least two values of {axis} with a positive error")
        slopes.append(float(np.polyfit(np.log(part[axis]), np.log(part["error"]), 1)[0]))
    return Estimate.of_values(slopes)


def axis_contrast(errors: pd.DataFrame, axis: str) -> Estimate:
    """The mean error at the smallest value of ``axis`` ("n" or "m") minus at its largest, averaged
    over the other axis, per repeat; mean and standard error over the repeats (> 0: it falls)."""
    if axis not in ("n", "m"):
        raise ValueError(f"axis must be 'n' or 'm', got {axis!r}")
    lo, hi = errors[axis].min(), errors[axis].max()
    per = [part.loc[part[axis] == lo, "error"].mean() - part.loc[part[axis] == hi, "error"].mean()
           for _, part in errors.groupby("repeat")]
    return Estimate.of_values(per)


# ------------------------------------------------------------------------------------- comparisons


def seed_effect(differences: Sequence[float]) -> dict[str, float]:
    """One difference per seed (each seed its own models and, ideally, its own test draw) → the mean,
    its standard error over the seeds, the 95 % t interval (S − 1 dof) and the effect size
    z = mean / SE (a t statistic; ±inf when every seed agrees exactly)."""
    est = Estimate.of_values(differences)
    z = est.value / est.se if est.se > 0 else (math.copysign(math.inf, est.value) if est.value else 0.0)
    return {"value": est.value, "se": est.se, "dof": est.dof, "low": est.low, "high": est.high, "z": z,
            "seeds": len(list(differences))}


def effect_profile(a: Mapping[Any, pd.Series], b: Mapping[Any, pd.Series], sign: float = 1.0) -> pd.DataFrame:
    """Per layer, :func:`seed_effect` of sign·(a − b) over the seeds both mappings hold
    (seed → layer means). Columns: layer, index, value, se, dof, low, high, z, seeds."""
    seeds = [k for k in a if k in b]
    if not seeds:
        raise ValueError("a and b have no seed in common")
    layers = list(a[seeds[0]].index)
    rows = []
    for i, layer in enumerate(layers):
        diffs = [sign * (float(a[k][layer]) - float(b[k][layer])) for k in seeds]
        rows.append({"layer": layer, "index": i, **seed_effect(diffs)})
    return pd.DataFrame(rows)


def seed_values_profile(by_seed: Mapping[Any, pd.Series], label: str | None = None) -> pd.DataFrame:
    """Per layer, the mean over seeds of layer means without jackknife replicates (seed → layer
    means), with the 95 % t interval over the seeds (S − 1 dof): the frame ``plots.layer_curves``
    draws, as :func:`tmlib.experiments.seed_profile`."""
    seeds = list(by_seed)
    if not seeds:
        raise ValueError("seed_values_profile needs at least one seed")
    layers = [layer for layer in by_seed[seeds[0]].index if np.isfinite(by_seed[seeds[0]][layer])]
    rows = []
    for i, layer in enumerate(layers):
        est = Estimate.of_values([float(by_seed[k][layer]) for k in seeds])
        rows.append({"layer": layer, "index": i, "value": est.value, "se": est.se, "low": est.low, "high": est.high})
    out = pd.DataFrame(rows)
    out["depth"] = out["index"] / max(1, len(out) - 1)
    if label is not None:
        out["label"] = label
    return out


# ------------------------------------------------------------------------------------- regressors


def constant_regression_error(transformation: str, n_test: int = 10000, size: int = 28) -> float:
    """The chance level of a transformation regressor: the median error (units of
    :func:`~tmlib.experiments.regression_errors`) of the best *constant* prediction — the member of
    the training set that minimises it — on the test draws its floor is checked on (each test image
    transformed by one random member, the same draws as :func:`~tmlib.experiments.evaluate_model`)."""
    from .profiles import augmentation_set
    from .zoo import _TEST_DRAW_SEED, regression_errors

    augment = augmentation_set(transformation)
    choice = torch.randint(len(augment), (n_test,), generator=torch.Generator().manual_seed(_TEST_DRAW_SEED))
    truth = augment.matrices[choice][:, :2, :].reshape(n_test, 6)
    members = augment.matrices[:, :2, :].reshape(len(augment), 6)
    return float(min(regression_errors(transformation, c.expand_as(truth), truth, size).median() for c in members))
