"""The two state primitives every accumulator of tmlib is built from.

* :class:`ShiftedMoments` — exact, mergeable first and second moments of n vectors around a shift
  (the first vector seen): float64 n, K, Σ(x − K), Σ(x − K)². Shifting by a member makes a
  constant coordinate give exactly zero variance (NV's 0/0 → 1 convention needs it) and keeps
  cancellation harmless; :meth:`ShiftedMoments.merge` re-expresses the other part's sums around
  this shift (Chan et al.), so parts merge exactly whatever their shifts.
* :class:`SumState` — the base of every state: its fields are declared with their reduction in
  ``reductions`` ({field: "sum" | "state" | "cat"}), and :meth:`SumState.merge` merges them
  field by field: ``"sum"`` adds (tensors, floats, ints; None is empty), ``"state"`` merges a
  nested state with its own ``merge`` (a :class:`ShiftedMoments`: exact shift change), ``"cat"``
  concatenates lists of per-sample chunks in sample order. Other attributes are configuration
  (shapes, options) or positions (a sample cursor) and are not merged.

The declared reduction is what a distributed reduction needs: ``"sum"`` is an all-reduce sum,
``"state"`` recurses (moments: an all-reduce after re-shifting to a common shift, or
:meth:`ShiftedMoments.merge` pairwise), ``"cat"`` an all-gather in rank order. States that cannot
be merged field by field override ``merge`` and say why (Goodfellow's counts merge only within
one reference pass, whose thresholds they share).

A state that needs the index of its samples (reading a reference pass by sample, keeping the
first samples' activations) implements ``seek(start, stop)``: the engine calls it before the first
update with the range of samples the state will be fed (one sample block, or all n).

:meth:`SumState.copy` gives a state that can be merged into without touching the original (sums
and nested states copied, chunk lists copied, the chunks themselves shared: they are never
written after the pass).
"""

from __future__ import annotations

import copy as _copy
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from ..jit import HAVE_NUMBA as _HAVE_NUMBA  # numba's pool and threading layer: see tmlib.jit
from ..jit import numba

__all__ = ["ShiftedMoments", "SumState", "numpy_view"]

_REDUCTIONS = ("sum", "state", "cat")

