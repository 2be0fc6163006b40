"""Writing files so that a reader never sees half of one: the one atomic-write helper of tmlib."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_save", "atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], mode: int = 0o644) -> Path:
    """Call ``write(tmp_path)``, flush it to disk, then rename it onto ``path``.

    The temporary file lives beside ``path`` (so the rename is atomic), is fsync'ed before the
    rename and gets ``mode`` (default 0644, an ordinary shared file: ``mkstemp`` would leave 0600);
    the folder is fsync'ed after it, so the new name survives a crash too. Whatever happens in
    ``write`` (an exception, Ctrl-C), the temporary file is removed and an existing ``path`` is
    left untouched. Returns ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:  # whatever wrote the file, its bytes reach the disk first
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsync'ed
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


def atomic_save(path: str | os.PathLike, obj: object) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write` (into an open binary file)."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    return atomic_write(path, write)
