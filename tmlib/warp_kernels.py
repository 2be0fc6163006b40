"""Bilinear warps of many maps by a few matrices, from precomputed sampling tables (CPU, float32).

Every warp of a measurement pass samples the same m grids: the m transformations of the set,
applied to each of b images and C channels (the input block, or every feature map for G-EED's
latent equivariance and the same-equivariance measures). ``grid_sample`` computes each output
pixel's four source indices and weights once per grid point and loops over the channels; with
the images folded into the channels (:func:`tmlib.warps.warp_all`) that is once per block. The
tables below go one step further: the indices and weights of an (m matrices, H, W) set are built
once a session (an explorer's or a notebook's passes reuse them) and the kernel only gathers and
adds, one plane (H·W values of one map, in L1) at a time, in parallel over planes.
:func:`grid_sample_all` is the reference they reproduce, and the path everywhere else.

Same numbers as ``grid_sample``, bit for bit: the weights are formed with the arithmetic of its
CPU kernel (``x = (g + 1)·W/2 − 0.5`` as one fused multiply-add, ``w = x − ⌊x⌋``, ``nw = (1 − w_y)
(1 − w_x)``…, then ``nw·v_nw``, ``+ ne·v_ne``, ``+ sw·v_sw``, ``+ se·v_se`` as a chain of fused
multiply-adds, an outside neighbour reading 0). A table holds, per output pixel, only the index of
its north-west neighbour in the plane copied into a zero border and its two distances (12 bytes);
the other three neighbours are the next index and the two below it, and the four weights are formed
in the kernel by the same float32 operations (the border's zeros are what grid_sample adds for an
outside neighbour). Whether a torch build fuses them depends on the
CPU kernel it dispatches to, so the first use compares both forms with ``grid_sample`` on a test
warp and keeps the one that agrees exactly; where neither does, the warps stay with
``grid_sample`` (as they do for float64, tensors that need grad, and other devices).

Measured (2 cores, 25 rotations, 10 samples, one call, grid_sample → tables): [10, 16, 28, 28]
8.6 → 6.8 ms, [10, 32, 14, 14] 9.3 → 3.4 ms, [10, 64, 7, 7] 5.1 → 1.7 ms; building the tables of
25 rotations at 28×28 costs 3 ms, once a session. With four indices and four weights a pixel (32
bytes, the tables of 25 rotations at 28×28 627 kB: past L2 for every plane) → the bordered plane's
one index and two distances (12 bytes, 235 kB), median of 30 calls, two runs on a later machine:
8.2–8.3 → 5.3–5.5 ms, 3.0–4.6 → 2.7–2.8 ms, 2.3–2.4 → 1.3–1.4 ms; bit for bit the same. Tried and not kept: the fused multiply-adds
emulated in float64 (exact products) instead of LLVM's ``fma``: 10.1 ms at 28×28, slower than
grid_sample; tables outermost (one table in L1, the planes streaming): 7.8–9.7 ms at 28×28;
four planes per table read (the weights formed once for four planes): 3.9–5.4 → 5.4–7.3 ms at
28×28 (the loop over planes is not vectorised); int16 indices: within noise.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F

from .jit import HAVE_NUMBA, fma, numba

__all__ = ["available", "grid_sample_all", "sampling_table", "warp_planes", "weight_table"]

_TABLES: OrderedDict[tuple, tuple[Any, Any, Any]] = OrderedDict()
_LOCK = threading.Lock()  # the explorer's background pass and the notebook's thread share the tables
_CHECK = threading.Lock()  # the one check of the arithmetic
_MAX_TABLES = 128  # (matrices, H, W) sets of one session, a few per layer size and set, and their weights
# The arithmetic that reproduces grid_sample on this machine: "fused" or "plain"; "" where neither
# does (grid_sample stays); None before the check.
_ARITHMETIC: str | None = None

if HAVE_NUMBA:
    import numpy as np

    @numba.njit(inline="always")
    def corner_weights(east, south):  # pragma: no cover - inlined into the kernels
        # The four neighbours' weights from the distances (east, south) to the north-west one, in
        # grid_sample's float32 arithmetic: nw, ne, sw, se.
        one = np.float32(1)
        west, north = one - east, one - south
        return north * west, north * east, south * west, south * east

    @numba.njit(inline="always")
    def weighted(xs, k, nw, ne, sw, se, wp, fused):  # pragma: no cover - inlined into the kernels
        # One output pixel from the bordered plane xs: its north-west neighbour k and the four
        # weights, summed in grid_sample's float32 arithmetic (fused or plain).
        if fused:
            return fma(xs[k + wp + 1], se, fma(xs[k + wp], sw, fma(xs[k + 1], ne, xs[k] * nw)))
        return ((xs[k] * nw + xs[k + 1] * ne) + xs[k + wp] * sw) + xs[k + wp + 1] * se

    @numba.njit(inline="always")
    def bilinear(xs, k, east, south, wp, fused):  # pragma: no cover - inlined into the kernels
        # One output pixel from the bordered plane xs: its north-west neighbour k, distances
        # (east, south) to it, in grid_sample's float32 arithmetic (fused or plain).
        nw, ne, sw, se = corner_weights(east, south)
        return weighted(xs, k, nw, ne, sw, se, wp, fused)

    @numba.njit(cache=True, nogil=True)
    def _weights_kernel(right, down):  # pragma: no cover
        # [4, m, H·W] float32: corner_weights of every entry of a sampling table.
        out = np.empty((4,) + right.shape, dtype=right.dtype)
        for j in range(right.shape[0]):
            for p in range(right.shape[1]):
                out[0, j, p], out[1, j, p], out[2, j, p], out[3, j, p] = corner_weights(right[j, p], down[j, p])
        return out

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _warp_kernel(x, base, right, down, out, inner, fused, h, w):  # pragma: no cover
        # x [B, H·W] planes; base/right/down [m, H·W]. inner = 0: out [m, B, H·W], every plane by
        # every table; else out [1, B, H·W], plane q by table (q // inner) % m. Plane-major: a
        # plane, copied into a zero border (one column each side, one row above, two below: what
        # an outside neighbour reads), stays in L1 while its tables stream past. A pixel's four
        # neighbours are base, base + 1, base + W + 2 and base + W + 3 of the bordered plane; its
        # weights are formed from (right, down) with the same float32 operations as _build's.
        planes = x.shape[0]
        size = h * w
        wp = w + 2
        tables = base.shape[0]
        for q in numba.prange(planes):
            xs = np.zeros((h + 3) * wp, dtype=x.dtype)
            for r in range(h):
                xs[(r + 1) * wp + 1 : (r + 1) * wp + 1 + w] = x[q, r * w : (r + 1) * w]
            first = (q // inner) % tables if inner else 0
            last = first + 1 if inner else tables
            for j in range(first, last):
                o = out[0, q] if inner else out[j, q]
                bj = base[j]
                rj = right[j]
                dj = down[j]
                for p in range(size):
                    o[p] = bilinear(xs, bj[p], rj[p], dj[p], wp, fused)


def _unnormalise(g: torch.Tensor, size: int, fused: bool) -> torch.Tensor:
    """grid_sample's pixel coordinate of normalised g (align_corners=False): (g + 1)·size/2 − 0.5."""
    if fused:
        return ((g + 1).double() * (size / 2) - 0.5).float()
    return (g + 1) * (size / 2) - 0.5


