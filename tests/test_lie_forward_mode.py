"""tmlib.lie.forward_mode: the tangents propagated beside one forward equal torch.func's JVPs, and a
forward it has no rule for goes to torch.func."""

import pytest
import torch
from torch import nn

from tmlib import lie, models
from tmlib.lie import forward_mode
from tmlib.lie.derivative import jvp_many, layer_function

K = 3


def both(model, layers, x, seed=0):
    """(tangents path, torch.func path) of every layer: ((primal, jv), (primal, jv))."""
    vs = torch.randn(K, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        mine = jvp_many(layer_function(model, layers), x, vs, method="tangents")
        theirs = jvp_many(layer_function(model, layers), x, vs, method="torch.func")
    return mine, theirs


def assert_same(mine, theirs, rel=1e-5):
    for (p, q) in zip(mine[0], theirs[0]):
        assert torch.equal(p, q)  # the same forward
    for layer, (a, b) in enumerate(zip(mine[1], theirs[1])):
        assert a.shape == b.shape == (K, *mine[0][layer].shape)
        scale = float(b.abs().max())
        assert float((a - b).abs().max()) <= rel * max(scale, 1e-30), f"layer {layer}"


MODELS = {
    "SimpleConv elu": lambda: models.SimpleConv(filters=4, fc_units=8),
    "SimpleConv relu, batch norm, strided": lambda: models.SimpleConv(
        filters=4, fc_units=8, activation="relu", batch_norm=True, pooling="strided"),
    "SimpleConv prelu": lambda: models.SimpleConv(filters=4, fc_units=8, activation="prelu"),
    "SimpleConv silu": lambda: models.SimpleConv(filters=4, fc_units=8, activation="silu"),
    "SimpleConv tanh": lambda: models.SimpleConv(filters=4, fc_units=8, activation="tanh"),
    "AllConvolutional": lambda: models.AllConvolutional(),
    "ResNet": lambda: models.ResNet(),
    "MLP": lambda: models.MLP(),
    "TIPooling": lambda: models.TIPooling(filters=4, fc_units=8),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_of_every_model_equals_torch_func(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):  # running statistics that are not 0/1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
    size, channels = model.config["image_size"], model.config["in_channels"]
    x = torch.randn(2, channels, size, size)
    assert_same(*both(model, model.layer_names() + ["output"], x))


class Functions(nn.Module):
    """The rules a plain Sequential does not reach: joins, reductions, norms, products and
    quotients of two input-dependent tensors, constants made from the input, matmul, rot90."""

    def __init__(self):
        super().__init__()
        self.register_buffer("m", torch.randn(6, 6, generator=torch.Generator().manual_seed(3)))

    def forward(self, x):
        y = torch.cat([x, 2 * x, torch.ones_like(x)], 1)
        z = torch.stack([y, y * y, torch.rot90(y, 1, (2, 3))], 1).sum(1)
        z = self.m @ z @ self.m.T - z / (1 + z * z)
        u = z.flatten(1)
        u = u / u.norm(dim=1, keepdim=True)
        pooled = nn.functional.adaptive_avg_pool2d(nn.functional.leaky_relu(z, 0.1), 2).flatten(1)
        return torch.cat([(u - 1).amax(1, keepdim=True), u.mean(1, keepdim=True),
                          torch.sigmoid(u).sum(-1, keepdim=True) / 3, pooled.detach() + pooled], 1)


def test_joins_reductions_products_and_quotients_equal_torch_func():
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    assert_same(*both(Functions().double(), ["output"], x), rel=1e-12)


def test_in_place_activations_and_hidden_layers_equal_torch_func(small_cnn):
    # small_cnn's ReLU(inplace=True) overwrites conv 3's output: both paths see it overwritten
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    assert_same(*both(small_cnn.double(), ["0", "3", "4", "output"], x), rel=1e-12)


class Unknown(nn.Module):
    def forward(self, x):
        return torch.sort(x.flatten(1), dim=1).values[:, -3:]  # no rule for sort


class SharedMemory(nn.Module):
    """An in-place op on a view: the tensor it is a view of changes too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.flat = nn.Flatten()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.flat(self.conv(x)))


@pytest.mark.parametrize("model, layers", [(Unknown(), ["output"]), (SharedMemory(), ["conv", "output"]),
                                           (nn.Sequential(nn.Flatten(), nn.Dropout(0.5)).train(), ["output"]),
                                           (nn.Sequential(nn.BatchNorm2d(1, track_running_stats=False)).eval(), ["output"])])
def test_a_forward_without_rules_goes_to_torch_func(model, layers):
    x = torch.randn(4, 1, 6, 6)
    vs = torch.randn(K, *x.shape)
    fn = layer_function(model, layers)
    with pytest.raises(forward_mode.Unsupported), torch.no_grad():
        jvp_many(fn, x, vs, method="tangents")
    torch.manual_seed(0)
    with torch.no_grad():
        auto = jvp_many(fn, x, vs)  # "auto": torch.func, and remembered for this function
    torch.manual_seed(0)
    with torch.no_grad():
        reference = jvp_many(fn, x, vs, method="torch.func")
    if not any(isinstance(m, nn.Dropout) for m in model.modules()):  # dropout's mask is random
        assert_same(auto, reference, rel=0)
    spent = []
    original = forward_mode.jvp_tangents
    try:
        forward_mode.jvp_tangents = lambda *a: spent.append(1) or original(*a)
        with torch.no_grad():
            jvp_many(fn, x, vs)
    finally:
        forward_mode.jvp_tangents = original
    assert not spent


class ExpInPlace(nn.Module):
    def forward(self, x):
        return x.exp_().flatten(1)  # no rule for exp_: refused before it runs


def test_an_in_place_op_without_a_rule_is_refused_before_it_changes_the_input():
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    vs = torch.randn(K, *x0.shape, dtype=torch.float64)
    x, reference_x = x0.clone(), x0.clone()
    with torch.no_grad():
        auto = jvp_many(layer_function(ExpInPlace(), ["output"]), x, vs)
        reference = jvp_many(layer_function(ExpInPlace(), ["output"]), reference_x, vs, method="torch.func")
    assert torch.equal(x, reference_x) and torch.equal(x, x0.exp())  # the model's own change, once
    assert_same(auto, reference, rel=0)


def test_lee_and_liegg_are_the_same_by_either_method(small_cnn):
    torch.manual_seed(0)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    model = small_cnn.double()
    frames = [lie.lie_equivariance_error(model, x, ["rotation", "scale"], layers=["3", "output"], batch_size=4,
                                         progress=False, jvp=jvp) for jvp in ("tangents", "torch.func")]
    assert frames[0]["value"].to_numpy() == pytest.approx(frames[1]["value"].to_numpy(), rel=1e-12)
    grams = [lie.liegg(model, x, batch_size=4, progress=False, jvp=jvp).gram for jvp in ("tangents", "torch.func")]
    assert torch.allclose(grams[0], grams[1], rtol=1e-12, atol=0)
    derivative = [lie.lie_derivative(model, x, "rotation", layer="4", jvp=jvp) for jvp in ("tangents", "torch.func")]
    assert torch.allclose(derivative[0], derivative[1], rtol=1e-12, atol=1e-15)


def test_bad_jvp_method_is_a_clear_error(small_cnn):
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"jvp must be one of \('auto', 'tangents', 'torch.func'\), got 'fast'"):
        lie.lie_equivariance_error(small_cnn, x, progress=False, jvp="fast")
    with pytest.raises(ValueError, match="jvp must be one of"):
        lie.liegg(small_cnn, x, progress=False, jvp=None)
    with pytest.raises(ValueError, match="jvp must be one of"):
        lie.lie_derivative(small_cnn, x, "rotation", jvp=1)
    with pytest.raises(ValueError, match=r"vs must have shape \[k, 2, 1, 8, 8\]"):
        forward_mode.jvp_tangents(small_cnn, x, torch.zeros(3, 2, 1, 8, 9))
