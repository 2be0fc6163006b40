"""The models of the reproduction: what identifies one (:class:`ModelSpec`), how it is built, trained
to its floor (cached) and evaluated on the test split.

A spec holds everything that determines the trained weights; :func:`trained_model` trains it once
and loads it afterwards (the checkpoint cache of :mod:`tmlib.train` keys on the same things), then
attaches ``model.evaluation``: test accuracy upright and under the training distribution, the
floor and whether it is met, cached beside the checkpoint. ``epochs=0`` is the untrained network of
the same architecture and initial seed: the baseline every claim about training is measured against.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data, models, train
from ..paths import resolve
from ..results import atomic_write
from ..stopping import EarlyStop
from .profiles import augmentation_set, default_device, floor_for

__all__ = [
    "ModelSpec",
    "build_model",
    "evaluate_model",
    "fine_tuned_model",
    "snapshot_models",
    "spec_dict",
    "test_accuracy",
    "trained_model",
]

# Test images under the training distribution: each test image transformed once by a member of
# the augmentation set drawn with this seed (the same draws for every model).
_TEST_DRAW_SEED = 20231017
_EVALUATION_FORMAT = 1


@dataclass(frozen=True)
class ModelSpec:
    """Everything that identifies a trained model (the training cache keys on the same things).

    ``epochs`` is the cap (0 = untrained). ``stop``: ``"floor"`` stops at the accuracy floor plus
    ``floor_margin`` on the validation hold-out, ``"plateau"`` when the validation accuracy has not
    improved for ``patience`` checks (best weights kept), None trains every epoch. ``floor``: None
    = :data:`~tmlib.experiments.profiles.FLOORS` for the dataset and augmentation.
    """

    architecture: str = "SimpleConv"
    dataset: str = "mnist"
    augment: str | None = None
    augment_degrees: float = 360.0
    init_seed: int = 0
    train_seed: int = 0
    epochs: int = 3  # the cap; 0 = untrained
    n_train: int | None = 6000
    batch_size: int = 128
    task: str = "classify"  # or "regress-transformation" (predict the augment set's matrix, CLEI 2021)
    lr: float = 1e-3  # Adam's learning rate
    options: dict = field(default_factory=dict, hash=False)
    stop: str | None = None
    floor: float | None = None
    floor_margin: float = 0.01
    patience: int = 3
    check_every: int = 10_000
    n_validation: int = 5000
    schedule: str = "constant"
    warmup: int = 0
    threads: int | None = None
    channels_last: bool = False
    snapshots: tuple[int, ...] = ()  # training-image counts at which the weights are kept

    def label(self) -> str:
        aug = "no augmentation" if self.augment is None else f"{self.augment} augmentation"
        return f"{self.architecture} · {self.dataset} · {aug}"

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)

    @property
    def trained(self) -> bool:
        return self.epochs > 0

    def untrained(self) -> ModelSpec:
        """The same architecture and initial weights, not trained: the baseline."""
        return replace(self, epochs=0)

    def required_floor(self) -> float | None:
        """The accuracy this model must reach (None: no floor, e.g. a regressor)."""
        if self.task != "classify":
            return self.floor
        return self.floor if self.floor is not None else floor_for(self.dataset, self.augment is not None)

    @classmethod
    def from_settings(cls, settings: dict[str, Any], **fields: Any) -> ModelSpec:
        """A spec trained the way a profile's ``settings["training"]`` says (see profiles.py)."""
        t = settings["training"]
        base = {
            "epochs": t["max_epochs"], "n_train": settings.get("n_train"), "batch_size": t["batch_size"],
            "lr": t["lr"], "stop": t["stop"], "floor_margin": t["floor_margin"], "check_every": t["check_every"],
            "n_validation": t["n_validation"], "schedule": t["schedule"], "warmup": t["warmup"],
            "threads": t["threads"], "channels_last": t["channels_last"],
        }
        if fields.get("architecture", "SimpleConv") in ("SimpleConv", "TIPooling") and "options" not in fields:
            base["options"] = dict(settings["simpleconv"])
        base.update(fields)
        if base.get("architecture") in ("SteerableCNN",):
            base["channels_last"] = False  # e2cnn's modules reshape with views
        return cls(**base)


def spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return asdict(spec)


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh model for ``spec``'s dataset (channels, size, classes), initialised from init_seed."""
    info = data.describe(spec.dataset)
    torch.manual_seed(spec.init_seed)
    kwargs = dict(spec.options)
    kwargs.setdefault("image_size", info["size"])  # every registered model takes it (the MLP too)
    return models.build(
        spec.architecture,
        in_channels=info["channels"],
        num_classes=info["classes"] if spec.task == "classify" else 6,
        **kwargs,
    )


def _training_data(spec: ModelSpec, data_root: str) -> tuple[Any, Any]:
    """(training images, validation hold-out): the hold-out is the same 5,000 images for every
    model of a dataset; ``n_train`` draws a class-balanced subset of the rest (seed: train_seed)."""
    full = data.load(spec.dataset, "train", root=resolve(data_root))
    rest, validation = data.holdout(full, spec.n_validation, seed=0)
    if spec.n_train is not None and spec.n_train < len(rest):
        gen = torch.Generator().manual_seed(spec.train_seed)
        index = data._stratified_indices(rest.labels, spec.n_train, rest.num_classes, gen)
        rest = rest.subset(torch.sort(index).values)
    return rest, validation


def _stop_rule(spec: ModelSpec, validation: Any) -> EarlyStop | None:
    if spec.stop is None or spec.task != "classify":
        return None
    if spec.stop == "floor":
        floor = spec.required_floor()
        if floor is None:
            raise ValueError(f"stop='floor': no accuracy floor is known for {spec.label()}; pass floor=")
        return EarlyStop(validation, target=min(1.0, floor + spec.floor_margin), check_every=spec.check_every)
    if spec.stop == "plateau":
        return EarlyStop(validation, patience=spec.patience, check_every=spec.check_every)
    raise ValueError(f"stop must be None, 'floor' or 'plateau', got {spec.stop!r}")


def _fit(model: nn.Module, spec: ModelSpec, train_set: Any, validation: Any, models_dir: str, progress: bool,
         device: torch.device) -> None:
    train.train(
        model, train_set, augment=augmentation_set(spec.augment, spec.augment_degrees), epochs=spec.epochs,
        seed=spec.train_seed, batch_size=spec.batch_size, lr=spec.lr, device=device,
        cache_dir=resolve(models_dir), progress=progress, task=spec.task, stop=_stop_rule(spec, validation),
        warmup=spec.warmup, threads=spec.threads if device.type == "cpu" else None,
        channels_last=spec.channels_last and device.type == "cpu", schedule=spec.schedule,
        snapshots=spec.snapshots,
    )


def trained_model(
    spec: ModelSpec, data_root: str = "data", models_dir: str = "data/models", progress: bool = True,
    device: str | torch.device | None = None, evaluate: bool = True, n_test: int | None = None,
) -> nn.Module:
    """Build and train (or load from the cache) the model of ``spec``; eval mode on return.

    ``device``: where to train and evaluate (None: CUDA when available, else the CPU). With
    ``evaluate`` the test accuracies of :func:`evaluate_model` on ``n_test`` test images (None: all)
    are attached as ``model.evaluation`` (trained models only; cached beside the checkpoint)."""
    device = torch.device(device) if device is not None else default_device()
    model = build_model(spec).to(device)
    if spec.trained:
        train_set, validation = _training_data(spec, data_root)
        _fit(model, spec, train_set, validation, models_dir, progress, device)
    model.spec = spec  # what the model is, for tables and figures
    model.evaluation = evaluate_model(model, spec, data_root, n_test) if evaluate and spec.trained else None
    return model.eval()


