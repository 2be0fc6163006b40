"""The measure test harness (after torchmetrics' MetricTester): one place that knows, for every
measure class, a few configured instances, the transformation sets they run on and a brute-force
computation over the full stored ST tensor. ``test_harness.py`` runs every check on every class;
the family test files import the stored-tensor helpers from here instead of keeping copies.

A *family* is a group of classes measured together in one pass (they share states): its
evaluations are cached, so every check costs one set of passes per family, not per class.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from scipy import stats
from torch import nn

from tmlib import activations
from tmlib import transforms as T
from tmlib.measures import (
    AnovaMeasure,
    DistanceSameEquivariance,
    GEEDEquivariance,
    GEEDInvariance,
    GEEDOutputKL,
    GoodfellowMeasure,
    NormalizedDistance,
    NormalizedVariance,
    NormalizedVarianceSE,
    SampleDistance,
    SampleVariance,
    SampleVarianceSE,
    TransformationDistance,
    TransformationVariance,
    TransformationVarianceSE,
)

N = 10  # samples of the harness's cases


def small_cnn() -> nn.Module:
    """A tiny CNN exercising conv, in-place activation, pooling, flatten and linear layers."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ELU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).eval()


def samples(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- the stored ST tensor


def st_tensor(model: nn.Module, x: torch.Tensor, ts: Any) -> dict[str, np.ndarray]:
    """{layer: float64 [n, m, *shape]}: every layer's output for all n·m warped images, recorded in
    one forward (the full ST tensor every brute force starts from)."""
    n, m = x.shape[0], len(ts)
    outputs = activations.record(model, ts.apply(x).reshape(n * m, *x.shape[1:]))
    return {name: out.double().reshape(n, m, *out.shape[1:]).numpy() for name, out in outputs.items()}


def untransformed(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """{layer: float64 [n, *shape]}: outputs for the untransformed samples."""
    return {k: v.double().numpy() for k, v in activations.record(model, x).items()}


def nv_division(tv, sv):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sv > 0, tv / np.where(sv > 0, sv, 1), np.where(tv == 0, 1.0, np.inf))


def normalize_np(maps):
    norm = np.linalg.norm(maps, axis=-1, keepdims=True)
    return np.where(norm > 0, maps / np.where(norm > 0, norm, 1), 0.0)


# ---------------------------------------------------------------------------- brute forces


def brute_variance(measure, st, ref, ts) -> np.ndarray:
    """TV, SV, NV of [n, m, *shape] directly (numpy std/var over each axis)."""
    n, m, *shape = st.shape
    if measure.mode == "aggregate" and len(shape) >= 3:
        maps = st.reshape(n, m, -1, shape[-2] * shape[-1])
        st = {"mean": maps.mean(-1), "sum": maps.sum(-1), "max": maps.max(-1)}[measure.agg]
        shape = list(st.shape[2:])
    flat = st.reshape(n, m, -1)
    spread = (lambda a, ax: a.std(axis=ax, ddof=1)) if measure.stat == "std" else (lambda a, ax: a.var(axis=ax, ddof=1))
    tv, sv = spread(flat, 1).mean(0).reshape(shape), spread(flat, 0).mean(0).reshape(shape)
    if measure.mode == "channel" and len(shape) >= 3:
        tv, sv = tv.reshape(-1, shape[-2] * shape[-1]).mean(1), sv.reshape(-1, shape[-2] * shape[-1]).mean(1)
    short = measure.short_name.removesuffix("SE")
    return {"TV": tv, "SV": sv, "NV": nv_division(tv, sv)}[short]


def brute_anova(measure, st, ref, ts) -> np.ndarray:
    """F and p with scipy's f_oneway (groups = transformations); a constant unit → F = 0, p = 1."""
    n, m, *shape = st.shape
    flat = st.reshape(n, m, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # f_oneway warns (and returns NaN) for constant units
        f, p = stats.f_oneway(*[flat[:, j, :] for j in range(m)], axis=0)
    constant = np.all(flat == flat[:1, :1], axis=(0, 1))
    f, p = np.where(constant, 0.0, f), np.where(constant, 1.0, p)
    alpha = measure.alpha / flat.shape[2] if measure.bonferroni else measure.alpha
    return {"F": f, "p": p, "reject": (p < alpha).astype(float)}[measure.output].reshape(shape)


def brute_goodfellow(measure, st, ref, ts) -> np.ndarray:
    """Threshold on the untransformed samples (percentile: the (q+1)-th largest; normal: μ + zσ),
    G, L over the ST matrix (all samples, or the firing ones only), score = L/G."""
    n, m, *shape = st.shape
    a, st = ref.reshape(n, -1), st.reshape(n, m, -1)
    if measure.threshold == "percentile":
        q = min(max(math.ceil(measure.firing_rate * n - 1e-9), 1), n - 1)
        t = np.sort(a, axis=0)[n - q - 1]
    else:
        t = a.mean(0) + stats.norm.isf(measure.firing_rate) * a.std(0, ddof=1)
    fires = a > t
    g = fires.mean(0)
    above = st > t
    with np.errstate(invalid="ignore", divide="ignore"):
        if measure.local == "all":
            local = above.mean((0, 1))
        else:
            local = (above & fires[:, None]).sum((0, 1)) / (m * fires.sum(0))
        score = np.where(g > 0, local / g, np.nan)
    return {"threshold": t, "global": g, "local": local, "score": score}[measure.output].reshape(shape)


def brute_distance(measure, st, ref, ts) -> np.ndarray:
    """TD, SD, ND by explicit pairs (itertools.combinations) over whole rows and columns."""
    n, m, *shape = st.shape
    if len(shape) >= 3:
        maps = st.reshape(n, m, -1, shape[-2] * shape[-1])
        if measure.normalize:
            maps = normalize_np(maps)
        vec = maps if measure.unit == "channel" else maps.reshape(n, m, -1, 1)
    else:
        vec = st.reshape(n, m, -1, 1)

    def dist(u, v):  # [..., G, D] → [..., G]
        sq = ((u - v) ** 2).sum(-1)
        return sq if measure.metric == "sqeuclidean" else np.sqrt(sq)

    td = np.mean([np.mean([dist(vec[i, j], vec[i, k]) for j, k in itertools.combinations(range(m), 2)], axis=0)
                  for i in range(n)], axis=0)
    sd = np.mean([np.mean([dist(vec[i, j], vec[k, j]) for i, k in itertools.combinations(range(n), 2)], axis=0)
                  for j in range(m)], axis=0)
    if measure.unit == "element" or len(shape) < 3:
        td, sd = td.reshape(shape), sd.reshape(shape)
    return {"TD": td, "SD": sd, "ND": nv_division(td, sd)}[measure.short_name]


def detransformed(st, ts):
    """B_ij = t_j⁻¹(A_ij) by an explicit loop over j, independent of apply_each: exact sets by
    torch.rot90 backwards, others by warping with the inverted matrix. st: [n, m, C, H, W]."""
    out = np.empty_like(st)
    for j in range(st.shape[1]):
        a = torch.from_numpy(st[:, j])
        if ts.exact:
            k, flip, dx, dy = ts.elements[j]
            assert not flip and not dx and not dy
            out[:, j] = torch.rot90(a, -k, dims=(2, 3)).numpy()
        else:
            out[:, j] = T.warp(a, torch.linalg.inv(ts.matrices[j]), fill=0.0).numpy()
    return out


def brute_variance_se(measure, st, ref, ts) -> np.ndarray | None:
    return None if st.ndim != 5 else brute_variance(measure, detransformed(st, ts), ref, ts)


def brute_dses(measure, st, ref, ts) -> np.ndarray | None:
    """Mean over (i, j) of sqrt(mean_hw (F(t_j x_i) − t_j F(x_i))²), F(x) from a plain forward of x."""
    if st.ndim != 5:
        return None
    fx = torch.from_numpy(ref)
    ds = []
    for j in range(len(ts)):
        expected = T.warp(fx, ts.matrices[j], fill=0.0).numpy() if not ts.exact else ts.apply(fx)[:, j].numpy()
        u = st[:, j].reshape(st.shape[0], st.shape[2], -1)
        v = expected.reshape(expected.shape[0], expected.shape[1], -1)
        if measure.normalize:
            u, v = normalize_np(u), normalize_np(v)
        ds.append(np.sqrt(((u - v) ** 2).mean(-1)))  # [n, C]
    return np.mean(ds, axis=(0, 1))


def _cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def geed_orbit_terms(z, identity):
    """From f(g·x) [n, m, D]: raw cosine G-EED (1 − S), Euclidean G-EED, S (mean cos to the orbit
    centroid) and M (mean cos over all pairs of distinct untransformed samples, column ``identity``)."""
    n, m = z.shape[:2]
    cos, dist = [], []
    for i in range(n):
        c = z[i].mean(axis=0)
        for g in range(m):
            cos.append(_cos(z[i, g], c))
            dist.append(np.linalg.norm(z[i, g] - c))
    pairs = [_cos(z[i, identity], z[k, identity]) for i in range(n) for k in range(n) if i != k]
    return 1 - np.mean(cos), np.mean(dist), np.mean(cos), np.mean(pairs)


def brute_geed_invariance(measure, st, ref, ts) -> np.ndarray:
    """1 − mean cos (or mean ‖·‖) to the orbit centroid; normalised: S / M."""
    raw_cos, raw_euc, s, m = geed_orbit_terms(st.reshape(*st.shape[:2], -1), ts.identity_index())
    if measure.metric == "euclidean":
        return np.array(raw_euc)
    return np.array(s / m) if measure.normalize else np.array(raw_cos)


def brute_geed_kl(measure, st, ref, ts) -> np.ndarray | None:
    if st.ndim != 3:
        return None
    p = np.exp(st - st.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mean = p.mean(axis=1, keepdims=True)
    return np.array((p * (np.log(p) - np.log(mean))).sum(-1).mean())


def brute_geed_equivariance(measure, st, ref, ts) -> np.ndarray | None:
    """d(f(g·x), g·f(x)) with g·f(x) = k quarter turns of every map (c4's k-th element)."""
    if st.ndim != 5:
        return None
    n, m = st.shape[:2]
    cos, dist = [], []
    for i in range(n):
        for k in range(m):
            expected = np.rot90(st[i, 0], k, axes=(-2, -1)).ravel()
            cos.append(_cos(st[i, k].ravel(), expected))
            dist.append(np.linalg.norm(st[i, k].ravel() - expected))
    return np.array(1 - np.mean(cos) if measure.metric == "cosine" else np.mean(dist))


# ---------------------------------------------------------------------------- the cases


@dataclass
class Family:
    """Classes measured together; ``brute`` per class; every (ts factory) runs every instance."""

    name: str
    instances: dict[type, list[Any]]
    brute: dict[type, Callable]
    sets: list[Callable[[], Any]]
    rtol: float = 1e-6
    atol: float = 1e-12
    batch_rtol: float | Callable[[Any], float] = 1e-9  # a number, or measure → number
    merge_rtol: float | Callable[[Any], float] = 1e-9
    mergeable: bool = True  # states of two passes merge even when each ran its own reference pass
    options: dict[str, Any] = field(default_factory=dict)

    def measures(self) -> list[Any]:
        return [m for ms in self.instances.values() for m in ms]

    def tolerance(self, which: str, measure: Any) -> float:
        value = getattr(self, which)
        return value(measure) if callable(value) else value


def _by_metric(measure: Any) -> float:
    return 1e-9 if measure.metric == "sqeuclidean" else 1e-6


def _grid(cls, **axes):
    keys = list(axes)
    return [cls(**dict(zip(keys, values))) for values in itertools.product(*axes.values())]


FAMILIES = [
    Family(
        "variance",
        {cls: _grid(cls, mode=("element", "channel"), stat=("std", "var"))
         + [cls(mode="aggregate", agg=a) for a in ("mean", "sum", "max")]
         for cls in (TransformationVariance, SampleVariance, NormalizedVariance)},
        {cls: brute_variance for cls in (TransformationVariance, SampleVariance, NormalizedVariance)},
        [lambda: T.rotations(5)],
    ),
    Family(
        "anova",
        {AnovaMeasure: [AnovaMeasure(), AnovaMeasure(output="p"), AnovaMeasure(output="reject"),
                        AnovaMeasure(output="reject", bonferroni=False, alpha=0.05)]},
        {AnovaMeasure: brute_anova},
        [lambda: T.rotations(5)],
        rtol=1e-5,
    ),
    Family(
        "goodfellow",
        {GoodfellowMeasure: [GoodfellowMeasure(r, th, lo, out) for th in ("percentile", "normal")
                             for lo in ("all", "firing") for r in (0.1, 0.3)
                             for out in ("threshold", "global", "local", "score")]},
        {GoodfellowMeasure: brute_goodfellow},
        [lambda: T.rotations(5), lambda: T.rotations(5, degrees=90).subset([0, 1, 3, 4])],  # ±45°: no identity
        rtol=1e-12, atol=1e-12, batch_rtol=1e-12, mergeable=False,
    ),
    Family(
        "distance",
        {cls: _grid(cls, unit=("element", "channel"), metric=("sqeuclidean", "euclidean"), normalize=(False, True))
         for cls in (TransformationDistance, SampleDistance, NormalizedDistance)},
        {cls: brute_distance for cls in (TransformationDistance, SampleDistance, NormalizedDistance)},
        [lambda: T.rotations(5)],
        # sqeuclidean is exact from moments (1e-9); euclidean sums float32-stored columns (1e-6)
        rtol=2e-5, atol=1e-9, batch_rtol=_by_metric, merge_rtol=_by_metric,
    ),
    Family(
        "same-equivariance",
        {**{cls: _grid(cls, mode=("element", "channel"), stat=("std", "var"))
            for cls in (TransformationVarianceSE, SampleVarianceSE, NormalizedVarianceSE)},
         DistanceSameEquivariance: [DistanceSameEquivariance(), DistanceSameEquivariance(normalize=True),
                                    DistanceSameEquivariance(reference=True)]},
        {TransformationVarianceSE: brute_variance_se, SampleVarianceSE: brute_variance_se,
         NormalizedVarianceSE: brute_variance_se, DistanceSameEquivariance: brute_dses},
        [lambda: T.rotations(5), lambda: T.c4()],
        # float32 warps of float32 maps (engine) vs of float64 maps (brute force)
        rtol=1e-5, atol=1e-7,
    ),
    Family(
        "same-equivariance-reference",  # no identity in the set: F(x) from the reference pass
        {DistanceSameEquivariance: [DistanceSameEquivariance(reference=True),
                                    DistanceSameEquivariance(normalize=True, reference=True)]},
        {DistanceSameEquivariance: brute_dses},
        [lambda: T.rotations(4, degrees=90)],
        rtol=1e-5, atol=1e-7,
    ),
    Family(
        "geed",
        {GEEDInvariance: [GEEDInvariance(), GEEDInvariance(metric="euclidean"), GEEDInvariance(normalize=True)],
         GEEDOutputKL: [GEEDOutputKL()]},
        {GEEDInvariance: brute_geed_invariance, GEEDOutputKL: brute_geed_kl},
        [lambda: T.c4(), lambda: T.rotations(5)],
        rtol=1e-9, atol=1e-12, batch_rtol=1e-10,
    ),
    Family(
        "geed-equivariance",
        {GEEDEquivariance: [GEEDEquivariance(), GEEDEquivariance(metric="euclidean")]},
        {GEEDEquivariance: brute_geed_equivariance},
        [lambda: T.c4()],
        rtol=1e-9, atol=1e-12, batch_rtol=1e-10,
    ),
]


def families_of(cls: type) -> list[Family]:
    return [f for f in FAMILIES if cls in f.instances]


def covered_classes() -> set[type]:
    return {cls for f in FAMILIES for cls in f.instances}


@functools.cache
def recorded(ts_key: tuple) -> tuple[dict, dict]:
    """(ST tensor, untransformed outputs) of the harness model and samples for one set (cached)."""
    model, x = small_cnn(), samples()
    return st_tensor(model, x, _SETS[ts_key]), untransformed(model, x)


_SETS: dict[tuple, Any] = {}


def set_key(ts: Any) -> tuple:
    """A hashable key of a transformation set, registered for :func:`recorded`."""
    key = (type(ts).__name__, ts.name, tuple(np.round(ts.matrices.numpy(), 12).ravel().tolist()))
    _SETS[key] = ts
    return key
