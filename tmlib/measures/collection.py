"""PassStates: the public states of a pass — keep them, merge them, compute results from them.

``tmlib.measures.collect(...)`` runs the single pass and returns a :class:`PassStates` instead of
results; ``evaluate`` is ``collect(...).compute(measures)``. States of passes over different
samples (two halves of a dataset measured at different times or on different machines) merge
into the states of one pass over all of them (:func:`merge_states`), and ``compute`` then gives
the results of that one pass (to float64 rounding: rel 1e-12 for the variance family)::

    first = collect(model, x[:500], ts, measures)
    second = collect(model, x[500:], ts, measures)          # elsewhere, later: save() / load()
    results = merge_states(first, second).compute(measures)  # == evaluate(model, x, ts, measures)

Measures with a reference pass (Goodfellow, DSES with ``reference=True``) share one over all the
parts: :func:`tmlib.engine.collect_references` on every part, merged, then ``collect(…,
references=…, start=…)`` for each part.

The states are kept per statistic spec and layer as K *sample blocks* (K = 1 unless the pass was
collected with ``blocks=K``; merging concatenates the parts' blocks). ``compute`` merges the blocks;
with ``jackknife`` it also computes, for every block k, the results of all blocks but k (a
delete-one-block jackknife), merging along a binary tree: K·⌈log₂ K⌉ merges and at most
⌈log₂ K⌉ + 1 extra sets of states alive at a time. On the CPU every merge of moments is one fused
read of the arrays (:class:`~.states.ShiftedMoments`). The replicates are not the full merge minus
block k: a subtraction leaves a rounding residue where the other blocks are constant (a ReLU unit
dead outside one block), and NV's 0/0 → 1 and x/0 → inf conventions need the exact zero.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..files import atomic_save
from ..results import MeasureResult, finite_mean
from .base import LayerInfo, Measure, PassContext, StatSpec, feed

__all__ = ["PassStates", "merge_states", "named_measures"]

Key = tuple[StatSpec, str]


def named_measures(measures: Measure | Sequence[Measure] | Mapping[str, Measure]) -> dict[str, Measure]:
    """Result names → measures: a mapping keeps the caller's names; a list (or one measure) is named
    by ``measure.name``, with ``#2``, ``#3`` … for repeated names, in the order given."""
    if isinstance(measures, Measure):
        measures = [measures]
    if isinstance(measures, Mapping):
        named = dict(measures)
        bad = [k for k in named if not isinstance(k, str) or not k]
        if bad:
            raise TypeError(f"measures: the names of a dict of measures must be non-empty strings, got {bad}")
    else:
        named, seen = {}, {}
        for measure in measures:
            if not isinstance(measure, Measure):
                named = {}
                break
            seen[measure.name] = seen.get(measure.name, 0) + 1
            named[measure.name if seen[measure.name] == 1 else f"{measure.name}#{seen[measure.name]}"] = measure
    if not named or not all(isinstance(m, Measure) for m in named.values()):
        raise TypeError("measures must be a Measure, a non-empty list of Measure objects or a dict name → Measure")
    return named


def _merged(parts: Sequence[Any]) -> Any:
    """One state for several sample blocks: the state itself for one block, else a merged copy."""
    if len(parts) == 1:
        return parts[0]
    merged = parts[0].copy()
    for state in parts[1:]:
        merged.merge(state)
    return merged


