"""Tests of tmlib.train on a tiny synthetic task: 8×8 images of a bright bar, horizontal (label 0)
or vertical (label 1), plus Gaussian noise. A quarter turn swaps the two classes."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tmlib import train as train_module
from tmlib import transforms
from tmlib.train import accuracy, checkpoint_key, train

SIZE = 8


class Bars(Dataset):
    """n images [1, 8, 8]: a bar of brightness 1 in a random row (label 0) or column (label 1)."""

    fill = (0.0,)

    def __init__(self, n: int = 256, seed: int = 0, noise: float = 0.3, split: str = "train"):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 2
        position = torch.randint(0, SIZE, (n,), generator=g)
        index = torch.arange(SIZE)
        rows = (index[None, :, None] == position[:, None, None]).expand(n, SIZE, SIZE)
        cols = (index[None, None, :] == position[:, None, None]).expand(n, SIZE, SIZE)
        bar = torch.where(self.y[:, None, None] == 0, rows, cols).float()
        self.x = (bar + noise * torch.randn(n, SIZE, SIZE, generator=g)).unsqueeze(1)
        self.name, self.split = "bars", split

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])

    def tensors(self):
        return self.x, self.y


class TinyCNN(nn.Module):
    """conv 3×3 → ReLU → global max pool → dropout → linear: 98 parameters."""

    paper_name = "TinyCNN"

    def __init__(self, channels: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = {"channels": channels}
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.dropout = nn.Dropout(0.2)  # so that determinism also covers dropout
        self.fc = nn.Linear(channels, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x)).amax(dim=(2, 3))
        return self.fc(self.dropout(h))


class MeanLinear(nn.Module):
    """Global average of the input, then a linear layer: C4-invariant by construction."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(1, 2)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


FAST = dict(epochs=4, batch_size=32, lr=2e-2, progress=False)


@pytest.fixture(scope="module")
def data():
    return Bars(256, seed=0), Bars(256, seed=1, split="test")


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------- training


def test_training_learns_the_bar_task(data):
    train_set, test_set = data
    model = TinyCNN()
    before = accuracy(model, test_set)
    out = train(model, train_set, cache_dir=None, **FAST)
    assert out is model
    assert not model.training
    history = model.training_history
    assert len(history["loss"]) == len(history["accuracy"]) == len(history["seconds"]) == 4
    assert history["loss"][-1] < history["loss"][0]
    assert history["cached"] is False and history["checkpoint"] is None
    assert len(history["key"]) == 64
    after = accuracy(model, test_set)
    assert before < 0.8
    assert after > 0.9


def test_same_seed_same_weights_and_different_seed_differs(data):
    train_set, _ = data
    a = train(TinyCNN(), train_set, seed=3, cache_dir=None, **FAST)
    b = train(TinyCNN(), train_set, seed=3, cache_dir=None, **FAST)
    c = train(TinyCNN(), train_set, seed=4, cache_dir=None, **FAST)
    assert weights_equal(a, b)
    assert a.training_history["loss"] == b.training_history["loss"]
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_global_rng_state_is_restored(data):
    train_set, _ = data
    state = torch.get_rng_state()
    train(TinyCNN(), train_set, cache_dir=None, **FAST)
    assert torch.equal(torch.get_rng_state(), state)


def test_plain_dataset_without_extras(data):
    """Datasets without fill/name/tensors() work: items are stacked, fill defaults to 0."""
    train_set, _ = data
    plain = TensorDataset(train_set.x, train_set.y)
    a = train(TinyCNN(), plain, augment=transforms.flips(), cache_dir=None, **FAST)
    b = train(TinyCNN(), train_set, augment=transforms.flips(), cache_dir=None, **FAST)
    assert weights_equal(a, b)  # same content and same fill 0 → same training
    assert accuracy(a, plain) > 0.9
    key = checkpoint_key(TinyCNN(), plain, None, 4, 0, 32, 2e-2, 0.0)
    assert len(key) == 64 and key == checkpoint_key(TinyCNN(), plain, None, 4, 0, 32, 2e-2, 0.0)
    # train() hashes the same first items as checkpoint_key, although it loads the whole dataset.
    assert train(TinyCNN(), plain, cache_dir=None, **FAST).training_history["key"] == key


