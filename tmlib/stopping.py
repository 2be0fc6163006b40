"""When to stop training: at an accuracy floor, or when validation accuracy stops improving.

:class:`EarlyStop` is handed to :func:`tmlib.train.train`. Every ``check_every`` training images it
measures the accuracy on a held-out validation set *under the training distribution* (each
validation image transformed once by a member of the augmentation set, drawn with a fixed seed, so
every check sees the same images), and training stops

* as soon as that accuracy reaches ``target`` (a model trained "to its floor"), or
* when it has not improved for ``patience`` checks in a row; the best weights seen are restored
  (a model trained "until its validation accuracy stops improving").

The epoch count given to ``train`` stays the cap. The rule is part of the checkpoint key
(:meth:`EarlyStop.fingerprint`): the same rule, data and seed give the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["EarlyStop"]


def _tensor_sha(tensor: torch.Tensor) -> str:
    t = tensor.detach().cpu().contiguous()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()
                          ).hexdigest()


@dataclass
class EarlyStop:
    """A stopping rule evaluated on held-out data during training.

    Args:
        validation: (image, label) pairs not used for training (e.g. ``tmlib.data.holdout``).
        target: stop once the validation accuracy is ≥ this fraction (None: no target).
        patience: stop after this many checks without a new best validation accuracy, and keep the
            best weights (None: never).
        check_every: training images between two checks (≥ 1).
        seed: seeds the transformation drawn for each validation image.
        batch_size: images per forward of a check.
    """

    validation: Any
    target: float | None = None
    patience: int | None = None
    check_every: int = 10_000
    seed: int = 0
    batch_size: int = 1000
    _x: torch.Tensor | None = field(default=None, init=False, repr=False)
    _y: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.target is None and self.patience is None:
            raise ValueError("EarlyStop needs a target accuracy, a patience, or both; got neither")
        if self.target is not None and not (isinstance(self.target, (int, float)) and 0 < self.target <= 1):
            raise ValueError(f"target must be an accuracy in (0, 1], got {self.target!r}")
        for name in ("patience", "check_every", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (hasattr(self.validation, "__len__") and len(self.validation) > 0):
            raise ValueError("validation must be a non-empty dataset of (image, label) pairs")

    # ------------------------------------------------------------------ set-up
    def prepare(self, augment: Any, fill: Any, tensors: Any) -> None:
        """Transform each validation image once by a member of ``augment`` (fixed draws).

        ``tensors(dataset) -> (x, y)`` is the caller's dataset adapter."""
        x, y = tensors(self.validation)
        if augment is not None:
            g = torch.Generator().manual_seed(self.seed)
            choice = torch.randint(len(augment), (len(x),), generator=g)
            x = torch.cat([augment.apply_indexed(x[i:i + 4096], choice[i:i + 4096], fill=fill)
                           for i in range(0, len(x), 4096)])
        self._x, self._y = x, y

    def fingerprint(self) -> dict[str, Any]:
        """What determines the stopping decisions (for the checkpoint key)."""
        if self._x is None:
            raise RuntimeError("EarlyStop.prepare must run before fingerprint")
        return {"target": self.target, "patience": self.patience, "check_every": self.check_every,
                "seed": self.seed, "validation_images": _tensor_sha(self._x), "validation_labels": _tensor_sha(self._y),
                "rule": "stop at target or after patience checks without a new best (best restored)"}

    # ------------------------------------------------------------------ during training
    def score(self, model: nn.Module, device: torch.device, channels_last: bool = False) -> float:
        """Validation accuracy of ``model`` (restored to train mode afterwards)."""
        was_training = model.training
        model.eval()
        correct = 0
        try:
            with torch.no_grad():
                for i in range(0, len(self._x), self.batch_size):
                    xb = self._x[i:i + self.batch_size].to(device)
                    if channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    correct += int((model(xb).argmax(dim=1).cpu() == self._y[i:i + self.batch_size]).sum())
        finally:
            model.train(was_training)
        return correct / len(self._x)


class StopState:
    """Book-keeping of one training run under an :class:`EarlyStop` rule."""

    def __init__(self, rule: EarlyStop | None):
        self.rule = rule
        self.checks: list[tuple[int, float]] = []  # (training images seen, validation accuracy)
        self.best = -math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.since_best = 0
        self.reason: str | None = None
        self.next_check = rule.check_every if rule is not None else math.inf

    def due(self, seen: int) -> bool:
        return seen >= self.next_check

    def check(self, model: nn.Module, seen: int, device: torch.device, channels_last: bool) -> bool:
        """Score the model now; True when training must stop."""
        rule = self.rule
        self.next_check = seen + rule.check_every
        accuracy = rule.score(model, device, channels_last)
        self.checks.append((seen, accuracy))
        if accuracy > self.best:
            self.best, self.since_best = accuracy, 0
            if rule.patience is not None:
                self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.since_best += 1
        if rule.target is not None and accuracy >= rule.target:
            self.reason = "target"
        elif rule.patience is not None and self.since_best >= rule.patience:
            self.reason = "patience"
        return self.reason is not None

    def finish(self, model: nn.Module) -> None:
        """Restore the best weights of a patience rule."""
        if self.rule is not None and self.rule.patience is not None and self.best_state is not None:
            model.load_state_dict(self.best_state)
