"""tmlib.lie: tangents, Lie derivatives by JVP, LEE and LieGG, checked against numbers."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tmlib import lie, transforms

S = 48
_C = (2 * torch.arange(S, dtype=torch.float64) + 1) / S - 1  # pixel centres, normalised
Y, X = torch.meshgrid(_C, _C, indexing="ij")


def blob(cx=0.2, cy=-0.15, sigma=0.15, size=32):
    c = (2 * torch.arange(size, dtype=torch.float64) + 1) / size - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))[None, None]


def blobs(n, seed=0):
    """n smooth images: sums of Gaussian blobs of random sign, far from the borders."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, 1, S, S, dtype=torch.float64)
    for i in range(n):
        for _ in range(4):
            cx, cy = (torch.rand(2, generator=g, dtype=torch.float64) - 0.5)
            sigma = 0.08 + 0.08 * torch.rand(1, generator=g, dtype=torch.float64)
            a = torch.randn(1, generator=g, dtype=torch.float64)
            out[i, 0] += a * torch.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * sigma**2))
    return out


class RadialEnergy(nn.Module):
    """f(x) = Σ_u w(|u|) x(u)²: exactly rotation invariant (in the continuum)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.exp(-(X**2 + Y**2) / (2 * 0.35**2)))

    def forward(self, x):
        return (self.w * x**2).sum(dim=(1, 2, 3))[:, None]


class RowEnergy(nn.Module):
    """f(x) = Σ_u g(y) x(u)²: invariant to x-shear (x → x + s·y keeps y, shifts within rows)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("g", (1 + torch.tanh(3 * Y)) * torch.exp(-(Y**2) / (2 * 0.4**2)))

    def forward(self, x):
        return (self.g * x**2).sum(dim=(1, 2, 3))[:, None]


# ------------------------------------------------------------------------------------ tangents


@pytest.mark.parametrize("name", list(lie.GENERATORS))
def test_tangent_is_the_derivative_of_the_warp(name):
    img = blob()
    eps = 1e-3
    h = lie.GENERATORS[name]
    fd = (transforms.warp(img, torch.linalg.matrix_exp(eps * h)) - transforms.warp(img, torch.linalg.matrix_exp(-eps * h))) / (2 * eps)
    v = lie.tangent(img, name)
    assert float((fd - v).norm() / v.norm()) < 2e-2


@pytest.mark.parametrize("name", list(lie.GENERATORS))
def test_tangent_matches_the_continuous_derivative(name):
    # -∇x·(h u) of the analytic Gaussian, at the pixel centres: discretisation error only.
    size, cx, cy, sigma = 64, 0.2, -0.15, 0.25  # σ = 8 pixels: central differences err by ~h²/6σ²
    img = blob(cx, cy, sigma, size)
    c = (2 * torch.arange(size, dtype=torch.float64) + 1) / size - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    gx, gy = -(xx - cx) / sigma**2 * img[0, 0], -(yy - cy) / sigma**2 * img[0, 0]
    h = lie.GENERATORS[name]
    vx, vy = h[0, 0] * xx + h[0, 1] * yy + h[0, 2], h[1, 0] * xx + h[1, 1] * yy + h[1, 2]
    exact = -(gx * vx + gy * vy)
    v = lie.tangent(img, name)[0, 0]
    assert float((v - exact).norm() / exact.norm()) < 2e-2


def test_rotation_tangent_sign_matches_tmlib_rotations():
    img = blob()
    eps_deg = 0.05
    fd = (transforms.warp(img, transforms.rotation_matrix(eps_deg)) - transforms.warp(img, transforms.rotation_matrix(-eps_deg)))
    fd = fd / (2 * math.radians(eps_deg))
    v = lie.tangent(img, "rotation")
    assert float((fd - v).norm() / v.norm()) < 2e-2
    assert float((fd + v).norm() / v.norm()) > 1.9  # the opposite sign is far off
    # The one-parameter group of the generator is tmlib's rotation, in radians.
    exp = torch.linalg.matrix_exp(0.3 * lie.GENERATORS["rotation"])
    assert torch.allclose(exp, transforms.rotation_matrix(math.degrees(0.3)), atol=1e-12)
    # Translations: parameter t = 2·tx of tmlib's translation_matrix.
    fd = (transforms.warp(img, transforms.translation_matrix(1e-3, 0)) - transforms.warp(img, transforms.translation_matrix(-1e-3, 0))) / 4e-3
    v = lie.tangent(img, "translation_x")
    assert float((fd - v).norm() / v.norm()) < 2e-2