# ---------------------------------------------------------------------------------------- cache


def test_second_call_loads_from_cache_without_training(data, tmp_path, monkeypatch):
    train_set, _ = data
    first = train(TinyCNN(), train_set, cache_dir=tmp_path, **FAST)
    path = first.training_history["checkpoint"]
    key = first.training_history["key"]
    assert key == checkpoint_key(TinyCNN(), train_set, None, 4, 0, 32, 2e-2, 0.0)
    assert os.path.basename(path) == f"TinyCNN-{key[:16]}.pt"
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]

    def no_steps(*args, **kwargs):
        raise AssertionError("optimizer step taken although the checkpoint exists")

    monkeypatch.setattr(torch.optim.Adam, "step", no_steps)
    second = train(TinyCNN(), train_set, cache_dir=tmp_path, **FAST)
    assert second.training_history["cached"] is True
    assert second.training_history["checkpoint"] == path
    assert second.training_history["loss"] == first.training_history["loss"]
    assert weights_equal(first, second)
    assert not second.training
    with pytest.raises(AssertionError, match="optimizer step"):  # the spy does catch training
        train(TinyCNN(), train_set, cache_dir=None, **FAST)


def test_key_changes_with_every_part_of_the_config(data):
    train_set, test_set = data
    base = dict(augment=None, epochs=4, seed=0, batch_size=32, lr=2e-2, weight_decay=0.0)
    key = checkpoint_key(TinyCNN(), train_set, **base)
    assert key == checkpoint_key(TinyCNN(), train_set, **base)  # fresh model, same init
    variants = [
        checkpoint_key(TinyCNN(), train_set, **{**base, "epochs": 5}),
        checkpoint_key(TinyCNN(), train_set, **{**base, "lr": 1e-2}),
        checkpoint_key(TinyCNN(), train_set, **{**base, "seed": 1}),
        checkpoint_key(TinyCNN(), train_set, **{**base, "batch_size": 64}),
        checkpoint_key(TinyCNN(), train_set, **{**base, "weight_decay": 1e-4}),
        checkpoint_key(TinyCNN(), train_set, **{**base, "augment": transforms.c4()}),
        checkpoint_key(TinyCNN(), train_set, **{**base, "augment": transforms.rotations(4)}),
        checkpoint_key(TinyCNN(seed=1), train_set, **base),  # other initial weights
        checkpoint_key(TinyCNN(channels=4), train_set, **base),  # other architecture
        checkpoint_key(TinyCNN(), test_set, **base),  # other data
    ]
    assert len({key, *variants}) == 1 + len(variants)


def test_changed_config_trains_a_new_checkpoint(data, tmp_path):
    train_set, _ = data
    a = train(TinyCNN(), train_set, cache_dir=tmp_path, **FAST)
    b = train(TinyCNN(), train_set, cache_dir=tmp_path, **{**FAST, "epochs": 2})
    c = train(TinyCNN(seed=5), train_set, cache_dir=tmp_path, **FAST)
    assert not b.training_history["cached"] and not c.training_history["cached"]
    assert (
        len(
            {
                a.training_history["checkpoint"],
                b.training_history["checkpoint"],
                c.training_history["checkpoint"],
            }
        )
        == 3
    )
    assert len(os.listdir(tmp_path)) == 3


def test_interrupted_save_leaves_no_file(data, tmp_path, monkeypatch):
    train_set, _ = data

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(TinyCNN(), train_set, cache_dir=tmp_path, **FAST)
    assert os.listdir(tmp_path) == []


