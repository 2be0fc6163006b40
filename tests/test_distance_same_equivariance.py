"""Distance family and same-equivariance measures against explicit computations on stored tensors."""

import harness
import numpy as np
import pytest
import torch
from conftest import CountingModel
from torch import nn

from tmlib import transforms as T
from tmlib.measures import (
    DistanceSameEquivariance,
    NormalizedDistance,
    NormalizedVarianceSE,
    SampleDistance,
    SampleVarianceSE,
    TransformationDistance,
    TransformationVariance,
    TransformationVarianceSE,
    evaluate,
)

N, M = 8, 5
st_tensor = harness.st_tensor
DISTANCE_OPTIONS = [
    {"unit": u, "metric": me, "normalize": no}
    for u in ("element", "channel")
    for me in ("sqeuclidean", "euclidean")
    for no in (False, True)
]
DISTANCES = [
    cls(**o)
    for cls in (TransformationDistance, SampleDistance, NormalizedDistance)
    for o in DISTANCE_OPTIONS
]
SE_VARIANCES = [
    cls(mode=mo, stat=st)
    for cls in (TransformationVarianceSE, SampleVarianceSE, NormalizedVarianceSE)
    for mo in ("element", "channel")
    for st in ("std", "var")
]


def brute_distances(st, unit, metric, normalize):
    """TD, SD, ND by explicit pairs (tests/harness.py) for one option set."""
    measure = TransformationDistance(unit=unit, metric=metric, normalize=normalize)
    out = {}
    for cls in (TransformationDistance, SampleDistance, NormalizedDistance):
        measure = cls(unit=unit, metric=metric, normalize=normalize)
        out[measure.short_name] = harness.brute_distance(measure, st, None, None)
    return out


def test_distances_match_explicit_pairwise_computation(small_cnn):
    torch.manual_seed(1)
    x, ts = torch.randn(N, 1, 8, 8), T.rotations(M)
    r = evaluate(
        small_cnn,
        x,
        ts,
        DISTANCES + [TransformationVariance(stat="var")],
        batch_size=3,
        progress=False,
    )
    st = st_tensor(small_cnn, x, ts)
    assert list(st) == r["TD[element,sqeuclidean,False]"].layer_names
    for measure in DISTANCES:
        for layer, values in st.items():
            expected = brute_distances(values, measure.unit, measure.metric, measure.normalize)[
                measure.short_name
            ]
            got = r[measure.name][layer]
            assert got.shape == expected.shape
            np.testing.assert_allclose(
                got, expected, rtol=2e-5, atol=1e-9, err_msg=f"{measure.name} {layer}"
            )
    # The squared distance is exactly twice the variance, from the very state TV uses.
    for layer in st:
        np.testing.assert_allclose(
            r["TD[element,sqeuclidean,False]"][layer], 2 * r["TV[element,var]"][layer], rtol=1e-14
        )
    assert r["TD[channel,euclidean,True]"]["0"].shape == (4,)
    assert r["SD[element,euclidean,False]"]["3"].shape == (6, 4, 4)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_nd_division_convention(metric):
    # All samples identical: every column is constant, so SD = 0 exactly. A non-invariant channel
    # then gives TD > 0 → ND = inf; a constant channel gives TD = 0 → ND = 0/0 = 1.
    class Probe(nn.Module):
        def forward(self, x):
            return torch.cat([x, torch.zeros_like(x) + 0.5], dim=1)

    x = torch.randn(1, 1, 6, 6).expand(5, 1, 6, 6).contiguous()
    ms = [
        cls(unit=u, metric=metric)
        for cls in (TransformationDistance, SampleDistance, NormalizedDistance)
        for u in ("element", "channel")
    ]
    r = evaluate(nn.Sequential(Probe()), x, T.c4(), ms, progress=False)
    sd, td, nd = (r[f"{s}[channel,{metric},False]"]["0"] for s in ("SD", "TD", "ND"))
    assert np.all(sd == 0.0) and td[0] > 0 and td[1] == 0.0
    assert np.isinf(nd[0]) and nd[1] == 1.0
    nd_el = r[f"ND[element,{metric},False]"]["0"]
    assert np.all(nd_el[1] == 1.0) and np.isinf(nd_el[0]).any()


