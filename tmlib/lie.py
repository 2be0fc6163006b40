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
over the units of the layer, then over the samples. Never ``|L_h f|``. :func:`lee` returns the tidy
frame and, per generator, :class:`~tmlib.results.MeasureResult` views (per-unit LEE, and LEE relative
to the layer's variance over the samples), with ``blocks=K`` a delete-one-block jackknife of both at
no extra forward (:func:`lie_equivariance_error` returns the frame alone).

LieGG (Moskalev et al. 2022): one row per (sample, output unit) of ``(L_{h_1} f, ..., L_{h_k} f)``
for the basis ``E11, E12, E21, E22`` of gl(2) (plus the two translations on request). The Gram
matrix ``G = mean over rows of rowᵀrow`` is streamed over batches; for any generator
``h = Σ c_k h_k``, ``cᵀ G c`` is exactly the LEE of f along h, so ``G[k, k]`` is the LEE of the
basis generator k. The eigenvalues of G (ascending) are the *symmetry variances* of its
eigen-generators (eigenvectors reshaped to 2×2, unit Frobenius norm); ~0 means a learned
symmetry. The *symmetry bias* of a unit-norm h is ``‖(h + hᵀ)/2‖_F`` (0 = pure rotation).
``output="normalised"`` differentiates the L2-normalised output instead (scale-free: networks whose
outputs differ in size compare), ``"normalised-sum"`` the sum of it, one row per sample (what LieGG's
public code does; :attr:`LieGGResult.pixel_scale` converts to its per-pixel gradient units);
``blocks=K`` keeps per-block Gram matrices for a jackknife; :meth:`LieGGResult.summary` is the row a
table of models needs.
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
from .engine import block_bounds
from .results import MeasureResult
from .transforms import warp

__all__ = [
    "GENERATORS",
    "LEE_NORMALISATION",
    "LIEGG_OUTPUTS",
    "OUTPUT",
    "LEEResult",
    "LieGGResult",
    "generator_matrix",
    "image_gradient",
    "lie_derivative",
    "lee",
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


def _check_images(x: Any, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [b, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape [b, C, H, W] (4-D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, got batch size 0")
    return x


def _check_model(model: Any) -> None:
    if not callable(model):
        raise TypeError(f"model must be a torch.nn.Module (or a callable), got {type(model).__name__}")


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


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
    _check_images(x)
    h, w = x.shape[-2:]
    p = _pad(x, fill)
    gx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) * (w / 4.0)  # /2 (central) × W/2 (pixels per unit)
    gy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) * (h / 4.0)
    return gx, gy


def tangents(x: torch.Tensor, generators: torch.Tensor, fill: Any = None) -> torch.Tensor:
    """Tangents of images x [b, C, H, W] along k generators [k, 3, 3]: [k, b, C, H, W]."""
    _check_images(x)
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
    _check_images(x)
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


def _check_blocks(blocks: Any, n: int) -> int | None:
    if blocks is None:
        return None
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 2 <= blocks <= n:
        raise ValueError(f"blocks must be None or an int in [2, n={n}] (jackknife blocks of samples), got {blocks!r}")
    return blocks


def _jackknife_se(replicates: np.ndarray) -> float:
    k = len(replicates)
    return float(np.sqrt((k - 1) / k * np.square(replicates - replicates.mean()).sum()))


def _t_interval(value: float, se: float, dof: int, confidence: float = 0.95) -> tuple[float, float]:
    from scipy import stats as _st

    if not math.isfinite(se):
        return float("nan"), float("nan")
    half = float(_st.t.ppf(0.5 + confidence / 2, dof)) * se
    return value - half, value + half


@dataclass
class LEEResult:
    """What :func:`lee` finds: the tidy frame and, per (generator, quantity), a
    :class:`~tmlib.results.MeasureResult` (so that ``tmlib.experiments.Jack.of`` and
    ``tmlib.plots.layer_curves`` take it as they take the invariance measures).

    Attributes:
        frame: one row per (layer, generator) in forward order: ``layer``, ``index`` (position
            among the measured layers), ``depth`` (index / (layers − 1), 0 … 1), ``generator``,
            ``value`` (LEE), ``sem`` (SE over samples), ``relative`` (value / variance), ``variance``,
            ``n``, ``units``, ``kind``, ``normalisation``; with ``blocks``: ``se``, ``low``, ``high``
            (delete-one-block jackknife SE of ``value`` and its 95 % t interval, K − 1 dof) and
            ``relative_se``, ``relative_low``, ``relative_high`` (the same for ``relative``).
        results: ``{(generator, "value" | "relative"): MeasureResult}``: per layer an array of the
            per-unit LEE (``"value"``; its mean is the layer's LEE) or per-unit LEE / layer variance
            (``"relative"``; its mean is the relative LEE), with K leave-one-block-out replicates
            of the layer means when measured with ``blocks``.
        layers, generators: in the order measured; blocks: K or None.
    """

    frame: pd.DataFrame
    results: dict[tuple[str, str], MeasureResult]
    layers: list[str]
    generators: list[str]
    blocks: int | None = None

    def result(self, generator: str, quantity: str = "value") -> MeasureResult:
        """The :class:`~tmlib.results.MeasureResult` of one generator: ``quantity`` is ``"value"``
        (LEE) or ``"relative"`` (LEE / variance of the layer's output over the samples)."""
        if quantity not in ("value", "relative"):
            raise ValueError(f"quantity must be 'value' or 'relative', got {quantity!r}")
        if generator not in self.generators:
            raise ValueError(f"generator: {generator!r} was not measured; measured: {self.generators}")
        return self.results[(generator, quantity)]

    def curves(self, generator: str, quantity: str = "value", label: str | None = None) -> pd.DataFrame:
        """Tidy rows of one generator for :func:`tmlib.plots.layer_curves`: layer, index, depth,
        value (and se, low, high with blocks), measure, plus ``label`` when given."""
        frame = self.result(generator, quantity).to_frame()
        return frame if label is None else frame.assign(label=label)


def lee(
    model: Callable,
    x: torch.Tensor,
    generators: Any = ("rotation", "scale", "shear_x", "shear_y", "stretch", "translation_x", "translation_y"),
    layers: Sequence[str] | str | None = None,
    batch_size: int = 64,
    fill: Any = None,
    equivariant: bool = False,
    progress: bool = True,
    blocks: int | None = None,
) -> LEEResult:
    """LEE of every requested layer along every generator, in one forward-mode run per batch.

    Args:
        generators: names, matrices, a list of them or a dict name → matrix.
        layers: layer names (module paths, ``"output"``); None = ``model.layer_names()`` if the
            model has it, else the output.
        equivariant: see :func:`lie_derivative` (image-shaped layers only).
        blocks: K ≥ 2 for a delete-one-block jackknife at no extra forward: the samples are split
            into K contiguous blocks (:func:`tmlib.engine.block_bounds`), and every layer's LEE and
            relative LEE are recomputed without each block (the variance of the relative LEE from
            per-block moments). Two models measured on the same x with the same K have paired
            replicates: the jackknife of a difference between them is the difference of replicates.

    Returns:
        :class:`LEEResult` (its ``frame`` is what :func:`lie_equivariance_error` returns).
    """
    _check_model(model)
    _check_images(x)
    batch_size = _check_batch_size(batch_size)
    names, gens = _generator_list(generators)
    layers = _default_layers(model) if layers is None else layers
    layers = _normalise_layers(model, layers, "layers")
    n = x.shape[0]
    blocks = _check_blocks(blocks, n)
    bounds = block_bounds(n, blocks) if blocks is not None else [0, n]
    block_of = torch.bucketize(torch.arange(n), torch.tensor(bounds[1:-1]), right=True)  # sample → block
    fn = _layer_function(model, layers)
    per_sample: list[list[list[torch.Tensor]]] = [[[] for _ in names] for _ in layers]
    per_unit: list[torch.Tensor | None] = [None] * len(layers)  # Σ over samples of (L_h f)² per unit [k, F]
    shapes: list[tuple[int, ...]] = [()] * len(layers)
    units = [0] * len(layers)
    kinds = ["invariance"] * len(layers)
    moments: list[list[torch.Tensor]] = [[] for _ in layers]  # per layer: Σf and Σf² per unit
    block_moments: list[torch.Tensor | None] = [None] * len(layers)  # [K, 2, F] per layer (with blocks)
    with torch.no_grad(), tqdm(total=n, desc="LEE", unit="sample", disable=not progress) as bar:
        for start, stop in _batches(n, batch_size):
            xb = x[start:stop]
            vs = tangents(xb, gens, fill)
            primal, jv = _jvp_many(fn, xb, vs)
            for i, (p, d) in enumerate(zip(primal, jv)):
                flat = p.reshape(stop - start, -1).double()
                sums = torch.stack([flat.sum(0), (flat**2).sum(0)])
                moments[i] = [sums] if not moments[i] else [moments[i][0] + sums]
                if blocks is not None:
                    if block_moments[i] is None:
                        block_moments[i] = torch.zeros(blocks, 2, flat.shape[1], dtype=torch.float64)
                    owner = block_of[start:stop]
                    block_moments[i][:, 0].index_add_(0, owner, flat)
                    block_moments[i][:, 1].index_add_(0, owner, flat**2)
                if equivariant:
                    corr = _equivariant_correction(p, gens, fill)
                    if corr is not None:
                        d = d - corr
                        kinds[i] = "equivariance"
                shapes[i] = tuple(p.shape[1:])
                d = d.reshape(len(names), stop - start, -1).double()
                units[i] = d.shape[-1]
                squares = d**2
                per_unit[i] = squares.sum(1) if per_unit[i] is None else per_unit[i] + squares.sum(1)
                sq = squares.mean(dim=-1)  # [k, b]: mean over units per sample
                for g in range(len(names)):
                    per_sample[i][g].append(sq[g])
            bar.update(stop - start)
    rows = []
    results: dict[tuple[str, str], MeasureResult] = {}
    replicates: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    count = len(layers)
    sizes = np.diff(bounds)
    for i, layer in enumerate(layers):
        s1, s2 = moments[i][0]
        variance = float(((s2 - s1**2 / n) / max(n - 1, 1)).clamp_min(0).mean())  # mean over units
        if blocks is not None:
            rest = block_moments[i].sum(0, keepdim=True) - block_moments[i]  # [K, 2, F]: all blocks but k
            m = torch.as_tensor(n - sizes, dtype=torch.float64).reshape(-1, 1)
            var_k = ((rest[:, 1] - rest[:, 0] ** 2 / m) / (m - 1).clamp_min(1)).clamp_min(0).mean(1).numpy()
        for g, gname in enumerate(names):
            values = torch.cat(per_sample[i][g])
            value = float(values.mean())
            sem = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
            relative = value / variance if variance > 0 else float("nan")
            row = {"layer": layer, "index": i, "depth": i / max(count - 1, 1), "generator": gname, "value": value,
                   "sem": sem, "relative": relative, "variance": variance, "n": n, "units": units[i], "kind": kinds[i],
                   "normalisation": LEE_NORMALISATION}
            if blocks is not None:
                block_sums = torch.zeros(blocks, dtype=torch.float64).index_add_(0, block_of, values).numpy()
                value_k = (block_sums.sum() - block_sums) / (n - sizes)
                with np.errstate(divide="ignore", invalid="ignore"):
                    relative_k = np.where(var_k > 0, value_k / var_k, np.nan)
                for column, estimate, reps in (("", value, value_k), ("relative_", relative, relative_k)):
                    se = _jackknife_se(reps)
                    low, high = _t_interval(estimate, se, blocks - 1)
                    row.update({f"{column}se": se, f"{column}low": low, f"{column}high": high})
                replicates.setdefault((gname, "value"), {})[layer] = value_k
                replicates.setdefault((gname, "relative"), {})[layer] = relative_k
            rows.append(row)
            unit_values = (per_unit[i][g] / n).numpy().reshape(shapes[i])
            for quantity, array in (("value", unit_values),
                                    ("relative", unit_values / variance if variance > 0 else unit_values * np.nan)):
                result = results.get((gname, quantity))
                if result is None:
                    result = results[(gname, quantity)] = MeasureResult(
                        f"LEE[{gname}]" if quantity == "value" else f"relative LEE[{gname}]", {},
                        {"generator": gname, "quantity": quantity, "n": n, "kind": kinds[i],
                         "normalisation": LEE_NORMALISATION if quantity == "value"
                         else f"({LEE_NORMALISATION}) / (mean over units of the variance of f over the samples)"})
                result.values[layer] = array
    if blocks is not None:
        for key, per_layer in replicates.items():
            results[key].replicates = pd.DataFrame(per_layer)[layers]
    return LEEResult(pd.DataFrame(rows), results, list(layers), list(names), blocks)


def lie_equivariance_error(
    model: Callable,
    x: torch.Tensor,
    generators: Any = ("rotation", "scale", "shear_x", "shear_y", "stretch", "translation_x", "translation_y"),
    layers: Sequence[str] | str | None = None,
    batch_size: int = 64,
    fill: Any = None,
    equivariant: bool = False,
    progress: bool = True,
    blocks: int | None = None,
) -> pd.DataFrame:
    """LEE of every requested layer along every generator, in one forward-mode run per batch.

    Args:
        generators: names, matrices, a list of them or a dict name → matrix.
        layers: layer names (module paths, ``"output"``); None = ``model.layer_names()`` if the
            model has it, else the output.
        equivariant: see :func:`lie_derivative` (image-shaped layers only).
        blocks: K for jackknife intervals (see :func:`lee`, which also returns the replicates).

    Returns:
        Tidy DataFrame, one row per (layer, generator) in forward order, columns ``layer``,
        ``index`` and ``depth`` (position of the layer: 0 … layers − 1 and 0 … 1, as
        :func:`tmlib.plots.layer_curves` wants them), ``generator``, ``value`` (mean over samples
        of the mean over units of (L_h f)²), ``sem`` (standard error over samples of that
        per-sample mean), ``variance`` (mean over units of the variance of f over the samples),
        ``relative`` (value / variance: scale-free, for comparing models whose outputs differ in
        size, e.g. trained vs untrained), ``n`` (samples), ``units``, ``kind``
        (invariance/equivariance), ``normalisation``; with ``blocks`` also ``se``, ``low``,
        ``high``, ``relative_se``, ``relative_low``, ``relative_high`` (jackknife, 95 %).
    """
    return lee(model, x, generators, layers, batch_size, fill, equivariant, progress, blocks).frame




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


#: What the rows of LieGG's polarization matrix differentiate (see :func:`liegg`).
LIEGG_OUTPUTS = ("units", "normalised", "normalised-sum")


def _eigen(gram: torch.Tensor, translations: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending), unit-norm eigen-generators (sign: largest entry positive) and their
    symmetry bias of a symmetric k×k Gram matrix."""
    k = gram.shape[0]
    values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    vectors = vectors.T.clone()  # [k generators, k coefficients]
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
    return values, gens, symmetry_bias(gens)


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
        n: samples; units: rows per sample (output units; 1 for ``output="normalised-sum"``).
        basis: names of the basis generators (E11, E12, E21, E22[, Tx, Ty]).
        layer: the layer measured.
        output: what each row differentiates (:data:`LIEGG_OUTPUTS`).
        image_size: (H, W) of the images (for :attr:`pixel_scale`).
        block_grams: with ``blocks=K``: [K, k, k] the Gram matrix of all blocks but k (delete-one-
            block jackknife; :meth:`replicates`).
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
    output: str = "units"
    image_size: tuple[int, int] | None = None
    block_grams: torch.Tensor | None = None

    def generator(self, k: int = 0) -> torch.Tensor:
        """The k-th eigen-generator as a 3×3 affine generator (k = 0: the most symmetric)."""
        return generator_matrix(self.generators[k])

    def warp_by_generator(self, image: torch.Tensor, thetas: Sequence[float], k: int = 0, fill: Any = 0.0) -> torch.Tensor:
        """``expm(θ h_k)`` applied to an image for each θ: [len(thetas), C, H, W]."""
        return warp_by_generator(image, self.generator(k), thetas, fill)

    @property
    def relative_variance(self) -> float:
        """Smallest eigenvalue / mean eigenvalue: scale-free (the output's and the gradient's size
        cancel), 0 for an exact symmetry, 1 when every direction of gl(2) is alike."""
        return _relative(self.symmetry_variance)

    @property
    def pixel_scale(self) -> float:
        """Factor turning this result's eigenvalues into the units of LieGG's public code, whose
        image gradients are differences *per pixel* while its coordinates are normalised like
        tmlib's (spacing 2/W): tmlib's gradients are per normalised unit, W/2 times larger, so its
        eigenvalues are (W/2)² times the public code's. ``(2/W)²`` for square W×W images (2/H · 2/W
        in general: the rows mix both axes, the geometric mean is used); NaN when the size is
        unknown."""
        if self.image_size is None:
            return float("nan")
        h, w = self.image_size
        return 4.0 / (h * w)

    def replicates(self) -> pd.DataFrame | None:
        """With ``blocks``: one row per block left out: symmetry_variance (smallest eigenvalue),
        relative_variance, symmetry_bias (of the most symmetric generator); else None."""
        if self.block_grams is None:
            return None
        rows = []
        translations = self.generators.shape[-1] == 3
        for gram in self.block_grams:
            values, _, bias = _eigen(gram, translations)
            rows.append({"symmetry_variance": float(values[0]), "relative_variance": _relative(values),
                         "symmetry_bias": float(bias[0])})
        return pd.DataFrame(rows)

    def summary(self, confidence: float = 0.95) -> dict[str, Any]:
        """The row a table of models needs: the most symmetric generator (entries and as text), its
        symmetry variance (and in the public code's units, ``pixel_variance``), the relative
        variance, its bias, n, units, output and layer; with blocks, the jackknife ``*_se``,
        ``*_low``, ``*_high`` of symmetry_variance, relative_variance and symmetry_bias."""
        h = self.generators[0]
        row: dict[str, Any] = {
            "layer": self.layer, "output": self.output, "n": self.n, "units": self.units,
            "symmetry_variance": float(self.symmetry_variance[0]),
            "pixel_variance": float(self.symmetry_variance[0]) * self.pixel_scale,
            "relative_variance": self.relative_variance, "symmetry_bias": float(self.symmetry_bias[0]),
            "generator": np.array2string(h.numpy(), precision=3, suppress_small=True).replace("\n", ""),
        }
        labels = ["h11", "h12", "h21", "h22"] if h.numel() == 4 else ["h11", "h12", "tx", "h21", "h22", "ty"]
        row.update(dict(zip(labels, h.flatten().tolist())))
        reps = self.replicates()
        if reps is not None:
            k = len(reps)
            for column in ("symmetry_variance", "relative_variance", "symmetry_bias"):
                se = _jackknife_se(reps[column].to_numpy())
                low, high = _t_interval(row[column], se, k - 1, confidence)
                row.update({f"{column}_se": se, f"{column}_low": low, f"{column}_high": high})
        return row

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


def _relative(values: torch.Tensor) -> float:
    mean = float(values.mean())
    return float(values[0]) / mean if mean > 0 else float("nan")


def _output_function(fn: Callable, output: str) -> Callable:
    """The rows' function: the layer itself, its L2-normalised output, or the sum of that."""
    if output == "units":
        return fn

    def normalised(x: torch.Tensor) -> tuple[torch.Tensor]:
        y = fn(x)[0]
        flat = y.reshape(y.shape[0], -1)
        unit = flat / flat.norm(dim=1, keepdim=True)
        return (unit.sum(dim=1, keepdim=True) if output == "normalised-sum" else unit,)

    return normalised


def liegg(
    model: Callable,
    x: torch.Tensor,
    layer: str | None = None,
    batch_size: int = 64,
    translations: bool = False,
    fill: Any = None,
    progress: bool = True,
    output: str = "units",
    blocks: int | None = None,
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
        output: what the rows differentiate: ``"units"`` (the layer's units as they are),
            ``"normalised"`` (the layer's output divided by its L2 norm per sample, all units
            stacked: the eigenvalues no longer scale with the size of the outputs, so networks whose
            logits differ in size, e.g. trained and untrained, compare), or ``"normalised-sum"``
            (the *sum* of the L2-normalised outputs, one row per sample: what LieGG's public code
            differentiates; it is a shortcut — a direction along which the normalised outputs
            change but their sum does not counts as a symmetry — kept to compare with its numbers).
        blocks: K ≥ 2: also keep the Gram matrix of each of K contiguous sample blocks
            (:func:`tmlib.engine.block_bounds`) for a delete-one-block jackknife of the eigenvalues
            and biases (:meth:`LieGGResult.replicates`, :meth:`LieGGResult.summary`); no extra
            forward.
    """
    _check_model(model)
    _check_images(x)
    batch_size = _check_batch_size(batch_size)
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name (str) or None, got {type(layer).__name__}")
    if not isinstance(translations, bool):
        raise TypeError(f"translations must be a bool, got {translations!r}")
    if output not in LIEGG_OUTPUTS:
        raise ValueError(f"output must be one of {LIEGG_OUTPUTS}, got {output!r}")
    layers = _normalise_layers(model, layer, "layer")
    k = 6 if translations else 4
    basis = _BASIS[:k]
    fn = _output_function(_layer_function(model, layers), output)
    n = x.shape[0]
    blocks = _check_blocks(blocks, n)
    bounds = block_bounds(n, blocks) if blocks is not None else [0, n]
    gram = torch.zeros(k, k, dtype=torch.float64)
    block_sums = torch.zeros(len(bounds) - 1, k, k, dtype=torch.float64)
    block_rows = torch.zeros(len(bounds) - 1, dtype=torch.float64)
    rows, units = 0, 0
    with torch.no_grad(), tqdm(total=n, desc="LieGG", unit="sample", disable=not progress) as bar:
        for start, stop in _batches(n, batch_size):
            xb = x[start:stop]
            _, jv = _jvp_many(fn, xb, tangents(xb, basis, fill))
            units = jv[0][0].reshape(stop - start, -1).shape[1]
            e = jv[0].reshape(k, stop - start, units).double()  # [k, samples, units]
            if blocks is None:
                flat = e.reshape(k, -1)
                gram += flat @ flat.T
            else:
                for b in range(len(bounds) - 1):  # the samples of this batch in block b
                    lo, hi = max(start, bounds[b]), min(stop, bounds[b + 1])
                    if lo < hi:
                        part = e[:, lo - start:hi - start].reshape(k, -1)
                        block_sums[b] += part @ part.T
                        block_rows[b] += part.shape[1]
            rows += e.shape[1] * e.shape[2]
            bar.update(stop - start)
    if blocks is not None:
        gram = block_sums.sum(0)
    gram /= rows
    gram = (gram + gram.T) / 2
    values, gens, bias = _eigen(gram, translations)
    block_grams = None
    if blocks is not None:
        rest = (block_sums.sum(0, keepdim=True) - block_sums) / (rows - block_rows).reshape(-1, 1, 1)
        block_grams = (rest + rest.transpose(1, 2)) / 2
    return LieGGResult(
        gram=gram, symmetry_variance=values,
        generators=gens, symmetry_bias=bias, n=n, units=units,
        basis=_BASIS_NAMES[:k], layer=layer or OUTPUT, output=output,
        image_size=(int(x.shape[-2]), int(x.shape[-1])), block_grams=block_grams,
    )