class PassStates:
    """States of one pass (or of several merged passes) of some measures over n samples.

    Attributes:
        layers: {layer name: LayerInfo} in forward order.
        states: {(spec, layer): [state of block 0, …, state of block K − 1]}.
        block_sizes: samples in each block.
        metadata: what every result's metadata starts from (model, dataset, n, m, …).
        blocked: collected with ``blocks=K`` (``compute`` then gives jackknife replicates).
    """

    def __init__(self, layers: dict[str, LayerInfo], states: dict[Key, list[Any]], block_sizes: list[int],
                 metadata: dict[str, Any], blocked: bool = False, context: PassContext | None = None) -> None:
        self.layers = dict(layers)
        self.states = states
        self.block_sizes = list(block_sizes)
        self.metadata = dict(metadata)
        self.blocked = blocked
        self._context = context  # for states fed by hand (update)

    # ------------------------------------------------------------------ fed by hand
    @classmethod
    def empty(cls, measures: Measure | Sequence[Measure] | Mapping[str, Measure] = (), m: int = 2, ts: Any = None,
              backend: str = "auto", device: str | torch.device = "cpu",
              statistics: Sequence[StatSpec] = ()) -> PassStates:
        """States to feed by hand with :meth:`update` (no model, no engine): every measure's
        :meth:`~Measure.check` runs now. Measures that need a reference pass are refused."""
        context = PassContext(m=m, device=torch.device(device), backend=backend, ts=ts)
        listed = list(named_measures(measures).values()) if measures else []
        for measure in listed:
            measure.check(context)
            if measure.spec().reference_spec() is not None:
                raise ValueError(f"{measure.name} needs a reference pass: use tmlib.measures.evaluate")
        specs = list(dict.fromkeys([mm.spec() for mm in listed] + list(statistics)))
        out = cls({}, {}, [0], {"n": 0, "m": m}, context=context)
        out._specs = specs
        return out

    def update(self, layer: str, block: torch.Tensor) -> None:
        """Feed rows of one layer's ST matrix, ``block`` [b, m, *activation] (states from :meth:`empty`)."""
        if self._context is None:
            raise ValueError("update: only states made by PassStates.empty() are fed by hand")
        if block.dim() < 3 or block.shape[1] != self._context.m:
            raise ValueError(f"block must have shape [b, m={self._context.m}, *activation], got {tuple(block.shape)}")
        if layer not in self.layers:
            info = self.layers[layer] = LayerInfo(layer, tuple(block.shape[2:]))
            for spec in self._specs:
                self.states[(spec, layer)] = [spec.build(info, self._context)]
        feed([self.states[(spec, layer)][0] for spec in self._specs], block)
        if layer == next(iter(self.layers)):  # samples are counted on the first layer
            self.block_sizes[0] += block.shape[0]
            self.metadata["n"] = self.block_sizes[0]

    # ------------------------------------------------------------------ access
    @property
    def n(self) -> int:
        return sum(self.block_sizes)

    @property
    def blocks(self) -> int:
        return len(self.block_sizes)

    @property
    def specs(self) -> list[StatSpec]:
        return list(dict.fromkeys(spec for spec, _ in self.states))

    def state(self, spec: StatSpec, layer: str) -> Any:
        """The state of ``spec`` for ``layer``, all blocks merged (a copy when there are several)."""
        if (spec, layer) not in self.states:
            raise KeyError(f"no state of {spec!r} for layer {layer!r}; specs: {self.specs}, layers: {list(self.layers)}")
        return _merged(self.states[(spec, layer)])

    def layer_states(self, spec: StatSpec) -> dict[str, Any]:
        """{layer: merged state} of one spec, in forward order."""
        return {layer: self.state(spec, layer) for layer in self.layers if (spec, layer) in self.states}

    def nbytes(self) -> dict[str, int]:
        """Bytes held by the states of each layer (all specs and blocks)."""
        out = dict.fromkeys(self.layers, 0)
        for (_, layer), parts in self.states.items():
            out[layer] += sum(p.nbytes() for p in parts if hasattr(p, "nbytes"))
        return out

    # ------------------------------------------------------------------ merging
    def merge(self, other: PassStates) -> PassStates:
        """Add the samples of ``other`` (a pass over *other* samples, after this one's) in place;
        the blocks of both are kept (``other``'s after this one's), its states are shared."""
        if list(other.layers) != list(self.layers) or set(other.states) != set(self.states):
            raise ValueError(
                "merge: the passes must observe the same layers with the same statistics; got layers "
                f"{list(self.layers)} vs {list(other.layers)}"
            )
        for key in ("m", "transformation"):
            if self.metadata.get(key) != other.metadata.get(key):
                raise ValueError(f"merge: the passes differ in {key}: {self.metadata.get(key)!r} vs {other.metadata.get(key)!r}")
        for key, parts in other.states.items():
            self.states[key] = self.states[key] + list(parts)
        self.block_sizes += other.block_sizes
        self.blocked = self.blocked and other.blocked
        for key in ("n", "images_forwarded"):
            self.metadata[key] = self.metadata.get(key, 0) + other.metadata.get(key, 0)
        if self.metadata.get("dataset") != other.metadata.get("dataset"):
            self.metadata["dataset"] = f"{self.metadata.get('dataset')}+{other.metadata.get('dataset')}"
        self.metadata["merged_passes"] = self.metadata.get("merged_passes", 1) + other.metadata.get("merged_passes", 1)
        if self.blocked:
            self.metadata.update(blocks=self.blocks, block_sizes=list(self.block_sizes))
        else:
            self.metadata.pop("blocks", None)
            self.metadata.pop("block_sizes", None)
        return self

    # ------------------------------------------------------------------ results
    def _sets(self, measures: dict[str, Measure]) -> list[StatSpec]:
        specs = list(dict.fromkeys(m.spec() for m in measures.values()))
        for name, measure in measures.items():
            if not any((measure.spec(), layer) in self.states for layer in self.layers):
                raise ValueError(f"{name!r}: these states hold no {measure.spec()!r} (was {measure!r} in the pass?)")
        return specs

    def _results(self, measures: dict[str, Measure], states: dict[Key, Any],
                 like: dict[str, MeasureResult] | None = None) -> dict[str, MeasureResult]:
        out = {}
        for name, measure in measures.items():
            spec = measure.spec()
            per_layer = {layer: states[(spec, layer)] for layer in self.layers}
            meta = {**self.metadata, "definition": repr(measure)}
            result = measure.compute(per_layer, self.layers, meta, like=None if like is None else like[name])
            result.measure = name
            result.metadata["measure"] = name
            out[name] = result
        return out

    def leave_one_out(self, specs: Sequence[StatSpec] | None = None) -> Iterator[tuple[int, dict[Key, Any]]]:
        """For k = 0 … K − 1: (k, {(spec, layer): state of all blocks but k}), along a binary tree
        of partial merges (K·⌈log₂ K⌉ merges, ⌈log₂ K⌉ + 1 partial sets alive at a time)."""
        keys = [key for key in self.states if specs is None or key[0] in specs]
        if self.blocks < 2:
            raise ValueError("leave_one_out: these states hold a single block (collect them with blocks=K)")

        def with_blocks(partial: dict[Key, Any] | None, lo: int, hi: int) -> dict[Key, Any]:
            out = {}
            for key in keys:
                parts = self.states[key][lo:hi]
                state = partial[key].copy() if partial is not None else parts[0].copy()
                for part in parts if partial is not None else parts[1:]:
                    state.merge(part)
                out[key] = state
            return out

        def walk(lo: int, hi: int, partial: dict[Key, Any] | None) -> Iterator[tuple[int, dict[Key, Any]]]:
            if hi - lo == 1:
                yield lo, partial
                return
            mid = (lo + hi) // 2
            yield from walk(lo, mid, with_blocks(partial, mid, hi))  # the blocks outside [lo, mid)
            yield from walk(mid, hi, with_blocks(partial, lo, mid))

        yield from walk(0, self.blocks, None)

    def leave_one_out_results(self, measures: Measure | Sequence[Measure] | Mapping[str, Measure],
                              like: dict[str, MeasureResult] | None = None) -> Iterator[dict[str, MeasureResult]]:
        """For k = 0 … K − 1, the results of ``measures`` from all blocks but k (warnings silenced:
        the full-data results already gave them). ``like``: the full-data results, whose per-layer
        choices the replicates keep (see :meth:`Measure.compute_layer`)."""
        named = named_measures(measures)
        for _, rest in self.leave_one_out(self._sets(named)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield self._results(named, rest, like)

    def compute(self, measures: Measure | Sequence[Measure] | Mapping[str, Measure],
                jackknife: bool | None = None) -> dict[str, MeasureResult]:
        """The results of ``measures`` (a list, or a dict name → measure) from these states.

        ``jackknife`` (default: whether the states were collected with ``blocks=K``) adds to every
        result its ``replicates``: row k = the layer means computed from all blocks but k."""
        named = named_measures(measures)
        specs = self._sets(named)
        full = {key: _merged(parts) for key, parts in self.states.items() if key[0] in specs}
        results = self._results(named, full)
        del full
        if self.blocked if jackknife is None else jackknife:
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in named}
            for replicate in self.leave_one_out_results(named, like=results):
                for name, result in replicate.items():
                    rows[name].append({layer: finite_mean(v) for layer, v in result.values.items()})
            for name, result in results.items():
                frame = pd.DataFrame(rows[name], columns=result.layer_names, dtype=float)
                result.replicates = frame.rename_axis("block")
        return results

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the states to a file (torch.save, atomically), to merge or compute elsewhere.
        A state holding a callable that cannot be pickled (a lambda in a spec) is an error."""
        payload = {"format": 1, "layers": self.layers, "states": self.states, "block_sizes": self.block_sizes,
                   "metadata": self.metadata, "blocked": self.blocked}

        try:
            return atomic_save(path, payload)
        except (AttributeError, TypeError) as error:  # pickle's "Can't pickle local object …"
            raise ValueError(f"save: these states cannot be pickled ({error}); a measure option holds a "
                             "local function or lambda: use a module-level function") from error

    @classmethod
    def load(cls, path: str | os.PathLike) -> PassStates:
        """Read states written by :meth:`save`. The file is a pickle: load only files you trust."""
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(payload, dict) or payload.get("format") != 1:
            raise ValueError(f"{path} is not a file of tmlib PassStates")
        return cls(payload["layers"], payload["states"], payload["block_sizes"], payload["metadata"],
                   payload["blocked"])


def merge_states(*parts: PassStates) -> PassStates:
    """The states of one pass over the samples of all ``parts`` (passes over disjoint samples, in
    that order). The parts' states are shared, not copied: do not feed the parts afterwards."""
    if not parts:
        raise ValueError("merge_states: give at least one PassStates")
    first = parts[0]
    out = PassStates(first.layers, {k: list(v) for k, v in first.states.items()}, first.block_sizes,
                     first.metadata, first.blocked)
    for part in parts[1:]:
        out.merge(part)
    return out
