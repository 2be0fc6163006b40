"""Layers of tmlib's models that compute faster where only their values are asked for.

A measurement forwards n·m transformed images under ``no_grad``. Two of torch 2.14.1's CPU kernels
in SimpleConv's forwards cost far more than their arithmetic (profiled on 2 cores):

* ``nn.MaxPool2d(2)`` also keeps the argmax of every window: 10.8 ms for a [272, 16, 28, 28]
  float32 block, a sixth of the forwards (0.41 of 2.4 s). The maximum of the window's four
  strided views is the same number — a maximum is exact, and NaN propagates in both — in 1.25 ms.
* ``nn.ELU`` evaluates ``expm1`` one value at a time where the input is negative: 30–37 ms for a
  [256, 32, 28, 28] block of real activations (17.9 ms for [250, 16, 28, 28] of ``randn``, but
  2.0 ms for positive ``rand``: a measurement on positive values once made it look cheap), as
  much as the convolutions (ELU 1.26 s, conv2d 1.22 s of a 3.4 s pass). :func:`elu_float32` is
  one vectorised pass: ``expm1`` in float64, from ``expm1(d/64)`` (a degree-12 Taylor polynomial,
  |d/64| ≤ 0.28) doubled six times by ``expm1(2y) = expm1(y)·(expm1(y) + 2)`` (no cancellation
  anywhere), rounded once to float32. That is the correctly rounded ``expm1`` (equal to torch's
  float64 ``expm1`` rounded, on 20 million random negative floats, 2 million in the test, and
  every edge case tested); torch's own float32 ``expm1`` is within 1 ulp of it, so the two ELUs differ
  by 1 ulp in ≈ 0.1 % of the values and nowhere by more. 11–14 ms for the block above as first
  written (its loop indexed from the chunk's start, which LLVM vectorised with a gather and a
  scatter per 8 values), 3.2–3.9 ms since it reads slices (2 G values/s; bit-identical).
  How fast torch's own ELU is depends on the CPU torch dispatches for
  (``torch.backends.cpu.get_cpu_capability()``; measured on one [256, 32, 28, 28] block, on one
  AVX-512 machine, forcing each with ``ATEN_CPU_CAPABILITY``): 3.5–3.8 ms with AVX-512 (on a par
  with this kernel), 9.6 ms with AVX2 and 56 ms without vectors, beside this kernel's 3.2–5.3 ms
  in the same runs (numba compiles it for the machine's CPU whatever torch dispatches); on the
  machine where the 26–37 ms above were measured torch took one of its slower paths.
  ``benchmarks/bench_layers.py`` prints the ratios on the machine it runs on.

Where anything else than the values matters, torch's own kernels run, so gradients, training and
the Lie derivative's tangents are exactly as before:

* autograd recording (a gradient's route through a tie is torch's choice of argmax);
* a torch function mode (tmlib's forward-mode tangents) or a functorch transform (torch.func's
  ``jvp``/``vmap``), which see ``max_pool2d`` and ``elu`` as functions with their own derivatives;
* any other window, stride, padding, dilation, ``ceil_mode`` or ``return_indices``; an ELU of
  another dtype than float32 or without numba; any device but the CPU (CUDA's kernels are not the
  bottleneck there). Every float32 value of a forward takes the same ELU, whatever the tensor's
  size or layout: a model's outputs stay independent of the batch size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .jit import HAVE_NUMBA, fma, numba

__all__ = ["ELU", "MaxPool2d", "elu_float32", "max_pool2x2", "values_only"]


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` of ``x`` [..., H, W] as the maximum of four strided views: the same
    values (an odd last row or column is dropped, as torch does)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                         torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


# torch's own tests of "a mode or transform is active" are private: without them (another torch
# release) the four maxima are never taken, and torch's kernel runs as in nn.MaxPool2d.
_MODE_ENABLED = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_LEVEL = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def values_only(x: torch.Tensor) -> bool:
    """Nothing but the output's values is asked of this call (see the module docstring)."""
    if _MODE_ENABLED is None or _LEVEL is None or _WRAPPED is None:
        return False
    return (x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)
            and not _MODE_ENABLED() and _LEVEL() is None and not _WRAPPED(x))


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose 2×2, stride-2 window takes :func:`max_pool2x2` when only values are
    asked for (no autograd, no tangents, the CPU); torch's kernel otherwise. Same arguments,
    same outputs, same state (none)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.MaxPool2d's name
        if self._plain_2x2 and input.dim() in (3, 4) and values_only(input):
            return max_pool2x2(input)
        return super().forward(input)

    @property
    def _plain_2x2(self) -> bool:
        def pair(value):
            return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

        return (pair(self.kernel_size) == (2, 2) and pair(self.stride) == (2, 2) and pair(self.padding) == (0, 0)
                and pair(self.dilation) == (1, 1) and not self.ceil_mode and not self.return_indices)


