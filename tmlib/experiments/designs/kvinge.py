"""Design of notebook 09: Kvinge et al. (NeurIPS 2022), G-EED under the exact group C4.

Three experiments, every model over ``n_seeds`` seeds, each trained to its floor, beside the
untrained network of every architecture and seed:

* (a) augmentation vs equivariant layers: SimpleConv on MNIST without and with C4 augmentation,
  and a C4-steerable CNN (e2cnn, ``readout="full"``) without augmentation, trained the profile's
  way (quick: Adam 2e-3, warm-up and cosine over the 6-epoch cap, stopped at the floor; floor:
  the plain MNIST one, 0.95, since it is invariant by construction its accuracy upright and under
  C4 are the same);
* (b) pretrained initialisation: SimpleConv fine-tuned on MNIST (without and with C4
  augmentation) from the weights of the Fashion-MNIST model of the same seed, against the
  models of (a) trained from scratch; both trained to the same floor;
* (c) out of distribution: SimpleConv trained on MNIST or Fashion-MNIST, without and with C4
  augmentation, each measured on both test sets.

Measurement keys are ``(model label, dataset measured on)``; every pass is ``n_samples``
stratified test images × the 4 quarter turns, in ``blocks`` jackknife blocks, the same images for
every model measured on a dataset (paired differences).
"""

from __future__ import annotations

from typing import Any

from ... import transforms
from ...measures import GEEDInvariance, GEEDOutputKL
from ...paths import resolve
from ..design import Design, Measurement
from ..measuring import geed_measures
from ..profiles import settings
from ..zoo import ModelSpec

__all__ = ["PARTS", "invariance_measures", "kvinge", "labels"]

PARTS = ("a", "b", "c")
DATASETS = ("mnist", "fashion-mnist")
SHORT = {"mnist": "mnist", "fashion-mnist": "fashion"}


def invariance_measures(model: Any, ts: transforms.TransformationSet) -> list:
    """Normalised and raw invariance G-EED (cosine) and the output KL: one pass, no latent action
    (the measurements of (b) and (c), which compare invariance only)."""
    return [GEEDInvariance(normalize=True), GEEDInvariance(), GEEDOutputKL()]


def labels(seed: int) -> dict[str, str]:
    """The design's model labels for one seed (what the notebook indexes ``trained`` with)."""
    return {
        "untrained": f"SimpleConv untrained s{seed}",
        "plain": f"mnist plain s{seed}",
        "augmented": f"mnist c4 s{seed}",
        "fashion plain": f"fashion plain s{seed}",
        "fashion augmented": f"fashion c4 s{seed}",
        "steerable": f"steerable s{seed}",
        "steerable untrained": f"steerable untrained s{seed}",
        "pretrained plain": f"fashion→mnist plain s{seed}",
        "pretrained augmented": f"fashion→mnist c4 s{seed}",
    }


def kvinge(profile: str = "quick", parts: list[str] | None = None, n_seeds: int | None = None,
           n_samples: int | None = None, n_train: int | None = None, epochs: int | None = None,
           n_test: int | None = None, steerable_fields: list[int] | tuple[int, ...] = (4, 8, 16),
           steerable_lr: float | None = None, augment: str = "c4", seed: int = 0, data_root: str = "data",
           **_: Any) -> Design:
    """The models and measurements of notebook 09 (see the module docstring).

    ``steerable_lr``: Adam's learning rate for the steerable CNN (None: the profile's).
    Without Fashion-MNIST under ``data_root``, parts (b) and (c) are skipped (``design.skipped``)."""
    from ... import data

    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs, n_test=n_test)
    parts = list(parts if parts is not None else PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"parts must be a subset of {PARTS}, got {unknown}")
    if augment not in ("c4", "d4"):
        raise ValueError(f"augment must be 'c4' or 'd4' (an exact group, the one measured), got {augment!r}")
    s.update(parts=parts, augment=augment, steerable_fields=list(steerable_fields))
    d = Design("09_kvinge", s)
    fashion_ok, why = data.available("fashion-mnist", resolve(data_root))
    if not fashion_ok:
        for part in ("b", "c"):
            if part in parts:
                d.skipped[part] = f"Fashion-MNIST is not installed: {why.splitlines()[0] if why else ''}"
        parts = [p for p in parts if p == "a"]
    group = "C4" if augment == "c4" else "D4"
    ts = getattr(transforms, augment)()
    steerable_fields_ = list(steerable_fields)
    # 2 seeds in the quick profile (its CPU budget: 7 models per seed with the fine-tuned ones).
    n_seeds = n_seeds if n_seeds is not None else (2 if profile == "quick" else s["seeds"])

    def simpleconv(dataset: str, augmented: bool, k: int) -> ModelSpec:
        return ModelSpec.from_settings(s, architecture="SimpleConv", dataset=dataset,
                                       augment=augment if augmented else None, init_seed=k, train_seed=k)

    def measure(key_label: str, dataset: str, full: bool) -> None:
        d.measurements[(key_label, dataset)] = Measurement(
            key_label, dataset, ts, s["n_samples"], measures=geed_measures if full else invariance_measures,
            blocks=s["blocks"])

    for k in range(seed, seed + n_seeds):
        name = labels(k)
        plain = simpleconv("mnist", False, k)
        d.models[name["untrained"]] = plain.untrained()
        d.models[name["plain"]] = plain
        d.models[name["augmented"]] = simpleconv("mnist", True, k)
        # (a): the three models on MNIST, every metric (latent equivariance included).
        for role in ("untrained", "plain", "augmented"):
            measure(name[role], "mnist", full=True)
        if "a" in parts:
            extra = {"lr": steerable_lr} if steerable_lr is not None else {}
            steerable = ModelSpec.from_settings(
                s, architecture="SteerableCNN", dataset="mnist", init_seed=k, train_seed=k,
                options={"group": group, "fields": steerable_fields_, "readout": "full"}, **extra)
            d.models[name["steerable"]] = steerable
            d.models[name["steerable untrained"]] = steerable.untrained()
            for role in ("steerable", "steerable untrained"):
                measure(name[role], "mnist", full=True)
        if "b" in parts or "c" in parts:
            d.models[name["fashion plain"]] = simpleconv("fashion-mnist", False, k)
        if "b" in parts:
            source = d.models[name["fashion plain"]]
            for role, augmented in (("pretrained plain", False), ("pretrained augmented", True)):
                d.pretrained[name[role]] = (source, simpleconv("mnist", augmented, k))
                measure(name[role], "mnist", full=False)
        if "c" in parts:
            d.models[name["fashion augmented"]] = simpleconv("fashion-mnist", True, k)
            for role in ("plain", "augmented"):
                measure(name[role], "fashion-mnist", full=False)
            for role in ("fashion plain", "fashion augmented"):
                for dataset in DATASETS:
                    measure(name[role], dataset, full=False)
            measure(name["untrained"], "fashion-mnist", full=False)
    return d
