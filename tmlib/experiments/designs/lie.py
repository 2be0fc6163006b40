"""Designs of the Lie-group notebooks: 10 LieGG [M22] and 11 the Lie derivative [G23].

10 trains LieGG's MLPs as its authors' public notebook does (inputs blurred with σ = 1.5, a Swish
MLP without biases, Adam, batch 512, rotated MNIST), over a depth × width sweep, each trained on
rotated MNIST and, for contrast, on upright MNIST; every architecture also untrained (same initial
weights: the baseline). The reference model of the published numbers (5 hidden layers × 128) gets
the published accuracy as its floor and more seeds. 11 uses notebook 01's SimpleConvs (the same
specs, so the same cached models) and their untrained networks.

The Lie measurements (LieGG's Gram matrices, LEE) are not passes of ``evaluate``, so the designs
carry no :class:`~tmlib.experiments.design.Measurement`; their sizes are in ``settings``
(``liegg_samples``, ``n_samples``) and :func:`lie_cost` estimates their cost for the plan.
"""

from __future__ import annotations

from typing import Any

from ..design import Design
from ..profiles import settings
from ..zoo import ModelSpec
from .quiroga import _seeds, simpleconv

__all__ = ["LIEGG_REFERENCE", "REFERENCE_FLOOR", "SWEEP_FLOOR", "lie_derivative", "liegg", "liegg_mlp", "mlp_label"]

#: LieGG's published rotated-MNIST model (public notebook): 5 Swish layers of 128 units,
#: validation accuracy 0.844, smallest symmetry variance 8.05e-4, symmetry bias 0.021.
LIEGG_REFERENCE = {"depth": 5, "width": 128, "accuracy": 0.844, "symmetry_variance": 8.05e-4,
                   "symmetry_bias": 0.021}

# How the MLPs train. The authors: Adam 1e-3, batch 512, 200 epochs, the best validation epoch kept.
# quick: the same optimiser and batch, a higher rate with warm-up and cosine decay to a cap of 4
# epochs, and the best weights kept once the validation accuracy (checked every 5,000 images) has
# not improved for 4 checks; upright (contrast) models stop at their floor, as every other model.
_MLP_TRAINING = {
    "quick": {"epochs": 4, "batch_size": 512, "lr": 5e-3, "schedule": "cosine", "warmup": 100, "patience": 4,
              "check_every": 5000, "threads": 1},
    "paper": {"epochs": 200, "batch_size": 512, "lr": 1e-3, "schedule": "constant", "warmup": 0, "patience": 200,
              "check_every": 55_000, "threads": None},
}

#: The reference model's floor on rotated test images: the published 0.844, to two digits.
REFERENCE_FLOOR = 0.84

# Accuracy floor of the rotation-trained MLPs other than the reference: each one trains until its
# validation accuracy stops improving; the floor only guards against a model that did not learn.
SWEEP_FLOOR = 0.80

_DEFAULTS = {
    "quick": {"depths": [1, 2, 3, 4, 5], "widths": [64, 128, 256, 512], "liegg_samples": 2000,
              "n_seeds_reference": 3},
    "paper": {"depths": [1, 2, 3, 4, 5], "widths": [64, 128, 256, 512], "liegg_samples": None,
              "n_seeds_reference": 5},
}


def liegg_mlp(s: dict[str, Any], depth: int, width: int, augment: str | None = "rotation", seed: int = 0,
              floor: float | None = None) -> ModelSpec:
    """One of LieGG's MLPs (Swish, no biases, inputs blurred with σ = 1.5) trained the profile's
    way on MNIST: with ``augment="rotation"`` until the validation accuracy stops improving (its
    ``floor`` checked afterwards), without augmentation to the MNIST floor (quick)."""
    t = dict(_MLP_TRAINING[s["profile"]])
    if s.get("mlp_epochs") is not None:
        t["epochs"] = s["mlp_epochs"]
    options = {"depth": depth, "width": width, "blur_sigma": 1.5, "activation": "silu", "bias": False}
    fields = {"epochs": t["epochs"], "batch_size": t["batch_size"], "lr": t["lr"], "schedule": t["schedule"],
              "warmup": t["warmup"], "check_every": t["check_every"], "threads": t["threads"],
              "channels_last": False, "patience": t["patience"]}
    if augment is not None:
        fields.update(stop="plateau", floor=floor)
    elif s["profile"] == "paper":
        fields.update(stop="plateau")  # the authors keep the best validation epoch
    return ModelSpec.from_settings(s, architecture="MLP", dataset="mnist", augment=augment, init_seed=seed,
                                   train_seed=seed, options=options, **fields)


