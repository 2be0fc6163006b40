"""The measure protocol: a small object that turns a shared per-layer statistic into values.

Measures follow torchmetrics' ``Metric``: state, ``update``, ``compute``, mergeable states. Unlike a
metric, the state (e.g. :class:`~tmlib.measures.moments.STMoments`) is *shared*: every measure
names the statistic it needs through :meth:`Measure.statistic_key`, and the engine keeps one state
per key and layer, so TV, SV and NV in element and channel mode all come from one accumulation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..results import MeasureResult

__all__ = ["LayerInfo", "LayerSkippingMeasure", "Measure", "PassContext"]


class LayerInfo:
    """What a measure needs to know about a layer besides its statistic: the activation shape."""

    def __init__(self, name: str, shape: tuple[int, ...]):
        self.name = name
        self.shape = tuple(shape)

    @property
    def spatial(self) -> bool:
        """True for feature maps (…, H, W): at least three dimensions per sample."""
        return len(self.shape) >= 3

    def __repr__(self) -> str:
        return f"LayerInfo({self.name!r}, {self.shape})"


@dataclass
class PassContext:
    """What a state may need to know about the pass that feeds it.

    Attributes:
        m: number of transformations.
        n: number of samples of the pass, known before the first block.
        device: where the model and the accumulators live.
        backend: statistics kernel, ``"auto"``, ``"numba"`` or ``"torch"``.
        ts: the transformation set (None when a measure is fed by hand with ``update``).
        fill: background value used for the warps.
        references: reference-pass states by ``(reference key, layer name)``; filled by the engine
            before the main pass for measures that declare a :meth:`Measure.reference_key`.
    """

    m: int
    n: int | None = None  # samples in the pass (None when fed by hand)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "auto"
    ts: Any = None
    fill: Any = 0.0
    references: dict = field(default_factory=dict)


class Measure(ABC):
    """Base class of all measures.

    Subclasses set ``short_name`` and implement :meth:`new_state` (the statistic to accumulate),
    :meth:`statistic_key` (equal keys share one state) and :meth:`compute_layer`.
    """

    short_name = "measure"

    def __init__(self) -> None:
        self._states: dict[str, Any] = {}
        self._layers: dict[str, LayerInfo] = {}

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def statistic_key(self) -> Hashable:
        """Measures with equal keys are fed from one shared state per layer."""

    @abstractmethod
    def new_state(self, layer: LayerInfo, context: PassContext) -> Any:
        """A fresh accumulator for one layer, with ``update(block [b, m, *shape])`` and, where the
        maths allows, ``merge(other)``."""

    @abstractmethod
    def compute_layer(self, state: Any, layer: LayerInfo) -> np.ndarray:
        """The measure's values for one layer from its accumulated state."""

    # ------------------------------------------------------------------ optional reference pass
    def reference_key(self) -> Hashable | None:
        """Non-None for measures that need one extra pass over the n *untransformed* samples
        before the main pass (e.g. Goodfellow's thresholds). Equal keys share the pass's states."""
        return None

    def new_reference_state(self, layer: LayerInfo, context: PassContext) -> Any:
        """Accumulator fed with ``update(block [b, *shape])`` during the reference pass."""
        raise NotImplementedError

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        """A unique, readable name including the options, e.g. ``NV[channel,std]``."""
        options = ",".join(str(v) for v in self.options().values())
        return f"{self.short_name}[{options}]" if options else self.short_name

    def options(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ standalone use
    def update(self, layer: str, block: torch.Tensor, backend: str = "auto", ts: Any = None) -> None:
        """Feed a block of ST rows of one layer: ``block`` [b, m, *activation_shape].

        For measures with a reference pass, use :func:`tmlib.measures.evaluate` instead."""
        if block.dim() < 3:
            raise ValueError(f"block must have shape [b, m, *activation], got {tuple(block.shape)}")
        if layer not in self._states:
            if self.reference_key() is not None:
                raise ValueError(f"{self.name} needs a reference pass: use tmlib.measures.evaluate")
            info = LayerInfo(layer, tuple(block.shape[2:]))
            self._layers[layer] = info
            context = PassContext(m=block.shape[1], device=block.device, backend=backend, ts=ts)
            self._states[layer] = self.new_state(info, context)
        self._states[layer].update(block)

    def attach(self, layer: LayerInfo, state: Any) -> None:
        """Use a state accumulated elsewhere (the engine's shared one) for ``layer``."""
        self._layers[layer.name] = layer
        self._states[layer.name] = state

    def reset(self) -> None:
        self._states.clear()
        self._layers.clear()

    def compute(self, metadata: dict[str, Any] | None = None) -> MeasureResult:
        values = {name: self.compute_layer(self._states[name], info) for name, info in self._layers.items()}
        meta = {"measure": self.name, **self.options(), **(metadata or {})}
        return MeasureResult(self.name, values, meta)


class LayerSkippingMeasure(Measure):
    """A measure defined on some layers only (e.g. feature maps, or vectors of logits).

    :meth:`compute_layer` runs where :meth:`skip_reason` gives None; the other layers are listed,
    with their reason, in ``metadata["skipped_layers"]``. A pass in which every layer is skipped is
    a ValueError (:meth:`all_skipped_message` says why)."""

    def skip_reason(self, state: Any, layer: LayerInfo) -> str | None:
        return None

    def all_skipped_message(self, skipped: dict[str, str]) -> str:
        return f"{self.name}: every observed layer was skipped: {skipped}"

    def extra_metadata(self, values: dict[str, np.ndarray]) -> dict[str, Any]:
        """Entries added to the result's metadata once the values are computed."""
        return {}

    def compute(self, metadata: dict[str, Any] | None = None) -> MeasureResult:
        values, skipped = {}, {}
        for name, info in self._layers.items():
            reason = self.skip_reason(self._states[name], info)
            if reason is None:
                values[name] = self.compute_layer(self._states[name], info)
            else:
                skipped[name] = reason
        if not values:
            raise ValueError(self.all_skipped_message(skipped))
        meta = {"measure": self.name, **self.options(), **(metadata or {}), "skipped_layers": skipped}
        meta.update(self.extra_metadata(values))
        return MeasureResult(self.name, values, meta)
