"""tmlib.pooling.MaxPool2d: torch's numbers (values, gradients, tangents), its own kernel only where
values alone are asked for."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tmlib import models, pooling
from tmlib.lie.derivative import jvp_many, layer_function


@pytest.fixture
def fast_calls(monkeypatch):
    """How many times the four-maxima path ran."""
    calls = []
    real = pooling.max_pool2x2

    def spy(x):
        calls.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr(pooling, "max_pool2x2", spy)
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
        got = pooling.MaxPool2d(2)(x)
    want = F.max_pool2d(x, 2)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert fast_calls == [shape]


def test_with_autograd_torchs_kernel_runs_and_the_gradient_is_torchs(fast_calls):
    x = _awkward((2, 3, 6, 6), torch.float64).nan_to_num().requires_grad_()
    y = x.detach().clone().requires_grad_()
    pooling.MaxPool2d(2)(x).square().sum().backward()
    nn.MaxPool2d(2)(y).square().sum().backward()
    assert torch.equal(x.grad, y.grad)
    assert fast_calls == []
    with torch.no_grad():  # an input that asks for no gradient under grad mode: values only
        pooling.MaxPool2d(2)(y.detach())
    assert len(fast_calls) == 1


def test_torch_func_and_the_forward_mode_tangents_see_torchs_max_pool2d(fast_calls):
    torch.manual_seed(0)
    model = models.SimpleConv(filters=4, fc_units=8).double().eval()
    reference = copy.deepcopy(model)
    for parent in reference.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, pooling.MaxPool2d):
                setattr(parent, name, nn.MaxPool2d(2))
    assert not any(isinstance(m, pooling.MaxPool2d) for m in reference.modules())
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
        assert torch.equal(pooling.MaxPool2d(**arguments)(x), nn.MaxPool2d(**arguments)(x))
        out, indices = pooling.MaxPool2d(2, return_indices=True)(x)
        want, want_indices = nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(out, want) and torch.equal(indices, want_indices)
    assert fast_calls == []


def test_the_models_pool_with_it():
    for model in (models.SimpleConv(), models.VGG16D(base_filters=4, image_size=32)):
        pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
        assert pools and all(isinstance(m, pooling.MaxPool2d) for m in pools)


def test_without_torchs_private_checks_torchs_kernel_runs(monkeypatch, fast_calls):
    monkeypatch.setattr(pooling, "_LEVEL", None)  # as on a torch release without them
    x = _awkward((2, 3, 6, 6), torch.float32)
    with torch.no_grad():
        got = pooling.MaxPool2d(2)(x)
    assert torch.equal(got.nan_to_num(), F.max_pool2d(x, 2).nan_to_num()) and fast_calls == []
