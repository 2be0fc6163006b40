"""Train image classifiers reproducibly and cache the trained weights on disk.

* :func:`train` fits a model in place with Adam and cross-entropy. Everything random in training
  (data order, augmentation draws, dropout) follows from ``seed``, so two calls with the same
  arguments on identically initialised models give bitwise identical weights (on the same device
  and torch build).
* Trained weights are cached under ``cache_dir`` with a key that hashes the *whole* configuration
  (model, initial weights, data, augmentation, hyper-parameters): running a notebook again loads the
  checkpoint instead of training, and changing anything trains a new model.
* :func:`accuracy` gives test accuracy, optionally averaged over every transformation of a set
  ("accuracy on rotated test images").

Datasets are ``torch`` datasets of ``(image [C, H, W] float, label int)`` pairs. Optional extras are
used when present: ``fill`` (per-channel normalised value of a black pixel, the background for
rotations), ``name``, ``split`` and ``tensors() -> (x [N, C, H, W], y [N])``. Models may carry
``config`` (a JSON-able dict) and ``paper_name``; both have fallbacks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tmlib.stopping import EarlyStop, StopState
from tmlib.transforms import TransformationSet

from .adapters import dataset_tensors, default_fill
from .checks import check_int, check_module, check_real
from .devices import resolve_device
from .files import atomic_save

__all__ = ["CHECKPOINT_FORMAT", "accuracy", "checkpoint_key", "train"]

# Bump when the training procedure or the checkpoint layout changes: old checkpoints then get
# other keys and are retrained instead of being silently reused.
CHECKPOINT_FORMAT = 2

# Datasets without ``tensors()`` are identified by their length and first items only, so that
# computing a key never has to read a whole (possibly lazily loaded) dataset.
_DATASET_SAMPLE = 64


# ------------------------------------------------------------------------------------ validation


def _check_int(name: str, value: Any, minimum: int) -> int:
    return check_int(name, value, minimum)  # TypeError for a non-integer, ValueError below minimum


def _check_real(name: str, value: Any, *, positive: bool) -> float:
    return check_real(name, value, positive=positive)


def _check_dataset(dataset: Any) -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            "dataset must be a sized dataset of (image [C, H, W], label) pairs, "
            f"got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError(
            "dataset must contain at least one (image, label) pair, got an empty dataset"
        )


def _check_transformations(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, TransformationSet):
        raise TypeError(
            f"{name} must be None or a tmlib.transforms.TransformationSet, "
            f"got {type(value).__name__}"
        )


def _check_hyperparameters(
    model: Any,
    dataset: Any,
    augment: Any,
    epochs: Any,
    seed: Any,
    batch_size: Any,
    lr: Any,
    weight_decay: Any,
) -> tuple[int, int, int, float, float]:
    """Validate the arguments shared by :func:`train` and :func:`checkpoint_key`."""
    check_module(model)
    _check_dataset(dataset)
    _check_transformations("augment", augment)
    return (
        _check_int("epochs", epochs, 1),
        _check_int("seed", seed, 0),
        _check_int("batch_size", batch_size, 1),
        _check_real("lr", lr, positive=True),
        _check_real("weight_decay", weight_decay, positive=False),
    )


# ------------------------------------------------------------------------------- data and hashing


def _dataset_tensors(dataset: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images x [N, C, H, W] (float) and labels y [N] (int64) of a dataset, on the CPU."""
    return dataset_tensors(dataset, limit)


def _dataset_fill(dataset: Any) -> tuple[float, ...]:
    """The background value of the dataset's images, one float per channel (or one for all)."""
    return tuple(float(v) for v in torch.as_tensor(default_fill(dataset), dtype=torch.float64).flatten().tolist())