def test_stretch_is_identity_at_zero_and_generators_are_exact():
    assert torch.equal(torch.linalg.matrix_exp(0 * lie.GENERATORS["stretch"]), torch.eye(3, dtype=torch.float64))
    assert torch.equal(lie.generator_matrix("shear_x")[:2, :2], torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(lie.generator_matrix([[1, 2], [3, 4]])[:2, :2], torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))


# ------------------------------------------------------------------------------------ JVP


def test_jvp_matches_finite_difference_along_the_tangent(small_cnn):
    torch.manual_seed(1)
    model = small_cnn.double()
    x = torch.nn.functional.avg_pool2d(torch.randn(3, 1, 10, 10, dtype=torch.float64), 3, 1, 1)[..., 1:9, 1:9]
    for name in ("rotation", "scale", "translation_y"):
        v = lie.tangent(x, name)
        ld = lie.lie_derivative(model, x, name)
        eps = 1e-6
        with torch.no_grad():
            fd = (model(x + eps * v) - model(x - eps * v)) / (2 * eps)
        assert ld.shape == (3, 5)
        assert float((ld - fd).norm() / fd.norm()) < 1e-3
    # A hidden layer by name, captured under the JVP by a hook (ReLU(inplace=True) included).
    hidden = lie.lie_derivative(model, x, "rotation", layer="4")
    v = lie.tangent(x, "rotation")
    with torch.no_grad():
        fd = (model[:5](x + eps * v) - model[:5](x - eps * v)) / (2 * eps)
    assert hidden.shape == (3, 6, 4, 4)
    assert float((hidden - fd).norm() / fd.norm()) < 1e-3


def test_lee_layers_in_one_run_agree_with_single_layers(small_cnn):
    torch.manual_seed(0)
    x = torch.randn(5, 1, 8, 8)
    df = lie.lie_equivariance_error(small_cnn, x, generators=["rotation", "shear_x"], layers=["1", "4", "output"],
                                    batch_size=2, progress=False)
    assert list(df.layer) == ["1", "1", "4", "4", "output", "output"]
    assert set(df.n) == {5} and (df.normalisation == lie.LEE_NORMALISATION).all()
    for layer in ("1", "output"):
        ld = lie.lie_derivative(small_cnn, x, "shear_x", layer=None if layer == "output" else layer)
        expected = float((ld.double() ** 2).flatten(1).mean(1).mean())
        got = float(df[(df.layer == layer) & (df.generator == "shear_x")].value.iloc[0])
        assert got == pytest.approx(expected, rel=1e-5)
    # Default layers: layer_names() of a tmlib model.
    from tmlib import models

    net = models.SimpleConv(filters=2, fc_units=8).eval()
    df = lie.lie_equivariance_error(net, torch.randn(2, 1, 28, 28), generators="rotation", progress=False)
    assert list(df.layer) == net.layer_names()


def test_equivariant_lee_is_zero_for_an_equivariant_layer():
    # A pointwise map commutes with every warp: its equivariant LEE is 0, its invariant one is not.
    x = blobs(3)
    model = nn.Sequential(nn.Tanh())
    inv = lie.lie_equivariance_error(model, x, generators=["rotation", "scale"], layers=["0"], progress=False)
    eq = lie.lie_equivariance_error(model, x, generators=["rotation", "scale"], layers=["0"], equivariant=True,
                                    progress=False)
    # Not exactly 0: the discrete chain rule of central differences holds up to O(pixel²).
    assert (inv.value > 1e-2).all() and (eq.kind == "equivariance").all()
    assert (eq.value.to_numpy() < 1e-2 * inv.value.to_numpy()).all(), (eq.value, inv.value)


# ------------------------------------------------------------------------------------ invariant functions


