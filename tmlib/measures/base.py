"""How a measure is written: declared statistics, checks before the pass, a stateless compute.

A measure holds options only. It names the statistic it needs as a :class:`StatSpec` — a small
frozen, hashable dataclass ("the ST moments of a layer", "the orbit sums of a layer", …) whose
:meth:`~StatSpec.build` makes the state of one layer. Equal specs are one state per layer by
construction, whatever the order of the measures: TV, SV, NV in every mode, ANOVA and the squared
distances all read the same :class:`~tmlib.measures.moments.Moments`. The engine

1. calls :meth:`Measure.check` for every measure before the first forward (the same error in every
   order of the measures), and :meth:`Measure.check_layers` once the first block has revealed the
   layers;
2. builds the states from the specs only, feeds them in one pass (``update(block [b, m, *shape])``,
   by :func:`feed`: a state with ``update_with(other, block)`` updates itself and another state of
   the layer in one read of the block where it can, e.g. Goodfellow's counts and the moments);
3. calls :meth:`Measure.compute`, a function of the states (plus metadata) that returns a
   :class:`~tmlib.results.MeasureResult` with its per-layer metadata. Nothing is stored on the
   measure, so one object can serve several ``evaluate`` calls.

Like torchmetrics' ``Metric`` (``add_state``/``update``/``compute``/``merge_state``), every state
merges (:mod:`tmlib.measures.states`); unlike a metric, states live outside the measure, in the
pass's :class:`~tmlib.measures.collection.PassStates`, because one state feeds many measures.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..results import MeasureResult

__all__ = ["LayerInfo", "LayerSkippingMeasure", "LayerValue", "Measure", "PassContext", "StatSpec", "feed"]


def feed(states: list[Any], block: torch.Tensor) -> None:
    """Update the states of one layer with ``block`` [b, m, *shape]. A state that defines
    ``update_with(other, block) -> bool`` is offered each other state first: where it returns
    True, it updated both in one read of the block (the block of a wide layer is tens of MB, out
    of cache); the rest are updated one by one, in order."""
    done: set[int] = set()
    for state in states:
        if id(state) in done or not hasattr(state, "update_with"):
            continue
        for other in states:
            if other is not state and id(other) not in done and state.update_with(other, block):
                done |= {id(state), id(other)}
                break
    for state in states:
        if id(state) not in done:
            state.update(block)


@dataclass(frozen=True)
class LayerInfo:
    """A layer as the pass found it: its name and the activation shape of one sample."""

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def spatial(self) -> bool:
        """True for feature maps (…, H, W): at least three dimensions per sample."""
        return len(self.shape) >= 3

    @property
    def size(self) -> int:
        """Activations per sample."""
        return math.prod(self.shape)


@dataclass
class PassContext:
    """What a state or a check may need to know about the pass.

    Attributes:
        m: number of transformations.
        n: number of samples of the pass (None when states are fed by hand).
        device: where the model and the accumulators live.
        backend: statistics kernel, one of :data:`~tmlib.measures.moments.BACKENDS`.
        ts: the transformation set (None when states are fed by hand without one).
        fill: background value used for the warps.
    """

    m: int
    n: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "auto"
    ts: Any = None
    fill: Any = 0.0


class StatSpec:
    """A statistic a measure needs, as a frozen dataclass (subclasses: ``@dataclass(frozen=True)``).

    Equal specs (same class, same fields) share one state per layer. :meth:`build` makes the state
    of one layer; :meth:`reference_spec` names a statistic of an extra pass over the n untransformed
    samples that the state needs (its state is handed to :meth:`build` as ``reference``).
    """

    def reference_spec(self) -> StatSpec | None:
        return None

    def build(self, layer: LayerInfo, context: PassContext, reference: Any = None) -> Any:  # pragma: no cover
        raise NotImplementedError


class LayerValue(NamedTuple):
    """What :meth:`Measure.compute_layer` may return: the values and per-layer metadata (scalars)."""

    values: np.ndarray
    metadata: dict[str, Any]


class Measure(ABC):
    """Base class of all measures (see the module docstring).

    Subclasses set ``short_name`` and implement :meth:`spec` and :meth:`compute_layer`; they may
    refine :meth:`check`, :meth:`skip_reason` (layers they do not measure, e.g. vectors for
    same-equivariance) and :meth:`result_metadata`.
    """

    short_name = "measure"
    #: False for measures whose states cannot give delete-one-block replicates (evaluate(blocks=K)).
    supports_blocks = True
    #: True for measures defined on some layers only: ``metadata["skipped_layers"]`` lists the others.
    restricted = False
    #: Per-layer metadata keys also given as ``metadata[key] = {layer: value}`` (earlier releases).
    legacy_metadata: tuple[str, ...] = ()

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def spec(self) -> StatSpec:
        """The statistic this measure reads; equal specs share one state per layer."""

    @abstractmethod
    def compute_layer(self, state: Any, layer: LayerInfo, fixed: Mapping[str, Any] | None = None) -> np.ndarray | LayerValue:
        """The values of one layer from its state. ``fixed``: for jackknife replicates, the
        full-data result's metadata of this layer, so that data-dependent choices (e.g. G-EED's
        fallback) stay those of the full data; None otherwise."""

    # ------------------------------------------------------------------ optional
    def check(self, context: PassContext) -> None:
        """Raise ValueError if the measure cannot run on this pass (before any forward)."""
        return None

    def skip_reason(self, layer: LayerInfo) -> str | None:
        """Why the measure does not apply to ``layer`` (None: it applies)."""
        return None

    def all_skipped_message(self, skipped: dict[str, str]) -> str:
        return f"{self.name}: every observed layer was skipped: {skipped}"

    def check_layers(self, layers: Mapping[str, LayerInfo]) -> None:
        """Raise ValueError when no observed layer qualifies (run once the layers are known)."""
        skipped = {name: r for name, info in layers.items() if (r := self.skip_reason(info)) is not None}
        if layers and len(skipped) == len(layers):
            raise ValueError(self.all_skipped_message(skipped))

    def result_metadata(self, states: Mapping[str, Any]) -> dict[str, Any]:
        """Result-level metadata computed from the states (by layer name)."""
        return {}

    # ------------------------------------------------------------------ the computation
    def compute(
        self,
        states: Mapping[str, Any],
        layers: Mapping[str, LayerInfo],
        metadata: Mapping[str, Any] | None = None,
        like: MeasureResult | None = None,
    ) -> MeasureResult:
        """The result from the layers' states (a function of its arguments: nothing is stored).

        ``like``: the full-data result when computing a jackknife replicate (see compute_layer)."""
        self.check_layers(layers)
        values, layer_meta, skipped = {}, {}, {}
        for name, info in layers.items():
            reason = self.skip_reason(info)
            if reason is not None:
                skipped[name] = reason
                continue
            fixed = like.layer_metadata.get(name) if like is not None else None
            out = self.compute_layer(states[name], info, fixed)
            if isinstance(out, LayerValue):
                values[name] = np.asarray(out.values)
                if out.metadata:
                    layer_meta[name] = dict(out.metadata)
            else:
                values[name] = np.asarray(out)
        meta: dict[str, Any] = {"measure": self.name, **self.options(), **(metadata or {})}
        if self.restricted:
            meta["skipped_layers"] = skipped
        for key in self.legacy_metadata:
            legacy = {layer: m[key] for layer, m in layer_meta.items() if key in m}
            if legacy:
                meta[key] = legacy
        meta.update(self.result_metadata({name: states[name] for name in values}))
        return MeasureResult(self.name, values, meta, layer_metadata=layer_meta)

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


class LayerSkippingMeasure(Measure):
    """A measure defined on some layers only (kept for subclasses written against earlier releases:
    every :class:`Measure` may skip layers; this one sets ``restricted``)."""

    restricted = True
