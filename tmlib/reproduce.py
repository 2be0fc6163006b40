"""Run every notebook of the reproduction through papermill: ``make reproduce`` calls this.

1. **Training stage.** Every model that any notebook needs (its design, :mod:`tmlib.experiments.
   designs`) is trained first, in ``--jobs`` processes of one thread each (two single-thread
   trainings on 2 cores do ~1.4× the work of one two-thread training), longest first; a model
   already in the cache is only loaded. Training uses a fixed thread count, so the weights are the
   same as when a notebook trains the model itself.
2. **Notebooks.** Each notebook runs with the parameters of a profile (``quick``: 2 CPU cores;
   ``paper``: the papers' settings, for a GPU), its executed copy lands in ``results/<profile>/``,
   and a ``.done`` marker is written atomically once it finishes, so a rerun after an interruption
   skips what was finished and runs the rest. The run ends with a summary table (status, wall
   time, key number per notebook).

``--plan`` prints, per notebook, the models to train (images × epoch cap) and the passes to
measure (forwards, peak accumulator memory) without running anything. ``--device`` chooses where
models train and are measured (default: CUDA when available, else the CPU). Ctrl-C stops the run
with one line saying where; a rerun resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import pandas as pd

from .allocator import keep_freed_blocks
from .paths import resolve
from .results import atomic_write

__all__ = ["NOTEBOOKS", "PROFILES", "plan", "report", "run", "train_all"]

PROFILES = ("quick", "paper")

# name → parameters per profile (on top of the notebook's own defaults, which are the quick ones).
NOTEBOOKS: dict[str, dict[str, dict[str, Any]]] = {
    "00_quickstart": {"quick": {}, "paper": {"n_rotations": 25}},
    # The experiment notebooks take their sizes from tmlib.experiments.PROFILES[profile].
    "01_validation": {"quick": {}, "paper": {}},
    "02_random_init": {"quick": {}, "paper": {}},
    "03_dataset_transformation": {"quick": {}, "paper": {}},
    "04_model_comparison": {"quick": {}, "paper": {}},
    "05_sample_size": {"quick": {}, "paper": {}},
    "06_architecture": {"quick": {}, "paper": {}},
    "07_measure_comparison": {"quick": {}, "paper": {}},
    "08_same_equivariance": {"quick": {}, "paper": {}},
    "09_kvinge": {"quick": {}, "paper": {"steerable_fields": [16, 32, 64]}},
    "10_liegg": {"quick": {}, "paper": {}},
    "11_lie_derivative": {"quick": {}, "paper": {}},
    "12_explorer": {"quick": {}, "paper": {}},
}

# Parameters every notebook takes that are bookkeeping, not part of its design.
_BOOKKEEPING = ("profile", "results_dir", "figures_dir", "data_root", "models_dir", "check_claims", "progress",
                "device")


def _summary_path(name: str, results_dir: str | Path = "results", profile: str | None = None) -> Path:
    folder = resolve(results_dir) / "summaries"
    return folder / (f"{name}.json" if profile is None else f"{profile}-{name}.json")


def report(name: str, key: str, value: Any, results_dir: str | Path = "results", profile: str | None = None) -> None:
    """Called at the end of a notebook: the key number that the summary table shows for it.

    Notebooks pass their ``profile`` so that quick and paper runs keep separate numbers."""
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES} or None, got {profile!r}")
    payload = json.dumps({"key": key, "value": value}, default=float)
    atomic_write(_summary_path(name, results_dir, profile), lambda tmp: Path(tmp).write_text(payload))


def _params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- designs


def _designs(profile: str, names: list[str], notebooks: dict) -> dict[str, Any]:
    """The design of each notebook that has one, with the runner's parameters."""
    from .experiments.designs import DESIGNS, design

    out = {}
    for name in names:
        if name in DESIGNS:
            params = {k: v for k, v in notebooks[name][profile].items() if k not in _BOOKKEEPING}
            out[name] = design(name, profile, **params)
    return out


