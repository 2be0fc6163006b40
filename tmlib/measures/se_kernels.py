"""DSES's per-map distances, read from the float32 maps once.

DSES needs, per channel, Σ over samples i and transformations j of
d_ij = sqrt(mean_hw (F(t_j x_i) − t_j F(x_i))²), optionally of the L2-normalised maps. As float64
torch ops that is two float64 copies of the [b, m, C, H, W] block (the outputs and the warped
references), their difference, its square and a mean: five full-size passes and three full-size
temporaries. Measured with a profile of an explorer pass (200 MNIST × 16 rotations, SimpleConv,
2 cores): 4.2 s of the torch ops beside 1.3 s of warping and ≈ 2 s of forwards. The kernel below
reads each map pair once (a map is H·W ≤ 784 values, in L1 for its second read when normalising)
and sums in float64, so it agrees with the torch ops to float64 rounding (a sum of non-negative
terms: no cancellation). The torch ops stay the path on other devices and the reference the kernel
is tested against (tests/test_distance_same_equivariance.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .functional import l2_normalize_maps
from .moments import numba_available
from .states import numpy_view

if numba_available():  # moments.py already chose numba's threading layer
    import numba

__all__ = ["map_distance_sums"]


if numba_available():

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _distance_kernel(y, e, normalize, outer):  # pragma: no cover
        # y, e: [b, m, C, P] (P = H·W); e stored [m, b, C, P] when ``outer`` (the layout warp_all
        # computes: read as it is, not copied). Returns Σ_ij sqrt(mean_p (y − e)²) per channel,
        # float64 [C], of y/‖y‖ and e/‖e‖ when normalising (an all-zero map stays zero).
        b, m, c, p = y.shape
        total = np.zeros(c)
        for k in numba.prange(c):
            acc = 0.0
            for i in range(b):
                for j in range(m):
                    a = y[i, j, k]
                    r = e[j, i, k] if outer else e[i, j, k]
                    sa = 1.0
                    sr = 1.0
                    if normalize:
                        qa = 0.0
                        qr = 0.0
                        for f in range(p):
                            u = np.float64(a[f])
                            v = np.float64(r[f])
                            qa += u * u
                            qr += v * v
                        sa = 1.0 / math.sqrt(qa) if qa > 0.0 else 0.0
                        sr = 1.0 / math.sqrt(qr) if qr > 0.0 else 0.0
                    s = 0.0
                    for f in range(p):
                        d = np.float64(a[f]) * sa - np.float64(r[f]) * sr
                        s += d * d
                    acc += math.sqrt(s / p)
            total[k] = acc
        return total


def map_distance_sums(y: torch.Tensor, expected: torch.Tensor, normalize: bool, fused: bool) -> torch.Tensor:
    """Σ over the first two dimensions of sqrt(mean_hw (y − expected)²), per channel: float64 [C]
    for maps ``y``, ``expected`` [b, m, C, H, W] (both L2-normalised per map first when
    ``normalize``; all-zero maps stay zero). ``fused``: the one-read CPU kernel (on the CPU with
    numba), else float64 torch ops."""
    if y.shape != expected.shape:
        raise ValueError(f"map_distance_sums: y {tuple(y.shape)} and expected {tuple(expected.shape)} differ")
    # expected as warp_all(contiguous=False) leaves it (the m warps outermost): read in place.
    outer = not expected.is_contiguous() and expected.transpose(0, 1).is_contiguous()
    stored = expected.transpose(0, 1) if outer else expected
    views = [numpy_view(t.flatten(-2).contiguous()) for t in (y, stored)] if fused else [None]
    if all(v is not None for v in views) and views[0].dtype == views[1].dtype:
        return torch.from_numpy(_distance_kernel(views[0], views[1], normalize, outer))
    y, expected = y.to(torch.float64), expected.to(torch.float64)
    if normalize:
        y = l2_normalize_maps(y.flatten(-2)).unflatten(-1, y.shape[-2:])
        expected = l2_normalize_maps(expected.flatten(-2)).unflatten(-1, expected.shape[-2:])
    return (y - expected).square().mean(dim=(-2, -1)).sqrt().sum(dim=(0, 1))
