"""Measuring across processes with torch.distributed (gloo on 127.0.0.1): every measure family
run by 2 and 3 ranks equals one process over the same samples, every rank returns the same
results, forwards are counted, and mismatches and failures stop every rank with a clear error."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import harness
import numpy as np
import pandas as pd
import pytest
import torch

from tmlib import distributed as tdist
from tmlib import lie
from tmlib import transforms as T
from tmlib.measures import NormalizedVariance, SampleVariance, TransformationVariance, evaluate, evaluate_stratified

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 240  # the whole group, start-up included (2 cores, shared)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, out: Path, timeout_s: float = 60, codes: dict | None = None) -> list:
    """Start ``world`` ranks of the worker; wait (bounded); every rank's payload in rank order
    (None for a rank expected to exit with a code of ``codes`` {rank: code} instead)."""
    codes = codes or {}
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "TMLIB_TEST_TIMEOUT_S": str(timeout_s), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=env, cwd=WORKER.parent,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:  # no process is left behind, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == codes.get(rank, 0), f"rank {rank} exited with {p.returncode}:\n{log[-3000:]}"
    return [None if r in codes else torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, launch("families", world, tmp_path_factory.mktemp(f"w{world}"))


def single(key: str) -> dict:
    """The same measurement in this process (no process group here)."""
    model, x = harness.small_cnn(), harness.samples()
    variance = [NormalizedVariance(), TransformationVariance(mode="channel"), SampleVariance()]
    if key == "jackknife":
        return evaluate(model, x, T.rotations(5), variance, batch_size=3, progress=False, blocks=3)
    if key == "stratified":
        data = torch.utils.data.TensorDataset(x, torch.arange(harness.N) % 2)
        return evaluate_stratified(model, data, T.rotations(5), variance, batch_size=2, progress=False)
    name, i = key.split("/")
    family = next(f for f in harness.FAMILIES if f.name == name)
    return evaluate(model, x, family.sets[int(i)](), family.measures(), batch_size=3, progress=False,
                    **family.options)


def tolerance(key: str, name: str) -> float:
    family = next((f for f in harness.FAMILIES if f.name == key.split("/")[0]), None)
    if family is None:
        return 1e-9
    measure = next(m for m in family.measures() if m.name == name.split("#")[0])
    return family.tolerance("merge_rtol", measure)


def test_every_family_equals_one_process_and_every_rank_returns_the_same(ranks):
    world, payloads = ranks
    first = payloads[0]
    for key, results in first.items():
        if key in ("lee", "liegg"):
            continue
        expected = single(key)
        assert list(results) == list(expected), key
        for name, got in results.items():
            want = expected[name]
            meta = got["metadata"]
            assert meta["n"] == want.metadata["n"] == harness.N
            # Forwards in total: exactly those of one process (n·m, + n with a reference pass).
            assert meta["images_forwarded"] == want.metadata["images_forwarded"], (key, name)
            if key != "stratified":  # (per class there: one distributed pass per class)
                assert meta["distributed"]["world_size"] == world
                assert sum(meta["distributed"]["rank_samples"]) == harness.N
            for layer, value in got["values"].items():
                np.testing.assert_allclose(value, want[layer], rtol=tolerance(key, name), atol=1e-13,
                                           err_msg=f"{key} {name} {layer}")
            if want.replicates is not None:
                np.testing.assert_allclose(got["replicates"], want.replicates.to_numpy(), rtol=1e-9, atol=1e-13)
        for other in payloads[1:]:  # bit-identical on every rank
            for name, got in results.items():
                for layer, value in got["values"].items():
                    np.testing.assert_array_equal(other[key][name]["values"][layer], value)
                assert other[key][name]["metadata"] == got["metadata"]


def test_shares_and_blocks_split_as_documented(ranks):
    world, payloads = ranks
    meta = payloads[0]["variance/0"][next(iter(payloads[0]["variance/0"]))]["metadata"]
    assert meta["distributed"]["rank_samples"] == [tdist.rank_share(harness.N, world, r)[1]
                                                   - tdist.rank_share(harness.N, world, r)[0] for r in range(world)]
    assert tdist.rank_share(10, 3, 1) == (3, 6, [0, 3])
    assert tdist.rank_share(10, 2, 1, blocks=3) == (3, 10, [0, 3, 7])  # whole blocks: [0,3) | [3,6) [6,10)
    jack = next(iter(payloads[0]["jackknife"].values()))["metadata"]
    assert jack["block_sizes"] == [3, 3, 4] and jack["blocks"] == 3


def test_lie_derivative_measures_equal_one_process(ranks):
    world, payloads = ranks
    if world != 2:
        pytest.skip("LEE and LieGG run with 2 ranks (the 3-rank run covers the pass)")
    model, x = harness.small_cnn(), harness.samples()
    frame = lie.lee(model, x, layers=["1", "4", "output"], batch_size=3, progress=False, blocks=2).frame
    for payload in payloads:
        got = payload["lee"]
        # The ranks' batches differ from one process's ([0:3] [3:5] | [5:8] [8:10] against [0:3] [3:6]
        # …), and LEE's float32 JVPs move with the batch at ~4e-8 relative (batch size 1 vs 3 in
        # one process): the tolerance of the batch, not of the merge (1e-6: a 2-block jackknife's
        # standard error is a difference of two close replicates and amplifies it).
        pd.testing.assert_frame_equal(got, frame, rtol=1e-6)
    summary = lie.liegg(model, x, batch_size=3, progress=False, blocks=2).summary()
    for payload in payloads:
        for key, value in summary.items():
            if isinstance(value, str):
                assert payload["liegg"][key] == value, key
                continue
            np.testing.assert_allclose(np.asarray(payload["liegg"][key], dtype=float), np.asarray(value, dtype=float),
                                       rtol=1e-9, atol=1e-13, err_msg=key)


@pytest.mark.parametrize("scenario, world, message", [
    ("weights", 2, r"model parameters and buffers \(sha256\) \(rank 0: [0-9a-f]{12}…; rank 1: [0-9a-f]{12}…\)"),
    ("matrices", 2, r"transformation matrices \(sha256\)"),
    ("too-few", 3, r"x: 2 samples cannot be shared by 3 ranks"),
])
def test_a_mismatch_is_the_same_clear_error_on_every_rank(tmp_path, scenario, world, message):
    for payload in launch(scenario, world, tmp_path):
        assert payload["error"] in ("RankMismatchError", "ValueError")
        assert re.search(message, payload["message"]), payload["message"]


def test_a_rank_that_raises_mid_pass_stops_every_rank(tmp_path):
    own, other = launch("raises", 2, tmp_path)[::-1]
    assert own == {"error": "ValueError", "message": "this rank's model failed on purpose"}
    assert other["error"] == "RankFailedError"
    assert "the pass failed on 1 of 2 ranks — rank 1: ValueError: this rank's model failed on purpose" in other["message"]


def test_a_rank_that_dies_mid_pass_stops_the_others_without_waiting_for_the_timeout(tmp_path):
    start = time.perf_counter()
    survivor, dead = launch("dies", 2, tmp_path, timeout_s=120, codes={1: 3})
    assert dead is None
    assert survivor["error"] == "RankFailedError"
    assert "a rank stopped without reporting during the pass" in survivor["message"]
    assert time.perf_counter() - start < 120  # the broken connection is noticed, not the timeout


def test_distributed_arguments_are_checked_in_one_process(monkeypatch):
    with pytest.raises(TypeError, match="distributed must be None, True or False"):
        evaluate(harness.small_cnn(), harness.samples(), T.rotations(5), NormalizedVariance(), distributed="yes")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"distributed=True: no process group is initialised and \['RANK'"):
        evaluate(harness.small_cnn(), harness.samples(), T.rotations(5), NormalizedVariance(), distributed=True)
    with pytest.raises(ValueError, match="blocks=2: with 3 ranks every rank needs at least one jackknife block"):
        tdist.rank_share(10, 3, 0, blocks=2)


def test_a_local_rank_beyond_the_gpus_present_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but this machine has 1 CUDA device\(s\)"):
        tdist.rank_device(None)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert tdist.rank_device("cpu") == torch.device("cpu")  # an explicit CPU stays the CPU