def _tensor_digest(hasher: Any, tensor: torch.Tensor) -> None:
    """Feed dtype, shape and raw bytes of a tensor into a hashlib object."""
    t = tensor.detach().cpu().contiguous()
    hasher.update(f"{t.dtype}{tuple(t.shape)}".encode())
    # Viewing as bytes works for every dtype (numpy has no bfloat16).
    hasher.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _tensor_hash(tensor: torch.Tensor) -> str:
    hasher = hashlib.sha256()
    _tensor_digest(hasher, tensor)
    return hasher.hexdigest()


def _state_hash(model: nn.Module) -> str:
    """sha256 of the model's current state_dict (names, dtypes, shapes and values)."""
    hasher = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        hasher.update(name.encode())
        if isinstance(value, torch.Tensor):
            _tensor_digest(hasher, value)
        else:  # extra state (rare): hash its canonical JSON
            hasher.update(_canonical_json(value).encode())
    return hasher.hexdigest()


def _json_default(value: Any) -> Any:
    """JSON form of config values that ``json`` does not know, refusing unstable ``repr``s."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"  # classes and functions, e.g. nn.ReLU
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    text = repr(value)
    if " at 0x" in text:  # a memory address would change the key on every run
        raise TypeError(
            f"cannot turn config value {text} into a stable cache key; use plain JSON values"
        )
    return text


def _canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default
    )


def _paper_name(model: nn.Module) -> str:
    """The model's ``paper_name`` (else its class name), made safe for a file name."""
    name = str(getattr(model, "paper_name", None) or type(model).__name__)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _model_identity(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        # Without a config, the architecture is identified by the shapes of its tensors.
        shapes = {
            k: list(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
        }
        config = {"state_dict_shapes": hashlib.sha256(_canonical_json(shapes).encode()).hexdigest()}
    cls = type(model)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "paper_name": getattr(model, "paper_name", None) or cls.__name__,
        "config": config,
    }


def _dataset_identity(
    dataset: Any, tensors: tuple[torch.Tensor, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Name, split, length, fill and content hashes of a dataset.

    With ``tensors()`` all images and labels are hashed; otherwise the first ``_DATASET_SAMPLE``
    items. ``tensors`` may pass the already loaded (x, y) to avoid loading the data twice.
    """
    whole = callable(getattr(dataset, "tensors", None))
    if tensors is None:
        tensors = _dataset_tensors(dataset, limit=None if whole else _DATASET_SAMPLE)
    x, y = tensors
    if not whole:
        x, y = x[:_DATASET_SAMPLE], y[:_DATASET_SAMPLE]
    return {
        "name": getattr(dataset, "name", None),
        "split": getattr(dataset, "split", None),
        "len": len(dataset),
        "fill": list(_dataset_fill(dataset)),
        "hashed": "all" if whole else f"first {len(x)}",
        "images": _tensor_hash(x),
        "labels": _tensor_hash(y),
    }


def _training_config(
    model: nn.Module,
    dataset: Any,
    augment: TransformationSet | None,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    tensors: tuple[torch.Tensor, torch.Tensor] | None = None,
    task: str = "classify",
    procedure: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that determines the trained weights, as a JSON-able dict (arguments validated).

    ``procedure``: the settings of :func:`train` beyond the classic ones (stopping rule, warm-up,
    threads, memory format, snapshots); they enter the key only when set."""
    extra = {} if task == "classify" else {"task": task}
    extra.update({k: v for k, v in (procedure or {}).items() if v not in (None, 0, False, [], ())})
    return {
        **extra,
        "format": CHECKPOINT_FORMAT,
        "procedure": "Adam, cross-entropy, reshuffled each epoch, last partial batch kept",
        "model": _model_identity(model),
        "initial_weights": _state_hash(model),
        "dataset": _dataset_identity(dataset, tensors),
        "augment": None if augment is None else augment.fingerprint(),
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
    }


def checkpoint_key(
    model: nn.Module,
    dataset: Any,
    augment: TransformationSet | None,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
) -> str:
    """The cache key :func:`train` uses: sha256 (64 hex digits) of the canonical JSON configuration.

    The key covers the model (class, ``paper_name``, ``config``), the model's *current* weights
    (call this on the untrained model to get the key ``train`` will use), the dataset (name, split,
    length, fill, hash of its contents), the augmentation's fingerprint, every hyper-parameter and
    :data:`CHECKPOINT_FORMAT`. The device is not part of it.
    """
    epochs, seed, batch_size, lr, weight_decay = _check_hyperparameters(
        model, dataset, augment, epochs, seed, batch_size, lr, weight_decay
    )
    config = _training_config(model, dataset, augment, epochs, seed, batch_size, lr, weight_decay)
    return hashlib.sha256(_canonical_json(config).encode()).hexdigest()


# ---------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader sees either no file or the complete one, never a partial save."""
    atomic_save(path, payload)


def _load_checkpoint(model: nn.Module, path: Path, key: str) -> tuple[dict[str, Any], dict]:
    """Load the weights of ``path`` into ``model``; returns the stored history and snapshots."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(
            f"cannot read checkpoint {path} ({error}); delete it to retrain"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("key") != key:
        found = checkpoint.get("key") if isinstance(checkpoint, dict) else None
        raise RuntimeError(
            f"checkpoint {path} belongs to another configuration (key {found}, expected {key}); "
            "delete it to retrain"
        )
    model.load_state_dict(checkpoint["state_dict"])  # copies onto the model's own device
    return checkpoint["history"], checkpoint.get("snapshots", {})


# ------------------------------------------------------------------------------------- training


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter (or buffer), else CPU."""
    return resolve_device(device, model)


def _derive_seed(seed: int, purpose: str) -> int:
    """Independent 63-bit seed per purpose, so that turning augmentation on or off leaves the data
    order unchanged (the two streams never share a generator)."""
    digest = hashlib.sha256(f"tmlib.train/{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    augment: TransformationSet | None,
    fill: tuple[float, ...],
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    progress: bool,
    task: str = "classify",
    stop: EarlyStop | None = None,
    warmup: int = 0,
    channels_last: bool = False,
    snapshots: tuple[int, ...] = (),
    schedule: str = "constant",
) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
    """The training loop; returns the history (per-epoch mean loss, training accuracy, seconds,
    validation checks, why it stopped) and the snapshots {training images seen: state_dict}.

    ``task="regress-transformation"``: the labels are ignored; the model predicts the 6 entries of
    the 2×3 affine matrix of the transformation drawn from ``augment`` (MSE loss), and "accuracy"
    is the fraction of images whose nearest matrix in the set is the one applied."""
    targets = None
    if task == "regress-transformation":
        targets = augment.matrices[:, :2, :].reshape(len(augment), 6).float().to(device)
    n = len(x)
    n_batches = math.ceil(n / batch_size)
    order = torch.Generator().manual_seed(_derive_seed(seed, "order"))
    draws = torch.Generator().manual_seed(_derive_seed(seed, "augment"))
    history: dict[str, Any] = {"loss": [], "accuracy": [], "seconds": []}
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    stopper = StopState(stop)
    pending = sorted(set(snapshots))
    taken: dict[int, dict[str, torch.Tensor]] = {}
    if pending and pending[0] == 0:
        taken[0] = _cpu_state(model)
        pending.pop(0)
    seen_total = 0
    step = 0

    # fork_rng restores the global RNG states afterwards: training leaves the caller's randomness
    # untouched, while dropout inside the model is still seeded.
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        total_steps = epochs * n_batches
        schedule = None if warmup == 0 and schedule == "constant" else torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _lr_factor(s, warmup, total_steps, schedule))
        model.train()
        with tqdm(
            total=epochs * n_batches, disable=not progress, desc="train", unit="batch"
        ) as bar:
            for epoch in range(epochs):
                start = time.perf_counter()
                bar.set_description(f"epoch {epoch + 1}/{epochs}")
                # Sums stay on the device: calling .item() every batch would synchronise a GPU.
                loss_sum = torch.zeros((), device=device, dtype=torch.float64)
                correct = torch.zeros((), device=device, dtype=torch.long)
                seen = 0
                permutation = torch.randperm(n, generator=order)
                for b, batch in enumerate(permutation.split(batch_size)):
                    xb, yb = x[batch].to(device), y[batch].to(device)
                    if augment is not None:
                        choice = torch.randint(len(augment), (len(batch),), generator=draws)
                        xb = augment.apply_indexed(xb, choice, fill=fill)
                    if channels_last:
                        xb = xb.contiguous(memory_format=memory_format)
                    optimizer.zero_grad(set_to_none=True)
                    logits = model(xb)
                    if targets is None:
                        loss = F.cross_entropy(logits, yb)
                        predicted, truth = logits.detach().argmax(dim=1), yb
                    else:
                        truth = choice.to(device)
                        loss = F.mse_loss(logits, targets[truth])
                        predicted = torch.cdist(logits.detach(), targets).argmin(dim=1)
                    loss.backward()
                    optimizer.step()
                    if schedule is not None:
                        schedule.step()
                    step += 1
                    loss_sum += loss.detach().double() * len(batch)
                    correct += (predicted == truth).sum()
                    seen += len(batch)
                    seen_total += len(batch)
                    bar.update(1)
                    while pending and seen_total >= pending[0]:
                        taken[pending.pop(0)] = _cpu_state(model)
                    stopping = stopper.due(seen_total) and stopper.check(model, seen_total, device, channels_last)
                    if progress and (b % 20 == 0 or b == n_batches - 1 or stopping):
                        postfix = {"loss": f"{loss_sum.item() / seen:.4f}", "acc": f"{correct.item() / seen:.3f}"}
                        if stopper.checks:
                            postfix["val"] = f"{stopper.checks[-1][1]:.3f}"
                        bar.set_postfix(postfix)
                    if stopping:
                        break
                mean_loss = loss_sum.item() / seen
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"training diverged: mean loss {mean_loss} in epoch {epoch + 1}; "
                        f"try a smaller lr (got {lr})"
                    )
                history["loss"].append(mean_loss)
                history["accuracy"].append(correct.item() / seen)
                history["seconds"].append(time.perf_counter() - start)
                if stopper.reason is not None:
                    break
    if stop is not None and stopper.reason is None and (not stopper.checks or stopper.checks[-1][0] != seen_total):
        stopper.check(model, seen_total, device, channels_last)  # the final weights count too
        stopper.reason = stopper.reason or "epochs"
    stopper.finish(model)
    history.update(
        images=seen_total,
        steps=step,
        epochs_run=seen_total / n,
        stopped="epochs" if stop is None else stopper.reason,
        checks=[list(c) for c in stopper.checks],
        validation_accuracy=None if stop is None else max(a for _, a in stopper.checks)
        if stop.patience is not None else stopper.checks[-1][1],
    )
    return history, taken


def _lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier at optimiser step ``step``: linear warm-up over ``warmup`` steps, then
    constant or a cosine decay to 0 at the epoch cap (``total`` steps). A stopping rule may end
    training anywhere on the way, which is why the decay is tied to the cap, not to the stop."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train(
    model: nn.Module,
    dataset: Any,
    augment: TransformationSet | None = None,
    epochs: int = 5,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = "data/models",
    progress: bool = True,
    task: str = "classify",
    stop: EarlyStop | None = None,
    warmup: int = 0,
    threads: int | None = None,
    channels_last: bool = False,
    snapshots: Any = (),
    schedule: str = "constant",
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy, or load it from the checkpoint cache.

    ``task="regress-transformation"`` trains the model to predict which transformation of
    ``augment`` was applied (the 6 entries of its 2×3 affine matrix, MSE loss): the set-up of
    Quiroga (CLEI 2021) for same-equivariance. The model must then output 6 values.

    Args:
        model: the classifier, already initialised by the caller; maps x [b, C, H, W] to logits
            [b, classes]. Its initial weights are part of the cache key.
        dataset: (image [C, H, W] float, label int) pairs; loaded into memory once. ``dataset.fill``
            (per-channel background value) is used when augmenting, else 0.
        augment: None, or a transformation set: every image of every batch gets one transformation
            drawn uniformly at random from it (``augment.apply_indexed``).
        epochs: passes over the data (>= 1). The data are reshuffled each epoch; the last batch
            may be smaller than ``batch_size``.
        seed: seeds the data order, the augmentation draws and the global RNG during training
            (dropout). The caller's global RNG state is restored afterwards.
        batch_size: images per optimiser step (>= 1).
        lr: Adam learning rate (> 0).
        weight_decay: Adam's L2 penalty (>= 0).
        device: where to train; None = the device of the model's parameters. A given device moves
            the model there (in place).
        cache_dir: folder of checkpoints, relative to the working directory; None disables the
            cache. The checkpoint is ``<cache_dir>/<paper_name>-<key[:16]>.pt``; when it exists the
            weights are loaded and no training happens.
        progress: show a tqdm progress bar (loss and running training accuracy).
        stop: an :class:`~tmlib.stopping.EarlyStop` rule (stop at a validation accuracy, or when it
            stops improving); ``epochs`` is then the cap. None: train all ``epochs``.
        warmup: optimiser steps of linear learning-rate warm-up (0: none).
        schedule: the learning rate after the warm-up: ``"constant"``, or ``"cosine"`` (decays to 0
            at the epoch cap).
        threads: CPU threads for training (None: torch's current setting). A fixed count makes the
            weights reproducible wherever the model is trained (the order of floating-point sums
            in a CPU kernel depends on the thread count).
        channels_last: train convolutions in channels-last memory format (faster on CPUs); the
            model is returned in the default format.
        snapshots: training-image counts at which to keep a copy of the weights (0 = the initial
            ones), saved in the checkpoint: ``model.training_snapshots`` {images: state_dict}.

    Returns:
        The same model object, in eval mode, with ``model.training_history`` set to a dict:
        ``loss`` (mean cross-entropy per epoch, nats), ``accuracy`` (training accuracy per epoch on
        the augmented batches, fraction in [0, 1]), ``seconds`` (wall time per epoch), ``images``
        (training images seen), ``epochs_run`` (images / training-set size), ``stopped``
        ("epochs", "target" or "patience"), ``checks`` ([images, validation accuracy] pairs),
        ``validation_accuracy`` (the last check's, or the best one's under a patience rule),
        ``cached`` (True when loaded), ``checkpoint`` (path or None) and ``key`` (see
        :func:`checkpoint_key`).

    Raises:
        TypeError / ValueError for invalid arguments, naming the argument.
        FloatingPointError when the loss becomes NaN or infinite (nothing is cached then).

    Same seed and same initial weights give bitwise identical weights on the same device and torch
    build (GPU kernels may add their own non-determinism).
    """
    epochs, seed, batch_size, lr, weight_decay = _check_hyperparameters(
        model, dataset, augment, epochs, seed, batch_size, lr, weight_decay
    )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"model must have trainable parameters, {type(model).__name__} has none")
    if task not in ("classify", "regress-transformation"):
        raise ValueError(f"task must be 'classify' or 'regress-transformation', got {task!r}")
    if task == "regress-transformation" and augment is None:
        raise ValueError("augment: task='regress-transformation' needs the transformation set to regress")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be None or a path, got {type(cache_dir).__name__}")
    if stop is not None and not isinstance(stop, EarlyStop):
        raise TypeError(f"stop must be None or a tmlib.stopping.EarlyStop, got {type(stop).__name__}")
    if stop is not None and task != "classify":
        raise ValueError("stop: early stopping uses classification accuracy; task must be 'classify'")
    warmup = _check_int("warmup", warmup, 0)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if threads is not None:
        threads = _check_int("threads", threads, 1)
    snapshots = tuple(_check_int("snapshots", s, 0) for s in snapshots)
    device = _resolve_device(model, device)

    x, y = _dataset_tensors(dataset)
    fill = _dataset_fill(dataset)
    if stop is not None:
        stop.prepare(augment, fill, _dataset_tensors)
    procedure = {"stop": None if stop is None else stop.fingerprint(), "warmup": warmup, "threads": threads,
                 "channels_last": channels_last, "snapshots": list(snapshots),
                 "schedule": None if schedule == "constant" else schedule}
    # The key is computed before training: it must describe the *initial* weights.
    config = _training_config(
        model, dataset, augment, epochs, seed, batch_size, lr, weight_decay, (x, y), task, procedure
    )
    config_json = _canonical_json(config)
    key = hashlib.sha256(config_json.encode()).hexdigest()
    path = None if cache_dir is None else Path(cache_dir) / f"{_paper_name(model)}-{key[:16]}.pt"

    model.to(device)
    cached = path is not None and path.exists()
    if cached:
        history, taken = _load_checkpoint(model, path, key)
    else:
        previous_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        try:
            history, taken = _fit(model, x, y, augment, fill, epochs, seed, batch_size, lr, weight_decay,
                                  device, progress, task, stop, warmup, channels_last, snapshots, schedule)
        finally:
            torch.set_num_threads(previous_threads)
            if channels_last:
                model.to(memory_format=torch.contiguous_format)
        history["threads"] = threads
        if path is not None:
            state = {
                k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                for k, v in model.state_dict().items()
            }
            payload = {"format": CHECKPOINT_FORMAT, "key": key, "config": config_json, "state_dict": state,
                       "history": history}
            if taken:
                payload["snapshots"] = taken
            _save_checkpoint(path, payload)
    model.eval()
    model.training_snapshots = taken
    model.training_history = {
        **history,
        "cached": cached,
        "checkpoint": None if path is None else str(path),
        "key": key,
    }
    return model


# ------------------------------------------------------------------------------------ evaluation


def accuracy(
    model: nn.Module,
    dataset: Any,
    transformations: TransformationSet | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    fill: float | tuple[float, ...] | None = None,
) -> float:
    """Fraction of correctly classified images, in [0, 1].

    Args:
        model: classifier x [b, C, H, W] → logits [b, classes]; evaluated in eval mode without
            gradients, and put back into its previous train/eval mode afterwards.
        dataset: (image [C, H, W], label) pairs.
        transformations: None for the images as they are; a transformation set to average over
            every image × every transformation (each transformed copy counts once).
        batch_size: images per forward pass, transformed copies included: with m transformations
            ``max(1, batch_size // m)`` original images are processed at a time.
        device: where to evaluate; None = the model's device. A given device moves the model there.
        fill: background value for transformations (number or one per channel); None =
            ``dataset.fill`` if present, else 0.
    """
    check_module(model)
    _check_dataset(dataset)
    _check_transformations("transformations", transformations)
    batch_size = _check_int("batch_size", batch_size, 1)
    device = _resolve_device(model, device)
    fill = _dataset_fill(dataset) if fill is None else fill
    m = 1 if transformations is None else len(transformations)
    chunk = max(1, batch_size // m)

    x, y = _dataset_tensors(dataset)
    model.to(device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            for start in range(0, len(x), chunk):
                xb, yb = x[start : start + chunk].to(device), y[start : start + chunk].to(device)
                if transformations is not None:
                    # [b, m, C, H, W] → [b·m, C, H, W], image-major: each label repeats m times.
                    xb = transformations.apply(xb, fill=fill).flatten(0, 1)
                    yb = yb.repeat_interleave(m)
                correct += (model(xb).argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    return correct.item() / (len(x) * m)
