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


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "train_all", interrupted)
    assert reproduce.main(["00_quickstart"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted during the training stage" in err[0] and "resume" in err[0]


def _ended(pid: int) -> bool:
    """The process is gone, or a zombie (terminated, not yet reaped)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:  # gone meanwhile (ENOENT, or ESRCH while reading)
        return True


def _sleep(seconds):
    import time

    time.sleep(seconds)


def test_stopping_the_training_pool_terminates_its_workers():
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    # 2 in the workers + 3 in the executor's call queue (max_workers + 1) can be "running"; with 8,
    # at least 3 are still pending whatever the timing (with 4, a loaded machine left none pending).
    futures = [pool.submit(_sleep, 60) for _ in range(8)]
    while not any(f.running() for f in futures):
        time.sleep(0.05)
    pids = [process.pid for process in pool._processes.values()]
    start = time.perf_counter()
    reproduce._stop(pool)
    # By pid, not Process.is_alive(): the executor's own thread reaps its workers, after which
    # is_alive()'s waitpid fails and reads as "alive".
    while not all(_ended(pid) for pid in pids) and time.perf_counter() - start < 10:
        time.sleep(0.05)
    assert all(_ended(pid) for pid in pids) and time.perf_counter() - start < 10
    assert any(f.cancelled() for f in futures)  # the ones that had not started
