"""Samples in any of the forms tmlib accepts, adapted once: tensors, tmlib datasets, any dataset.

* :func:`image_blocks` — blocks of images [b, C, H, W] in sample order, and n;
* :func:`images_of` / :func:`dataset_tensors` — all images (and labels) as tensors;
* :func:`labels_of`, :func:`subset` — class labels and a subset that keeps a dataset's name and fill;
* :func:`default_fill` — the background value of the warps: ``dataset.fill`` where the samples
  carry one (tmlib datasets: the normalised value of a black pixel), else 0.

A tmlib :class:`~tmlib.data.ImageDataset` is recognised by duck typing (``labels`` tensor,
``subset``, ``tensors``), so this module does not import :mod:`tmlib.data`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .checks import check_images

__all__ = [
    "dataset_tensors",
    "default_fill",
    "first_tensor",
    "image_blocks",
    "images_of",
    "is_image_dataset",
    "labels_of",
    "subset",
]


def is_image_dataset(x: Any) -> bool:
    """A tmlib ImageDataset (duck-typed): labels as a tensor, ``subset`` and ``tensors``."""
    return isinstance(getattr(x, "labels", None), torch.Tensor) and callable(getattr(x, "subset", None))


def first_tensor(item: Any) -> torch.Tensor:
    """The image of a dataset item: the item itself, or the first element of (image, label)."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    raise TypeError(
        "x: a dataset must yield image tensors [C, H, W] or (image, label) pairs, "
        f"got an item of type {type(item).__name__}"
    )


def _collate_images(items: list) -> torch.Tensor:
    return torch.stack([first_tensor(item) for item in items])


def image_blocks(x: Any, batch_size: int) -> tuple[Iterator[torch.Tensor], int]:
    """(iterator over image blocks [b, C, H, W] in sample order, n) from a tensor or a dataset."""
    if isinstance(x, torch.Tensor):
        check_images(x, "x", batch="n")
        n = x.shape[0]
        return (x[i : i + batch_size] for i in range(0, n, batch_size)), n
    if isinstance(x, Dataset) or hasattr(x, "__getitem__"):
        try:
            n = len(x)
        except TypeError:
            raise TypeError("x: a dataset must have a length (map-style dataset)") from None
        if n == 0:
            raise ValueError("x: the dataset is empty")
        first = first_tensor(x[0])
        if first.dim() != 3:
            raise ValueError(f"x: dataset images must have shape [C, H, W], got {tuple(first.shape)}")
        loader = DataLoader(x, batch_size=batch_size, shuffle=False, collate_fn=_collate_images)
        return iter(loader), n
    raise TypeError(f"x must be a tensor [n, C, H, W] or a dataset, got {type(x).__name__}")


def images_of(x: Any) -> torch.Tensor:
    """All images [n, C, H, W] of a tensor, a tmlib dataset (without decoding item by item) or any
    dataset of images or (image, label) pairs."""
    if isinstance(x, torch.Tensor):
        return check_images(x, "x", batch="n")
    if callable(getattr(x, "tensors", None)):
        return x.tensors()[0]
    if hasattr(x, "__getitem__") and hasattr(x, "__len__"):
        return torch.stack([first_tensor(x[i]) for i in range(len(x))])
    raise TypeError(f"x must be a tensor [n, C, H, W] or a dataset of images, got {type(x).__name__}")


def dataset_tensors(dataset: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images x [N, C, H, W] (float) and labels y [N] (int64) of a dataset, on the CPU.

    Uses ``dataset.tensors()`` when it exists; otherwise stacks the items (the first ``limit`` only,
    when given).
    """
    tensors = getattr(dataset, "tensors", None)
    if callable(tensors):
        x, y = tensors()
        x, y = torch.as_tensor(x).cpu(), torch.as_tensor(y).cpu()
        if limit is not None:
            x, y = x[:limit], y[:limit]
    else:
        n = len(dataset) if limit is None else min(limit, len(dataset))
        items = [dataset[i] for i in range(n)]
        if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
            raise TypeError(
                "dataset items must be (image [C, H, W], label) pairs, "
                f"got {type(items[0]).__name__}"
            )
        x = torch.stack([torch.as_tensor(image) for image, _ in items])
        y = torch.tensor([int(label) for _, label in items])
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"dataset images must be float tensors [C, H, W] (stacked [N, C, H, W]), "
            f"got {x.dtype} of shape {tuple(x.shape)}"
        )
    if y.shape != (len(x),):
        raise ValueError(f"dataset labels must have shape [{len(x)}], got {tuple(y.shape)}")
    return x, y.long()


def default_fill(x: Any, fill: Any = None) -> float | list[float] | tuple[float, ...]:
    """The warps' background value: ``fill`` if given, else ``x.fill`` (tmlib datasets), else 0.0.

    A tensor fill becomes a float (one value) or a list of floats (one per channel); other values
    are returned as they are (numbers, tuples)."""
    if fill is None:
        fill = getattr(x, "fill", None)
    if fill is None:
        fill = 0.0
    if isinstance(fill, torch.Tensor):
        fill = fill.item() if fill.numel() == 1 else fill.flatten().tolist()
    return fill


def _plain(value: Any) -> Any:
    """A label as a JSON-friendly Python scalar."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    return value.item() if isinstance(value, np.generic) else value


def labels_of(x: torch.Tensor | Dataset, labels: Any = None) -> list:
    """One class label per sample: ``labels`` (checked against len(x)) or the dataset's own."""
    n = len(x)
    if labels is None:
        if isinstance(x, torch.Tensor):
            raise ValueError("labels: a tensor x needs labels (one per sample) for stratification")
        if is_image_dataset(x):  # labels without decoding every image
            return x.labels.tolist()
        try:
            return [_plain(x[i][1]) for i in range(n)]
        except (TypeError, IndexError):
            raise ValueError("labels: the dataset must yield (image, label) pairs, or pass labels") from None
    labels = labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
    if len(labels) != n:
        raise ValueError(f"labels must have one entry per sample (n={n}), got {len(labels)}")
    return [_plain(v) for v in labels]


def subset(x: torch.Tensor | Dataset, index: Sequence[int]) -> torch.Tensor | Dataset:
    """The samples ``index`` of x: a tensor, a tmlib dataset (keeps its name, normalisation and
    fill) or a torch ``Subset``."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(list(index), dtype=torch.long, device=x.device)]
    if is_image_dataset(x):
        return x.subset(list(index))
    return Subset(x, list(index))
