"""Named experiment building blocks and profiles, shared by the reproduction notebooks.

A notebook states *what* it compares (models, datasets, transformations); this module knows *how*:
which transformation set a name means, how a model is built, trained (cached) and measured, and
what the ``quick`` (2 CPU cores) and ``paper`` (the papers' settings, for a GPU) profiles are.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd
import torch
from torch import nn

from . import data, models, train, transforms
from .measures import (
    GEEDEquivariance,
    GEEDInvariance,
    GEEDOutputKL,
    NormalizedVariance,
    SampleVariance,
    TransformationVariance,
    evaluate,
)
from .measures.base import Measure
from .paths import resolve
from .results import MeasureResult

__all__ = [
    "PROFILES",
    "TRANSFORMATIONS",
    "ModelSpec",
    "accuracy_table",
    "augmentation_set",
    "build_model",
    "fine_tuned_model",
    "geed_measures",
    "measure",
    "measure_geed",
    "measurement_set",
    "profile_settings",
    "tidy",
    "trained_model",
]

TRANSFORMATIONS = ("rotation", "scale", "translation")

# Settings per profile. quick: sized so that every notebook together runs in well under 30 min on
# 2 CPU cores; paper: [Q23]'s settings (full training sets, 1,000 test samples, the 25-element sets).
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "n_train": 6000,
        "epochs": 3,
        "n_samples": 200,
        "n_test": 500,
        "batch_size": 128,
        "simpleconv": {"filters": 16, "fc_units": 64},
    },
    "paper": {
        "n_train": None,  # the whole training split
        "epochs": 20,
        "n_samples": 1000,
        "n_test": None,
        "batch_size": 128,
        "simpleconv": {"filters": 32, "fc_units": 64},
    },
}


def profile_settings(profile: str) -> dict[str, Any]:
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {list(PROFILES)}, got {profile!r}")
    return dict(PROFILES[profile])


def measurement_set(name: str, m: int | None = None, degrees: float = 360.0) -> transforms.TransformationSet:
    """The set a model is measured with: [Q23]'s 25-element sets, ``m`` rotations over ``degrees``,
    or the exact groups ``"c4"`` (quarter turns) and ``"d4"`` (quarter turns and flips)."""
    if name in ("c4", "d4"):
        return getattr(transforms, name)()
    if name == "rotation":
        return transforms.rotations(m or 25, degrees=degrees)
    if name in ("scale", "translation", "combined"):
        if m is not None and m != len(transforms.paper_set(name)):
            raise ValueError(f"m: the {name} set of the paper has a fixed size; got m={m}")
        return transforms.paper_set(name)
    raise ValueError(f"name must be one of {TRANSFORMATIONS + ('combined', 'c4', 'd4')}, got {name!r}")


def augmentation_set(name: str | None, degrees: float = 360.0) -> transforms.TransformationSet | None:
    """What a model trained "with augmentation" sees: one random member per image and batch.

    Rotations are drawn from 360 angles (1° apart) over ``degrees``; scales and translations from
    the paper's sets (so training covers exactly what is measured)."""
    if name is None:
        return None
    if name == "rotation":
        return transforms.rotations(max(2, int(round(degrees))), degrees=degrees)
    return measurement_set(name)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that identifies a trained model (the training cache keys on the same things)."""

    architecture: str = "SimpleConv"
    dataset: str = "mnist"
    augment: str | None = None
    augment_degrees: float = 360.0
    init_seed: int = 0
    train_seed: int = 0
    epochs: int = 3  # 0 = untrained
    n_train: int | None = 6000
    batch_size: int = 128
    task: str = "classify"  # or "regress-transformation" (predict the augment set's matrix, CLEI 2021)
    lr: float = 1e-3  # Adam's learning rate
    options: dict = field(default_factory=dict, hash=False)

    def label(self) -> str:
        aug = "no augmentation" if self.augment is None else f"{self.augment} augmentation"
        return f"{self.architecture} · {self.dataset} · {aug}"

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh model for ``spec``'s dataset (channels, size, classes), initialised from init_seed."""
    info = data.describe(spec.dataset)
    torch.manual_seed(spec.init_seed)
    return models.build(
        spec.architecture,
        in_channels=info["channels"],
        num_classes=info["classes"] if spec.task == "classify" else 6,
        image_size=info["size"],
        **spec.options,
    )


def trained_model(
    spec: ModelSpec, data_root: str = "data", models_dir: str = "data/models", progress: bool = True
) -> nn.Module:
    """Build and train (or load from the cache) the model of ``spec``; eval mode on return."""
    model = build_model(spec)
    if spec.epochs > 0:
        train_set = data.load(spec.dataset, "train", n=spec.n_train, root=resolve(data_root), seed=spec.train_seed)
        train.train(
            model,
            train_set,
            augment=augmentation_set(spec.augment, spec.augment_degrees),
            epochs=spec.epochs,
            seed=spec.train_seed,
            batch_size=spec.batch_size,
            cache_dir=resolve(models_dir),
            progress=progress,
            task=spec.task,
            lr=spec.lr,
        )
    model.spec = spec  # what the model is, for tables and figures
    return model.eval()


def fine_tuned_model(
    pretrained: ModelSpec, spec: ModelSpec, data_root: str = "data", models_dir: str = "data/models",
    progress: bool = True,
) -> nn.Module:
    """``spec``'s training started from the weights of ``pretrained`` (trained, cached, on its own
    dataset) instead of ``spec.init_seed``'s random ones; cached too (the initial weights are part
    of the checkpoint key). Both specs must describe the same architecture and input/output sizes."""
    if pretrained.architecture != spec.architecture or pretrained.options != spec.options:
        raise ValueError(
            f"pretrained: a {pretrained.architecture} {pretrained.options} cannot initialise a "
            f"{spec.architecture} {spec.options}; the architectures must be the same"
        )
    source = trained_model(pretrained, data_root, models_dir, progress)
    model = build_model(spec)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as error:
        raise ValueError(
            f"pretrained: weights trained on {pretrained.dataset!r} do not fit a model for {spec.dataset!r} "
            f"(input channels, image size or classes differ): {error}"
        ) from None
    train_set = data.load(spec.dataset, "train", n=spec.n_train, root=resolve(data_root), seed=spec.train_seed)
    train.train(model, train_set, augment=augmentation_set(spec.augment, spec.augment_degrees),
                epochs=spec.epochs, seed=spec.train_seed, batch_size=spec.batch_size,
                cache_dir=resolve(models_dir), progress=progress, task=spec.task, lr=spec.lr)
    model.spec = spec
    model.pretrained = pretrained
    return model.eval()


def measure(
    model: nn.Module,
    dataset: str,
    transformation: str | transforms.TransformationSet,
    n_samples: int,
    measures: list | None = None,
    data_root: str = "data",
    seed: int = 0,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, MeasureResult]:
    """TV, SV, NV (channel mode, as in [Q23]) of every layer, on a stratified test subset."""
    samples = data.load(dataset, "test", n=n_samples, root=resolve(data_root), seed=seed)
    ts = measurement_set(transformation) if isinstance(transformation, str) else transformation
    measures = measures or [
        TransformationVariance(mode="channel"),
        SampleVariance(mode="channel"),
        NormalizedVariance(mode="channel"),
    ]
    spec = getattr(model, "spec", None)
    meta = {"dataset": dataset, "transformation": transformation if isinstance(transformation, str) else ts.name}
    if spec is not None:
        meta.update({"model": spec.architecture, "augment": spec.augment or "none",
                     "init_seed": spec.init_seed, "trained": spec.epochs > 0})
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


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return asdict(spec)
