"""Argument checks with one meaning each: the error names the argument and what was expected.

A value of the wrong *type* is a ``TypeError``; a value of the right type outside its range is a
``ValueError`` (Python's own convention). ``bool`` is never accepted as an integer or a number.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["check_images", "check_int", "check_module", "check_real", "check_transformation_set"]


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int; TypeError unless it is an integer (not a bool), ValueError outside
    [minimum, maximum]."""
    bounds = " ".join(p for p in (f">= {minimum}" if minimum is not None else "",
                                  f"<= {maximum}" if maximum is not None else "") if p)
    expected = f"an integer {bounds}".rstrip()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a finite float; TypeError unless it is a real number (not a bool), ValueError
    if negative (or zero with ``positive``)."""
    expected = "a finite number > 0" if positive else "a finite number >= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def check_images(x: Any, name: str = "x", allow_empty: bool = True, batch: str = "b") -> torch.Tensor:
    """A floating point image batch [b, C, H, W]: TypeError for another type or dtype, ValueError
    for another shape (or, without ``allow_empty``, an empty batch). ``batch`` names the leading
    dimension in the message (``"n"`` for all the samples)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{batch}, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a tensor of shape [{batch}, C, H, W] (4-D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
    if not allow_empty and x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, got batch size 0")
    return x


def check_module(model: Any, name: str = "model") -> None:
    """TypeError unless ``model`` is a ``torch.nn.Module``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")


def check_transformation_set(ts: Any, name: str = "ts") -> None:
    """TypeError unless ``ts`` has what a pass uses of a transformation set: ``apply`` and ``len``."""
    if not hasattr(ts, "apply") or not hasattr(ts, "__len__"):
        raise TypeError(f"{name} must be a transformation set (tmlib.transforms), got {type(ts).__name__}")
