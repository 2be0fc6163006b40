"""Class-stratified evaluation: measure each class separately, then average over classes.

Invariance measured on a mix of classes conflates "the transformation moves the unit" with "the
classes move the unit" (the sample variance, the ANOVA within-group spread and Goodfellow's
thresholds all see between-class variation). :func:`evaluate_stratified` runs
:func:`~tmlib.measures.evaluate` on each class's samples alone and averages the per-layer arrays
over the classes. Every sample is still forwarded once per transformation: n·m images in all
(plus n for measures with a reference pass). It lives beside :func:`~tmlib.engine.evaluate`,
whose passes it runs (``tmlib.measures.evaluate_stratified`` is the public name).

With ``blocks=K`` every class is split into K blocks of its own; replicate k of the class-mean
result is the class mean of every class's leave-block-k-out arrays (a grouped delete-one-block
jackknife: block k of every class is left out at once), so its intervals cover the class mean
itself. Memory: besides the states of one class at a time, K replicate arrays per class and layer
(the values, not the states) until the classes are combined.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .adapters import default_fill, labels_of, subset
from .engine import collect
from .measures.base import Measure
from .measures.collection import named_measures
from .results import MeasureResult, finite_mean

__all__ = ["evaluate_stratified", "mean_over_classes"]


def mean_over_classes(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Position-wise mean of the finite values of same-shaped arrays (one per class).

    Where no class has a finite value, the common value if all classes agree (e.g. +inf for an NV
    that is x/0 in every class), else NaN. Equal weights per class, whatever its size.
    """
    stack = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
    finite = np.isfinite(stack)
    count = finite.sum(axis=0)
    total = np.where(finite, stack, 0.0).sum(axis=0)
    first = stack[0]
    agree = np.all((stack == first) | (np.isnan(stack) & np.isnan(first)), axis=0)
    out = np.where(agree, first, np.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out


def evaluate_stratified(
    model: torch.nn.Module,
    x: torch.Tensor | Dataset,
    ts,
    measures: Measure | Sequence[Measure] | Mapping[str, Measure],
    labels: Sequence | torch.Tensor | np.ndarray | None = None,
    **evaluate_kwargs: Any,
) -> dict[str, MeasureResult]:
    """:func:`~tmlib.measures.evaluate` per class, averaged over classes.

    Args:
        model, ts, measures: as for :func:`~tmlib.measures.evaluate` (a dict names the results).
        x: a tensor [n, C, H, W] (then ``labels`` is required) or a dataset of (image, label).
        labels: one class label per sample; default: the dataset's labels (the second element
            of each item, reading every item once; a tmlib ``ImageDataset``'s ``labels`` directly).
        **evaluate_kwargs: passed on (``batch_size``, ``layers``, ``fill``, ``progress``,
            ``blocks``, …).

    Returns:
        ``{measure name: MeasureResult}``; each layer's array is :func:`mean_over_classes` of the
        per-class arrays: per position, the mean of the finite values over classes, each class
        weighing the same (e.g. ANOVA ``output="reject"`` then gives, per unit, the fraction of
        classes in which H0 is rejected). Metadata: that of the first class with ``n`` the total,
        ``images_forwarded`` the sum, ``stratified: True``, ``classes`` and ``class_sizes``; entries
        that differ between classes move to ``metadata["per_class"]`` as lists in class order.
        Each result keeps the classes' own results in ``result.per_class`` ({label: MeasureResult},
        in class order; saved and loaded with it); ``result.per_class_frame()`` stacks their tidy
        frames with a column ``class``. With ``blocks=K`` every class is split into K blocks of its
        own, each class result carries its replicates, and so does the class mean (see the module
        docstring); every class needs at least K samples.

    Raises:
        ValueError: ``labels`` of the wrong length, a class with fewer than 2 samples (or fewer
        than ``blocks``).
    """
    y = labels_of(x, labels)
    index: dict[Any, list[int]] = defaultdict(list)
    for i, label in enumerate(y):
        index[label].append(i)
    classes = sorted(index)
    small = {c: len(i) for c, i in index.items() if len(i) < 2}
    if small:
        raise ValueError(f"labels: every class needs at least 2 samples, got {small}")
    kwargs = dict(evaluate_kwargs)
    blocks = kwargs.get("blocks")
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        too_small = {c: len(index[c]) for c in classes if len(index[c]) < blocks}
        if too_small:
            raise ValueError(f"blocks: every class is split into blocks={blocks} blocks, but these classes "
                             f"have fewer samples: {too_small}")
    kwargs["fill"] = default_fill(x, kwargs.get("fill"))  # a torch Subset would lose the dataset's fill
    dataset_name = "tensor" if isinstance(x, torch.Tensor) else getattr(x, "name", None)
    named = named_measures(measures)

    per_class: list[dict[str, MeasureResult]] = []
    loo: list[list[dict[str, MeasureResult]]] = []  # per class: per block k, the results without block k
    for c in classes:
        states = collect(model, subset(x, index[c]), ts, named, **kwargs)
        per_class.append(states.compute(named))
        if states.blocked:
            loo.append(list(states.leave_one_out_results(named, like=per_class[-1])))
        del states

    out: dict[str, MeasureResult] = {}
    for name, first in per_class[0].items():
        results = [run[name] for run in per_class]
        values = {layer: mean_over_classes([r[layer] for r in results]) for layer in first.layer_names}
        meta, varying = {}, {}
        for key, value in first.metadata.items():
            others = [r.metadata.get(key) for r in results]
            if all(_same(o, value) for o in others):
                meta[key] = value
            else:
                varying[key] = others
        for key in ("n", "images_forwarded", "dataset", "block_sizes"):  # replaced by the totals below
            meta.pop(key, None)
            varying.pop(key, None)
        meta.update(
            dataset=dataset_name,
            n=len(y),
            images_forwarded=sum(r.metadata.get("images_forwarded", 0) for r in results),
            stratified=True,
            classes=list(classes),
            class_sizes=[len(index[c]) for c in classes],
            per_class=varying,
        )
        replicates = None
        if loo:
            meta["block_sizes"] = [r.metadata["block_sizes"] for r in results]
            rows = [{layer: finite_mean(mean_over_classes([run[k][name][layer] for run in loo]))
                     for layer in first.layer_names} for k in range(blocks)]
            replicates = pd.DataFrame(rows, columns=first.layer_names, dtype=float).rename_axis("block")
        out[name] = MeasureResult(name, values, meta, replicates=replicates, per_class=dict(zip(classes, results)))
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # arrays and other ambiguous comparisons
        return False
