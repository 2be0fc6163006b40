"""Designs of the Quiroga et al. notebooks (00 quickstart … 08 same-equivariance)."""

from __future__ import annotations

from typing import Any

from ... import transforms
from ..design import Design, Measurement
from ..profiles import TRANSFORMATIONS, settings
from ..zoo import ModelSpec

__all__ = ["quickstart", "simpleconv", "validation"]

# Image counts at which the "invariance during training" model keeps its weights.
TRAINING_SNAPSHOTS = (0, 2500, 5000, 10000, 20000, 40000)


def simpleconv(s: dict[str, Any], dataset: str = "mnist", augment: str | None = None, seed: int = 0,
               **fields: Any) -> ModelSpec:
    """The reproduction's SimpleConv for ``s`` (a profile's settings): trained to its floor (quick)
    or for the authors' epochs (paper), initial weights and data order from ``seed``."""
    return ModelSpec.from_settings(s, architecture="SimpleConv", dataset=dataset, augment=augment,
                                   init_seed=seed, train_seed=seed, **fields)


def _seeds(s: dict[str, Any], n: int | None, seed: int) -> list[int]:
    return list(range(seed, seed + (n if n is not None else s["seeds"])))


def quickstart(profile: str = "quick", n_rotations: int = 16, n_samples: int | None = None,
               n_train: int | None = None, epochs: int | None = None, seed: int = 0, **_: Any) -> Design:
    """SimpleConv on MNIST without and with rotation augmentation, and untrained: NV per layer
    under ``n_rotations`` rotations."""
    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs, n_rotations=n_rotations)
    plain = simpleconv(s, seed=seed)
    d = Design("00_quickstart", s, models={"untrained": plain.untrained(), "no augmentation": plain,
                                            "rotation augmentation": simpleconv(s, augment="rotation", seed=seed)})
    ts = transforms.rotations(n_rotations)
    for label in d.models:
        d.measurements[label] = Measurement(label, "mnist", ts, s["n_samples"], blocks=s["blocks"])
    return d


def validation(profile: str = "quick", transformations: list[str] | None = None, n_seeds: int | None = None,
               n_samples: int | None = None, n_train: int | None = None, epochs: int | None = None, seed: int = 0,
               **_: Any) -> Design:
    """[Q23] §5.1: SimpleConv on MNIST trained without and with each augmentation, over seeds, and
    the untrained networks of the same seeds; each measured under each transformation. One more
    rotation-augmented model keeps snapshots of its weights during training."""
    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs)
    transformations = list(transformations or TRANSFORMATIONS)
    d = Design("01_validation", s)
    for k in _seeds(s, n_seeds, seed):
        plain = simpleconv(s, seed=k)
        d.models[f"untrained s{k}"] = plain.untrained()
        d.models[f"none s{k}"] = plain
        for t in transformations:
            d.models[f"{t} s{k}"] = simpleconv(s, augment=t, seed=k)
        for t in transformations:
            for training in ("untrained", "none", t):
                d.measurements[(training, k, t)] = Measurement(f"{training} s{k}", "mnist", t, s["n_samples"],
                                                               blocks=s["blocks"])
    if "rotation" in transformations:
        d.models["rotation, during training"] = simpleconv(
            s, augment="rotation", seed=seed, snapshots=TRAINING_SNAPSHOTS)
    return d