def plan(profile: str = "quick", names: list[str] | None = None,
         notebooks: dict[str, dict[str, dict[str, Any]]] | None = None) -> dict[str, dict[str, pd.DataFrame]]:
    """Per notebook: the models it trains and the passes it measures (see Design.plan); nothing runs."""
    notebooks = NOTEBOOKS if notebooks is None else notebooks
    return {name: d.plan() for name, d in _designs(profile, names or list(notebooks), notebooks).items()}


def _print_plan(profile: str, plans: dict[str, dict[str, pd.DataFrame]]) -> None:
    total_models, total_forwards = set(), 0
    for name, tables in plans.items():
        train_table, measure_table = tables["train"], tables["measure"]
        print(f"\n== {name} ({profile})")
        if len(train_table):
            print(f"models to train: {len(train_table)}")
            print(train_table.to_string(index=False))
            total_models.update(map(tuple, train_table[["architecture", "dataset", "augment", "seed"]].values))
        if len(measure_table):
            forwards = int(measure_table["forwards"].sum())
            total_forwards += forwards
            print(f"passes: {len(measure_table)}, forwards {forwards:,}, "
                  f"peak accumulator memory {measure_table['peak accumulator MiB'].max():.0f} MiB")
            print(measure_table.to_string(index=False))
    print(f"\nin all: {len(total_models)} distinct trained models, {total_forwards:,} forwards to measure")


# ------------------------------------------------------------------------------ training stage


def _train_job(spec: Any, data_root: str, models_dir: str, device: str | None, threads: int,
               n_test: int | None = None) -> dict[str, Any]:
    """In a worker process: train (or load) one model; its history and evaluation."""
    import torch

    torch.set_num_threads(threads)
    from .experiments.zoo import trained_model

    start = time.perf_counter()
    model = trained_model(spec, data_root, models_dir, progress=False, device=device, n_test=n_test)
    history = model.training_history
    return {"cached": history["cached"], "images": history.get("images"), "seconds": time.perf_counter() - start,
            "evaluation": model.evaluation}


def _cost(spec: Any) -> float:
    """A rough ordering key: longer trainings first, so that two workers finish together."""
    weight = {"ResNet": 6, "VGG16D": 4, "AllConvolutional": 4, "TIPooling": 5, "SteerableCNN": 4, "MLP": 0.5}
    augmented = 3 if spec.augment in ("rotation",) else 1.5 if spec.augment else 1
    hard = 2 if spec.dataset == "fashion-mnist" else 1
    kernel = (spec.options.get("kernel_size", 3) / 3) ** 2
    return weight.get(spec.architecture, 1) * augmented * hard * kernel