def _build(theta: torch.Tensor, h: int, w: int, fused: bool) -> tuple[Any, Any, Any]:
    grid = F.affine_grid(theta.float(), [len(theta), 1, h, w], align_corners=False)
    x, y = _unnormalise(grid[..., 0], w, fused), _unnormalise(grid[..., 1], h, fused)
    west, north = x.floor(), y.floor()
    right, down = x - west, y - north  # distances to the west and north neighbours
    # The north-west neighbour in the plane with a zero border (W + 2 wide, a row above, two
    # below): a pixel with any neighbour inside reads it there; one with all four outside reads
    # four border zeros (row H + 1), as grid_sample adds nothing for them.
    columns, rows = west.long(), north.long()
    near = (columns >= -1) & (columns <= w - 1) & (rows >= -1) & (rows <= h - 1)
    base = torch.where(near, (rows + 1) * (w + 2) + columns + 1, (h + 1) * (w + 2))
    shape = (len(theta), h * w)
    return (base.reshape(shape).to(torch.int32).numpy().copy(), right.reshape(shape).numpy().copy(),
            down.reshape(shape).numpy().copy())


def grid_sample_all(planes: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """The reference: maps [B, H, W] warped by content-mapping matrices [m, 3, 3] with
    ``grid_sample`` (bilinear, outside = 0), one grid per matrix for all B maps: [m, B, H, W]."""
    b, h, w = planes.shape
    m = len(matrices)
    theta = torch.linalg.inv(matrices.to(device=planes.device, dtype=torch.float64))[:, :2, :]
    grid = F.affine_grid(theta.to(planes.dtype), [m, b, h, w], align_corners=False)
    return F.grid_sample(planes.unsqueeze(0).expand(m, b, h, w), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def sampling_table(matrices: torch.Tensor, h: int, w: int, fused: bool) -> tuple[Any, Any, Any]:
    """(base int32, right float32, down float32), each [m, H·W], of content-mapping matrices
    [m, 3, 3] on an H×W map: for each output pixel its north-west neighbour in the map with a zero
    border (:func:`_build`) and its distances to the west and north neighbours, by ``fused`` or
    plain arithmetic. Kept for the session (a few dozen sets)."""
    matrices = torch.as_tensor(matrices, dtype=torch.float64).cpu()
    key = (matrices.numpy().tobytes(), h, w, fused)
    with _LOCK:
        table = _TABLES.get(key)
        if table is None:
            theta = torch.linalg.inv(matrices)[:, :2, :]
            table = _TABLES[key] = _build(theta, h, w, fused)
            while len(_TABLES) > _MAX_TABLES:
                _TABLES.popitem(last=False)
        else:
            _TABLES.move_to_end(key)
    return table


def weight_table(matrices: torch.Tensor, h: int, w: int, fused: bool) -> tuple[Any, Any]:
    """(base int32 [m, H·W], weights float32 [4, m, H·W]): :func:`sampling_table` with the four
    neighbours' weights (nw, ne, sw, se) formed once by the kernels' own arithmetic, for a kernel
    that moves every map of a block by the same m tables (the weights then cost 4 loads a pixel
    instead of 2 loads and 6 operations; the warp kernel itself keeps the 12-byte table). Kept
    for the session beside the sampling tables."""
    matrices = torch.as_tensor(matrices, dtype=torch.float64).cpu()
    key = ("weights", matrices.numpy().tobytes(), h, w, fused)
    with _LOCK:
        table = _TABLES.get(key)
        if table is not None:
            _TABLES.move_to_end(key)
            return table
    base, right, down = sampling_table(matrices, h, w, fused)
    table = (base, _weights_kernel(right, down))
    with _LOCK:
        _TABLES[key] = table
        while len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    return table


def _warp(x: torch.Tensor, matrices: torch.Tensor, inner: int, fused: bool) -> torch.Tensor:
    planes, h, w = x.shape
    base, right, down = sampling_table(matrices, h, w, fused)
    m = len(base)
    if inner and planes % (m * inner):
        raise ValueError(f"x: {planes} maps are not [b, {m}, {inner}]")
    out = torch.empty((planes, h, w) if inner else (m, planes, h, w), dtype=x.dtype)
    flat = out.view(1 if inner else m, planes, h * w)
    _warp_kernel(x.reshape(planes, h * w).contiguous().numpy(), base, right, down, flat.numpy(), inner, fused, h, w)
    return out


def fused_arithmetic() -> bool:
    """Whether the tables' warps use fused multiply-adds (the form that reproduces grid_sample here,
    once :func:`available` has checked)."""
    return _ARITHMETIC == "fused"


def warp_planes(x: torch.Tensor, matrices: torch.Tensor, inner: int = 0) -> torch.Tensor:
    """Maps x [B, H, W] (float32, CPU) warped by matrices [m, 3, 3], outside = 0. ``inner = 0``:
    every map by every matrix, [m, B, H, W]. ``inner = k``: map q by matrix (q // k) % m, [B, H, W]
    (x ordered [b, m, k]: slice j of each sample by matrix j). Only where :func:`available` says so."""
    return _warp(x, matrices, inner, fused_arithmetic())


def _agrees(fused: bool) -> bool:
    """Whether the tables by this arithmetic give grid_sample's numbers on a test warp."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 13, generator=gen)
    angles = torch.tensor([0.3, -1.1, 2.5], dtype=torch.float64)
    c, s = angles.cos(), angles.sin()
    mats = torch.zeros(3, 3, 3, dtype=torch.float64)
    mats[:, 0, 0], mats[:, 0, 1], mats[:, 1, 0], mats[:, 1, 1] = c * 1.1, s, -s, c * 0.9
    mats[:, 0, 2], mats[:, 1, 2], mats[:, 2, 2] = 0.07, -0.13, 1.0
    return torch.equal(_warp(x, mats, 0, fused), grid_sample_all(x, mats))


def available(x: torch.Tensor) -> bool:
    """Whether x's warps can come from the tables: numba installed, x a float32 CPU tensor that
    numba can read, and the tables reproducing grid_sample on this machine (checked once)."""
    global _ARITHMETIC
    if not HAVE_NUMBA or x.device.type != "cpu" or x.dtype != torch.float32 or x.requires_grad:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    if _ARITHMETIC is None:
        with _CHECK:
            if _ARITHMETIC is None:
                _ARITHMETIC = "fused" if _agrees(True) else "plain" if _agrees(False) else ""
    return bool(_ARITHMETIC)