def test_euclidean_memory_budget_names_the_layer(small_cnn):
    # Layer '0' keeps 4·8·8 floats per image: 10 samples × 4 transformations × 256 × 4 B = 40 KB.
    with pytest.raises(
        ValueError, match=r"layer '0'.*MB.*max_memory_mb=0\.01.*metric='sqeuclidean'"
    ):
        evaluate(
            small_cnn,
            torch.randn(10, 1, 8, 8),
            T.c4(),
            SampleDistance(metric="euclidean", max_memory_mb=0.01),
            layers=["0"],
            progress=False,
        )
    # TD stores nothing, so the same budget is no obstacle.
    evaluate(
        small_cnn,
        torch.randn(10, 1, 8, 8),
        T.c4(),
        TransformationDistance(metric="euclidean", max_memory_mb=0.01),
        layers=["0"],
        progress=False,
    )
    with pytest.raises(ValueError, match="metric must be"):
        SampleDistance(metric="cosine")


# ---------------------------------------------------------------------------- same-equivariance


def brute_variance(b, mode, stat):
    """TVSE, SVSE, NVSE of de-transformed maps b [n, m, C, H, W] (tests/harness.py)."""
    return {cls.short_name: harness.brute_variance(cls(mode=mode, stat=stat), b, None, None)
            for cls in (TransformationVarianceSE, SampleVarianceSE, NormalizedVarianceSE)}


@pytest.mark.parametrize("ts_name", ["rotations", "c4"])
def test_variance_se_matches_explicit_detransformation(small_cnn, ts_name):
    torch.manual_seed(3)
    ts = T.rotations(M) if ts_name == "rotations" else T.c4()
    x = torch.randn(N, 1, 8, 8)
    r = evaluate(small_cnn, x, ts, SE_VARIANCES, batch_size=3, progress=False)
    st = st_tensor(small_cnn, x, ts)
    spatial = [layer for layer, v in st.items() if v.ndim == 5]
    assert spatial == ["0", "1", "2", "3", "4"]
    for measure in SE_VARIANCES:
        result = r[measure.name]
        assert result.layer_names == spatial
        assert result.metadata["skipped_layers"] == {
            "5": "no spatial dimensions",
            "6": "no spatial dimensions",
        }
        for layer in spatial:
            # float32 warps of float32 maps (engine) vs of float64 maps (here): rtol 1e-5.
            expected = brute_variance(harness.detransformed(st[layer], ts), measure.mode, measure.stat)
            np.testing.assert_allclose(
                result[layer],
                expected[measure.short_name],
                rtol=1e-5,
                atol=1e-7,
                err_msg=f"{measure.name} {layer}",
            )


def symmetric_conv(bias: bool, symmetric: bool = True) -> nn.Module:
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=bias)
    if (
        symmetric
    ):  # a 3×3 kernel invariant under quarter turns: equal corners, equal edges, any centre
        corner, edge, centre = torch.randn(3, 3, 2, 1, 1).unbind(0)
        w = torch.empty(3, 2, 3, 3)
        w[..., ::2, ::2] = corner
        w[..., 0, 1] = w[..., 1, 0] = w[..., 1, 2] = w[..., 2, 1] = edge[..., 0, 0]
        w[..., 1, 1] = centre[..., 0, 0]
        with torch.no_grad():
            conv.weight.copy_(w)
    return nn.Sequential(conv).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_rotation_symmetric_kernel_is_same_equivariant_under_c4(bias):
    x = torch.randn(6, 2, 9, 9)
    ms = [
        TransformationVarianceSE(),
        TransformationVarianceSE(mode="channel"),
        DistanceSameEquivariance(),
    ]
    sym = evaluate(symmetric_conv(bias), x, T.c4(), ms, progress=False)
    plain = evaluate(symmetric_conv(bias, symmetric=False), x, T.c4(), ms, progress=False)
    for name in sym:
        assert sym[name]["0"].max() < 1e-6, name
        assert plain[name]["0"].min() > 1e-2, name


