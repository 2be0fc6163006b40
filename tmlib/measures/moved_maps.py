"""The tables with which a kernel moves a layer's maps by a transformation set as it reads them.

G-EED's latent equivariance and DSES compare each f(g_j·x_i) with g_j·f(x_i), the maps of the
untransformed sample moved by the set (``ts.apply``, zero fill). Stored, those moved maps are b·m
maps per layer and block written to memory and read back once; the kernels of
:mod:`.geed_kernels` and :mod:`.se_kernels` instead form each moved value where they need it, from
f(x_i)'s map in L1, with these tables: per transformation and output pixel, the index of a pixel
in the map copied into :mod:`tmlib.warp_kernels`' zero border (one column each side, one row
above, two below) and, for a warp, its four neighbours' weights (:func:`tmlib.warp_kernels.
weight_table`, grid_sample's float32 arithmetic, bit for bit). The weights are formed once per
table, not once per map and pixel: G-EED's pair kernel on one [10, 25, 16, 28, 28] block, median
of 40 calls, 2.11 → 1.82 ms ([.., 32, 14, 14] 1.08 → 0.93, [.., 64, 7, 7] 0.56 → 0.51 ms), the same
bits; two tables at a time on top of that (six independent sums) was slower (1.95 ms). An exact set (:class:`~tmlib.transforms.
ExactTransformationSet`: flips, quarter turns, cyclic shifts) moves pixels: its table is where
each output pixel comes from, copied.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import warp_kernels
from ..transforms import ExactTransformationSet, TransformationSet
from .moments import numba_available

__all__ = ["MapTables", "map_tables"]


class MapTables(NamedTuple):
    """What a kernel needs to move H×W maps by the m transformations of a set."""

    base: Any  # [m, H·W] int32: the (north-west) source pixel in the bordered map
    weights: Any  # [4, m, H·W] float32: the nw, ne, sw, se neighbours' weights (zeros when exact)
    fused: bool  # the warps' arithmetic: fused multiply-adds (warp_kernels.fused_arithmetic)
    exact: bool  # pixels copied (an exact set), not interpolated


def map_tables(ts: Any, block: torch.Tensor) -> MapTables | None:
    """The tables that move the maps of ``block`` [b, m, C, H, W] by ``ts`` as ``ts.apply`` does,
    or None where a kernel cannot: numba missing, a block that is not float32 on the CPU (or needs
    grad), a set with its own ``apply``, or warp tables that do not reproduce grid_sample here.
    A set of another size than the block's m transformations is a ValueError."""
    if (not numba_available() or block.dim() < 4 or block.dtype != torch.float32 or block.device.type != "cpu"
            or block.requires_grad):
        return None
    h, w = block.shape[-2:]
    if type(ts) is ExactTransformationSet:
        tables = MapTables(*_pixel_table(tuple(ts.elements), ts.size, h, w), False, True)
    elif type(ts).apply is not TransformationSet.apply or not warp_kernels.available(block):
        return None
    else:
        fused = warp_kernels.fused_arithmetic()  # known once available() has checked it
        tables = MapTables(*warp_kernels.weight_table(ts.matrices, h, w, fused), fused, False)
    if len(tables.base) != block.shape[1]:
        raise ValueError(f"ts has {len(tables.base)} transformations, the block {block.shape[1]}")
    return tables


@functools.lru_cache(maxsize=64)
def _pixel_table(elements: tuple, size: int | None, h: int, w: int) -> tuple[Any, Any]:
    # The set applied to the pixels' own indices: a permutation, exact in float64.
    ts = ExactTransformationSet(list(elements), "pixels", size)
    source = ts.apply(torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w))[0, :, 0].reshape(len(ts), h * w)
    rows, columns = source.long() // w, source.long() % w
    base = ((rows + 1) * (w + 2) + columns + 1).to(torch.int32).numpy().copy()
    return base, np.zeros((4, *base.shape), np.float32)
