"""Designs of the measurement notebooks: 05 sample size, 07 measure comparison, 08 same-equivariance.

The models are the SimpleConvs of notebook 01 (:func:`.quiroga.simpleconv`, the same specs, so the
same cached checkpoints) and, for 08, SimpleConvs trained to regress the transformation.
"""

from __future__ import annotations

from typing import Any

from ...measures import (
    AnovaMeasure,
    DistanceSameEquivariance,
    GoodfellowMeasure,
    NormalizedDistance,
    NormalizedVariance,
    NormalizedVarianceSE,
    SampleVarianceSE,
    TransformationVarianceSE,
)
from ..design import Design, Measurement
from ..measurement import Partition, phased_rotations, random_phase
from ..profiles import TRANSFORMATIONS, settings
from .quiroga import _seeds, simpleconv

__all__ = [
    "COMPARISON_MEASURES",
    "REGRESSION_FLOORS",
    "SAME_EQUIVARIANCE_MEASURES",
    "measure_comparison",
    "sample_size",
    "same_equivariance",
]

# --------------------------------------------------------------------------------------- 05

# Per profile: the grid's sizes (n and m), independent repeats per cell, the reference (n, m), and
# the same for the untrained network (None: not measured).
_SAMPLE_SIZE = {
    # quick: 5 × 248² + 448 × 256 = 422k forwards for the trained model, 2 × 248² + 224 × 256 = 180k
    # for the untrained one (≈ 600k in all).
    "quick": {"sizes": [8, 16, 32, 64, 128], "repeats": 5, "reference": (448, 256),
              "untrained_repeats": 2, "untrained_reference": (224, 256)},
    # The paper's grid: 58M forwards per repeat set and 21M for the reference (a GPU's work); the
    # test split cannot hold disjoint subsets for it, so cells are independent draws from the images
    # the reference leaves (Partition's fallback). The untrained grid is left out there (as costly).
    "paper": {"sizes": [24, 48, 96, 384, 1536, 2304], "repeats": 3, "reference": (4608, 4608),
              "untrained_repeats": 0, "untrained_reference": (4608, 4608)},
}


def sample_size(profile: str = "quick", sizes: list[int] | None = None, n_repeats: int | None = None,
                reference: tuple[int, int] | None = None, untrained_repeats: int | None = None,
                n_train: int | None = None, epochs: int | None = None, n_test: int | None = None, seed: int = 0,
                **_: Any) -> Design:
    """[Q23] §5.5: the NV profile (channel mode) of the rotation-trained SimpleConv of notebook 01
    (seed ``seed``) estimated from n samples × m rotations for every n, m in ``sizes``, each cell
    ``n_repeats`` times with independent draws, against a reference of ``reference`` = (n, m) that
    shares no sample and no angle with any cell: samples from disjoint class-stratified subsets of
    the test split (:class:`Partition`), rotations evenly over the circle from a random phase.
    The untrained network of the same seed gets the same grid with ``untrained_repeats`` repeats
    (0: not measured).

    Measurement keys: ``(model, "cell", n, m, repeat)`` and ``(model, "reference")``, model being
    ``"rotation"`` or ``"untrained"``."""
    s = settings(profile, n_train=n_train, epochs=epochs, n_test=n_test)
    p = dict(_SAMPLE_SIZE[profile])
    sizes = sorted(int(v) for v in (sizes or p["sizes"]))
    repeats = int(n_repeats if n_repeats is not None else p["repeats"])
    untrained_repeats = int(untrained_repeats if untrained_repeats is not None else p["untrained_repeats"])
    if len(sizes) < 2 or repeats < 2:
        raise ValueError(f"sample_size needs at least 2 sizes and 2 repeats, got {sizes} and {repeats}")
    trained = simpleconv(s, augment="rotation", seed=seed)
    d = Design("05_sample_size", s, models={"rotation": trained})
    plan = {"rotation": (repeats, tuple(reference or p["reference"]))}
    if untrained_repeats:
        d.models["untrained"] = trained.untrained()
        ref = tuple(reference or p["untrained_reference"])
        plan["untrained"] = (untrained_repeats, ref)
    s.update(sizes=sizes, repeats={k: r for k, (r, _) in plan.items()}, reference={k: v for k, (_, v) in plan.items()})
    for i, (model, (r_count, (n_ref, m_ref))) in enumerate(plan.items()):
        cells = [(n, m, r) for r in range(r_count) for n in sizes for m in sizes]
        partition = Partition((n_ref,) + tuple(n for n, _, _ in cells), seed=seed * 1000 + i)
        base = 10_000 * (seed * 10 + i)
        d.measurements[(model, "reference")] = Measurement(
            model, "mnist", phased_rotations(m_ref, random_phase(m_ref, base)), n_ref,
            measures=_nv, options={"subset": partition.part(0)})
        for k, (n, m, r) in enumerate(cells, 1):
            d.measurements[(model, "cell", n, m, r)] = Measurement(
                model, "mnist", phased_rotations(m, random_phase(m, base + k)), n,
                measures=_nv, options={"subset": partition.part(k)})
    return d


