"""Measuring across processes and GPUs with torch.distributed (``torchrun``, NCCL, gloo, Slurm).

tmlib does not launch or own the processes: it runs inside the process group the user's launcher
made. When ``torch.distributed`` is initialised (or ``distributed=True`` is passed to
:func:`tmlib.measures.evaluate`), every rank

1. checks, before any forward, that all ranks hold the same model (sha256 of every parameter and
   buffer), the same transformation matrices, the same n, the same measures and layers, and the
   same first and last samples (:func:`fingerprint`, :func:`check_same`): a difference is a
   :class:`RankMismatchError` on every rank naming what differs and on which rank;
2. measures only its own contiguous share of the n samples (:func:`rank_share`: rank r of W takes
   samples ``floor(r·n/W) … floor((r+1)·n/W) − 1``; with ``blocks=K`` it takes whole jackknife
   blocks ``floor(r·K/W) …``), reading a dataset only at those indices, on its own device
   (:func:`rank_device`: ``cuda:LOCAL_RANK`` where CUDA is present, else the CPU);
3. sends its states to the others and merges everybody's in rank order (:func:`gather`): the
   states are exact and mergeable (:mod:`tmlib.measures.states`), so every rank computes the same
   results, equal to those of one process over all n samples to float64 rounding.

A gloo group serves models on CUDA too (the states travel as CPU bytes), so a CPU process group
with CUDA tensors is not an error; an NCCL group needs a GPU per rank, which :func:`rank_device`
picks.

Why gather and merge rather than all-reduce: the merge is the one already tested against a
single pass for every family (Chan's shift change for moments, Goodfellow's certified top-K,
chunk lists in sample order), every rank runs the same merge on the same bytes and so returns
bit-identical results, and states travel as CPU bytes, so a gloo group can serve models on
CUDA. The states are sent one rank at a time (a broadcast per rank), so a rank holds its own
states, the running merge and one incoming set, never all W sets at once.

A rank that raises stops the others cleanly: each step runs under :func:`run_guarded`, which
exchanges every rank's outcome before the next collective, so all ranks raise (a failing rank its
own error, the others :class:`RankFailedError` naming it and its message). A rank
that dies or hangs is caught by the process group's own timeout (``init_process_group(timeout=)``,
:func:`init_from_environment`'s ``timeout_s``), after which the collectives raise.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .adapters import default_fill, first_tensor, image_blocks, subset
from .checks import check_module, check_transformation_set
from .devices import resolve_device
from .measures.base import Measure
from .measures.collection import named_measures

__all__ = [
    "RankFailedError",
    "collect_across_ranks",
    "RankMismatchError",
    "active",
    "check_same",
    "fingerprint",
    "gather",
    "init_from_environment",
    "rank_device",
    "rank_share",
    "run_guarded",
    "share_samples",
    "world",
]

T = TypeVar("T")

_ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankMismatchError(ValueError):
    """The ranks of a distributed measurement do not hold the same model, data or measures."""


class RankFailedError(RuntimeError):
    """Another rank of a distributed measurement raised; this rank stopped with it."""


def init_from_environment(timeout_s: float = 1800.0, backend: str | None = None) -> None:
    """Initialise the default process group from the variables torchrun (or a Slurm script) sets:
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (LOCAL_RANK for the GPU). ``backend``: None = NCCL
    where CUDA is present, else gloo. ``timeout_s`` bounds every collective: a rank that dies or
    hangs makes the others raise after that long instead of waiting for ever."""
    if dist.is_initialized():
        return
    missing = [v for v in _ENVIRONMENT if v not in os.environ]
    if missing:
        raise ValueError(
            f"distributed=True: no process group is initialised and {missing} are not set; launch with "
            "torchrun (e.g. torchrun --nproc_per_node=2 script.py) or call torch.distributed.init_process_group"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def active(distributed: bool | None) -> bool:
    """Whether a call with ``distributed=`` runs across ranks: None = when a process group is
    initialised; True = always (initialising one from the environment if needed); False = never."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    if distributed is False or not dist.is_available():
        if distributed:
            raise ValueError("distributed=True: this build of torch has no torch.distributed")
        return False
    if distributed:
        init_from_environment()
    return dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group."""
    return dist.get_rank(), dist.get_world_size()


def rank_share(n: int, world_size: int, rank: int, blocks: int | None = None) -> tuple[int, int, list[int]]:
    """The samples of ``rank``: (first, stop, local block bounds).

    Without blocks, rank r takes ``floor(r·n/W) ≤ i < floor((r+1)·n/W)`` (shares differ by at most
    one sample) and its local bounds are ``[0, stop − first]``. With ``blocks=K`` (K ≥ W) the n
    samples are first cut into K jackknife blocks (:func:`tmlib.engine.block_bounds`) and rank r
    takes the whole blocks ``floor(r·K/W) …``, so the ranks' blocks, concatenated in rank order,
    are the K blocks of one process."""
    if n < world_size:
        raise ValueError(f"x: {n} samples cannot be shared by {world_size} ranks: every rank needs at least one "
                         "sample (measure more samples or start fewer processes)")
    if blocks is None:
        first, stop = rank * n // world_size, (rank + 1) * n // world_size
        return first, stop, [0, stop - first]
    if blocks < world_size:
        raise ValueError(f"blocks={blocks}: with {world_size} ranks every rank needs at least one jackknife block; "
                         f"use blocks ≥ {world_size}")
    bounds = [k * n // blocks for k in range(blocks + 1)]
    lo, hi = rank * blocks // world_size, (rank + 1) * blocks // world_size
    first = bounds[lo]
    return first, bounds[hi], [b - first for b in bounds[lo : hi + 1]]


def rank_device(device: Any, model: torch.nn.Module | None = None, x: Any = None) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` where CUDA is present and ``device`` is None or a
    CUDA device without an index (LOCAL_RANK from the environment, else rank mod the GPUs
    present), else :func:`tmlib.devices.resolve_device` (the model's device for None)."""
    wants_cuda = device is None or str(device) == "cuda"
    if wants_cuda and torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else dist.get_rank() % torch.cuda.device_count()
        if local >= torch.cuda.device_count():
            raise ValueError(f"device: LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s); start at most one process per GPU (torchrun --nproc_per_node) or pass "
                             "device='cpu'")
        torch.cuda.set_device(local)  # NCCL's object collectives use the current device
        return torch.device("cuda", local)
    return resolve_device(device, model, x)


