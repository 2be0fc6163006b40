"""Max pooling that gives torch's numbers faster where only the numbers are asked for.

A measurement forwards n·m transformed images under ``no_grad``; in SimpleConv and VGG16D a
sixth of those forwards' time on the CPU was ``nn.MaxPool2d(2)`` (profiled on 2 cores, torch
2.14.1: 0.41 of 2.4 s; 10.8 ms for a [272, 16, 28, 28] float32 block, its CPU kernel also keeping
the argmax of every window). The maximum of the window's four strided views is the same number —
a maximum is exact, and NaN propagates in both — in 1.25 ms (``benchmarks/bench_pooling.py``
prints the ratio). Where anything else than the values matters, torch's own kernel runs, so gradients,
training and the Lie derivative's tangents are exactly as before:

* autograd recording (a gradient's route through a tie is torch's choice of argmax);
* a torch function mode (tmlib's forward-mode tangents) or a functorch transform (torch.func's
  ``jvp``/``vmap``), which see ``max_pool2d`` as one function with its own derivative;
* any other window, stride, padding, dilation, ``ceil_mode`` or ``return_indices``, and any
  device but the CPU (CUDA's kernel is not the bottleneck there).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MaxPool2d", "max_pool2x2"]


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


def _values_only(x: torch.Tensor) -> bool:
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
        if self._plain_2x2 and input.dim() in (3, 4) and _values_only(input):
            return max_pool2x2(input)
        return super().forward(input)

    @property
    def _plain_2x2(self) -> bool:
        def pair(value):
            return tuple(value) if isinstance(value, (tuple, list)) else (value, value)

        return (pair(self.kernel_size) == (2, 2) and pair(self.stride) == (2, 2) and pair(self.padding) == (0, 0)
                and pair(self.dilation) == (1, 1) and not self.ceil_mode and not self.return_indices)
