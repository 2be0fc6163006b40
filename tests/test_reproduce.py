"""make reproduce's runner: executes, reports, skips what finished, reruns what failed."""

import json

import nbformat
import pytest

from tmlib import reproduce

pytest.importorskip("papermill")


def _notebook(path, body):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("profile = 'quick'\nresults_dir = 'results'\nfail = False",
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_run_reports_skips_finished_and_retries_failed(tmp_path):
    (tmp_path / "nbs").mkdir()
    _notebook(tmp_path / "nbs" / "a.ipynb",
              "from tmlib import reproduce\nreproduce.report('a', 'answer', 42, results_dir=results_dir, profile=profile)")
    _notebook(tmp_path / "nbs" / "b.ipynb", "assert not fail, 'asked to fail'")
    registry = {"a": {"quick": {}, "paper": {}}, "b": {"quick": {"fail": True}, "paper": {}}}
    kw = dict(results_dir=str(tmp_path / "results"), notebooks=registry, notebooks_dir=str(tmp_path / "nbs"))

    first = reproduce.run("quick", **kw).set_index("notebook")
    assert first.loc["a", "status"] == "ok" and first.loc["a", "key number"] == "answer = 42"
    assert first.loc["b", "status"].startswith("FAILED") and "asked to fail" in first.loc["b", "status"]
    assert (tmp_path / "results" / "quick" / "a.done").exists()
    assert not (tmp_path / "results" / "quick" / "b.done").exists()

    registry["b"]["quick"] = {}  # "fixed": the rerun runs only what did not finish
    second = reproduce.run("quick", **kw).set_index("notebook")
    assert second.loc["a", "status"] == "reused" and second.loc["b", "status"] == "ok"
    summary = (tmp_path / "results" / "quick" / "summary.csv").read_text()
    assert "reused" in summary and json.loads((tmp_path / "results" / "quick" / "a.done").read_text())["seconds"] > 0

    with pytest.raises(ValueError, match="profile"):
        reproduce.run("slow", **kw)
    with pytest.raises(ValueError, match="names"):
        reproduce.run("quick", names=["zzz"], **kw)
