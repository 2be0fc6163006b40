"""Generators and the input-space tangents v_h(x) = −∇x·(h u) (see :mod:`tmlib.lie`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..checks import check_images
from ..warps import warp

__all__ = ["BASIS", "BASIS_NAMES", "GENERATORS", "LEE_NORMALISATION", "OUTPUT", "check_model", "generator_list",
           "generator_matrix", "image_gradient", "symmetry_bias", "tangent", "tangents", "warp_by_generator"]

OUTPUT = "output"  # the layer name meaning "what the model returns"

LEE_NORMALISATION = "mean over samples of the mean over units of (L_h f)^2"


def _affine(linear: Sequence[Sequence[float]] = ((0, 0), (0, 0)), shift: Sequence[float] = (0, 0)) -> torch.Tensor:
    h = torch.zeros(3, 3, dtype=torch.float64)
    h[:2, :2] = torch.tensor(linear, dtype=torch.float64)
    h[:2, 2] = torch.tensor(shift, dtype=torch.float64)
    return h


#: Named generators as 3×3 affine Lie-algebra matrices (last row 0); ``[:2, :2]`` is the 2×2 part.
GENERATORS: dict[str, torch.Tensor] = {
    "rotation": _affine([[0, 1], [-1, 0]]),
    "scale": _affine([[1, 0], [0, 1]]),
    "shear_x": _affine([[0, 1], [0, 0]]),
    "shear_y": _affine([[0, 0], [1, 0]]),
    "stretch": _affine([[1, 0], [0, -1]]),
    "translation_x": _affine(shift=[1, 0]),
    "translation_y": _affine(shift=[0, 1]),
}

# The LieGG basis: E11, E12, E21, E22 of gl(2), then the two translations.
BASIS_NAMES = ("E11", "E12", "E21", "E22", "Tx", "Ty")
BASIS = torch.stack(
    [_affine([[1, 0], [0, 0]]), _affine([[0, 1], [0, 0]]), _affine([[0, 0], [1, 0]]), _affine([[0, 0], [0, 1]]),
     _affine(shift=[1, 0]), _affine(shift=[0, 1])]
)


# ---------------------------------------------------------------------------------- validation


def check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(f"model must be a torch.nn.Module (or a callable), got {type(model).__name__}")


def generator_matrix(generator: str | torch.Tensor | Sequence) -> torch.Tensor:
    """The 3×3 float64 affine generator for a name of :data:`GENERATORS`, a 2×2 matrix (linear, no
    shift), a 2×3 matrix (linear | shift) or a 3×3 matrix (its last row must be zero)."""
    if isinstance(generator, str):
        if generator not in GENERATORS:
            raise ValueError(f"generator: unknown generator name {generator!r}; known: {list(GENERATORS)}")
        return GENERATORS[generator].clone()
    try:
        h = torch.as_tensor(generator, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"generator must be a name or a 2×2/2×3/3×3 matrix, got {type(generator).__name__}") from err
    if h.shape == (2, 2):
        return _affine(h.tolist())
    if h.shape == (2, 3):
        return _affine(h[:, :2].tolist(), h[:, 2].tolist())
    if h.shape == (3, 3):
        if bool(h[2].abs().max() > 1e-12):
            raise ValueError(f"generator: a 3×3 affine generator needs a zero last row, got {h[2].tolist()}")
        return h
    raise ValueError(f"generator must be a name or a 2×2, 2×3 or 3×3 matrix, got shape {tuple(h.shape)}")


def generator_list(generators: Any) -> tuple[list[str], torch.Tensor]:
    """Names and [k, 3, 3] matrices of a generator name/matrix or a list or dict of them."""
    if generators is None:
        generators = list(GENERATORS)
    if isinstance(generators, (str, torch.Tensor)):
        generators = [generators]
    if isinstance(generators, dict):
        items = list(generators.items())
    else:
        items = [(g if isinstance(g, str) else f"h{i}", g) for i, g in enumerate(generators)]
    if not items:
        raise ValueError("generators must not be empty")
    return [name for name, _ in items], torch.stack([generator_matrix(g) for _, g in items])


# ---------------------------------------------------------------------------------- tangents


def _pixel_coordinates(size: int, device, dtype) -> torch.Tensor:
    """Normalised coordinates of the pixel centres (align_corners=False): (2j + 1)/size - 1."""
    return (2 * torch.arange(size, device=device, dtype=dtype) + 1) / size - 1


def _pad(x: torch.Tensor, fill: Any) -> torch.Tensor:
    if fill is None:
        return torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    values = torch.as_tensor(fill, dtype=x.dtype, device=x.device).flatten()
    if values.numel() not in (1, x.shape[1]):
        raise ValueError(f"fill must be None, a number or one value per channel ({x.shape[1]}), got {values.tolist()}")
    padded = torch.nn.functional.pad(x - values.reshape(1, -1, 1, 1), (1, 1, 1, 1))
    return padded + values.reshape(1, -1, 1, 1)


def image_gradient(x: torch.Tensor, fill: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂x/∂u_x, ∂x/∂u_y) of images [b, C, H, W] in normalised units, by central differences."""
    check_images(x, allow_empty=False)
    h, w = x.shape[-2:]
    p = _pad(x, fill)
    gx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) * (w / 4.0)  # /2 (central) × W/2 (pixels per unit)
    gy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) * (h / 4.0)
    return gx, gy


