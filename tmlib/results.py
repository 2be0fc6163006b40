"""MeasureResult: per-layer arrays of one measure, with layer means, uncertainty, a tidy frame and save/load.

One result per ``.npz`` (:meth:`MeasureResult.save`), or several in one (:func:`save_results`,
:func:`load_results`); :meth:`MeasureResult.load` reads both kinds.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import stats
from .files import atomic_write

__all__ = ["MeasureResult", "NotAResultFileError", "atomic_write", "finite_mean", "load_results", "save_results"]

_META_COLUMNS = ("measure", "model", "dataset", "transformation")
_FORMAT = 2  # 1: values + metadata; 2: + layer metadata, jackknife replicates, per-class results
_RESULTS_FORMAT = 3  # several results in one file: {"format": 3, "results": [{"name": ..., **header}, ...]}


class NotAResultFileError(ValueError):
    """The file is not a MeasureResult written by :meth:`MeasureResult.save` (or it is damaged)."""


def finite_mean(values: np.ndarray) -> float:
    """Mean over the finite entries (NaN if there are none); the layer-mean convention of [Q23]."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


class MeasureResult(Mapping):
    """The values of one measure for every observed layer.

    ``result[layer]`` is a float64 numpy array shaped like the activation ([C, H, W] or [F]) in
    element mode, [C] in channel mode. Layers keep the model's forward order.

    Attributes:
        measure: the result's name (the key of ``evaluate``'s dict).
        metadata: what the values mean (measure, mode, stat, n, m, model, dataset, transformation, …).
        layer_metadata: ``{layer: {key: scalar}}``, per-layer facts computed with the values (e.g.
            G-EED's raw value and baseline, ANOVA's rejection fraction); joined into
            :meth:`to_frame` as columns. Empty for measures without any.
        replicates: None, or (``evaluate(..., blocks=K)``) a DataFrame K × layers: row k holds the
            layer means computed from all sample blocks but block k (delete-one-block jackknife).
        per_class: ``{label: MeasureResult}`` for results of ``evaluate_stratified`` (each class
            measured alone), else empty.
    """

    def __init__(
        self,
        measure: str,
        values: Mapping[str, np.ndarray],
        metadata: Mapping[str, Any] | None = None,
        layer_metadata: Mapping[str, Mapping[str, Any]] | None = None,
        replicates: pd.DataFrame | None = None,
        per_class: Mapping[Any, MeasureResult] | None = None,
    ):
        self.measure = measure
        self.values = {name: np.asarray(v) for name, v in values.items()}
        self.metadata = dict(metadata or {})
        self.metadata.setdefault("measure", measure)
        self.layer_metadata = {name: dict(v) for name, v in (layer_metadata or {}).items()}
        self.replicates = replicates
        self.per_class = dict(per_class or {})

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
        extra = f", {len(self.replicates)} replicates" if self.replicates is not None else ""
        return f"MeasureResult({self.measure!r}, {len(self)} layers{extra})"

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

    # ------------------------------------------------------------------ uncertainty
    def _require_replicates(self) -> pd.DataFrame:
        if self.replicates is None:
            raise ValueError(
                f"{self.measure!r} has no jackknife replicates: measure it with evaluate(..., blocks=K)"
            )
        return self.replicates

    def layer_stderr(self) -> pd.Series:
        """Jackknife standard error of each layer mean, sqrt((K−1)/K · Σ_k (θ_k − θ̄)²) over the K
        leave-one-block-out layer means (:func:`tmlib.stats.jackknife_se`)."""
        return stats.jackknife_se(self._require_replicates()[self.layer_names]).rename_axis("layer")

    def layer_intervals(self, confidence: float = 0.95) -> pd.DataFrame:
        """One row per layer: layer, value (the full-data layer mean), se, low, high — the
        Student-t interval value ± t_{K−1, (1+confidence)/2} · se."""
        se = self.layer_stderr()
        value = self.layer_means()
        low, high = stats.t_interval(value.to_numpy(), se.to_numpy(), len(self.replicates) - 1, confidence)
        return pd.DataFrame({"layer": self.layer_names, "value": value.to_numpy(), "se": se.to_numpy(),
                             "low": low, "high": high})

    # ------------------------------------------------------------------ frames
    def to_frame(self) -> pd.DataFrame:
        """Tidy frame, one row per layer: layer, index, depth (0…1 through the network), value,
        then se, low, high (95 % t interval) when the result has replicates, the metadata columns
        measure, model, dataset, transformation, and one column per key of ``layer_metadata``."""
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
        if self.replicates is not None:
            intervals = self.layer_intervals()
            for column in ("se", "low", "high"):
                frame[column] = intervals[column].to_numpy()
        for column in _META_COLUMNS:
            frame[column] = self.metadata.get(column)
        keys = list(dict.fromkeys(k for layer in self.layer_names for k in self.layer_metadata.get(layer, {})))
        for key in keys:
            frame[key] = [self.layer_metadata.get(layer, {}).get(key) for layer in self.layer_names]
        return frame

    def per_class_frame(self) -> pd.DataFrame:
        """The tidy frames of :attr:`per_class` stacked, with a column ``class`` (the label)."""
        if not self.per_class:
            raise ValueError(f"{self.measure!r} has no per-class results (they come from evaluate_stratified)")
        frames = [r.to_frame().assign(**{"class": label}) for label, r in self.per_class.items()]
        return pd.concat(frames, ignore_index=True)

    # ------------------------------------------------------------------ persistence
    def _payload(self, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"{prefix}layer_{i}": v for i, v in enumerate(self.values.values())}
        header: dict[str, Any] = {"measure": self.measure, "layers": self.layer_names, "metadata": self.metadata,
                                  "layer_metadata": self.layer_metadata}
        if self.replicates is not None:
            arrays[f"{prefix}replicates"] = self.replicates[self.layer_names].to_numpy(dtype=np.float64)
        classes = []
        for i, (label, result) in enumerate(self.per_class.items()):
            sub_arrays, sub_header = result._payload(f"{prefix}class{i}_")
            arrays.update(sub_arrays)
            classes.append({"label": label, **sub_header})
        header["per_class"] = classes
        return arrays, header

    @classmethod
    def _from_payload(cls, data: Any, header: dict[str, Any], prefix: str) -> MeasureResult:
        layers = header["layers"]
        values = {name: data[f"{prefix}layer_{i}"] for i, name in enumerate(layers)}
        replicates = None
        if f"{prefix}replicates" in data:
            replicates = pd.DataFrame(data[f"{prefix}replicates"], columns=layers).rename_axis("block")
        per_class = {
            entry["label"]: cls._from_payload(data, entry, f"{prefix}class{i}_")
            for i, entry in enumerate(header.get("per_class", []))
        }
        return cls(header["measure"], values, header["metadata"], header.get("layer_metadata"), replicates, per_class)

    def save(self, path: str | os.PathLike) -> Path:
        """Write to a ``.npz`` file (arrays + JSON header: metadata, layer metadata, replicates and
        per-class results included), atomically (fsync'ed, mode 0644)."""
        arrays, header = self._payload("")
        header["format"] = _FORMAT
        return _write_npz(path, header, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, measure: str | None = None) -> MeasureResult:
        """Read a file written by :meth:`save`, or one result of a file written by
        :func:`save_results`: the only one, or the one named ``measure`` (a ValueError listing the
        names when ``measure`` is None and the file holds several, or when no result has that name).
        :class:`NotAResultFileError` (a ValueError) for anything else, e.g. a damaged or foreign file."""
        results = cls._load_all(path)
        names = ", ".join(map(repr, results))
        if measure is None:
            if len(results) == 1:
                return next(iter(results.values()))
            raise ValueError(f"{path} holds {len(results)} results ({names}): pass measure= one of them")
        if measure not in results:
            raise ValueError(f"{path} holds no result {measure!r}; its results: {names}")
        return results[measure]

    @classmethod
    def _load_all(cls, path: str | os.PathLike) -> dict[str, MeasureResult]:
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["__header__"]))
                if "results" not in header:  # one result (MeasureResult.save)
                    result = cls._from_payload(data, header, "")
                    return {result.measure: result}
                return {entry["name"]: cls._from_payload(data, entry, f"result{i}_")
                        for i, entry in enumerate(header["results"])}
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError, TypeError) as error:
            raise NotAResultFileError(
                f"{path} is not a tmlib MeasureResult file (written by MeasureResult.save or save_results), "
                f"or it is damaged: {type(error).__name__}"
            ) from None


