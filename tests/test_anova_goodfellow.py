"""ANOVA, Goodfellow's score and class-stratified evaluation against brute force on the full ST tensor."""

import contextlib
import math
import warnings

import harness
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from tmlib import activations
from tmlib import transforms as T
from tmlib.measures import (
    AnovaMeasure,
    GoodfellowMeasure,
    NormalizedVariance,
    evaluate,
    evaluate_stratified,
    goodfellow_states,
)
from tmlib.measures.base import feed
from tmlib.measures.goodfellow import GoodfellowReference
from tmlib.measures.goodfellow_states import GoodfellowCounts
from tmlib.measures.moments import STMoments, numba_available
from tmlib.stratified import mean_over_classes

BACKENDS = ["torch"] + (["numba"] if numba_available() else [])


@contextlib.contextmanager
def count_images(model):
    """Counts the images ``model`` forwards inside the block: ``with count_images(m) as seen``."""
    seen = [0]
    hook = model.register_forward_pre_hook(
        lambda module, args: seen.__setitem__(0, seen[0] + len(args[0]))
    )
    try:
        yield seen
    finally:
        hook.remove()


def st_tensors(model, x, ts):
    """{layer: float64 [n, m, F]}: the stored ST tensor (tests/harness.py), flattened per sample."""
    return {k: v.reshape(*v.shape[:2], -1) for k, v in harness.st_tensor(model, x, ts).items()}


def reference_activations(model, x):
    """{layer: float64 [n, F]}: outputs for the untransformed samples."""
    return {k: v.reshape(len(x), -1) for k, v in harness.untransformed(model, x).items()}


# ---------------------------------------------------------------------------------------- ANOVA


