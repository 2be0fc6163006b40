"""Per-pair dot products of the G-EED states, read from the float32 block once.

Kvinge et al.'s invariance and equivariance metrics need, for every sample i and group element g,
three dot products of float64 vectors: against the orbit's centroid (f(g·x)·c, ‖f(g·x)‖², ‖c‖²)
or against the moved untransformed output (f(g·x)·g·f(x), ‖f(g·x)‖², ‖g·f(x)‖²). As torch ops
each is a float64 copy of the whole [b, m, D] block, a centroid pass and one einsum per product.
On the CPU the kernels below do it in one read of the float32 block: a tile of D (the m rows of
a sample, ``_TILE`` values each, ≈ 25 kB for m = 25) is read from memory once, converted to float64
in registers, and its centroid and products are formed while the tile is in L1.

Where the time goes (measured, 2 cores): the orbit kernel reads each float32 value twice from L1
and once from memory. Its sums over D were scalar running sums, which LLVM may not vectorise
without reordering them: 13.4 ms for a [16, 16, 25088] block (0.48 G values/s) and 7.9 ms for
[16, 25, 6272]; with one float64 partial sum per tile position ("lanes", added up at the end),
5.6 and 1.9 ms (rel 4e-14 from the running sums). In an explorer pass (200 × 16, G-EED
invariance alone) the kernel fell from 0.68 to ≈ 0.2 s beside 2 s of forwards. The pair kernel
keeps running sums: the Euclidean latent G-EED reads ‖a − e‖² from ‖a‖² + ‖e‖² − 2a·e, which
cancels where a ≈ e, so a new summation order moves it by up to 1e-9 (the golden values hold the
old order). Latent equivariance under a warped set (``rotations(25)``…, the spatial action) had
the m warps of every map of f(x) written by :mod:`tmlib.warp_kernels` and read back by the pair
kernel: b·m·D float32 values out to memory and in again. :func:`warped_pair_products` forms each
warped value where the products need it, from the map in L1, with the same arithmetic and the same
running sums (bit-identical): 20-27 % less than the warps and the pair kernel for one block (median
of 40, 25 rotations, 10 samples: [16, 28, 28] 6.13 → 4.96 ms, [32, 14, 14] 2.52 → 2.00 ms, [64, 7,
7] 1.58 → 1.15 ms), a G-EED pass of SimpleConv(16) on 500 × 25 rotations 2.65-3.22 → 2.30-2.32 s
(two runs each, side by side). Exact sets (``c4()``, ``d4()``, flips, cyclic shifts) take the
same kernel with a table of source pixels instead of weights. The kernel is bound by its scalar
instructions (the table loads, four neighbours, the weights): the four weights read from a table
formed once (:func:`tmlib.warp_kernels.weight_table`) instead of six float32 operations a pixel:
[10, 25, 16, 28, 28] 2.11-2.29 → 1.86-1.87 ms, [.., 32, 14, 14] 1.07-1.16 → 0.94-0.96 ms (median of
30, two runs each, a later machine), the same bits; bench_geed `rotations(25)` 1.86-1.87 → 1.77-1.80 s.
Tried and not kept: vectorised partial sums (see the kernel's comment); the maps transposed to
channels innermost, so that one table entry serves a vector of channels (bilinear in vector loads,
per-channel float64 partial sums): 2.63 ms at 16 × 28 × 28 (the transposition alone ≈ 0.8 ms, and
the channel loop of 16-64 trips with its sums in memory no faster than the scalar loop: 1.81 ms
without it); faster for wide maps (0.81 / 0.26 ms at 32 × 14 × 14 / 64 × 7 × 7 against the scalar
0.94 / 0.51), but a pass's time is in its first, widest layers and it gives up the stored path's
bits (a new summation order); two tables at a time (six independent sums): 1.95 ms.
Whole-pass ratios: benchmarks/bench_geed.py (see README, "Speed"); the torch ops
stay the path on other devices and the reference the kernels are tested against
(tests/test_harness.py: numba vs torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .moments import numba_available
from .moved_maps import map_tables
from .states import numpy_view

if numba_available():  # moments.py already chose numba's threading layer; the torch ops below
    import numba  # are the fallback and the GPU path

    from ..warp_kernels import weighted

__all__ = ["orbit_products", "pair_products", "unit_sums", "warped_pair_products"]

_TILE = 256  # vector entries per tile: m × 256 float32 stay in L1 for the paper's m ≤ 25


if numba_available():

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _orbit_kernel(z, tile):  # pragma: no cover
        # z: [b, m, D]. Returns z_g·c, ‖z_g‖² ([b, m]) and ‖c‖² ([b]), c = mean_g z_g, in float64.
        # The sums over D go into one float64 partial sum per position of the tile (the `lanes`),
        # added up at the end: a scalar running sum cannot be vectorised without letting LLVM
        # reorder it (fastmath); lanes are vectorised as they are, 2.5-4x faster (one sample's
        # sums, so still independent of the batch).
        b, m, d = z.shape
        zc = np.zeros((b, m))
        zz = np.zeros((b, m))
        cc = np.zeros(b)
        for i in numba.prange(b):
            c = np.empty(tile)
            zz_lanes = np.zeros((m, tile))
            zc_lanes = np.zeros((m, tile))
            cc_lanes = np.zeros(tile)
            for f0 in range(0, d, tile):
                w = min(d, f0 + tile) - f0
                for f in range(w):
                    c[f] = 0.0
                for j in range(m):
                    row = z[i, j, f0 : f0 + w]
                    lanes = zz_lanes[j]
                    for f in range(w):
                        v = np.float64(row[f])
                        c[f] += v
                        lanes[f] += v * v
                for f in range(w):
                    c[f] /= m
                    cc_lanes[f] += c[f] * c[f]
                for j in range(m):  # the tile again, from cache
                    row = z[i, j, f0 : f0 + w]
                    lanes = zc_lanes[j]
                    for f in range(w):
                        lanes[f] += np.float64(row[f]) * c[f]
            for j in range(m):
                zz[i, j] = zz_lanes[j].sum()
                zc[i, j] = zc_lanes[j].sum()
            cc[i] = cc_lanes.sum()
        return zc, zz, cc

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _pair_kernel(a, e, outer):  # pragma: no cover
        # a: [b, m, D]; e: paired with it, [b, m, D], or stored [m, b, D] when ``outer`` (the
        # layout of warp_all(contiguous=False): e[j, i] pairs with a[i, j], read without a copy).
        # Returns a·e, ‖a‖², ‖e‖² ([b·m]) in float64. Running sums, not lanes as in _orbit_kernel:
        # the Euclidean G-EED reads ‖a − e‖² = ‖a‖² + ‖e‖² − 2a·e, which cancels where a ≈ e, so
        # another order of summation moves it by up to 1e-9 and the golden values (tests/golden)
        # hold these sums' order.
        b, m, d = a.shape
        ae = np.zeros(b * m)
        aa = np.zeros(b * m)
        ee = np.zeros(b * m)
        for k in numba.prange(b * m):
            i = k // m
            j = k - i * m
            row = a[i, j]
            other = e[j, i] if outer else e[i, j]
            s_ae = 0.0
            s_aa = 0.0
            s_ee = 0.0
            for f in range(d):
                x = np.float64(row[f])
                y = np.float64(other[f])
                s_ae += x * y
                s_aa += x * x
                s_ee += y * y
            ae[k] = s_ae
            aa[k] = s_aa
            ee[k] = s_ee
        return ae, aa, ee


    @numba.njit(parallel=True, cache=True, nogil=True)
    def _warped_pair_kernel(a, identity, base, weights, fused, exact, h, w):  # pragma: no cover
        # a: [b, m, C·H·W] float32, the block f(g_j·x_i); its identity column holds the maps of
        # f(x_i). Returns a·e, ‖a‖², ‖e‖² ([b·m], float64) for e = g_j·f(x_i), the warp of f(x_i)'s
        # maps by table j (base [m, H·W], weights [4, m, H·W]: warp_kernels' tables and arithmetic,
        # so the float32 values ts.apply gives), formed pixel by pixel and used at once, never stored;
        # with ``exact``, base[j, p] is where output pixel p comes from, copied (an exact set).
        # Per (i, j) the same running sums over D in the same order as _pair_kernel: bit for bit
        # its results on the stored warps. A sample's maps, one at a time in a zero border, stay
        # in L1 while the m tables stream past. Tried and not kept (2 cores, AVX-512): partial
        # sums per position ("lanes", vectorised) with the warps gathered, or warped into an L1
        # buffer first: no faster (LLVM's gathers lose to scalar loads here, and the loop over
        # positions then pays the buffer); four tables at a time (twelve independent sums): the
        # same time, so the scalar instructions, not the additions' latency, set it.
        b, m, d = a.shape
        size = h * w
        wp = w + 2
        ae = np.zeros(b * m)
        aa = np.zeros(b * m)
        ee = np.zeros(b * m)
        for i in numba.prange(b):
            xs = np.zeros((h + 3) * wp, dtype=a.dtype)  # the border stays zero
            for c in range(d // size):
                plane = a[i, identity, c * size : (c + 1) * size]
                for r in range(h):
                    xs[(r + 1) * wp + 1 : (r + 1) * wp + 1 + w] = plane[r * w : (r + 1) * w]
                for j in range(m):
                    row = a[i, j, c * size : (c + 1) * size]
                    bj = base[j]
                    nw, ne, sw, se = weights[0, j], weights[1, j], weights[2, j], weights[3, j]
                    k = i * m + j
                    s_ae = ae[k]
                    s_aa = aa[k]
                    s_ee = ee[k]
                    for p in range(size):
                        x = np.float64(row[p])
                        if exact:  # an exact set moves pixels: the source pixel itself
                            y = np.float64(xs[bj[p]])
                        else:
                            y = np.float64(weighted(xs, bj[p], nw[p], ne[p], sw[p], se[p], wp, fused))
                        s_ae += x * y
                        s_aa += x * x
                        s_ee += y * y
                    ae[k] = s_ae
                    aa[k] = s_aa
                    ee[k] = s_ee
        return ae, aa, ee

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _unit_kernel(a, tile):  # pragma: no cover
        # a: [b, D]. Returns Σ_i a_i/‖a_i‖ ([D], zero rows left out), Σ_i ‖u_i‖², the zero rows.
        b, d = a.shape
        norms = np.empty(b)
        for i in numba.prange(b):
            s = 0.0
            for f in range(d):
                v = np.float64(a[i, f])
                s += v * v
            norms[i] = np.sqrt(s)
        total = np.zeros(d)
        for t in numba.prange((d + tile - 1) // tile):
            # slices indexed from 0, so that LLVM loads whole vectors (an index from the tile's
            # start, which it cannot prove non-negative, kept the loop scalar); bit-identical
            f0 = t * tile
            f1 = min(d, f0 + tile)
            part = total[f0:f1]
            for i in range(b):
                if norms[i] > 0.0:
                    row = a[i, f0:f1]
                    norm = norms[i]
                    for f in range(f1 - f0):
                        part[f] += np.float64(row[f]) / norm
        sq, zeros = 0.0, 0
        for i in range(b):
            if norms[i] > 0.0:
                sq += 1.0
            else:
                zeros += 1
        return total, sq, zeros


def orbit_products(z: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For orbits ``z`` [b, m, D] (any float dtype): (z_g·c, ‖z_g‖², ‖c‖²) in float64, shapes
    [b, m], [b, m], [b], c the mean of each orbit. ``fused``: the one-read CPU kernel (when the
    tensor is on the CPU and numba is installed), else float64 torch ops."""
    view = numpy_view(z.contiguous()) if fused else None
    if view is not None:
        zc, zz, cc = _orbit_kernel(view, _TILE)
        return torch.from_numpy(zc), torch.from_numpy(zz), torch.from_numpy(cc)
    z = z.to(torch.float64)
    # three reads of z (a Gram matrix z zᵀ would cost m reads: 25 for the paper's sets)
    centroid = z.mean(dim=1)
    return (torch.einsum("bmd,bd->bm", z, centroid), torch.einsum("bmd,bmd->bm", z, z),
            torch.einsum("bd,bd->b", centroid, centroid))


