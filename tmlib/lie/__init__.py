"""Infinitesimal invariance and equivariance: Lie derivatives (LEE) and LieGG.

Four modules: :mod:`~tmlib.lie.tangents` (generators, tangents, warps by exp(θh)),
:mod:`~tmlib.lie.derivative` (the forward-mode engine), :mod:`~tmlib.lie.lee` (the LEE) and
:mod:`~tmlib.lie.liegg`.

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
forward mode (no finite differences through the network). Layers are captured by forward hooks on
the named modules (names as in :mod:`tmlib.activations`, ``"output"`` = what the model returns), so
one forward-mode run gives the Lie derivative of every requested layer at once, for all generators
together. Two engines give the same numbers (tested on every model of :mod:`tmlib.models`; rel
≈ 1e-6 in float32, 1e-12 in float64): :mod:`tmlib.lie.forward_mode` runs the model's own forward
once and propagates the k tangents beside it by a rule per torch function (the default where every
function the forward calls has one: 1.7–2.1× faster than torch.func on a small MLP), and
:func:`torch.func.jvp` under :func:`torch.func.vmap` over the tangents (the primal computed once;
a plain loop where an op has no batching rule) for everything else. ``jvp="tangents"`` /
``"torch.func"`` choose one.

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

from .derivative import lie_derivative
from .lee import LEEResult, lee, lie_equivariance_error
from .liegg import LIEGG_OUTPUTS, LieGGResult, liegg
from .tangents import (
    GENERATORS,
    LEE_NORMALISATION,
    OUTPUT,
    generator_matrix,
    image_gradient,
    symmetry_bias,
    tangent,
    tangents,
    warp_by_generator,
)

__all__ = [
    "GENERATORS",
    "LEE_NORMALISATION",
    "LIEGG_OUTPUTS",
    "OUTPUT",
    "LEEResult",
    "LieGGResult",
    "generator_matrix",
    "image_gradient",
    "lee",
    "lie_derivative",
    "lie_equivariance_error",
    "liegg",
    "symmetry_bias",
    "tangent",
    "tangents",
    "warp_by_generator",
]
