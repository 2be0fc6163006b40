"""Designs of notebooks 10 (LieGG) and 11 (LEE), and tmlib.experiments.symmetry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tmlib import data, lie
from tmlib.experiments import Estimate, Jack, designs, seed_mean
from tmlib.experiments.designs.lie import LIEGG_REFERENCE, REFERENCE_FLOOR, SWEEP_FLOOR, mlp_label
from tmlib.experiments.symmetry import liegg_jack, seed_profile, sweep_trend, training_images
from tmlib.results import MeasureResult

# ------------------------------------------------------------------------------------ designs


def test_liegg_design_sweep_reference_and_baselines():
    d = designs.design("10_liegg", "quick")
    s = d.settings
    assert s["depths"] == [1, 2, 3, 4, 5] and s["widths"] == [64, 128, 256, 512]
    assert s["reference"] == (LIEGG_REFERENCE["depth"], LIEGG_REFERENCE["width"]) == (5, 128)
    assert len(d.models) == 20 * 3 + 2 * (s["n_seeds_reference"] - 1)
    ref = d.models[mlp_label(5, 128, "rotation", 0)]
    assert ref.architecture == "MLP" and ref.augment == "rotation" and ref.stop == "plateau"
    assert ref.options == {"depth": 5, "width": 128, "blur_sigma": 1.5, "activation": "silu", "bias": False}
    assert ref.required_floor() == REFERENCE_FLOOR == 0.84 and ref.batch_size == 512
    other = d.models[mlp_label(1, 64, "rotation", 0)]
    assert other.stop == "plateau" and other.required_floor() == SWEEP_FLOOR
    upright = d.models[mlp_label(3, 256, "none", 0)]
    assert upright.augment is None and upright.stop == "floor" and upright.required_floor() == 0.95
    untrained = d.models[mlp_label(3, 256, "untrained", 0)]
    assert not untrained.trained and untrained.init_seed == upright.init_seed == 0
    assert untrained.options == upright.options
    for k in range(1, s["n_seeds_reference"]):  # more seeds of the reference only
        assert d.models[mlp_label(5, 128, "rotation", k)].init_seed == k
        assert not d.models[mlp_label(5, 128, "untrained", k)].trained
        assert mlp_label(5, 128, "none", k) not in d.models and mlp_label(5, 64, "rotation", k) not in d.models
    assert not d.measurements  # LieGG is not an evaluate pass
    plan = d.plan()["train"]
    assert len(plan) == 20 * 2 + s["n_seeds_reference"] - 1 and set(plan["architecture"]) == {"MLP"}


def test_liegg_design_parameters_and_paper_profile():
    d = designs.design("10_liegg", "quick", depths=[1, 2], widths=[8], reference=[3, 8], n_seeds_reference=2,
                       epochs=1, n_train=300, n_samples=20)
    assert sorted(d.models) == sorted(
        [mlp_label(dd, 8, t, 0) for dd in (1, 2, 3) for t in ("rotation", "none", "untrained")]
        + [mlp_label(3, 8, "rotation", 1), mlp_label(3, 8, "untrained", 1)])
    spec = d.models[mlp_label(1, 8, "rotation", 0)]
    assert spec.epochs == 1 and spec.n_train == 300 and d.settings["liegg_samples"] == 20
    paper = designs.design("10_liegg", "paper").models[mlp_label(5, 128, "rotation", 0)]
    assert paper.epochs == 200 and paper.lr == 1e-3 and paper.batch_size == 512 and paper.patience == 200
    assert designs.design("10_liegg", "paper").settings["liegg_samples"] is None  # the whole training split


def test_lie_derivative_design_uses_notebook_01s_models():
    d = designs.design("11_lie_derivative", "quick")
    validation = designs.design("01_validation", "quick")
    assert sorted(d.models) == sorted(f"{t} s{k}" for t in ("untrained", "none", "rotation") for k in range(3))
    for label, spec in d.models.items():
        assert spec == validation.models[label]  # the same spec: the same cached model
    assert not d.models["untrained s1"].trained and d.models["untrained s1"].init_seed == 1
    assert designs.design("11_lie_derivative", "quick", n_seeds=1, n_samples=20).settings["n_samples"] == 20


# ------------------------------------------------------------------------------------ symmetry helpers


def test_sweep_trend_recovers_known_slopes_and_their_se():
    grid = pd.DataFrame([(d, w) for d in range(1, 6) for w in (6, 7, 8, 9)], columns=["depth", "log2 width"])
    exact = grid.assign(y=0.5 - 0.2 * grid["depth"] + 0.1 * grid["log2 width"])
    fit = sweep_trend(exact, "y")
    assert fit["depth"].value == pytest.approx(-0.2) and fit["log2 width"].value == pytest.approx(0.1)
    assert fit["depth"].se == pytest.approx(0, abs=1e-12) and fit["depth"].dof == 17
    rng = np.random.default_rng(0)
    noisy = exact.assign(y=exact["y"] + rng.normal(0, 0.05, len(exact)))
    fit = sweep_trend(noisy, "y")
    design = np.column_stack([np.ones(20), noisy["depth"], noisy["log2 width"]])
    coef, residual, *_ = np.linalg.lstsq(design, noisy["y"].to_numpy(), rcond=None)
    cov = residual[0] / 17 * np.linalg.inv(design.T @ design)
    assert fit["depth"].value == pytest.approx(coef[1]) and fit["depth"].se == pytest.approx(np.sqrt(cov[1, 1]))
    assert fit["log2 width"].se == pytest.approx(np.sqrt(cov[2, 2]))
    assert fit["depth"].low < fit["depth"].value < fit["depth"].high and fit["depth"].high < 0
    with pytest.raises(ValueError, match="collinear"):
        sweep_trend(noisy.assign(twice=2 * noisy["depth"]), "y", ["depth", "twice"])
    with pytest.raises(ValueError, match="column"):
        sweep_trend(noisy, "missing")
    single = sweep_trend(exact.iloc[[0, 5, 10]].assign(**{"log2 width": [6, 7, 9]}), "y")
    assert np.isnan(single["depth"].se)  # no residual degree of freedom


def test_liegg_jack_is_the_summary_and_its_replicates():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(12, 1, 8, 8)
    result = lie.liegg(net, x, output="normalised", blocks=4, progress=False)
    jack = liegg_jack(result, "relative_variance")
    assert jack.value == pytest.approx(result.relative_variance) and jack.k == 4
    assert np.allclose(jack.replicates, result.replicates()["relative_variance"])
    assert jack.se() == pytest.approx(result.summary()["relative_variance_se"])
    logged = liegg_jack(result, "symmetry_variance", log10=True)
    assert logged.value == pytest.approx(np.log10(float(result.symmetry_variance[0])))
    other = lie.liegg(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), x, output="normalised",
                      blocks=4, progress=False)
    difference = (liegg_jack(result) - liegg_jack(other)).estimate()
    assert isinstance(difference, Estimate) and difference.dof == 3
    with pytest.raises(ValueError, match="blocks"):
        liegg_jack(lie.liegg(net, x, progress=False))


def test_seed_profile_combines_seeds_per_layer():
    def result(values, replicates):
        return MeasureResult("m", {"a": np.array([values[0]]), "b": np.array([values[1]])},
                             replicates=pd.DataFrame(replicates, columns=["a", "b"]))

    one = result([1.0, 2.0], [[1.1, 2.0], [0.9, 2.1], [1.0, 1.9]])
    two = result([3.0, 2.5], [[3.0, 2.4], [3.1, 2.5], [2.9, 2.6]])
    frame = seed_profile([one, two], label="x")
    assert list(frame.columns) == ["layer", "index", "depth", "value", "se", "low", "high", "label"]
    assert list(frame["layer"]) == ["a", "b"] and list(frame["depth"]) == [0.0, 1.0]
    expected = seed_mean([Jack.of(one).mean(["b"]), Jack.of(two).mean(["b"])])
    assert frame.loc[1, "value"] == pytest.approx(2.25) and frame.loc[1, "se"] == pytest.approx(expected.se)
    alone = seed_profile([one])
    assert np.allclose(alone["se"], Jack.of(one).se().to_numpy())


def test_training_images_are_the_models_training_images():
    ok, _ = data.available("mnist", "data")
    if not ok:
        pytest.skip("MNIST not present in data/")
    x, y, fill = training_images("mnist", 200, "rotation", "data")
    again, _, _ = training_images("mnist", 200, "rotation", "data")
    upright, y2, _ = training_images("mnist", 200, None, "data")
    assert x.shape == (200, 1, 28, 28) and torch.equal(x, again) and torch.equal(y, y2)
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    assert (x - upright).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.9  # rotated, each once
    full = data.load("mnist", "train", root="data")
    _, held = data.holdout(full, 5000, seed=0)
    held_x, _ = held.tensors()
    # None of the images is one of the 5,000 held out for early stopping.
    flat, held_flat = upright.flatten(1), held_x.flatten(1)
    assert not any(bool((held_flat == row).all(1).any()) for row in flat[:50])
    assert len(fill) == 1


def test_directional_claim_asserts_what_the_data_show(tmp_path):
    from tmlib.experiments import Claims
    from tmlib.experiments.symmetry import directional_claim

    claims = Claims("x", "quick", tmp_path, enforce=True)
    supported = directional_claim(claims, "M22", "deeper → lower", Estimate(-1.0, 0.1, 10))
    against = directional_claim(claims, "M22", "deeper → lower", Estimate(1.0, 0.1, 10))
    unclear = directional_claim(claims, "M22", "deeper → lower", Estimate(0.05, 0.1, 10))
    positive = directional_claim(claims, "G23", "more → higher", Estimate(1.0, 0.1, 10), expected="positive",
                                 verdict="partly")
    assert (supported.claim, supported.verdict) == ("deeper → lower", "reproduced")
    assert "contradicted" in against.claim and against.verdict == "not reproduced"
    assert "not detected" in unclear.claim and unclear.verdict == "not reproduced"
    assert positive.verdict == "partly" and positive.claim == "more → higher"
    assert all(c.holds for c in claims.claims) and len(claims.finish()) == 4
    with pytest.raises(ValueError, match="expected"):
        directional_claim(claims, "M22", "x", Estimate(0, 1, 1), expected="down")


def test_a_directional_claim_fixed_by_the_reference_run_fails_when_the_outcome_changes(tmp_path):
    from tmlib.experiments import ClaimError, Claims, outcome

    claims = Claims("x", "quick", tmp_path, enforce=True)
    same = claims.directional("M22", "deeper → lower", Estimate(-1.0, 0.1, 10), observed="negative")
    changed = claims.directional("M22", "wider → lower", Estimate(0.05, 0.1, 10), observed="negative")
    assert same.holds and not changed.holds and "reference run found: negative" in changed.claim
    assert outcome(-2, -1) == "negative" and outcome(1, 2) == "positive" and outcome(-1, 1) == "none"
    assert outcome(float("nan"), 1) == "none"
    with pytest.raises(ClaimError, match="wider"):
        claims.finish()
    with pytest.raises(ValueError, match="observed"):
        claims.directional("M22", "x", Estimate(0, 1, 1), observed="down")
