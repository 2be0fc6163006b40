"""Designs of the Quiroga et al. notebooks (00 quickstart … 08 same-equivariance)."""

from __future__ import annotations

from typing import Any

from ... import transforms
from ..design import Design, Measurement
from ..profiles import TRANSFORMATIONS, settings
from ..zoo import ModelSpec

__all__ = ["architecture", "model_comparison", "quickstart", "sensitivity", "simpleconv", "stability", "validation"]

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
               n_train: int | None = None, epochs: int | None = None, n_test: int | None = None, seed: int = 0, **_: Any) -> Design:
    """SimpleConv on MNIST without and with rotation augmentation, and untrained: NV per layer
    under ``n_rotations`` rotations."""
    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs, n_test=n_test, n_rotations=n_rotations)
    plain = simpleconv(s, seed=seed)  # the same specs as notebook 01's seed: one cached model each
    d = Design("00_quickstart", s, models={"untrained": plain.untrained(), "no augmentation": plain,
                                            "rotation augmentation": simpleconv(s, augment="rotation", seed=seed)})
    ts = transforms.rotations(n_rotations)
    for label in d.models:
        d.measurements[label] = Measurement(label, "mnist", ts, s["n_samples"], blocks=s["blocks"])
    return d


def explorer(profile: str = "quick", n_rotations: int = 16, n_samples: int | None = None,
             n_train: int | None = None, epochs: int | None = None, n_test: int | None = None, seed: int = 0,
             **_: Any) -> Design:
    """Notebook 12's checkpoints: the quickstart's three SimpleConvs (one cached model each), and
    the NV of each under ``n_rotations`` rotations with jackknife blocks for its claim (the
    explorer itself computes its own pass)."""
    d = quickstart(profile, n_rotations, n_samples, n_train, epochs, n_test, seed)
    d.notebook = "12_explorer"
    return d


def validation(profile: str = "quick", transformations: list[str] | None = None, n_seeds: int | None = None,
               n_samples: int | None = None, n_train: int | None = None, epochs: int | None = None, n_test: int | None = None, seed: int = 0,
               **_: Any) -> Design:
    """[Q23] §5.1: SimpleConv on MNIST trained without and with each augmentation, over seeds, and
    the untrained networks of the same seeds; each measured under each transformation. One more
    rotation-augmented model keeps snapshots of its weights during training."""
    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs, n_test=n_test)
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


def _available(name: str, data_root: str = "data") -> tuple[bool, str]:
    from ... import data
    from ...paths import resolve

    return data.available(name, resolve(data_root))


def stability(profile: str = "quick", n_seeds: dict[str, int] | int | None = None, transformations: list[str] | None = None,
              datasets: list[str] | None = None, n_dataset_seeds: int | None = None, n_samples: int | None = None,
              n_train: int | None = None, epochs: int | None = None, n_test: int | None = None, seed: int = 0, data_root: str = "data",
              **_: Any) -> Design:
    """[Q23] §5.3, the authors' set-up: SimpleConvs trained *with* the transformation, many seeds on
    MNIST (quick: 10 rotation, 5 scale, 5 translation; paper: 30 each), the untrained network of
    every seed beside them, and the same transformations on a second dataset (the seeds of notebook
    03) for the between-dataset differences."""
    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs, n_test=n_test)
    transformations = list(transformations or TRANSFORMATIONS)
    default = {"rotation": 10, "scale": 5, "translation": 5} if profile == "quick" else dict.fromkeys(TRANSFORMATIONS, 30)
    counts = {t: (n_seeds.get(t, default[t]) if isinstance(n_seeds, dict) else n_seeds or default[t])
              for t in transformations}
    d = Design("02_random_init", s)
    others = [n for n in (datasets if datasets is not None else ["fashion-mnist"]) if n != "mnist"]
    for name in list(others):
        ok, why = _available(name, data_root)
        if not ok:
            others.remove(name)
            d.skipped[name] = why
    plan = [("mnist", t, k) for t in transformations for k in _seeds(s, counts[t], seed)]
    plan += [(name, t, k) for name in others for t in transformations for k in _seeds(s, n_dataset_seeds, seed)]
    for dataset, t, k in plan:
        spec = simpleconv(s, dataset=dataset, augment=t, seed=k)
        d.models[f"{dataset} {t} s{k}"] = spec
        d.models.setdefault(f"{dataset} untrained s{k}", spec.untrained())
        for training in ("trained", "untrained"):
            label = f"{dataset} {t} s{k}" if training == "trained" else f"{dataset} untrained s{k}"
            d.measurements[(dataset, t, k, training)] = Measurement(label, dataset, t, s["n_samples"],
                                                                    blocks=s["blocks"])
    return d


