"""LieGG (Moskalev et al. 2022): the Gram matrix of Lie derivatives over gl(2) (see :mod:`tmlib.lie`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..checks import check_images, check_int
from .derivative import batches, jvp_many, layer_function, normalise_layers
from .tangents import (
    BASIS,
    BASIS_NAMES,
    OUTPUT,
    check_model,
    generator_matrix,
    symmetry_bias,
    tangents,
    warp_by_generator,
)

__all__ = ["LieGGResult", "liegg"]


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
    check_model(model)
    check_images(x, allow_empty=False)
    batch_size = check_int("batch_size", batch_size, 1)
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name (str) or None, got {type(layer).__name__}")
    if not isinstance(translations, bool):
        raise TypeError(f"translations must be a bool, got {translations!r}")
    layers = normalise_layers(model, layer, "layer")
    k = 6 if translations else 4
    basis = BASIS[:k]
    fn = layer_function(model, layers)
    gram = torch.zeros(k, k, dtype=torch.float64)
    rows, units, n = 0, 0, x.shape[0]
    with torch.no_grad(), tqdm(total=n, desc="LieGG", unit="sample", disable=not progress) as bar:
        for start, stop in batches(n, batch_size):
            xb = x[start:stop]
            _, jv = jvp_many(fn, xb, tangents(xb, basis, fill))
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
        basis=BASIS_NAMES[:k], layer=layer or OUTPUT,
    )