def _nv(model: Any, ts: Any) -> list:
    return [NormalizedVariance(mode="channel")]


# --------------------------------------------------------------------------------------- 07

COMPARISON_MEASURES = {
    "NV": "NV[channel,std]",
    "ND²": "ND[element,sqeuclidean,False]",
    "ND": "ND[element,euclidean,False]",
    "ANOVA": "ANOVA[reject,0.01,True]",
    "Goodfellow": "Goodfellow[percentile,0.01,all,score]",
}


# Test images per seed: the Euclidean ND keeps every activation value (n·m·F·4 bytes per layer).
_COMPARISON_SAMPLES = {"quick": 200, "paper": 1000}
_EUCLIDEAN_MEMORY_MB = {"quick": 1024.0, "paper": 32768.0}


def _blocked_measures(model: Any, ts: Any) -> list:
    """The measures with jackknife replicates: NV, squared-Euclidean ND (from the same moments), ANOVA."""
    return [NormalizedVariance(mode="channel"), NormalizedDistance(metric="sqeuclidean"),
            AnovaMeasure(output="reject")]


def _unblocked_measures(firing_rates: tuple[float, ...], memory_mb: float = 1024.0):
    def measures(model: Any, ts: Any) -> list:
        return ([NormalizedDistance(metric="euclidean", max_memory_mb=memory_mb)]
                + [GoodfellowMeasure(firing_rate=r) for r in firing_rates])
    return measures


def measure_comparison(profile: str = "quick", transformation: str = "rotation",
                       firing_rates: list[float] | None = None, n_seeds: int | None = None,
                       n_samples: int | None = None, n_train: int | None = None, epochs: int | None = None,
                       n_test: int | None = None, blocks: int | None = None, seed: int = 0, **_: Any) -> Design:
    """[Q23] §5.2: NV, ND (squared and plain Euclidean), ANOVA and Goodfellow on the models of
    notebook 01 (SimpleConv on MNIST without and with ``transformation`` augmentation, over its
    seeds) and the untrained networks of the same seeds; nothing new is trained.

    Two passes per model, on the same test draw (seed k for seed k, so that the spread over seeds
    holds the sampling noise too): ``(training, k, "blocked")`` — NV, ND², ANOVA with jackknife
    blocks; ``(training, k, "unblocked")`` — Euclidean ND and Goodfellow at each firing rate
    (Goodfellow's thresholds are set on all n samples, so no jackknife; its uncertainty is the
    seeds'). ``training``: ``"untrained"``, ``"none"`` or the transformation."""
    n_samples = n_samples if n_samples is not None else _COMPARISON_SAMPLES[profile]
    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs, n_test=n_test, blocks=blocks)
    rates = tuple(sorted({0.01, *(firing_rates or (0.005, 0.01, 0.02, 0.05, 0.1))}))
    s.update(firing_rates=list(rates), transformation=transformation)
    d = Design("07_measure_comparison", s)
    unblocked = _unblocked_measures(rates, _EUCLIDEAN_MEMORY_MB[profile])
    for k in _seeds(s, n_seeds, seed):
        plain = simpleconv(s, seed=k)
        d.models[f"untrained s{k}"] = plain.untrained()
        d.models[f"none s{k}"] = plain
        d.models[f"{transformation} s{k}"] = simpleconv(s, augment=transformation, seed=k)
        for training in ("untrained", "none", transformation):
            label = f"{training} s{k}"
            d.measurements[(training, k, "blocked")] = Measurement(
                label, "mnist", transformation, s["n_samples"], measures=_blocked_measures, blocks=s["blocks"], seed=k)
            d.measurements[(training, k, "unblocked")] = Measurement(
                label, "mnist", transformation, s["n_samples"], measures=unblocked, seed=k)
    return d