def pair_products(a: torch.Tensor, e: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For paired vectors ``a``, ``e`` [..., D]: (a·e, ‖a‖², ‖e‖²) in float64, shape [...]."""
    if a.shape != e.shape:
        raise ValueError(f"pair_products: a {tuple(a.shape)} and e {tuple(e.shape)} must have the same shape")
    # e as warp_all(contiguous=False) leaves it ([b, m, D] over [m, b, D] memory): read in place.
    outer = a.dim() == 3 and not e.is_contiguous() and e.transpose(0, 1).is_contiguous()
    if outer:
        views = [numpy_view(a.contiguous()), numpy_view(e.transpose(0, 1))] if fused else [None]
    else:
        views = [numpy_view(t.reshape(-1, 1, t.shape[-1]).contiguous()) for t in (a, e)] if fused else [None]
    if all(v is not None for v in views):
        ae, aa, ee = _pair_kernel(*views, outer)
        return tuple(torch.from_numpy(t).reshape(a.shape[:-1]) for t in (ae, aa, ee))
    a, e = a.to(torch.float64), e.to(torch.float64)
    return (torch.einsum("...d,...d->...", a, e), torch.einsum("...d,...d->...", a, a),
            torch.einsum("...d,...d->...", e, e))


def warped_pair_products(block: torch.Tensor, identity: int, ts: Any
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """For a block [b, m, C, H, W] of f(g_j·x_i): :func:`pair_products` of it and g_j·f(x_i), the
    maps of its identity column moved by ``ts`` (``ts.apply``, zero fill), [b, m] each, without
    storing them: one kernel reads the block once, moves each map of f(x_i) from L1
    (:mod:`.moved_maps`) and adds the products as it goes, bit for bit the numbers of
    ``pair_products(block, ts.apply(block[:, identity]))`` (the same values, the same running
    sums). None where the tables cannot move the maps (:func:`~.moved_maps.map_tables`)."""
    tables = map_tables(ts, block)
    b, m = block.shape[:2]
    view = numpy_view(block.reshape(b, m, -1).contiguous()) if tables is not None else None
    if view is None:
        return None
    sums = _warped_pair_kernel(view, identity, *tables, *block.shape[-2:])
    return tuple(torch.from_numpy(t).reshape(b, m) for t in sums)


def unit_sums(a: torch.Tensor, fused: bool) -> tuple[torch.Tensor, float, int]:
    """For vectors ``a`` [b, D]: (Σ_i a_i/‖a_i‖ [D] float64, Σ_i ‖u_i‖², the number of zero
    vectors), zero vectors left out of the sums. ``Σ ‖u_i‖²`` is the count of non-zero vectors
    (exactly, in the kernel; to rounding, as torch ops)."""
    view = numpy_view(a.contiguous()) if fused else None
    if view is not None:
        total, sq, zeros = _unit_kernel(view, _TILE)
        return torch.from_numpy(total), float(sq), int(zeros)
    a = a.to(torch.float64)
    norms = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    units = torch.where(norms > 0, a / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0)
    return units.sum(dim=0), float(units.square().sum()), int((norms == 0).sum())