# ---------------------------------------------------------------------------------------- ELU

_DOUBLINGS = 6  # expm1(d) from expm1(d / 2⁶): |d / 64| ≤ 17.5 / 64 < 0.28
# Below this float32's expm1 rounds to −1: e^d < 2⁻²⁵ (half an ulp of 1 − 2⁻²⁴) for d < −17.33.
_FLOOR = -17.5
_C = tuple(1.0 / math.factorial(k) for k in range(1, 13))

if HAVE_NUMBA:
    c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12 = _C  # numba reads globals as constants
    _SCALE = 1.0 / (1 << _DOUBLINGS)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _elu_kernel(x, out, alpha, in_place):  # pragma: no cover - compiled
        # x, out: float32 [N]. Branch-free but for the last select, so LLVM vectorises it (8
        # float64 lanes with AVX-512). A NaN passes the clamp (d < floor is false) and stays NaN;
        # −0.0 gives −0.0 (y·p with p = 1 + …, then e·(e + 2) = −0·2), as torch's ELU does.
        # Each chunk is read through its own slice, indexed from 0: indexed x[c·chunk + k], LLVM
        # cannot rule out a negative index (numba wraps those around), so it vectorised the loop
        # with a gather and a scatter per 8 values (0.75 G values/s; 2.3 G values/s as slices,
        # bit-identical). In place (out is x) the values go to a buffer of the chunk and then to
        # ``out``: written straight back, the loop fails LLVM's run-time overlap check and runs
        # scalar (10.5 ms against 1.8 ms for [250, 16, 28, 28]); out of place, the buffer would
        # cost 1.55 → 2.2 ms.
        n = x.size
        chunk = 4096
        for c in numba.prange((n + chunk - 1) // chunk):
            start = c * chunk
            source = x[start : min(n, start + chunk)]
            target = out[start : min(n, start + chunk)]
            buffer = np.empty(source.size, np.float32) if in_place else target
            for i in range(source.size):
                v = source[i]
                d = np.float64(v)
                d = _FLOOR if d < _FLOOR else d
                y = d * _SCALE
                p = fma(y, c12, c11)
                p = fma(y, p, c10)
                p = fma(y, p, c9)
                p = fma(y, p, c8)
                p = fma(y, p, c7)
                p = fma(y, p, c6)
                p = fma(y, p, c5)
                p = fma(y, p, c4)
                p = fma(y, p, c3)
                p = fma(y, p, c2)
                p = fma(y, p, c1)
                e = y * p
                e = e * (e + 2.0)  # six doublings: expm1(2y) = expm1(y)·(expm1(y) + 2)
                e = e * (e + 2.0)
                e = e * (e + 2.0)
                e = e * (e + 2.0)
                e = e * (e + 2.0)
                e = e * (e + 2.0)
                buffer[i] = v if v > 0 else np.float32(e) * alpha
            if in_place:
                target[:] = buffer


def elu_float32(x: torch.Tensor, alpha: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.elu(x, alpha)`` of a float32 CPU tensor, with the correctly rounded ``expm1`` (within 1
    ulp of torch's; see the module docstring), into ``out`` (default: a new tensor; ``x`` itself
    for in place). A tensor that is not contiguous is read as a contiguous copy. Needs numba."""
    if not HAVE_NUMBA:
        raise RuntimeError("elu_float32 needs numba (tmlib's pinned dependency); use torch.nn.functional.elu")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x: a float32 CPU tensor is needed, got {x.dtype} on {x.device}")
    # `out` is checked before choosing where to write: a strided `out` is written through a copy,
    # which must not hide a wrong shape, dtype or device.
    if out is not None and (out.shape != x.shape or out.dtype != torch.float32 or out.device.type != "cpu"):
        raise ValueError(
            f"out: a float32 CPU tensor of x's shape {list(x.shape)} is needed, got {out.dtype} {list(out.shape)} on {out.device}"
        )
    source = x.detach().contiguous()
    target = torch.empty_like(source) if out is None or not out.is_contiguous() else out
    in_place = target.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
    _elu_kernel(source.view(-1).numpy(), target.detach().view(-1).numpy(), np.float32(alpha), in_place)
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target


class ELU(nn.ELU):
    """``nn.ELU`` that takes :func:`elu_float32` when only values are asked for (no autograd, no
    tangents, a float32 CPU tensor); torch's kernel otherwise. Same arguments and state (none); the
    values within 1 ulp of torch's. Every float32 value takes the same kernel whatever the
    tensor's size or layout, so a model's outputs do not depend on the batch size."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.ELU's name
        if HAVE_NUMBA and input.dtype == torch.float32 and values_only(input):
            return elu_float32(input, self.alpha, out=input if self.inplace else None)
        return super().forward(input)
