"""E(2)-steerable CNNs (C4 or D4) built with e2cnn, observable like any tmlib model.

Why e2cnn 0.2.3 and not escnn: e2cnn is the library Kvinge et al. tested against, it installs
from PyPI as pure Python and runs on current torch; escnn (its maintained successor) needs py3nj,
whose build compiles Fortran (Debian's gfortran first), a system dependency CI would have to add
for no gain on the planar groups used here.

e2cnn modules pass ``GeometricTensor`` objects between them; each observable layer here wraps one
e2cnn module so that it takes and returns a plain tensor ([b, C, H, W]), hence forward hooks, the
engine and every measure see ordinary activations. The wrapped module's ``out_type`` is kept, so
the group's *own* action on the layer (spatial rotation plus the permutation of the channels of
each regular field) is available for latent-equivariance measures: :meth:`SteerableCNN.latent_actions`.

Architecture (``fields`` = (f0, f1, f2) regular fields; |G| = 4 for C4, 8 for D4 channels each):
``conv0 bn0 act0 pool0 conv1 bn1 act1 pool1 conv2 bn2 act2`` (equivariant: regular fields),
``gpool`` (max over each field's group axis: invariant fields, still rotating spatially),
``gap`` (global average pool: invariant vector), ``fc0 fc0act fc1`` (invariant head, logits).
The image size must be a multiple of 4 so that both 2×2 poolings map the pixel grid onto itself
under quarter turns: then the C4/D4 invariance of the head is exact up to float rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["GROUPS", "READOUTS", "SteerableCNN", "group_elements"]

GROUPS = ("C4", "D4")
READOUTS = ("pool", "full")


def _e2cnn():
    try:
        from e2cnn import gspaces
        from e2cnn import nn as enn
        from e2cnn.kernels import irreps_basis
        from e2cnn.kernels import utils as kernel_utils
    except ImportError as error:  # pragma: no cover - e2cnn is a pinned dependency
        raise ImportError(
            "SteerableCNN needs e2cnn (pip install e2cnn==0.2.3; it is in tmlib's pinned dependencies)"
        ) from error
    _patch_for_numpy2(irreps_basis, kernel_utils)
    return gspaces, enn


class _NumpyWithoutCopyFalse:
    """numpy as e2cnn's kernel sampling expects it: ``np.array(x, copy=False)`` meant "copy only if
    needed" before numpy 2 (now it raises), which is ``np.asarray(x)``."""

    def __init__(self, numpy: Any) -> None:
        self._numpy = numpy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._numpy, name)

    def array(self, obj: Any, *args: Any, copy: Any = True, **kwargs: Any) -> Any:
        if copy is False:
            return self._numpy.asarray(obj, *args, **kwargs)
        return self._numpy.array(obj, *args, copy=copy, **kwargs)


def _patch_for_numpy2(irreps_basis: Any, kernel_utils: Any) -> None:
    """Two numpy-2 incompatibilities of e2cnn 0.2.3, both on the path of bases with reflections
    (D4; C4 avoids them): kernel bases hash ``ndarray.tostring()`` (removed; ``tobytes()`` gives the
    same bytes), and the angular samplers call ``np.array(x, copy=False)`` (see the shim above)."""
    if not isinstance(kernel_utils.np, _NumpyWithoutCopyFalse):
        kernel_utils.np = _NumpyWithoutCopyFalse(kernel_utils.np)

    def _bytes(value: Any) -> Any:
        return value.tobytes() if hasattr(value, "tobytes") else value

    def basis_hash(self: Any) -> int:
        return hash(self.in_irrep) + hash(self.out_irrep) + hash(_bytes(self.mu)) + hash(_bytes(self.gamma))

    for name in ("R2FlipsSolution", "R2ContinuousRotationsSolution",
                 "R2FlipsDiscreteRotationsSolution", "R2FlipsContinuousRotationsSolution"):
        cls = getattr(irreps_basis, name, None)
        if cls is not None and cls.__hash__ is not basis_hash and not getattr(cls, "_tmlib_patched", False):
            cls.__hash__ = basis_hash
            cls._tmlib_patched = True


class _FieldLayer(nn.Module):
    """One e2cnn module on plain tensors: wraps the input in its field type, unwraps the output."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.in_type = module.in_type
        self.out_type = module.out_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, enn = _e2cnn()
        return self.module(enn.GeometricTensor(x, self.in_type)).tensor


class _GlobalAveragePool(nn.Module):
    """[b, C, H, W] → [b, C]: the mean over the image, invariant to any permutation of the pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