def test_identity_model_has_zero_dses():
    model = nn.Sequential(nn.Identity())
    x = torch.randn(5, 2, 8, 8)
    without = T.c4().subset([1, 2, 3])
    for ts, ref in [(T.c4(), False), (without, True)]:
        r = evaluate(
            model,
            x,
            ts,
            [
                DistanceSameEquivariance(reference=ref),
                DistanceSameEquivariance(normalize=True, reference=ref),
                TransformationVarianceSE(),
            ],
            progress=False,
        )
        for result in r.values():
            np.testing.assert_array_equal(result["0"], 0.0)
    # Bilinear quarter turns land on pixel centres up to float32 rounding of the sampling grid.
    no_identity = T.rotations(4).subset([1, 2, 3])
    for ts, ref in [(T.rotations(4), False), (no_identity, True)]:
        r = evaluate(
            model,
            x,
            ts,
            [DistanceSameEquivariance(reference=ref), TransformationVarianceSE()],
            progress=False,
        )
        for result in r.values():
            assert np.abs(result["0"]).max() < 1e-5


def brute_dses(model, x, ts, normalize):
    """DSES by explicit warps of F(x) from a plain forward of x (tests/harness.py), per spatial layer."""
    st, fx = st_tensor(model, x, ts), harness.untransformed(model, x)
    measure = DistanceSameEquivariance(normalize=normalize)
    return {layer: harness.brute_dses(measure, a, fx[layer], ts) for layer, a in st.items() if a.ndim == 5}


@pytest.mark.parametrize("normalize", [False, True])
def test_dses_matches_explicit_computation(small_cnn, normalize):
    torch.manual_seed(5)
    x = torch.randn(N, 1, 8, 8)
    # rotations(5) contains 0° (identity column); 4 angles in ±45° do not (reference pass).
    for ts, ref in [(T.rotations(M), False), (T.rotations(4, degrees=90), True)]:
        result = evaluate(
            small_cnn,
            x,
            ts,
            DistanceSameEquivariance(normalize=normalize, reference=ref),
            batch_size=3,
            progress=False,
        )[f"DSES[{normalize}]"]
        expected = brute_dses(small_cnn, x, ts, normalize)
        assert result.layer_names == list(expected)
        assert (
            set(result.metadata["skipped_layers"]) == {"5", "6"}
            and result.metadata["reference_pass"] is ref
        )
        for layer, values in expected.items():
            assert result[layer].shape == values.shape
            np.testing.assert_allclose(
                result[layer], values, rtol=1e-5, atol=1e-7, err_msg=f"{ts.name} {layer}"
            )


def test_forwards_n_m_plus_n_only_for_the_reference_pass(small_cnn):
    x = torch.randn(7, 1, 8, 8)
    ms = [
        DistanceSameEquivariance(),
        TransformationVarianceSE(),
        NormalizedDistance(metric="euclidean"),
    ]
    model = CountingModel(small_cnn)
    r = evaluate(model, x, T.rotations(5), ms, batch_size=2, progress=False)
    assert model.images == 7 * 5 and r["DSES[False]"].metadata["images_forwarded"] == 35
    model = CountingModel(small_cnn)
    r = evaluate(
        model,
        x,
        T.rotations(4, degrees=90),
        ms[1:] + [DistanceSameEquivariance(reference=True)],
        batch_size=2,
        progress=False,
    )
    assert model.images == 7 * 4 + 7 and r["DSES[False]"].metadata["images_forwarded"] == 35
    with pytest.raises(ValueError, match=r"no identity.*reference=True"):
        evaluate(
            small_cnn, x, T.rotations(4, degrees=90), DistanceSameEquivariance(), progress=False
        )
    # The stored reference outputs have a budget too: layer '0' needs 7·4·8·8·4 B = 7 KB.
    with pytest.raises(ValueError, match=r"layer '0'.*reference pass.*max_memory_mb=0\.001"):
        evaluate(
            small_cnn,
            x,
            T.rotations(4, degrees=90),
            DistanceSameEquivariance(reference=True, max_memory_mb=0.001),
            progress=False,
        )


def test_reference_outputs_are_read_by_sample_index_whatever_the_block_sizes():
    from tmlib.measures.base import LayerInfo, PassContext
    from tmlib.measures.same_equivariance import ReferenceOutputs

    outputs = torch.randn(8, 2, 3, 3)
    ref = ReferenceOutputs(
        LayerInfo("conv", (2, 3, 3)), PassContext(m=3, ts=T.c4().subset([1, 2, 3])), 1.0
    )
    for chunk in outputs.split([3, 3, 2]):
        ref.update(chunk)
    for start, count in [(0, 8), (2, 4), (3, 3), (5, 1), (6, 2)]:
        torch.testing.assert_close(
            ref.read(start, count), outputs[start : start + count], rtol=0, atol=0
        )
    with pytest.raises(RuntimeError, match="same samples in the same order"):
        ref.read(6, 3)


