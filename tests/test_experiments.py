"""Tests of the reproduction's framework: early stopping, schedules and snapshots in training, the
validation hold-out, claims (asserted, recorded, checked against the reference run), provenance
of merged tables, and the jackknife algebra of derived numbers against brute force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_train import FAST, Bars, TinyCNN

from tmlib import data as data_module
from tmlib.experiments import ClaimError, Claims, Estimate, Jack, seed_mean
from tmlib.experiments.records import save_csv
from tmlib.stopping import EarlyStop
from tmlib.train import _lr_factor, train


@pytest.fixture(scope="module")
def bars():
    return Bars(512, seed=0), Bars(256, seed=2, split="validation")


# ------------------------------------------------------------------------------ early stopping


def test_training_stops_at_the_target_validation_accuracy(bars):
    train_set, validation = bars
    model = TinyCNN()
    train(model, train_set, cache_dir=None, **{**FAST, "epochs": 20},
          stop=EarlyStop(validation, target=0.9, check_every=128))
    history = model.training_history
    assert history["stopped"] == "target"
    assert history["validation_accuracy"] >= 0.9
    assert history["images"] < 20 * len(train_set)  # it did not run the cap
    assert history["checks"][-1][1] == history["validation_accuracy"]
    assert [c[0] for c in history["checks"]] == sorted(c[0] for c in history["checks"])


def test_patience_keeps_the_best_checked_weights(bars):
    train_set, validation = bars
    model = TinyCNN()
    train(model, train_set, cache_dir=None, **{**FAST, "epochs": 6, "lr": 5e-2},
          stop=EarlyStop(validation, patience=2, check_every=64))
    history = model.training_history
    best = max(c[1] for c in history["checks"])
    assert history["validation_accuracy"] == best
    # The weights returned are the best check's: the validation accuracy measured again equals it.
    x, y = validation.tensors()
    with torch.no_grad():
        again = float((model(x).argmax(1) == y).float().mean())
    assert again == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("kwargs, name", [({}, "target"), ({"target": 1.5}, "target"),
                                          ({"target": 0.9, "patience": 0}, "patience"),
                                          ({"target": 0.9, "check_every": 0}, "check_every")])
def test_early_stop_bad_arguments_name_the_argument(bars, kwargs, name):
    with pytest.raises(ValueError, match=name):
        EarlyStop(bars[1], **kwargs)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factors = [_lr_factor(s, 10, 100, "cosine") for s in range(101)]
    assert factors[0] < factors[5] < factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[100] == pytest.approx(0.0, abs=1e-12)
    assert [_lr_factor(s, 0, 100, "constant") for s in (0, 50, 100)] == [1.0, 1.0, 1.0]


def test_schedule_and_snapshots_are_checked_and_kept(bars):
    train_set, _ = bars
    with pytest.raises(ValueError, match="schedule"):
        train(TinyCNN(), train_set, cache_dir=None, schedule="linear", **FAST)
    model = TinyCNN()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, train_set, cache_dir=None, snapshots=(0, 512), schedule="cosine", warmup=4, **FAST)
    snaps = model.training_snapshots
    assert sorted(snaps) == [0, 512]
    assert all(torch.equal(snaps[0][k], initial[k]) for k in initial)
    assert not all(torch.equal(snaps[512][k], initial[k]) for k in initial)


def test_holdout_is_disjoint_deterministic_and_sized():
    g = torch.Generator().manual_seed(3)
    full = data_module.ImageDataset(torch.randint(0, 256, (100, 1, 4, 4), generator=g, dtype=torch.uint8),
                                    torch.arange(100) % 4, mean=[0.5], std=[0.25], classes=list("abcd"),
                                    name="tiny", split="train")
    rest, held = data_module.holdout(full, 20, seed=0)
    again_rest, again_held = data_module.holdout(full, 20, seed=0)
    assert len(rest) == 80 and len(held) == 20
    xr, xh = rest.images, held.images
    assert torch.equal(xh, again_held.images) and torch.equal(xr, again_rest.images)
    assert not any(bool((xr == row).all(dim=(1, 2, 3)).any()) for row in xh)  # disjoint
    assert torch.bincount(held.labels).tolist() == [5, 5, 5, 5]  # class-balanced
    with pytest.raises(ValueError, match="n"):
        data_module.holdout(full, 100, seed=0)


# ------------------------------------------------------------------------------------- claims


def test_claims_are_recorded_and_a_false_one_fails_the_notebook(tmp_path):
    claims = Claims("01_validation", "quick", tmp_path)
    claims.add("Q23", "augmentation lowers NV", -0.2, -0.3, -0.1, holds=True)
    claims.add("Q23", "a claim that does not hold", 0.1, 0.05, 0.15, holds=False, verdict="not reproduced")
    with pytest.raises(ClaimError, match="a claim that does not hold"):
        claims.finish()
    table = pd.read_csv(tmp_path / "claims.csv")  # written before raising: the README shows it
    assert list(table["holds"]) == [True, False] and {"git_commit", "profile"} <= set(table.columns)
    with pytest.raises(ValueError, match="verdict"):
        claims.add("Q23", "x", 0.0, holds=True, verdict="fine")


def test_a_directional_claim_is_checked_against_the_reference_run_and_the_reference_sticks(tmp_path):
    first = Claims("06_architecture", "quick", tmp_path)
    first.directional("Q23", "batch norm changes the learned NV", Estimate(-0.2, 0.05, 10), expected="nonzero")
    first.finish()
    # A rerun whose interval now contains 0 fails, and the reference it was checked against stays.
    second = Claims("06_architecture", "quick", tmp_path)
    claim = second.directional("Q23", "batch norm changes the learned NV", Estimate(-0.01, 0.05, 10),
                               expected="nonzero")
    assert not claim.holds and "the reference run found: negative" in claim.claim
    with pytest.raises(ClaimError):
        second.finish()
    third = Claims("06_architecture", "quick", tmp_path)
    assert third.references == {"batch norm changes the learned NV": "negative"}
    assert third.directional("Q23", "batch norm changes the learned NV", Estimate(-0.2, 0.05, 10),
                             expected="nonzero").holds
    # Another profile has no reference yet: it records and holds.
    assert Claims("06_architecture", "paper", tmp_path).references == {}


def test_merged_tables_keep_each_rows_provenance(tmp_path):
    path = tmp_path / "t.csv"
    save_csv(pd.DataFrame({"notebook": ["a"], "x": [1]}), path, "paper")
    old = pd.read_csv(path)
    merged = pd.concat([old, pd.DataFrame({"notebook": ["b"], "x": [2]})], ignore_index=True)
    save_csv(merged, path, "quick", keep=True)
    back = pd.read_csv(path)
    assert list(back["profile"]) == ["paper", "quick"]


# ------------------------------------------------------------------------- jackknife algebra


def _brute_force_jackknife(samples: np.ndarray, k: int, statistic) -> tuple[float, float]:
    blocks = np.array_split(np.arange(len(samples)), k)
    reps = np.array([statistic(np.delete(samples, b, axis=0)) for b in blocks])
    return statistic(samples), float(np.sqrt((k - 1) / k * ((reps - reps.mean()) ** 2).sum()))


def test_jack_of_a_difference_of_layer_means_equals_a_brute_force_jackknife():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 3))  # 40 samples × 3 layers, two "models" measured on the same samples
    b = a * 0.5 + rng.normal(scale=0.1, size=(40, 3))
    k = 8
    blocks = np.array_split(np.arange(40), k)
    layers = ["l0", "l1", "l2"]

    def jack(x):
        return Jack(pd.Series(x.mean(0), index=layers),
                    pd.DataFrame([np.delete(x, bl, axis=0).mean(0) for bl in blocks], columns=layers))

    got = (jack(a) - jack(b)).mean(["l1", "l2"]).estimate()
    value, se = _brute_force_jackknife(a - b, k, lambda x: x[:, 1:].mean())
    assert got.value == pytest.approx(value, rel=1e-12) and got.se == pytest.approx(se, rel=1e-12)
    assert got.dof == k - 1


def test_seed_mean_combines_seed_spread_and_jackknife():
    one = seed_mean([Jack(1.0, np.array([0.9, 1.1, 1.0, 1.0]))])
    assert one.value == 1.0 and one.se == pytest.approx(np.sqrt(3 / 4 * 0.02))
    # Replicates without spread: the SE is the between-seed one, s / sqrt(S).
    flat = seed_mean([Jack(v, np.full(4, v)) for v in (1.0, 2.0, 3.0)])
    assert flat.value == 2.0 and flat.se == pytest.approx(1.0 / np.sqrt(3)) and flat.dof == pytest.approx(2.0)
    with pytest.raises(ValueError, match="scalar"):
        seed_mean([Jack(pd.Series([1.0]), pd.DataFrame([[1.0], [1.0]]))])


def test_tables_for_reading_hide_the_index_round_and_stop_at_a_screen():
    from tmlib.experiments import format_number, table

    assert [format_number(v) for v in (64.0, float("nan"), 6.772360e-15, 0.80623, 12345.6, 3, True, "x")] == \
        ["64", "–", "6.77e-15", "0.806", "12346", "3", "True", "x"]
    frame = pd.DataFrame({"layer_name": [f"l{i}" for i in range(45)], "width": [64.0] * 44 + [float("nan")],
                          "value": np.linspace(0, 1, 45)})
    styler = table(frame, rows=20, csv="figures/x.csv")
    html = styler.to_html()
    assert list(styler.data.columns) == ["layer name", "width", "value"] and len(styler.data) == 20
    assert "first 20 of 45 rows; all of them in figures/x.csv" in html
    assert ">64<" in html and ">64.0<" not in html and "l20" not in html
    pivot = frame.head(3).set_index("layer_name")  # a named index becomes the first column
    assert list(table(pivot).data.columns) == ["layer name", "width", "value"]
    with pytest.raises(TypeError, match="frame must be a pandas DataFrame or Series"):
        table([1, 2])