def train_all(profile: str = "quick", names: list[str] | None = None, jobs: int = 2, data_root: str = "data",
              models_dir: str = "data/models", device: str | None = None,
              notebooks: dict[str, dict[str, dict[str, Any]]] | None = None) -> pd.DataFrame:
    """Train every model the notebooks need, ``jobs`` processes at a time (one thread each on the
    CPU; one process on a GPU). Returns a table: model, cached, images, seconds, accuracy, met."""
    notebooks = NOTEBOOKS if notebooks is None else notebooks
    designs = _designs(profile, names or list(notebooks), notebooks)
    specs: dict[Any, int | None] = {}  # spec → the n_test its notebook evaluates it on
    later: dict[Any, None] = {}  # fine-tuned models wait for their source
    for d in designs.values():
        for spec in d.specs():
            specs.setdefault(spec, d.settings.get("n_test"))
        for source, spec in d.pretrained.values():
            later.setdefault((source, spec))
    ordered = sorted(specs, key=_cost, reverse=True)
    gpu = (device or "").startswith("cuda") or (device is None and _cuda())
    jobs = 1 if gpu else max(1, jobs)
    threads = 1 if jobs > 1 else max(1, os.cpu_count() or 1)
    rows = []
    print(f"training stage: {len(ordered)} models ({len(later)} fine-tuned after them), {jobs} process(es)",
          flush=True)
    start = time.perf_counter()
    if jobs == 1:
        for i, spec in enumerate(ordered, 1):
            rows.append(_finished(spec, _train_job(spec, data_root, models_dir, device, threads, specs[spec]), i,
                                  len(ordered)))
    else:
        import multiprocessing

        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        pending = {pool.submit(_train_job, spec, data_root, models_dir, device, threads, specs[spec]): spec
                   for spec in ordered}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    spec = pending.pop(future)
                    try:
                        rows.append(_finished(spec, future.result(), len(rows) + 1, len(ordered)))
                    except Exception as error:  # the notebook will retrain it and fail with the message
                        print(f"  ! {spec.label()} seed {spec.init_seed}: {type(error).__name__}: {error}", flush=True)
        except BaseException:
            # Ctrl-C: stop the workers now (a model half-trained is not cached; finished ones are) and
            # let the caller print its one line, instead of a traceback per worker.
            _stop(pool)
            raise
        pool.shutdown()
    if later:
        from .experiments.zoo import fine_tuned_model

        for source, spec in later:
            model = fine_tuned_model(source, spec, data_root, models_dir, progress=False, device=device)
            print(f"  fine-tuned {spec.label()} from {source.dataset}: {model.evaluation}", flush=True)
    print(f"training stage done in {time.perf_counter() - start:.0f} s", flush=True)
    return pd.DataFrame(rows)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the running workers."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    # Cancel here, not only through shutdown(cancel_futures=True): the executor's thread does that
    # later, and if it first sees the workers terminated it fails the waiting jobs instead.
    for item in list((getattr(pool, "_pending_work_items", None) or {}).values()):
        item.future.cancel()  # False (and nothing done) for a job already handed to a worker
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _finished(spec: Any, info: dict[str, Any], i: int, total: int) -> dict[str, Any]:
    evaluation = info.get("evaluation") or {}
    what = "cached" if info["cached"] else f"{info['images']:,} images"
    accuracy = evaluation.get("own")
    # A classifier's floor is a least accuracy, a regressor's a largest error.
    relation, miss = ("≤", "ABOVE") if "error" in str(evaluation.get("metric")) else ("≥", "BELOW")
    verdict = "" if accuracy is None else (
        f", {evaluation['metric']} {accuracy:.4f}" + ("" if evaluation.get("floor") is None else
                                                      f" ({relation if evaluation['met'] else miss} {evaluation['floor']})"))
    print(f"  [{i}/{total}] {spec.label()} seed {spec.init_seed}: {what}, {info['seconds']:.0f} s{verdict}", flush=True)
    return {"model": spec.label(), "seed": spec.init_seed, "cached": info["cached"], "images": info["images"],
            "seconds": round(info["seconds"], 1), "accuracy": accuracy, "met": evaluation.get("met")}


# ------------------------------------------------------------------------------------ notebooks