COMPLEXITY_FRACTIONS = (1.0, 0.5, 0.25, 0.125, 1 / 24)


def sensitivity(profile: str = "quick", datasets: list[str] | None = None, transformations: list[str] | None = None,
                n_seeds: int | None = None, complexity_fractions: list[float] | None = None,
                n_samples: int | None = None, n_train: int | None = None, epochs: int | None = None, n_test: int | None = None, seed: int = 0,
                data_root: str = "data", **_: Any) -> Design:
    """[Q23] §5.4: SimpleConv trained with each transformation on each dataset (over seeds), the
    untrained networks of the same seeds; diversity (MNIST models measured under every
    transformation) and complexity (measured on narrower ranges of their own transformation)."""
    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs, n_test=n_test)
    transformations = list(transformations or TRANSFORMATIONS)
    wanted = list(datasets or (["mnist", "fashion-mnist", "cifar10"] if profile == "quick" else ["mnist", "cifar10"]))
    d = Design("03_dataset_transformation", s)
    names = []
    for name in wanted:
        ok, why = _available(name, data_root)
        if ok:
            names.append(name)
        else:
            d.skipped[name] = why
    fractions = list(complexity_fractions or COMPLEXITY_FRACTIONS)
    d.settings.update(datasets=names, transformations=transformations, complexity_fractions=fractions)
    for k in _seeds(s, n_seeds, seed):
        for dataset in names:
            d.models[f"{dataset} untrained s{k}"] = simpleconv(s, dataset=dataset, seed=k).untrained()
            for t in transformations:
                d.models[f"{dataset} {t} s{k}"] = simpleconv(s, dataset=dataset, augment=t, seed=k)
            measured = transformations if dataset == "mnist" else []
            for t in transformations:
                for model in ("untrained", t):
                    d.measurements[("grid", dataset, model, t, k)] = Measurement(
                        f"{dataset} {model} s{k}", dataset, t, s["n_samples"], blocks=s["blocks"])
            for t_train in measured:  # diversity: every MNIST model under every transformation
                for t in transformations:
                    if t != t_train:
                        d.measurements[("grid", dataset, t_train, t, k)] = Measurement(
                            f"{dataset} {t_train} s{k}", dataset, t, s["n_samples"], blocks=s["blocks"])
            if dataset == "mnist" and k == seed:  # complexity: narrower ranges, the first seed
                for t in transformations:
                    for f in fractions[1:]:
                        ts = _ranged(t, f)
                        for model in ("untrained", t):
                            d.measurements[("complexity", model, t, f, k)] = Measurement(
                                f"{dataset} {model} s{k}", dataset, ts, s["n_samples"], blocks=s["blocks"])
    return d


def _ranged(name: str, fraction: float):
    from ..profiles import ranged_set

    return ranged_set(name, fraction)


# The five models of [Q23] §5.7 at the quick profile's widths (MNIST, 2 CPU cores) and the paper's.
MODEL_WIDTHS = {
    "quick": {"SimpleConv": {"filters": 16, "fc_units": 64}, "AllConvolutional": {"filters": 24},
              "VGG16D": {"base_filters": 8}, "ResNet": {"base_filters": 8}, "TIPooling": {"filters": 16, "fc_units": 64}},
    "paper": {"SimpleConv": {"filters": 32, "fc_units": 64}, "AllConvolutional": {"filters": 96},
              "VGG16D": {"base_filters": 64}, "ResNet": {"base_filters": 64}, "TIPooling": {"filters": 32, "fc_units": 64}},
}