def test_rotation_invariant_function():
    x = blobs(16)
    df = lie.lie_equivariance_error(RadialEnergy(), x, progress=False).set_index("generator").value
    assert df["rotation"] < 1e-3 * df["shear_x"]
    assert df["rotation"] < 1e-3 * df["scale"]
    result = lie.liegg(RadialEnergy(), x, batch_size=5, progress=False)
    h = result.generators[0]
    expected = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64) / math.sqrt(2)
    assert min(float((h - expected).norm()), float((h + expected).norm())) < 1e-2
    assert float(result.symmetry_bias[0]) < 0.01
    assert result.symmetry_variance[0] < 1e-3 * result.symmetry_variance[1]
    assert torch.all(result.symmetry_variance[1:] >= result.symmetry_variance[:-1])
    assert result.gram.shape == (4, 4) and result.gram.dtype == torch.float64 and result.n == 16
    # cᵀGc is the LEE along Σ c_k E_k: the diagonal is the LEE of the basis, E12 = shear_x.
    assert float(result.gram[1, 1]) == pytest.approx(float(df["shear_x"]), rel=1e-6)
    c = torch.tensor([0.0, 1.0, -1.0, 0.0], dtype=torch.float64)
    assert float(c @ result.gram @ c) == pytest.approx(float(df["rotation"]), rel=1e-4, abs=1e-12)


def test_x_shear_invariant_function():
    x = blobs(16, seed=1)
    result = lie.liegg(RowEnergy(), x, progress=False)
    h = result.generators[0]
    expected = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    assert float((h - expected).norm()) < 1e-2  # sign fixed: largest entry positive
    assert result.symmetry_variance[0] < 1e-6 * result.symmetry_variance[1]
    assert float(result.symmetry_bias[0]) == pytest.approx(1 / math.sqrt(2), abs=1e-2)
    # With the translations in the basis, the x-translation is a second symmetry.
    result = lie.liegg(RowEnergy(), x, translations=True, progress=False)
    assert result.gram.shape == (6, 6) and result.generators.shape == (6, 2, 3)
    assert result.symmetry_variance[1] < 1e-6 * result.symmetry_variance[2]


def test_multi_output_head_stacks_units():
    # Two outputs with different symmetries: stacked exactly, the joint symmetry is neither.
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = RadialEnergy(), RowEnergy()

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], dim=1)

    x = blobs(8)
    joint = lie.liegg(Both(), x, progress=False)
    a = lie.liegg(RadialEnergy(), x, progress=False)
    b = lie.liegg(RowEnergy(), x, progress=False)
    assert joint.units == 2
    assert torch.allclose(joint.gram, (a.gram + b.gram) / 2, rtol=1e-10)
    # Per-unit LieGG of a layer by name.
    only_a = lie.liegg(Both(), x, layer="a", progress=False)
    assert torch.allclose(only_a.gram, a.gram, rtol=1e-10)


def test_warp_by_generator():
    img = blob(size=28)[0].float()
    out = lie.warp_by_generator(img, "rotation", [0.0, math.pi / 2])
    assert out.shape == (2, 1, 28, 28)
    assert torch.allclose(out[0], img[None][0], atol=1e-6)
    assert torch.allclose(out[1], torch.rot90(img, 1, dims=(1, 2)), atol=1e-5)
    result = lie.liegg(RadialEnergy(), blobs(6), progress=False)
    assert result.warp_by_generator(blobs(1)[0], [0.1, 0.2]).shape == (2, 1, S, S)
    assert list(result.to_frame().columns[:4]) == ["rank", "layer", "symmetry_variance", "symmetry_bias"]


# ------------------------------------------------------------------------------------ training


def test_rotation_augmentation_lowers_rotation_lee():
    from tmlib import data

    path_ok, _ = data.available("mnist", "data")
    if not path_ok:
        pytest.skip("MNIST not present in data/")
    train_set = data.load("mnist", "train", n=1000, root="data")
    x, _ = data.load("mnist", "test", n=64, root="data").tensors()
    values = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster than two contending ones
    try:
        values = _train_and_measure(train_set, x)
    finally:
        torch.set_num_threads(threads)
    # Scale-free (LEE / output variance): augmented < plain < untrained; absolute: augmented < plain.
    assert values["rotation"].relative < 0.5 * values["untrained"].relative
    assert values["rotation"].relative < 0.5 * values["plain"].relative
    assert values["rotation"].value < 0.5 * values["plain"].value


