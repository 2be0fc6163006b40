"""Class-stratified evaluation: measure each class separately, then average over classes.

Invariance measured on a mix of classes conflates "the transformation moves the unit" with "the
classes move the unit" (the sample variance, the ANOVA within-group spread and Goodfellow's
thresholds all see between-class variation). :func:`evaluate_stratified` runs
:func:`~tmlib.measures.evaluate` on each class's samples alone and averages the per-layer arrays
over the classes. Every sample is still forwarded once per transformation: n·m images in all
(plus n for measures with a reference pass).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..engine import evaluate
from ..results import MeasureResult
from .base import Measure


def _is_image_dataset(x: Any) -> bool:
    """A tmlib.data.ImageDataset (duck-typed: importing tmlib.data here would load it with the
    package, which ``python -m tmlib.data`` warns about)."""
    return isinstance(getattr(x, "labels", None), torch.Tensor) and callable(getattr(x, "subset", None))


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


def _plain(value: Any) -> Any:
    """Labels as JSON-friendly Python scalars."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    return value.item() if isinstance(value, np.generic) else value


def _labels_of(x: torch.Tensor | Dataset, labels: Any) -> list:
    n = len(x)
    if labels is None:
        if isinstance(x, torch.Tensor):
            raise ValueError("labels: a tensor x needs labels (one per sample) for stratification")
        if _is_image_dataset(x):  # labels without decoding every image
            return x.labels.tolist()
        items = (x[i] for i in range(n))
        try:
            return [_plain(item[1]) for item in items]
        except (TypeError, IndexError):
            raise ValueError(
                "labels: the dataset must yield (image, label) pairs, or pass labels"
            ) from None
    labels = labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
    if len(labels) != n:
        raise ValueError(f"labels must have one entry per sample (n={n}), got {len(labels)}")
    return [_plain(v) for v in labels]


def _subset(x: torch.Tensor | Dataset, index: list[int]) -> torch.Tensor | Dataset:
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(index, dtype=torch.long, device=x.device)]
    if _is_image_dataset(x):  # keeps name, normalisation and fill
        return x.subset(index)
    return Subset(x, index)


def evaluate_stratified(
    model: torch.nn.Module,
    x: torch.Tensor | Dataset,
    ts,
    measures: Measure | Sequence[Measure],
    labels: Sequence | torch.Tensor | np.ndarray | None = None,
    **evaluate_kwargs: Any,
) -> dict[str, MeasureResult]:
    """:func:`~tmlib.measures.evaluate` per class, averaged over classes.

    Args:
        model, ts, measures: as for :func:`~tmlib.measures.evaluate`.
        x: a tensor [n, C, H, W] (then ``labels`` is required) or a dataset of (image, label).
        labels: one class label per sample; default: the dataset's labels (the second element
            of each item, reading every item once; a tmlib ``ImageDataset``'s ``labels`` directly).
        **evaluate_kwargs: passed on (``batch_size``, ``layers``, ``fill``, ``progress``, …).

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
        own and its result carries replicates (each class needs at least K samples).

    Raises:
        ValueError: ``labels`` of the wrong length, or a class with fewer than 2 samples.
    """
    y = _labels_of(x, labels)
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
    if kwargs.get("fill") is None:  # a torch Subset would lose the dataset's fill
        kwargs["fill"] = getattr(x, "fill", 0.0)
    dataset_name = "tensor" if isinstance(x, torch.Tensor) else getattr(x, "name", None)

    # Each call resets the measures and returns fresh MeasureResult objects, so per-class
    # results stay valid while the next class is measured.
    per_class = [evaluate(model, _subset(x, index[c]), ts, measures, **kwargs) for c in classes]

    out: dict[str, MeasureResult] = {}
    for name, first in per_class[0].items():
        results = [run[name] for run in per_class]
        values = {
            layer: mean_over_classes([r[layer] for r in results]) for layer in first.layer_names
        }
        meta, varying = {}, {}
        for key, value in first.metadata.items():
            others = [r.metadata.get(key) for r in results]
            if all(_same(o, value) for o in others):
                meta[key] = value
            else:
                varying[key] = others
        for key in ("n", "images_forwarded", "dataset"):  # replaced by the totals below
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
        out[name] = MeasureResult(name, values, meta, per_class=dict(zip(classes, results)))
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # arrays and other ambiguous comparisons
        return False