def model_comparison(profile: str = "quick", dataset: str | None = None, architectures: list[str] | None = None,
                     transformation: str = "rotation", aggregate_rotations: int = 16, n_samples: int | None = None,
                     n_train: int | None = None, epochs: int | None = None, n_test: int | None = None, seed: int = 0, data_root: str = "data",
                     **_: Any) -> Design:
    """[Q23] §5.7: the five models trained with rotation augmentation (as the authors), each at its
    floor, and the untrained networks; plus the 2019 table: SimpleConv, AllConvolutional, VGG16D and
    ResNet trained with and without rotation augmentation, measured in aggregate mode (mean over
    each feature map) under 16 rotations on non-stratified test images."""
    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs, n_test=n_test)
    dataset = dataset or ("mnist" if profile == "quick" else "cifar10")
    architectures = list(architectures or ["SimpleConv", "AllConvolutional", "VGG16D", "ResNet", "TIPooling"])
    d = Design("04_model_comparison", s)
    ok, why = _available(dataset, data_root)
    d.settings.update(dataset=dataset, architectures=architectures)
    if not ok:
        d.skipped[dataset] = why
        return d
    widths = MODEL_WIDTHS[profile]
    aggregate = transforms.rotations(aggregate_rotations)
    for arch in architectures:
        spec = ModelSpec.from_settings(s, architecture=arch, dataset=dataset, augment=transformation,
                                       init_seed=seed, train_seed=seed, options=dict(widths[arch]))
        d.models[f"{arch}"] = spec
        d.models[f"{arch} untrained"] = spec.untrained()
        for label in (arch, f"{arch} untrained"):
            d.measurements[("profile", label)] = Measurement(label, dataset, transformation, s["n_samples"],
                                                             blocks=s["blocks"])
        if arch != "TIPooling":  # the 2019 table: four models, with and without augmentation
            d.models[f"{arch} plain"] = spec.with_(augment=None)
            for label in (arch, f"{arch} plain", f"{arch} untrained"):
                d.measurements[("2019", label)] = Measurement(label, dataset, aggregate, s["n_samples"],
                                                              measures=_aggregate_nv, blocks=s["blocks"],
                                                              stratified=False)
    return d


def _aggregate_nv(model: Any, ts: Any) -> list:
    from ...measures import NormalizedVariance

    return [NormalizedVariance(mode="aggregate")]


ARCHITECTURE_VARIANTS = {
    "base": {},
    "batch norm": {"batch_norm": True},
    "ReLU": {"activation": "relu"},
    "PReLU": {"activation": "prelu"},
    "tanh": {"activation": "tanh"},
    "kernel 5": {"kernel_size": 5},
    "kernel 7": {"kernel_size": 7},
    "strided conv": {"pooling": "strided"},
}


def architecture(profile: str = "quick", variants: list[str] | None = None, n_seeds: int | None = None,
                 transformation: str = "rotation", n_samples: int | None = None, n_train: int | None = None,
                 epochs: int | None = None, n_test: int | None = None, seed: int = 0, **_: Any) -> Design:
    """[Q23] §5.6: SimpleConv variants (batch norm, activation, kernel size, max pool vs strided
    convolution), each trained with rotation augmentation to the same floor over seeds, and the
    untrained network of every variant and seed."""
    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs, n_test=n_test)
    default = [v for v in ARCHITECTURE_VARIANTS if profile == "paper" or v != "kernel 7"]
    variants = list(variants or default)
    d = Design("06_architecture", s)
    # Seven variants × seeds × (trained, untrained): 2 seeds in the quick profile (its CPU budget), the
    # profile's seeds otherwise.
    n_seeds = n_seeds if n_seeds is not None else (2 if profile == "quick" else None)
    d.settings.update(variants=variants)
    for name in variants:
        options = {**s["simpleconv"], **ARCHITECTURE_VARIANTS[name]}
        for k in _seeds(s, n_seeds, seed):
            spec = simpleconv(s, augment=transformation, seed=k, options=options)
            d.models[f"{name} s{k}"] = spec
            d.models[f"{name} untrained s{k}"] = spec.untrained()
            for label in (f"{name} s{k}", f"{name} untrained s{k}"):
                d.measurements[(name, k, "untrained" in label)] = Measurement(label, "mnist", transformation,
                                                                               s["n_samples"], blocks=s["blocks"])
    return d