def group_elements(gspace: Any, ts: Any, size: int = 8) -> list[Any]:
    """The element of ``gspace``'s group that acts on images like each transformation of ``ts``.

    Found by comparing e2cnn's action on a random probe image with ``ts.apply`` (exact for
    ``c4()``/``d4()``/``flips()``), so the two libraries' conventions (direction of a quarter turn,
    axis of the flip) need no guessing. Raises a ValueError for a transformation that no element
    of the group reproduces exactly (e.g. a 30° rotation under C4).
    """
    _, enn = _e2cnn()
    probe = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    trivial = enn.FieldType(gspace, [gspace.trivial_repr])
    moved = ts.apply(probe)[0]  # [m, 1, size, size]
    candidates = list(gspace.testing_elements)
    images = [enn.GeometricTensor(probe, trivial).transform(g).tensor[0] for g in candidates]
    out = []
    for j in range(len(ts)):
        hits = [g for g, image in zip(candidates, images) if torch.equal(image, moved[j])]
        if not hits:
            label = ts.labels()[j] if callable(getattr(ts, "labels", None)) else j
            raise ValueError(
                f"ts: transformation {label!r} is not an element of the group {gspace.fibergroup.name} "
                "acting exactly on the pixel grid; use c4() or d4()"
            )
        out.append(hits[0])
    return out


