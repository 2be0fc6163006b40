"""``device=`` with one meaning everywhere in tmlib: where the work runs; the model is moved there.

:func:`resolve_device` turns the argument into a ``torch.device`` (None = the model's own device),
and refuses, naming the argument, devices that cannot run the work: CUDA on a machine without it,
an index beyond the GPUs present, ``meta`` (no data). :func:`placed` moves a model for the
duration of a call and back afterwards (``evaluate``); training moves it for good (``train``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["model_device", "on_model_device", "placed", "resolve_device"]


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model without either."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def on_model_device(model: object, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the device of ``model``'s parameters (a model trained on a GPU is measured there);
    unchanged for a plain function or a model without parameters."""
    device = model_device(model) if isinstance(model, nn.Module) else None
    return x if device is None else x.to(device)


def resolve_device(device: Any, model: nn.Module | None = None, x: Any = None,
                   argument: str = "device") -> torch.device:
    """The device that ``device=`` designates.

    None means the model's device, else x's device (a tensor), else the CPU. A CUDA device
    without an index means the current one (``cuda:0`` unless changed). Raises ValueError naming
    ``argument`` for strings torch does not know, CUDA on a machine without it (or an index
    beyond the GPUs present) and the ``meta`` device.
    """
    if device is None:
        found = model_device(model) if model is not None else None
        if found is not None:
            return found
        return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"{argument} must be None or a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from error
    if device.type == "meta":
        raise ValueError(f"{argument}={str(device)!r}: the meta device holds no data; use 'cpu', 'cuda' or None")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{argument}={str(device)!r}: CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use device='cpu' or None"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{argument}={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device, argument: str = "device") -> Iterator[nn.Module]:
    """Inside the block the model lives on ``device``; afterwards it is back where it was.

    A model whose parameters and buffers sit on several devices is left alone if they are all
    on ``device`` already, else refused (moving it would lose its placement)."""
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if not devices or devices == {device}:
        yield model
        return
    if len(devices) > 1:
        raise ValueError(
            f"{argument}: the model's tensors are on several devices ({sorted(map(str, devices))}); "
            f"pass {argument}=None to measure it where it is"
        )
    (home,) = devices
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)
