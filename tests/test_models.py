"""Tests for tmlib.models: shapes, layer naming/order, hook safety, options, validation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tmlib import models
from tmlib.models import (
    MLP,
    MODELS,
    VGG16D,
    AllConvolutional,
    GaussianBlur,
    ResNet,
    SimpleConv,
    TIPooling,
    build,
    observable_layers,
)

# Small widths keep the whole file fast on CPU.
SMALL = {
    "SimpleConv": {"filters": 8, "fc_units": 16},
    "AllConvolutional": {"filters": 8},
    "VGG16D": {"base_filters": 8},
    "ResNet": {"base_filters": 8},
    "TIPooling": {"filters": 8, "fc_units": 16},
    "MLP": {"depth": 3, "width": 16},
}
SIZES = [(1, 28), (3, 32)]
SKIPPED = (nn.Flatten, nn.Dropout)


def small(name: str, in_channels: int = 1, image_size: int = 28, **kw) -> nn.Module:
    return build(name, in_channels=in_channels, image_size=image_size, **{**SMALL[name], **kw})


def trace_calls(model: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, int]]:
    """Leaf paths (minus flatten/dropout) in first-call order, and call counts per leaf."""
    order: list[str] = []
    counts: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue

        skip = isinstance(m, SKIPPED)

        def hook(mod, inp, out, name=name, skip=skip):
            counts[name] = counts.get(name, 0) + 1
            if counts[name] == 1 and not skip:
                order.append(name)

        handles.append(m.register_forward_hook(hook))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order, counts


def test_registry_lists_all_models() -> None:
    assert sorted(MODELS) == ["AllConvolutional", "MLP", "ResNet", "SimpleConv", "TIPooling", "VGG16D"]
    for name, cls in MODELS.items():
        assert cls.paper_name == name


@pytest.mark.parametrize("in_channels,image_size", SIZES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_shape(name: str, in_channels: int, image_size: int) -> None:
    model = small(name, in_channels, image_size, num_classes=7)
    out = model(torch.randn(3, in_channels, image_size, image_size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    assert model.paper_name == name
    assert json.loads(json.dumps(model.config))["image_size"] == image_size


@pytest.mark.parametrize("in_channels,image_size", SIZES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_layer_names_match_forward_order(name: str, in_channels: int, image_size: int) -> None:
    model = small(name, in_channels, image_size)
    order, counts = trace_calls(model, torch.randn(2, in_channels, image_size, image_size))
    names = model.layer_names()
    assert names == order
    assert observable_layers(model) == names
    modules = dict(model.named_modules())
    assert all(n in modules and next(modules[n].children(), None) is None for n in names)
    # Every leaf (flatten/dropout included) is called exactly once.
    leaves = [n for n, m in model.named_modules() if next(m.children(), None) is None]
    assert sorted(counts) == sorted(leaves)
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_activations_not_inplace_and_distinct(name: str) -> None:
    model = small(name)
    acts = [m for m in model.modules()
            if isinstance(m, (nn.ELU, nn.ReLU, nn.PReLU, nn.Tanh))]
    assert len(acts) >= 3
    assert not any(getattr(m, "inplace", False) for m in acts)
    assert len({id(m) for m in acts}) == len(acts)


def test_simple_conv_default_names_and_params() -> None:
    model = SimpleConv()
    assert model.layer_names() == [
        "conv0", "act0", "conv1", "act1", "pool1", "conv2", "act2", "conv3", "act3",
        "pool3", "conv4", "act4", "fc0", "fc0act", "fc1",
    ]
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 1_000_000
    assert n_params == 540_970
    # Flattened size follows image_size: 4f maps at image_size/4 squared.
    assert SimpleConv(image_size=32).fc0.in_features == 128 * 8 * 8
    assert model.fc0.in_features == 128 * 7 * 7


@pytest.mark.parametrize("kw", [
    {"batch_norm": True},
    {"kernel_size": 5},
    {"kernel_size": 7},
    {"activation": "relu"},
    {"activation": "prelu"},
    {"activation": "tanh"},
    {"pooling": "strided"},
    {"pooling": "strided", "batch_norm": True, "kernel_size": 5, "activation": "prelu"},
])
@pytest.mark.parametrize("in_channels,image_size", SIZES)
def test_simple_conv_variants(kw: dict, in_channels: int, image_size: int) -> None:
    model = small("SimpleConv", in_channels, image_size, **kw)
    x = torch.randn(2, in_channels, image_size, image_size)
    assert model(x).shape == (2, 10)
    order, _ = trace_calls(model, x)
    assert model.layer_names() == order
    names = model.layer_names()
    bns = [n for n in names if n.startswith("bn")]
    assert bns == (["bn0", "bn1", "bn2", "bn3", "bn4"] if kw.get("batch_norm") else [])
    if kw.get("batch_norm"):
        assert names.index("bn2") == names.index("conv2") + 1 == names.index("act2") - 1
    pool = dict(model.named_modules())["pool3"]
    if kw.get("pooling") == "strided":
        assert isinstance(pool, nn.Conv2d) and pool.stride == (2, 2)
        assert pool.in_channels == pool.out_channels == 16
    else:
        assert isinstance(pool, nn.MaxPool2d)
    k = kw.get("kernel_size", 3)
    assert model.conv0.kernel_size == (k, k) and model.conv4.kernel_size == (3, 3)


def test_other_layer_names() -> None:
    allconv = AllConvolutional(filters=8).layer_names()
    assert allconv[:3] == ["conv0", "bn0", "act0"] and allconv[-5:] == [
        "conv7", "bn7", "act7", "convclass", "gap"]
    assert len(allconv) == 8 * 3 + 2
    vgg = VGG16D(base_filters=8).layer_names()
    assert [n for n in vgg if n.startswith("conv")] == [f"conv{i}" for i in range(10)]
    assert [n for n in vgg if n.startswith("pool")] == ["pool1", "pool3", "pool6", "pool9"]
    assert vgg[-5:] == ["fc0", "fc0act", "fc1", "fc1act", "fc2"]
    resnet = ResNet(base_filters=8).layer_names()
    assert resnet[:3] == ["stem.conv", "stem.bn", "stem.act"]
    assert resnet[-2:] == ["gap", "fc"]
    assert "stage2.block0.shortcut.conv" in resnet and "stage1.block0.shortcut.conv" not in resnet
    assert len(resnet) == 3 + 8 * 6 + 3 * 2 + 2  # stem, 6 per block, 3 shortcuts, gap+fc


def test_param_counts() -> None:
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(AllConvolutional()) == 1_369_258
    assert count(VGG16D()) == 512_058
    assert count(ResNet()) == 11_172_810
    assert count(TIPooling()) == count(SimpleConv())


@pytest.mark.parametrize("ts", [None, models._C4()], ids=["default", "fallback"])
def test_tipooling_invariant_to_c4(ts) -> None:
    torch.manual_seed(0)
    model = small("TIPooling", transformations=ts).eval()
    assert model.config["transformations"]["m"] == 4
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        for k in (1, 2, 3):
            torch.testing.assert_close(model(torch.rot90(x, k, (2, 3))), out,
                                       atol=1e-5, rtol=1e-5)
        # A plain SimpleConv is not invariant, so the check above is not vacuous.
        plain = small("SimpleConv").eval()
        assert (plain(torch.rot90(x, 1, (2, 3))) - plain(x)).abs().max() > 1e-4


def test_tipooling_trunk_sees_all_copies_and_custom_set() -> None:
    class Flips:
        matrices = torch.tensor([[[1.0, 0, 0], [0, 1, 0]], [[-1.0, 0, 0], [0, 1, 0]]])

        def __len__(self) -> int:
            return 2

        def __repr__(self) -> str:
            return "Flips()"

        def apply(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x, torch.flip(x, (3,))], dim=1)

    model = small("TIPooling", transformations=Flips()).eval()
    shapes: dict[str, tuple] = {}
    for name in ("conv0", "act4", "tipool", "fc1"):
        def record(m, i, o, name=name) -> None:
            shapes.setdefault(name, tuple(o.shape))

        dict(model.named_modules())[name].register_forward_hook(record)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model(torch.flip(x, (3,))), out, atol=1e-5, rtol=1e-5)
    assert shapes == {"conv0": (6, 8, 28, 28), "act4": (6, 32, 7, 7),
                      "tipool": (3, 32 * 7 * 7), "fc1": (3, 10)}
    cfg = model.config["transformations"]
    assert cfg["repr"] == "Flips()" and cfg["m"] == 2 and len(cfg["matrices_sha256"]) == 64
    assert "transformations" not in dict(model.named_children())


@pytest.mark.parametrize("name,kw,arg", [
    ("SimpleConv", {"activation": "foo"}, "activation"),
    ("SimpleConv", {"image_size": 3}, "image_size"),
    ("SimpleConv", {"kernel_size": 4}, "kernel_size"),
    ("SimpleConv", {"pooling": "avg"}, "pooling"),
    ("SimpleConv", {"batch_norm": 1}, "batch_norm"),
    ("SimpleConv", {"filters": 0}, "filters"),
    ("SimpleConv", {"in_channels": 0}, "in_channels"),
    ("SimpleConv", {"num_classes": 1}, "num_classes"),
    ("AllConvolutional", {"filters": 2.5}, "filters"),
    ("VGG16D", {"image_size": 8}, "image_size"),
    ("VGG16D", {"dropout": 1.0}, "dropout"),
    ("ResNet", {"blocks": ()}, "blocks"),
    ("ResNet", {"blocks": (2, 0)}, "blocks"),
    ("ResNet", {"activation": "gelu"}, "activation"),
    ("TIPooling", {"transformations": object()}, "transformations"),
    ("TIPooling", {"fc_units": -1}, "fc_units"),
    ("MLP", {"depth": 0}, "depth"),
    ("MLP", {"width": 1.5}, "width"),
    ("MLP", {"blur_sigma": 0}, "blur_sigma"),
    ("MLP", {"blur_sigma": True}, "blur_sigma"),
    ("MLP", {"bias": 1}, "bias"),
    ("MLP", {"activation": "gelu"}, "activation"),
])
def test_bad_arguments(name: str, kw: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        build(name, **kw)


def test_bad_input_and_unknown_name() -> None:
    with pytest.raises(ValueError, match="expects input"):
        small("SimpleConv")(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="SimpleConv"):
        build("LeNet")


def test_observable_layers_generic() -> None:
    relu = nn.ReLU()
    seq = nn.Sequential(nn.Linear(4, 5), relu, nn.Linear(5, 5), relu, nn.Flatten(),
                        nn.BatchNorm1d(5))
    seq.train()
    running = seq[5].running_mean.clone()
    assert observable_layers(seq) == ["0", "1", "2", "5"]
    names = observable_layers(seq, torch.randn(3, 4))
    assert names == ["0", "1", "2", "1#2", "5"]
    # The probe leaves training mode and BatchNorm statistics as they were.
    assert seq.training and seq[5].training
    torch.testing.assert_close(seq[5].running_mean, running)
    assert all(not m._forward_hooks for m in seq.modules())
    assert observable_layers(nn.Linear(2, 2), torch.randn(1, 2)) == ["Linear"]


def test_observable_layers_removes_hooks_on_error() -> None:
    seq = nn.Sequential(nn.Linear(4, 5), nn.Linear(6, 2))
    with pytest.raises(RuntimeError):
        observable_layers(seq, torch.randn(1, 4))
    assert all(not m._forward_hooks for m in seq.modules())


def test_observable_layers_uses_layer_names() -> None:
    model = small("VGG16D")
    assert observable_layers(model, torch.randn(1, 1, 28, 28)) == model.layer_names()
    assert models.observable_layers is observable_layers


# --------------------------------------------------------------------------- MLP (LieGG)


def test_mlp_names_shapes_and_parameters() -> None:
    model = MLP(depth=5, width=128, blur_sigma=1.5, activation="silu", bias=False)
    assert model.layer_names() == [f"{kind}{i}" for i in range(5) for kind in ("fc", "act")] + ["fc5"]
    assert [n for n, _ in model.named_children()][:2] == ["blur", "flatten"]  # the blur is the first leaf
    assert all(isinstance(getattr(model, f"act{i}"), nn.SiLU) for i in range(5))
    assert all(getattr(model, f"fc{i}").bias is None for i in range(6))
    # LieGG's 5 × 128 MLP: 784·128 + 4·128² + 128·10 weights, nothing for the blur.
    assert sum(p.numel() for p in model.parameters()) == 784 * 128 + 4 * 128 ** 2 + 128 * 10
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert model.config["blur_sigma"] == 1.5 and json.loads(json.dumps(model.config)) == model.config
    plain = build("MLP", depth=2, width=8, in_channels=3, image_size=32, num_classes=7)
    assert plain.layer_names() == ["fc0", "act0", "fc1", "act1", "fc2"] and not hasattr(plain, "blur")
    assert plain.fc0.in_features == 3 * 32 * 32 and plain(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="expects input"):
        plain(torch.randn(2, 1, 32, 32))


def test_blur_is_fixed_normalised_and_the_padded_convolution() -> None:
    blur = GaussianBlur(1.5, channels=2)
    assert blur.radius == 6 and blur.kernel.shape == (13,)
    torch.testing.assert_close(blur.kernel2d().sum(), torch.tensor(1.0))
    assert list(blur.parameters()) == [] and "kernel" in blur.state_dict()
    model = MLP(depth=1, width=8, blur_sigma=1.5)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(name.startswith("blur") for name, _ in model.named_parameters())
    # The matrix form equals the 2-D kernel on an edge-replicated image, and a constant stays constant.
    x = torch.randn(3, 2, 20, 17)
    padded = nn.functional.pad(x, (6, 6, 6, 6), mode="replicate")
    reference = nn.functional.conv2d(padded, blur.kernel2d().expand(2, 1, 13, 13), groups=2)
    torch.testing.assert_close(blur(x), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blur(torch.full((1, 2, 9, 9), 0.7)), torch.full((1, 2, 9, 9), 0.7))
    torch.testing.assert_close(blur.matrix(11).sum(1), torch.ones(11))
    # The blur commutes with a per-pixel normalisation (x - m)/s (kernel sums to 1, edges replicated).
    torch.testing.assert_close(blur((x - 0.13) / 0.3), (blur(x) - 0.13) / 0.3, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        GaussianBlur(-1.0)


def test_blur_matches_scipy_gaussian_filter() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    expected = ndimage.gaussian_filter(x[0, 0].numpy(), sigma=1.5, mode="nearest", truncate=4.0)
    torch.testing.assert_close(GaussianBlur(1.5)(x)[0, 0], torch.from_numpy(expected), atol=1e-6, rtol=1e-6)


def test_mlp_without_blur_shares_the_weights() -> None:
    torch.manual_seed(0)
    model = MLP(depth=2, width=16, blur_sigma=1.5).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.without_blur()(model.blur_images(x)), model(x))
    assert model.without_blur()[1] is model.fc0
    plain = MLP(depth=1, width=4)
    assert plain.blur_images(x) is x


def test_mlp_spec_builds_through_the_zoo() -> None:
    from tmlib.experiments import ModelSpec, build_model

    spec = ModelSpec(architecture="MLP", options={"depth": 2, "width": 8, "blur_sigma": 1.5})
    model = build_model(spec)
    assert isinstance(model, MLP) and model.config["image_size"] == 28 and model.config["num_classes"] == 10
    same = build_model(spec)  # init_seed fixes the weights
    torch.testing.assert_close(model.fc0.weight, same.fc0.weight)
