"""The design of every reproduction notebook: ``design(notebook, profile, **parameters)``.

A notebook calls ``ex.design("01_validation", profile, **its parameters)`` and runs what it gets;
``python -m tmlib.reproduce --plan`` and the reproduction's training stage call the same function
with the parameters the runner passes, so the plan and the run agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..design import Design
from . import kvinge, lie, measurement, quiroga

__all__ = ["DESIGNS", "design"]

DESIGNS: dict[str, Callable[..., Design]] = {
    "00_quickstart": quiroga.quickstart,
    "01_validation": quiroga.validation,
    "02_random_init": quiroga.stability,
    "03_dataset_transformation": quiroga.sensitivity,
    "04_model_comparison": quiroga.model_comparison,
    "06_architecture": quiroga.architecture,
    "05_sample_size": measurement.sample_size,
    "07_measure_comparison": measurement.measure_comparison,
    "08_same_equivariance": measurement.same_equivariance,
    "09_kvinge": kvinge.kvinge,
    "12_explorer": quiroga.explorer,
    "10_liegg": lie.liegg,
    "11_lie_derivative": lie.lie_derivative,
}


def design(notebook: str, profile: str = "quick", **parameters: Any) -> Design:
    """The :class:`~tmlib.experiments.design.Design` of ``notebook`` for ``profile``.

    ``parameters`` are the notebook's own (None means "the profile's value"); the runner's
    bookkeeping parameters (``data_root``, ``figures_dir``, ``check_claims`` …) are ignored."""
    if notebook not in DESIGNS:
        raise ValueError(f"notebook must be one of {sorted(DESIGNS)}, got {notebook!r}")
    return DESIGNS[notebook](profile, **parameters)
