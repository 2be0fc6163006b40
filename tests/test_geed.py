"""Kvinge et al.'s G-EED metrics against explicit loops on stored activations, and the C4/D4
steerable CNN (e2cnn) whose invariance and equivariance hold by construction."""

import warnings

import harness
import numpy as np
import pytest
import torch
from torch import nn

from tmlib import activations, warp_kernels
from tmlib import transforms as T
from tmlib.equivariant import SteerableCNN, group_elements
from tmlib.measures import (
    DistanceSameEquivariance,
    GEEDEquivariance,
    GEEDInvariance,
    GEEDOutputKL,
    evaluate,
    geed_table,
)

N = 6


def _samples(n=N, size=8, seed=1):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _orbit_activations(model, x, ts):
    """{layer: float64 array [n, m, D]} of f(g·x_i): the stored ST tensor (tests/harness.py)."""
    return {k: v.reshape(*v.shape[:2], -1) for k, v in harness.st_tensor(model, x, ts).items()}


def _cos(a, b):
    return harness._cos(a, b)


def _brute_invariance(z):
    """raw cosine G-EED, Euclidean G-EED, S, M (identity = column 0) from [n, m, D]."""
    return harness.geed_orbit_terms(z, 0)


@pytest.fixture
def geed_cnn(small_cnn):
    return small_cnn.float()


