"""CNN models whose internal layers are measured for invariance (Quiroga et al. 2023).

Every model takes input of shape ``[b, in_channels, image_size, image_size]`` and returns
logits ``[b, num_classes]``. Each observable layer is a leaf ``nn.Module`` whose path in
``model.named_modules()`` is the paper-style layer name (``conv0``, ``act0``, ``pool1``,
``fc0``, ``bn0``, ...), so a forward hook on that leaf sees exactly the layer's output.
Activations are never in-place and no module instance is called twice in one forward,
so every hooked output is a distinct, unmodified tensor.

``layer_names()`` lists the observable layers in forward order. Flatten, Dropout and
Identity leaves are excluded: they reshape or (at eval time) copy their input, so they
would only duplicate a neighbouring layer.

:class:`MLP` (LieGG's networks, Moskalev et al. 2022) follows the same conventions: ``fc0 act0 …``,
with an optional fixed Gaussian blur of the input first (not a layer, not trainable).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from .activations import leaf_modules, observe, split_call_name
from .equivariant import SteerableCNN
from .fast_layers import ELU, MaxPool2d

__all__ = [
    "EXTRA_MODELS",
    "MLP",
    "MODELS",
    "VGG16D",
    "AllConvolutional",
    "GaussianBlur",
    "ResNet",
    "SimpleConv",
    "SteerableCNN",
    "TIPooling",
    "build",
    "observable_layers",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "elu": ELU,  # nn.ELU, faster where only values are asked for (tmlib.fast_layers)
    "relu": nn.ReLU,
    "prelu": nn.PReLU,
    "silu": nn.SiLU,  # Swish (x·sigmoid(x)): the activation of LieGG's MLPs
    "tanh": nn.Tanh,
}

# Leaves whose output is a reshaped or (in eval mode) unchanged copy of their input.
_NOT_OBSERVABLE = (nn.Flatten, nn.Unflatten, nn.Identity, nn.modules.dropout._DropoutNd)


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    # bool is an int subclass; True as a filter count is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_activation(activation: Any) -> str:
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}"
        )
    return activation


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        # Every bad constructor argument is a ValueError, whatever is wrong with it.
        raise ValueError(f"{name} must be a bool, got {value!r}")  # noqa: TRY004
    return value


def _check_common(
    in_channels: Any, num_classes: Any, image_size: Any, min_image_size: int, activation: Any
) -> None:
    _check_int("in_channels", in_channels)
    _check_int("num_classes", num_classes, 2)
    # The minimum keeps at least one pixel per halving of the feature maps.
    _check_int("image_size", image_size, min_image_size)
    _check_activation(activation)


# --------------------------------------------------------------------------- base class


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


class _Model(nn.Module):
    """Shared behaviour: input check, forward through children in order, layer_names.

    Children are registered in the order forward calls them, so the leaf order of
    ``named_modules()`` is the forward order (the tests check this with hooks).
    """

    paper_name: str = ""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config

    def _check_input(self, x: torch.Tensor) -> None:
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(
                f"{self.paper_name} expects input [b, {c}, {s}, {s}], got {list(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._run_children(x)

    def _run_children(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.children():
            x = module(x)
        return x

    def layer_names(self) -> list[str]:
        """Observable layer paths in forward order (no Flatten/Dropout/Identity)."""
        return [
            name
            for name, m in self.named_modules()
            if name and _is_leaf(m) and not isinstance(m, _NOT_OBSERVABLE)
        ]


# --------------------------------------------------------------------------- SimpleConv


def _simple_conv_trunk(
    net: nn.Module,
    in_channels: int,
    image_size: int,
    filters: int,
    kernel_size: int,
    activation: str,
    batch_norm: bool,
    pooling: str,
) -> int:
    """Register the SimpleConv conv trunk (conv0 ... act4, flatten) on ``net``.

    Returns the number of flattened features it produces.
    """
    f = filters
    # (out_channels, kernel, pool after it?) per conv; the last conv is always 3x3.
    plan = [(f, kernel_size, False), (f, kernel_size, True), (2 * f, kernel_size, False),
            (2 * f, kernel_size, True), (4 * f, 3, False)]
    channels, size = in_channels, image_size
    for i, (out, k, pool_after) in enumerate(plan):
        # BN already has a shift, so a conv bias before it is redundant.
        net.add_module(f"conv{i}", nn.Conv2d(channels, out, k, padding=k // 2, bias=not batch_norm))
        if batch_norm:
            net.add_module(f"bn{i}", nn.BatchNorm2d(out))
        net.add_module(f"act{i}", _ACTIVATIONS[activation]())
        channels = out
        if pool_after:
            # Both variants use the same 2x2 window, so sizes and names match.
            pool = (MaxPool2d(2) if pooling == "max"
                    else nn.Conv2d(channels, channels, 2, stride=2))
            net.add_module(f"pool{i}", pool)
            size //= 2
    net.add_module("flatten", nn.Flatten())
    return channels * size * size


class SimpleConv(_Model):
    """Small CNN from the paper. Input ``[b, in_channels, image_size, image_size]``.

    Layers: ``conv0 act0 conv1 act1 pool1 conv2 act2 conv3 act3 pool3 conv4 act4
    flatten fc0 fc0act fc1`` with ``filters`` maps in conv0-1, 2x in conv2-3, 4x in conv4.
    Convs use "same" padding; ``kernel_size`` applies to conv0-conv3, conv4 is always 3x3.
    ``batch_norm=True`` adds ``bn{i}`` between ``conv{i}`` and ``act{i}``.
    ``pooling="strided"`` makes ``pool1``/``pool3`` a learned 2x2 stride-2 conv (same
    channel count, no activation after it) instead of a 2x2 max pool.
    """

    paper_name = "SimpleConv"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        filters: int = 32,
        fc_units: int = 64,
        kernel_size: int = 3,
        activation: str = "elu",
        batch_norm: bool = False,
        pooling: str = "max",
    ) -> None:
        _check_common(in_channels, num_classes, image_size, 4, activation)
        _check_int("filters", filters)
        _check_int("fc_units", fc_units)
        _check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        _check_bool("batch_norm", batch_norm)
        if pooling not in ("max", "strided"):
            raise ValueError(f"pooling must be 'max' or 'strided', got {pooling!r}")
        super().__init__({
            "in_channels": in_channels, "num_classes": num_classes, "image_size": image_size,
            "filters": filters, "fc_units": fc_units, "kernel_size": kernel_size,
            "activation": activation, "batch_norm": batch_norm, "pooling": pooling,
        })
        features = _simple_conv_trunk(self, in_channels, image_size, filters, kernel_size,
                                      activation, batch_norm, pooling)
        self.fc0 = nn.Linear(features, fc_units)
        self.fc0act = _ACTIVATIONS[activation]()
        self.fc1 = nn.Linear(fc_units, num_classes)


# --------------------------------------------------------------------------- AllConvolutional


class AllConvolutional(_Model):
    """All-convolutional net (Springenberg et al. 2015, with BN).

    Input ``[b, in_channels, image_size, image_size]``. Layers: ``conv{i} bn{i} act{i}``
    for i = 0..7, then ``convclass`` (1x1 conv to num_classes), ``gap`` (global average
    pool) and a flatten. conv2 and conv5 have stride 2 in place of pooling; conv0-2 have
    ``filters`` maps, conv3-7 have 2x; conv7 is 1x1, the rest 3x3 with padding 1.
    """

    paper_name = "AllConvolutional"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        filters: int = 96,
        activation: str = "elu",
    ) -> None:
        _check_common(in_channels, num_classes, image_size, 4, activation)
        _check_int("filters", filters)
        super().__init__({
            "in_channels": in_channels, "num_classes": num_classes, "image_size": image_size,
            "filters": filters, "activation": activation,
        })
        f = filters
        # (out_channels, kernel, stride) per block.
        plan = [(f, 3, 1), (f, 3, 1), (f, 3, 2), (2 * f, 3, 1), (2 * f, 3, 1),
                (2 * f, 3, 2), (2 * f, 3, 1), (2 * f, 1, 1)]
        channels = in_channels
        for i, (out, k, stride) in enumerate(plan):
            self.add_module(f"conv{i}", nn.Conv2d(channels, out, k, stride, k // 2, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(out))
            self.add_module(f"act{i}", _ACTIVATIONS[activation]())
            channels = out
        self.convclass = nn.Conv2d(channels, num_classes, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()


# --------------------------------------------------------------------------- VGG16D


class VGG16D(_Model):
    """VGG16 (configuration D) reduced to 4 blocks for 28/32 pixel images.

    Input ``[b, in_channels, image_size, image_size]``. Blocks of [2, 2, 3, 3] 3x3 convs
    with [c, 2c, 4c, 8c] maps (c = ``base_filters``), a 2x2 max pool after each block.
    Layers: ``conv0 act0 conv1 act1 pool1 conv2 act2 conv3 act3 pool3 conv4 act4 ...
    conv6 act6 pool6 conv7 act7 ... conv9 act9 pool9 flatten fc0 fc0act drop0 fc1 fc1act
    drop1 fc2``. Both hidden FC layers have 8c units (the width of the last conv block).
    """

    paper_name = "VGG16D"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        base_filters: int = 16,
        activation: str = "elu",
        dropout: float = 0.5,
    ) -> None:
        _check_common(in_channels, num_classes, image_size, 16, activation)
        _check_int("base_filters", base_filters)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        super().__init__({
            "in_channels": in_channels, "num_classes": num_classes, "image_size": image_size,
            "base_filters": base_filters, "activation": activation, "dropout": float(dropout),
        })
        c = base_filters
        channels, size, i = in_channels, image_size, 0
        for n_convs, out in zip([2, 2, 3, 3], [c, 2 * c, 4 * c, 8 * c]):
            for _ in range(n_convs):
                self.add_module(f"conv{i}", nn.Conv2d(channels, out, 3, padding=1))
                self.add_module(f"act{i}", _ACTIVATIONS[activation]())
                channels, i = out, i + 1
            self.add_module(f"pool{i - 1}", MaxPool2d(2))
            size //= 2
        self.flatten = nn.Flatten()
        hidden = 8 * c
        self.fc0 = nn.Linear(channels * size * size, hidden)
        self.fc0act = _ACTIVATIONS[activation]()
        self.drop0 = nn.Dropout(dropout)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc1act = _ACTIVATIONS[activation]()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """ResNet basic block: ``conv1 bn1 act1 conv2 bn2 [shortcut.conv shortcut.bn] act2``.

    The residual branch runs before the shortcut so that module registration order is
    forward call order. The shortcut exists only when the block changes shape; an
    identity shortcut has no module (it would only duplicate the block's input).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = _ACTIVATIONS[activation]()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential()
            self.shortcut.add_module(
                "conv", nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))
            self.shortcut.add_module("bn", nn.BatchNorm2d(out_channels))
        self.act2 = _ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.act2(out + skip)


