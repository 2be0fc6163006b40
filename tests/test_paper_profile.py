"""The paper profile's code paths, with tiny overrides, so that they cannot rot on a machine without
a GPU: every design builds and plans, every distinct paper-profile architecture trains (the authors'
schedule: no early stop) and is measured, and the runner's --plan prints without running."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tmlib import experiments as ex
from tmlib.paths import project_root
from tmlib.reproduce import NOTEBOOKS

TINY = {"n_train": 64, "epochs": 1, "n_samples": 10, "n_test": 50}


@pytest.mark.parametrize("name", sorted(ex.DESIGNS))
def test_every_paper_design_builds_and_plans(name):
    params = {k: v for k, v in NOTEBOOKS[name]["paper"].items()}
    d = ex.design(name, "paper", **params)
    assert d.settings["profile"] == "paper"
    tables = d.plan()
    assert len(tables["train"]) == len([s for s in d.models.values() if s.trained]) + len(d.pretrained)
    if len(tables["measure"]):
        assert (tables["measure"]["forwards"] > 0).all()
        assert (tables["measure"]["peak accumulator MiB"] > 0).all()


def _paper_specs():
    """One spec per distinct (architecture, options) of the paper profile's designs."""
    seen = {}
    for name in sorted(ex.DESIGNS):
        d = ex.design(name, "paper", **NOTEBOOKS[name]["paper"])
        for spec in d.specs():
            if spec.dataset not in ("mnist", "fashion-mnist"):
                continue  # CIFAR10 is not on the CI machine; its path is the same code with 3 channels
            seen.setdefault((spec.architecture, repr(sorted(spec.options.items())), spec.task), spec)
    return list(seen.values())


@pytest.mark.slow
@pytest.mark.parametrize("spec", _paper_specs(), ids=lambda s: f"{s.architecture}-{s.task}-{len(s.options)}")
def test_paper_architectures_train_and_measure(spec, tmp_path):
    tiny = spec.with_(n_train=TINY["n_train"], epochs=TINY["epochs"], batch_size=32)
    model = ex.trained_model(tiny, models_dir=str(tmp_path), progress=False, device="cpu", n_test=TINY["n_test"])
    history = model.training_history
    assert history["stopped"] == "epochs" and history["images"] == TINY["n_train"]
    assert model.evaluation["n_test"] == TINY["n_test"] and 0 <= model.evaluation["own"] <= (
        1 if spec.task == "classify" else 360)
    results = ex.measure(model, tiny.dataset, tiny.augment or "rotation", TINY["n_samples"], progress=False, blocks=2)
    nv = results["NV[channel,std]"]
    assert nv.replicates.shape == (2, len(nv.layer_names))
    assert nv.layer_means().notna().all()


def test_paper_simpleconv_follows_the_authors_schedule():
    from tmlib.experiments.designs.quiroga import simpleconv

    spec = simpleconv(ex.settings("paper"), augment="rotation", seed=3)
    training = ex.PROFILES["paper"]["training"]
    assert (spec.stop, spec.schedule, spec.epochs, spec.lr) == (None, "constant", training["max_epochs"], training["lr"])
    assert spec.options == ex.PROFILES["paper"]["simpleconv"] and spec.init_seed == spec.train_seed == 3


def test_reproduce_plan_runs_without_training(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tmlib.reproduce", "--profile", "paper", "--plan", "01_validation"],
                         cwd=project_root(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "models to train" in out.stdout and "forwards" in out.stdout and "peak accumulator memory" in out.stdout


def test_default_device_is_cuda_when_available():
    assert ex.default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