def test_checkpoint_of_another_config_is_refused(data, tmp_path):
    train_set, _ = data
    model = train(TinyCNN(), train_set, cache_dir=tmp_path, **FAST)
    path = model.training_history["checkpoint"]
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["key"] = "0" * 64
    torch.save(checkpoint, path)
    with pytest.raises(RuntimeError, match="another configuration"):
        train(TinyCNN(), train_set, cache_dir=tmp_path, **FAST)


# --------------------------------------------------------------------------------- augmentation


def test_augmentation_draws_every_member_uniformly_and_deterministically(data, monkeypatch):
    train_set, _ = data
    ts = transforms.c4()
    calls = []
    original = ts.apply_indexed

    def spy(x, indices, fill=0.0):
        calls.append((indices.clone(), fill))
        return original(x, indices, fill=fill)

    monkeypatch.setattr(ts, "apply_indexed", spy)
    a = train(TinyCNN(), train_set, augment=ts, cache_dir=None, **FAST)
    drawn = torch.cat([indices for indices, _ in calls])
    assert len(drawn) == 4 * 256  # every image of every epoch
    counts = torch.bincount(drawn, minlength=4)
    assert counts.tolist() == [int(c) for c in counts] and len(counts) == 4
    assert counts.min() > 0.2 * len(drawn) and counts.max() < 0.3 * len(drawn)
    assert all(tuple(fill) == (0.0,) for _, fill in calls)

    first_draws = drawn.clone()
    calls.clear()
    b = train(TinyCNN(), train_set, augment=ts, cache_dir=None, **FAST)
    assert torch.equal(torch.cat([indices for indices, _ in calls]), first_draws)
    assert weights_equal(a, b)
    plain = train(TinyCNN(), train_set, cache_dir=None, **FAST)
    assert not weights_equal(a, plain)


def test_augmentation_changes_what_is_learnable(data):
    """Flips keep a bar's orientation (still learnable); quarter turns swap the classes, so under
    C4 augmentation every image appears with both labels and accuracy falls to chance."""
    train_set, test_set = data
    flipped = train(TinyCNN(), train_set, augment=transforms.flips(), cache_dir=None, **FAST)
    rotated = train(TinyCNN(), train_set, augment=transforms.c4(), cache_dir=None, **FAST)
    assert accuracy(flipped, test_set) > 0.9
    assert rotated.training_history["accuracy"][-1] < 0.65


# ------------------------------------------------------------------------------------- accuracy


def test_accuracy_under_c4_equals_upright_for_an_invariant_model(data):
    _, test_set = data
    # Make the mean brightness weakly informative (±0.03 per class), so that the invariant model's
    # accuracy is neither chance nor perfect.
    shift = 0.03 * (2 * test_set.y - 1).float()[:, None, None, None]
    brightness = TensorDataset(test_set.x + shift, test_set.y)
    model = MeanLinear()
    with torch.no_grad():  # predict class 1 when the mean exceeds 1/8 (the bar's mean)
        model.fc.weight.copy_(torch.tensor([[0.0], [40.0]]))
        model.fc.bias.copy_(torch.tensor([0.0, -40.0 / 8]))
    upright = accuracy(model, brightness)
    assert 0.7 < upright < 0.95
    c4 = accuracy(model, brightness, transformations=transforms.c4())
    assert c4 == pytest.approx(upright, abs=1e-12)