def liegg(profile: str = "quick", depths: list[int] | None = None, widths: list[int] | None = None,
          reference: list[int] | tuple[int, int] | None = None, n_seeds_reference: int | None = None,
          n_samples: int | None = None, n_train: int | None = None, epochs: int | None = None,
          n_test: int | None = None, seed: int = 0, **_: Any) -> Design:
    """[M22]: MLPs of every depth × width, trained on rotated MNIST (and upright, for contrast), and
    untrained; the reference architecture (default 5 × 128) over ``n_seeds_reference`` seeds with
    the published accuracy as its floor. ``n_samples``: training images of the polarization matrix
    (None: the profile's; the paper profile uses the whole training split)."""
    defaults = _DEFAULTS[profile]
    s = settings(profile, n_train=n_train, n_test=n_test)
    s["mlp_epochs"] = epochs
    s["depths"] = list(depths or defaults["depths"])
    s["widths"] = list(widths or defaults["widths"])
    s["reference"] = tuple(reference or (LIEGG_REFERENCE["depth"], LIEGG_REFERENCE["width"]))
    s["liegg_samples"] = n_samples if n_samples is not None else defaults["liegg_samples"]
    s["n_seeds_reference"] = n_seeds_reference or defaults["n_seeds_reference"]
    d = Design("10_liegg", s)
    grid = [(depth, width) for depth in s["depths"] for width in s["widths"]]
    if s["reference"] not in grid:
        grid.append(s["reference"])
    for depth, width in grid:
        is_reference = (depth, width) == s["reference"]
        seeds = _seeds(s, s["n_seeds_reference"], seed) if is_reference else [seed]
        for k in seeds:
            rotated = liegg_mlp(s, depth, width, "rotation", k,
                                floor=REFERENCE_FLOOR if is_reference else SWEEP_FLOOR)
            d.models[mlp_label(depth, width, "untrained", k)] = rotated.untrained()
            d.models[mlp_label(depth, width, "rotation", k)] = rotated
            if k == seed:
                d.models[mlp_label(depth, width, "none", k)] = liegg_mlp(s, depth, width, None, k)
    return d


def mlp_label(depth: int, width: int, training: str, seed: int) -> str:
    """The design's label of an MLP: ``"MLP 5×128 rotation s0"`` (training: rotation / none / untrained)."""
    return f"MLP {depth}×{width} {training} s{seed}"


def lie_derivative(profile: str = "quick", n_seeds: int | None = None, n_samples: int | None = None,
                   n_train: int | None = None, epochs: int | None = None, n_test: int | None = None, seed: int = 0,
                   **_: Any) -> Design:
    """[G23] on notebook 01's SimpleConvs: trained on MNIST without and with rotation augmentation,
    over seeds, and the untrained network of each seed; LEE on ``n_samples`` test images."""
    s = settings(profile, n_samples=n_samples, n_train=n_train, epochs=epochs, n_test=n_test)
    d = Design("11_lie_derivative", s)
    for k in _seeds(s, n_seeds, seed):
        plain = simpleconv(s, seed=k)
        d.models[f"untrained s{k}"] = plain.untrained()
        d.models[f"none s{k}"] = plain
        d.models[f"rotation s{k}"] = simpleconv(s, augment="rotation", seed=k)
    return d
