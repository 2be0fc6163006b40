"""Infinitesimal invariance and equivariance: Lie derivatives (LEE) and LieGG.

Conventions are those of :mod:`tmlib.transforms`: normalised coordinates u = (x, y), x to the right
and y *down*, both in [-1, 1] over the image with the origin at the image centre (pixel centre j
sits at ``(2j + 1)/W - 1``, so the origin is at pixel ``(W - 1)/2``). A 3×3 matrix ``A`` maps
image *content*: what sits at u appears at ``A u``.

Generators. A *generator* is a 3×3 matrix ``h`` of the affine Lie algebra (last row zero): its
upper-left 2×2 block acts linearly on u, its last column is a translation. ``expm(t h)`` is the
affine map of the one-parameter group, in the same convention as tmlib's matrices:
``warp(x, expm(t h))`` moves content along h. :data:`GENERATORS` names the usual ones:

=================  ===========================  ===================================================
name               h (linear part | shift)      parameter t
=================  ===========================  ===================================================
``rotation``       [[0, 1], [-1, 0]]            radians, counter-clockwise on screen
                                                (``expm(t h) == rotation_matrix(degrees(t))``)
``scale``          [[1, 0], [0, 1]]             log of the scale factor
``shear_x``        [[0, 1], [0, 0]]             x ← x + t·y
``shear_y``        [[0, 0], [1, 0]]             y ← y + t·x
``stretch``        [[1, 0], [0, -1]]            log of the x/y aspect change (identity at t = 0)
``translation_x``  shift (1, 0)                 normalised units (1 = half the image width; tmlib's
                                                ``translation_matrix(tx, 0)`` has t = 2·tx)
``translation_y``  shift (0, 1)                 normalised units, downwards
=================  ===========================  ===================================================

Tangent. The input-space tangent of image x along h is ``v_h(x)(u) = d/dt x(exp(-t h) u)|_{t=0}
= -∇x(u)·(h u)`` (per unit of t), with ∇x by *central differences* on the pixel grid converted to
normalised units (``∂/∂x = (W/2)·∂/∂j``). This is the exact derivative of tmlib's bilinear warp
taken symmetrically, ``(warp(x, expm(εh)) - warp(x, expm(-εh)))/(2ε)`` as ε→0 (bilinear sampling
at ±d pixels differs by d·(x[j+1] - x[j-1])), and it is never a derivative of grid_sample at t = 0
(which would be one-sided). At the border the image is extended by ``fill`` (None: the edge pixel).

Lie derivative. For a network output or a layer f, ``L_h f(x) = J_f(x) v_h(x)``, computed in
forward mode with :func:`torch.func.jvp` (no finite differences through the network). Layers are
captured under the JVP by forward hooks on the named modules (names as in
:mod:`tmlib.activations`, ``"output"`` = what the model returns): the hooks see the dual tensors,
so one forward-mode run gives the Lie derivative of every requested layer at once. Several
generators are pushed through one run with :func:`torch.func.vmap` over the tangents (the primal
is computed once), with a plain loop as fallback.

LEE (Gruver et al. 2023): ``E_x mean_units (L_h f(x))²`` — the *squared* Lie derivative, averaged
over the units of the layer, then over the samples. Never ``|L_h f|``.

LieGG (Moskalev et al. 2022): one row per (sample, output unit) of ``(L_{h_1} f, ..., L_{h_k} f)``
for the basis ``E11, E12, E21, E22`` of gl(2) (plus the two translations on request). The Gram
matrix ``G = mean over rows of rowᵀrow`` is streamed over batches; for any generator
``h = Σ c_k h_k``, ``cᵀ G c`` is exactly the LEE of f along h, so ``G[k, k]`` is the LEE of the
basis generator k. The eigenvalues of G (ascending) are the *symmetry variances* of its
eigen-generators (eigenvectors reshaped to 2×2, unit Frobenius norm); ~0 means a learned
symmetry. The *symmetry bias* of a unit-norm h is ``‖(h + hᵀ)/2‖_F`` (0 = pure rotation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import LayerObserver
from .checks import check_images, check_int
from .measures.states import ShiftedMoments
from .transforms import warp

__all__ = [
    "GENERATORS",
    "LEE_NORMALISATION",
    "OUTPUT",
    "LieGGResult",
    "generator_matrix",
    "image_gradient",
    "lie_derivative",
    "lie_equivariance_error",
    "liegg",
    "symmetry_bias",
    "tangent",
    "tangents",
    "warp_by_generator",
]

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
_BASIS_NAMES = ("E11", "E12", "E21", "E22", "Tx", "Ty")
_BASIS = torch.stack(
    [_affine([[1, 0], [0, 0]]), _affine([[0, 1], [0, 0]]), _affine([[0, 0], [1, 0]]), _affine([[0, 0], [0, 1]]),
     _affine(shift=[1, 0]), _affine(shift=[0, 1])]
)


# ---------------------------------------------------------------------------------- validation


def _check_model(model: Any) -> None:
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


def _generator_list(generators: Any) -> tuple[list[str], torch.Tensor]:
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
    out = []
    for h in gens.to(x.dtype).tolist():
        vx = h[0][0] * xs + h[0][1] * ys + h[0][2]  # (h u)_x at every pixel, [H, W]
        vy = h[1][0] * xs + h[1][1] * ys + h[1][2]
        out.append(-(gx * vx + gy * vy))
    return torch.stack(out)


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


def _default_layers(model: Any) -> list[str]:
    names = getattr(model, "layer_names", None)
    if callable(names):
        return list(names())
    return [OUTPUT]


def _normalise_layers(model: Any, layers: Any, argument: str) -> list[str]:
    if layers is None:
        return [OUTPUT]
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError(f"{argument} must name at least one layer")
    for layer in layers:
        if not isinstance(layer, str):
            raise TypeError(f"{argument}: layer names must be strings, got {layer!r}")
    hooked = [name for name in layers if name != OUTPUT or _has_module(model, OUTPUT)]
    if hooked:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{argument}: hidden layers need model to be a torch.nn.Module, got {type(model).__name__}")
        try:
            LayerObserver(model, hooked, lambda *_: None)  # validates the names, registers nothing
        except ValueError as err:
            raise ValueError(f"{argument}: {err}") from None
    return layers


def _has_module(model: Any, name: str) -> bool:
    return isinstance(model, nn.Module) and name in dict(model.named_modules())


def _layer_function(model: Any, layers: list[str]) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """A function x → (output of each layer, in order), capturing hidden layers with hooks."""
    hooked = [name for name in layers if name != OUTPUT or _has_module(model, OUTPUT)]

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not hooked:
            return (model(x),)
        captured: dict[str, torch.Tensor] = {}
        # Not detached: under torch.func.jvp/vmap the dual tensor carries the tangent.
        with LayerObserver(model, hooked, captured.__setitem__, detach=False) as observer:
            out = model(x)
            observer.check_seen()
        return tuple(out if name == OUTPUT and name not in captured else captured[name] for name in layers)

    return run


# ---------------------------------------------------------------------------------- forward mode


def _jvp_many(fn: Callable, x: torch.Tensor, vs: torch.Tensor, vectorize: bool = True):
    """Primal outputs of fn(x) and their JVPs along each tangent vs[i]: (tuple, tuple of [k, ...])."""
    if vectorize and len(vs) > 1:
        try:
            def push(v):
                return torch.func.jvp(fn, (x,), (v,))

            primal, jv = torch.func.vmap(push, in_dims=0, out_dims=(None, 0))(vs)
            return primal, jv
        except Exception:  # noqa: BLE001, S110  (an op without a batching rule: loop instead)
            pass
    outs = [torch.func.jvp(fn, (x,), (v,)) for v in vs]
    primal = outs[0][0]
    return primal, tuple(torch.stack([o[1][i] for o in outs]) for i in range(len(primal)))


def _equivariant_correction(out: torch.Tensor, gens: torch.Tensor, fill: Any) -> torch.Tensor | None:
    """Tangent of the output action on an image-shaped layer output [b, C, H, W]: [k, b, C, H, W]."""
    if out.dim() != 4:
        return None
    return tangents(out, gens, fill)


def lie_derivative(
    model: Callable,
    x: torch.Tensor,
    generator: str | torch.Tensor,
    layer: str | None = None,
    fill: Any = None,
    equivariant: bool = False,
) -> torch.Tensor:
    """Lie derivative ``L_h f(x) = J_f(x) v_h(x)`` of the model output or of one layer, by JVP.

    Args:
        model: an nn.Module (or any function of x when ``layer`` is None).
        x: images [b, C, H, W].
        generator: a name of :data:`GENERATORS` or a 2×2 / 2×3 / 3×3 generator matrix.
        layer: a module path (``tmlib.activations`` names, ``path#k`` for the k-th call) or None /
            ``"output"`` for what the model returns.
        fill: border extension of x for the image gradient (see :func:`tangent`).
        equivariant: for image-shaped layer outputs [b, C', H', W'], subtract the tangent of the
            output itself (``J_f v_h(x) - v_h(f(x))``, same normalised coordinates), measuring
            equivariance; other shapes are unaffected.

    Returns:
        [b, *layer_shape] in the layer's dtype (per unit of the generator's parameter).
    """
    _check_model(model)
    check_images(x, allow_empty=False)
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name (str) or None, got {type(layer).__name__}")
    layers = _normalise_layers(model, layer, "layer")
    gens = generator_matrix(generator).unsqueeze(0)
    vs = tangents(x, gens, fill)
    with torch.no_grad():
        primal, jv = _jvp_many(_layer_function(model, layers), x, vs)
        out = jv[0][0]
        if equivariant:
            corr = _equivariant_correction(primal[0], gens, fill)
            if corr is not None:
                out = out - corr[0]
    return out


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)


def lie_equivariance_error(
    model: Callable,
    x: torch.Tensor,
    generators: Any = ("rotation", "scale", "shear_x", "shear_y", "stretch", "translation_x", "translation_y"),
    layers: Sequence[str] | str | None = None,
    batch_size: int = 64,
    fill: Any = None,
    equivariant: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """LEE of every requested layer along every generator, in one forward-mode run per batch.

    Args:
        generators: names, matrices, a list of them or a dict name → matrix.
        layers: layer names (module paths, ``"output"``); None = ``model.layer_names()`` if the
            model has it, else the output.
        equivariant: see :func:`lie_derivative` (image-shaped layers only).

    Returns:
        Tidy DataFrame, one row per (layer, generator) in forward order, columns ``layer``,
        ``generator``, ``value`` (mean over samples of the mean over units of (L_h f)²), ``sem``
        (standard error over samples of that per-sample mean), ``variance`` (mean over units of
        the variance of f over the samples), ``relative`` (value / variance: scale-free, for
        comparing models whose outputs differ in size, e.g. trained vs untrained), ``n``
        (samples), ``units``, ``kind`` (invariance/equivariance), ``normalisation``.
    """
    _check_model(model)
    check_images(x, allow_empty=False)
    batch_size = check_int("batch_size", batch_size, 1)
    names, gens = _generator_list(generators)
    layers = _default_layers(model) if layers is None else layers
    layers = _normalise_layers(model, layers, "layers")
    fn = _layer_function(model, layers)
    per_sample: list[list[list[torch.Tensor]]] = [[[] for _ in names] for _ in layers]
    units = [0] * len(layers)
    kinds = ["invariance"] * len(layers)
    moments: list[ShiftedMoments | None] = [None] * len(layers)  # per layer: f's moments per unit
    n = x.shape[0]
    with torch.no_grad(), tqdm(total=n, desc="LEE", unit="sample", disable=not progress) as bar:
        for start, stop in _batches(n, batch_size):
            xb = x[start:stop]
            vs = tangents(xb, gens, fill)
            primal, jv = _jvp_many(fn, xb, vs)
            for i, (p, d) in enumerate(zip(primal, jv)):
                flat = p.reshape(stop - start, -1)
                if moments[i] is None:
                    moments[i] = ShiftedMoments((flat.shape[1],), flat.device)
                moments[i].update(flat)
                if equivariant:
                    corr = _equivariant_correction(p, gens, fill)
                    if corr is not None:
                        d = d - corr
                        kinds[i] = "equivariance"
                d = d.reshape(len(names), stop - start, -1).double()
                units[i] = d.shape[-1]
                sq = (d**2).mean(dim=-1)  # [k, b]: mean over units per sample
                for g in range(len(names)):
                    per_sample[i][g].append(sq[g])
            bar.update(stop - start)
    rows = []
    for i, layer in enumerate(layers):
        # Mean over units of the unbiased variance over samples (shifted, exact moments; 0 for n = 1).
        variance = float(moments[i].variance().mean()) if n > 1 else 0.0
        for g, gname in enumerate(names):
            values = torch.cat(per_sample[i][g])
            value = float(values.mean())
            sem = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
            relative = value / variance if variance > 0 else float("nan")
            rows.append({"layer": layer, "generator": gname, "value": value, "sem": sem, "relative": relative,
                         "variance": variance, "n": n, "units": units[i], "kind": kinds[i],
                         "normalisation": LEE_NORMALISATION})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- LieGG


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


@dataclass
class LieGGResult:
    """What :func:`liegg` finds.

    Attributes:
        gram: [k, k] float64 Gram matrix of the polarization matrix, mean over (sample, unit) rows;
            ``cᵀ gram c`` is the LEE of f along ``Σ c_i basis_i``.
        symmetry_variance: [k] eigenvalues of gram, ascending (~0: a learned symmetry).
        generators: [k, 2, 2] (or [k, 2, 3] with translations: linear | shift) unit-Frobenius-norm
            eigen-generators in the order of ``symmetry_variance``; the sign makes the entry of
            largest magnitude positive.
        symmetry_bias: [k] ``‖(h + hᵀ)/2‖_F`` of each generator's linear part (0 = pure rotation).
        n: samples; units: output units per sample (rows = n·units).
        basis: names of the basis generators (E11, E12, E21, E22[, Tx, Ty]).
        layer: the layer measured.
    """

    gram: torch.Tensor
    symmetry_variance: torch.Tensor
    generators: torch.Tensor
    symmetry_bias: torch.Tensor
    n: int
    units: int
    basis: tuple[str, ...]
    layer: str = OUTPUT
    extras: dict = field(default_factory=dict)

    def generator(self, k: int = 0) -> torch.Tensor:
        """The k-th eigen-generator as a 3×3 affine generator (k = 0: the most symmetric)."""
        return generator_matrix(self.generators[k])

    def warp_by_generator(self, image: torch.Tensor, thetas: Sequence[float], k: int = 0, fill: Any = 0.0) -> torch.Tensor:
        """``expm(θ h_k)`` applied to an image for each θ: [len(thetas), C, H, W]."""
        return warp_by_generator(image, self.generator(k), thetas, fill)

    def to_frame(self) -> pd.DataFrame:
        """One row per eigen-generator: rank, symmetry variance, bias and the matrix entries."""
        rows = []
        for k in range(len(self.symmetry_variance)):
            row = {"rank": k, "layer": self.layer, "symmetry_variance": float(self.symmetry_variance[k]),
                   "symmetry_bias": float(self.symmetry_bias[k]), "n": self.n, "units": self.units}
            flat = self.generators[k].flatten().tolist()
            labels = ["h11", "h12", "h21", "h22"] if len(flat) == 4 else ["h11", "h12", "tx", "h21", "h22", "ty"]
            row.update(dict(zip(labels, flat)))
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        h = np.array2string(self.generators[0].numpy(), precision=3, suppress_small=True).replace("\n", "")
        return (f"LieGGResult(layer={self.layer!r}, n={self.n}, units={self.units}, "
                f"symmetry_variance={np.array2string(self.symmetry_variance.numpy(), precision=3)}, "
                f"most symmetric generator={h}, bias={float(self.symmetry_bias[0]):.3g})")


def liegg(
    model: Callable,
    x: torch.Tensor,
    layer: str | None = None,
    batch_size: int = 64,
    translations: bool = False,
    fill: Any = None,
    progress: bool = True,
) -> LieGGResult:
    """LieGG: the symmetries a network has learned, from its Lie derivatives on data x.

    Every output unit of every sample gives one row ``(L_{E11} f, L_{E12} f, L_{E21} f, L_{E22} f
    [, L_{Tx} f, L_{Ty} f])`` (all units stacked: exact for multi-output heads); the Gram matrix is
    accumulated in float64 over batches, divided by the number of rows, and eigen-decomposed.

    Args:
        model: an nn.Module (or a function of x when layer is None).
        x: images [b, C, H, W].
        layer: a layer name (see :func:`lie_derivative`); None = the output.
        translations: add the two translation generators to the basis (6×6 Gram).
        fill: border extension of x for the image gradient.
    """
    _check_model(model)
    check_images(x, allow_empty=False)
    batch_size = check_int("batch_size", batch_size, 1)
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name (str) or None, got {type(layer).__name__}")
    if not isinstance(translations, bool):
        raise TypeError(f"translations must be a bool, got {translations!r}")
    layers = _normalise_layers(model, layer, "layer")
    k = 6 if translations else 4
    basis = _BASIS[:k]
    fn = _layer_function(model, layers)
    gram = torch.zeros(k, k, dtype=torch.float64)
    rows, units, n = 0, 0, x.shape[0]
    with torch.no_grad(), tqdm(total=n, desc="LieGG", unit="sample", disable=not progress) as bar:
        for start, stop in _batches(n, batch_size):
            xb = x[start:stop]
            _, jv = _jvp_many(fn, xb, tangents(xb, basis, fill))
            e = jv[0].reshape(k, -1).double()  # [k, rows of this batch]
            gram += e @ e.T
            rows += e.shape[1]
            units = e.shape[1] // (stop - start)
            bar.update(stop - start)
    gram /= rows
    gram = (gram + gram.T) / 2
    values, vectors = torch.linalg.eigh(gram)
    vectors = vectors.T  # [k generators, k coefficients]
    # Deterministic sign: the entry of largest magnitude (first one within 1e-9) positive.
    for i in range(k):
        mag = vectors[i].abs()
        j = int(torch.nonzero(mag >= mag.max() - 1e-9)[0])
        if vectors[i, j] < 0:
            vectors[i] = -vectors[i]
    if translations:
        gens = torch.stack([vectors[:, [0, 1, 4]], vectors[:, [2, 3, 5]]], dim=1)  # [k, 2, 3]
    else:
        gens = vectors.reshape(k, 2, 2)
    return LieGGResult(
        gram=gram, symmetry_variance=values,
        generators=gens, symmetry_bias=symmetry_bias(gens), n=n, units=units,
        basis=_BASIS_NAMES[:k], layer=layer or OUTPUT,
    )