def test_non_spatial_layers_and_sets_without_inverse_are_clear_errors():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(4, 1, 4, 4)
    for measure in (TransformationVarianceSE(), DistanceSameEquivariance()):
        with pytest.raises(
            ValueError, match=r"no observed layer has spatial dimensions.*\['0', '1'\]"
        ):
            evaluate(flat, x, T.c4(), measure, progress=False)

    class NoInverse:  # a generic set: apply and len, nothing else
        name = "generic"

        def __len__(self):
            return 4

        def apply(self, images, fill=0.0):
            return T.c4().apply(images)

    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(
        ValueError, match=r"ts: same-equivariance needs a transformation set with an exact inverse"
    ):
        evaluate(conv, x, NoInverse(), NormalizedVarianceSE(), progress=False)
    # States fed by hand (PassStates.empty): the checks run first, with or without a set.
    from tmlib.measures import PassStates

    with pytest.raises(ValueError, match="ts: same-equivariance"):
        PassStates.empty([SampleVarianceSE()], m=4)
    tvse = TransformationVarianceSE()
    states = PassStates.empty([tvse], m=4, ts=T.c4())
    states.update("conv", torch.randn(3, 4, 2, 5, 5))
    assert states.compute(tvse)["TVSE[element,std]"]["conv"].shape == (2, 5, 5)


