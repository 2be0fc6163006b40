import math

import numpy as np
import pytest
import torch

from tmlib import transforms as T


def test_degrees_converted_once():
    assert T.degrees_to_radians(180) == pytest.approx(math.pi)
    r = T.rotation_matrix(30)
    assert r[0, 0].item() == pytest.approx(math.cos(math.pi / 6))


def test_rotation_90_equals_rot90_and_c4():
    x = torch.randn(3, 2, 8, 8)
    r = T.rotations(4).apply(x)
    assert r.shape == (3, 4, 2, 8, 8)
    assert torch.allclose(r[:, 0], x)
    for k in range(4):
        assert torch.allclose(r[:, k], torch.rot90(x, k, dims=(2, 3)), atol=1e-5)
        assert torch.equal(T.c4().apply(x)[:, k], torch.rot90(x, k, dims=(2, 3)))


def test_paper_sets_sizes_and_parameters():
    assert [len(T.paper_set(n)) for n in T.PAPER_SETS] == [25, 25, 25, 504]
    rot = T.paper_set("rotation")
    assert [p["degrees"] for p in rot.parameters][:3] == pytest.approx([0, 14.4, 28.8])
    sc = T.paper_set("scale")
    factors = {(p["sx"], p["sy"]) for p in sc.parameters}
    assert (1.0, 1.0) in factors and (0.5, 0.5) in factors and (1.25, 1.0) in factors
    assert min(min(f) for f in factors) == 0.5 and max(max(f) for f in factors) == 1.25
    tr = T.paper_set("translation")
    shifts = sorted({round(max(abs(p["tx"]), abs(p["ty"])), 6) for p in tr.parameters})
    assert shifts == [0.0, 0.05, 0.1, 0.15]
    with pytest.raises(ValueError, match="name"):
        T.paper_set("shear")


def test_translation_moves_content_by_fraction_of_size():
    x = torch.zeros(1, 1, 20, 20)
    x[0, 0, 10, 5] = 1.0
    y = T.TransformationSet(T.translation_matrix(0.1, 0.0)[None]).apply(x)[0, 0, 0]
    assert y[10, 7].item() == pytest.approx(1.0, abs=1e-5)  # 0.1 × 20 px = 2 px to the right


def test_scale_about_centre():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0  # centre pixel stays where it is under any scaling
    y = T.scales([2.0]).apply(x)[0, 0, 0]
    assert y[4, 4].item() == pytest.approx(1.0, abs=1e-5)


def test_inverse_is_exact_for_combined():
    ts = T.combined()
    prod = ts.inverse().matrices @ ts.matrices
    assert torch.allclose(prod, torch.eye(3, dtype=torch.float64).expand_as(prod), atol=1e-12)


@pytest.mark.parametrize("ts", [T.c4(), T.d4(), T.flips(), T.cyclic_shifts([(0, 0), (1, 2), (-3, 1)], 8),
                                T.ExactTransformationSet([(1, True, 2, -1), (3, False, 1, 1)], "mixed", 8)])
def test_exact_groups_invert_exactly(ts):
    x = torch.randn(2, 3, 8, 8)
    back = ts.inverse().apply_each(ts.apply(x))
    assert torch.equal(back, x.unsqueeze(1).expand_as(back))


def test_exact_matrices_agree_with_warp():
    x = torch.randn(2, 1, 8, 8)
    for ts in (T.c4(), T.d4(), T.flips()):
        warped = T.TransformationSet(ts.matrices).apply(x)
        assert torch.allclose(warped, ts.apply(x), atol=1e-5)


def test_fill_value_outside_image():
    x = torch.full((1, 1, 8, 8), -0.42)
    y = T.rotations(8).apply(x, fill=-0.42)
    assert torch.allclose(y, torch.full_like(y, -0.42), atol=1e-6)
    z = T.rotations(8).apply(x)  # zero fill paints a frame
    assert (z - (-0.42)).abs().max() > 0.1


