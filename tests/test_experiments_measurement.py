"""tmlib.experiments.measurement (helpers of notebooks 05, 07, 08) and their designs."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from tmlib import experiments as ex
from tmlib import transforms
from tmlib.experiments import measurement as mt
from tmlib.experiments.designs import measurement as dm

# ------------------------------------------------------------------------------- rotations, subsets


def test_phased_rotations_phase_zero_is_the_even_set():
    assert torch.allclose(mt.phased_rotations(8).matrices, transforms.rotations(8).matrices)
    ts = mt.phased_rotations(4, 10.0)
    assert [p["degrees"] for p in ts.parameters] == [10.0, 100.0, 190.0, 280.0]
    assert torch.allclose(ts.matrices[0], transforms.rotation_matrix(10.0))


def test_random_phases_share_no_angle():
    phases = [mt.random_phase(16, k) for k in range(20)]
    assert all(0 <= p < 360 / 16 for p in phases) and len(set(phases)) == 20
    assert mt.random_phase(16, 3) == mt.random_phase(16, 3)
    a, b = mt.phased_rotations(16, phases[0]), mt.phased_rotations(64, phases[1])
    assert mt.min_angle_gap(a, b) > 1e-3
    assert mt.min_angle_gap(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        mt.phased_rotations(0)


def _labels(per_class=30, classes=10):
    return torch.arange(classes).repeat_interleave(per_class)[torch.randperm(per_class * classes,
                                                                             generator=torch.Generator().manual_seed(1))]


def test_partition_is_disjoint_and_stratified():
    labels = _labels()
    part = mt.Partition((50, 20, 20, 13), seed=3)
    assert part.disjoint(labels)
    idx = part.indices(labels)
    assert [len(i) for i in idx] == [50, 20, 20, 13]
    union = torch.cat(idx)
    assert len(union.unique()) == len(union)  # no image in two subsets
    assert torch.bincount(labels[idx[0]], minlength=10).tolist() == [5] * 10
    assert torch.bincount(labels[idx[3]], minlength=10).tolist() == [2, 2, 2] + [1] * 7
    assert all(torch.equal(a, b) for a, b in zip(idx, part.indices(labels)))  # deterministic
    assert not torch.equal(idx[1], mt.Partition((50, 20, 20, 13), seed=4).indices(labels)[1])


def test_partition_too_large_keeps_only_the_reference_apart():
    labels = _labels()
    part = mt.Partition((100, 150, 150), seed=0)
    assert not part.disjoint(labels)
    ref, a, b = part.indices(labels)
    assert len(ref) == 100 and len(a) == len(b) == 150
    assert not set(ref.tolist()) & (set(a.tolist()) | set(b.tolist()))
    assert len(a.unique()) == 150 and not torch.equal(a, b)
    with pytest.raises(ValueError):
        mt.Partition((301,)).indices(labels)


def test_part_selects_from_a_dataset():
    from tmlib.data import ImageDataset

    labels = _labels()
    ds = ImageDataset(torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), labels, mean=(0.0,), std=(1.0,),
                      classes=[str(c) for c in range(10)], name="toy", split="test")
    part = mt.Partition((40, 10), seed=0).part(1)
    chosen = part.select(ds)
    assert len(chosen) == part.n == 10
    assert torch.equal(chosen.labels, labels[mt.Partition((40, 10), seed=0).indices(labels)[1]])
    with pytest.raises(IndexError):
        mt.Partition((40, 10)).part(2)


def test_measure_with_a_subset_measures_those_images(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval()
    part = mt.Partition((20, 10), seed=0).part(1)
    r = ex.measure(model, "mnist", mt.phased_rotations(4, 1.0), part.n, subset=part, progress=False)
    result = next(iter(r.values()))
    assert result.metadata["n"] == 10 and result.metadata["m"] == 4


# ------------------------------------------------------------------------------- errors and trends


def test_relative_error():
    assert mt.relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert mt.relative_error([1.0, 0.0], [3.0, 0.0]) == pytest.approx((2 / 4 + 0) / 2)  # 0/0 counts as 0
    assert mt.relative_error([1.0, np.nan], [-1.0, 5.0]) == 1.0  # opposite signs; NaN layer skipped
    assert mt.relative_error([0.5, 0.7], [0.6, 0.9]) == mt.relative_error([0.6, 0.9], [0.5, 0.7])
    with pytest.raises(ValueError):
        mt.relative_error([1.0], [1.0, 2.0])


def _synthetic_errors(bn=-0.5, bm=-0.25, repeats=6, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"n": n, "m": m, "repeat": r, "error": 0.1 * n ** bn * m ** bm * math.exp(noise * rng.standard_normal())}
            for r in range(repeats) for n in (8, 16, 32, 64) for m in (8, 16, 32, 64)]
    return pd.DataFrame(rows)


def test_error_trend_recovers_the_slopes():
    trend = mt.error_trend(_synthetic_errors())
    assert trend["n"].low < -0.5 < trend["n"].high and trend["n"].high < 0
    assert trend["m"].low < -0.25 < trend["m"].high and trend["m"].high < 0
    flat = mt.error_trend(_synthetic_errors(bn=0.0, bm=0.0))
    assert flat["n"].low < 0 < flat["n"].high and flat["m"].low < 0 < flat["m"].high
    assert mt.axis_contrast(_synthetic_errors(), "n").low > 0
    edge = mt.edge_trend(_synthetic_errors(noise=0.03, seed=1), "m")  # covers the truth (95 % do)
    assert edge.low < -0.25 < edge.high and edge.high < 0
    assert mt.edge_trend(_synthetic_errors(bn=0.0, bm=0.0), "n").low < 0 < mt.edge_trend(
        _synthetic_errors(bn=0.0, bm=0.0), "n").high
    with pytest.raises(ValueError):
        mt.edge_trend(_synthetic_errors(), "x")
    with pytest.raises(ValueError):
        mt.axis_contrast(_synthetic_errors(), "k")


def test_grid_errors_and_table():
    ref = pd.Series([1.0, 0.5], index=["a", "b"])
    profiles = {(8, 8, 0): pd.Series([1.1, 0.5], index=["a", "b"]), (8, 8, 1): pd.Series([0.9, 0.5], index=["a", "b"]),
                (16, 8, 0): ref, (16, 8, 1): ref}
    errors = mt.grid_errors(profiles, ref)
    assert list(errors.columns) == ["n", "m", "repeat", "error"] and len(errors) == 4
    table = mt.error_table(errors).set_index(["n", "m"])
    assert table.loc[(8, 8), "error"] == pytest.approx((0.1 / 2.1 + 0.1 / 1.9) / 4)
    assert table.loc[(16, 8), "error"] == 0 and table.loc[(8, 8), "repeats"] == 2


# ------------------------------------------------------------------------------- comparisons


def test_seed_effect_and_profile():
    e = mt.seed_effect([1.0, 2.0, 3.0])
    assert e["value"] == 2.0 and e["se"] == pytest.approx(1 / math.sqrt(3)) and e["z"] == pytest.approx(2 * math.sqrt(3))
    assert e["low"] < 2 < e["high"] and e["dof"] == 2 and e["seeds"] == 3
    assert mt.seed_effect([1.0, 1.0])["z"] == math.inf
    a = {0: pd.Series([1.0, 2.0], index=["x", "y"]), 1: pd.Series([1.2, 2.0], index=["x", "y"])}
    b = {0: pd.Series([0.5, 2.5], index=["x", "y"]), 1: pd.Series([0.5, 2.7], index=["x", "y"]), 2: a[0]}
    prof = mt.effect_profile(a, b, sign=-1.0)
    assert prof["layer"].tolist() == ["x", "y"] and (prof["seeds"] == 2).all()
    assert prof["value"].tolist() == pytest.approx([-0.6, 0.6])
    with pytest.raises(ValueError):
        mt.effect_profile(a, {5: a[0]})


def test_seed_values_profile():
    by = {0: pd.Series([1.0, 2.0, np.nan], index=["a", "b", "c"]), 1: pd.Series([3.0, 2.0, 1.0], index=["a", "b", "c"])}
    prof = mt.seed_values_profile(by, label="x")
    assert prof["layer"].tolist() == ["a", "b"] and (prof["label"] == "x").all()  # NaN layers of seed 0 left out
    assert prof["value"].tolist() == [2.0, 2.0] and prof.loc[0, "low"] < 2 < prof.loc[0, "high"]
    assert prof.loc[1, "se"] == 0 and prof["depth"].tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------- designs


def test_sample_size_design_cells_share_nothing_with_the_reference():
    from tmlib import data

    d = ex.design("05_sample_size", "quick", sizes=[4, 8], n_repeats=2, reference=(20, 16), untrained_repeats=1)
    assert d.models["rotation"] == ex.design("01_validation", "quick").models["rotation s0"]  # shared cache
    assert d.models["untrained"].epochs == 0
    cells = {k: mm for k, mm in d.measurements.items() if k[1] == "cell"}
    assert len(cells) == 2 * 2 * 2 + 1 * 2 * 2 and ("rotation", "reference") in d.measurements
    labels = data.load("mnist", "test").labels
    for model in ("rotation", "untrained"):
        ref = d.measurements[(model, "reference")]
        ref_index = set(ref.options["subset"].partition.indices(labels)[0].tolist())
        assert len(ref_index) == ref.n_samples == 20 and len(ref.transformation_set()) == 16
        mine = [mm for k, mm in cells.items() if k[0] == model]
        seen = set()
        for mm in mine:
            part = mm.options["subset"]
            index = set(part.partition.indices(labels)[part.k].tolist())
            assert len(index) == mm.n_samples and not index & ref_index and not index & seen
            seen |= index
            assert mt.min_angle_gap(mm.transformation_set(), ref.transformation_set()) > 1e-6
    plan = d.plan()["measure"]
    assert plan["forwards"].sum() == 2 * 20 * 16 + (2 + 1) * (4 + 8) ** 2


def test_measure_comparison_design_uses_notebook_01_models():
    d = ex.design("07_measure_comparison", "quick", n_seeds=2)
    v = ex.design("01_validation", "quick", n_seeds=2)
    for k in (0, 1):
        for label in (f"untrained s{k}", f"none s{k}", f"rotation s{k}"):
            assert d.models[label] == v.models[label]
    assert {key[2] for key in d.measurements} == {"blocked", "unblocked"} and len(d.measurements) == 12
    assert d.measurements[("none", 1, "blocked")].seed == 1 and d.measurements[("none", 1, "blocked")].blocks == 10
    assert d.measurements[("none", 1, "unblocked")].blocks is None
    assert 0.01 in d.settings["firing_rates"]


def test_same_equivariance_design_regressors():
    d = ex.design("08_same_equivariance", "quick", transformations=["rotation", "scale"], n_seeds=2)
    spec = d.models["rotation regressor s1"]
    assert spec.task == "regress-transformation" and spec.stop is None and spec.augment == "rotation"
    assert spec.required_floor() == dm.REGRESSION_FLOORS["rotation"] and spec.init_seed == 1
    assert d.models["rotation untrained s1"] == spec.untrained()
    assert len(d.measurements) == 2 * 2 * 2 and d.measurements[("scale", 0, "untrained")].blocks == 10
    custom = ex.design("08_same_equivariance", "quick", transformations=["scale"], n_seeds=1, floors={"scale": 0.5},
                       epochs=2)
    assert custom.models["scale regressor s0"].floor == 0.5 and custom.models["scale regressor s0"].epochs == 2