@pytest.mark.parametrize("ts", [T.c4(), T.rotations(5)], ids=["c4", "rotations5"])
def test_invariance_and_kl_match_brute_force(geed_cnn, ts):
    x = _samples()
    z = _orbit_activations(geed_cnn, x, ts)
    res = evaluate(geed_cnn, x, ts, [GEEDInvariance(), GEEDInvariance(metric="euclidean"),
                                     GEEDInvariance(normalize=True), GEEDOutputKL()], progress=False)
    raw_cos, raw_euc, kl_sim, baseline = {}, {}, {}, {}
    for name, values in z.items():
        raw_cos[name], raw_euc[name], kl_sim[name], baseline[name] = _brute_invariance(values)
        assert float(res["GEED-inv[cosine,False]"][name]) == pytest.approx(raw_cos[name], rel=1e-9, abs=1e-12)
        assert float(res["GEED-inv[euclidean,False]"][name]) == pytest.approx(raw_euc[name], rel=1e-9)
        normalised = res["GEED-inv[cosine,True]"]
        assert normalised.metadata["baseline"][name] == pytest.approx(baseline[name], rel=1e-9)
        assert normalised.metadata["raw"][name] == pytest.approx(raw_cos[name], rel=1e-9, abs=1e-12)
        assert float(normalised[name]) == pytest.approx(kl_sim[name] / baseline[name], rel=1e-9)
    # KL on the logits (the last layer, a vector): explicit softmax over the orbit.
    logits = z["6"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mean = p.mean(axis=1, keepdims=True)
    kl = (p * (np.log(p) - np.log(mean))).sum(-1).mean()
    kl_result = res["GEED-KL"]
    assert kl_result.layer_names == ["5", "6"]  # the vector layers (flatten, logits); maps are skipped
    assert float(kl_result["6"]) == pytest.approx(kl, rel=1e-9)
    assert set(kl_result.metadata["skipped_layers"]) == {"0", "1", "2", "3", "4"}
    table = geed_table(normalised)
    assert list(table.columns) == ["layer", "index", "depth", "raw", "baseline", "ratio", "relative", "method"]
    assert (table["method"] == "cosine").all()
    for row in table.itertuples():
        assert row.relative == pytest.approx(raw_cos[row.layer] / (1 - baseline[row.layer]), rel=1e-9)


def test_equivariance_matches_brute_force_with_the_same_g_on_both_sides(geed_cnn):
    x = _samples()
    ts = T.c4()
    z = _orbit_activations(geed_cnn, x, ts)
    res = evaluate(geed_cnn, x, ts, [GEEDEquivariance(), GEEDEquivariance(metric="euclidean")], progress=False)
    shapes = {name: out.shape[1:] for name, out in activations.record(geed_cnn, x[:1]).items()}
    cosine, euclidean = res["GEED-eq[cosine,spatial]"], res["GEED-eq[euclidean,spatial]"]
    assert cosine.layer_names == ["0", "1", "2", "3", "4"]  # maps only: no spatial action on [F]
    for name in cosine.layer_names:
        maps = z[name].reshape(N, 4, *shapes[name])
        cos, dist = [], []
        for i in range(N):
            for k in range(4):  # c4's k-th element is k counter-clockwise quarter turns
                expected = np.rot90(maps[i, 0], k, axes=(-2, -1)).ravel()
                cos.append(_cos(maps[i, k].ravel(), expected))
                dist.append(np.linalg.norm(maps[i, k].ravel() - expected))
        assert float(cosine[name]) == pytest.approx(1 - np.mean(cos), rel=1e-9, abs=1e-12)
        assert float(euclidean[name]) == pytest.approx(np.mean(dist), rel=1e-9)


def test_states_merge_like_one_pass(geed_cnn):
    from tmlib.measures.base import LayerInfo, PassContext
    from tmlib.measures.geed import OrbitState

    ts = T.c4()
    block = torch.randn(6, 4, 3, 5, 5, dtype=torch.float64)
    info, context = LayerInfo("l", (3, 5, 5)), PassContext(m=4, ts=ts)
    whole = OrbitState(info, context)
    whole.update(block)
    first, second = OrbitState(info, context), OrbitState(info, context)
    first.update(block[:2])
    second.update(block[2:] + 0.0)
    first.merge(second)
    for read in ("similarity", "mean_distance", "rms_distance", "cosine_baseline", "rms_pair_distance"):
        assert getattr(first, read)() == pytest.approx(getattr(whole, read)(), rel=1e-12)


class _Through(nn.Module):
    """One observable layer that passes its input on: the 'features' are the samples themselves."""

    def __init__(self):
        super().__init__()
        self.features = nn.Identity()

    def forward(self, x):
        return self.features(x)


def test_centred_features_fall_back_to_euclidean_with_a_warning():
    half = _samples(n=3)
    x = torch.cat([half, -half])  # Σ of the unit vectors is 0: M = -1/(n-1) < 0
    ts = T.c4()
    model = _Through()
    with pytest.warns(UserWarning, match="min_baseline"):
        result = evaluate(model, x, ts, GEEDInvariance(normalize=True), progress=False)["GEED-inv[cosine,True]"]
    assert result.metadata["baseline"]["features"] == pytest.approx(-1 / 5, abs=1e-12)
    assert result.metadata["method"]["features"] == "euclidean-fallback"
    z = ts.apply(x).double().reshape(6, 4, -1).numpy()
    orbit = np.sqrt(np.mean([np.sum((z[i, g] - z[i].mean(0)) ** 2) for i in range(6) for g in range(4)]))
    pairs = np.sqrt(np.mean([np.sum((z[i, 0] - z[j, 0]) ** 2) for i in range(6) for j in range(6) if i != j]))
    assert float(result["features"]) == pytest.approx(orbit / pairs, rel=1e-9)
    assert np.isfinite(float(result["features"]))
    assert geed_table(result)["method"].tolist() == ["euclidean-fallback"]


def test_positive_baseline_keeps_the_cosine_ratio():
    x = _samples().abs()  # non-negative, like ReLU outputs: M > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(_Through(), x, T.c4(), GEEDInvariance(normalize=True), progress=False)
    r = result["GEED-inv[cosine,True]"]
    assert r.metadata["method"]["features"] == "cosine"
    assert r.metadata["baseline"]["features"] > 0.5


def test_rot90_invariant_model_reads_zero():
    class OrbitMean(nn.Module):
        """Averages a conv over the four quarter turns of its input: C4-invariant by construction."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.out = nn.Flatten()

        def forward(self, x):
            return self.out(sum(self.pool(self.conv(torch.rot90(x, k, dims=(-2, -1)))) for k in range(4)))

    torch.manual_seed(0)
    result = evaluate(OrbitMean().eval(), _samples(), T.c4(), [GEEDInvariance(), GEEDOutputKL()],
                      layers=["pool", "out"], progress=False)
    assert float(result["GEED-inv[cosine,False]"]["out"]) < 1e-12
    assert float(result["GEED-KL"]["out"]) < 1e-12
    assert float(result["GEED-inv[cosine,False]"]["pool"]) > 1e-4  # one term of the sum is not invariant


@pytest.mark.parametrize("group,ts", [("C4", T.c4()), ("D4", T.d4())])
def test_steerable_cnn_is_invariant_and_equivariant_by_construction(group, ts):
    torch.manual_seed(0)
    model = SteerableCNN(group=group, fields=(2, 2, 3), fc_units=8, image_size=16).eval()
    x = _samples(n=5, size=16)
    res = evaluate(model, x, ts, [GEEDInvariance(), GEEDOutputKL(), GEEDEquivariance(action=model.latent_actions(ts)),
                                  GEEDEquivariance()], progress=False)
    invariance = res["GEED-inv[cosine,False]"]
    assert model.invariant_layers() == ["gap", "fc0", "fc0act", "fc1"]
    for layer in model.invariant_layers():
        assert float(invariance[layer]) < 1e-5
    assert float(res["GEED-KL"]["fc1"]) < 1e-5
    own = res["GEED-eq[cosine,custom]"]
    assert own.layer_names == model.layer_names()
    for layer in model.equivariant_layers():
        assert float(own[layer]) < 1e-5
        assert float(invariance[layer]) > 1e-3  # equivariant, not invariant: the maps move
    # The plain spatial action ignores how the group permutes each regular field's channels:
    spatial = res["GEED-eq[cosine,spatial]"]
    assert float(spatial["conv1"]) > 1e-2
    assert float(spatial["gpool"]) < 1e-5  # after group pooling the fields are scalar: spatial is right


@pytest.mark.parametrize("group,ts", [("C4", T.c4()), ("D4", T.d4())])
def test_field_action_is_e2cnns_own(group, ts):
    from e2cnn import nn as enn

    model = SteerableCNN(group=group, fields=(2, 2, 3), fc_units=8, image_size=16)
    elements = group_elements(model.gspace, ts)
    actions = model.latent_actions(ts)
    fx = torch.randn(3, model.conv1.out_type.size, 8, 8)
    ours = actions["conv1"](fx)
    theirs = torch.stack([enn.GeometricTensor(fx, model.conv1.out_type).transform(g).tensor for g in elements], 1)
    assert torch.equal(ours, theirs)
    gpooled = torch.randn(3, model.gpool.out_type.size, 4, 4)  # trivial fields: the spatial action alone
    assert torch.equal(actions["gpool"](gpooled), ts.apply(gpooled))


def test_steerable_cnn_state_round_trip_across_modes():
    torch.manual_seed(0)
    a = SteerableCNN(fields=(2, 2, 2), fc_units=4, image_size=8).eval()
    torch.manual_seed(1)
    b = SteerableCNN(fields=(2, 2, 2), fc_units=4, image_size=8).eval()
    x = _samples(n=3, size=8)
    state = a.state_dict()
    assert not any(k.endswith((".filter", ".expanded_bias")) for k in state)
    b.load_state_dict(state)  # b is in eval mode with its own cached filters: they must be redone
    assert torch.allclose(a(x), b(x), atol=1e-6)
    b.train()
    b.load_state_dict(a.state_dict())
    assert b.training


def test_steerable_cnn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="group"):
        SteerableCNN(group="C8")
    with pytest.raises(ValueError, match="image_size"):
        SteerableCNN(image_size=30)
    with pytest.raises(ValueError, match="fields"):
        SteerableCNN(fields=(4, 8))
    with pytest.raises(ValueError, match=r"expects input \[b, 1, 8, 8\]"):
        SteerableCNN(image_size=8)(torch.zeros(1, 1, 7, 7))
    with pytest.raises(ValueError, match="not an element of the group"):
        group_elements(SteerableCNN(image_size=8).gspace, T.rotations(8))


def test_bad_input_names_the_argument(geed_cnn):
    with pytest.raises(ValueError, match="metric"):
        GEEDInvariance(metric="manhattan")
    with pytest.raises(ValueError, match="metric='cosine'"):
        GEEDInvariance(metric="euclidean", normalize=True)
    with pytest.raises(ValueError, match="min_baseline"):
        GEEDInvariance(min_baseline=-1)
    with pytest.raises(ValueError, match="action"):
        GEEDEquivariance(action="rotate")
    no_identity = T.rotations(4).subset([1, 2, 3])
    with pytest.raises(ValueError, match="no identity"):
        evaluate(geed_cnn, _samples(), no_identity, GEEDEquivariance(), progress=False)
    with pytest.raises(ValueError, match="no identity"):
        evaluate(geed_cnn, _samples(), no_identity, GEEDInvariance(normalize=True), progress=False)
    with pytest.raises(ValueError, match="every observed layer was skipped"):
        evaluate(geed_cnn, _samples(), T.c4(), GEEDOutputKL(), layers=["0", "1"], progress=False)
    with pytest.raises(ValueError, match="GEEDInvariance"):
        geed_table(evaluate(geed_cnn, _samples(), T.c4(), GEEDInvariance(), progress=False)["GEED-inv[cosine,False]"])


# ---------------------------------------------------------------- the fused CPU kernels against the torch ops
from tmlib.measures import geed, geed_kernels  # noqa: E402
from tmlib.measures.moments import numba_available  # noqa: E402


def _orbits(dtype):
    z = torch.randn(6, 5, 300, generator=torch.Generator().manual_seed(8)).to(dtype)
    z[1] = 0.0  # an all-zero orbit
    z[2, :, :] = z[2, :1, :]  # an invariant orbit: every z_g equals the centroid
    return z


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_geed_products_equal_the_torch_ops(dtype):
    z = _orbits(dtype)
    for fused_out, torch_out in zip(geed_kernels.orbit_products(z, True), geed_kernels.orbit_products(z, False)):
        assert fused_out.dtype == torch.float64
        torch.testing.assert_close(fused_out, torch_out, rtol=1e-12, atol=1e-12)
    e = torch.roll(z, 1, dims=1)
    for fused_out, torch_out in zip(geed_kernels.pair_products(z, e, True), geed_kernels.pair_products(z, e, False)):
        torch.testing.assert_close(fused_out, torch_out, rtol=1e-12, atol=1e-12)
    a = z[:, 0]
    (u1, q1, n1), (u2, q2, n2) = geed_kernels.unit_sums(a, True), geed_kernels.unit_sums(a, False)
    torch.testing.assert_close(u1, u2, rtol=1e-12, atol=1e-14)
    assert n1 == n2 == 1 and q1 == 5.0 and q2 == pytest.approx(5.0, rel=1e-14)
    with pytest.raises(ValueError, match="must have the same shape"):
        geed_kernels.pair_products(z, e[:, :2], True)


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_pair_products_read_the_warps_strided_view_as_its_copy(monkeypatch):
    # warp_all(contiguous=False) leaves the m warps outermost in memory; the pair kernel reads that
    # view without copying it, with the same sums in the same order: the same bits.
    z = _orbits(torch.float32)
    e = z.transpose(0, 1).contiguous().transpose(0, 1) * 0.5  # [b, m, D], stored [m, b, D]
    assert not e.is_contiguous()
    strided, copied = geed_kernels.pair_products(z, e, True), geed_kernels.pair_products(z, e.contiguous(), True)
    for got, want, ops in zip(strided, copied, geed_kernels.pair_products(z, e, False)):
        assert torch.equal(got, want)
        torch.testing.assert_close(got, ops, rtol=1e-12, atol=1e-12)
    x = torch.rand(3, 2, 9, 9, generator=torch.Generator().manual_seed(2))
    ts = T.rotations(5)
    view = ts.apply(x, contiguous=False)
    assert not view.is_contiguous() and torch.equal(view, ts.apply(x))
    # A latent-equivariance pass under sampled rotations that shares its warps with DSES takes that
    # path (a spy on the kernel); alone, it warps inside the kernel and stores no warps.
    calls = []
    kernel = geed_kernels._pair_kernel
    monkeypatch.setattr(geed_kernels, "_pair_kernel", lambda a, e, outer: calls.append(outer) or kernel(a, e, outer))
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()).eval()
    evaluate(model, torch.rand(4, 1, 9, 9), ts, [GEEDEquivariance(), DistanceSameEquivariance()], progress=False)
    assert calls and all(calls)
    calls.clear()
    evaluate(model, torch.rand(4, 1, 9, 9), ts, GEEDEquivariance(), progress=False)
    assert not calls


class _OwnApply(T.TransformationSet):
    def apply(self, x, fill=0.0, contiguous=True):  # a set with its own apply: not the tables' warps
        return super().apply(x, fill, contiguous)


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
@pytest.mark.parametrize("ts, shape", [
    (T.rotations(7), (3, 9, 13)), (T.rotations(7), (2, 7, 7)), (T.rotations(7), (1, 28, 28)),
    (T.c4(), (3, 9, 9)), (T.d4(), (2, 6, 6)), (T.cyclic_shifts([(0, 0), (2, 1), (-3, 4)], 8), (2, 8, 8)),
], ids=["rot7-9x13", "rot7-7x7", "rot7-28x28", "c4", "d4", "shifts"])
def test_warps_inside_the_pair_kernel_give_the_stored_warps_numbers(monkeypatch, ts, shape):
    # The kernel that moves f(x)'s maps as it adds the products gives, bit for bit, the pair
    # products of the block with ts.apply's maps (the same float32 values, the same running sums):
    # bilinear warps from the tables, or an exact set's pixels.
    gen = torch.Generator().manual_seed(4)
    identity = ts.identity_index()
    block = torch.randn(5, len(ts), *shape, generator=gen)
    block[1] = 0.0  # an all-zero sample: its warps are zero too
    block[2, :, 0] = block[2, identity, 0]  # a map that is the same under every transformation
    monkeypatch.setattr(warp_kernels, "_ARITHMETIC", None)  # as in a new process: no warp checked yet
    got = geed_kernels.warped_pair_products(block, identity, ts)
    moved = ts.apply(block[:, identity], contiguous=False)
    want = geed_kernels.pair_products(block.reshape(5, len(ts), -1), moved.reshape(5, len(ts), -1), True)
    assert got is not None
    for g, w in zip(got, want):
        assert g.shape == (5, len(ts)) and torch.equal(g, w)
    # Where the kernel would not give ts.apply's numbers: None, and the caller moves the maps as before.
    assert geed_kernels.warped_pair_products(block.double(), identity, ts) is None
    assert geed_kernels.warped_pair_products(block, identity, _OwnApply(ts.matrices)) is None
    # A whole pass: the same results whichever way the warps are formed.
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ELU(), nn.Conv2d(3, 2, 3, padding=1)).eval()
    x = torch.rand(6, 1, *shape[1:], generator=gen)
    measures = [GEEDEquivariance(), GEEDEquivariance(metric="euclidean")]
    used = []
    real = geed.warped_pair_products
    monkeypatch.setattr(geed, "warped_pair_products", lambda *args: used.append(real(*args)) or used[-1])
    fused = evaluate(model, x, ts, measures, progress=False, batch_size=4)
    assert len(used) == 3 * 2 and all(u is not None for u in used)  # 3 layers × 2 batches, all in the kernel
    monkeypatch.setattr(geed, "warped_pair_products", lambda *args: None)
    stored = evaluate(model, x, ts, measures, progress=False, batch_size=4)
    for name in fused:
        for layer in fused[name].layer_names:
            np.testing.assert_array_equal(fused[name][layer], stored[name][layer])


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_fused_moments_update_equals_the_torch_ops(monkeypatch):
    from tmlib.measures import states

    x = torch.randn(7, 4, 33, generator=torch.Generator().manual_seed(9)) * 3 + 100
    x[:, 1, 2] = 7.0  # constant: exactly zero variance on both paths
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(states, "_HAVE_NUMBA", fused)
        out[fused] = states.ShiftedMoments((4, 33))
        out[fused].update(x[:3])
        out[fused].update(x[3:])
    torch.testing.assert_close(out[True].variance(), out[False].variance(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out[True].mean(), out[False].mean(), rtol=1e-14, atol=0)
    assert out[True].variance()[1, 2] == 0.0 and out[True].n == 7