def test_chunked_pairwise_sums_and_merged_states_are_exact():
    from tmlib.measures import distance
    from tmlib.measures.base import LayerInfo, PassContext

    torch.manual_seed(6)
    x = torch.randn(7, 9, 5) * 3 + 1
    full = (
        torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
        .triu(1)
        .sum((1, 2))
    )
    a = x[..., 0].double()
    scalars = (a[:, :, None] - a[:, None, :]).abs().sum((1, 2)) / 2
    for chunk in (1 << 22, 20, 1):  # default, a few rows/groups per chunk, one at a time
        np.testing.assert_allclose(distance.pairwise_distance_sum(x, chunk), full, rtol=1e-12)
        np.testing.assert_allclose(distance.pairwise_distance_sum(x[..., :1], chunk), scalars, rtol=1e-12)
    # A state fed in two parts and merged equals one fed at once (columns pair across the parts).
    layer, context = LayerInfo("conv", (2, 3, 3)), PassContext(m=4)
    block = torch.randn(9, 4, 2, 3, 3)

    def new():
        return distance.PairwiseDistances(layer, context, "channel", False, True, 1.0)

    whole, left, right = new(), new(), new()
    whole.update(block)
    left.update(block[:4])
    right.update(block[4:])
    merged = left.merge(right)
    np.testing.assert_allclose(merged.sample(), whole.sample(), rtol=1e-12)
    np.testing.assert_allclose(merged.transformational(), whole.transformational(), rtol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_the_fused_map_distances_equal_the_torch_ops(normalize):
    # The CPU kernel against the float64 torch ops it replaces, with all-zero maps (stay zero when
    # normalised), a map equal to its reference (distance 0) and odd sizes.
    from tmlib.measures.moments import numba_available
    from tmlib.measures.se_kernels import map_distance_sums

    if not numba_available():
        pytest.skip("numba not installed: only the torch ops run")
    g = torch.Generator().manual_seed(5)
    y = torch.randn(3, 4, 5, 7, 6, generator=g)
    expected = torch.randn(3, 4, 5, 7, 6, generator=g)
    y[0, 1, 2] = 0.0
    expected[1, 2, 3] = 0.0
    y[2, 0], expected[2, 0] = 0.0, 0.0
    expected[1, 3, 0] = y[1, 3, 0]
    fused = map_distance_sums(y, expected, normalize, fused=True)
    ops = map_distance_sums(y, expected, normalize, fused=False)
    assert fused.dtype == ops.dtype == torch.float64 and fused.shape == (5,)
    np.testing.assert_allclose(fused.numpy(), ops.numpy(), rtol=1e-13)
    # brute force: one map pair at a time
    brute = np.zeros(5)
    for i in range(3):
        for j in range(4):
            for c in range(5):
                a, r = y[i, j, c].double().flatten(), expected[i, j, c].double().flatten()
                if normalize:
                    a = a / a.norm() if a.norm() > 0 else a
                    r = r / r.norm() if r.norm() > 0 else r
                brute[c] += float(((a - r) ** 2).mean().sqrt())
    np.testing.assert_allclose(fused.numpy(), brute, rtol=1e-12)
    # expected stored [m, b, …] (warp_all(contiguous=False)): read in place, the same bits
    strided = expected.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    assert torch.equal(map_distance_sums(y, strided, normalize, fused=True), fused)
    np.testing.assert_allclose(map_distance_sums(y, strided, normalize, fused=False).numpy(), ops.numpy(), rtol=1e-15)
    with pytest.raises(ValueError, match="differ"):
        map_distance_sums(y, expected[:, :2], normalize, fused=True)


@pytest.mark.parametrize("fused", [True, False])
def test_dses_and_geed_latent_equivariance_share_one_set_of_warps(monkeypatch, fused):
    # Both need t_j F(x_i) of every map (G-EED's spatial action on the identity column, DSES's
    # expected maps): in one pass they are warped once per layer and block, the same numbers.
    from tmlib.measures import GEEDEquivariance, states

    if fused and not states._HAVE_NUMBA:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(states, "_HAVE_NUMBA", fused)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1)).eval()
    x, ts = torch.randn(7, 1, 9, 9), T.rotations(6)
    warps = []
    apply = T.TransformationSet.apply
    monkeypatch.setattr(T.TransformationSet, "apply",
                        lambda self, x, fill=0.0, contiguous=True: warps.append(contiguous) or apply(self, x, fill, contiguous))
    measures = [GEEDEquivariance(), DistanceSameEquivariance(), DistanceSameEquivariance(normalize=True)]
    together = evaluate(model, x, ts, measures, batch_size=4, progress=False)
    shared = warps.count(False)
    alone = [next(iter(evaluate(model, x, ts, [m], batch_size=4, progress=False).values())) for m in measures]
    blocks, layers = 2, 3
    # G-EED and the first DSES share one set of stored warps; where the kernels can read the block
    # (fused), every other state forms t_j F(x_i) inside its kernel, without ts.apply
    assert shared == (1 if fused else 2) * blocks * layers
    assert warps.count(False) - shared == (0 if fused else 3) * blocks * layers
    for result, single in zip(together.values(), alone):
        for layer in ("0", "1", "2"):
            np.testing.assert_array_equal(np.asarray(result[layer]), np.asarray(single[layer]))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("ts, shape", [(T.rotations(5), (3, 7, 10)), (T.c4(), (2, 6, 6)), (T.flips(), (2, 6, 6)),
                                   (T.cyclic_shifts([(0, 0), (2, 1), (-3, 4)], 8), (2, 8, 8))],
                         ids=["rot5", "c4", "flips", "shifts"])
def test_moved_maps_inside_the_distance_kernel_give_the_stored_maps_numbers(monkeypatch, ts, shape, normalize):
    # DSES's kernel that moves F(x_i)'s maps as it reads the block: bit for bit the kernel on the
    # stored t_j F(x_i) (the same float32 values, the same sums), for warped and exact sets.
    from tmlib import warp_kernels
    from tmlib.measures.moments import numba_available
    from tmlib.measures.se_kernels import map_distance_sums, warped_distance_sums

    if not numba_available():
        pytest.skip("numba not installed: only the torch ops run")
    g = torch.Generator().manual_seed(6)
    identity = ts.identity_index()
    y = torch.randn(4, len(ts), *shape, generator=g)
    y[0, :, 1] = 0.0  # an all-zero map (stays zero when normalised)
    y[1, :, 0] = y[1, identity, 0]  # a map the same under every transformation
    monkeypatch.setattr(warp_kernels, "_ARITHMETIC", None)  # as in a new process: no warp checked yet
    moved = warped_distance_sums(y, identity, ts, normalize)
    stored = map_distance_sums(y, ts.apply(y[:, identity], contiguous=False), normalize, fused=True)
    assert moved is not None and moved.shape == (shape[0],) and torch.equal(moved, stored)
    assert warped_distance_sums(y.double(), identity, ts, normalize) is None  # float64: the stored path
