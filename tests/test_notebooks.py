"""Every notebook runs end to end (papermill, the venv's own kernel) with its smallest parameters."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tmlib.paths import project_root
from tmlib.reproduce import NOTEBOOKS

papermill = pytest.importorskip("papermill")

ROOT = project_root(Path(__file__).parent)

# The smallest parameters of each notebook: seconds on 2 cores, still real data and real training.
SMALLEST = {
    "00_quickstart": {"n_train": 400, "n_test": 200, "epochs": 1, "n_samples": 20, "n_rotations": 4, "check_claims": False},
}


def test_every_notebook_has_smallest_parameters():
    on_disk = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert on_disk == sorted(NOTEBOOKS) == sorted(SMALLEST)


def _execute(name, tmp_path):
    params = {
        **SMALLEST[name],
        "figures_dir": str(tmp_path / "figures"),
        "models_dir": str(tmp_path / "models"),
        "results_dir": str(tmp_path / "results"),
    }
    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(out), parameters=params,
                               cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    return out


@pytest.mark.notebook
def test_quickstart_notebook(tmp_path):
    _execute("00_quickstart", tmp_path)
    assert (tmp_path / "figures" / "00_quickstart_nv.png").stat().st_size > 10_000
    frame = pd.read_csv(tmp_path / "figures" / "00_quickstart_nv.csv")
    assert set(frame["training"]) == {"no augmentation", "rotation augmentation"}
    assert frame["layer"].tolist()[:3] == ["conv0", "act0", "conv1"]
    assert len(frame) == 2 * 15 and frame["value"].between(0, 10).all()
    summary = json.loads((tmp_path / "results" / "summaries" / "00_quickstart.json").read_text())
    assert summary["key"] == "NV drop, last 4 layers" and isinstance(summary["value"], float)
    assert len(list((tmp_path / "models").glob("SimpleConv-*.pt"))) == 2
