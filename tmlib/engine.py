"""The single pass over the sample × transformation matrix that feeds every measure.

For each block of ``b`` samples: warp them by all ``m`` transformations on the model's device
([b, m, C, H, W]), run one forward of the ``b·m`` images, and, inside the forward hooks, update
one shared statistic per (statistic kind, layer). The model sees exactly n·m images in total,
whatever the number of measures; layers are discovered by the hooks during the first block.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .activations import LayerObserver
from .measures.base import LayerInfo, Measure, PassContext
from .results import MeasureResult, finite_mean

__all__ = ["evaluate", "NonFiniteActivationError", "block_bounds", "default_batch_size"]


class NonFiniteActivationError(ValueError):
    """A layer produced NaN or ±inf activations; measures would average them silently."""


def default_batch_size(m: int, images_per_forward: int = 256) -> int:
    """Samples per block so that one forward sees about ``images_per_forward`` images."""
    return max(1, images_per_forward // m)


def _resolve_device(model: nn.Module, x: Any, device: str | torch.device | None) -> torch.device:
    param = next(iter(model.parameters()), None)
    if param is None:
        param = next(iter(model.buffers()), None)
    model_device = param.device if param is not None else None
    if device is None:
        if model_device is not None:
            return model_device
        return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if model_device is not None and model_device != device:
        raise ValueError(
            f"device: the model's parameters are on {model_device} but device={str(device)!r} was "
            f"requested; move the model first (model.to({str(device)!r})) or pass device=None"
        )
    return device


def _first_tensor(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    raise TypeError(
        "x: a dataset must yield image tensors [C, H, W] or (image, label) pairs, "
        f"got an item of type {type(item).__name__}"
    )


def _collate_images(items: list) -> torch.Tensor:
    return torch.stack([_first_tensor(item) for item in items])


def _blocks(x: Any, batch_size: int):
    """Yield image blocks [b, C, H, W] from a tensor or a dataset; returns (iterator, n)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"x must be a tensor of shape [n, C, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}")
        n = x.shape[0]
        return (x[i : i + batch_size] for i in range(0, n, batch_size)), n
    if isinstance(x, Dataset) or hasattr(x, "__getitem__"):
        try:
            n = len(x)
        except TypeError:
            raise TypeError("x: a dataset must have a length (map-style dataset)") from None
        if n == 0:
            raise ValueError("x: the dataset is empty")
        first = _first_tensor(x[0])
        if first.dim() != 3:
            raise ValueError(f"x: dataset images must have shape [C, H, W], got {tuple(first.shape)}")
        loader = DataLoader(x, batch_size=batch_size, shuffle=False, collate_fn=_collate_images)
        return iter(loader), n
    raise TypeError(f"x must be a tensor [n, C, H, W] or a dataset, got {type(x).__name__}")


def _unique_names(measures: Sequence[Measure]) -> list[str]:
    names, seen = [], {}
    for measure in measures:
        seen[measure.name] = seen.get(measure.name, 0) + 1
        names.append(measure.name if seen[measure.name] == 1 else f"{measure.name}#{seen[measure.name]}")
    return names


def _set_numba_threads() -> None:
    try:
        import numba

        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    except ImportError:  # pragma: no cover
        pass


