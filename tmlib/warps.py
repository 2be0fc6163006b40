"""Affine warps in normalised coordinates: the matrices users think in, and one batched warp.

Coordinates are normalised to [-1, 1] with the origin at the image centre, so one 3×3 matrix acts
on any H×W; matrices *map content* (a point u of the input lands on M·u). Degrees are converted
to radians in one place (:func:`degrees_to_radians`). :func:`warp` inverts the matrices in float64
and samples bilinearly (``affine_grid`` + ``grid_sample``) on the images' device; the outside is
``fill``. :mod:`tmlib.transforms` builds its sets on these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import warp_kernels
from .checks import check_images

__all__ = ["Fill", "degrees_to_radians", "rotation_matrix", "scale_matrix", "translation_matrix", "warp", "warp_all",
           "warp_each"]

Fill = float | Sequence[float]


def degrees_to_radians(degrees: float) -> float:
    """The single place where tmlib turns user-facing degrees into radians."""
    return float(degrees) * math.pi / 180.0


def rotation_matrix(degrees: float) -> torch.Tensor:
    """[3, 3] float64 matrix rotating image content by ``degrees`` counter-clockwise on screen.

    With y pointing down, a counter-clockwise turn on screen is ``[[c, s], [-s, c]]``.
    """
    theta = degrees_to_radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    # Snap the values of exact quarter turns so that 90° is exactly a pixel permutation.
    c, s = (round(v) if abs(v - round(v)) < 1e-12 else v for v in (c, s))
    return torch.tensor([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def scale_matrix(sx: float, sy: float | None = None) -> torch.Tensor:
    """[3, 3] float64 matrix scaling content by ``sx`` horizontally and ``sy`` vertically."""
    sy = sx if sy is None else sy
    if sx <= 0 or sy <= 0:
        raise ValueError(f"scale factors must be positive, got sx={sx}, sy={sy}")
    return torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def translation_matrix(tx: float, ty: float) -> torch.Tensor:
    """[3, 3] float64 matrix moving content by ``tx``·width right and ``ty``·height down.

    Normalised coordinates span 2 units per image side, hence the factor 2.
    """
    return torch.tensor(
        [[1.0, 0.0, 2.0 * tx], [0.0, 1.0, 2.0 * ty], [0.0, 0.0, 1.0]], dtype=torch.float64
    )


def _fill_tensor(fill: Fill, x: torch.Tensor) -> torch.Tensor | None:
    """Fill value as a tensor broadcastable to x [..., C, H, W], or None for a zero fill."""
    values = torch.as_tensor(fill, dtype=x.dtype, device=x.device).flatten()
    if values.numel() not in (1, x.shape[-3]):
        raise ValueError(
            f"fill must be a number or one value per channel ({x.shape[-3]}), got {list(values)}"
        )
    if bool((values == 0).all()):
        return None
    return values.reshape(-1, 1, 1)


def warp(x: torch.Tensor, matrices: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
    """Warp each image of a batch by its own affine matrix.

    Args:
        x: images [b, C, H, W] (float), on any device.
        matrices: [b, 3, 3] or [3, 3] content-mapping matrices in normalised coordinates.
        fill: value outside the input, a number or one per channel (in x's units).

    Returns:
        [b, C, H, W] warped images on x's device, bilinear interpolation.
    """
    check_images(x)
    matrices = torch.as_tensor(matrices)
    if matrices.dim() == 2:
        matrices = matrices.expand(x.shape[0], 3, 3)
    if matrices.shape != (x.shape[0], 3, 3):
        raise ValueError(
            f"matrices must have shape [{x.shape[0]}, 3, 3] (one per image), "
            f"got {tuple(matrices.shape)}"
        )
    # Invert in float64 for exactness, then sample in the images' dtype.
    theta = torch.linalg.inv(matrices.to(device=x.device, dtype=torch.float64))[:, :2, :]
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    fill_t = _fill_tensor(fill, x)
    if fill_t is None:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Zero padding of (x - fill), then + fill, fills the outside with `fill` exactly.
    warped = F.grid_sample(x - fill_t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped + fill_t


def warp_all(x: torch.Tensor, matrices: torch.Tensor, fill: Fill = 0.0, contiguous: bool = True) -> torch.Tensor:
    """Warp every image of a batch by every matrix: x [b, C, H, W], matrices [m, 3, 3] →
    [b, m, C, H, W] (what :func:`warp` gives for each pair, bilinear, outside = ``fill``).

    The m sampling grids are built once and shared by the b images: the images are folded into
    the channels ([m, b·C, H, W] against m grids), so inverting the matrices and building the grids
    cost m instead of b·m, and grid_sample computes each output pixel's weights once for all b·C
    maps (a tenfold saving in the warps of a pass over feature maps: benchmarks/bench_geed.py). On
    the CPU, float32, the same numbers come from sampling tables built once per set and map size
    (:mod:`tmlib.warp_kernels`: 1.3–3× faster than grid_sample on feature maps).
    ``contiguous=False``: the [b, m, …] view of that [m, b, …] result, without the copy (a third of
    the warps' time on feature maps: 0.75 of 2.7 s in a G-EED pass of 300 × 25 rotations)."""
    check_images(x)
    matrices = torch.as_tensor(matrices)
    if matrices.dim() != 3 or matrices.shape[1:] != (3, 3):
        raise ValueError(f"matrices must have shape [m, 3, 3], got {tuple(matrices.shape)}")
    b, c, h, w = x.shape
    m = matrices.shape[0]
    fill_t = _fill_tensor(fill, x)
    folded = x if fill_t is None else x - fill_t
    if warp_kernels.available(folded):  # the same numbers from tables built once per set and size
        out = warp_kernels.warp_planes(folded.reshape(b * c, h, w), matrices)
    else:
        out = warp_kernels.grid_sample_all(folded.reshape(b * c, h, w), matrices)
    out = out.reshape(m, b, c, h, w).transpose(0, 1)
    if fill_t is not None:
        out = out + fill_t
    return out.contiguous() if contiguous else out


def warp_each(y: torch.Tensor, matrices: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
    """Slice j of every sample warped by matrix j: y [b, m, C, H, W], matrices [m, 3, 3] →
    [b, m, C, H, W] (what :func:`warp` gives for each (map, matrix) pair, bilinear, outside = ``fill``)."""
    matrices = torch.as_tensor(matrices)
    if y.dim() != 5 or matrices.dim() != 3 or matrices.shape != (y.shape[1], 3, 3):
        raise ValueError(f"y must have shape [b, m, C, H, W] and matrices [m, 3, 3], got {tuple(y.shape)} "
                         f"and {tuple(matrices.shape)}")
    b, m, c, h, w = y.shape
    fill_t = _fill_tensor(fill, y)
    if not warp_kernels.available(y):
        return warp(y.reshape(b * m, c, h, w), matrices.repeat(b, 1, 1), fill).reshape(y.shape)
    shifted = y if fill_t is None else y - fill_t
    out = warp_kernels.warp_planes(shifted.reshape(b * m * c, h, w), matrices, inner=c).reshape(y.shape)
    return out if fill_t is None else out + fill_t
