"""The command line, ``python -m tmlib measure ...``: a model measured on a data set in one batch run.

:func:`main` returns the exit code (2 for a bad argument: one line on stderr). The measures and sets offered
come from :data:`MEASURES` and :data:`TRANSFORMATIONS`; under torchrun, :func:`process_group` sets up the
processes (rank 0 prints and writes)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from . import data, models, transforms
from . import measures as M
from .allocator import keep_freed_blocks
from .devices import resolve_device
from .distributed import init_from_environment, rank_device
from .experiments.zoo import ModelSpec, build_model
from .files import atomic_write
from .results import MeasureResult, save_results

__all__ = ["MEASURES", "TRANSFORMATIONS", "CLIError", "build_parser", "main", "process_group"]


class CLIError(Exception):
    """A bad argument found after parsing (e.g. a checkpoint that does not fit): one line, exit code 2."""


# ------------------------------------------------------------------------------ the tables


@dataclass(frozen=True)
class MeasureEntry:
    """A measure the command line offers: its class, and the keyword that ``--mode`` sets (None: none)."""

    cls: type[M.Measure]
    mode: str | None = None
    note: str = ""

    def options(self) -> dict[str, Any]:
        """The constructor's keywords and their defaults (what ``NAME:key=value`` may set)."""
        return {k: p.default for k, p in inspect.signature(self.cls).parameters.items()}


MEASURES: dict[str, MeasureEntry] = {
    "NV": MeasureEntry(M.NormalizedVariance, "mode"),
    "TV": MeasureEntry(M.TransformationVariance, "mode"),
    "SV": MeasureEntry(M.SampleVariance, "mode"),
    "ANOVA": MeasureEntry(M.AnovaMeasure),
    "Goodfellow": MeasureEntry(M.GoodfellowMeasure, note="not with --blocks"),
    "TD": MeasureEntry(M.TransformationDistance, "unit"),
    "SD": MeasureEntry(M.SampleDistance, "unit"),
    "ND": MeasureEntry(M.NormalizedDistance, "unit"),
    "NVSE": MeasureEntry(M.NormalizedVarianceSE, "mode"),
    "TVSE": MeasureEntry(M.TransformationVarianceSE, "mode"),
    "SVSE": MeasureEntry(M.SampleVarianceSE, "mode"),
    "DSES": MeasureEntry(M.DistanceSameEquivariance),
    "GEED-inv": MeasureEntry(M.GEEDInvariance),
    "GEED-KL": MeasureEntry(M.GEEDOutputKL),
    "GEED-eq": MeasureEntry(M.GEEDEquivariance, note="action 'spatial' or 'trivial' only: a callable or a "
                                                   "per-layer mapping needs Python"),
}


