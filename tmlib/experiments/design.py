"""A notebook's experiment as data: the models it trains and the measurements it makes.

Each reproduction notebook asks :mod:`tmlib.experiments.designs` for its :class:`Design` (one
library call replaces the settings cell every notebook used to repeat). The same design answers
``python -m tmlib.reproduce --plan`` (what would be trained and measured, without running) and
``make reproduce``'s training stage (every model of every notebook trained first, in parallel
processes), so what a notebook runs and what the plan says cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from .. import transforms
from ..measures.base import Measure
from ..results import MeasureResult
from .measuring import measure, variance_measures
from .profiles import measurement_set
from .zoo import ModelSpec, build_model, fine_tuned_model, trained_model

__all__ = ["Design", "Measurement"]


@dataclass
class Measurement:
    """One pass of ``evaluate``: ``measures`` of model ``model`` (a label of the design) on
    ``n_samples`` stratified test images of ``dataset`` under ``transformation``."""

    model: str
    dataset: str
    transformation: str | transforms.TransformationSet
    n_samples: int
    measures: Callable[[nn.Module, transforms.TransformationSet], list[Measure]] | None = None
    blocks: int | None = None
    seed: int = 0
    stratified: bool = True  # class-balanced test subset (False: a uniform random one, as in 2019)
    options: dict = field(default_factory=dict)  # more arguments of evaluate

    def transformation_set(self) -> transforms.TransformationSet:
        t = self.transformation
        return measurement_set(t) if isinstance(t, str) else t

    def transformation_name(self) -> str:
        t = self.transformation
        return t if isinstance(t, str) else getattr(t, "name", type(t).__name__)


@dataclass
class Design:
    """What a notebook trains (``models``: label → spec; ``pretrained``: label → (pretrained spec,
    spec) for fine-tuned models) and measures (``measurements``: key → :class:`Measurement`)."""

    notebook: str
    settings: dict[str, Any]
    models: dict[str, ModelSpec] = field(default_factory=dict)
    pretrained: dict[str, tuple[ModelSpec, ModelSpec]] = field(default_factory=dict)
    measurements: dict[Any, Measurement] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # what could not run here, and why

    # ------------------------------------------------------------------ running
    def train(self, data_root: str = "data", models_dir: str = "data/models", progress: bool = True,
              device: str | torch.device | None = None) -> dict[str, nn.Module]:
        """Every model of the design, trained or loaded from the cache (eval mode)."""
        n_test = self.settings.get("n_test")
        out = {}
        for label, spec in self.models.items():
            out[label] = trained_model(spec, data_root, models_dir, progress, device, n_test=n_test)
        for label, (source, spec) in self.pretrained.items():
            out[label] = fine_tuned_model(source, spec, data_root, models_dir, progress, device, n_test=n_test)
        return out

    def measure(self, trained: dict[str, nn.Module], data_root: str = "data", progress: bool = True,
                keys: Any = None) -> dict[Any, dict[str, MeasureResult]]:
        """Run the measurements (all, or ``keys``) on the trained models: key → results."""
        out = {}
        for key, mm in self.measurements.items():
            if keys is not None and key not in keys:
                continue
            model = trained[mm.model]
            ts = mm.transformation_set()
            measures = mm.measures(model, ts) if mm.measures is not None else variance_measures()
            out[key] = measure(model, mm.dataset, ts, mm.n_samples, measures=measures, data_root=data_root,
                               seed=mm.seed, progress=progress, blocks=mm.blocks, stratified=mm.stratified,
                               **mm.options)
        return out

    def specs(self) -> list[ModelSpec]:
        """Every trained spec the design needs (fine-tuning sources included), without duplicates."""
        seen: dict[ModelSpec, None] = {}
        for spec in self.models.values():
            if spec.trained:
                seen.setdefault(spec)
        for source, _fine_tuned in self.pretrained.values():  # fine-tuned by the notebook itself
            seen.setdefault(source)
        return list(seen)

    # ------------------------------------------------------------------ the plan
    def plan(self, data_root: str = "data") -> dict[str, pd.DataFrame]:
        """Without training or measuring: the models to train (images × epoch cap) and the passes
        to run (forwards, peak accumulator memory, estimated from each layer's size)."""
        from .. import data

        train_rows = []
        for label, spec in list(self.models.items()) + [(k, s) for k, (_, s) in self.pretrained.items()]:
            if not spec.trained:
                continue
            n = spec.n_train if spec.n_train is not None else _train_size(data, spec.dataset) - spec.n_validation
            train_rows.append({"model": label, "architecture": spec.architecture, "dataset": spec.dataset,
                               "augment": spec.augment or "none", "seed": spec.init_seed, "images": n,
                               "epoch cap": spec.epochs, "stop": spec.stop or "all epochs",
                               "at most (images)": n * spec.epochs})
        shapes: dict[str, list[tuple[str, int]]] = {}
        measure_rows = []
        for key, mm in self.measurements.items():
            spec = {**self.models, **{k: s for k, (_, s) in self.pretrained.items()}}[mm.model]
            if mm.model not in shapes:
                shapes[mm.model] = _layer_sizes(spec)
            m = len(mm.transformation_set())
            features = sum(f for _, f in shapes[mm.model])
            blocks = (mm.blocks or 0) + 1
            # The variance family's state per layer: Σ and Σ² per column [m, F], row sums [F], and a
            # shift [m, F] (float64), once per jackknife block plus the merged copy.
            memory = (3 * m + 2) * features * 8 * blocks
            measure_rows.append({"measurement": str(key), "model": mm.model, "dataset": mm.dataset,
                                 "transformation": mm.transformation_name(), "n": mm.n_samples, "m": m,
                                 "forwards": mm.n_samples * m, "peak accumulator MiB": round(memory / 2 ** 20, 1)})
        return {"train": pd.DataFrame(train_rows), "measure": pd.DataFrame(measure_rows)}


def _train_size(data_module: Any, name: str) -> int:
    return {"mnist": 60000, "fashion-mnist": 60000, "cifar10": 50000}[data_module.describe(name)["name"]]


def _layer_sizes(spec: ModelSpec) -> list[tuple[str, int]]:
    """(layer, activations per image) of a spec's model, from one forward of a blank image."""
    from .. import data
    from ..activations import record

    info = data.describe(spec.dataset)
    model = build_model(spec.untrained()).eval()
    names = model.layer_names() if callable(getattr(model, "layer_names", None)) else None
    outputs = record(model, torch.zeros(1, info["channels"], info["size"], info["size"]), names)
    return [(name, out.numel()) for name, out in outputs.items()]
