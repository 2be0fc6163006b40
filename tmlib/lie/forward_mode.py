"""Forward-mode JVPs of k tangents at once by propagating them beside one plain forward.

Why not only ``torch.func``: its ``vmap(jvp)`` is exact and general, but on small layers its
per-op cost dwarfs the arithmetic. Profiled on a 3 × 128 MLP, batch 64, 5 tangents (torch 2.14,
CPU): each ``linear``'s bias tangent is an efficient zero tensor whose add runs through Python
reference decompositions (≈ 0.65 ms per add, 4 per forward), and the weight's zero tangent costs a
third, primal-sized ``mm``; the whole JVP took 4.2 ms against 0.3 ms for the forward of the 64
images and 1.2 ms for the forward of the 320 tangents.

Here the model runs its own forward once, on the primal batch, under a
:class:`~torch.overrides.TorchFunctionMode` that sees every torch function the forward calls. For
each call on a tensor that depends on the input, a rule computes the output's tangents
[k, *output.shape] from the inputs' (one batched op: a linear map of the k·b tangents, or the
primal's mask or derivative times them), so the k tangents cost what k·b images' linear parts
cost. The rules (:mod:`tmlib.lie.tangent_rules`) cover what the models of this library and most
image classifiers call; a forward that calls anything else on an input-dependent float tensor raises
:class:`Unsupported`, and :func:`tmlib.lie.derivative.jvp_many` then runs ``torch.func`` for that
function from then on. ``tests/test_lie_forward_mode.py`` compares both on every model of :mod:`tmlib.models`,
hidden layers and in-place activations included.

The parameters are constants here (their tangents are zero): the JVP is with respect to the input.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .tangent_rules import (
    MAX_POOL_NAMES,
    READ_KEYWORD_TENSORS,
    REFUSED_BEFORE,
    RULES,
    Unsupported,
    identity,
    in_place,
    max_pool2d,
)

__all__ = ["Unsupported", "jvp_tangents"]


class _Tangents:
    """Tangents [k, *t.shape] of the tensors that depend on the input, keyed by the tensor's id.

    An entry goes when its tensor is freed (a weakref callback, which runs before the id can be
    reused), so a forward holds no more intermediates than it would without this."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._entries: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def get(self, t: Any) -> torch.Tensor | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._entries.get(id(t))
        return None if entry is None else entry[1]

    def set(self, t: torch.Tensor, tangent: torch.Tensor) -> None:
        key = id(t)
        entries = self._entries
        self._entries[key] = (weakref.ref(t, lambda _, key=key: entries.pop(key, None)), tangent)

    def of(self, t: Any, shape: torch.Size) -> torch.Tensor | None:
        """The tangent of t broadcast to [k, *shape] (None where t is a constant)."""
        tangent = self.get(t)
        if tangent is None:
            return None
        extra = len(shape) - (tangent.dim() - 1)
        if extra > 0:  # right-aligned broadcasting, the k dimension in front
            tangent = tangent.reshape(self.k, *([1] * extra), *tangent.shape[1:])
        return tangent

    def checkin_place(self, t: torch.Tensor) -> None:
        """An in-place op on t leaves other tensors that share its memory with stale tangents."""
        storage = t.untyped_storage().data_ptr()
        for ref, _ in self._entries.values():
            other = ref()
            if other is not None and other is not t and other.untyped_storage().data_ptr() == storage:
                raise Unsupported("an in-place op on a tensor that shares its memory with another")

    def any_of(self, args: Any) -> bool:
        if isinstance(args, torch.Tensor):
            return id(args) in self._entries
        if isinstance(args, (list, tuple)):
            return any(self.any_of(a) for a in args)
        if isinstance(args, dict):
            return any(self.any_of(a) for a in args.values())
        return False


def _differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


class _TangentMode(TorchFunctionMode):
    def __init__(self, tangents: _Tangents) -> None:
        super().__init__()
        self.tangents = tangents

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tangents = self.tangents
        if not (tangents.any_of(args) or tangents.any_of(kwargs)):
            return func(*args, **kwargs)
        rule = RULES.get(func)
        # Decided before the call where the call itself would change what torch.func then reruns:
        # an in-place op on an input-dependent tensor (the input itself, perhaps), batch
        # statistics, a dropout draw.
        if in_place(func, args, kwargs):
            if rule is None:
                raise Unsupported(f"no tangent rule for the in-place {getattr(func, '__qualname__', func)}")
            tangents.checkin_place(args[0])
        if "out" in kwargs or func in REFUSED_BEFORE and REFUSED_BEFORE[func](args, kwargs):
            raise Unsupported(f"{getattr(func, '__qualname__', func)} with these arguments")
        if func is F.max_pool2d:  # the primal call also gives the indices the tangent needs
            bound = dict(zip(MAX_POOL_NAMES, args)) | kwargs
            wanted = bound.pop("return_indices", False)
            out, indices = F.max_pool2d(**bound, return_indices=True)
            tangents.set(out, max_pool2d(tangents, out, bound["input"], indices))
            return (out, indices) if wanted else out
        out = func(*args, **kwargs)
        if isinstance(out, (tuple, list)) and any(_differentiable(o) for o in out):
            raise Unsupported(f"no tangent rule for {getattr(func, '__qualname__', func)} (returns several tensors)")
        if not _differentiable(out):
            return out  # sizes, comparisons, indices: nothing to differentiate
        if rule is None:
            raise Unsupported(f"no tangent rule for {getattr(func, '__qualname__', func)}")
        if tangents.any_of(kwargs) and rule not in READ_KEYWORD_TENSORS:
            raise Unsupported(f"{getattr(func, '__qualname__', func)} with an input-dependent keyword argument")
        if args and out is args[0] and rule is not identity:
            tangents.checkin_place(out)
        try:
            tangent = rule(tangents, out, args, kwargs)
        except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as err:  # a call the rule does not know
            raise Unsupported(f"the rule for {getattr(func, '__qualname__', func)} failed: {err}") from err
        if tangent is not None:
            if tangent.dtype != out.dtype or tangent.shape != (tangents.k, *out.shape):
                raise Unsupported(f"the rule for {getattr(func, '__qualname__', func)} gave a tangent "
                                  f"{tuple(tangent.shape)} {tangent.dtype} for an output {tuple(out.shape)} {out.dtype}")
            tangents.set(out, tangent)
        return out


def jvp_tangents(fn: Callable, x: torch.Tensor, vs: torch.Tensor) -> tuple[tuple, tuple]:
    """``fn(x)`` (a tuple of tensors) and the JVPs of its outputs along each tangent vs [k, *x.shape]:
    (primal tuple, tuple of [k, *output.shape]); raises :class:`Unsupported` where a rule is missing.
    Run under ``torch.no_grad()``."""
    if vs.shape[1:] != x.shape:
        raise ValueError(f"vs must have shape [k, {', '.join(map(str, x.shape))}], got {tuple(vs.shape)}")
    tangents = _Tangents(len(vs))
    # fn gets its own alias of x so that the caller's x carries no tangent after the call
    x = x.view_as(x)
    tangents.set(x, vs)
    with _TangentMode(tangents):
        primal = fn(x)
    jv = []
    for p in primal:
        tangent = tangents.get(p)
        jv.append(torch.zeros(len(vs), *p.shape, dtype=p.dtype, device=p.device) if tangent is None
                  else tangent.expand(len(vs), *p.shape))
    return tuple(primal), tuple(jv)