def brute_anova(st):
    """F and p per activation with scipy's f_oneway, groups = transformations; constant → F = 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # f_oneway warns (and returns NaN) for constant units
        f, p = stats.f_oneway(*[st[:, j, :] for j in range(st.shape[1])], axis=0)
    constant = np.all(st == st[:1, :1], axis=(0, 1))
    return np.where(constant, 0.0, f), np.where(constant, 1.0, p)


def test_anova_matches_f_oneway_and_counts_rejections(small_cnn):
    torch.manual_seed(1)
    x, ts = torch.randn(10, 1, 8, 8), T.rotations(5)
    ms = [
        AnovaMeasure(),
        AnovaMeasure(output="p"),
        AnovaMeasure(output="reject"),
        AnovaMeasure(output="reject", bonferroni=False, alpha=0.05),
    ]
    r = evaluate(small_cnn, x, ts, ms, batch_size=4, progress=False)
    assert list(r) == [
        "ANOVA[F,0.01,True]",
        "ANOVA[p,0.01,True]",
        "ANOVA[reject,0.01,True]",
        "ANOVA[reject,0.05,False]",
    ]
    some_rejected = some_kept = False
    for layer, st in st_tensors(small_cnn, x, ts).items():
        shape = r["ANOVA[F,0.01,True]"][layer].shape
        f, p = brute_anova(st)
        np.testing.assert_allclose(r["ANOVA[F,0.01,True]"][layer].ravel(), f, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(r["ANOVA[p,0.01,True]"][layer].ravel(), p, rtol=1e-5, atol=1e-12)
        for name, alpha in [
            ("ANOVA[reject,0.01,True]", 0.01 / f.size),
            ("ANOVA[reject,0.05,False]", 0.05),
        ]:
            expected = (p < alpha).astype(float)
            np.testing.assert_array_equal(
                r[name][layer].ravel(), expected, err_msg=f"{name} {layer}"
            )
            assert r[name].layer_means()[layer] == pytest.approx(expected.mean())
            assert r[name].metadata["rejection_fraction"][layer] == pytest.approx(expected.mean())
            some_rejected |= expected.any()
            some_kept |= not expected.all()
        assert r["ANOVA[F,0.01,True]"].metadata["alpha_per_test"][layer] == pytest.approx(
            0.01 / math.prod(shape)
        )
    assert some_rejected and some_kept  # the check above is not vacuous
    meta = r["ANOVA[F,0.01,True]"].metadata
    assert (meta["df_between"], meta["df_within"]) == (4, 45)


def test_anova_adds_no_forwards_and_shares_the_moments(small_cnn):
    with count_images(small_cnn) as seen:
        r = evaluate(
            small_cnn,
            torch.randn(10, 1, 8, 8),
            T.rotations(6),
            [NormalizedVariance(), AnovaMeasure()],
            batch_size=3,
            progress=False,
        )
    assert seen[0] == 10 * 6
    assert r["ANOVA[F,0.01,True]"].metadata["images_forwarded"] == 60


def test_anova_degenerate_cases():
    class Units(nn.Module):
        """Unit 0: constant; unit 1: depends only on the transformation (sign of a corner pixel
        that rot90 moves); unit 2: a plain linear map."""

        def forward(self, x):
            return torch.stack(
                [torch.zeros(len(x)) + 0.3, x[:, 0, 0, 0].sign(), x[:, 0].sum((1, 2))], 1
            )

    x = torch.randn(6, 1, 4, 4).abs() + 0.1
    x[:, 0, 0, 0] = -1.0  # the only negative pixel: its position tells which rotation was applied
    r = evaluate(
        Units(), x, T.c4(), [AnovaMeasure(), AnovaMeasure(output="reject")], progress=False
    )
    f, reject = r["ANOVA[F,0.01,True]"]["Units"], r["ANOVA[reject,0.01,True]"]["Units"]
    assert f[0] == 0.0 and reject[0] == 0.0  # MSB = MSW = 0
    assert np.isinf(f[1]) and reject[1] == 1.0  # MSW = 0 < MSB
    assert r["ANOVA[F,0.01,True]"].layer_means()["Units"] == pytest.approx(np.mean([f[0], f[2]]))


# ---------------------------------------------------------------------------------------- Goodfellow


def brute_goodfellow(a, st, rate, threshold, local):
    """a [n, F] untransformed, st [n, m, F] → threshold, G, L, score per unit."""
    n, m = st.shape[:2]
    if threshold == "percentile":
        q = min(max(math.ceil(rate * n - 1e-9), 1), n - 1)
        t = np.sort(a, axis=0)[n - q - 1]  # the (q+1)-th largest
    else:
        t = a.mean(0) + stats.norm.isf(rate) * a.std(0, ddof=1)
    fires = a > t
    g = fires.mean(0)
    above = st > t
    with np.errstate(invalid="ignore", divide="ignore"):
        if local == "all":
            local_rate = above.mean((0, 1))
        else:
            local_rate = (above & fires[:, None]).sum((0, 1)) / (m * fires.sum(0))
        score = np.where(g > 0, local_rate / g, np.nan)
    return {"threshold": t, "global": g, "local": local_rate, "score": score}


def goodfellow_all(rate, threshold, local):
    return [
        GoodfellowMeasure(rate, threshold, local, out)
        for out in ("threshold", "global", "local", "score")
    ]


@pytest.mark.parametrize("with_identity", [True, False])
def test_goodfellow_matches_brute_force(small_cnn, with_identity):
    torch.manual_seed(3)
    n, x = 10, torch.randn(10, 1, 8, 8)
    ts = T.rotations(5, degrees=90)  # −45 … 45°, includes 0°
    if not with_identity:
        ts = T.TransformationSet(ts.matrices[[0, 1, 3, 4]])
    m = len(ts)
    configs = [
        (r, th, lo)
        for th in ("percentile", "normal")
        for lo in ("all", "firing")
        for r in (0.01, 0.2)
    ]
    ms = [g for c in configs for g in goodfellow_all(*c)]
    with count_images(small_cnn) as seen:
        res = evaluate(small_cnn, x, ts, ms, progress=False)
    assert seen[0] == n * m + n
    a, st = reference_activations(small_cnn, x), st_tensors(small_cnn, x, ts)
    shapes = {k: tuple(v.shape[1:]) for k, v in activations.record(small_cnn, x[:1]).items()}
    firing_units = 0
    for rate, threshold, local in configs:
        for layer in a:
            expected = brute_goodfellow(a[layer], st[layer], rate, threshold, local)
            for out, value in expected.items():
                got = res[f"Goodfellow[{threshold},{rate},{local},{out}]"][layer]
                assert got.shape == shapes[layer]
                if out == "threshold" and threshold == "normal":
                    np.testing.assert_allclose(got.ravel(), value, rtol=1e-12, atol=1e-12)
                else:  # percentile thresholds and all counts are exact
                    np.testing.assert_array_equal(
                        got.ravel(), value, err_msg=f"{rate} {threshold} {local} {out} {layer}"
                    )
            if threshold == "percentile":
                # G is the smallest achievable rate ≥ firing_rate, except for tied (dead) units.
                q = min(max(math.ceil(rate * n), 1), n - 1)
                assert np.mean(expected["global"] == q / n) > 0.5
            firing_units += int(np.sum(expected["global"] > 0))
    assert firing_units > 0
    meta = res["Goodfellow[normal,0.2,firing,score]"].metadata
    assert (meta["threshold"], meta["local"], meta["firing_rate"]) == ("normal", "firing", 0.2)
    assert meta["images_forwarded"] == n * m + n


@pytest.mark.parametrize("backend", BACKENDS)
def test_goodfellow_streaming_top_k_is_exact_and_batch_size_free(backend):
    # Large n and small blocks, so the running top-K drops values; compared with brute force.
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
    ).eval()
    x, ts = torch.randn(300, 1, 6, 6), T.rotations(4)
    configs = [
        (0.05, "percentile", "all"),
        (0.05, "percentile", "firing"),
        (0.01, "normal", "firing"),
    ]
    ms = [g for c in configs for g in goodfellow_all(*c)]
    # Batches of ≥ 5 images: the CPU convolution picks another kernel for fewer images per
    # forward, moving activations by an ulp, and counts are exact functions of the activations.
    runs = [
        evaluate(model, x, ts, ms, batch_size=bs, progress=False, backend=backend)
        for bs in (7, 50, 300)
    ]
    a, st = reference_activations(model, x), st_tensors(model, x, ts)
    for rate, threshold, local in configs:
        for layer in a:
            expected = brute_goodfellow(a[layer], st[layer], rate, threshold, local)
            for out, value in expected.items():
                for run in runs:
                    got = run[f"Goodfellow[{threshold},{rate},{local},{out}]"][layer].ravel()
                    np.testing.assert_allclose(got, value, rtol=1e-12, atol=0, equal_nan=True)
    assert np.isclose(
        runs[0]["Goodfellow[percentile,0.05,all,global]"].metadata["global_firing_rate"]["3"], 0.05
    )


@pytest.mark.skipif(not numba_available(), reason="the shared read is the numba moments kernel's")
def test_goodfellow_counts_share_the_moments_read_exactly(monkeypatch):
    # With a moments measure in the pass, the moments kernel counts the values above Goodfellow's
    # thresholds in its own read of the block (GoodfellowCounts.update_with): the counts and the
    # moments equal those of separate passes exactly, ties at the threshold included.
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    x, ts = torch.randn(60, 1, 8, 8), T.rotations(5)
    gf = goodfellow_all(0.05, "percentile", "firing") + goodfellow_all(0.1, "normal", "all")
    nv = [NormalizedVariance(), AnovaMeasure()]
    own_kernel = goodfellow_states._count_above
    calls = [0]

    def counted(*args):
        calls[0] += 1
        return own_kernel(*args)

    monkeypatch.setattr(goodfellow_states, "_count_above", counted)
    alone = evaluate(model, x, ts, gf, progress=False, batch_size=7)
    separate_calls, calls[0] = calls[0], 0
    together = evaluate(model, x, ts, gf + nv, progress=False, batch_size=7)
    # Two Goodfellow specs: one shares the moments' read, the other keeps its own kernel.
    assert separate_calls > 0 and calls[0] == separate_calls // 2
    moments_alone = evaluate(model, x, ts, nv, progress=False, batch_size=7)
    for name, result in together.items():
        reference = alone[name] if name.startswith("Goodfellow") else moments_alone[name]
        for layer in result.layer_names:
            np.testing.assert_array_equal(result[layer], reference[layer], err_msg=f"{name} {layer}")

    # State level: a NaN in the block is caught by the counts sharing the read.
    reference = GoodfellowReference(4, "percentile", 0.25, n=8)
    reference.update(torch.arange(32.0).reshape(8, 4))
    moments, counts = STMoments(3, 4), GoodfellowCounts(reference, 3)
    block = torch.randn(8, 3, 4)
    block[2, 1, 3] = float("nan")
    feed([moments, counts], block)
    assert counts.seen == 8 and not counts.is_finite() and not moments.is_finite()
    twin = GoodfellowCounts(reference, 3)
    twin.update(block)
    assert torch.equal(twin.count_all, counts.count_all) and torch.equal(twin.count_firing, counts.count_firing)


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_running_top_k_kernel_keeps_what_topk_keeps(monkeypatch, dtype):
    # The reference pass's running top-K: one scan of each row through a small heap instead of
    # torch.topk. Brute force: a full sort of each row. Distinct values (a permutation) make the
    # kept positions unique too; -inf and ties are values like any other; a NaN sends the block to
    # topk, whose NaN order the heap's comparisons would not follow.
    gen = torch.Generator().manual_seed(11)
    values = torch.randperm(37 * 50, generator=gen).reshape(37, 50).to(dtype) - 900
    values[3, :20] = -math.inf
    values[5] = 2.0  # all tied: any k of them kept, the dropped one the same value
    for keep in (1, 2, 6, goodfellow_states._TOP_KERNEL_MAX):
        kept, pos, dropped = goodfellow_states._top(values, keep)
        order = values.sort(1, descending=True).values
        assert kept.dtype == dtype and torch.equal(kept.sort(1, descending=True).values, order[:, :keep])
        assert dropped.dtype == torch.float64 and torch.equal(dropped, order[:, keep].double())
        assert torch.equal(values.gather(1, pos), kept)
        distinct = [f for f in range(37) if f != 5]
        want = torch.topk(values[distinct], keep, dim=1).indices.sort(1).values
        assert torch.equal(pos[distinct].sort(1).values, want)
        for g, w in zip(goodfellow_states._top(values.T.contiguous().T, keep), (kept, pos, dropped)):
            assert torch.equal(g, w)  # read in place from the transposed pending blocks: the same
    called = []
    real = goodfellow_states._top_kernel
    monkeypatch.setattr(goodfellow_states, "_top_kernel", lambda *a: called.append(1) or real(*a))
    goodfellow_states._top(values, goodfellow_states._TOP_KERNEL_MAX + 1)  # past the limit: topk
    assert not called
    values[7, 30] = math.nan
    got = goodfellow_states._top(values, 4)
    monkeypatch.setattr(goodfellow_states, "_TOP_KERNEL_MAX", 0)  # topk for every k
    assert len(called) == 1
    for g, w in zip(got, goodfellow_states._top(values, 4)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_goodfellow_refuses_an_adversarial_sample_order():
    # The first 100 samples fire strongly; a top-K sized from the first block cannot keep them all.
    torch.manual_seed(8)
    ref = GoodfellowReference(2, "percentile", 0.05)
    ref.update(10 + torch.rand(100, 2))
    for _ in range(9):
        ref.update(torch.rand(100, 2))
    with pytest.raises(ValueError, match="Shuffle"):
        ref.finalize()
    # Through the engine, which tells the states n: exact whatever the order.
    x = torch.cat([10 + torch.rand(100, 1, 2, 2), torch.rand(900, 1, 2, 2)])
    ordered = evaluate(GlobalAverage(), x, T.c4(), GoodfellowMeasure(0.05), progress=False)
    shuffled = evaluate(
        GlobalAverage(), x[torch.randperm(1000)], T.c4(), GoodfellowMeasure(0.05), progress=False
    )
    for name in ordered:
        np.testing.assert_array_equal(ordered[name]["GlobalAverage"], shuffled[name]["GlobalAverage"])
    # Knowing n in advance makes it exact whatever the order.
    ref = GoodfellowReference(2, "percentile", 0.05, n=1000)
    data = torch.cat([10 + torch.rand(100, 2), torch.rand(900, 2)])
    for i in range(0, 1000, 100):
        ref.update(data[i : i + 100])
    ref.finalize()
    assert torch.equal(ref.threshold, data.double().sort(0, descending=True).values[50])
    assert ref.fires.tolist() == [50, 50]


class SortedMean(nn.Module):
    """Mean of the sorted pixels of each channel: invariant to any pixel permutation, bitwise."""

    def forward(self, x):
        return x.flatten(2).sort(dim=2).values.mean(2)


class GlobalAverage(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_invariant_by_construction():
    torch.manual_seed(5)
    x, ts = torch.randn(40, 3, 8, 8), T.c4()
    ms = [
        AnovaMeasure(),
        AnovaMeasure(output="reject"),
        *goodfellow_all(0.05, "percentile", "all"),
        *goodfellow_all(0.05, "percentile", "firing"),
    ]
    exact = evaluate(SortedMean(), x, ts, ms, progress=False)
    assert np.all(exact["ANOVA[F,0.01,True]"]["SortedMean"] == 0.0)
    assert np.all(exact["ANOVA[reject,0.01,True]"]["SortedMean"] == 0.0)
    g = exact["Goodfellow[percentile,0.05,all,global]"]["SortedMean"]
    np.testing.assert_array_equal(g, 0.05)  # q = 2 of 40
    np.testing.assert_array_equal(exact["Goodfellow[percentile,0.05,all,score]"]["SortedMean"], 1.0)
    np.testing.assert_array_equal(
        exact["Goodfellow[percentile,0.05,firing,local]"]["SortedMean"], 1.0
    )
    np.testing.assert_array_equal(
        exact["Goodfellow[percentile,0.05,firing,score]"]["SortedMean"], 1 / g
    )
    # The plain mean is invariant only up to summation order (ulps): F tiny, nothing rejected.
    rounded = evaluate(GlobalAverage(), x, ts, ms[:2], progress=False)
    assert np.all(rounded["ANOVA[F,0.01,True]"]["GlobalAverage"] < 1e-6)
    assert np.all(rounded["ANOVA[reject,0.01,True]"]["GlobalAverage"] == 0.0)


def test_dead_units_give_nan_scores():
    class Dead(nn.Module):
        def forward(self, x):
            return torch.stack([torch.zeros(len(x)), x.mean((1, 2, 3))], 1)

    r = evaluate(
        Dead(),
        torch.randn(20, 1, 4, 4),
        T.c4(),
        [GoodfellowMeasure(0.1, th) for th in ("percentile", "normal")],
        progress=False,
    )
    for result in r.values():
        assert np.isnan(result["Dead"][0]) and np.isfinite(result["Dead"][1])
        assert result.metadata["silent_units"]["Dead"] == 1


# ---------------------------------------------------------------------------------------- stratified


def test_stratified_equals_a_manual_loop_over_classes(small_cnn):
    torch.manual_seed(6)
    x, ts = torch.randn(15, 1, 8, 8), T.rotations(4)
    labels = torch.tensor([2, 0, 1] * 5)
    ms = [NormalizedVariance(), AnovaMeasure(output="reject"), GoodfellowMeasure(0.2)]
    with count_images(small_cnn) as seen:
        res = evaluate_stratified(small_cnn, x, ts, ms, labels=labels, batch_size=5, progress=False)
    assert seen[0] == 15 * 4 + 15  # n·m, plus n for Goodfellow's reference pass
    manual = [
        evaluate(small_cnn, x[labels == c], ts, ms, batch_size=5, progress=False) for c in (0, 1, 2)
    ]
    for name, result in res.items():
        for layer in result.layer_names:
            per_class = np.stack([run[name][layer] for run in manual])
            finite = np.isfinite(per_class)
            with np.errstate(invalid="ignore"):
                expected = np.where(finite, per_class, 0).sum(0) / finite.sum(0)
            np.testing.assert_allclose(result[layer], expected, rtol=1e-12, equal_nan=True)
        meta = result.metadata
        assert (
            meta["stratified"] is True
            and meta["classes"] == [0, 1, 2]
            and meta["class_sizes"] == [5, 5, 5]
        )
        assert meta["n"] == 15 and meta["dataset"] == "tensor"
    # Metadata that differs between classes moves to per_class, in class order.
    fractions = [run["ANOVA[reject,0.01,True]"].metadata["rejection_fraction"] for run in manual]
    meta = res["ANOVA[reject,0.01,True]"].metadata
    if all(f == fractions[0] for f in fractions):
        assert meta["rejection_fraction"] == fractions[0]
    else:
        assert (
            meta["per_class"]["rejection_fraction"] == fractions
            and "rejection_fraction" not in meta
        )
    with count_images(small_cnn) as seen:
        evaluate_stratified(
            small_cnn, x, ts, [NormalizedVariance(), AnovaMeasure()], labels=labels, progress=False
        )
    assert seen[0] == 15 * 4


def test_stratified_reads_dataset_labels_and_checks_them(small_cnn):
    class DS(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    torch.manual_seed(7)
    x, y = torch.randn(8, 1, 8, 8), torch.tensor([0, 1] * 4)
    a = evaluate_stratified(small_cnn, DS(x, y), T.c4(), NormalizedVariance(), progress=False)
    b = evaluate_stratified(
        small_cnn, x, T.c4(), NormalizedVariance(), labels=y.numpy(), progress=False
    )
    for layer in a["NV[element,std]"].layer_names:
        np.testing.assert_array_equal(a["NV[element,std]"][layer], b["NV[element,std]"][layer])
    with pytest.raises(ValueError, match="labels"):
        evaluate_stratified(
            small_cnn, x, T.c4(), NormalizedVariance(), labels=y[:5], progress=False
        )
    with pytest.raises(ValueError, match="labels"):
        evaluate_stratified(small_cnn, x, T.c4(), NormalizedVariance(), progress=False)
    with pytest.raises(ValueError, match="labels"):  # a class of one sample
        evaluate_stratified(
            small_cnn, x, T.c4(), NormalizedVariance(), labels=[0] * 7 + [1], progress=False
        )


def test_mean_over_classes_conventions():
    out = mean_over_classes(
        [
            np.array([1.0, np.inf, np.inf, np.nan, np.nan]),
            np.array([3.0, 2.0, np.inf, np.nan, np.inf]),
        ]
    )
    np.testing.assert_array_equal(out, [2.0, 2.0, np.inf, np.nan, np.nan])


# ---------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: AnovaMeasure(alpha=0), "alpha"),
        (lambda: AnovaMeasure(alpha=1.0), "alpha"),
        (lambda: AnovaMeasure(alpha=-0.1), "alpha"),
        (lambda: AnovaMeasure(output="q"), "output"),
        (lambda: AnovaMeasure(bonferroni="yes"), "bonferroni"),
        (lambda: GoodfellowMeasure(firing_rate=0), "firing_rate"),
        (lambda: GoodfellowMeasure(firing_rate=1), "firing_rate"),
        (lambda: GoodfellowMeasure(threshold="median"), "threshold"),
        (lambda: GoodfellowMeasure(local="some"), "local"),
        (lambda: GoodfellowMeasure(output="L"), "output"),
    ],
)
def test_bad_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_goodfellow_needs_the_engine():
    from tmlib.measures import PassStates

    with pytest.raises(ValueError, match="reference pass"):
        PassStates.empty([GoodfellowMeasure()], m=4)


def test_stratified_keeps_every_class_result(small_cnn, tmp_path):
    torch.manual_seed(9)
    x, ts = torch.randn(12, 1, 8, 8), T.rotations(4)
    labels = torch.tensor([1, 0] * 6)
    ms = [NormalizedVariance(mode="channel"), AnovaMeasure(output="reject")]
    res = evaluate_stratified(small_cnn, x, ts, ms, labels=labels, blocks=3, batch_size=4, progress=False)
    for name, result in res.items():
        assert list(result.per_class) == [0, 1]
        for c in (0, 1):
            alone = evaluate(small_cnn, x[labels == c], ts, ms, blocks=3, batch_size=4, progress=False)[name]
            for layer in result.layer_names:
                np.testing.assert_array_equal(result.per_class[c][layer], alone[layer])
            np.testing.assert_array_equal(result.per_class[c].replicates.to_numpy(), alone.replicates.to_numpy())
        frame = result.to_frame()  # the stratified frame: no per-class rows or columns
        assert list(frame.columns) == ["layer", "index", "depth", "value", "se", "low", "high", "measure", "model",
                                       "dataset", "transformation"]
        # Replicate k of the class mean: every class without its block k, then the class mean.
        from tmlib.engine import block_bounds
        from tmlib.results import finite_mean

        for k in range(3):
            runs = []
            for c in (0, 1):
                xc = x[labels == c]
                bounds = block_bounds(len(xc), 3)
                keep = torch.ones(len(xc), dtype=torch.bool)
                keep[bounds[k] : bounds[k + 1]] = False
                runs.append(evaluate(small_cnn, xc[keep], ts, ms, batch_size=4, progress=False)[name])
            expected = [finite_mean(mean_over_classes([r[layer] for r in runs])) for layer in result.layer_names]
            np.testing.assert_allclose(result.replicates.iloc[k].to_numpy(), expected, rtol=1e-9)
        tidy = result.per_class_frame()
        assert tidy["class"].tolist() == [0] * len(result) + [1] * len(result)
        assert tidy["value"].tolist() == pytest.approx(
            result.per_class[0].layer_means().tolist() + result.per_class[1].layer_means().tolist())
        back = type(result).load(result.save(tmp_path / f"{name}.npz"))
        assert list(back.per_class) == [0, 1]
        for c in (0, 1):
            for layer in result.layer_names:
                np.testing.assert_array_equal(back.per_class[c][layer], result.per_class[c][layer])
            assert back.per_class[c].metadata["n"] == 6
        assert back.to_frame().equals(frame)
    plain = evaluate_stratified(small_cnn, x, ts, ms, labels=labels, progress=False)["NV[channel,std]"]
    assert list(plain.to_frame().columns) == ["layer", "index", "depth", "value", "measure", "model", "dataset",
                                              "transformation"]
    with pytest.raises(ValueError, match=r"blocks: .*fewer samples: \{0: 6, 1: 6\}"):
        evaluate_stratified(small_cnn, x, ts, ms, labels=labels, blocks=7, progress=False)
    with pytest.raises(ValueError, match="no per-class results"):
        evaluate(small_cnn, x, ts, ms, progress=False)["NV[channel,std]"].per_class_frame()
