"""tmlib.fast_layers: MaxPool2d gives torch's numbers (values, gradients, tangents), ELU torch's
within 1 ulp (the correctly rounded expm1); their own kernels only where values alone are asked for."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tmlib import fast_layers, models
from tmlib.lie.derivative import jvp_many, layer_function


@pytest.fixture
def fast_calls(monkeypatch):
    """How many times the four-maxima path ran."""
    calls = []
    real = fast_layers.max_pool2x2

    def spy(x):
        calls.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr(fast_layers, "max_pool2x2", spy)
    return calls


def _awkward(shape, dtype):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    flat = x.view(-1)
    flat[::7] = float("nan")
    flat[3::11] = float("inf")
    flat[5::13] = -float("inf")
    flat[1::17] = 0.0
    flat[2::17] = -0.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 7, 9), (5, 6, 6), (1, 1, 2, 2)])
def test_the_four_maxima_give_torchs_values_nan_and_inf_included(shape, dtype, fast_calls):
    x = _awkward(shape, dtype)
    with torch.no_grad():
        got = fast_layers.MaxPool2d(2)(x)
    want = F.max_pool2d(x, 2)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert fast_calls == [shape]


def test_with_autograd_torchs_kernel_runs_and_the_gradient_is_torchs(fast_calls):
    x = _awkward((2, 3, 6, 6), torch.float64).nan_to_num().requires_grad_()
    y = x.detach().clone().requires_grad_()
    fast_layers.MaxPool2d(2)(x).square().sum().backward()
    nn.MaxPool2d(2)(y).square().sum().backward()
    assert torch.equal(x.grad, y.grad)
    assert fast_calls == []
    with torch.no_grad():  # an input that asks for no gradient under grad mode: values only
        fast_layers.MaxPool2d(2)(y.detach())
    assert len(fast_calls) == 1


def test_torch_func_and_the_forward_mode_tangents_see_torchs_max_pool2d(fast_calls):
    torch.manual_seed(0)
    model = models.SimpleConv(filters=4, fc_units=8).double().eval()
    reference = copy.deepcopy(model)
    for parent in reference.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, fast_layers.MaxPool2d):
                setattr(parent, name, nn.MaxPool2d(2))
    assert not any(isinstance(m, fast_layers.MaxPool2d) for m in reference.modules())
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    vs = torch.randn(2, *x.shape, dtype=torch.float64)
    layers = ["pool1", "pool3", "fc1"]
    with torch.no_grad():
        for method in ("tangents", "torch.func"):
            mine = jvp_many(layer_function(model, layers), x, vs, method=method)
            theirs = jvp_many(layer_function(reference, layers), x, vs, method=method)
            for a, b in zip([*mine[0], *mine[1]], [*theirs[0], *theirs[1]]):
                assert torch.equal(a, b), method
    assert fast_calls == []
    with torch.no_grad():  # and a plain forward takes the four maxima, with the same logits
        assert torch.equal(model(x), reference(x))
    assert len(fast_calls) == 2


@pytest.mark.parametrize("arguments", [dict(kernel_size=3), dict(kernel_size=2, stride=1),
                                       dict(kernel_size=2, padding=1), dict(kernel_size=2, ceil_mode=True),
                                       dict(kernel_size=2, dilation=2), dict(kernel_size=(2, 1))])
def test_any_other_window_takes_torchs_kernel(arguments, fast_calls):
    x = _awkward((2, 3, 9, 9), torch.float32).nan_to_num()
    with torch.no_grad():
        assert torch.equal(fast_layers.MaxPool2d(**arguments)(x), nn.MaxPool2d(**arguments)(x))
        out, indices = fast_layers.MaxPool2d(2, return_indices=True)(x)
        want, want_indices = nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(out, want) and torch.equal(indices, want_indices)
    assert fast_calls == []


def test_the_models_pool_with_it():
    for model in (models.SimpleConv(), models.VGG16D(base_filters=4, image_size=32)):
        pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
        assert pools and all(isinstance(m, fast_layers.MaxPool2d) for m in pools)


def test_without_torchs_private_checks_torchs_kernel_runs(monkeypatch, fast_calls):
    monkeypatch.setattr(fast_layers, "_LEVEL", None)  # as on a torch release without them
    x = _awkward((2, 3, 6, 6), torch.float32)
    with torch.no_grad():
        got = fast_layers.MaxPool2d(2)(x)
    assert torch.equal(got.nan_to_num(), F.max_pool2d(x, 2).nan_to_num()) and fast_calls == []


# ---------------------------------------------------------------------------------------- ELU


@pytest.fixture
def elu_calls(monkeypatch):
    """How many times tmlib's ELU kernel ran."""
    calls = []
    real = fast_layers.elu_float32

    def spy(x, alpha=1.0, out=None):
        calls.append(tuple(x.shape))
        return real(x, alpha, out=out)

    monkeypatch.setattr(fast_layers, "elu_float32", spy)
    return calls


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in units in the last place of float32 (same-signed values; −0 and +0 one apart)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def _negative_floats(n: int, seed: int = 0) -> torch.Tensor:
    """n float32 of random bit patterns with the sign bit set: every exponent equally likely,
    from −0 and subnormals to −inf and NaN."""
    bits = torch.randint(0x80000000, 0x100000000, (n,), dtype=torch.int64, generator=torch.Generator().manual_seed(seed))
    return torch.from_numpy(bits.numpy().astype("uint32").view("float32"))


