"""Run every notebook of the reproduction through papermill: ``make reproduce`` calls this.

Each notebook runs with the parameters of a profile (``quick``: 2 CPU cores; ``paper``: the papers'
settings, for a GPU), its executed copy lands in ``results/<profile>/``, and a ``.done`` marker is
written atomically once it finishes, so a rerun after an interruption skips what was finished and
runs the rest. Trained models are cached by :mod:`tmlib.train`, so rerunning a notebook only
measures. The run ends with a summary table (status, wall time, key number per notebook).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .paths import resolve
from .results import atomic_write

__all__ = ["NOTEBOOKS", "PROFILES", "report", "run"]

PROFILES = ("quick", "paper")

# name → parameters per profile (on top of the notebook's own defaults, which are the quick ones).
NOTEBOOKS: dict[str, dict[str, dict[str, Any]]] = {
    "00_quickstart": {
        "quick": {},
        "paper": {"n_train": 60000, "epochs": 20, "n_test": 10000, "n_samples": 1000, "n_rotations": 25},
    },
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


def run(profile: str = "quick", names: list[str] | None = None, results_dir: str = "results",
        force: bool = False, notebooks: dict[str, dict[str, dict[str, Any]]] | None = None,
        notebooks_dir: str = "notebooks") -> pd.DataFrame:
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
        marker = out_dir / f"{name}.done"
        done = marker.exists() and json.loads(marker.read_text()).get("params") == _params_hash(params)
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
            except Exception as error:  # papermill re-raises the cell's error: keep going, report
                status = f"FAILED: {type(error).__name__}: {str(error).splitlines()[-1][:200]}"
            seconds = time.perf_counter() - start
            if status == "ok":
                info = json.dumps({"params": _params_hash(params), "seconds": seconds})
                atomic_write(marker, lambda tmp, text=info: Path(tmp).write_text(text))
        ok = status in ("ok", "reused")
        key = json.loads(summary.read_text()) if ok and summary.exists() else {"key": "", "value": ""}
        rows.append({"notebook": name, "status": status, "wall time (s)": round(seconds, 1),
                     "key number": f"{key['key']} = {key['value']}" if key["key"] else ""})
    table = pd.DataFrame(rows)
    atomic_write(out_dir / "summary.csv", lambda tmp: table.to_csv(tmp, index=False))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick", choices=PROFILES)
    parser.add_argument("--force", action="store_true", help="rerun notebooks already finished")
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    args = parser.parse_args(argv)
    table = run(args.profile, args.names or None, force=args.force)
    print()
    print(table.to_string(index=False))
    return 0 if table["status"].isin(["ok", "reused"]).all() else 1


if __name__ == "__main__":
    sys.exit(main())
