"""One rank of the distributed tests (``test_distributed.py`` starts W of these on 127.0.0.1).

Usage: ``python distributed_worker.py SCENARIO OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set. Each rank writes ``OUT_DIR/rank{r}.pt``: the results it computed (scenario
"families") or the error it raised (the failure scenarios).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import harness
import torch

from tmlib import distributed as tdist
from tmlib import lie
from tmlib import transforms as T
from tmlib.measures import NormalizedVariance, SampleVariance, TransformationVariance, evaluate, evaluate_stratified


def arrays(results: dict) -> dict:
    return {name: {"values": {k: v for k, v in r.values.items()}, "metadata": r.metadata,
                   "replicates": None if r.replicates is None else r.replicates.to_numpy()}
            for name, r in results.items()}


def families(world: int) -> dict:
    out = {}
    names = None if world == 2 else {"variance", "goodfellow", "same-equivariance-reference"}
    for family in harness.FAMILIES:
        if names is not None and family.name not in names:
            continue
        for i, make in enumerate(family.sets):
            results = evaluate(harness.small_cnn(), harness.samples(), make(), family.measures(), batch_size=3,
                               progress=False, **family.options)
            out[f"{family.name}/{i}"] = arrays(results)
    variance = [NormalizedVariance(), TransformationVariance(mode="channel"), SampleVariance()]
    out["jackknife"] = arrays(evaluate(harness.small_cnn(), harness.samples(), T.rotations(5), variance,
                                       batch_size=3, progress=False, blocks=3))
    labels = torch.arange(harness.N) % 2
    x = torch.utils.data.TensorDataset(harness.samples(), labels)
    out["stratified"] = arrays(evaluate_stratified(harness.small_cnn(), x, T.rotations(5), variance,
                                                   batch_size=2, progress=False))
    if world == 2:
        model = harness.small_cnn()
        out["lee"] = lie.lee(model, harness.samples(), layers=["1", "4", "output"], batch_size=3, progress=False,
                             blocks=2).frame
        out["liegg"] = lie.liegg(model, harness.samples(), batch_size=3, progress=False, blocks=2).summary()
    return out


class RaisesOnRank(torch.nn.Module):
    """A model whose forward raises on one rank at its second batch."""

    def __init__(self, rank: int, dies: bool = False):
        super().__init__()
        self.inner, self.rank, self.calls, self.dies = harness.small_cnn(), rank, 0, dies

    def forward(self, x):
        self.calls += 1
        if self.rank == 1 and self.calls == 2:
            if self.dies:
                os._exit(3)  # no exception, no goodbye: the process is gone
            raise ValueError("this rank's model failed on purpose")
        return self.inner(x)


def failure(scenario: str, rank: int) -> dict:
    model, x, ts = harness.small_cnn(), harness.samples(), T.rotations(5)
    if scenario == "weights" and rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0, 0, 0] += 1e-3
    if scenario == "matrices" and rank == 1:
        ts = T.rotations(5, degrees=350)
    if scenario in ("raises", "dies"):
        model = RaisesOnRank(rank, dies=scenario == "dies")
    if scenario == "too-few":
        x = x[:2]
    try:
        evaluate(model, x, ts, [NormalizedVariance()], batch_size=3, progress=False)
    except Exception as error:  # noqa: BLE001 - what the test checks
        return {"error": type(error).__name__, "message": str(error)}
    return {"error": None}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    tdist.init_from_environment(timeout_s=float(os.environ.get("TMLIB_TEST_TIMEOUT_S", "60")))
    rank, world = tdist.world()
    try:
        payload = families(world) if scenario == "families" else failure(scenario, rank)
        torch.save(payload, out / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