class SteerableCNN(nn.Module):
    """A C4- or D4-equivariant CNN (e2cnn) with an invariant head; input [b, in_channels, S, S].

    Args:
        in_channels, num_classes, image_size: as the other tmlib models (``image_size % 4 == 0``).
        group: ``"C4"`` (quarter turns) or ``"D4"`` (quarter turns and flips).
        fields: regular fields per equivariant stage (3 stages); channels = fields × |G|.
        fc_units: width of the invariant head's hidden layer.
        readout: how the field layers reach the invariant head. ``"pool"``: conv2 is a 3×3
            convolution and ``gap`` averages the group-pooled maps over the image (the head sees
            ``fields[2]`` spatial means); ``"full"``: conv2's kernel covers the whole S/4 × S/4 map
            left by the poolings (no padding), so the field layers end at 1×1 and the head keeps
            where each feature was, as a plain CNN's first fully connected layer does. Measured
            on MNIST (fields 4/8/16, Adam 2e-3, the quick profile's schedule): validation accuracy
            0.965 after 30,000 training images with ``"full"``; with ``"pool"`` 0.90–0.95, erratic,
            until 160,000 (fields 8/16/32).
    """

    paper_name = "SteerableCNN"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        group: str = "C4",
        fields: tuple[int, int, int] | list[int] = (4, 8, 16),
        fc_units: int = 64,
        readout: str = "pool",
    ) -> None:
        super().__init__()
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("fc_units", fc_units)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4 or image_size % 4:
            raise ValueError(
                f"image_size must be a positive multiple of 4 (two exact 2×2 poolings), got {image_size!r}"
            )
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        fields = tuple(fields)
        if len(fields) != 3 or not all(isinstance(f, int) and f >= 1 for f in fields):
            raise ValueError(f"fields must be 3 positive integers, got {fields!r}")
        self.config = {
            "in_channels": in_channels, "num_classes": num_classes, "image_size": image_size,
            "group": group, "fields": list(fields), "fc_units": fc_units, "readout": readout,
        }
        gspaces, enn = _e2cnn()
        with warnings.catch_warnings():
            # e2cnn 0.2.3 indexes with a uint8 mask while building its bases; harmless, noisy.
            warnings.filterwarnings("ignore", message="indexing with dtype torch.uint8")
            self._build(gspaces, enn, in_channels, fields, fc_units, num_classes)

    def _build(self, gspaces: Any, enn: Any, in_channels: int, fields: tuple[int, ...], fc_units: int,
               num_classes: int) -> None:
        group = self.config["group"]
        self.gspace = gspaces.Rot2dOnR2(N=4) if group == "C4" else gspaces.FlipRot2dOnR2(N=4)
        field_type = enn.FieldType(self.gspace, in_channels * [self.gspace.trivial_repr])
        # readout "full": the last convolution covers the whole map left by the two poolings (no
        # padding), so the field layers end at 1×1 and the head sees every position, like a
        # plain CNN's first fully connected layer (exact: kernel and map share their centre).
        full = self.config["readout"] == "full"
        kernels = (5, 5, self.config["image_size"] // 4 if full else 3)
        for i, (count, kernel) in enumerate(zip(fields, kernels)):
            out_type = enn.FieldType(self.gspace, count * [self.gspace.regular_repr])
            padding = 0 if full and i == 2 else kernel // 2
            self.add_module(f"conv{i}", _FieldLayer(enn.R2Conv(field_type, out_type, kernel, padding=padding)))
            self.add_module(f"bn{i}", _FieldLayer(enn.InnerBatchNorm(out_type)))
            self.add_module(f"act{i}", _FieldLayer(enn.ReLU(out_type)))
            if i < 2:
                self.add_module(f"pool{i}", _FieldLayer(enn.PointwiseMaxPool(out_type, 2)))
            field_type = out_type
        self.gpool = _FieldLayer(enn.GroupPooling(field_type))
        self.gap = _GlobalAveragePool()
        self.fc0 = nn.Linear(fields[-1], fc_units)
        self.fc0act = nn.ReLU()
        self.fc1 = nn.Linear(fc_units, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"{self.paper_name} expects input [b, {c}, {s}, {s}], got {list(x.shape)}")
        for module in self.children():
            x = module(x)
        return x

    # e2cnn's R2Conv caches its expanded filter as buffers in eval mode only, so a state saved in one
    # mode would not load in the other, and a cache kept across a load would be stale. The state is
    # the learnable weights (and BatchNorm statistics) alone; a load re-expands the filters.
    _CACHE_SUFFIXES = (".module.filter", ".module.expanded_bias")

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.endswith(self._CACHE_SUFFIXES)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        mode = self.training
        self.train(True)  # drops the cached filters
        state = {k: v for k, v in state_dict.items() if not k.endswith(self._CACHE_SUFFIXES)}
        result = super().load_state_dict(state, strict=strict, assign=assign)
        self.train(mode)  # in eval mode: expands the filters of the loaded weights
        return result

    def layer_names(self) -> list[str]:
        """Observable layers in forward order (the children: each returns a plain tensor)."""
        return [name for name, _ in self.named_children()]

    def equivariant_layers(self) -> list[str]:
        """Layers carrying fields on which the group acts (rotating maps): conv…gpool."""
        return [name for name, module in self.named_children() if isinstance(module, _FieldLayer)]

    def invariant_layers(self) -> list[str]:
        """The head, invariant by construction: gap and the fully connected layers."""
        fields = set(self.equivariant_layers())
        return [name for name in self.layer_names() if name not in fields]

    def latent_actions(self, ts: Any) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The group's action on every layer, for :class:`~tmlib.measures.GEEDEquivariance`:
        ``{layer: f(x) [b, *shape] → g·f(x) [b, m, *shape]}``, one g per transformation of ``ts``.

        Field layers use their field type's action (e2cnn ``GeometricTensor.transform``); the
        invariant head uses the trivial action."""
        elements = group_elements(self.gspace, ts)
        actions: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        for name, module in self.named_children():
            if isinstance(module, _FieldLayer):
                actions[name] = _field_action(module.out_type, elements, ts)
            else:
                actions[name] = _trivial_action(len(elements))
        return actions


def _field_action(field_type: Any, elements: list[Any], ts: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """g·f = ρ(g) (f moved spatially by g) for every g: the spatial part is ``ts.apply`` (the same
    pixel permutation as e2cnn's, see :func:`group_elements`), the fibre part ρ(g) is the field
    type's representation. For regular and trivial fields ρ(g) is a permutation matrix, applied as
    a channel permutation (exact, and ~10× faster than ``GeometricTensor.transform``); otherwise
    as a matrix product."""
    matrices = [np.asarray(field_type.representation(g), dtype=np.float64) for g in elements]
    permutations = [_as_permutation(r) for r in matrices]
    if all(p is not None for p in permutations):
        index = torch.as_tensor(np.stack(permutations))  # [m, C]: output channel c reads index[g, c]
        group = torch.arange(len(elements)).unsqueeze(1)  # [m, 1]: row g of the index reads element g

        def act(fx: torch.Tensor) -> torch.Tensor:
            moved = ts.apply(fx, fill=0.0)  # [b, m, C, H, W]
            # Indexing copies whole H×W planes: 2–3× faster than a gather with the index expanded
            # over every pixel (the same values; 0.31 of a 1.4-s G-EED pass of the C4 model).
            return moved[:, group.to(fx.device), index.to(fx.device)]

        return act
    rho = torch.as_tensor(np.stack(matrices))

    def act_linear(fx: torch.Tensor) -> torch.Tensor:
        moved = ts.apply(fx, fill=0.0)
        return torch.einsum("gij,bgjhw->bgihw", rho.to(device=fx.device, dtype=fx.dtype), moved)

    return act_linear


def _as_permutation(matrix: np.ndarray, tol: float = 1e-9) -> np.ndarray | None:
    """``p`` with matrix[c, p[c]] = 1 and zeros elsewhere (within ``tol``), or None."""
    rounded = np.round(matrix)
    if np.abs(matrix - rounded).max() > tol or not set(np.unique(rounded)) <= {0.0, 1.0}:
        return None
    if not ((rounded.sum(axis=0) == 1).all() and (rounded.sum(axis=1) == 1).all()):
        return None
    return rounded.argmax(axis=1)


def _trivial_action(m: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def act(fx: torch.Tensor) -> torch.Tensor:
        return fx.unsqueeze(1).expand(fx.shape[0], m, *fx.shape[1:])

    return act
