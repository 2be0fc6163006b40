"""Lie derivatives of any layer by forward-mode JVPs, and the LEE of Gruver et al. (see :mod:`tmlib.lie`)."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..activations import LayerObserver
from ..checks import check_images
from . import forward_mode
from .tangents import OUTPUT, check_model, generator_matrix, tangents

__all__ = ["JVP_METHODS", "batches", "check_jvp_method", "default_layers", "equivariant_correction", "jvp_many", "layer_function", "lie_derivative", "normalise_layers"]


def default_layers(model: Any) -> list[str]:
    names = getattr(model, "layer_names", None)
    if callable(names):
        return list(names())
    return [OUTPUT]


def normalise_layers(model: Any, layers: Any, argument: str) -> list[str]:
    if layers is None:
        return [OUTPUT]
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError(f"{argument} must name at least one layer")
    for layer in layers:
        if not isinstance(layer, str):
            raise TypeError(f"{argument}: layer names must be strings, got {layer!r}")
    hooked = [name for name in layers if name != OUTPUT or _has_module(model, OUTPUT)]
    if hooked:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{argument}: hidden layers need model to be a torch.nn.Module, got {type(model).__name__}")
        try:
            LayerObserver(model, hooked, lambda *_: None)  # validates the names, registers nothing
        except ValueError as err:
            raise ValueError(f"{argument}: {err}") from None
    return layers


def _has_module(model: Any, name: str) -> bool:
    return isinstance(model, nn.Module) and name in dict(model.named_modules())


def layer_function(model: Any, layers: list[str]) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """A function x → (output of each layer, in order), capturing hidden layers with hooks."""
    hooked = [name for name in layers if name != OUTPUT or _has_module(model, OUTPUT)]

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not hooked:
            return (model(x),)
        captured: dict[str, torch.Tensor] = {}
        # Not detached: under torch.func.jvp/vmap the dual tensor carries the tangent.
        with LayerObserver(model, hooked, captured.__setitem__, detach=False) as observer:
            out = model(x)
            observer.check_seen()
        return tuple(out if name == OUTPUT and name not in captured else captured[name] for name in layers)

    return run


# ---------------------------------------------------------------------------------- forward mode


#: Functions whose forward called something :mod:`tmlib.lie.forward_mode` has no rule for: they go
#: to torch.func from their second batch on (the closures of one measurement, so one try each).
_NEEDS_TORCH_FUNC: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

JVP_METHODS = ("auto", "tangents", "torch.func")


def check_jvp_method(method: Any, argument: str = "jvp") -> str:
    if not isinstance(method, str) or method not in JVP_METHODS:
        raise ValueError(f"{argument} must be one of {JVP_METHODS}, got {method!r}")
    return method


def jvp_many(fn: Callable, x: torch.Tensor, vs: torch.Tensor, vectorize: bool = True, method: str = "auto"):
    """Primal outputs of fn(x) and their JVPs along each tangent vs[i]: (tuple, tuple of [k, ...]).

    ``method``: ``"tangents"`` propagates the k tangents beside one plain forward
    (:mod:`tmlib.lie.forward_mode`; :class:`~tmlib.lie.forward_mode.Unsupported` where the forward
    calls a function it has no rule for), ``"torch.func"`` runs ``vmap(jvp)`` (a loop of ``jvp``
    with ``vectorize=False``), ``"auto"`` the first and, where it is unsupported, the second.
    """
    check_jvp_method(method, "method")
    if method == "tangents" or (method == "auto" and fn not in _NEEDS_TORCH_FUNC):
        try:
            return forward_mode.jvp_tangents(fn, x, vs)
        except forward_mode.Unsupported:
            if method == "tangents":
                raise
            _NEEDS_TORCH_FUNC[fn] = True
    with warnings.catch_warnings():
        # torch's forward-AD decompositions call the deprecated torch.jit.script on their first use
        # (torch 2.14): a FutureWarning about torch itself that no caller can act on.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        return _jvp_many(fn, x, vs, vectorize)


def _jvp_many(fn: Callable, x: torch.Tensor, vs: torch.Tensor, vectorize: bool):
    if vectorize and len(vs) > 1:
        try:
            def push(v):
                return torch.func.jvp(fn, (x,), (v,))

            primal, jv = torch.func.vmap(push, in_dims=0, out_dims=(None, 0))(vs)
            return primal, jv
        except Exception:  # noqa: BLE001, S110  (an op without a batching rule: loop instead)
            pass
    outs = [torch.func.jvp(fn, (x,), (v,)) for v in vs]
    primal = outs[0][0]
    return primal, tuple(torch.stack([o[1][i] for o in outs]) for i in range(len(primal)))


def equivariant_correction(out: torch.Tensor, gens: torch.Tensor, fill: Any) -> torch.Tensor | None:
    """Tangent of the output action on an image-shaped layer output [b, C, H, W]: [k, b, C, H, W]."""
    if out.dim() != 4:
        return None
    return tangents(out, gens, fill)


def lie_derivative(
    model: Callable,
    x: torch.Tensor,
    generator: str | torch.Tensor,
    layer: str | None = None,
    fill: Any = None,
    equivariant: bool = False,
    jvp: str = "auto",
) -> torch.Tensor:
    """Lie derivative ``L_h f(x) = J_f(x) v_h(x)`` of the model output or of one layer, by JVP.

    Args:
        model: an nn.Module (or any function of x when ``layer`` is None).
        x: images [b, C, H, W].
        generator: a name of :data:`GENERATORS` or a 2×2 / 2×3 / 3×3 generator matrix.
        layer: a module path (``tmlib.activations`` names, ``path#k`` for the k-th call) or None /
            ``"output"`` for what the model returns.
        fill: border extension of x for the image gradient (see :func:`tangent`).
        equivariant: for image-shaped layer outputs [b, C', H', W'], subtract the tangent of the
            output itself (``J_f v_h(x) - v_h(f(x))``, same normalised coordinates), measuring
            equivariance; other shapes are unaffected.
        jvp: ``"auto"``, ``"tangents"`` or ``"torch.func"`` (see :func:`jvp_many`).

    Returns:
        [b, *layer_shape] in the layer's dtype (per unit of the generator's parameter).
    """
    check_model(model)
    check_images(x, allow_empty=False)
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name (str) or None, got {type(layer).__name__}")
    layers = normalise_layers(model, layer, "layer")
    check_jvp_method(jvp)
    gens = generator_matrix(generator).unsqueeze(0)
    vs = tangents(x, gens, fill)
    with torch.no_grad():
        primal, jv = jvp_many(layer_function(model, layers), x, vs, method=jvp)
        out = jv[0][0]
        if equivariant:
            corr = equivariant_correction(primal[0], gens, fill)
            if corr is not None:
                out = out - corr[0]
    return out


def batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)