def _train_and_measure(train_set, x):
    from tmlib import models, train

    values = {}
    for name, augment, epochs in [("untrained", None, 0), ("plain", None, 3),
                                  ("rotation", transforms.rotations(360), 3)]:
        torch.manual_seed(0)
        model = models.SimpleConv(filters=4, fc_units=16)
        if epochs:
            train.train(model, train_set, augment=augment, epochs=epochs, seed=0, cache_dir=None, progress=False)
        df = lie.lie_equivariance_error(model.eval(), x, generators=["rotation"], layers=["output"],
                                        fill=train_set.fill, progress=False)
        values[name] = df.iloc[0]
    return values


# ------------------------------------------------------------------------------------ errors


def test_bad_input_errors(small_cnn):
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[b, C, H, W\]"):
        lie.tangent(torch.randn(1, 8, 8), "rotation")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lie.lie_derivative(small_cnn, [[1.0]], "rotation")
    with pytest.raises(ValueError, match="generator: unknown generator name 'spin'"):
        lie.lie_derivative(small_cnn, x, "spin")
    with pytest.raises(ValueError, match="generator must be"):
        lie.tangent(x, torch.zeros(4))
    with pytest.raises(ValueError, match="layer: .*unknown layer name 'nope'"):
        lie.lie_derivative(small_cnn, x, "rotation", layer="nope")
    with pytest.raises(ValueError, match="layers: .*unknown layer name 'nope'"):
        lie.lie_equivariance_error(small_cnn, x, layers=["1", "nope"], progress=False)
    with pytest.raises(ValueError, match="layer: .*unknown layer name"):
        lie.liegg(small_cnn, x, layer="fc9", progress=False)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[b, C, H, W\]"):
        lie.liegg(small_cnn, torch.randn(2, 64), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        lie.liegg(small_cnn, x, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="translations"):
        lie.liegg(small_cnn, x, translations="yes", progress=False)
    with pytest.raises(ValueError, match="fill"):
        lie.tangent(x, "rotation", fill=[0.0, 1.0, 2.0])


# ------------------------------------------------------------------------------------ jackknife, outputs


def test_lee_blocks_match_a_brute_force_jackknife(small_cnn):
    from tmlib.engine import block_bounds
    from tmlib.experiments import Jack

    torch.manual_seed(1)
    x = torch.randn(11, 1, 8, 8)
    layers, gens = ["1", "4", "output"], ["rotation", "scale"]
    full = lie.lee(small_cnn, x, generators=gens, layers=layers, batch_size=3, progress=False, blocks=4)
    plain = lie.lie_equivariance_error(small_cnn, x, generators=gens, layers=layers, batch_size=4, progress=False)
    for column in ("value", "sem", "variance", "relative"):  # blocks change nothing but add intervals
        assert np.allclose(full.frame[column], plain[column], rtol=1e-10)
    assert list(full.frame["index"]) == [0, 0, 1, 1, 2, 2] and list(full.frame["depth"]) == [0, 0, .5, .5, 1, 1]
    bounds = block_bounds(11, 4)
    for k in range(4):
        keep = torch.cat([x[:bounds[k]], x[bounds[k + 1]:]])
        left_out = lie.lie_equivariance_error(small_cnn, keep, generators=gens, layers=layers, progress=False)
        for g in gens:
            for quantity in ("value", "relative"):
                expected = left_out[left_out.generator == g].set_index("layer")[quantity]
                got = full.result(g, quantity).replicates.iloc[k]
                assert np.allclose(got[layers].to_numpy(), expected[layers].to_numpy(), rtol=1e-9)
    # The MeasureResult view: layer means are the frame's values; Jack and to_frame take it.
    result = full.result("rotation", "relative")
    rows = full.frame[full.frame.generator == "rotation"].set_index("layer")
    assert np.allclose(result.layer_means()[layers], rows.loc[layers, "relative"], rtol=1e-10)
    assert result["1"].shape == (4, 8, 8)  # per-unit values, shaped like the layer
    jack = Jack.of(result)
    assert np.allclose(jack.se().to_numpy(), rows.loc[layers, "relative_se"].to_numpy(), rtol=1e-10)
    curves = full.curves("rotation", "relative", label="model")
    assert {"layer", "index", "depth", "value", "low", "high", "label"} <= set(curves.columns)
    assert (curves["low"] <= curves["value"]).all() and (curves["value"] <= curves["high"]).all()
    with pytest.raises(ValueError, match="blocks"):
        lie.lee(small_cnn, x, generators="rotation", blocks=12, progress=False)
    with pytest.raises(ValueError, match="generator"):
        full.result("shear_x")


def test_liegg_blocks_match_a_brute_force_jackknife():
    from tmlib.engine import block_bounds

    x = blobs(9)
    model = RowEnergy()
    full = lie.liegg(model, x, batch_size=4, blocks=3, progress=False)
    plain = lie.liegg(model, x, batch_size=2, progress=False)
    assert torch.allclose(full.gram, plain.gram, rtol=1e-10)
    bounds = block_bounds(9, 3)
    reps = full.replicates()
    for k in range(3):
        keep = torch.cat([x[:bounds[k]], x[bounds[k + 1]:]])
        left_out = lie.liegg(model, keep, progress=False)
        assert torch.allclose(full.block_grams[k], left_out.gram, rtol=1e-9)
        assert reps["symmetry_variance"][k] == pytest.approx(float(left_out.symmetry_variance[0]), rel=1e-8)
        assert reps["symmetry_bias"][k] == pytest.approx(float(left_out.symmetry_bias[0]), rel=1e-6, abs=1e-9)
    summary = full.summary()
    assert summary["symmetry_variance"] == pytest.approx(float(full.symmetry_variance[0]))
    assert summary["relative_variance"] == pytest.approx(full.relative_variance)
    assert summary["symmetry_variance_low"] <= summary["symmetry_variance"] <= summary["symmetry_variance_high"]
    assert summary["h12"] == pytest.approx(float(full.generators[0, 0, 1])) and summary["n"] == 9
    assert "symmetry_bias_se" not in plain.summary() and plain.replicates() is None


def test_liegg_outputs_normalised_and_published_sum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(S * S, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = blobs(5)

    class Scaled(nn.Module):
        def forward(self, y):
            return 7.0 * net(y)

    def normalised(y):
        out = net(y)
        return out / out.norm(dim=1, keepdim=True)

    units = lie.liegg(net, x, progress=False)
    norm = lie.liegg(net, x, output="normalised", progress=False)
    assert torch.allclose(norm.gram, lie.liegg(normalised, x, progress=False).gram, rtol=1e-10)
    # Scale-free: multiplying the logits changes the raw Gram by 49, not the normalised one.
    assert torch.allclose(lie.liegg(Scaled(), x, progress=False).gram, 49 * units.gram, rtol=1e-10)
    assert torch.allclose(lie.liegg(Scaled(), x, output="normalised", progress=False).gram, norm.gram, rtol=1e-10)
    summed = lie.liegg(net, x, output="normalised-sum", progress=False)
    expected = lie.liegg(lambda y: normalised(y).sum(1, keepdim=True), x, progress=False)
    assert summed.units == 1 and torch.allclose(summed.gram, expected.gram, rtol=1e-10)
    assert summed.output == "normalised-sum" and norm.units == 3
    # The public code's units: per-pixel image gradients, (2/W)² of tmlib's per-normalised-unit ones.
    assert summed.pixel_scale == pytest.approx((2 / S) ** 2)
    assert summed.summary()["pixel_variance"] == pytest.approx(float(summed.symmetry_variance[0]) * (2 / S) ** 2)
    with pytest.raises(ValueError, match="output"):
        lie.liegg(net, x, output="sum", progress=False)


def test_rotation_invariant_function_recovers_rotation_with_every_output():
    # The L2-normalised output of a two-unit rotation-invariant head is rotation invariant too.
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = RadialEnergy(), RadialEnergy()
            self.b.w = self.b.w ** 2

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x) + 1.0], dim=1)

    for output in lie.LIEGG_OUTPUTS:
        result = lie.liegg(Two(), blobs(8), output=output, blocks=4, progress=False)
        summary = result.summary()
        assert summary["symmetry_bias"] < 0.01, (output, summary)
        assert summary["relative_variance"] < 1e-3, (output, summary)
        assert abs(abs(summary["h12"]) - 1 / math.sqrt(2)) < 0.01
