"""tmlib.experiments.invariance: the relative G-EED deviation with jackknife replicates (against a
brute-force delete-one-block recomputation), seed profiles, gains; and notebook 09's design."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tmlib import transforms as T
from tmlib.engine import block_bounds
from tmlib.experiments import Jack, seed_mean
from tmlib.experiments import invariance as inv
from tmlib.measures import GEEDInvariance, evaluate, geed_table
from tmlib.results import MeasureResult

N, K = 12, 4


class Tiny(nn.Module):
    """conv → ELU → linear: feature maps, then a signed vector layer (logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ELU()
        self.fc = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))

    def layer_names(self):
        return ["conv", "act", "fc"]


def _measure(x, blocks=None):
    return evaluate(Tiny().eval(), x, T.c4(), [GEEDInvariance(normalize=True), GEEDInvariance()], progress=False,
                    blocks=blocks)


@pytest.fixture(scope="module")
def images():
    return torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_relative_deviation_matches_geed_table_and_a_brute_force_jackknife(images):
    results = _measure(images, blocks=K)
    relative = inv.relative_deviation(results)
    table = geed_table(results[inv.NORMALIZED]).set_index("layer")
    assert (table["method"] == "cosine").all()
    np.testing.assert_allclose(relative.value.to_numpy(), table["relative"].to_numpy(), rtol=1e-10)
    bounds = block_bounds(N, K)
    for k in range(K):
        keep = torch.cat([images[: bounds[k]], images[bounds[k + 1]:]])
        expected = geed_table(_measure(keep)[inv.NORMALIZED]).set_index("layer")["relative"]
        np.testing.assert_allclose(relative.replicates.iloc[k].to_numpy(), expected.to_numpy(), rtol=1e-9)
    frame = inv.relative_frame(results, label="tiny")
    assert list(frame["layer"]) == ["conv", "act", "fc"] and set(frame["label"]) == {"tiny"}
    assert ((frame["low"] <= frame["value"]) & (frame["value"] <= frame["high"])).all()
    np.testing.assert_allclose(frame["se"].to_numpy(), relative.se().to_numpy())


def _fake(ratio, raw, methods, ratio_reps, raw_reps):
    layers = list(methods)
    # What GEEDInvariance(normalize=True) reports per layer (MeasureResult.layer_metadata).
    per_layer = {layer: {"raw": r, "baseline": 0.5, "method": m, "relative": r / 0.5 if m == "cosine" else q}
                 for layer, r, m, q in zip(layers, raw, methods, ratio)}
    normalized = MeasureResult(inv.NORMALIZED, dict(zip(layers, map(np.array, ratio))), layer_metadata=per_layer,
                               replicates=pd.DataFrame(ratio_reps, columns=layers))
    plain = MeasureResult(inv.RAW, dict(zip(layers, map(np.array, raw))),
                          replicates=pd.DataFrame(raw_reps, columns=layers))
    return {inv.NORMALIZED: normalized, inv.RAW: plain}


def test_relative_deviation_formula_and_the_euclidean_fallback():
    # Layer "a": S = 0.8, M = 0.5 → S/M = 1.6, relative = 0.2 / 0.5 = 0.4. Layer "b" fell back: its ratio.
    results = _fake([1.6, 0.3], [0.2, 0.9], ["cosine", "euclidean-fallback"],
                    [[1.6, 0.3], [1.5, 0.35]], [[0.2, 0.9], [0.25, 0.8]])
    relative = inv.relative_deviation(results)
    np.testing.assert_allclose(relative.value.to_numpy(), [0.4, 0.3])
    m = 0.75 / 1.5  # the second replicate of "a": S = 0.75, M = S / 1.5
    np.testing.assert_allclose(relative.replicates.to_numpy(), [[0.4, 0.3], [0.25 / (1 - m), 0.35]])
    with pytest.raises(ValueError, match="GEEDInvariance"):
        inv.relative_deviation({inv.RAW: results[inv.RAW]})


def test_layer_estimates_and_relative_gain():
    index = pd.Index(["x", "y"], name="layer")
    jacks = [Jack(pd.Series([1.0, 2.0], index=index), pd.DataFrame([[1.1, 2.0], [0.9, 2.1], [1.0, 1.9]],
                                                                     columns=index)),
             Jack(pd.Series([1.5, 2.5], index=index), pd.DataFrame([[1.4, 2.5], [1.6, 2.4], [1.5, 2.6]],
                                                                     columns=index))]
    estimates = inv.layer_estimates(jacks, ["x", "y"])
    for layer in ("x", "y"):
        expected = seed_mean([j.mean([layer]) for j in jacks])
        assert estimates[layer].value == pytest.approx(expected.value) and estimates[layer].se == expected.se
    assert estimates["y"].value == pytest.approx(2.25)
    gain = inv.relative_gain(Jack(2.0, np.array([2.0, 4.0])), Jack(0.5, np.array([1.0, 1.0])))
    assert gain.value == pytest.approx(0.75) and gain.replicates.tolist() == pytest.approx([0.5, 0.75])


def test_kvinge_design_trains_every_model_and_measures_paired():
    from tmlib import experiments as ex

    d = ex.design("09_kvinge", "quick", n_seeds=3)
    assert not d.skipped or set(d.skipped) == {"b", "c"}
    seeds = {0, 1, 2}
    for k in seeds:
        assert d.models[f"mnist plain s{k}"].required_floor() == 0.95
        assert d.models[f"mnist c4 s{k}"].required_floor() == 0.90
        assert d.models[f"steerable s{k}"].required_floor() == 0.95
        assert not d.models[f"SimpleConv untrained s{k}"].trained
        assert not d.models[f"steerable untrained s{k}"].trained
        # Same initial weights: the untrained network is the baseline of the trained ones.
        assert d.models[f"SimpleConv untrained s{k}"].init_seed == d.models[f"mnist c4 s{k}"].init_seed == k
    if not d.skipped:
        for k in seeds:
            assert d.models[f"fashion plain s{k}"].required_floor() == 0.88
            assert d.models[f"fashion c4 s{k}"].required_floor() == 0.78
            source, spec = d.pretrained[f"fashion→mnist c4 s{k}"]
            assert source == d.models[f"fashion plain s{k}"] and spec == d.models[f"mnist c4 s{k}"]
        assert {dataset for _, dataset in d.measurements} == {"mnist", "fashion-mnist"}
    # Every measurement is a pass under C4 with jackknife blocks on the same images per dataset.
    assert {len(mm.transformation_set()) for mm in d.measurements.values()} == {4}
    quick = ex.profile_settings("quick")
    assert {(mm.n_samples, mm.blocks, mm.seed) for mm in d.measurements.values()} == {(quick["n_samples"], 10, 0)}
    labels = set(d.models) | set(d.pretrained)
    assert all(mm.model in labels for mm in d.measurements.values())
    with pytest.raises(ValueError, match="parts"):
        ex.design("09_kvinge", "quick", parts=["z"])