def tangents(x: torch.Tensor, generators: torch.Tensor, fill: Any = None) -> torch.Tensor:
    """Tangents of images x [b, C, H, W] along k generators [k, 3, 3]: [k, b, C, H, W]."""
    check_images(x, allow_empty=False)
    gens = torch.as_tensor(generators, dtype=torch.float64)
    if gens.dim() != 3 or gens.shape[1:] != (3, 3):
        raise ValueError(f"generators must have shape [k, 3, 3], got {tuple(gens.shape)}")
    gx, gy = image_gradient(x, fill)
    hgt, wid = x.shape[-2:]
    ys = _pixel_coordinates(hgt, x.device, x.dtype).reshape(hgt, 1)
    xs = _pixel_coordinates(wid, x.device, x.dtype).reshape(1, wid)
    h = gens.to(x.device, x.dtype).reshape(-1, 3, 3, 1, 1, 1)  # [k, 3, 3] → per generator, broadcast over [C, H, W]
    vx = h[:, 0, 0] * xs + h[:, 0, 1] * ys + h[:, 0, 2]  # (h u)_x at every pixel, [k, 1, H, W]
    vy = h[:, 1, 0] * xs + h[:, 1, 1] * ys + h[:, 1, 2]
    return -(gx * vx.unsqueeze(1) + gy * vy.unsqueeze(1))  # [k, b, C, H, W]


def tangent(x: torch.Tensor, generator: str | torch.Tensor, fill: Any = None) -> torch.Tensor:
    """Input-space tangent ``v_h(x) = d/dt x(exp(-t h) u)|_0 = -∇x·(h u)`` of images [b, C, H, W].

    Units: per unit of the generator's parameter (per radian for ``"rotation"``, per normalised
    unit for the translations; see the module docstring). ∇x by central differences; outside the
    image x is extended by ``fill`` (None: replicate the edge; a number or one value per channel).

    Returns:
        [b, C, H, W], same dtype and device as x.
    """
    return tangents(x, generator_matrix(generator).unsqueeze(0), fill)[0]


# ---------------------------------------------------------------------------------- layer capture


def symmetry_bias(h: torch.Tensor) -> torch.Tensor:
    """``‖(A + Aᵀ)/2‖_F`` of the linear part A of unit-norm generators [..., 2, 2|3] (0 = rotation)."""
    h = torch.as_tensor(h, dtype=torch.float64)
    a = h[..., :2, :2]
    norm = h.flatten(-2).norm(dim=-1)
    return ((a + a.transpose(-1, -2)) / 2).flatten(-2).norm(dim=-1) / norm


def warp_by_generator(image: torch.Tensor, h: str | torch.Tensor, thetas: Sequence[float], fill: Any = 0.0) -> torch.Tensor:
    """The finite transformations ``expm(θ h)`` of an image, for a picture of a generator.

    Args:
        image: [C, H, W] or [1, C, H, W].
        h: a generator (name or 2×2/2×3/3×3 matrix), in the conventions of the module docstring.
        thetas: parameter values θ (radians for rotation-like generators of unit norm).
        fill: value outside the image (as :func:`tmlib.transforms.warp`).

    Returns:
        [len(thetas), C, H, W]: ``warp(image, torch.linalg.matrix_exp(θ h))`` for each θ.
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor [C, H, W], got {type(image).__name__}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must have shape [C, H, W] or [1, C, H, W], got {tuple(image.shape)}")
    gen = generator_matrix(h)
    thetas = torch.as_tensor(list(thetas), dtype=torch.float64)
    if thetas.dim() != 1 or len(thetas) == 0:
        raise ValueError("thetas must be a non-empty sequence of numbers")
    mats = torch.linalg.matrix_exp(thetas.reshape(-1, 1, 1) * gen)
    return warp(image.expand(len(thetas), *image.shape[1:]), mats, fill)
