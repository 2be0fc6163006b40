"""The LEE of Gruver et al. (2023) for every layer and generator, with a jackknife over sample
blocks (see :mod:`tmlib.lie`).

LEE = ``E_x mean_units (L_h f(x))²``; ``relative`` divides it by the mean over units of the
variance of f over the samples, so that models whose outputs differ in size compare.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import distributed as _distributed
from .. import stats
from ..checks import check_images, check_int
from ..devices import on_model_device
from ..engine import block_bounds
from ..measures.states import ShiftedMoments
from ..results import MeasureResult
from .derivative import (
    batches,
    check_jvp_method,
    default_layers,
    equivariant_correction,
    jvp_many,
    layer_function,
    normalise_layers,
)
from .tangents import LEE_NORMALISATION, check_model, generator_list, tangents

__all__ = ["LEEResult", "check_blocks", "lee", "lie_equivariance_error"]

_ALL_GENERATORS = ("rotation", "scale", "shear_x", "shear_y", "stretch", "translation_x", "translation_y")


def check_blocks(blocks: Any, n: int) -> int | None:
    """``blocks`` as an int in [2, n] or None (no jackknife)."""
    if blocks is None:
        return None
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 2 <= blocks <= n:
        raise ValueError(f"blocks must be None or an int in [2, n={n}] (jackknife blocks of samples), got {blocks!r}")
    return blocks


def interval_columns(estimate: float, replicates: np.ndarray, prefix: str = "", confidence: float = 0.95) -> dict:
    """``{prefix}se``, ``{prefix}low``, ``{prefix}high``: the jackknife SE of ``estimate`` from its
    leave-one-block-out ``replicates`` and its Student-t interval (K − 1 dof)."""
    se = float(stats.jackknife_se(np.asarray(replicates, dtype=np.float64)))
    if not math.isfinite(se):
        return {f"{prefix}se": se, f"{prefix}low": float("nan"), f"{prefix}high": float("nan")}
    low, high = stats.t_interval(estimate, se, len(replicates) - 1, confidence)
    return {f"{prefix}se": se, f"{prefix}low": float(low), f"{prefix}high": float(high)}


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


def _leave_one_out_variance(blocks: list[ShiftedMoments]) -> np.ndarray:
    """[K] mean over units of the unbiased variance of all blocks but k (exact shifted merges)."""
    out = []
    for k in range(len(blocks)):
        rest = ShiftedMoments(blocks[0].shape, blocks[0].device)
        for j, block in enumerate(blocks):
            if j != k:
                rest.merge(block)
        out.append(float(rest.variance().mean()) if rest.n > 1 else 0.0)
    return np.asarray(out)


@dataclass
class _Sums:
    """What the LEE pass accumulates over its samples, per layer: the per-sample means over units
    of (L_h f)² ([k] lists of [b] chunks, in sample order), their per-unit sums [k, F], f's shifted
    moments per sample block (global blocks; empty where the samples lie elsewhere), shapes,
    units and kinds. Two parts over consecutive samples merge into one."""

    per_sample: list[list[list[torch.Tensor]]]
    per_unit: list[torch.Tensor]
    moments: list[list[ShiftedMoments]]
    shapes: list[tuple[int, ...]]
    units: list[int]
    kinds: list[str]

    def merge(self, other: _Sums) -> _Sums:
        for i in range(len(self.per_unit)):
            for g, chunks in enumerate(other.per_sample[i]):
                self.per_sample[i][g].extend(chunks)
            self.per_unit[i] = self.per_unit[i] + other.per_unit[i]
            for mine, theirs in zip(self.moments[i], other.moments[i]):
                mine.merge(theirs)
        return self


def _accumulate(model, x, first, stop, bounds, gens, layers, batch_size, fill, equivariant, progress, jvp) -> _Sums:
    """The LEE pass over samples first … stop − 1 of x."""
    fn = layer_function(model, layers)
    count = len(layers)
    per_sample: list[list[list[torch.Tensor]]] = [[[] for _ in gens] for _ in layers]
    per_unit: list[torch.Tensor | None] = [None] * count  # Σ over samples of (L_h f)² per unit [k, F]
    shapes: list[tuple[int, ...]] = [()] * count
    units = [0] * count
    kinds = ["invariance"] * count
    # Per layer and sample block: f's shifted moments per unit (one block without a jackknife).
    moments: list[list[ShiftedMoments] | None] = [None] * count
    with torch.no_grad(), tqdm(total=stop - first, desc="LEE", unit="sample", disable=not progress) as bar:
        for start, end in batches(stop - first, batch_size):
            start, end = start + first, end + first
            xb = x[start:end]
            primal, jv = jvp_many(fn, xb, tangents(xb, gens, fill), method=jvp)
            for i, (p, d) in enumerate(zip(primal, jv)):
                flat = p.reshape(end - start, -1)
                if moments[i] is None:
                    moments[i] = [ShiftedMoments((flat.shape[1],), flat.device) for _ in range(len(bounds) - 1)]
                for b in range(len(bounds) - 1):  # the samples of this batch in block b
                    lo, hi = max(start, bounds[b]), min(end, bounds[b + 1])
                    if lo < hi:
                        moments[i][b].update(flat[lo - start:hi - start])
                if equivariant:
                    corr = equivariant_correction(p, gens, fill)
                    if corr is not None:
                        d = d - corr
                        kinds[i] = "equivariance"
                shapes[i] = tuple(p.shape[1:])
                d = d.reshape(len(gens), end - start, -1).double()
                units[i] = d.shape[-1]
                squares = d**2
                per_unit[i] = squares.sum(1) if per_unit[i] is None else per_unit[i] + squares.sum(1)
                sq = squares.mean(dim=-1)  # [k, b]: mean over units per sample
                for g in range(len(gens)):
                    per_sample[i][g].append(sq[g])
            bar.update(end - start)
    return _Sums(per_sample, per_unit, moments, shapes, units, kinds)


def lee(
    model: Callable,
    x: torch.Tensor,
    generators: Any = _ALL_GENERATORS,
    layers: Sequence[str] | str | None = None,
    batch_size: int = 64,
    fill: Any = None,
    equivariant: bool = False,
    progress: bool = True,
    blocks: int | None = None,
    distributed: bool | None = None,
    jvp: str = "auto",
) -> LEEResult:
    """LEE of every requested layer along every generator, in one forward-mode run per batch.

    Args:
        generators: names, matrices, a list of them or a dict name → matrix.
        layers: layer names (module paths, ``"output"``); None = ``model.layer_names()`` if the
            model has it, else the output.
        equivariant: see :func:`~tmlib.lie.lie_derivative` (image-shaped layers only).
        blocks: K ≥ 2 for a delete-one-block jackknife at no extra forward: the samples are split
            into K contiguous blocks (:func:`tmlib.engine.block_bounds`), and every layer's LEE and
            relative LEE are recomputed without each block (the variance of the relative LEE from
            per-block shifted moments). Two models measured on the same x with the same K have
            paired replicates: the jackknife of a difference between them is the difference of
            replicates.
        distributed: across the ranks of a ``torch.distributed`` process group, as for
            :func:`tmlib.measures.evaluate` (None: when one is initialised): rank r takes its share
            of the samples (:func:`tmlib.distributed.rank_share`; whole blocks with ``blocks``),
            on the model's device (put it on ``cuda:LOCAL_RANK``), and the sums are gathered and
            merged in rank order, so every rank returns the same result.
        jvp: how the JVPs are computed (:func:`tmlib.lie.derivative.jvp_many`): ``"auto"``
            propagates the tangents beside one plain forward where every function the forward
            calls has a rule (:mod:`tmlib.lie.forward_mode`) and runs ``torch.func`` otherwise;
            ``"tangents"`` or ``"torch.func"`` insist on one.

    Returns:
        :class:`LEEResult` (its ``frame`` is what :func:`lie_equivariance_error` returns).
    """
    check_model(model)
    check_images(x, allow_empty=False)
    batch_size = check_int("batch_size", batch_size, 1)
    check_jvp_method(jvp)
    names, gens = generator_list(generators)
    x = on_model_device(model, x)
    layers = default_layers(model) if layers is None else layers
    layers = normalise_layers(model, layers, "layers")
    n = x.shape[0]
    blocks = check_blocks(blocks, n)
    bounds = block_bounds(n, blocks) if blocks is not None else [0, n]
    block_of = torch.bucketize(torch.arange(n), torch.tensor(bounds[1:-1]), right=True)  # sample → block
    span = _distributed.share_samples(distributed, model, x, blocks, generators=names, generator_matrices=gens.tolist(),
                                      layers=layers, equivariant=equivariant, fill=fill)

    def accumulate() -> _Sums:
        first, stop = span or (0, n)
        return _accumulate(model, x, first, stop, bounds, gens, layers, batch_size, fill, equivariant,
                           progress and (span is None or _distributed.world()[0] == 0), jvp)

    if span is None:
        sums = accumulate()
    else:
        sums = _distributed.gather(_distributed.run_guarded(accumulate, "the LEE pass"), "cpu", fold=_Sums.merge)[0]
    per_sample, per_unit, moments, shapes, units, kinds = (sums.per_sample, sums.per_unit, sums.moments, sums.shapes,
                                                           sums.units, sums.kinds)
    rows = []
    results: dict[tuple[str, str], MeasureResult] = {}
    replicates: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    count = len(layers)
    sizes = np.diff(bounds)
    for i, layer in enumerate(layers):
        total = ShiftedMoments(moments[i][0].shape, moments[i][0].device)
        for block in moments[i]:
            total.merge(block.copy())
        # Mean over units of the unbiased variance over samples (0 for n = 1).
        variance = float(total.variance().mean()) if n > 1 else 0.0
        var_k = _leave_one_out_variance(moments[i]) if blocks is not None else None
        for g, gname in enumerate(names):
            values = torch.cat(per_sample[i][g]).cpu()
            value = float(values.mean())
            sem = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
            relative = value / variance if variance > 0 else float("nan")
            row = {"layer": layer, "index": i, "depth": i / max(count - 1, 1), "generator": gname, "value": value,
                   "sem": sem, "relative": relative, "variance": variance, "n": n, "units": units[i],
                   "kind": kinds[i], "normalisation": LEE_NORMALISATION}
            if blocks is not None:
                block_sums = torch.zeros(blocks, dtype=torch.float64).index_add_(0, block_of, values).numpy()
                value_k = (block_sums.sum() - block_sums) / (n - sizes)
                with np.errstate(divide="ignore", invalid="ignore"):
                    relative_k = np.where(var_k > 0, value_k / var_k, np.nan)
                row.update(interval_columns(value, value_k))
                row.update(interval_columns(relative, relative_k, "relative_"))
                replicates.setdefault((gname, "value"), {})[layer] = value_k
                replicates.setdefault((gname, "relative"), {})[layer] = relative_k
            rows.append(row)
            unit_values = (per_unit[i][g] / n).cpu().numpy().reshape(shapes[i])
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
    generators: Any = _ALL_GENERATORS,
    layers: Sequence[str] | str | None = None,
    batch_size: int = 64,
    fill: Any = None,
    equivariant: bool = False,
    progress: bool = True,
    blocks: int | None = None,
    distributed: bool | None = None,
    jvp: str = "auto",
) -> pd.DataFrame:
    """LEE of every requested layer along every generator, in one forward-mode run per batch.

    Args:
        generators: names, matrices, a list of them or a dict name → matrix.
        layers: layer names (module paths, ``"output"``); None = ``model.layer_names()`` if the
            model has it, else the output.
        equivariant: see :func:`~tmlib.lie.lie_derivative` (image-shaped layers only).
        blocks: K for jackknife intervals (see :func:`lee`, which also returns the replicates).
        distributed, jvp: see :func:`lee`.

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
    return lee(model, x, generators, layers, batch_size, fill, equivariant, progress, blocks, distributed, jvp).frame
