"""The single pass over the sample × transformation matrix that feeds every measure.

For each block of ``b`` samples: warp them by all ``m`` transformations on the model's device
([b, m, C, H, W]), run one forward of the ``b·m`` images, and, inside the forward hooks, update
one state per (statistic spec, layer, sample block). The model sees exactly n·m images in total,
whatever the number of measures (plus n for statistics that need the untransformed samples, in a
reference pass before the main one); layers are discovered by the hooks during the first block.

:func:`collect` returns the states (:class:`~tmlib.measures.collection.PassStates`: public,
mergeable, savable); :func:`evaluate` computes the results from them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import distributed as _distributed
from .activations import LayerObserver
from .adapters import default_fill, image_blocks
from .checks import check_int, check_module, check_transformation_set
from .devices import placed, resolve_device
from .measures.base import LayerInfo, Measure, PassContext, StatSpec, feed
from .measures.collection import PassStates, named_measures
from .measures.moments import check_backend, numba_available
from .results import MeasureResult

__all__ = ["NonFiniteActivationError", "block_bounds", "collect", "collect_references", "default_batch_size", "evaluate"]

Progress = bool | Callable[[int, int], None]


class NonFiniteActivationError(ValueError):
    """A layer produced NaN or ±inf activations; measures would average them silently."""


def default_batch_size(m: int, images_per_forward: int = 256) -> int:
    """Samples per block so that one forward sees about ``images_per_forward`` images."""
    return max(1, images_per_forward // m)


def block_bounds(n: int, blocks: int) -> list[int]:
    """Start of each of ``blocks`` contiguous sample blocks, and n: block k holds the samples
    ``bounds[k] ≤ i < bounds[k + 1]`` with ``bounds[k] = floor(k·n / blocks)`` (sizes differ by at
    most one; the same n and blocks always give the same split)."""
    return [k * n // blocks for k in range(blocks + 1)]


def _set_numba_threads() -> None:
    if numba_available():
        import numba

        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class _Pass:
    """One pass: forwards of the expanded batches, every observed output fed to its states."""

    def __init__(self, model, layers, m: int, specs: Sequence[StatSpec], build, bounds: list[int], offset: int = 0):
        self.model, self.layers, self.m, self.specs, self.build = model, layers, m, list(specs), build
        self.bounds, self.offset = bounds, offset  # offset: global index of sample 0 of this pass
        self.states: dict[tuple[StatSpec, str], list[Any]] = {}
        self.infos: dict[str, LayerInfo] = {}
        self.b, self.start, self.first = 0, 0, True
        self.skipped: dict[str, str] = {}
        self.touched: list[tuple[tuple[StatSpec, str], Any]] = []  # states updated by this batch

    def consume(self, name: str, out: torch.Tensor) -> None:
        b, m = self.b, self.m
        rows = b * m
        if out.dim() == 0 or out.shape[0] % rows != 0:
            raise ValueError(
                f"layer {name!r}: output shape {tuple(out.shape)} has no leading dimension of "
                f"b·m = {rows} images (or a multiple of it)"
            )
        per_image = out.shape[0] // rows
        shape = tuple(out.shape[1:]) if per_image == 1 else (per_image, *out.shape[1:])
        if name not in self.infos:
            if not self.first:
                raise ValueError(f"layer {name!r} appeared only after the first block of samples")
            self.infos[name] = LayerInfo(name, shape)
        block = out.reshape(b, *shape) if m == 1 else out.reshape(b, m, *shape)
        bounds, start = self.bounds, self.start
        layer_states = []  # [spec][block k]
        for spec in self.specs:
            per_block = self.states.get((spec, name))
            if per_block is None:
                per_block = self.states[(spec, name)] = [self.build(spec, self.infos[name]) for _ in bounds[1:]]
                for k, state in enumerate(per_block):
                    if hasattr(state, "seek"):  # states that read per-sample data by (global) index
                        state.seek(self.offset + bounds[k], self.offset + bounds[k + 1])
            layer_states.append(per_block)
        for k in range(len(bounds) - 1):  # the rows of this batch that fall in block k
            lo, hi = max(bounds[k], start), min(bounds[k + 1], start + b)
            if lo < hi:
                states = [per_block[k] for per_block in layer_states]
                feed(states, block[lo - start : hi - start])
                self.touched.extend(((spec, name), state) for spec, state in zip(self.specs, states))

    def run(self, batches, expand, device, progress: Progress, desc: str, n: int,
            after_first: Callable[[dict[str, LayerInfo]], None] | None = None) -> int:
        images = 0
        bar = tqdm(total=n, desc=desc, unit="sample", disable=progress is not True)
        try:
            with LayerObserver(self.model, self.layers, self.consume, skip_non_tensors=True) as observer, \
                    torch.no_grad():
                for xb in batches:
                    xb = xb.to(device)
                    self.b = xb.shape[0]
                    expanded = expand(xb).reshape(self.b * self.m, *xb.shape[1:])
                    self.model(expanded)
                    images += expanded.shape[0]
                    if self.first:
                        observer.check_seen()  # a misspelt `path#k` fails now, not after the whole pass
                        if not self.infos:
                            raise ValueError(
                                "no layer was observed: the model has no leaf modules returning tensors"
                                + (f" (skipped: {observer.skipped})" if observer.skipped else "")
                            )
                        if after_first is not None:
                            after_first(self.infos)
                    self.first = False
                    self.start += self.b
                    self._check_finite()
                    bar.update(self.b)
                    if callable(progress):
                        progress(self.start, n)
                observer.check_seen()
                self.skipped = dict(observer.skipped)
        finally:
            bar.close()
        return images

    def _check_finite(self) -> None:
        touched, self.touched = self.touched, []
        for (_, name), state in touched:  # only the states this batch reached
            if hasattr(state, "is_finite") and not state.is_finite():
                raise NonFiniteActivationError(
                    f"layer {name!r} produced NaN or inf activations; the measures would "
                    "be meaningless (check the model and its inputs)"
                )


def collect(
    model: nn.Module,
    x: torch.Tensor | Dataset,
    ts,
    measures: Measure | Sequence[Measure] | Mapping[str, Measure] = (),
    layers: Sequence[str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    fill: float | Sequence[float] | None = None,
    progress: Progress = True,
    backend: str = "auto",
    metadata: dict[str, Any] | None = None,
    blocks: int | None = None,
    statistics: Sequence[StatSpec] = (),
    references: PassStates | None = None,
    start: int = 0,
    distributed: bool | None = None,
) -> PassStates:
    """Run the single pass and return its states (see :func:`evaluate` for the other arguments).

    Args:
        statistics: extra specs to accumulate besides those of ``measures`` (e.g. the layer
            explorer's pictures, :mod:`tmlib.widgets.data`).
        references: when ``x`` is a part of a dataset measured in parts, the merged states of the
            reference pass over the *whole* dataset (:func:`collect_references` on every part,
            then :func:`~tmlib.measures.merge_states`): Goodfellow's thresholds and DSES's F(x)
            then come from all the samples and no reference pass runs here. Only measures with a
            reference pass need it; without it, they run their own over ``x``.
        start: index of x's first sample in the whole dataset (parts measured apart: 0 for the
            first, then the sizes of the parts before); states that read per-sample data use it.

    The result merges with the states of other passes (:func:`~tmlib.measures.merge_states`) and
    computes results with ``.compute(measures)``.
    """
    if _distributed.active(distributed):
        if references is not None or start:
            raise ValueError("references, start: the ranks of a distributed pass share their reference pass "
                             "and split the samples themselves; pass neither")
        return _distributed.collect_across_ranks(
            _collect, collect_references, _check_blocks, model, x, ts, measures, layers=layers,
            batch_size=batch_size, device=device, fill=fill, progress=progress, backend=backend, metadata=metadata,
            blocks=blocks, statistics=statistics)
    return _collect(model, x, ts, measures, layers, batch_size, device, fill, progress, backend, metadata, blocks,
                    statistics, references, start)


def _check_blocks(blocks: Any, n: int, listed: Sequence[Measure]) -> None:
    if blocks is None:
        return
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 2 <= blocks <= n:
        raise ValueError(f"blocks must be None or an integer with 2 ≤ blocks ≤ n = {n}, got {blocks!r}")
    refusing = [mm.name for mm in listed if not mm.supports_blocks]
    if refusing:
        raise ValueError(
            f"blocks: {refusing} cannot give jackknife replicates: their thresholds are set on "
            "all n samples by the reference pass, so a replicate would need its own reference "
            "pass and threshold (see GoodfellowMeasure); measure them without blocks"
        )


def _collect(model, x, ts, measures, layers, batch_size, device, fill, progress, backend, metadata, blocks,
             statistics, references, start, n_total: int | None = None, bounds: list[int] | None = None,
             blocked: bool | None = None) -> PassStates:
    """:func:`collect` in this process. A rank of a distributed pass gives its part of the samples
    with ``n_total`` (all samples), ``bounds`` (its blocks, local indices) and ``blocked``."""
    check_module(model)
    listed = list(named_measures(measures).values()) if (isinstance(measures, Measure) or measures) else []
    statistics = list(statistics)
    if not listed and not statistics:
        raise TypeError("measures must be a Measure, a non-empty list of Measure objects or a dict name → Measure")
    if not all(isinstance(s, StatSpec) for s in statistics):
        raise TypeError("statistics must be StatSpec objects")
    check_transformation_set(ts)
    m = len(ts)
    if m < 2:
        raise ValueError(f"ts: a transformation set of at least 2 transformations is needed, got m={m}")
    batch_size = default_batch_size(m) if batch_size is None else check_int("batch_size", batch_size, 1)
    check_backend(backend)
    device = resolve_device(device, model, x)
    if layers is None and callable(getattr(model, "layer_names", None)):
        layers = model.layer_names()  # paper models: the paper's layers, without flatten/dropout
    batches, n = image_blocks(x, batch_size)
    n_total = n if n_total is None else n_total
    if n_total < 2:
        raise ValueError(f"x: at least 2 samples are needed for the sample variance, got n={n_total}")
    if bounds is None:
        _check_blocks(blocks, n, listed)
        bounds, blocked = block_bounds(n, blocks or 1), bool(blocks)
    fill = default_fill(x, fill)
    if backend == "auto" and device.type == "cpu":
        _set_numba_threads()

    start = check_int("start", start, 0)
    context = PassContext(m=m, n=n_total, device=device, backend=backend, ts=ts, fill=fill)
    for measure in listed:  # before any forward: the same error whatever the order of the measures
        measure.check(context)
    specs = list(dict.fromkeys([mm.spec() for mm in listed] + statistics))
    reference_specs = list(dict.fromkeys(r for s in specs if (r := s.reference_spec()) is not None))
    if references is not None:
        missing = [r for r in reference_specs if r not in references.specs]
        if missing:
            raise ValueError(f"references: these states hold no {missing}; collect them with collect_references "
                             "for the same measures")

    def check_layers(infos: dict[str, LayerInfo]) -> None:
        for measure in listed:
            measure.check_layers(infos)

    images = 0
    # Restore each module's own mode afterwards (a frozen BatchNorm inside a training model stays frozen).
    modes = {module: module.training for module in model.modules()}
    with placed(model, device):
        model.eval()
        try:
            ref_states: dict = {}
            if references is not None:
                ref_states = {key: references.state(*key) for key in references.states if key[0] in reference_specs}
            elif reference_specs:
                # Untransformed samples only: n extra forwards, before the n·m of the main pass;
                # one image per sample, so blocks of batch_size·m samples keep forwards as large.
                ref = _Pass(model, layers, 1, reference_specs, lambda spec, info: spec.build(info, context), [0, n],
                            start)
                images += ref.run(image_blocks(x, batch_size * m)[0], lambda xb: xb, device, progress,
                                  "reference pass (untransformed)", n)
                ref_states = {key: parts[0] for key, parts in ref.states.items()}

            def build(spec: StatSpec, info: LayerInfo) -> Any:
                reference = spec.reference_spec()
                if reference is not None and references is not None and (reference, info.name) not in ref_states:
                    raise ValueError(f"references: no reference state for layer {info.name!r}")
                return spec.build(info, context, ref_states.get((reference, info.name)) if reference else None)

            main = _Pass(model, layers, m, specs, build, bounds, start)
            images += main.run(batches, lambda xb: ts.apply(xb, fill=fill), device, progress,
                               f"measuring ({m} transformations)", n, after_first=check_layers)
            ref_states.clear()  # what the main states need, they hold
        finally:
            for module, mode in modes.items():
                module.training = mode

    base_meta = {
        "model": getattr(model, "paper_name", type(model).__name__),
        "dataset": getattr(x, "name", None) if not isinstance(x, torch.Tensor) else "tensor",
        "transformation": getattr(ts, "name", type(ts).__name__),
        "n": n,
        "m": m,
        "fill": fill if isinstance(fill, (int, float)) else list(fill),
        "images_forwarded": images,
        "device": str(device),
        **(metadata or {}),
    }
    if main.skipped:
        base_meta["skipped_modules"] = main.skipped
    if start or references is not None:
        base_meta.update(start=start, shared_reference_pass=references is not None)
    if blocked:
        base_meta.update(blocks=len(bounds) - 1, block_sizes=[b - a for a, b in zip(bounds[:-1], bounds[1:])])
    return PassStates(main.infos, main.states, [b - a for a, b in zip(bounds[:-1], bounds[1:])], base_meta,
                      blocked=blocked)


def collect_references(
    model: nn.Module,
    x: torch.Tensor | Dataset,
    ts,
    measures: Measure | Sequence[Measure] | Mapping[str, Measure],
    n_total: int,
    start: int = 0,
    layers: Sequence[str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: Progress = True,
    backend: str = "auto",
) -> PassStates:
    """The reference pass alone (untransformed samples: len(x) forwards) of one part of a dataset
    of ``n_total`` samples whose part starts at sample ``start``, for the measures that need one
    (Goodfellow's thresholds, DSES with ``reference=True``).

    Merge the parts' results (:func:`~tmlib.measures.merge_states`, in any order) and give them to
    every part's :func:`collect` as ``references``: the parts then share the thresholds of all
    ``n_total`` samples, and their states merge into those of one pass. Goodfellow's running top-K
    is sized for ``n_total`` so that the merge is exact (and certified)."""
    named = named_measures(measures)
    specs = list(dict.fromkeys(r for mm in named.values() if (r := mm.spec().reference_spec()) is not None))
    if not specs:
        raise ValueError("measures: none of these measures needs a reference pass")
    device = resolve_device(device, model, x)
    batches, n = image_blocks(x, (batch_size or default_batch_size(len(ts))) * len(ts))
    n_total = check_int("n_total", n_total, n)
    start = check_int("start", start, 0, n_total - n)
    context = PassContext(m=len(ts), n=n_total, device=device, backend=backend, ts=ts)
    for measure in named.values():
        measure.check(context)
    modes = {module: module.training for module in model.modules()}
    with placed(model, device):
        model.eval()
        try:
            ref = _Pass(model, layers if layers is not None else getattr(model, "layer_names", lambda: None)(), 1,
                        specs, lambda spec, info: spec.build(info, context), [0, n], start)
            images = ref.run(batches, lambda xb: xb, device, progress, "reference pass (untransformed)", n)
        finally:
            for module, mode in modes.items():
                module.training = mode
    meta = {"n": n, "m": len(ts), "start": start, "n_total": n_total, "images_forwarded": images,
            "transformation": getattr(ts, "name", type(ts).__name__), "reference_pass": True}
    return PassStates(ref.infos, ref.states, [n], meta)


def evaluate(
    model: nn.Module,
    x: torch.Tensor | Dataset,
    ts,
    measures: Measure | Sequence[Measure] | Mapping[str, Measure],
    layers: Sequence[str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    fill: float | Sequence[float] | None = None,
    progress: Progress = True,
    backend: str = "auto",
    metadata: dict[str, Any] | None = None,
    blocks: int | None = None,
    distributed: bool | None = None,
) -> dict[str, MeasureResult]:
    """Measure every observed layer of ``model`` under the transformation set ``ts``, in one pass.

    Args:
        model: any ``nn.Module`` taking images [B, C, H, W]; evaluated in eval mode, no gradients
            (each module's train/eval mode is restored afterwards).
        x: samples, a float tensor [n, C, H, W] or a dataset of images or (image, label) pairs.
        ts: a transformation set (``len(ts) = m ≥ 2``, ``ts.apply(x) -> [b, m, C, H, W]``).
        measures: one measure, a list (results named ``measure.name``, ``#2`` … for repeats) or a
            dict ``{name: measure}`` (results named by the caller); all fed from the same pass.
            Every measure's ``check`` runs before the first forward.
        layers: layer names to observe (module paths, ``path#k`` for the k-th call);
            default: ``model.layer_names()`` for the paper models (tmlib.models), else every leaf
            module returning a tensor, in order of first call (leaves returning something else,
            e.g. ``nn.LSTM``'s tuple, are skipped and listed in ``metadata["skipped_modules"]``;
            naming one in ``layers`` is an error).
        batch_size: samples per block; each forward sees ``batch_size·m`` images.
            Default: about 256 images per forward.
        device: where model, warps and accumulators run; None = the model's device (x's device
            for a model without parameters). A model elsewhere is moved there for the call and
            moved back afterwards; CUDA on a machine without it is a ValueError naming ``device``.
        fill: background value for warps; None = ``x.fill`` for tmlib datasets, else 0.
        progress: show a tqdm progress bar (True), nothing (False), or call ``progress(done, n)``
            after every block.
        backend: statistics kernel, ``"auto"`` (fused numba kernel on the CPU, eager torch ops
            elsewhere), ``"numba"``, ``"torch"`` (eager, the reference) or ``"compile"`` (the
            moments update compiled by torch.compile into one fused kernel, the other states'
            torch ops; a one-off compile of seconds, needs a C++ compiler on the CPU).
        metadata: extra entries for every result's metadata (e.g. ``{"model": "SimpleConv"}``).
        blocks: K ≥ 2 (at most n) for a delete-one-block jackknife of every layer mean, at no
            extra forward: the n samples are split into K contiguous blocks (:func:`block_bounds`:
            block k holds samples floor(k·n/K) … floor((k+1)·n/K) − 1), each block keeps its own
            states, and ``result.replicates`` holds, for every k, the layer means computed from
            the merge of all blocks but k (``layer_stderr()``, ``layer_intervals()``). The values
            themselves are those of the merge of all K blocks, equal to the unblocked values to
            rounding (rel 1e-12). Memory: K states per (statistic, layer) instead of one, plus
            ⌈log₂ K⌉ + 1 merged sets while the replicates are computed; for the variance family a
            layer of F activations costs (3m + 2)·F·8 bytes per block. Not available for
            ``GoodfellowMeasure`` (its thresholds are set on all n samples).
        distributed: across the ranks of a ``torch.distributed`` process group (None: when one is
            initialised, e.g. under ``torchrun``; True: always, initialising one from torchrun's
            environment variables if needed; False: in this process only). Every rank must call
            ``evaluate`` with the same model, ``ts``, x and measures (checked before the first
            forward: :class:`~tmlib.distributed.RankMismatchError`); rank r of W measures samples
            floor(r·n/W) … floor((r+1)·n/W) − 1 (whole jackknife blocks with ``blocks``, then
            K ≥ W), reading a dataset only there, on ``cuda:LOCAL_RANK`` where CUDA is present
            (else ``device``); the states are gathered and merged in rank order, so every rank
            returns the same results, equal to one process's over all n samples (rel 1e-9).
            Goodfellow's thresholds come from a reference pass shared by the ranks (exact). The
            metadata's ``images_forwarded`` counts every rank's forwards (n·m, + n for a reference
            pass); ``metadata["distributed"]`` has each rank's samples, device, forwards and
            seconds (reference pass, pass, collectives). Only rank 0 shows a progress bar. See
            :mod:`tmlib.distributed`.

    Returns:
        ``{name: MeasureResult}`` in the order the measures were given.
    """
    named = named_measures(measures)
    states = collect(model, x, ts, list(named.values()), layers=layers, batch_size=batch_size, device=device,
                     fill=fill, progress=progress, backend=backend, metadata=metadata, blocks=blocks,
                     distributed=distributed)
    return states.compute(named)