# --------------------------------------------------------------------------------------- 08

# The regressors' floors: the largest median test error (each test image transformed once by a
# random member of the training set) in the transformation's units, and the training they get.
REGRESSION_FLOORS = {"rotation": 15.0, "scale": 0.10, "translation": 0.7}
# quick: one epoch of 43,000 training images per regressor, so that 3 transformations × 3 seeds
# train ≈ 390k images (≈ 5 min on one thread); the errors had levelled off after one epoch of
# 55,000 (a second gained 1° on rotation and 0.003 on scale). paper: 20 epochs of the whole split.
_REGRESSION_EPOCHS = {"quick": 1, "paper": 20}
_REGRESSION_TRAIN = {"quick": 43_000, "paper": None}
_REGRESSION_SEEDS = {"quick": 3, "paper": 5}

SAME_EQUIVARIANCE_MEASURES = {
    "TVSE": "TVSE[channel,std]",
    "SVSE": "SVSE[channel,std]",
    "NVSE": "NVSE[channel,std]",
    "DSES": "DSES[True]",
}


# Test images per seed (the de-transforming warps of every feature map cost ≈ 5× the forwards).
_SAME_EQUIVARIANCE_SAMPLES = {"quick": 100, "paper": 1000}


def _same_equivariance_measures(model: Any, ts: Any) -> list:
    return [TransformationVarianceSE(mode="channel"), SampleVarianceSE(mode="channel"),
            NormalizedVarianceSE(mode="channel"), DistanceSameEquivariance(normalize=True)]


def regressor(s: dict[str, Any], transformation: str, seed: int = 0, epochs: int | None = None,
              floor: float | None = None, **fields: Any):
    """A SimpleConv trained to regress ``transformation`` (the 2×3 matrix of the member applied,
    CLEI 2021's set-up): every epoch of the cap (no early stop for regressors), the floor a maximum
    median error (:data:`REGRESSION_FLOORS`, units of :func:`tmlib.experiments.regression_errors`)."""
    fields.setdefault("n_train", s["n_train"] if s.get("n_train") is not None else _REGRESSION_TRAIN[s["profile"]])
    return simpleconv(s, augment=transformation, seed=seed, task="regress-transformation", stop=None,
                      epochs=epochs if epochs is not None else _REGRESSION_EPOCHS[s["profile"]],
                      floor=floor if floor is not None else REGRESSION_FLOORS[transformation], **fields)


def same_equivariance(profile: str = "quick", transformations: list[str] | None = None, n_seeds: int | None = None,
                      n_samples: int | None = None, n_train: int | None = None, epochs: int | None = None,
                      floors: dict[str, float] | None = None, n_test: int | None = None, blocks: int | None = None,
                      seed: int = 0, **_: Any) -> Design:
    """[Q21]: SimpleConvs trained to regress each transformation, over seeds, and the untrained
    network of each (same architecture and initial weights); TVSE, SVSE, NVSE and DSES of every
    spatial layer under the transformation's measurement set, with jackknife blocks.
    Keys: ``(transformation, k, "regressor" | "untrained")``."""
    n_samples = n_samples if n_samples is not None else _SAME_EQUIVARIANCE_SAMPLES[profile]
    s = settings(profile, n_samples=n_samples, n_train=n_train, n_test=n_test, blocks=blocks)
    n_seeds = n_seeds if n_seeds is not None else _REGRESSION_SEEDS[profile]
    transformations = list(transformations or TRANSFORMATIONS)
    d = Design("08_same_equivariance", s)
    for t in transformations:
        for k in _seeds(s, n_seeds, seed):
            spec = regressor(s, t, seed=k, epochs=epochs, floor=(floors or {}).get(t))
            d.models[f"{t} regressor s{k}"] = spec
            d.models[f"{t} untrained s{k}"] = spec.untrained()
            for training in ("regressor", "untrained"):
                d.measurements[(t, k, training)] = Measurement(
                    f"{t} {training} s{k}", "mnist", t, s["n_samples"], measures=_same_equivariance_measures,
                    blocks=s["blocks"], seed=k)
    return d
