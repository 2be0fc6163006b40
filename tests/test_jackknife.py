"""evaluate(..., blocks=K): delete-one-block jackknife replicates against a brute-force jackknife
(every measure recomputed from scratch on the samples minus block k), and tmlib.stats."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats
from torch import nn

from tmlib import stats
from tmlib import transforms as T
from tmlib.engine import block_bounds
from tmlib.measures import (
    DistanceSameEquivariance,
    GoodfellowMeasure,
    NormalizedVariance,
    SampleVariance,
    evaluate,
)
from tmlib.measures.moments import numba_available
from tmlib.results import MeasureResult, NotAResultFileError

N, K = 11, 4
# Brute-force jackknife of every measure class, and values unchanged by blocks: tests/test_harness.py.


def tiny_model():
    # float64: the brute force forwards other batches (x without block k) than the blocked pass, and
    # float32 convolutions of other batches can round differently (seen: 2e-9 on an AVX-512 EPYC)
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1),
                         nn.ELU(), nn.Flatten(), nn.Linear(36, 5)).double().eval()


def samples(n=N):
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def brute_force_jackknife(model, x, ts, measures, blocks, **kwargs):
    """Row k: every measure evaluated from scratch on x without block k, its layer means."""
    bounds = block_bounds(len(x), blocks)
    rows = {m.name: [] for m in measures}
    for k in range(blocks):
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[bounds[k] : bounds[k + 1]] = False
        for name, result in evaluate(model, x[keep], ts, measures, progress=False, **kwargs).items():
            rows[name].append(result.layer_means())
    return {name: pd.DataFrame(r).reset_index(drop=True) for name, r in rows.items()}


@pytest.mark.parametrize("backend", ["torch", "numba"] if numba_available() else ["torch"])
def test_uneven_blocks_and_both_backends(backend):
    model, x = tiny_model(), samples()  # 11 samples in 4 blocks: 2, 3, 3, 3
    ms = [NormalizedVariance(mode="channel"), SampleVariance(stat="var")]
    blocked = evaluate(model, x, T.rotations(5), ms, blocks=K, batch_size=3, backend=backend, progress=False)
    expected = brute_force_jackknife(model, x, T.rotations(5), ms, K, batch_size=3, backend=backend)
    for name, result in blocked.items():
        assert result.metadata["block_sizes"] == [2, 3, 3, 3]
        np.testing.assert_allclose(result.replicates.to_numpy(), expected[name][result.layer_names].to_numpy(),
                                   rtol=1e-9)


def test_dses_reference_pass_and_blocks():
    # No identity in the set: F(x) comes from the reference pass, read by global sample index.
    model, x, ts = tiny_model(), samples(), T.rotations(4, degrees=90)
    ms = [DistanceSameEquivariance(reference=True)]
    blocked = evaluate(model, x, ts, ms, blocks=3, batch_size=4, progress=False)["DSES[False]"]
    expected = brute_force_jackknife(model, x, ts, ms, 3, batch_size=4)["DSES[False]"]
    np.testing.assert_allclose(blocked.replicates.to_numpy(), expected.to_numpy(), rtol=1e-9)


def test_block_bounds_are_contiguous_near_equal_and_deterministic():
    assert block_bounds(11, 4) == [0, 2, 5, 8, 11]
    assert block_bounds(10, 10) == list(range(11))
    for n, k in [(7, 2), (100, 7), (1000, 30)]:
        bounds = block_bounds(n, k)
        sizes = np.diff(bounds)
        assert bounds[0] == 0 and bounds[-1] == n and sizes.max() - sizes.min() <= 1


def test_bad_blocks_and_goodfellow_are_clear_errors():
    model, x, ts = tiny_model(), samples(), T.c4()
    for bad in (1, 0, N + 1, 2.5, True):
        with pytest.raises(ValueError, match="blocks must be None or an integer"):
            evaluate(model, x, ts, NormalizedVariance(), blocks=bad, progress=False)
    with pytest.raises(ValueError, match=r"blocks: \['Goodfellow.*thresholds are set on all n samples"):
        evaluate(model, x, ts, [NormalizedVariance(), GoodfellowMeasure()], blocks=3, progress=False)


def test_stderr_intervals_frame_and_save_load(tmp_path):
    model, x = tiny_model(), samples()
    result = evaluate(model, x, T.rotations(5), NormalizedVariance(mode="channel"), blocks=K,
                      progress=False)["NV[channel,std]"]
    reps = result.replicates.to_numpy()
    se = np.sqrt((K - 1) / K * ((reps - reps.mean(0)) ** 2).sum(0))
    np.testing.assert_allclose(result.layer_stderr().to_numpy(), se, rtol=1e-14)
    intervals = result.layer_intervals(0.9)
    t = scipy_stats.t.ppf(0.95, K - 1)
    np.testing.assert_allclose(intervals["low"], result.layer_means().to_numpy() - t * se, rtol=1e-14)
    np.testing.assert_allclose(intervals["high"], result.layer_means().to_numpy() + t * se, rtol=1e-14)
    assert list(intervals.columns) == ["layer", "value", "se", "low", "high"]
    frame = result.to_frame()
    assert list(frame.columns[:7]) == ["layer", "index", "depth", "value", "se", "low", "high"]
    np.testing.assert_allclose(frame["se"], se, rtol=1e-14)
    back = MeasureResult.load(result.save(tmp_path / "nv.npz"))
    pd.testing.assert_frame_equal(back.replicates, result.replicates)
    assert back.metadata["block_sizes"] == [2, 3, 3, 3]
    pd.testing.assert_frame_equal(back.to_frame(), frame)
    assert oct((tmp_path / "nv.npz").stat().st_mode & 0o777) == "0o644"
    with pytest.raises(ValueError, match="no jackknife replicates"):
        evaluate(model, x, T.c4(), NormalizedVariance(), progress=False)["NV[element,std]"].layer_stderr()


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04garbage"])
def test_loading_a_corrupt_file_says_it_is_not_a_result(tmp_path, content):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with pytest.raises(NotAResultFileError, match="is not a tmlib MeasureResult file"):
        MeasureResult.load(path)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(NotAResultFileError, match="other.npz is not a tmlib MeasureResult"):
        MeasureResult.load(tmp_path / "other.npz")


# ---------------------------------------------------------------------------------------- stats


def test_jackknife_se_and_t_interval_on_known_numbers():
    reps = np.array([[1.0, 2.0], [2.0, 2.0], [4.0, 2.0]])
    # column 0: mean 7/3, Σ(θ−θ̄)² = 14/3, SE = sqrt(2/3 · 14/3)
    np.testing.assert_allclose(stats.jackknife_se(reps), [math.sqrt(28 / 9), 0.0], rtol=1e-15)
    assert stats.jackknife_se(np.array([1.0, 3.0])) == pytest.approx(1.0)
    frame = pd.DataFrame(reps, columns=["a", "b"])
    assert stats.jackknife_se(frame).index.tolist() == ["a", "b"]
    low, high = stats.t_interval(10.0, 2.0, 4, 0.95)
    assert high - 10.0 == pytest.approx(2.0 * 2.7764451051977987, rel=1e-12) and low == pytest.approx(20 - high)
    with pytest.raises(ValueError, match="confidence"):
        stats.t_interval(1.0, 1.0, 3, 95)
    with pytest.raises(ValueError, match="at least 2 replicates"):
        stats.jackknife_se(np.ones((1, 3)))


def test_paired_difference_is_the_jackknife_of_the_differences():
    model, x = tiny_model(), samples()
    other = tiny_model()
    with torch.no_grad():
        other[0].weight.mul_(2.0)
    a = evaluate(model, x, T.rotations(5), NormalizedVariance(), blocks=K, progress=False)["NV[element,std]"]
    b = evaluate(other, x, T.rotations(5), NormalizedVariance(), blocks=K, progress=False)["NV[element,std]"]
    diff = stats.paired_difference(a, b)
    assert list(diff.columns) == ["layer", "difference", "se", "low", "high"]
    np.testing.assert_allclose(diff["difference"], a.layer_means() - b.layer_means(), rtol=1e-14)
    d = a.replicates.to_numpy() - b.replicates.to_numpy()
    np.testing.assert_allclose(diff["se"], np.sqrt((K - 1) / K * ((d - d.mean(0)) ** 2).sum(0)), rtol=1e-12)
    fewer = evaluate(model, x, T.rotations(5), NormalizedVariance(), blocks=3, progress=False)["NV[element,std]"]
    with pytest.raises(ValueError, match="same samples and blocks: blocks"):
        stats.paired_difference(a, fewer)
    part = evaluate(model, x[:10], T.rotations(5), NormalizedVariance(), blocks=K, progress=False)["NV[element,std]"]
    with pytest.raises(ValueError, match="same samples and blocks: n"):
        stats.paired_difference(a, part)
    layers = evaluate(model, x, T.rotations(5), NormalizedVariance(), blocks=K, layers=["0", "1"],
                      progress=False)["NV[element,std]"]
    with pytest.raises(ValueError, match="same layers"):
        stats.paired_difference(a, layers)
    with pytest.raises(ValueError, match="b: the result has no replicates"):
        stats.paired_difference(a, evaluate(model, x, T.c4(), NormalizedVariance(), progress=False)["NV[element,std]"])


def _result(means, replicates=None, n=10):
    values = {f"l{i}": np.array([v]) for i, v in enumerate(means)}
    reps = None if replicates is None else pd.DataFrame(replicates, columns=list(values))
    return MeasureResult("x", values, {"n": n}, replicates=reps)


def test_seed_summary_combines_between_seed_spread_and_jackknife():
    reps = [np.array([[1.0, 2.0], [1.2, 2.1], [0.9, 1.8]]), np.array([[2.0, 3.0], [2.4, 3.3], [2.1, 2.7]])]
    results = [_result([1.0, 2.0], reps[0]), _result([2.2, 3.1], reps[1])]
    out = stats.seed_summary(results, confidence=0.9)
    assert list(out.columns) == ["layer", "mean", "between_std", "se", "low", "high", "seeds"]
    means = np.array([[1.0, 2.0], [2.2, 3.1]])
    v1 = means.std(0, ddof=1) ** 2 / 2
    seed_mean = (reps[0] + reps[1]) / 2
    v2 = 2 / 3 * ((seed_mean - seed_mean.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(out["mean"], means.mean(0), rtol=1e-15)
    np.testing.assert_allclose(out["se"], np.sqrt(v1 + v2), rtol=1e-14)
    dof = (v1 + v2) ** 2 / (v1**2 / 1 + v2**2 / 2)
    np.testing.assert_allclose(out["high"] - out["mean"], scipy_stats.t.ppf(0.95, dof) * np.sqrt(v1 + v2), rtol=1e-12)
    # Without replicates: between-seed only, S − 1 dof.
    plain = stats.seed_summary([_result([1.0]), _result([2.0]), _result([4.0])])
    assert plain["se"].iloc[0] == pytest.approx(np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    assert plain["high"].iloc[0] - plain["mean"].iloc[0] == pytest.approx(
        scipy_stats.t.ppf(0.975, 2) * plain["se"].iloc[0])
    with pytest.raises(ValueError, match="single seed needs replicates"):
        stats.seed_summary([_result([1.0])])
    with pytest.raises(ValueError, match="same layers"):
        stats.seed_summary([_result([1.0]), _result([1.0, 2.0])])


# ---------------------------------------------------------------- the fused merge and readout kernels
from tmlib.measures import states as state_module  # noqa: E402
from tmlib.measures.moments import STMoments  # noqa: E402


def _moments(x, shape):
    state = state_module.ShiftedMoments(shape)
    state.update(x)
    return state


@pytest.mark.parametrize("fused", [True, False], ids=["numba", "torch"])
def test_merged_moments_equal_one_pass_and_keep_constant_coordinates_exact(fused, monkeypatch):
    if fused and not numba_available():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(state_module, "_HAVE_NUMBA", fused)
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(7, 3, 4, generator=g) * 5 + 40, torch.randn(5, 3, 4, generator=g) * 0.1 - 3,
             torch.randn(4, 3, 4, generator=g)]
    for part in parts:
        part[:, 0, 0] = 2.5  # constant in every part: the merged variance must be exactly 0
    whole = _moments(parts[0], (3, 4)).merge(_moments(parts[1], (3, 4))).merge(_moments(parts[2], (3, 4)))
    reference = _moments(torch.cat(parts), (3, 4))
    assert whole.n == 16
    torch.testing.assert_close(whole.mean(), reference.mean(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(whole.variance(), reference.variance(), rtol=1e-11, atol=0)
    assert whole.variance()[0, 0] == 0.0


def test_the_fused_and_torch_merges_agree_to_rounding(monkeypatch):
    if not numba_available():
        pytest.skip("numba is not installed")
    g = torch.Generator().manual_seed(4)
    parts = [torch.randn(6, 25, 50, generator=g) * 3 + 7 for _ in range(3)]
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(state_module, "_HAVE_NUMBA", fused)
        out[fused] = _moments(parts[0], (25, 50))
        for part in parts[1:]:
            out[fused].merge(_moments(part, (25, 50)))
    torch.testing.assert_close(out[True].s1, out[False].s1, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(out[True].s2, out[False].s2, rtol=1e-14, atol=1e-12)


@pytest.mark.parametrize("stat", ["std", "var"])
def test_the_fused_sample_spread_equals_the_torch_readout(stat):
    if not numba_available():
        pytest.skip("numba is not installed")
    x = torch.randn(9, 5, 300, generator=torch.Generator().manual_seed(5)).to(torch.float64)
    x[:, 2, 7] = 1.25  # a constant column: its SV term is exactly 0
    fused, plain = STMoments(5, 300, backend="numba"), STMoments(5, 300, backend="torch")
    fused.update(x)
    plain.update(x)
    np.testing.assert_allclose(fused.sample(stat), plain.sample(stat), rtol=1e-14, atol=0)
    assert np.sqrt(fused.column_variance())[2, 7] == 0.0


def test_a_unit_that_fires_in_one_block_only_is_exactly_constant_without_it():
    # Why the jackknife merges the other blocks instead of subtracting block k from the full merge:
    # a subtraction leaves a rounding residue where the rest is constant, and NV's 0/0 → 1 and
    # x/0 → inf conventions need the exact zero (a ReLU unit dead outside one block is common).
    mean_pixel = nn.Linear(36, 2)
    with torch.no_grad():
        mean_pixel.weight.fill_(1 / 36)
        mean_pixel.bias.fill_(-3.0)
    model = nn.Sequential(nn.Flatten(), mean_pixel, nn.ReLU()).eval()
    x = samples(12).float()
    x[:3] += 10.0  # only block 0's samples make the units fire (90° rotations keep the mean pixel)
    result = evaluate(model, x, T.rotations(4), {"NV": NormalizedVariance(mode="element")}, blocks=4,
                      progress=False)["NV"]
    layer = result.layer_names[-1]
    assert result[layer].tolist() != [1.0, 1.0]  # with block 0 the units vary
    # without block 0 the unit is 0 for every sample and rotation: TV = SV = 0 exactly, NV = 1
    assert result.replicates.iloc[0][layer] == pytest.approx(1.0, abs=0)