def run(profile: str = "quick", names: list[str] | None = None, results_dir: str = "results",
        force: bool = False, notebooks: dict[str, dict[str, dict[str, Any]]] | None = None,
        notebooks_dir: str = "notebooks", device: str | None = None) -> pd.DataFrame:
    """Execute the notebooks (all, or ``names``) with ``profile``; return the summary table.

    ``notebooks`` (name → parameters per profile) and ``notebooks_dir`` default to the project's."""
    import papermill

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    notebooks = NOTEBOOKS if notebooks is None else notebooks
    names = names or list(notebooks)
    unknown = [n for n in names if n not in notebooks]
    if unknown:
        raise ValueError(f"names: unknown notebooks {unknown}; known: {list(notebooks)}")
    out_dir = resolve(results_dir) / profile
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        params = {"profile": profile, "results_dir": str(resolve(results_dir)), **notebooks[name][profile]}
        if device is not None:
            params["device"] = device
        marker = out_dir / f"{name}.done"
        done = marker.exists() and json.loads(marker.read_text()).get("params") == _params_hash(params)
        # Progress bars belong to JupyterLab: saved by papermill they are widgets without their state, whose
        # text fallback reads "0%| | 0/141" to the reader of the executed notebook. Not part of the hash.
        params.setdefault("progress", False)
        start = time.perf_counter()
        summary = _summary_path(name, results_dir, profile)
        if done and not force:
            status = "reused"
            seconds = json.loads(marker.read_text())["seconds"]
        else:
            print(f"▶ {name} ({profile})", flush=True)
            # Nothing of an earlier run may vouch for this one: it must finish to count.
            marker.unlink(missing_ok=True)
            summary.unlink(missing_ok=True)
            _current["notebook"] = name
            try:
                papermill.execute_notebook(
                    str(resolve(notebooks_dir) / f"{name}.ipynb"),
                    str(out_dir / f"{name}.ipynb"),
                    parameters=params,
                    cwd=str(resolve(".")),
                    progress_bar=False,
                    log_output=False,
                )
                status = "ok"
            except KeyboardInterrupt:
                raise
            except Exception as error:  # papermill re-raises the cell's error: keep going, report
                status = f"FAILED: {type(error).__name__}: {_last_line(error)}"
            seconds = time.perf_counter() - start
            if status == "ok":
                info = json.dumps({"params": _params_hash({k: v for k, v in params.items() if k != "progress"}),
                                   "seconds": seconds})
                atomic_write(marker, lambda tmp, text=info: Path(tmp).write_text(text))
            print(f"  {status} in {seconds:.0f} s", flush=True)
        ok = status in ("ok", "reused")
        key = json.loads(summary.read_text()) if ok and summary.exists() else {"key": "", "value": ""}
        rows.append({"notebook": name, "status": status, "wall time (s)": round(seconds, 1),
                     "key number": f"{key['key']} = {key['value']}" if key["key"] else ""})
    _current["notebook"] = None
    table = pd.DataFrame(rows)
    atomic_write(out_dir / "summary.csv", lambda tmp: table.to_csv(tmp, index=False))
    return table


def _last_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else repr(error))[:300]


_current: dict[str, str | None] = {"stage": None, "notebook": None}


def main(argv: list[str] | None = None) -> int:
    keep_freed_blocks()  # training and measuring here (the notebooks' kernels do it themselves)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", choices=PROFILES)
    parser.add_argument("--force", action="store_true", help="rerun notebooks already finished")
    parser.add_argument("--plan", action="store_true",
                        help="print what would be trained (images × epoch cap) and measured (forwards, "
                             "peak accumulator memory) per notebook, and stop")
    parser.add_argument("--jobs", type=int, default=2, help="training processes on the CPU (default 2)")
    parser.add_argument("--device", default=None,
                        help="where models train and are measured, e.g. cpu or cuda:0 (default: cuda if available)")
    parser.add_argument("--no-train-stage", action="store_true",
                        help="let each notebook train its own models instead of training them all first")
    parser.add_argument("--train-only", action="store_true", help="run the training stage only")
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    args = parser.parse_args(argv)
    names = args.names or None
    if args.plan:
        _print_plan(args.profile, plan(args.profile, names))
        return 0
    try:
        if not args.no_train_stage:
            _current["stage"] = "the training stage (finished models are cached)"
            trained = train_all(args.profile, names, jobs=args.jobs, device=args.device)
            if args.train_only:
                return 0 if trained.empty or trained["met"].ne(False).all() else 1
        _current["stage"] = "the notebooks"
        table = run(args.profile, names, force=args.force, device=args.device)
    except KeyboardInterrupt:
        where = _current["notebook"] and f"notebook {_current['notebook']}" or _current["stage"] or "start-up"
        print(f"\ninterrupted during {where}; what finished is kept — rerun `make reproduce` to resume.",
              file=sys.stderr)
        return 130
    print()
    print(table.to_string(index=False))
    return 0 if table["status"].isin(["ok", "reused"]).all() else 1


if __name__ == "__main__":
    sys.exit(main())
