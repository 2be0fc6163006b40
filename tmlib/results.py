"""MeasureResult: per-layer arrays of one measure, with layer means, a tidy frame and save/load."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MeasureResult", "atomic_write", "finite_mean"]

_META_COLUMNS = ("measure", "model", "dataset", "transformation")


def finite_mean(values: np.ndarray) -> float:
    """Mean over the finite entries (NaN if there are none); the layer-mean convention of [Q23]."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


class MeasureResult(Mapping):
    """The values of one measure for every observed layer.

    ``result[layer]`` is a float64 numpy array shaped like the activation ([C, H, W] or [F]) in
    element mode, [C] in channel mode. Layers keep the model's forward order. ``metadata`` holds
    what the values mean (measure, mode, stat, n, m, model, dataset, transformation, …).
    """

    def __init__(self, measure: str, values: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None = None):
        self.measure = measure
        self.values = {name: np.asarray(v) for name, v in values.items()}
        self.metadata = dict(metadata or {})
        self.metadata.setdefault("measure", measure)

    # Mapping protocol: result[layer], len(result), iteration over layer names.
    def __getitem__(self, layer: str) -> np.ndarray:
        try:
            return self.values[layer]
        except KeyError:
            raise KeyError(f"no layer {layer!r} in this result; layers: {self.layer_names}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"MeasureResult({self.measure!r}, {len(self)} layers)"

    @property
    def layer_names(self) -> list[str]:
        return list(self.values)

    def layer_means(self) -> pd.Series:
        """Mean over finite values of each layer, indexed by layer name in forward order."""
        return pd.Series(
            {name: finite_mean(v) for name, v in self.values.items()}, name=self.measure, dtype=float
        ).rename_axis("layer")

    def nonfinite_counts(self) -> pd.Series:
        """How many values per layer were left out of the mean (inf from SV=0 and TV>0, or NaN)."""
        return pd.Series({n: int((~np.isfinite(v)).sum()) for n, v in self.values.items()}, dtype=int)

    def to_frame(self) -> pd.DataFrame:
        """Tidy frame, one row per layer: layer, index, depth (0…1 through the network), value,
        plus the metadata columns measure, model, dataset, transformation."""
        means = self.layer_means()
        count = len(means)
        frame = pd.DataFrame(
            {
                "layer": means.index.to_list(),
                "index": np.arange(count),
                "depth": np.arange(count) / max(count - 1, 1),
                "value": means.to_numpy(),
            }
        )
        for column in _META_COLUMNS:
            frame[column] = self.metadata.get(column)
        return frame

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write to a ``.npz`` file (arrays + JSON metadata), atomically."""
        arrays = {f"layer_{i}": v for i, v in enumerate(self.values.values())}
        header = json.dumps(
            {"measure": self.measure, "layers": self.layer_names, "metadata": self.metadata}, default=str
        )

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, __header__=np.array(header), **arrays)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MeasureResult:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["__header__"]))
            values = {name: data[f"layer_{i}"] for i, name in enumerate(header["layers"])}
        return cls(header["measure"], values, header["metadata"])