def fine_tuned_model(
    pretrained: ModelSpec, spec: ModelSpec, data_root: str = "data", models_dir: str = "data/models",
    progress: bool = True, device: str | torch.device | None = None, evaluate: bool = True,
    n_test: int | None = None,
) -> nn.Module:
    """``spec``'s training started from the weights of ``pretrained`` (trained, cached, on its own
    dataset) instead of ``spec.init_seed``'s random ones; cached too (the initial weights are part
    of the checkpoint key). Both specs must describe the same architecture and input/output sizes."""
    if pretrained.architecture != spec.architecture or pretrained.options != spec.options:
        raise ValueError(
            f"pretrained: a {pretrained.architecture} {pretrained.options} cannot initialise a "
            f"{spec.architecture} {spec.options}; the architectures must be the same"
        )
    device = torch.device(device) if device is not None else default_device()
    source = trained_model(pretrained, data_root, models_dir, progress, device, evaluate=False)
    model = build_model(spec).to(device)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as error:
        raise ValueError(
            f"pretrained: weights trained on {pretrained.dataset!r} do not fit a model for {spec.dataset!r} "
            f"(input channels, image size or classes differ): {error}"
        ) from None
    train_set, validation = _training_data(spec, data_root)
    _fit(model, spec, train_set, validation, models_dir, progress, device)
    model.spec = spec
    model.pretrained = pretrained
    model.evaluation = evaluate_model(model, spec, data_root, n_test) if evaluate else None
    return model.eval()


def snapshot_models(model: nn.Module) -> dict[int, nn.Module]:
    """The weights kept during training (``spec.snapshots``), as models: {training images seen:
    model in eval mode}, on the model's device; the last entry is the trained model itself."""
    spec = model.spec
    device = next(iter(model.parameters())).device
    out = {}
    for images, state in sorted(getattr(model, "training_snapshots", {}).items()):
        snapshot = build_model(spec).to(device)
        snapshot.load_state_dict(state)
        snapshot.spec = spec
        out[int(images)] = snapshot.eval()
    out[int(model.training_history["images"])] = model
    return out


# ------------------------------------------------------------------------------------ evaluation