def _scale(m: int, min_scale: float, max_scale: float) -> transforms.TransformationSet:
    k, rest = divmod(m - 1, 3)
    if rest or k < 1:
        raise CLIError(f"--m: a scale set has m = 1 + 3k transformations (4, 7, …, 25, …), got {m}")
    return transforms.scales(n_down=k - k // 2, n_up=k // 2, min_scale=min_scale, max_scale=max_scale)


def _translation(m: int, max_shift: float) -> transforms.TransformationSet:
    for directions in (8, 4):
        k, rest = divmod(m - 1, directions)
        if not rest and k >= 1:
            return transforms.translations([round(max_shift * (i + 1) / k, 12) for i in range(k)], directions)
    raise CLIError(f"--m: a translation set has m = 1 + 8k or 1 + 4k transformations (5, 9, …, 25, …), got {m}")


@dataclass(frozen=True)
class TransformationEntry:
    """A transformation set the command line offers: its builder, the options it takes (defaults), a line of help."""

    build: Callable[..., transforms.TransformationSet]
    options: dict[str, Any] = field(default_factory=dict)
    help: str = ""


TRANSFORMATIONS: dict[str, TransformationEntry] = {
    "rotation": TransformationEntry(lambda m, degrees: transforms.rotations(m, degrees), {"m": 25, "degrees": 360.0},
                                    "m rotations: 0, 360/m, … for a full turn, else −degrees/2 … +degrees/2"),
    "scale": TransformationEntry(_scale, {"m": 25, "min_scale": 0.5, "max_scale": 1.25},
                                 "the identity and k = (m − 1)/3 factors (⌈k/2⌉ in [min, 1), ⌊k/2⌋ in (1, max]), "
                                 "each as (1, s), (s, 1), (s, s)"),
    "translation": TransformationEntry(_translation, {"m": 25, "max_shift": 0.15},
                                       "the identity and k shifts up to max-shift in 8 directions "
                                       "(m = 1 + 8k; 4 directions when only m = 1 + 4k fits)"),
    "combined": TransformationEntry(transforms.combined, {}, "the paper's 504: 8 rotations × 7 scales × 9 translations"),
    "c4": TransformationEntry(transforms.c4, {}, "the 4 quarter turns, exact (torch.rot90)"),
    "d4": TransformationEntry(transforms.d4, {}, "the 8 quarter turns and flips, exact"),
    "flips": TransformationEntry(transforms.flips, {}, "identity, horizontal and vertical flip, 180°, exact"),
}

_RANGE_OPTIONS = ("degrees", "min_scale", "max_scale", "max_shift")


def transformation_set(args: argparse.Namespace) -> transforms.TransformationSet:
    """The set ``--transformation`` names, with ``--m`` and the range options it takes."""
    entry = TRANSFORMATIONS[args.transformation]
    for option in _RANGE_OPTIONS:
        if getattr(args, option) is not None and option not in entry.options:
            takes = ", ".join(f"--{o.replace('_', '-')}" for o in entry.options) or "no range options"
            raise CLIError(f"--{option.replace('_', '-')} does not apply to --transformation "
                           f"{args.transformation} (it takes {takes})")
    kwargs = {k: default if getattr(args, k) is None else getattr(args, k) for k, default in entry.options.items()}
    try:
        ts = entry.build(**kwargs)
    except (ValueError, TypeError) as error:
        raise CLIError(f"--transformation {args.transformation}: {error}") from None
    if "m" not in entry.options and args.m is not None and args.m != len(ts):
        raise CLIError(f"--m: the {args.transformation} set has exactly {len(ts)} transformations, got {args.m}")
    return ts


# ------------------------------------------------------------------------------ parsing values


def _value(text: str) -> Any:
    """``NAME:key=value``'s value: a bool (true/false), an int, a float, else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def _measure_specs(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``NV:stat=var,TV`` → [("NV", {"stat": "var"}), ("TV", {})], names and keys checked."""
    lookup = {name.lower(): name for name in MEASURES}
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, *pairs = item.split(":")
        if name.lower() not in lookup:
            raise argparse.ArgumentTypeError(f"unknown measure {name!r}; known: {', '.join(MEASURES)}")
        name = lookup[name.lower()]
        allowed = MEASURES[name].options()
        options = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in allowed:
                raise argparse.ArgumentTypeError(f"{name}: {pair!r} is not key=value with a key of {name} "
                                                 f"({', '.join(allowed) or 'none'})")
            options[key] = _value(value)
        specs.append((name, options))
    if not specs:
        raise argparse.ArgumentTypeError("no measure named")
    return specs


def build_measures(args: argparse.Namespace) -> dict[str, M.Measure]:
    """``{result name: measure}`` (the short name; the full name where one is given twice): ``--mode``
    and ``--stat`` first, then each measure's own options."""
    counts = Counter(name for name, _ in args.measures)
    named: dict[str, M.Measure] = {}
    for name, options in args.measures:
        entry = MEASURES[name]
        kwargs = {entry.mode: args.mode} if args.mode and entry.mode else {}
        if args.stat and "stat" in entry.options():
            kwargs["stat"] = args.stat
        try:
            measure = entry.cls(**{**kwargs, **options})
        except (ValueError, TypeError) as error:
            raise CLIError(f"--measures: {name}: {error}") from None
        key = name if counts[name] == 1 else measure.name
        if key in named:
            raise CLIError(f"--measures: {measure.name} is given twice")
        named[key] = measure
    return named


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.strip().lstrip("+-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"an integer >= {minimum} is needed, got {text!r}")
        return int(text)

    return parse


# ------------------------------------------------------------------------------ model and data


def build_user_model(args: argparse.Namespace) -> nn.Module:
    """``--model`` as a tmlib model (sized for the data set, seeded as tmlib.experiments does) or
    ``module:callable`` (called with the ``--model-args`` after ``torch.manual_seed(--seed)``)."""
    kwargs = args.model_args
    if ":" in args.model:
        module_name, _, attribute = args.model.partition(":")
        try:
            builder = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise CLIError(f"--model {args.model}: cannot import it ({type(error).__name__}: {error})") from None
        torch.manual_seed(args.seed)
        try:
            model = builder(**kwargs)
        except (ValueError, TypeError) as error:
            raise CLIError(f"--model {args.model}: {error}") from None
        if not isinstance(model, nn.Module):
            raise CLIError(f"--model {args.model} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    registry = {**models.MODELS, **models.EXTRA_MODELS}
    name = {n.lower(): n for n in registry}.get(args.model.lower())
    if name is None:
        raise CLIError(f"--model: unknown model {args.model!r}; tmlib models: {', '.join(registry)} "
                       "(or module:callable for your own)")
    parameters = inspect.signature(registry[name]).parameters
    sized = ("in_channels", "num_classes", "image_size")
    fixed, unknown = sorted(set(sized) & set(kwargs)), sorted(set(kwargs) - set(parameters))
    if fixed or unknown:
        why = f"{', '.join(fixed)}: set by --dataset" if fixed else f"{name} takes no {', '.join(unknown)}"
        raise CLIError(f"--model-args: {why}; it takes {', '.join(p for p in parameters if p not in sized)}")
    try:
        return build_model(ModelSpec(architecture=name, dataset=args.dataset, init_seed=args.seed, options=kwargs))
    except (ValueError, TypeError) as error:
        raise CLIError(f"--model-args: {error}") from None


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a ``tmlib.train`` checkpoint (its ``state_dict``) or a plain state dict into ``model``."""
    if not Path(path).is_file():
        raise CLIError(f"--checkpoint: no such file {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever torch.load refuses, the file is the problem
        raise CLIError(f"--checkpoint: cannot read {path} ({type(error).__name__})") from None
    state = saved.get("state_dict") if isinstance(saved, dict) and isinstance(saved.get("state_dict"), dict) else saved
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"--checkpoint: {path} holds neither a state dict nor a tmlib.train checkpoint")
    own = model.state_dict()
    problems = [("missing", [k for k in own if k not in state]), ("unexpected", [k for k in state if k not in own]),
                ("shapes (file vs model)", [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
                                            if k in state and state[k].shape != v.shape])]
    found = [f"{kind}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}" for kind, keys in problems if keys]
    if found:
        raise CLIError(f"--checkpoint: {path} does not fit {type(model).__name__} ({'; '.join(found)})")
    model.load_state_dict(state)


def load_data(args: argparse.Namespace) -> data.ImageDataset:
    """The class-balanced ``--n`` images of ``--split``, from disk only (no download)."""
    try:
        return data.load(args.dataset, split=args.split, n=args.n, root=args.data_root, download=False)
    except ValueError as error:  # n larger than the split (or than a class allows)
        raise CLIError(f"--n: {error}") from None
    except (FileNotFoundError, RuntimeError) as error:  # not on disk, or a damaged cache
        hint = "" if "tmlib.data fetch" in str(error) else f" (or `python -m tmlib.data fetch {args.dataset}`)"
        raise CLIError(f"--dataset {args.dataset}: {error}{hint}") from None


# ------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Run:
    """This process: its rank (rank 0 prints and writes), where it measures, what it adds to ``evaluate``."""

    rank: int = 0
    world_size: int = 1
    device: str | None = None
    evaluate_kwargs: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def process_group(distributed: bool | None, device: str | None = None) -> Iterator[Run]:
    """One process, or (``distributed``; None: under torchrun) a process group from torchrun's environment,
    destroyed on exit, and ``evaluate`` gets ``distributed=True``. With CUDA each process uses the GPU ``LOCAL_RANK`` unless ``device`` names one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not (distributed or (distributed is None and world_size > 1)):
        yield Run(rank=int(os.environ.get("RANK", "0")), device=device)
        return
    owned = not dist.is_initialized()
    if owned:
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise CLIError(f"--distributed: {', '.join(missing)} not set; launch with "
                           "`torchrun --nproc_per_node=N -m tmlib measure ...`")
        init_from_environment()  # NCCL on cuda:LOCAL_RANK where CUDA is present, else gloo
    try:
        if device in (None, "cuda") and torch.cuda.is_available():  # one GPU per process
            device = str(rank_device(device))
        yield Run(dist.get_rank(), dist.get_world_size(), device, {"distributed": True})
    finally:
        if owned:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ output


def write_outputs(results: dict[str, MeasureResult], out: Path) -> tuple[Path, Path]:
    """Every result in one ``.npz`` and their tidy frames in a ``.csv`` beside it (same stem)."""
    npz = save_results(results, out)
    frames = [r.to_frame().assign(measure=name) for name, r in results.items()]
    frame = pd.concat(frames, ignore_index=True)
    frame = frame[["measure", *[c for c in frame.columns if c != "measure"]]]
    csv = atomic_write(out.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False))
    return npz, csv


def measure(args: argparse.Namespace) -> int:
    """``python -m tmlib measure``: build, load, measure, write (rank 0)."""
    if args.out.suffix != ".npz":
        raise CLIError(f"--out: a path ending in .npz is needed, got {str(args.out)!r}")
    measures = build_measures(args)
    ts = transformation_set(args)
    with process_group(args.distributed, args.device) as run:
        device = resolve_device(run.device, argument="--device") if run.device is not None else None
        model = build_user_model(args)
        if args.checkpoint is not None:
            load_checkpoint(model, args.checkpoint)
        x = load_data(args)
        metadata = {"checkpoint": args.checkpoint, "init_seed": args.seed, "split": args.split}
        results = M.evaluate(model, x, ts, measures, layers=args.layers, batch_size=args.batch_size, device=device,
                           progress=not args.no_progress and run.rank == 0, metadata=metadata, blocks=args.blocks,
                           **run.evaluate_kwargs)
        if run.rank == 0:
            npz, csv = write_outputs(results, args.out)
            print(f"{type(model).__name__} on {len(x)} {x.name} {x.split} images × {len(ts)} ({ts.name}); "
                  "layer means:")
            table = pd.concat({name: r.layer_means() for name, r in results.items()}, axis=1, sort=False)
            print(table.rename_axis(None).to_string(float_format=lambda v: f"{v:.4g}", na_rep="-"))
            print(f"wrote {npz}\nwrote {csv}")
    return 0


# ------------------------------------------------------------------------------ the parser


class _Parser(argparse.ArgumentParser):
    """Errors as one line, ``tmlib measure: error: ...``, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog.removeprefix('python -m ')}: error: {message}\n")


def _measures_epilog() -> str:
    lines = ["measures (NAME:key=value options; defaults shown):"]
    for name, entry in MEASURES.items():
        options = ", ".join(f"{k}={v}" for k, v in entry.options().items()) or "no options"
        note = f"; {entry.note}" if entry.note else ""
        lines.append(f"  {name:<11}{entry.cls.__name__}: {options}{note}")
    lines += ["", "transformations (--m and range options they take, defaults):"]
    for name, entry in TRANSFORMATIONS.items():
        options = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in entry.options.items()) or "fixed"
        lines.append(f"  {name:<12}{options}: {entry.help}")
    lines += ["", "output: --out X.npz (every measure: MeasureResult.load(X.npz, measure='NV'), load_results) and "
              "X.csv (tidy: one row per measure and layer).", "under torchrun, write --n-samples and "
              "--n-transformations: torchrun's own parser takes --n and --m for abbreviations of its options."]
    return "\n".join(lines)


def _json_dict(text: str) -> dict[str, Any]:
    with contextlib.suppress(json.JSONDecodeError):
        if isinstance(value := json.loads(text), dict):
            return value
    raise argparse.ArgumentTypeError(f"a JSON object of keyword arguments is needed, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tmlib", description="tmlib: invariance and equivariance of every layer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("measure", help="measure a model's layers on a data set; write .npz and .csv",
                       description="Measure how invariant every layer of a model is, in one pass over the data.",
                       epilog=_measures_epilog(),
                       formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32))
    p.set_defaults(run=measure)
    add = p.add_argument
    add("--model", required=True, metavar="NAME|module:callable",
        help=f"a tmlib model ({', '.join({**models.MODELS, **models.EXTRA_MODELS})}), sized for --dataset, or "
             "module:callable, your builder returning an nn.Module")
    add("--model-args", type=_json_dict, default={}, metavar="JSON",
        help="keyword arguments of the model or builder, a JSON object, e.g. '{\"filters\": 64}' (default: {})")
    add("--checkpoint", metavar="PATH",
        help="weights: a tmlib.train checkpoint or a plain state dict (default: none, the untrained model of --seed)")
    add("--seed", type=int, default=0, help="torch.manual_seed before the model is built (default: 0)")
    add("--dataset", required=True, choices=list(data.DATASETS), help="data set, read from --data-root")
    add("--split", choices=list(data.SPLITS), default="test", help="split (default: test)")
    add("--n", "--n-samples", type=_int_at_least(2), default=1000,
        help="samples: a class-balanced subset of the split (default: 1000)")
    add("--data-root", default="data", metavar="DIR",
        help="data folder; relative paths from the project root (default: data)")
    add("--transformation", required=True, choices=list(TRANSFORMATIONS), help="the transformation set (see below)")
    add("--m", "--n-transformations", type=_int_at_least(2),
        help="number of transformations (default: 25 for rotation, scale, translation)")
    add("--degrees", type=float, help="rotation: the range of angles in degrees, 360 = a full turn (default: 360)")
    add("--min-scale", type=float, help="scale: the smallest scale factor, 1 = unchanged (default: 0.5)")
    add("--max-scale", type=float, help="scale: the largest scale factor (default: 1.25)")
    add("--max-shift", type=float,
        help="translation: the largest shift as a fraction of the image size, not pixels: 0.15 = 15 %% of the "
             "width (default: 0.15)")
    add("--measures", required=True, type=_measure_specs, metavar="NAME[:key=value...],...",
        help="comma-separated measures, each with options, e.g. NV:stat=var,TV,SV (see below)")
    add("--mode", choices=["element", "channel"],
        help="one value per activation or per feature map, for every measure that takes it (mode, or unit for "
             "TD/SD/ND) (default: each measure's own: element)")
    add("--stat", choices=["std", "var"],
        help="standard deviations or variances, for every measure that takes it (default: std)")
    add("--layers", type=lambda text: [part.strip() for part in text.split(",") if part.strip()], metavar="A,B,...",
        help="layers to measure (default: every layer)")
    add("--batch-size", type=_int_at_least(1), metavar="B",
        help="samples per block; a forward sees B·m images (default: about 256 images per forward)")
    add("--blocks", type=_int_at_least(2), metavar="K",
        help="jackknife: K blocks of samples, standard errors and 95 %% intervals (default: none)")
    add("--device", help="where to measure: cpu, cuda, cuda:1 (default: where the model is, the CPU; "
                         "under torchrun with CUDA, the GPU of LOCAL_RANK)")
    add("--distributed", action=argparse.BooleanOptionalAction, default=None,
        help="split the samples over a torch.distributed process group (default: when launched by torchrun)")
    add("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)")
    add("--out", required=True, type=Path, metavar="PATH.npz",
        help="results file; a tidy .csv of layer means is written beside it (same stem)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 for a bad argument)."""
    parser = build_parser()
    keep_freed_blocks()  # a process of tmlib's own: the forwards reuse their blocks (tmlib.allocator)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a bad argument (2), already reported
        return stop.code if isinstance(stop.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError) as error:
        message = " ".join(str(error).split())
        print(f"tmlib {args.command}: error: {message}", file=sys.stderr)
        return 2
