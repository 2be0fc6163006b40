"""Where the project's folders are, whether code runs from the repo root or from notebooks/."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["project_root", "resolve"]


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) holding
    tmlib's ``pyproject.toml``; the working directory itself if there is none (an installed tmlib)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "tmlib").is_dir():
            return folder
    return here


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path: relative paths are taken from the project root (so ``"data"`` means the
    same folder in JupyterLab, where notebooks run inside notebooks/, and in batch runs)."""
    path = Path(path)
    return path if path.is_absolute() else project_root() / path