@pytest.mark.skipif(not fast_layers.HAVE_NUMBA, reason="the kernel needs numba")
def test_elu_kernel_is_the_correctly_rounded_expm1_and_within_an_ulp_of_torch():
    x = _negative_floats(2_000_000)
    got = fast_layers.elu_float32(x)
    nan = x.isnan()
    assert torch.equal(got.isnan(), nan)
    x, got = x[~nan], got[~nan]
    # the brute force: expm1 in float64 (error ≈ 1e-16 relative), rounded once to float32
    assert torch.equal(got, torch.expm1(x.double()).float())
    theirs = F.elu(x)
    assert int(_ulps(got, theirs).max()) <= 1
    assert float((got != theirs).double().mean()) < 0.01
    # the positive half: the identity, bit for bit
    assert torch.equal(fast_layers.elu_float32(-x), F.elu(-x))


@pytest.mark.skipif(not fast_layers.HAVE_NUMBA, reason="the kernel needs numba")
def test_elu_kernel_edge_cases_signs_alpha_and_arguments():
    x = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), -1e-45, -1e-38, -1e-8, -0.5,
                      -17.32, -17.34, -17.5, -88.7, -104.0, -3e38, 3.0, 1e-45])
    for alpha in (1.0, 0.5, 2.0):
        got, want = fast_layers.elu_float32(x, alpha), F.elu(x, alpha)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.signbit(), want.signbit())  # −0 stays −0
        assert int(_ulps(got.nan_to_num(), want.nan_to_num()).max()) <= 1, alpha
    with pytest.raises(ValueError, match="x: a float32 CPU tensor"):
        fast_layers.elu_float32(x.double())
    with pytest.raises(ValueError, match="out: a float32 CPU tensor of x's shape"):
        fast_layers.elu_float32(x, out=torch.empty(3))
    # a strided `out` (written through a copy) is checked too, before anything is written
    strided = torch.zeros(2 * x.numel())[::2]
    assert not strided.is_contiguous()
    with pytest.raises(ValueError, match="out: a float32 CPU tensor of x's shape"):
        fast_layers.elu_float32(x, out=torch.zeros(2 * x.numel(), 2)[:, 0])
    with pytest.raises(ValueError, match="got torch.float64"):
        fast_layers.elu_float32(x, out=torch.zeros(x.numel(), 2, dtype=torch.float64)[:, 0])
    into = fast_layers.elu_float32(x, out=strided)
    assert into is strided and torch.equal(into.isnan(), F.elu(x).isnan())


@pytest.mark.skipif(not fast_layers.HAVE_NUMBA, reason="the kernel needs numba")
def test_elu_takes_the_kernel_for_every_float32_tensor_where_values_alone_are_asked(elu_calls):
    big = torch.randn(4, 16, 32, 32)
    with torch.no_grad():
        for x in (big, big[:1, :1, :2, :3], big.transpose(-1, -2), big.to(memory_format=torch.channels_last)):
            got = fast_layers.ELU()(x)
            assert got.shape == x.shape and int(_ulps(got, F.elu(x)).max()) <= 1
            # elementwise: a value does not depend on the tensor it is in (the batch size)
            assert torch.equal(got[:1], fast_layers.ELU()(x[:1]))
        inplace = big.clone()
        assert fast_layers.ELU(inplace=True)(inplace) is inplace
        assert torch.equal(inplace, fast_layers.ELU()(big))
        strided = big.clone().transpose(-1, -2)
        assert fast_layers.ELU(inplace=True)(strided) is strided
        assert torch.equal(strided, fast_layers.ELU()(big.transpose(-1, -2)))
        calls = len(elu_calls)
        assert calls == 4 * 2 + 2 + 2
        assert torch.equal(fast_layers.ELU()(big.double()), F.elu(big.double()))  # float64: torch's
    assert len(elu_calls) == calls
    x = big.clone().requires_grad_()
    y = big.clone().requires_grad_()
    fast_layers.ELU()(x).square().sum().backward()  # autograd: torch's kernel and gradient
    nn.ELU()(y).square().sum().backward()
    assert torch.equal(x.grad, y.grad) and len(elu_calls) == calls


@pytest.mark.skipif(not fast_layers.HAVE_NUMBA, reason="the kernel needs numba")
def test_the_models_elu_is_it_and_tangents_see_torchs_elu(elu_calls):
    torch.manual_seed(0)
    model = models.SimpleConv(filters=8, fc_units=8).eval()
    acts = [m for m in model.modules() if isinstance(m, nn.ELU)]
    assert acts and all(isinstance(m, fast_layers.ELU) for m in acts)
    reference = copy.deepcopy(model)
    for parent in reference.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, fast_layers.ELU):
                setattr(parent, name, nn.ELU())
    x = torch.randn(8, 1, 28, 28)
    vs = torch.randn(2, *x.shape)
    with torch.no_grad():
        for method in ("tangents", "torch.func"):
            mine = jvp_many(layer_function(model, ["act0", "fc1"]), x, vs, method=method)
            theirs = jvp_many(layer_function(reference, ["act0", "fc1"]), x, vs, method=method)
            for a, b in zip([*mine[0], *mine[1]], [*theirs[0], *theirs[1]]):
                assert torch.equal(a, b), method
        assert elu_calls == []
        logits, want = model(x), reference(x)  # a plain forward: the kernel, logits within float noise
    assert len(elu_calls) >= 2
    assert torch.allclose(logits, want, rtol=1e-5, atol=1e-6)