def test_apply_indexed_matches_apply():
    x = torch.randn(5, 1, 8, 8)
    ts = T.rotations(6)
    idx = torch.tensor([0, 5, 2, 2, 1])
    full = ts.apply(x)
    assert torch.allclose(ts.apply_indexed(x, idx), full[torch.arange(5), idx], atol=1e-6)
    assert torch.equal(T.c4().apply_indexed(x, idx % 4), T.c4().apply(x)[torch.arange(5), idx % 4])


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"\[b, C, H, W\]"):
        T.rotations(4).apply(torch.randn(8, 8))
    with pytest.raises(TypeError, match="floating"):
        T.rotations(4).apply(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="n must"):
        T.rotations(0)
    with pytest.raises(ValueError, match="fill"):
        T.rotations(2).apply(torch.randn(1, 3, 4, 4), fill=[0.0, 1.0])
    with pytest.raises(ValueError, match="invertible"):
        T.TransformationSet(torch.zeros(1, 3, 3) + torch.tensor([0, 0, 1.0]).view(1, 3))
    with pytest.raises(ValueError, match="square"):
        T.c4().apply(torch.randn(1, 1, 4, 6))


def test_cyclic_shifts_scale_to_feature_maps():
    ts = T.cyclic_shifts([(0, 0), (2, 0), (4, 4)], 8)
    x = torch.randn(2, 1, 8, 8)
    pooled = torch.nn.functional.avg_pool2d(ts.apply(x).flatten(0, 1), 2).reshape(2, 3, 1, 4, 4)
    # avg pooling is exactly shift-equivariant: pool(roll(x, 2)) = roll(pool(x), 1)
    assert torch.allclose(ts.inverse().apply_each(pooled), pooled[:, :1].expand_as(pooled), atol=1e-6)
    with pytest.raises(ValueError, match="not whole pixels"):
        T.cyclic_shifts([(1, 0)], 8).apply(torch.randn(1, 1, 4, 4))


@pytest.mark.parametrize("fill", [0.0, -0.42, [0.5, -1.0, 2.0]])
def test_shared_grids_give_the_pairwise_warps_bit_for_bit(fill):
    # TransformationSet.apply builds m grids for b images (warp_all); warping each (image, matrix)
    # pair on its own is the reference.
    from tmlib.warps import warp, warp_all

    x = torch.randn(5, 3, 11, 11, generator=torch.Generator().manual_seed(7))
    hard = T.combined(rotation=T.rotations(4), scale=T.scales(n_down=1, n_up=1), translation=T.translations())
    for mats in (T.rotations(25).matrices, hard.matrices[::7]):
        pairs = torch.stack([torch.stack([warp(x[i : i + 1], mats[j], fill)[0] for j in range(len(mats))])
                             for i in range(len(x))])
        assert torch.equal(warp_all(x, mats, fill), pairs)
    assert torch.equal(T.rotations(25).apply(x, fill=fill), warp_all(x, T.rotations(25).matrices, fill))
    with pytest.raises(ValueError, match=r"matrices must have shape \[m, 3, 3\]"):
        warp_all(x, torch.eye(3), fill)