def _write_npz(path: str | os.PathLike, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """The arrays and the JSON header in one ``.npz``, atomically (fsync'ed, mode 0644)."""
    text = json.dumps(header, default=str)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, __header__=np.array(text), **arrays)

    return atomic_write(path, write)


def save_results(results: Mapping[str, MeasureResult], path: str | os.PathLike) -> Path:
    """Write every result of ``{name: MeasureResult}`` (``evaluate``'s dict) into one ``.npz``,
    atomically (fsync'ed, mode 0644); each keeps its metadata, layer metadata, replicates and
    per-class results. Read it back with :func:`load_results`, or one result with
    :meth:`MeasureResult.load` ``(path, measure=name)``."""
    if not results:
        raise ValueError("results: nothing to save (an empty dict)")
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for i, (name, result) in enumerate(results.items()):
        if not isinstance(result, MeasureResult):
            raise TypeError(f"results[{name!r}] must be a MeasureResult, got {type(result).__name__}")
        sub_arrays, header = result._payload(f"result{i}_")
        arrays.update(sub_arrays)
        entries.append({"name": str(name), **header})
    return _write_npz(path, {"format": _RESULTS_FORMAT, "results": entries}, arrays)


def load_results(path: str | os.PathLike) -> dict[str, MeasureResult]:
    """``{name: MeasureResult}`` from a file written by :func:`save_results`, in the order saved; a
    file written by :meth:`MeasureResult.save` gives ``{result.measure: result}``."""
    return MeasureResult._load_all(path)
