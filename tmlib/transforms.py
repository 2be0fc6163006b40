"""Transformation sets: finite sets of affine maps of images, applied to whole batches.

Conventions (used everywhere in tmlib):

* Coordinates are *normalised*: x (left→right) and y (top→bottom) both span [-1, 1], with the
  origin at the centre of the image, as in ``torch.nn.functional.affine_grid`` with
  ``align_corners=False``. The same matrix therefore acts on a 28×28 input and on a 7×7 feature map.
* A matrix ``A`` (3×3, homogeneous) maps image *content*: what sits at ``u`` in the input appears at
  ``A u`` in the output. The sampling grid uses ``A⁻¹`` (output pixel → input location).
* Rotation angles are in degrees, counter-clockwise as seen on screen (so ``rotation(90)`` equals
  ``torch.rot90(x, 1, dims=(2, 3))``); degrees are converted to radians in one place,
  :func:`degrees_to_radians`. Scale factors are plain ratios (2 = twice as large). Translations are
  fractions of the image size (0.1 = a tenth of the width/height).
* Interpolation is bilinear; outside the input the image is filled with ``fill`` (default 0; pass the
  normalised value of the background, e.g. ``dataset.fill``, for normalised images).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from .checks import check_images
from .warps import (
    Fill,
    degrees_to_radians,
    rotation_matrix,
    scale_matrix,
    translation_matrix,
    warp,
    warp_all,
    warp_each,
)

__all__ = [
    "apply_uncopied",
    "identity_index",
    "TransformationSet",
    "ExactTransformationSet",
    "degrees_to_radians",
    "rotation_matrix",
    "scale_matrix",
    "translation_matrix",
    "warp",
    "rotations",
    "scales",
    "translations",
    "combined",
    "paper_set",
    "PAPER_SETS",
    "identity",
    "c4",
    "d4",
    "flips",
    "cyclic_shifts",
]

class TransformationSet:
    """A finite, ordered set of m affine transformations of images.

    Attributes:
        matrices: [m, 3, 3] float64 content-mapping matrices in normalised coordinates.
        parameters: one dict per transformation with the user-facing parameters
            (``degrees``, ``sx``/``sy``, ``tx``/``ty``), for labels and tables.
        name: a short description (used in results and file names).
    """

    exact = False

    def __init__(
        self,
        matrices: torch.Tensor,
        parameters: list[dict] | None = None,
        name: str = "custom",
    ) -> None:
        matrices = torch.as_tensor(matrices, dtype=torch.float64)
        if matrices.dim() != 3 or matrices.shape[1:] != (3, 3):
            raise ValueError(f"matrices must have shape [m, 3, 3], got {tuple(matrices.shape)}")
        if len(matrices) == 0:
            raise ValueError("a transformation set needs at least one transformation, got m=0")
        if not torch.allclose(matrices[:, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)):
            raise ValueError("matrices must be affine: their last row must be [0, 0, 1]")
        if torch.linalg.det(matrices).abs().min() < 1e-12:
            raise ValueError("every matrix must be invertible")
        self.matrices = matrices
        self.parameters = parameters if parameters is not None else [{} for _ in range(len(matrices))]
        if len(self.parameters) != len(matrices):
            raise ValueError("parameters must have one entry per matrix")
        self.name = name

    def __len__(self) -> int:
        return len(self.matrices)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, m={len(self)})"

    def labels(self) -> list[str]:
        """Short human-readable label of each transformation (for plot axes)."""
        out = []
        for p in self.parameters:
            parts = []
            if "degrees" in p:
                parts.append(f"{p['degrees']:g}°")
            if "sx" in p:
                parts.append(f"×({p['sx']:g},{p['sy']:g})")
            if "tx" in p:
                parts.append(f"+({p['tx']:g},{p['ty']:g})")
            if "k" in p:
                parts.append(str(p["k"]))
            out.append(" ".join(parts) or "id")
        return out

    def fingerprint(self) -> str:
        """A stable hash of the matrices (for cache keys)."""
        import hashlib

        data = self.matrices.numpy().round(12).tobytes()
        return f"{type(self).__name__}:{hashlib.sha256(data).hexdigest()[:16]}"

    def subset(self, indices: Sequence[int]) -> TransformationSet:
        idx = list(indices)
        return TransformationSet(self.matrices[idx], [self.parameters[i] for i in idx], self.name)

    def identity_index(self, tol: float = 1e-12) -> int | None:
        """Index of the first transformation equal to the identity (within ``tol``), or None."""
        return _identity_row(self.matrices, tol)

    def inverse(self) -> TransformationSet:
        """The set of exact inverses, in the same order (full-matrix inverse, not per parameter)."""
        inv = torch.linalg.inv(self.matrices)
        return TransformationSet(inv, [dict(p, inverse=True) for p in self.parameters], f"{self.name}⁻¹")

    def apply(self, x: torch.Tensor, fill: Fill = 0.0, contiguous: bool = True) -> torch.Tensor:
        """All m transformations of every image: x [b, C, H, W] → [b, m, C, H, W] on x's device.
        ``contiguous=False`` may return a strided view instead (the transformations outermost in
        memory: :func:`~tmlib.warps.warp_all` computes them that way), for a reader that takes it
        as it is and would pay for the copy otherwise."""
        # m sampling grids shared by the b images (warp_all): the same numbers as warping each of
        # the b·m (image, matrix) pairs, bit for bit (tests/test_transforms.py).
        return warp_all(x, self.matrices, fill, contiguous=contiguous)

    def apply_each(self, y: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
        """Transformation j applied to slice j: y [b, m, C, H, W] → [b, m, C, H, W]."""
        if y.dim() != 5 or y.shape[1] != len(self):
            raise ValueError(f"y must have shape [b, {len(self)}, C, H, W], got {tuple(y.shape)}")
        return warp_each(y, self.matrices.to(y.device), fill)

    def apply_indexed(self, x: torch.Tensor, indices: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
        """Transformation ``indices[i]`` applied to image ``x[i]`` (used for augmentation)."""
        check_images(x)
        indices = torch.as_tensor(indices, device=self.matrices.device).long().cpu()
        if indices.shape != (x.shape[0],):
            raise ValueError(f"indices must have shape [{x.shape[0]}], got {tuple(indices.shape)}")
        return warp(x, self.matrices[indices].to(x.device), fill)


def apply_uncopied(ts: Any, x: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
    """``ts.apply(x, fill)`` left as the [b, m, …] view of the warps when ``ts`` is a
    :class:`TransformationSet` (``contiguous=False``: no copy, for the kernels that read that
    layout in place); any other set's own ``apply``, whose signature may lack the option."""
    if isinstance(ts, TransformationSet):
        return ts.apply(x, fill=fill, contiguous=False)
    return ts.apply(x, fill=fill)