class ResNet(_Model):
    """ResNet-18-style network for small images (3x3 stem, no stem pooling).

    Input ``[b, in_channels, image_size, image_size]``. Layers: ``stem.conv stem.bn
    stem.act``, then ``stage{s}.block{j}.{conv1,bn1,act1,conv2,bn2,shortcut.conv,
    shortcut.bn,act2}`` for s = 1..len(blocks) (shortcut only in the first block of
    stages 2+, which halve the size and double the maps from c = ``base_filters``),
    then ``gap``, a flatten and ``fc``.
    """

    paper_name = "ResNet"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        base_filters: int = 64,
        blocks: tuple[int, ...] | list[int] = (2, 2, 2, 2),
        activation: str = "elu",
    ) -> None:
        if not isinstance(blocks, (list, tuple)) or not blocks or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in blocks):
            raise ValueError(f"blocks must be a non-empty list/tuple of ints >= 1, got {blocks!r}")
        blocks = list(blocks)
        _check_common(in_channels, num_classes, image_size, 2 ** (len(blocks) - 1), activation)
        _check_int("base_filters", base_filters)
        super().__init__({
            "in_channels": in_channels, "num_classes": num_classes, "image_size": image_size,
            "base_filters": base_filters, "blocks": blocks, "activation": activation,
        })
        c = base_filters
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_channels, c, 3, padding=1, bias=False))
        self.stem.add_module("bn", nn.BatchNorm2d(c))
        self.stem.add_module("act", _ACTIVATIONS[activation]())
        channels = c
        for s, n_blocks in enumerate(blocks):
            out = c * 2 ** s
            stage = nn.Sequential()
            for j in range(n_blocks):
                stride = 2 if s > 0 and j == 0 else 1
                stage.add_module(f"block{j}", BasicBlock(channels, out, stride, activation))
                channels = out
            self.add_module(f"stage{s + 1}", stage)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)


