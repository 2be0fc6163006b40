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
multiply-adds, an outside neighbour reading 0). Whether a torch build fuses them depends on the
CPU kernel it dispatches to, so the first use compares both forms with ``grid_sample`` on a test
warp and keeps the one that agrees exactly; where neither does, the warps stay with
``grid_sample`` (as they do for float64, tensors that need grad, and other devices).

Measured (2 cores, 25 rotations, 10 samples, one call, grid_sample → tables): [10, 16, 28, 28]
8.6 → 6.8 ms, [10, 32, 14, 14] 9.3 → 3.4 ms, [10, 64, 7, 7] 5.1 → 1.7 ms; building the tables of
25 rotations at 28×28 costs 3 ms, once a session. Tried and not kept: the fused multiply-adds
emulated in float64 (exact products) instead of LLVM's ``fma``: 10.1 ms at 28×28, slower than
grid_sample; tables outermost (one table in L1, the planes streaming): 7.8–9.7 ms at 28×28.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F

from .jit import HAVE_NUMBA, numba

__all__ = ["available", "grid_sample_all", "sampling_table", "warp_planes"]

_TABLES: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
_LOCK = threading.Lock()  # the explorer's background pass and the notebook's thread share the tables
_CHECK = threading.Lock()  # the one check of the arithmetic
_MAX_TABLES = 64  # (matrices, H, W) sets of one session: a few per layer size and transformation set
# The arithmetic that reproduces grid_sample on this machine: "fused" or "plain"; "" where neither
# does (grid_sample stays); None before the check.
_ARITHMETIC: str | None = None

if HAVE_NUMBA:
    import numpy as np
    from numba.extending import intrinsic

    @intrinsic
    def _fma(typingctx, a, b, c):  # pragma: no cover - compiled into the kernel
        """a·b + c rounded once (LLVM's fma: one instruction where the CPU has it)."""
        def codegen(context, builder, signature, args):
            return builder.fma(*args)
        return a(a, b, c), codegen

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _warp_kernel(x, index, weight, out, inner, fused):  # pragma: no cover
        # x [B, P] planes; index/weight [m, P, 4]. inner = 0: out [m, B, P], every plane by every
        # table; else out [1, B, P], plane q by table (q // inner) % m. Plane-major: a plane,
        # copied with a trailing 0 (what an outside neighbour reads: index P), stays in L1 while
        # its tables stream past.
        planes, size = x.shape
        tables = index.shape[0]
        for q in numba.prange(planes):
            xs = np.empty(size + 1, dtype=x.dtype)
            xs[:size] = x[q]
            xs[size] = 0
            first = (q // inner) % tables if inner else 0
            last = first + 1 if inner else tables
            for j in range(first, last):
                o = out[0, q] if inner else out[j, q]
                ij = index[j]
                wj = weight[j]
                for p in range(size):
                    if fused:
                        o[p] = _fma(xs[ij[p, 3]], wj[p, 3], _fma(xs[ij[p, 2]], wj[p, 2],
                                    _fma(xs[ij[p, 1]], wj[p, 1], xs[ij[p, 0]] * wj[p, 0])))
                    else:
                        o[p] = ((xs[ij[p, 0]] * wj[p, 0] + xs[ij[p, 1]] * wj[p, 1])
                                + xs[ij[p, 2]] * wj[p, 2]) + xs[ij[p, 3]] * wj[p, 3]


def _unnormalise(g: torch.Tensor, size: int, fused: bool) -> torch.Tensor:
    """grid_sample's pixel coordinate of normalised g (align_corners=False): (g + 1)·size/2 − 0.5."""
    if fused:
        return ((g + 1).double() * (size / 2) - 0.5).float()
    return (g + 1) * (size / 2) - 0.5


def _build(theta: torch.Tensor, h: int, w: int, fused: bool) -> tuple[Any, Any]:
    grid = F.affine_grid(theta.float(), [len(theta), 1, h, w], align_corners=False)
    x, y = _unnormalise(grid[..., 0], w, fused), _unnormalise(grid[..., 1], h, fused)
    west, north = x.floor(), y.floor()
    right, down = x - west, y - north  # distances to the west and north neighbours
    left, up = 1 - right, 1 - down
    size = h * w
    columns, rows = west.long(), north.long()
    index = []
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # nw, ne, sw, se
        cx, cy = columns + dx, rows + dy
        inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
        index.append(torch.where(inside, cy * w + cx, size))
    weight = torch.stack([up * left, up * right, down * left, down * right], -1)
    shape = (len(theta), size, 4)
    return (torch.stack(index, -1).reshape(shape).to(torch.int32).numpy().copy(),
            weight.reshape(shape).numpy().copy())


def grid_sample_all(planes: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """The reference: maps [B, H, W] warped by content-mapping matrices [m, 3, 3] with
    ``grid_sample`` (bilinear, outside = 0), one grid per matrix for all B maps: [m, B, H, W]."""
    b, h, w = planes.shape
    m = len(matrices)
    theta = torch.linalg.inv(matrices.to(device=planes.device, dtype=torch.float64))[:, :2, :]
    grid = F.affine_grid(theta.to(planes.dtype), [m, b, h, w], align_corners=False)
    return F.grid_sample(planes.unsqueeze(0).expand(m, b, h, w), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def sampling_table(matrices: torch.Tensor, h: int, w: int, fused: bool) -> tuple[Any, Any]:
    """(index int32 [m, H·W, 4], weight float32 [m, H·W, 4]) of content-mapping matrices [m, 3, 3]
    on an H×W map: the four neighbours (nw, ne, sw, se; H·W = outside) of each output pixel and
    their bilinear weights, by ``fused`` or plain arithmetic. Kept for the session (a few dozen sets)."""
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


def _warp(x: torch.Tensor, matrices: torch.Tensor, inner: int, fused: bool) -> torch.Tensor:
    planes, h, w = x.shape
    index, weight = sampling_table(matrices, h, w, fused)
    m = len(index)
    if inner and planes % (m * inner):
        raise ValueError(f"x: {planes} maps are not [b, {m}, {inner}]")
    out = torch.empty((planes, h, w) if inner else (m, planes, h, w), dtype=x.dtype)
    flat = out.view(1 if inner else m, planes, h * w)
    _warp_kernel(x.reshape(planes, h * w).contiguous().numpy(), index, weight, flat.numpy(), inner, fused)
    return out


def warp_planes(x: torch.Tensor, matrices: torch.Tensor, inner: int = 0) -> torch.Tensor:
    """Maps x [B, H, W] (float32, CPU) warped by matrices [m, 3, 3], outside = 0. ``inner = 0``:
    every map by every matrix, [m, B, H, W]. ``inner = k``: map q by matrix (q // k) % m, [B, H, W]
    (x ordered [b, m, k]: slice j of each sample by matrix j). Only where :func:`available` says so."""
    return _warp(x, matrices, inner, _ARITHMETIC == "fused")


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