class ExactTransformationSet(TransformationSet):
    """A finite group acting exactly on the pixel grid (no interpolation).

    Each element is ``(k, flip, dx, dy)``: flip horizontally if ``flip``, then ``torch.rot90`` by k
    quarter turns (counter-clockwise on screen), then ``torch.roll`` by (dx, dy) pixels (cyclic).
    Rotations need square images.
    """

    exact = True

    def __init__(self, elements: Sequence[tuple[int, bool, int, int]], name: str, size: int | None = None):
        self.elements = [(int(k) % 4, bool(f), int(dx), int(dy)) for k, f, dx, dy in elements]
        mats, params = [], []
        for k, f, dx, dy in self.elements:
            flip = torch.diag(torch.tensor([-1.0 if f else 1.0, 1.0, 1.0], dtype=torch.float64))
            a = rotation_matrix(90 * k) @ flip
            if dx or dy:
                if size is None:
                    raise ValueError("cyclic shifts need the image size to give their matrices")
                a = translation_matrix(dx / size, dy / size) @ a
            mats.append(a)
            params.append({"k": f"{'flip·' if f else ''}rot{90 * k}" + (f"+roll({dx},{dy})" if dx or dy else "")})
        self.size = size
        super().__init__(torch.stack(mats), params, name)

    def _apply_one(self, x: torch.Tensor, element: tuple[int, bool, int, int]) -> torch.Tensor:
        k, f, dx, dy = element
        if f:
            x = torch.flip(x, dims=(-1,))
        if k:
            if x.shape[-1] != x.shape[-2]:
                raise ValueError(f"exact rotations need square images, got H×W = {tuple(x.shape[-2:])}")
            x = torch.rot90(x, k, dims=(-2, -1))
        if dx or dy:
            # The shift is a fraction of the image: on a feature map of another size (a pooled
            # layer, for same-equivariance) it is rescaled, and must still be whole pixels.
            h, w = x.shape[-2:]
            sx, sy = dx * w / self.size, dy * h / self.size
            if sx != int(sx) or sy != int(sy):
                raise ValueError(
                    f"cyclic shift ({dx}, {dy}) px of a {self.size}×{self.size} image is "
                    f"({sx:g}, {sy:g}) px on a {h}×{w} map: not whole pixels, so not exact"
                )
            x = torch.roll(x, shifts=(int(sy), int(sx)), dims=(-2, -1))
        return x

    def inverse(self) -> ExactTransformationSet:
        inv = []
        for k, f, dx, dy in self.elements:
            # (roll ∘ rot ∘ flip)⁻¹ = flip ∘ rot⁻¹ ∘ roll⁻¹; write it again as roll' ∘ rot' ∘ flip'.
            # Rotating the shift back by -k quarter turns gives roll'; a flip negates its x part.
            sx, sy = -dx, -dy
            for _ in range((-k) % 4):  # one counter-clockwise quarter turn maps (dx, dy) → (dy, -dx)
                sx, sy = sy, -sx
            if f:
                sx = -sx
            inv.append(((k if f else -k) % 4, f, sx, sy))
        return ExactTransformationSet(inv, f"{self.name}⁻¹", self.size)

    def subset(self, indices: Sequence[int]) -> ExactTransformationSet:
        return ExactTransformationSet([self.elements[i] for i in indices], self.name, self.size)

    def apply(self, x: torch.Tensor, fill: Fill = 0.0, contiguous: bool = True) -> torch.Tensor:
        check_images(x)
        return torch.stack([self._apply_one(x, e) for e in self.elements], dim=1)

    def apply_each(self, y: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
        if y.dim() != 5 or y.shape[1] != len(self):
            raise ValueError(f"y must have shape [b, {len(self)}, C, H, W], got {tuple(y.shape)}")
        b, m = y.shape[:2]
        idx = torch.arange(m, device=y.device).repeat(b)
        return self.apply_indexed(y.reshape(b * m, *y.shape[2:]), idx, fill).reshape(y.shape)

    def apply_indexed(self, x: torch.Tensor, indices: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
        check_images(x)
        indices = torch.as_tensor(indices).long().cpu()
        if indices.shape != (x.shape[0],):
            raise ValueError(f"indices must have shape [{x.shape[0]}], got {tuple(indices.shape)}")
        out = torch.empty_like(x)
        for j, element in enumerate(self.elements):
            sel = (indices == j).nonzero().flatten().to(x.device)
            if len(sel):
                out[sel] = self._apply_one(x[sel], element)
        return out


# ---------------------------------------------------------------------------- named constructors


def _identity_row(matrices: Any, tol: float) -> int | None:
    matrices = torch.as_tensor(matrices, dtype=torch.float64).cpu()
    close = (matrices - torch.eye(3, dtype=torch.float64)).abs().amax(dim=(1, 2)) <= tol
    hits = close.nonzero().flatten()
    return int(hits[0]) if len(hits) else None


def identity_index(ts: Any, tol: float = 1e-12) -> int | None:
    """:meth:`TransformationSet.identity_index` for any set with ``matrices`` ([m, 3, 3]); None for
    a set without matrices (a generic set: its identity cannot be recognised)."""
    matrices = getattr(ts, "matrices", None)
    return None if matrices is None else _identity_row(matrices, tol)


def rotations(n: int = 25, degrees: float = 360.0) -> TransformationSet:
    """n rotations spread evenly over a range of ``degrees``.

    A full turn (``degrees >= 360``) gives 0, 360/n, …; a narrower range gives n angles from
    -degrees/2 to +degrees/2 inclusive (so it contains the identity when n is odd).
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if degrees <= 0:
        raise ValueError(f"degrees must be positive, got {degrees!r}")
    if degrees >= 360:
        angles = [360.0 * k / n for k in range(n)]
    elif n == 1:
        angles = [0.0]
    else:
        angles = [-degrees / 2 + degrees * k / (n - 1) for k in range(n)]
    return TransformationSet(
        torch.stack([rotation_matrix(a) for a in angles]),
        [{"degrees": a} for a in angles],
        f"rotation{n}x{degrees:g}deg",
    )


def scales(
    factors: Sequence[float | tuple[float, float]] | None = None,
    *,
    n_down: int = 4,
    n_up: int = 4,
    min_scale: float = 0.5,
    max_scale: float = 1.25,
    anisotropic: bool = True,
) -> TransformationSet:
    """Scalings. Default: the paper's 25 (identity + 4 downscales in [0.5, 1) and 4 upscales in
    (1, 1.25], each applied as (1, s), (s, 1) and (s, s)).

    ``factors`` gives the factors explicitly: numbers (isotropic) or (sx, sy) pairs.
    """
    if factors is None:
        if not 0 < min_scale <= 1 <= max_scale:
            raise ValueError(f"need 0 < min_scale <= 1 <= max_scale, got {min_scale}, {max_scale}")
        down = [min_scale + (1 - min_scale) * k / n_down for k in range(n_down)]
        up = [max_scale - (max_scale - 1) * k / n_up for k in range(n_up)][::-1]
        pairs: list[tuple[float, float]] = [(1.0, 1.0)]
        for s in down + up:
            pairs += [(1.0, s), (s, 1.0), (s, s)] if anisotropic else [(s, s)]
    else:
        pairs = [(float(f), float(f)) if not isinstance(f, (tuple, list)) else (float(f[0]), float(f[1])) for f in factors]
        if not pairs:
            raise ValueError("factors must not be empty")
    return TransformationSet(
        torch.stack([scale_matrix(sx, sy) for sx, sy in pairs]),
        [{"sx": sx, "sy": sy} for sx, sy in pairs],
        f"scale{len(pairs)}",
    )


_DIRECTIONS_8 = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]


def translations(
    intensities: Sequence[float] = (0.05, 0.10, 0.15), directions: int = 8
) -> TransformationSet:
    """Identity plus each intensity (fraction of the image size) in 4 or 8 compass directions.

    Default: the paper's 25 = 1 + 3 intensities × 8 directions.
    """
    if directions not in (4, 8):
        raise ValueError(f"directions must be 4 or 8, got {directions!r}")
    dirs = _DIRECTIONS_8 if directions == 8 else _DIRECTIONS_8[::2]
    shifts = [(0.0, 0.0)] + [(t * dx, t * dy) for t in intensities for dx, dy in dirs]
    return TransformationSet(
        torch.stack([translation_matrix(tx, ty) for tx, ty in shifts]),
        [{"tx": tx, "ty": ty} for tx, ty in shifts],
        f"translation{len(shifts)}",
    )


def combined(
    rotation: TransformationSet | None = None,
    scale: TransformationSet | None = None,
    translation: TransformationSet | None = None,
) -> TransformationSet:
    """Every composition translate ∘ rotate ∘ scale of the three sets (scale applied first).

    Default: the paper's "hard" set, 8 rotations × 7 scales × 9 translations = 504.
    """
    rotation = rotation if rotation is not None else rotations(8)
    scale = scale if scale is not None else scales([0.5, 0.75, 0.875, 1.0, 1.0625, 1.125, 1.25])
    translation = translation if translation is not None else translations((0.1,))
    mats, params = [], []
    for (r, pr), (s, ps), (t, pt) in itertools.product(
        zip(rotation.matrices, rotation.parameters),
        zip(scale.matrices, scale.parameters),
        zip(translation.matrices, translation.parameters),
    ):
        mats.append(t @ r @ s)
        params.append({**ps, **pr, **pt})
    return TransformationSet(torch.stack(mats), params, f"combined{len(mats)}")


PAPER_SETS = ("rotation", "scale", "translation", "combined")


def paper_set(name: str) -> TransformationSet:
    """The sets of Quiroga et al. 2023 by name: rotation, scale, translation (25 each), combined (504)."""
    makers = {"rotation": rotations, "scale": scales, "translation": translations, "combined": combined}
    if name not in makers:
        raise ValueError(f"name must be one of {list(makers)}, got {name!r}")
    ts = makers[name]()
    ts.name = f"paper-{name}"
    return ts


def identity() -> ExactTransformationSet:
    return ExactTransformationSet([(0, False, 0, 0)], "identity")


def c4() -> ExactTransformationSet:
    """The four quarter turns 0°, 90°, 180°, 270° by ``torch.rot90``: exact, no interpolation."""
    return ExactTransformationSet([(k, False, 0, 0) for k in range(4)], "C4")


def d4() -> ExactTransformationSet:
    """The dihedral group of the square: the four quarter turns, with and without a flip."""
    return ExactTransformationSet([(k, f, 0, 0) for f in (False, True) for k in range(4)], "D4")


def flips() -> ExactTransformationSet:
    """Identity, horizontal flip, vertical flip (= flip then 180°), and 180° rotation."""
    return ExactTransformationSet([(0, False, 0, 0), (0, True, 0, 0), (2, True, 0, 0), (2, False, 0, 0)], "flips")


def cyclic_shifts(shifts: Sequence[tuple[int, int]], size: int) -> ExactTransformationSet:
    """Cyclic translations by whole pixels ``(dx, dy)`` (``torch.roll``) of size×size images.

    On maps of another size (feature maps) the shift is scaled by map size / ``size``, and must
    stay a whole number of pixels."""
    if not shifts:
        raise ValueError("shifts must not be empty")
    return ExactTransformationSet([(0, False, dx, dy) for dx, dy in shifts], f"shifts{len(shifts)}", size)