# --------------------------------------------------------------------------- TIPooling


class _C4:
    """Exact rotations by k*90 degrees, k = 0..3 (fallback when tmlib.transforms is absent)."""

    def __len__(self) -> int:
        return 4

    def __repr__(self) -> str:
        return "C4(rot90 k=0..3)"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.rot90(x, k, (2, 3)) for k in range(4)], dim=1)


def _default_transformations() -> Any:
    try:
        from tmlib.transforms import c4
    except ImportError:
        return _C4()
    return c4()


class MaxOverTransformations(nn.Module):
    """Max over the m transformed copies: ``[b*m, F] -> [b, F]`` (copies of a sample adjacent)."""

    def __init__(self, m: int) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.m, x.shape[-1]).amax(dim=1)

    def extra_repr(self) -> str:
        return f"m={self.m}"


class TIPooling(_Model):
    """Transformation-invariant pooling network (Laptev et al. 2016) on a SimpleConv trunk.

    Input ``[b, in_channels, image_size, image_size]``. The input is expanded to its m
    transformed copies, the trunk runs on all ``b*m`` of them, and ``tipool`` takes the
    max of the flattened features over the copies, so the logits are invariant to the
    transformation set (exactly, when it is a group). Layers: ``conv0 act0 conv1 act1
    pool1 conv2 act2 conv3 act3 pool3 conv4 act4`` (outputs have first dim ``b*m``),
    a flatten, ``tipool``, ``fc0 fc0act fc1``.

    ``transformations`` needs ``apply(x [b,C,H,W]) -> [b,m,C,H,W]`` and ``len() == m``;
    default: ``tmlib.transforms.c4()`` (or an equivalent local rot90 set).
    """

    paper_name = "TIPooling"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        transformations: Any = None,
        filters: int = 32,
        fc_units: int = 64,
        activation: str = "elu",
    ) -> None:
        _check_common(in_channels, num_classes, image_size, 4, activation)
        _check_int("filters", filters)
        _check_int("fc_units", fc_units)
        ts = _default_transformations() if transformations is None else transformations
        if not callable(getattr(ts, "apply", None)) or not hasattr(ts, "__len__") or len(ts) < 1:
            raise ValueError(
                "transformations must have apply(x) -> [b, m, C, H, W] and len() == m >= 1, "
                f"got {ts!r}"
            )
        super().__init__({
            "in_channels": in_channels, "num_classes": num_classes, "image_size": image_size,
            "transformations": _describe(ts), "filters": filters, "fc_units": fc_units,
            "activation": activation,
        })
        # Bypass Module.__setattr__: a transformation set that is itself an nn.Module
        # must not become a child, or it would be taken for a layer of the network.
        object.__setattr__(self, "transformations", ts)
        features = _simple_conv_trunk(self, in_channels, image_size, filters, 3,
                                      activation, False, "max")
        self.tipool = MaxOverTransformations(len(ts))
        self.fc0 = nn.Linear(features, fc_units)
        self.fc0act = _ACTIVATIONS[activation]()
        self.fc1 = nn.Linear(fc_units, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b, m = x.shape[0], len(self.transformations)
        xs = self.transformations.apply(x)
        if tuple(xs.shape) != (b, m, *x.shape[1:]):
            raise ValueError(
                f"transformations.apply returned {list(xs.shape)}, "
                f"expected {[b, m, *x.shape[1:]]}"
            )
        return self._run_children(xs.reshape(b * m, *x.shape[1:]))


def _describe(ts: Any) -> dict[str, Any]:
    """JSON-serialisable identity of a transformation set, for checkpoint cache keys."""
    description: dict[str, Any] = {"repr": repr(ts), "m": len(ts)}
    matrices = getattr(ts, "matrices", None)
    if matrices is not None:
        array = torch.as_tensor(matrices).detach().to("cpu", torch.float64).contiguous()
        digest = hashlib.sha256(str(list(array.shape)).encode())
        digest.update(array.numpy().tobytes())
        description["matrices_sha256"] = digest.hexdigest()
    return description


# --------------------------------------------------------------------------- MLP (LieGG)


class GaussianBlur(nn.Module):
    """A fixed, non-trainable Gaussian blur of every channel: ``[b, C, H, W] -> [b, C, H, W]``.

    The kernel is the sampled Gaussian of standard deviation ``sigma`` (pixels) truncated at
    ``truncate·sigma`` (radius ``int(truncate·sigma + 0.5)``) and normalised to sum to 1, applied as
    two 1-D passes (matrix products) with the border extended by the edge pixel (``replicate``): the same filter as
    ``scipy.ndimage.gaussian_filter`` / ``skimage.filters.gaussian`` with ``mode="nearest"``, which
    LieGG's public code uses on its data. The kernel is a buffer (in ``state_dict``, not a
    parameter): nothing trains it. Because the kernel sums to 1 and the border is replicated, the
    blur commutes with any per-pixel affine normalisation ``(x - mean)/std``, so blurring normalised
    images is the same as normalising blurred ones.
    """

    def __init__(self, sigma: float, channels: int = 1, truncate: float = 4.0) -> None:
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"blur_sigma must be a positive number (pixels), got {sigma!r}")
        if isinstance(truncate, bool) or not isinstance(truncate, (int, float)) or not truncate > 0:
            raise ValueError(f"truncate must be a positive number, got {truncate!r}")
        _check_int("channels", channels)
        self.sigma, self.channels, self.truncate = float(sigma), channels, float(truncate)
        self.radius = int(truncate * sigma + 0.5)
        t = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        self.register_buffer("kernel", (kernel / kernel.sum()).float())

    def kernel2d(self) -> torch.Tensor:
        """The 2-D kernel the two passes amount to, [2r + 1, 2r + 1] (sums to 1)."""
        return torch.outer(self.kernel, self.kernel)

    def matrix(self, size: int, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
        """The 1-D blur along an axis of ``size`` pixels as a [size, size] matrix (edge replicated):
        row i holds the weights of the pixels that output pixel i averages; every row sums to 1."""
        r = self.radius
        index = (torch.arange(size, device=device)[:, None] + torch.arange(-r, r + 1, device=device)[None, :])
        weights = self.kernel.to(device=device, dtype=dtype).expand(size, -1).contiguous()
        out = torch.zeros(size, size, dtype=dtype, device=device)
        return out.scatter_add_(1, index.clamp(0, size - 1), weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"GaussianBlur expects input [b, {self.channels}, H, W], got {list(x.shape)}")
        # Separable: rows then columns, as two small matrix products (8× faster than conv2d on
        # 28×28 images on a CPU); the same linear map as the padded convolution.
        rows = self.matrix(x.shape[-2], x.dtype, x.device)
        cols = self.matrix(x.shape[-1], x.dtype, x.device)
        return rows @ x @ cols.T

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, channels={self.channels}, radius={self.radius}"


class MLP(_Model):
    """Multi-layer perceptron on flattened images: the networks of LieGG (Moskalev et al. 2022).

    Input ``[b, in_channels, image_size, image_size]``; ``depth`` hidden layers of ``width`` units.
    Layers: ``[blur] flatten fc0 act0 fc1 act1 … fc{depth-1} act{depth-1} fc{depth}`` (``fc{depth}``
    is the linear head giving the logits). LieGG's MLPs are ``activation="silu"`` (Swish) with
    ``bias=False``; the defaults are a plain ReLU MLP with biases.

    ``blur_sigma`` (pixels; None = no blur) puts a fixed :class:`GaussianBlur` leaf named ``blur``
    *first*, before the flatten: LieGG's published set-up blurs its inputs with σ = 1.5. It sits in
    the model rather than in the data so that the data pipeline, the augmentation (rotate, then
    blur, as the authors' pre-rotated data are blurred after rotation) and every measurement stay
    those of the other models: a measure of the model on raw images measures the function the
    trained network computes from an image. The blur is not trainable, and it is not a layer of the
    network: ``layer_names()`` leaves it out (``blur_images`` / ``without_blur`` give the blurred
    images and the network after the blur, e.g. to measure the MLP on blurred images as the
    authors do).
    """

    paper_name = "MLP"

    def __init__(
        self,
        depth: int = 3,
        width: int = 128,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        blur_sigma: float | None = None,
        activation: str = "relu",
        bias: bool = True,
    ) -> None:
        _check_common(in_channels, num_classes, image_size, 1, activation)
        _check_int("depth", depth)
        _check_int("width", width)
        _check_bool("bias", bias)
        if blur_sigma is not None and (isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float))
                                       or not blur_sigma > 0):
            raise ValueError(f"blur_sigma must be None or a positive number (pixels), got {blur_sigma!r}")
        super().__init__({
            "depth": depth, "width": width, "in_channels": in_channels, "image_size": image_size,
            "num_classes": num_classes, "blur_sigma": None if blur_sigma is None else float(blur_sigma),
            "activation": activation, "bias": bias,
        })
        if blur_sigma is not None:
            self.blur = GaussianBlur(float(blur_sigma), in_channels)
        self.flatten = nn.Flatten()
        features = in_channels * image_size * image_size
        for i in range(depth):
            self.add_module(f"fc{i}", nn.Linear(features, width, bias=bias))
            self.add_module(f"act{i}", _ACTIVATIONS[activation]())
            features = width
        self.add_module(f"fc{depth}", nn.Linear(features, num_classes, bias=bias))

    def layer_names(self) -> list[str]:
        """``fc0 act0 … fc{depth}`` in forward order (the fixed input blur is not a layer)."""
        return [name for name in super().layer_names() if name != "blur"]

    def blur_images(self, x: torch.Tensor) -> torch.Tensor:
        """What the first linear layer sees (before flattening): x blurred, or x without a blur."""
        return self.blur(x) if hasattr(self, "blur") else x

    def without_blur(self) -> nn.Sequential:
        """The network after the blur (sharing this model's modules): images → logits."""
        return nn.Sequential(*(m for name, m in self.named_children() if name != "blur"))