def _digest(tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: Any, ts: Any, n: int, first_last: Sequence[torch.Tensor], **settings: Any) -> dict[str, str]:
    """What every rank must agree on, as short strings: the model's parameters and buffers
    (sha256; a plain function: its qualified name), the transformation set and its matrices
    (sha256; ``ts=None`` for none), n, the first and last sample (sha256), and ``settings``
    (measures, layers, blocks, fill, … by their repr)."""
    if isinstance(model, torch.nn.Module):
        out = {"model parameters and buffers (sha256)": _digest(list(model.state_dict(keep_vars=False).items()))}
    else:
        out = {"model (a function)": getattr(model, "__qualname__", type(model).__name__)}
    out.update({"n (samples)": str(n),
                "first and last sample (sha256)": _digest([(str(i), t) for i, t in enumerate(first_last)])})
    if ts is not None:
        out["transformation set"] = f"{getattr(ts, 'name', type(ts).__name__)}, m={len(ts)}"
        matrices = getattr(ts, "matrices", None)
        if isinstance(matrices, torch.Tensor):
            out["transformation matrices (sha256)"] = _digest([("matrices", matrices)])
    out.update({key: repr(value) for key, value in settings.items()})
    return out


def _short(value: str) -> str:
    return value[:12] + "…" if len(value) > 16 and all(c in "0123456789abcdef" for c in value) else value