def block_bounds(n: int, blocks: int) -> list[int]:
    """Start of each of ``blocks`` contiguous sample blocks, and n: block k holds the samples
    ``bounds[k] ≤ i < bounds[k + 1]`` with ``bounds[k] = floor(k·n / blocks)`` (sizes differ by at
    most one; the same n and blocks always give the same split)."""
    return [k * n // blocks for k in range(blocks + 1)]


def _single_pass(model, blocks, expand, m, layers, kinds, new_state, device, progress, desc, n, bounds=None):
    """One forward of every block, expanded to [b, m, C, H, W] by ``expand``; every layer's output
    updates one state per statistic kind and sample block (``bounds``: see :func:`block_bounds`;
    None = one block). Returns (lists of per-block states by (kind, layer), layer infos, images)."""
    bounds = [0, n] if bounds is None else bounds
    states: dict[tuple[Hashable, str], list[Any]] = {}
    infos: dict[str, LayerInfo] = {}
    current = {"b": 0, "first": True, "start": 0}

    def consume(name: str, out: torch.Tensor) -> None:
        b = current["b"]
        rows = b * m
        if out.dim() == 0 or out.shape[0] % rows != 0:
            raise ValueError(
                f"layer {name!r}: output shape {tuple(out.shape)} has no leading dimension of "
                f"b·m = {rows} images (or a multiple of it)"
            )
        per_image = out.shape[0] // rows
        shape = tuple(out.shape[1:]) if per_image == 1 else (per_image, *out.shape[1:])
        if name not in infos:
            if not current["first"]:
                raise ValueError(f"layer {name!r} appeared only after the first block of samples")
            infos[name] = LayerInfo(name, shape)
        block = out.reshape(b, *shape) if m == 1 else out.reshape(b, m, *shape)
        start = current["start"]
        for key, measure in kinds.items():
            per_block = states.get((key, name))
            if per_block is None:
                per_block = states[(key, name)] = [new_state(measure, infos[name]) for _ in bounds[1:]]
                for k, state in enumerate(per_block):
                    if hasattr(state, "seek"):  # states that read per-sample data by index
                        state.seek(bounds[k])
            if len(per_block) == 1:
                per_block[0].update(block)
                continue
            for k, state in enumerate(per_block):  # the rows of this batch that fall in block k
                lo, hi = max(bounds[k], start), min(bounds[k + 1], start + b)
                if lo < hi:
                    state.update(block[lo - start : hi - start])

    images = 0
    bar = tqdm(total=n, desc=desc, unit="sample", disable=not progress)
    try:
        with LayerObserver(model, layers, consume) as observer, torch.no_grad():
            for xb in blocks:
                xb = xb.to(device)
                b = current["b"] = xb.shape[0]
                expanded = expand(xb).reshape(b * m, *xb.shape[1:])
                model(expanded)
                images += expanded.shape[0]
                if current["first"]:
                    observer.check_seen()  # a misspelt `path#k` fails now, not after the whole pass
                current["first"] = False
                current["start"] += b
                for (_, name), per_block in states.items():
                    if any(hasattr(s, "is_finite") and not s.is_finite() for s in per_block):
                        raise NonFiniteActivationError(
                            f"layer {name!r} produced NaN or inf activations; the measures would "
                            "be meaningless (check the model and its inputs)"
                        )
                bar.update(b)
            observer.check_seen()
    finally:
        bar.close()
    if not infos:
        raise ValueError("no layer was observed: the model has no leaf modules returning tensors")
    return states, infos, images


def evaluate(
    model: nn.Module,
    x: torch.Tensor | Dataset,
    ts,
    measures: Measure | Sequence[Measure],
    layers: Sequence[str] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    fill: float | Sequence[float] | None = None,
    progress: bool = True,
    backend: str = "auto",
    metadata: dict[str, Any] | None = None,
    blocks: int | None = None,
) -> dict[str, MeasureResult]:
    """Measure every observed layer of ``model`` under the transformation set ``ts``, in one pass.

    Args:
        model: any ``nn.Module`` taking images [B, C, H, W]; evaluated in eval mode, no gradients.
        x: samples, a float tensor [n, C, H, W] or a dataset of images or (image, label) pairs.
        ts: a transformation set (``len(ts) = m ≥ 2``, ``ts.apply(x) -> [b, m, C, H, W]``).
        measures: one measure or a list; all are fed from the same pass.
        layers: layer names to observe (module paths, ``path#k`` for the k-th call);
            default: ``model.layer_names()`` for the paper models (tmlib.models), else every leaf
            module, in order of first call.
        batch_size: samples per block; each forward sees ``batch_size·m`` images.
            Default: about 256 images per forward.
        device: where model, warps and accumulators run; None = the model's device
            (x's device for a model without parameters). Must match the model's device.
        fill: background value for warps; None = ``x.fill`` for tmlib datasets, else 0.
        progress: show a tqdm progress bar.
        backend: statistics kernel, ``"auto"`` (fused numba kernel on the CPU), ``"numba"``,
            ``"torch"``.
        metadata: extra entries for every result's metadata (e.g. ``{"model": "SimpleConv"}``).
        blocks: K ≥ 2 (at most n) for a delete-one-block jackknife of every layer mean, at no
            extra forward: the n samples are split into K contiguous blocks (:func:`block_bounds`:
            block k holds samples floor(k·n/K) … floor((k+1)·n/K) − 1), each block keeps its own
            states, and ``result.replicates`` holds, for every k, the layer means computed from
            the merge of all blocks but k (``layer_stderr()``, ``layer_intervals()``). The values
            themselves are those of the merge of all K blocks, equal to the unblocked values to
            rounding (rel 1e-12). Memory: K states per (statistic, layer) instead of one, plus one
            merged set while results are computed, i.e. about (K + 1)× the accumulators; for the
            variance family a layer of F activations costs (3m + 2)·F·8 bytes per block.
            Not available for ``GoodfellowMeasure`` (its thresholds are set on all n samples).

    Returns:
        ``{measure name: MeasureResult}`` in the order the measures were given.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(measures, Measure):
        measures = [measures]
    measures = list(measures)
    if not measures or not all(isinstance(mm, Measure) for mm in measures):
        raise TypeError("measures must be a Measure or a non-empty list of Measure objects")
    if not hasattr(ts, "apply") or not hasattr(ts, "__len__"):
        raise TypeError(f"ts must be a transformation set (tmlib.transforms), got {type(ts).__name__}")
    m = len(ts)
    if m < 2:
        raise ValueError(f"ts: a transformation set of at least 2 transformations is needed, got m={m}")
    if batch_size is None:
        batch_size = default_batch_size(m)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (samples per block), got {batch_size!r}")
    device = _resolve_device(model, x, device)
    if layers is None and callable(getattr(model, "layer_names", None)):
        layers = model.layer_names()  # paper models: the paper's layers, without flatten/dropout
    batches, n = _blocks(x, batch_size)
    if n < 2:
        raise ValueError(f"x: at least 2 samples are needed for the sample variance, got n={n}")
    if blocks is not None:
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 2 <= blocks <= n:
            raise ValueError(f"blocks must be None or an integer with 2 ≤ blocks ≤ n = {n}, got {blocks!r}")
        refusing = [mm.name for mm in measures if not getattr(mm, "supports_blocks", True)]
        if refusing:
            raise ValueError(
                f"blocks: {refusing} cannot give jackknife replicates: their thresholds are set on "
                "all n samples by the reference pass, so a replicate would need its own reference "
                "pass and threshold (see GoodfellowMeasure); measure them without blocks"
            )
    bounds = block_bounds(n, blocks or 1)
    if fill is None:
        fill = getattr(x, "fill", 0.0)
    if isinstance(fill, torch.Tensor):
        fill = fill.item() if fill.numel() == 1 else fill.flatten().tolist()
    if backend == "auto" and device.type == "cpu":
        _set_numba_threads()

    context = PassContext(m=m, n=n, device=device, backend=backend, ts=ts, fill=fill)
    images = 0
    # Restore each module's own mode afterwards (a frozen BatchNorm inside a training model stays frozen).
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        references: dict[Hashable, Measure] = {}
        kinds: dict[Hashable, Measure] = {}
        for measure in measures:  # the first measure of each statistic kind creates its states
            if measure.reference_key() is not None:
                references.setdefault(measure.reference_key(), measure)
            kinds.setdefault(measure.statistic_key(), measure)
        if references:
            # Untransformed samples only: n extra forwards, before the n·m of the main pass.
            ref_states, _, seen = _single_pass(
                # One image per sample: blocks of batch_size·m samples keep forwards as large.
                model, _blocks(x, batch_size * m)[0], lambda xb: xb, 1, layers, references,
                lambda measure, info: measure.new_reference_state(info, context),
                device, progress, "reference pass (untransformed)", n,
            )
            context.references = {key: per_block[0] for key, per_block in ref_states.items()}
            images += seen
        states, infos, seen = _single_pass(
            model, batches, lambda xb: ts.apply(xb, fill=fill), m, layers, kinds,
            lambda measure, info: measure.new_state(info, context),
            device, progress, f"measuring ({m} transformations)", n, bounds,
        )
        images += seen
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
    if blocks:
        base_meta.update(blocks=blocks, block_sizes=[b - a for a, b in zip(bounds[:-1], bounds[1:])])
    names = _unique_names(measures)
    full = {key: _merged(per_block) for key, per_block in states.items()}
    results = {name: _compute(measure, infos, full, base_meta, name) for measure, name in zip(measures, names)}
    del full
    if blocks:
        replicates: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for k in range(blocks):  # one leave-one-block-out set of states alive at a time
            rest = {key: _merged(per_block[:k] + per_block[k + 1 :]) for key, per_block in states.items()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the full results already warned
                for measure, name in zip(measures, names):
                    loo = _compute(measure, infos, rest, base_meta, name)
                    replicates[name].append({layer: finite_mean(v) for layer, v in loo.values.items()})
        for name in names:
            frame = pd.DataFrame(replicates[name], columns=results[name].layer_names, dtype=float)
            results[name].replicates = frame.rename_axis("block")
    return results


def _merged(per_block: list[Any]) -> Any:
    """One state for several sample blocks: the state itself for one block, else a merged copy."""
    if len(per_block) == 1:
        return per_block[0]
    merged = copy.deepcopy(per_block[0])
    for state in per_block[1:]:
        merged.merge(state)
    return merged


def _compute(measure: Measure, infos: dict[str, LayerInfo], states: dict, meta: dict, name: str) -> MeasureResult:
    measure.reset()
    key = measure.statistic_key()
    for layer, info in infos.items():
        measure.attach(info, states[(key, layer)])
    result = measure.compute(meta)
    result.measure = name
    result.metadata["measure"] = name
    return result
