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

With the identity in the set, t_j F(x_i) need not be stored: :func:`warped_distance_sums` moves
each map of F(x_i) into an L1 buffer as it reads the block (:mod:`.moved_maps`), the same values
and sums bit for bit. One [10, 25, C, H, W] block, median of 20 calls, 2 cores: C = 32 at 28×28
8.33 → 7.60 ms, 64 at 14×14 4.57 → 3.94 ms, 128 at 7×7 4.06 → 3.19 ms. What is left is the warp's
scalar instructions and each map's running sum; four maps' sums at once measured no faster
(7.35 → 7.32 ms), so one map at a time stays. The weights read from a table formed once
(:func:`tmlib.warp_kernels.weight_table`): [10, 25, 64, 14, 14] 2.77-3.10 → 2.60-2.62 ms, 32 at
28×28 5.49-6.52 → 5.40-5.52 ms (median of 30, two runs each; within this machine's noise).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .functional import l2_normalize_maps
from .moments import numba_available
from .moved_maps import map_tables
from .states import numpy_view

if numba_available():  # moments.py already chose numba's threading layer
    import numba

    from ..warp_kernels import weighted

__all__ = ["map_distance_sums", "warped_distance_sums"]


if numba_available():

    @numba.njit(inline="always")
    def _map_distance(a, r, normalize, p):  # pragma: no cover - inlined into the kernels
        # sqrt(mean_f (a − r)²) of two maps [P], of a/‖a‖ and r/‖r‖ when normalising, in float64.
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
        return math.sqrt(s / p)

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
                    acc += _map_distance(y[i, j, k], e[j, i, k] if outer else e[i, j, k], normalize, p)
            total[k] = acc
        return total

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _warped_distance_kernel(y, identity, base, weights, fused, exact, normalize, h, w):  # pragma: no cover
        # _distance_kernel with e[i, j, k] = map k of y[i, identity] moved by table j (moved_maps:
        # bilinear from warp_kernels' weight tables, or a source pixel copied when ``exact``), formed into
        # an L1 buffer and used at once: the same values, the same sums in the same order.
        b, m, c, p = y.shape
        wp = w + 2
        total = np.zeros(c)
        for k in numba.prange(c):
            xs = np.zeros((h + 3) * wp, dtype=y.dtype)  # the border stays zero
            r = np.empty(p, dtype=y.dtype)  # one moved map, in L1
            acc = 0.0
            for i in range(b):
                plane = y[i, identity, k]
                for row in range(h):
                    xs[(row + 1) * wp + 1 : (row + 1) * wp + 1 + w] = plane[row * w : (row + 1) * w]
                for j in range(m):
                    a = y[i, j, k]
                    bj = base[j]
                    nw, ne, sw, se = weights[0, j], weights[1, j], weights[2, j], weights[3, j]
                    for f in range(p):
                        r[f] = xs[bj[f]] if exact else weighted(xs, bj[f], nw[f], ne[f], sw[f], se[f], wp, fused)
                    acc += _map_distance(a, r, normalize, p)
            total[k] = acc
        return total


def warped_distance_sums(y: torch.Tensor, identity: int, ts: Any, normalize: bool) -> torch.Tensor | None:
    """:func:`map_distance_sums` of the maps ``y`` [b, m, C, H, W] and t_j F(x_i), the maps of
    y's identity column moved by ``ts`` (``ts.apply``, zero fill), without storing them: the
    kernel moves each map of F(x_i) from L1 as it reads y (:mod:`.moved_maps`), with the same
    values and the same sums as the fused kernel on the stored maps, bit for bit. None where the
    tables cannot move the maps (:func:`~.moved_maps.map_tables`)."""
    tables = map_tables(ts, y)
    view = numpy_view(y.flatten(-2).contiguous()) if tables is not None else None
    if view is None:
        return None
    return torch.from_numpy(_warped_distance_kernel(view, identity, *tables, normalize, *y.shape[-2:]))


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