def check_same(mine: dict[str, str]) -> None:
    """Gather every rank's :func:`fingerprint` and raise :class:`RankMismatchError` on every rank
    when any differs from rank 0's, naming the entries and ranks."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    reference = everyone[0]
    problems = []
    for key, value in reference.items():
        differing = {r: fp.get(key) for r, fp in enumerate(everyone) if fp.get(key) != value}
        if differing:
            others = ", ".join(f"rank {r}: {_short(str(v))}" for r, v in differing.items())
            problems.append(f"{key} (rank 0: {_short(value)}; {others})")
    if problems:
        raise RankMismatchError(
            "distributed: the ranks do not measure the same thing — " + "; ".join(problems)
            + ". Every rank must build the same model (same checkpoint or seed), transformation set, "
            "data and measures (or pass distributed=False to measure in each process alone)"
        )


def run_guarded(step: Callable[[], T], what: str) -> T:
    """Run ``step`` on every rank, then exchange the outcomes: if any rank raised, every rank
    raises — a rank that failed its own exception, the others :class:`RankFailedError` naming the
    ranks that failed and why (nobody waits in the next collective for a rank that has stopped)."""
    error: BaseException | None = None
    out: Any = None
    try:
        out = step()
    except Exception as caught:  # noqa: BLE001 - reported to every rank, then re-raised
        error = caught
    outcomes: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}")
    except RuntimeError as broken:  # a rank died (connection reset) or the group's timeout expired
        raise RankFailedError(
            f"distributed: a rank stopped without reporting during {what} (it died, or did not answer "
            f"within the process group's timeout): {broken}") from error or broken
    failed = {r: o for r, o in enumerate(outcomes) if o is not None}
    if not failed:
        return out
    if error is not None:
        raise error
    listed = "; ".join(f"rank {r}: {o}" for r, o in failed.items())
    raise RankFailedError(f"distributed: {what} failed on {len(failed)} of {len(outcomes)} ranks — {listed}")


def share_samples(distributed: bool | None, model: Any, x: torch.Tensor, blocks: int | None,
                  **settings: Any) -> tuple[int, int] | None:
    """For measurements that loop over the samples x [n, …] themselves (LEE, LieGG): None when
    ``distributed`` says this process measures alone; else, after checking that every rank has
    the same model, n, first and last sample and ``settings`` (:func:`check_same`), this rank's
    samples ``(first, stop)`` (:func:`rank_share`)."""
    if not active(distributed):
        return None
    rank, size = world()
    n = x.shape[0]

    def prepare() -> tuple[int, int, dict[str, str]]:
        first, stop, _ = rank_share(n, size, rank, blocks)
        return first, stop, fingerprint(model, None, n, [x[0], x[n - 1]], blocks=blocks, **settings)

    first, stop, mine = run_guarded(prepare, "preparing the measurement")
    check_same(mine)
    return first, stop


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def gather(obj: Any, map_location: str | torch.device = "cpu",
           fold: Callable[[Any, Any], Any] | None = None) -> tuple[Any, float]:
    """Every rank's ``obj`` (picklable: states, tensors, dicts) on every rank, in rank order,
    loaded onto ``map_location``: a list, or with ``fold`` the running ``fold(acc, next)`` (then
    only the running result and one incoming object are held). Also returns the seconds spent in
    the collectives. Each rank's bytes are broadcast in turn; this rank's own object comes back
    through the same bytes, so every rank holds identical copies."""
    mine = _to_bytes(obj)
    items: list[Any] = []
    acc: Any = None
    seconds = 0.0
    for src in range(dist.get_world_size()):
        box = [mine if src == dist.get_rank() else None]
        start = time.perf_counter()
        dist.broadcast_object_list(box, src=src)
        seconds += time.perf_counter() - start
        item = torch.load(io.BytesIO(box[0]), map_location=map_location, weights_only=False)
        del box
        if fold is None:
            items.append(item)
        else:
            acc = item if src == 0 else fold(acc, item)
    return (items if fold is None else acc), seconds


def collect_across_ranks(run_part: Callable, run_references: Callable, check_blocks: Callable, model: Any, x: Any,
                         ts: Any, measures: Any, *, layers, batch_size, device, fill, progress, backend, metadata,
                         blocks, statistics) -> Any:
    """:func:`tmlib.measures.collect` on every rank of the process group (the module docstring
    says how). The engine passes its own single-process pieces: ``run_part`` (its ``_collect``,
    for this rank's samples), ``run_references`` (``collect_references``) and ``check_blocks``."""
    rank, size = world()
    named = named_measures(measures) if (isinstance(measures, Measure) or measures) else {}

    def prepare():
        check_module(model)
        check_transformation_set(ts)
        _, n = image_blocks(x, 1)
        check_blocks(blocks, n, list(named.values()))
        if any(s.reference_spec() is not None for s in statistics):
            raise ValueError("statistics: extra statistics with a reference pass are not measured across ranks")
        share = rank_share(n, size, rank, blocks)
        ends = [x[0], x[n - 1]] if isinstance(x, torch.Tensor) else [first_tensor(x[0]), first_tensor(x[n - 1])]
        fp = fingerprint(model, ts, n, ends, measures=[(k, repr(v)) for k, v in named.items()],
                         statistics=list(statistics), layers=layers, blocks=blocks, fill=default_fill(x, fill))
        return n, share, rank_device(device, model, x), fp

    n, (first, stop, bounds), here, fp = run_guarded(prepare, "preparing the pass")
    check_same(fp)
    part = x[first:stop] if isinstance(x, torch.Tensor) else subset(x, range(first, stop))
    meta = dict(metadata or {})
    if not isinstance(x, torch.Tensor):
        meta.setdefault("dataset", getattr(x, "name", None))
    shown = progress if rank == 0 else False
    fill = default_fill(x, fill)
    seconds = {"reference": 0.0, "pass": 0.0, "collectives": 0.0}
    references, reference_images = None, 0
    if any(mm.spec().reference_spec() is not None for mm in named.values()):
        clock = time.perf_counter()
        mine = run_guarded(
            lambda: run_references(model, part, ts, named, n_total=n, start=first, layers=layers,
                                       batch_size=batch_size, device=here, progress=shown, backend=backend),
            "the reference pass")
        seconds["reference"] = time.perf_counter() - clock
        reference_images = mine.metadata["images_forwarded"]
        references, spent = gather(mine, here, fold=lambda a, b: a.merge(b))
        seconds["collectives"] += spent
    clock = time.perf_counter()
    mine = run_guarded(
        lambda: run_part(model, part, ts, measures, layers, batch_size, here, fill, shown, backend, meta, blocks,
                         statistics, references, first, n_total=n, bounds=bounds, blocked=bool(blocks)),
        "the pass")
    seconds["pass"] = time.perf_counter() - clock
    images = mine.metadata["images_forwarded"] + reference_images
    merged, spent = gather(mine, "cpu", fold=lambda a, b: a.merge(b))
    seconds["collectives"] += spent
    ranks: list[Any] = [None] * size
    dist.all_gather_object(ranks, (stop - first, str(here), images, seconds))
    for key in ("start", "shared_reference_pass", "merged_passes"):
        merged.metadata.pop(key, None)
    merged.metadata.update(
        n=n, device=ranks[0][1], images_forwarded=sum(r[2] for r in ranks),
        distributed={"world_size": size, "backend": str(dist.get_backend()),
                     "rank_samples": [r[0] for r in ranks], "rank_devices": [r[1] for r in ranks],
                     "rank_images_forwarded": [r[2] for r in ranks],
                     "rank_seconds": [{k: round(v, 4) for k, v in r[3].items()} for r in ranks]},
    )
    return merged
