"""What the notebooks write: CSVs with provenance, and ``figures/models.csv``, one row per trained
model used by the reproduction, with its accuracies and floor.

Every CSV carries the columns ``tmlib_version``, ``git_commit``, ``torch_version`` and ``profile``,
so a number in ``figures/`` can be traced to the code and settings that made it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..paths import project_root, resolve
from ..results import atomic_write

__all__ = ["FloorError", "check_floors", "model_rows", "models_markdown", "provenance", "record_models", "save_csv"]

MODELS_CSV = "models.csv"


class FloorError(AssertionError):
    """A model used by a notebook is below its accuracy floor: nothing may be concluded from it."""


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=project_root(), capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(profile: str) -> dict[str, str]:
    """tmlib version, git commit (short), torch version and profile of this run."""
    from .. import __version__

    return {"tmlib_version": __version__, "git_commit": _git_commit(), "torch_version": torch.__version__,
            "profile": profile}


def save_csv(frame: pd.DataFrame, path: str | os.PathLike, profile: str, index: bool = False,
             keep: bool = False) -> Path:
    """Write ``frame`` with the provenance columns, atomically, readable by everyone (0644).

    ``keep``: rows that already carry provenance (a table merged from several runs, such as
    ``models.csv`` or ``claims.csv``) keep theirs; only new rows get this run's."""
    out = frame.copy()
    for key, value in provenance(profile).items():
        out[key] = out[key].where(out[key].notna(), value) if keep and key in out else value
    path = resolve(path)

    def write(tmp: str) -> None:
        out.to_csv(tmp, index=index)
        os.chmod(tmp, 0o644)

    return atomic_write(path, write)


def model_rows(notebook: str, models: dict[str, nn.Module]) -> pd.DataFrame:
    """One row per trained model: what it is, how long it trained, its accuracies and floor."""
    rows = []
    for label, model in models.items():
        spec = getattr(model, "spec", None)
        if spec is None or not spec.trained:
            continue
        history = getattr(model, "training_history", {}) or {}
        evaluation = getattr(model, "evaluation", None) or {}
        rows.append({
            "notebook": notebook,
            "model": label,
            "architecture": spec.architecture,
            "dataset": spec.dataset,
            "augmentation": spec.augment or "none",
            "task": spec.task,
            "init_seed": spec.init_seed,
            "train_seed": spec.train_seed,
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": round(float(history.get("epochs_run", len(history.get("loss", [])))), 3),
            "epoch_cap": spec.epochs,
            "training_images": history.get("images"),
            "stopped": history.get("stopped"),
            "wall_time_s": round(float(sum(history.get("seconds", []))), 1),
            "validation_accuracy": history.get("validation_accuracy"),
            "metric": evaluation.get("metric"),
            "accuracy_upright": evaluation.get("upright"),
            "accuracy_transformed": evaluation.get("transformed"),
            "accuracy": evaluation.get("own"),  # the one the floor applies to (its own distribution)
            "floor": evaluation.get("floor"),
            "met": evaluation.get("met"),
            "n_test": evaluation.get("n_test"),
            "checkpoint": Path(history["checkpoint"]).name if history.get("checkpoint") else None,
        })
    return pd.DataFrame(rows)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path``: notebooks running at the same time update it in turn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_models(notebook: str, models: dict[str, nn.Module], figures_dir: str | os.PathLike, profile: str) -> Path:
    """Replace ``notebook``'s rows of ``<figures_dir>/models.csv`` with ``models``' rows."""
    path = resolve(figures_dir) / MODELS_CSV
    rows = model_rows(notebook, models)
    with _locked(path):
        if path.exists():
            old = pd.read_csv(path)
            old = old[old["notebook"] != notebook]
            rows = pd.concat([old, rows], ignore_index=True) if len(old) else rows
        rows = rows.sort_values(["notebook", "model"], kind="stable").reset_index(drop=True)
        return save_csv(rows, path, profile, keep=True)


def check_floors(models: dict[str, nn.Module], enforce: bool = True) -> pd.DataFrame:
    """A table of every trained model's accuracy against its floor; with ``enforce``, a
    :class:`FloorError` naming each model below its floor, its accuracy and the floor."""
    table = model_rows("", models)
    if table.empty:
        return table
    table = table[["model", "metric", "accuracy", "accuracy_upright", "accuracy_transformed", "floor", "met", "epochs",
                   "stopped"]].set_index("model")
    missed = table[table["met"] == False]  # noqa: E712 - None (no floor) is neither
    if enforce and len(missed):
        lines = [f"{label}: {row['metric']} {_own(row):.4f} against its floor {row['floor']}"
                 for label, row in missed.iterrows()]
        raise FloorError("models below their floor (nothing may be concluded from them):\n  " + "\n  ".join(lines))
    return table


def _own(row: Any) -> float:
    """The accuracy (or error, for regressors) the model's floor applies to."""
    if "accuracy" in row and pd.notna(row["accuracy"]):
        return row["accuracy"]
    return row["accuracy_transformed"] if pd.notna(row["accuracy_transformed"]) else row["accuracy_upright"]


def models_markdown(figures_dir: str | os.PathLike = "figures") -> str:
    """The README's table of the models' accuracies, from ``models.csv``: one row per (architecture,
    dataset, augmentation, task) with the number of distinct models, the range of the accuracy the
    floor applies to, the floor and how many met it."""
    frame = pd.read_csv(resolve(figures_dir) / MODELS_CSV).drop_duplicates("checkpoint")
    own = frame.apply(_own, axis=1)
    frame = frame.assign(own=own)
    lines = ["| architecture | dataset | augmentation | task | models | accuracy (metric of the floor) | floor | met |",
             "|---|---|---|---|---|---|---|---|"]
    for (arch, dataset, augment, task), part in frame.groupby(["architecture", "dataset", "augmentation", "task"],
                                                              sort=False):
        met = part["met"].astype(str).str.lower().eq("true").sum()
        floor = part["floor"].dropna()
        low, high = part["own"].min(), part["own"].max()
        accuracy = f"{low:.3f}" if low == high else f"{low:.3f}–{high:.3f}"
        metric = str(part["metric"].iloc[0]).replace("|", "\\|")
        lines.append(f"| {arch} | {dataset} | {augment} | {task} | {len(part)} | {accuracy} ({metric}) | "
                     f"{floor.iloc[0] if len(floor) else '—'} | {met}/{len(part)} |")
    return "\n".join(lines)
