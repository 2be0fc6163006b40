"""LieGG (Moskalev et al. 2022): the Gram matrix of Lie derivatives over gl(2) (see :mod:`tmlib.lie`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import distributed as _distributed
from ..checks import check_images, check_int
from ..devices import on_model_device
from ..engine import block_bounds
from .derivative import batches, check_jvp_method, jvp_many, layer_function, normalise_layers
from .lee import check_blocks, interval_columns
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

__all__ = ["LIEGG_OUTPUTS", "LieGGResult", "liegg"]

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
        in general: the rows mix both axes); NaN when the size is unknown."""
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
            for column in ("symmetry_variance", "relative_variance", "symmetry_bias"):
                row.update(interval_columns(row[column], reps[column].to_numpy(), f"{column}_", confidence))
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
    distributed: bool | None = None,
    jvp: str = "auto",
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
        distributed: across the ranks of a ``torch.distributed`` process group (None: when one
            is initialised), as for :func:`tmlib.lie.lee`: each rank its share of the samples,
            the Gram sums gathered, every rank the same result.
        jvp: ``"auto"``, ``"tangents"`` or ``"torch.func"`` (see :func:`tmlib.lie.lee`).
    """
    check_model(model)
    check_images(x, allow_empty=False)
    batch_size = check_int("batch_size", batch_size, 1)
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"layer must be a layer name (str) or None, got {type(layer).__name__}")
    if not isinstance(translations, bool):
        raise TypeError(f"translations must be a bool, got {translations!r}")
    if output not in LIEGG_OUTPUTS:
        raise ValueError(f"output must be one of {LIEGG_OUTPUTS}, got {output!r}")
    layers = normalise_layers(model, layer, "layer")
    check_jvp_method(jvp)
    x = on_model_device(model, x)
    k = 6 if translations else 4
    basis = BASIS[:k]
    fn = _output_function(layer_function(model, layers), output)
    n = x.shape[0]
    blocks = check_blocks(blocks, n)
    bounds = block_bounds(n, blocks) if blocks is not None else [0, n]
    # Per sample block: Σ rowᵀrow and the rows' count (one block without a jackknife).
    span = _distributed.share_samples(distributed, model, x, blocks, layer=layers, translations=translations,
                                      fill=fill, output=output)

    def accumulate() -> tuple[torch.Tensor, torch.Tensor, int]:
        block_sums = torch.zeros(len(bounds) - 1, k, k, dtype=torch.float64)
        block_rows = torch.zeros(len(bounds) - 1, dtype=torch.float64)
        units = 0
        first, last = span or (0, n)
        shown = progress and (span is None or _distributed.world()[0] == 0)
        with torch.no_grad(), tqdm(total=last - first, desc="LieGG", unit="sample", disable=not shown) as bar:
            for start, stop in batches(last - first, batch_size):
                start, stop = start + first, stop + first
                xb = x[start:stop]
                _, jv = jvp_many(fn, xb, tangents(xb, basis, fill), method=jvp)
                units = jv[0][0].reshape(stop - start, -1).shape[1]
                e = jv[0].reshape(k, stop - start, units).double().cpu()  # [k, samples, units]
                for b in range(len(bounds) - 1):  # the samples of this batch in block b
                    lo, hi = max(start, bounds[b]), min(stop, bounds[b + 1])
                    if lo < hi:
                        part = e[:, lo - start:hi - start].reshape(k, -1)
                        block_sums[b] += part @ part.T
                        block_rows[b] += part.shape[1]
                bar.update(stop - start)
        return block_sums, block_rows, units

    if span is None:
        block_sums, block_rows, units = accumulate()
    else:  # the ranks' blocks are disjoint: the sums of other ranks' blocks are exact zeros here
        parts = _distributed.gather(_distributed.run_guarded(accumulate, "the LieGG pass"))[0]
        block_sums = torch.stack([p[0] for p in parts]).sum(0)
        block_rows = torch.stack([p[1] for p in parts]).sum(0)
        units = parts[0][2]
    rows = float(block_rows.sum())
    gram = block_sums.sum(0) / rows
    gram = (gram + gram.T) / 2
    values, gens, bias = _eigen(gram, translations)
    block_grams = None
    if blocks is not None:
        rest = (block_sums.sum(0, keepdim=True) - block_sums) / (rows - block_rows).reshape(-1, 1, 1)
        block_grams = (rest + rest.transpose(1, 2)) / 2
    return LieGGResult(
        gram=gram, symmetry_variance=values,
        generators=gens, symmetry_bias=bias, n=n, units=units,
        basis=BASIS_NAMES[:k], layer=layer or OUTPUT, output=output,
        image_size=(int(x.shape[-2]), int(x.shape[-1])), block_grams=block_grams,
    )