@pytest.mark.parametrize("fill", [0.0, -0.42, [0.5, -1.0, 2.0]])
def test_the_sampling_tables_give_grid_samples_numbers_bit_for_bit(fill, monkeypatch):
    # On the CPU the shared-grid warps (warp_all, warp_each) gather from tables built once per set
    # and size (tmlib.warp_kernels); they must be what grid_sample gives, bit for bit, and they must
    # actually run here (the test would otherwise compare grid_sample with itself).
    from tmlib import warp_kernels
    from tmlib.warps import warp, warp_all, warp_each

    assert warp_kernels.available(torch.zeros(1, 1, 2, 2))  # its check on a test warp, before the spy
    calls = []
    real = warp_kernels.warp_planes
    monkeypatch.setattr(warp_kernels, "warp_planes", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    gen = torch.Generator().manual_seed(3)
    hard = T.combined(rotation=T.rotations(4), scale=T.scales(n_down=1, n_up=1), translation=T.translations())
    # Content moved off the map by whole and fractional pixels on every side (pixels with one, two
    # or all four neighbours outside), and shrunk to a few pixels.
    far = torch.eye(3, dtype=torch.float64).repeat(6, 1, 1)
    far[:, :2, 2] = torch.tensor([[0.31, 0.0], [-0.55, 0.13], [0.05, 1.7], [-1.93, -0.4], [2.2, -2.1], [0.0, 0.0]])
    far[5, 0, 0] = far[5, 1, 1] = 0.2
    cases = ((T.rotations(25).matrices, (28, 28)), (hard.matrices[::5], (9, 14)), (T.c4().matrices, (7, 7)),
             (far, (8, 11)))
    for mats, (h, w) in cases:
        x = torch.randn(4, 3, h, w, generator=gen)
        x[0, 1, h // 2, w // 3] = float("nan")  # non-finite values travel as grid_sample moves them
        x[2, 0, 1, 1] = float("inf")
        x[1, 2, 0, 0] = x[3, 1, h - 1, w - 1] = float("nan")  # at the corners, beside the zero border
        pairs = torch.stack([torch.stack([warp(x[i : i + 1], mats[j], fill)[0] for j in range(len(mats))])
                             for i in range(len(x))])
        got = warp_all(x, mats, fill)
        assert torch.equal(got.isnan(), pairs.isnan()) and (got.isnan().any() or mats is far)
        assert torch.equal(got.nan_to_num(), pairs.nan_to_num())
        y = torch.randn(2, len(mats), 3, h, w, generator=gen)
        each = torch.stack([torch.stack([warp(y[i, j : j + 1], mats[j], fill)[0] for j in range(len(mats))])
                            for i in range(len(y))])
        assert torch.equal(warp_each(y, mats, fill), each)
    assert warp_kernels.available(x) and len(calls) == 8
    # Where the tables cannot reproduce grid_sample (or for float64, grads, other devices), the warps
    # stay with grid_sample: the same numbers, by the reference path.
    assert not warp_kernels.available(x.double()) and not warp_kernels.available(x.requires_grad_())
    monkeypatch.setattr(warp_kernels, "_ARITHMETIC", None)  # restored after the test
    monkeypatch.setattr(warp_kernels, "_agrees", lambda fused: False)
    assert not warp_kernels.available(torch.zeros(1, 1, 2, 2))
    x = torch.randn(2, 3, 6, 6, generator=gen)
    assert torch.equal(warp_all(x, T.rotations(5).matrices, fill), torch.stack(
        [torch.stack([warp(x[i : i + 1], m, fill)[0] for m in T.rotations(5).matrices]) for i in range(2)]))
    assert len(calls) == 8
    with pytest.raises(ValueError, match=r"y must have shape \[b, m, C, H, W\] and matrices \[m, 3, 3\]"):
        warp_each(torch.zeros(2, 3, 1, 4, 4), T.rotations(4).matrices)


@pytest.mark.parametrize("fused", [True, False])
def test_the_weight_tables_are_the_corner_weights_of_the_sampling_tables(fused):
    # The moved-map kernels read the four weights from a table instead of forming them per pixel:
    # they must be the float32 products (1 − down)(1 − right), (1 − down)·right, down·(1 − right),
    # down·right of the sampling table, bit for bit (numpy's float32 arithmetic as the reference).
    from tmlib import warp_kernels

    if not warp_kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    mats = T.rotations(7).matrices
    base, weights = warp_kernels.weight_table(mats, 9, 13, fused)
    want_base, right, down = warp_kernels.sampling_table(mats, 9, 13, fused)
    one = np.float32(1)
    want = np.stack([(one - down) * (one - right), (one - down) * right, down * (one - right), down * right])
    assert weights.dtype == np.float32 and weights.shape == (4, 7, 9 * 13)
    assert np.array_equal(base, want_base) and np.array_equal(weights, want)
    assert warp_kernels.weight_table(mats, 9, 13, fused)[1] is weights  # built once a session