if _HAVE_NUMBA:

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _merge_kernel(s1, s2, o1, o2, shift, oshift, n_other):  # pragma: no cover
        # Chan's shift change in one read of the six arrays, in the order of the torch ops.
        for p in numba.prange(s1.size):
            d = oshift[p] - shift[p]
            a = o1[p]
            s2[p] = ((s2[p] + o2[p]) + 2.0 * (d * a)) + n_other * (d * d)
            s1[p] = (s1[p] + a) + n_other * d

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _update_kernel(x, shift, s1, s2, tile):  # pragma: no cover
        # x [b, P] (float32 or float64); Σ (x − K) and Σ (x − K)² added in float64, one read of x.
        # Slices indexed from 0: an index from the tile's start, which LLVM cannot prove
        # non-negative (numba wraps negative indices), kept this loop scalar. Bit-identical.
        b, p = x.shape
        for t in numba.prange((p + tile - 1) // tile):
            f0 = t * tile
            f1 = min(p, f0 + tile)
            centre = shift[f0:f1]
            t1 = s1[f0:f1]
            t2 = s2[f0:f1]
            for i in range(b):
                row = x[i, f0:f1]
                for f in range(f1 - f0):
                    d = np.float64(row[f]) - centre[f]
                    t1[f] += d
                    t2[f] += d * d


_TILE = 1024  # vector entries per parallel work item of _update_kernel


def numpy_view(x: torch.Tensor) -> Any:
    """x as a numpy array sharing its memory, for a numba kernel; None where numba cannot read it
    (not installed, another device, a tensor that needs grad, a torch.func wrapper, an integer dtype)."""
    if not _HAVE_NUMBA or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.requires_grad:
        return None
    try:
        return x.numpy()
    except (RuntimeError, TypeError):  # e.g. a functorch-wrapped tensor
        return None


def _add(a: Any, b: Any) -> Any:
    if b is None:
        return a
    if a is None:
        return b.clone() if isinstance(b, torch.Tensor) else b
    if isinstance(a, torch.Tensor):
        return a + b.to(a.device)
    return a + b


def _finite(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    return True


class SumState:
    """Base of tmlib's states: fields that merge by their declared reduction (see the module
    docstring). Subclasses set ``reductions`` and implement ``update(block)``."""

    reductions: ClassVar[Mapping[str, str]] = {}

    def update(self, block: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge(self, other: SumState) -> SumState:
        """Add ``other``'s samples to this state (in place; returns self)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        for field, reduction in self.reductions.items():
            mine, theirs = getattr(self, field), getattr(other, field)
            if reduction == "sum":
                setattr(self, field, _add(mine, theirs))
            elif reduction == "state":
                if mine is None or theirs is None:  # e.g. nothing kept for a layer that is skipped
                    if (mine is None) != (theirs is None):
                        raise ValueError(f"{type(self).__name__}.{field}: one state holds it, the other not")
                    continue
                mine.merge(theirs)
            else:  # "cat"
                mine.extend(theirs)
        return self

    def copy(self) -> SumState:
        """A copy that merges without changing this state (see the module docstring)."""
        new = _copy.copy(self)
        for field, reduction in self.reductions.items():
            value = getattr(self, field)
            if reduction == "sum" and isinstance(value, torch.Tensor):
                setattr(new, field, value.clone())
            elif reduction == "state" and value is not None:
                setattr(new, field, value.copy())
            elif reduction == "cat":
                setattr(new, field, list(value))
        return new

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bad = {f: r for f, r in cls.reductions.items() if r not in _REDUCTIONS}
        if bad:
            raise TypeError(f"{cls.__name__}.reductions: unknown reductions {bad}; use one of {_REDUCTIONS}")

    def is_finite(self) -> bool:
        """False if a NaN or ±inf reached a sum or moments field (they propagate into sums)."""
        for field, reduction in self.reductions.items():
            value = getattr(self, field)
            if reduction == "sum" and not _finite(value):
                return False
            if reduction == "state" and value is not None and not value.is_finite():
                return False
        return True

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (its fields and those of nested states)."""
        return _nbytes(self.__dict__.values(), set())


def _nbytes(values: Any, seen: set[int]) -> int:
    total = 0
    for value in values:
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, SumState):
            total += _nbytes(value.__dict__.values(), seen)
        elif isinstance(value, (list, tuple)):
            total += _nbytes(value, seen)
    return total


class ShiftedMoments(SumState):
    """Exact float64 moments of n vectors of shape ``shape``, shifted by the first one.

    On the CPU, ``update`` and ``merge`` are fused numba kernels (one read of the data); with
    ``fused=False`` (the states of ``backend="torch"``) or on other devices they are torch ops.

    ``update(x [b, *shape])``; ``mean()``, ``variance()`` (unbiased) and ``sum_squares()``
    (Σ (x − mean)²) read it out as float64 tensors of ``shape``. Merging is exact (Chan's shift
    change: Σ(x−K) = Σ(x−K') + n'δ, Σ(x−K)² = Σ(x−K')² + 2δ·Σ(x−K') + n'δ², δ = K' − K).
    """

    reductions: ClassVar[Mapping[str, str]] = {}  # merged by its own method (shift change)

    def __init__(self, shape: tuple[int, ...], device: torch.device | str = "cpu", fused: bool = True) -> None:
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.fused = fused  # False: torch ops even on the CPU (a state of backend="torch")
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1 = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        self.s2 = torch.zeros(self.shape, dtype=torch.float64, device=self.device)

    def update(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected vectors of shape {self.shape}, got {tuple(x.shape[1:])}")
        if self.shift is None:
            self.shift = x[0].to(torch.float64).clone()
        flat = numpy_view(x.reshape(x.shape[0], -1).contiguous()) if self._kernels() else None
        if flat is not None:  # one read of x, no float64 temporaries of its size
            _update_kernel(flat, *(t.reshape(-1).numpy() for t in (self.shift, self.s1, self.s2)), _TILE)
            self.n += x.shape[0]
            return
        d = x.to(torch.float64) - self.shift
        self.s1 += d.sum(0)
        self.s2 += d.square_().sum(0)  # in place: one temporary of x's size, not two
        self.n += x.shape[0]

    def copy(self) -> ShiftedMoments:
        new = _copy.copy(self)
        new.s1, new.s2 = self.s1.clone(), self.s2.clone()
        new.shift = None if self.shift is None else self.shift.clone()
        return new

    def start(self, first: torch.Tensor) -> None:
        """Set the shift from the first vector, for kernels that add to ``s1``/``s2`` themselves
        (they then add the samples to ``n``)."""
        if self.shift is None:
            self.shift = first.to(torch.float64).clone()

    def merge(self, other: ShiftedMoments) -> ShiftedMoments:
        if other.shape != self.shape:
            raise ValueError(f"can only merge moments of the same shape: {self.shape} vs {other.shape}")
        if other.n == 0:
            return self
        if self.n == 0:
            self.shift = other.shift.to(self.device).clone()
        o1, o2, oshift = other.s1.to(self.device), other.s2.to(self.device), other.shift.to(self.device)
        flat = [t.reshape(-1) for t in (self.s1, self.s2, o1, o2, self.shift, oshift)]
        if self._kernels() and all(t.is_contiguous() for t in flat):
            # One read of the six arrays instead of five passes and a temporary: a jackknife's
            # tree merges these [m, F] float64 arrays K·⌈log₂ K⌉ times (benchmarks/bench_jackknife.py).
            _merge_kernel(*(t.numpy() for t in flat), float(other.n))
            self.n += other.n
            return self
        delta = oshift - self.shift
        # In place, one temporary (delta): these tensors are [m, F] float64, the size of the states.
        self.s2 += o2
        self.s2.addcmul_(delta, o1, value=2.0)
        self.s2.addcmul_(delta, delta, value=float(other.n))
        self.s1 += o1
        self.s1.add_(delta, alpha=float(other.n))
        self.n += other.n
        return self

    def _kernels(self) -> bool:
        """Whether update and merge run the fused CPU kernels (``fused`` is absent from states
        saved before it existed: they fuse)."""
        return _HAVE_NUMBA and getattr(self, "fused", True) and self.device.type == "cpu"

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.s2).all())

    def mean(self) -> torch.Tensor:
        return self.shift + self.s1 / self.n

    def sum_squares(self) -> torch.Tensor:
        """Σ (x − mean)², clamped at 0 (rounding can leave −1e-17 for constant coordinates)."""
        return (self.s2 - self.s1.square() / self.n).clamp(min=0.0)

    def variance(self) -> torch.Tensor:
        """Unbiased variance (n − 1 in the denominator); needs n ≥ 2."""
        if self.n < 2:
            raise ValueError(f"the variance needs at least 2 samples, got n={self.n}")
        # (s2 − s1²/n)/(n − 1) with one temporary: −(s1²/n) + s2 is the same IEEE sum.
        out = self.s1.square().div_(-self.n).add_(self.s2)
        return out.div_(self.n - 1).clamp_(min=0.0)