def _test_under_training_distribution(spec: ModelSpec, test: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    return _transformed_test(augmentation_set(spec.augment, spec.augment_degrees), test)


def _transformed_test(augment: Any, test: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    if augment is None:
        return None
    x, y = test.tensors()
    choice = torch.randint(len(augment), (len(x),), generator=torch.Generator().manual_seed(_TEST_DRAW_SEED))
    fill = test.fill
    x = torch.cat([augment.apply_indexed(x[i:i + 4096], choice[i:i + 4096], fill=fill) for i in range(0, len(x), 4096)])
    return x, y


def _accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    device = next(iter(model.parameters())).device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / len(x)


def test_accuracy(model: nn.Module, dataset: str, augment: str | None = None, data_root: str = "data",
                  n_test: int | None = None, degrees: float = 360.0) -> float:
    """Accuracy of ``model`` on the test split of ``dataset`` (the first ``n_test`` stratified images,
    default all) transformed as a model trained with ``augment`` sees its training data: each image
    by one member of the augmentation set, the same draws as :func:`evaluate_model`. None: upright."""
    test = data.load(dataset, "test", n=n_test, root=resolve(data_root))
    pair = _transformed_test(augmentation_set(augment, degrees), test)
    was_training = model.training
    model.eval()
    try:
        return _accuracy_of(model, *(pair if pair is not None else test.tensors()))
    finally:
        model.train(was_training)


def evaluate_model(model: nn.Module, spec: ModelSpec, data_root: str = "data", n_test: int | None = None) -> dict:
    """Test accuracy of a trained classifier, upright and under its training distribution (each of
    the ``n_test`` test images, default all, transformed once by a member of the augmentation set,
    fixed draws), with its floor: ``{"upright", "transformed", "own", "floor", "met", "n_test"}``,
    ``own`` being the accuracy the floor applies to. Cached as ``<checkpoint>.eval.json``."""
    history = getattr(model, "training_history", {}) or {}
    checkpoint = history.get("checkpoint")
    sidecar = Path(f"{checkpoint}.eval.json") if checkpoint else None
    request = {"format": _EVALUATION_FORMAT, "n_test": n_test, "seed": _TEST_DRAW_SEED, "key": history.get("key")}
    if sidecar is not None and sidecar.exists():
        stored = json.loads(sidecar.read_text())
        if stored.get("request") == request:
            return stored["evaluation"]
    was_training = model.training
    model.eval()
    try:
        test = data.load(spec.dataset, "test", n=n_test, root=resolve(data_root))
        if spec.task != "classify":
            evaluation = _regression_evaluation(model, spec, test)
        else:
            x, y = test.tensors()
            upright = _accuracy_of(model, x, y)
            transformed_data = _test_under_training_distribution(spec, test)
            transformed = None if transformed_data is None else _accuracy_of(model, *transformed_data)
            own = upright if transformed is None else transformed
            floor = spec.required_floor()
            evaluation = {"metric": "accuracy", "upright": upright, "transformed": transformed, "own": own,
                          "floor": floor, "met": None if floor is None else bool(own >= floor), "n_test": len(x)}
    finally:
        model.train(was_training)
    if sidecar is not None:
        payload = json.dumps({"request": request, "evaluation": evaluation}, indent=1)
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(payload))
    return evaluation


def _regression_evaluation(model: nn.Module, spec: ModelSpec, test: Any) -> dict:
    """A transformation regressor's error in the transformation's own units (see
    :func:`regression_errors`), with the floor (a maximum median error) when ``spec.floor`` is set."""
    augment = augmentation_set(spec.augment, spec.augment_degrees)
    x, _ = test.tensors()
    choice = torch.randint(len(augment), (len(x),), generator=torch.Generator().manual_seed(_TEST_DRAW_SEED))
    device = next(iter(model.parameters())).device
    predicted = []
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            xb = augment.apply_indexed(x[i:i + 1000], choice[i:i + 1000], fill=test.fill)
            predicted.append(model(xb.to(device)).cpu().double())
    truth = augment.matrices[choice][:, :2, :].reshape(len(x), 6).double()
    errors = regression_errors(spec.augment, torch.cat(predicted), truth, size=test[0][0].shape[-1])
    median = float(errors.median())
    floor = spec.floor
    return {"metric": f"median error ({_REGRESSION_UNITS[spec.augment]})", "upright": None, "transformed": median,
            "own": median, "rms": float(errors.square().mean().sqrt()), "floor": floor,
            "met": None if floor is None else bool(median <= floor), "n_test": len(x)}


_REGRESSION_UNITS = {"rotation": "degrees", "scale": "|log scale|", "translation": "pixels"}


def regression_errors(transformation: str, predicted: torch.Tensor, truth: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image error of a predicted 2×3 affine matrix (flattened [N, 6], normalised coordinates):
    rotation → angle error in degrees (wrapped to [0, 180]); scale → the largest |log(ŝ/s)| of the
    two axes; translation → the distance in pixels of an image of ``size`` pixels."""
    p, t = predicted.reshape(-1, 2, 3), truth.reshape(-1, 2, 3)
    if transformation == "rotation":
        angle = lambda m: torch.atan2(m[:, 1, 0] - m[:, 0, 1], m[:, 0, 0] + m[:, 1, 1])  # noqa: E731
        diff = torch.remainder(angle(p) - angle(t) + math.pi, 2 * math.pi) - math.pi
        return diff.abs() * 180 / math.pi
    if transformation == "scale":
        ratio = torch.stack([p[:, 0, 0] / t[:, 0, 0], p[:, 1, 1] / t[:, 1, 1]], 1).abs().clamp(min=1e-6)
        return ratio.log().abs().amax(1)
    if transformation == "translation":
        return (p[:, :, 2] - t[:, :, 2]).norm(dim=1) * size / 2  # normalised [-1, 1] → pixels
    raise ValueError(f"transformation must be one of {sorted(_REGRESSION_UNITS)}, got {transformation!r}")