def test_accuracy_under_c4_averages_over_rotated_copies(data):
    train_set, test_set = data
    model = train(TinyCNN(), train_set, cache_dir=None, **FAST)
    per_rotation = [
        accuracy(model, TensorDataset(torch.rot90(test_set.x, k, dims=(2, 3)), test_set.y))
        for k in range(4)
    ]
    c4 = accuracy(model, test_set, transformations=transforms.c4())
    assert c4 == pytest.approx(sum(per_rotation) / 4, abs=1e-12)
    # A quarter turn turns a horizontal bar into a vertical one: the upright-trained model is
    # right at 0° and 180° and wrong at 90° and 270°.
    assert per_rotation[0] > 0.9 and per_rotation[2] > 0.9
    assert per_rotation[1] < 0.1 and per_rotation[3] < 0.1
    assert c4 == pytest.approx(0.5, abs=0.05)
    # Batches that split an image's m copies across chunks give the same number.
    assert accuracy(model, test_set, transformations=transforms.c4(), batch_size=3) == c4
    model.train()
    accuracy(model, test_set)
    assert model.training  # the previous mode is restored


# ------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "overrides, error, name",
    [
        ({"epochs": 0}, ValueError, "epochs"),
        ({"epochs": 1.5}, TypeError, "epochs"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": -1e-3}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"seed": -1}, ValueError, "seed"),
        ({"augment": "c4"}, TypeError, "augment"),
        ({"model": "resnet"}, TypeError, "model"),
        (
            {"dataset": TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0))},
            ValueError,
            "dataset",
        ),
        ({"dataset": [1, 2, 3]}, TypeError, "dataset"),
    ],
)
def test_bad_arguments_name_the_argument(data, overrides, error, name):
    train_set, _ = data
    args = {
        "model": TinyCNN(),
        "dataset": train_set,
        "cache_dir": None,
        "progress": False,
        **overrides,
    }
    with pytest.raises(error, match=name):
        train(**args)
    key_args = {
        "model": TinyCNN(),
        "dataset": train_set,
        "augment": None,
        "epochs": 1,
        "seed": 0,
        "batch_size": 8,
        "lr": 1e-3,
        "weight_decay": 0.0,
        **overrides,
    }
    with pytest.raises(error, match=name):
        checkpoint_key(**key_args)


def test_accuracy_bad_arguments(data):
    _, test_set = data
    with pytest.raises(TypeError, match="model"):
        accuracy("resnet", test_set)
    with pytest.raises(ValueError, match="batch_size"):
        accuracy(TinyCNN(), test_set, batch_size=0)
    with pytest.raises(TypeError, match="transformations"):
        accuracy(TinyCNN(), test_set, transformations=[0, 90])
    with pytest.raises(ValueError, match="dataset"):
        accuracy(TinyCNN(), TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0)))


def test_model_without_parameters_is_refused(data):
    train_set, _ = data
    with pytest.raises(ValueError, match="model"):
        train(nn.Flatten(), train_set, cache_dir=None, progress=False)


def test_progress_bar_runs(data, capsys):
    train_set, _ = data
    train(TinyCNN(), train_set, epochs=1, batch_size=64, progress=True, cache_dir=None)
    assert "epoch 1/1" in capsys.readouterr().err


def test_module_exports():
    assert set(train_module.__all__) >= {"train", "accuracy", "checkpoint_key"}


def test_regression_of_the_transformation_learns_rotations():
    """CLEI 2021's set-up: predict which rotation was applied (the 2×3 matrix)."""
    from tmlib import transforms

    torch.manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 1:3, 2:6] = 1.0  # an asymmetric blob: its rotation is visible
    x += 0.05 * torch.randn_like(x)
    data = torch.utils.data.TensorDataset(x, torch.zeros(64, dtype=torch.long))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 6))
    ts = transforms.c4()
    train(model, data, augment=ts, epochs=30, seed=0, batch_size=16, lr=3e-3, cache_dir=None,
          progress=False, task="regress-transformation")
    history = model.training_history
    assert history["loss"][-1] < 0.1 * history["loss"][0]
    assert history["accuracy"][-1] > 0.95  # nearest matrix = the rotation applied
    with pytest.raises(ValueError, match="augment"):
        train(model, data, task="regress-transformation", cache_dir=None, progress=False)
    with pytest.raises(ValueError, match="task"):
        train(model, data, task="segment", cache_dir=None, progress=False)
