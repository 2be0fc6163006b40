"""What every reproduction notebook does around its science, in one object.

``nb = ex.Notebook("01_validation", profile, ...)`` replaces the settings cell each notebook used
to repeat: it builds the notebook's design, trains (or loads) its models and checks their floors,
records them in ``figures/models.csv``, runs the measurements, writes CSVs (with provenance) and
figures into ``figures/``, collects the claims, and reports the key number for the summary table.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..allocator import keep_freed_blocks
from ..paths import resolve
from .claims import Claims
from .design import Design
from .designs import design as make_design
from .records import check_floors, record_models, save_csv

__all__ = ["Notebook"]


class Notebook:
    """The bookkeeping of one reproduction notebook.

    Args:
        name: the notebook's name, e.g. ``"01_validation"``.
        profile: ``"quick"`` or ``"paper"``.
        figures_dir, results_dir, data_root, models_dir: folders (relative to the project root).
        check_claims: assert floors and claims (the test suite runs tiny models with False).
        progress: progress bars.
        device: where models train and are measured (None: CUDA when available, else the CPU).
    """

    def __init__(self, name: str, profile: str = "quick", figures_dir: str = "figures", results_dir: str = "results",
                 data_root: str = "data", models_dir: str = "data/models", check_claims: bool = True,
                 progress: bool = True, device: str | torch.device | None = None):
        self.name, self.profile = name, profile
        self.figures = resolve(figures_dir)
        self.figures.mkdir(parents=True, exist_ok=True)
        self.results_dir = str(resolve(results_dir))
        self.data_root, self.models_dir = data_root, models_dir
        self.check_claims, self.progress = check_claims, progress
        self.device = device
        self.claims = Claims(name, profile, self.figures, enforce=check_claims)
        keep_freed_blocks()  # the kernel is the notebook's: its passes reuse their blocks (tmlib.allocator)

    # ------------------------------------------------------------------ experiment
    def design(self, **parameters: Any) -> Design:
        return make_design(self.name, self.profile, **parameters)

    def train(self, design: Design) -> dict[str, nn.Module]:
        """Train or load every model; check the floors (raising with check_claims) and record the
        trained ones in ``figures/models.csv``. Shows the floor table."""
        trained = design.train(self.data_root, self.models_dir, self.progress, self.device)
        table = check_floors(trained, enforce=self.check_claims)
        record_models(self.name, trained, self.figures, self.profile)
        self.floors = table
        return trained

    def measure(self, design: Design, trained: dict[str, nn.Module], keys: Any = None) -> dict:
        return design.measure(trained, self.data_root, self.progress, keys)

    # ------------------------------------------------------------------ outputs
    # No return value: a cell that ends with a save shows the figure or table, not "PosixPath(…)".
    def save_csv(self, frame: pd.DataFrame, filename: str) -> None:
        save_csv(frame, self.figures / filename, self.profile)

    def save_figure(self, fig: Any, filename: str) -> None:
        from ..plots import save_figure

        save_figure(fig, self.figures / filename)

    def finish(self, key: str, value: Any) -> pd.DataFrame:
        """Report the key number (summary table), record and assert the claims; returns the claims."""
        from ..reproduce import report

        report(self.name, key, value, results_dir=self.results_dir, profile=self.profile)
        return self.claims.finish()

    def __repr__(self) -> str:
        return f"Notebook({self.name!r}, profile={self.profile!r}, figures={os.fspath(self.figures)!r})"
