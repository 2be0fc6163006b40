"""Measuring the reproduction's models: the paper's measures on a stratified test subset, tidy frames."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
from torch import nn

from .. import data, train, transforms
from ..measures import (
    GEEDEquivariance,
    GEEDInvariance,
    GEEDOutputKL,
    NormalizedVariance,
    SampleVariance,
    TransformationVariance,
    evaluate,
)
from ..measures.base import Measure
from ..paths import resolve
from ..results import MeasureResult
from .profiles import measurement_set

__all__ = ["Timer", "accuracy_table", "geed_measures", "measure", "measure_geed", "tidy", "variance_measures"]


def variance_measures() -> list[Measure]:
    """TV, SV, NV in channel mode: the measures of [Q23]'s experiments."""
    return [TransformationVariance(mode="channel"), SampleVariance(mode="channel"), NormalizedVariance(mode="channel")]


def measure(
    model: nn.Module,
    dataset: str,
    transformation: str | transforms.TransformationSet,
    n_samples: int,
    measures: list | dict | None = None,
    data_root: str = "data",
    seed: int = 0,
    progress: bool = True,
    blocks: int | None = None,
    stratified: bool = True,
    subset: Any = None,
    **kwargs: Any,
) -> dict[str, MeasureResult]:
    """``measures`` (default TV, SV, NV in channel mode, as in [Q23]) of every layer, on a stratified
    (or, with ``stratified=False``, uniformly drawn) test subset of ``n_samples`` images of
    ``dataset``; ``blocks`` jackknife blocks give intervals.

    ``subset``: instead of that draw, the images an object with ``select(test_split) -> dataset``
    picks from the whole test split (e.g. one part of
    :class:`tmlib.experiments.measurement.Partition`: disjoint stratified subsets)."""
    if subset is not None:
        samples = subset.select(data.load(dataset, "test", root=resolve(data_root)))
    else:
        samples = data.load(dataset, "test", n=n_samples, root=resolve(data_root), seed=seed, stratified=stratified)
    ts = measurement_set(transformation) if isinstance(transformation, str) else transformation
    measures = measures or variance_measures()
    spec = getattr(model, "spec", None)
    meta = {"dataset": dataset, "transformation": transformation if isinstance(transformation, str) else ts.name}
    if spec is not None:
        meta.update({"model": spec.architecture, "augment": spec.augment or "none",
                     "init_seed": spec.init_seed, "trained": spec.epochs > 0})
    if blocks is not None:
        kwargs["blocks"] = blocks
    return evaluate(model, samples, ts, measures, progress=progress, metadata=meta, **kwargs)


def geed_measures(model: nn.Module, ts: transforms.TransformationSet) -> list[Measure]:
    """Kvinge et al.'s metrics for one model: normalised and raw invariance G-EED (cosine), latent
    equivariance (the model's own action on its layers where it has one, e.g. a steerable CNN's
    field types; else every channel's map moved like the image) and the output KL."""
    actions = model.latent_actions(ts) if callable(getattr(model, "latent_actions", None)) else "spatial"
    return [GEEDInvariance(normalize=True), GEEDInvariance(), GEEDEquivariance(action=actions), GEEDOutputKL()]


def measure_geed(
    model: nn.Module,
    dataset: str,
    transformation: str | transforms.TransformationSet,
    n_samples: int,
    data_root: str = "data",
    seed: int = 0,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, MeasureResult]:
    """:func:`geed_measures` of every layer on a stratified test subset of ``dataset``, one pass."""
    ts = measurement_set(transformation) if isinstance(transformation, str) else transformation
    return measure(model, dataset, ts, n_samples, measures=geed_measures(model, ts), data_root=data_root,
                   seed=seed, progress=progress, **kwargs)


def accuracy_table(
    trained: dict[str, nn.Module], dataset: str, transformations: list[str], n_test: int | None,
    data_root: str = "data", seed: int = 0,
) -> pd.DataFrame:
    """Test accuracy of each model upright and under each transformation set (rows: models)."""
    test = data.load(dataset, "test", n=n_test, root=resolve(data_root), seed=seed)
    rows = {}
    for label, model in trained.items():
        row = {"upright": train.accuracy(model, test)}
        for name in transformations:
            row[name] = train.accuracy(model, test, transformations=measurement_set(name))
        rows[label] = row
    return pd.DataFrame(rows).T.rename_axis("model")


def tidy(results: dict[str, MeasureResult], **columns: Any) -> pd.DataFrame:
    """Layer means of several measures as one tidy frame, with extra constant columns."""
    frames = []
    for result in results.values():
        frame = result.to_frame()
        for key in ("augment", "init_seed", "trained"):
            if key in result.metadata:
                frame[key] = result.metadata[key]
        frames.append(frame.assign(**columns))
    return pd.concat(frames, ignore_index=True)


class Timer:
    """``with Timer() as t: ...; t.seconds`` — wall time of a block, for the notebooks' reports."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start