# --------------------------------------------------------------------------- registry


MODELS: dict[str, type[_Model]] = {
    cls.paper_name: cls for cls in (SimpleConv, AllConvolutional, VGG16D, ResNet, TIPooling, MLP)
}


# Models beyond the papers' five, built by name too (their layers are not leaf modules).
EXTRA_MODELS: dict[str, type[nn.Module]] = {"SteerableCNN": SteerableCNN}


def build(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the model registered as ``name`` (a key of MODELS or EXTRA_MODELS) with ``kwargs``."""
    registry = {**MODELS, **EXTRA_MODELS}
    if name not in registry:
        raise ValueError(f"name must be one of {sorted(registry)}, got {name!r}")
    return registry[name](**kwargs)


# --------------------------------------------------------------------------- observable layers


def observable_layers(model: nn.Module, example_input: torch.Tensor | None = None) -> list[str]:
    """Names of the layers of ``model`` whose outputs can be observed with forward hooks.

    Uses ``model.layer_names()`` when the model defines it (the paper models: these are exactly
    the layers ``evaluate`` measures by default). Otherwise, with ``example_input``, runs one
    no-grad eval-mode forward with hooks on every leaf module and returns paths in call order,
    the k-th call of a reused module named ``path#k``; without an example, leaf paths in
    ``named_modules()`` order, which may differ from the call order. Flatten, Dropout and
    Identity leaves are left out here (they repeat or pass through their input), whereas
    ``evaluate`` observes every leaf of a model without ``layer_names()``: pass
    ``layers=observable_layers(model, x[:1])`` to measure only these. A childless root is named by
    its class name.
    """
    if callable(getattr(model, "layer_names", None)):
        return list(model.layer_names())
    skip = {name for name, m in leaf_modules(model).items() if isinstance(m, _NOT_OBSERVABLE)}
    if example_input is None:
        return [name for name in leaf_modules(model) if name not in skip]
    calls: list[str] = []
    # Eval mode so that the probe does not update BatchNorm statistics or sample dropout.
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), observe(model, lambda name, out: calls.append(name)):
            model(example_input)
    finally:
        for m, mode in training.items():
            m.training = mode
    return [name for name in calls if split_call_name(name)[0] not in skip]
