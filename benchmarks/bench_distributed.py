"""How much faster is a measurement spread over processes (torch.distributed, gloo on the CPU)?

Measures, in one run and side by side, the same evaluate (TV + SV + NV, channel and element mode)
of SimpleConv on n MNIST test images × m rotations:
  (a) in 1 process × 1 thread (no process group);
  (b) in W processes × 1 thread each (a gloo group on 127.0.0.1, every rank its share);
and prints the speed-up (a) / (b) of the measurement itself (evaluate's wall time on rank 0; the
processes' start-up and imports are not counted, they are paid once per job), the seconds rank 0
spent in collectives (gathering and merging the states), each rank's pass, and whether the
values agree with (a) (max relative difference).

On a GPU machine (``--device cuda``) every rank uses ``cuda:LOCAL_RANK`` (NCCL), and (a) is one GPU.

Usage: python benchmarks/bench_distributed.py [--n 1000] [--m 25] [--world 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def measure(args: argparse.Namespace) -> dict:
    from tmlib import data, models, transforms
    from tmlib.measures import NormalizedVariance, SampleVariance, TransformationVariance, evaluate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = models.SimpleConv(1, 10).eval()
    x = data.load("mnist", n=args.n, root=ROOT / "data")
    ts = transforms.rotations(args.m)
    measures = {"NV": NormalizedVariance(), "TV": TransformationVariance(), "SV": SampleVariance(),
                "NV channel": NormalizedVariance(mode="channel")}
    device = None if args.device == "cpu" else args.device
    distributed = "RANK" in os.environ
    if distributed:
        from tmlib import distributed as tdist
        tdist.init_from_environment()
        torch.distributed.barrier()  # every rank starts the clock together
    start = time.perf_counter()
    results = evaluate(model, x, ts, measures, device=device, progress=False, distributed=distributed or None)
    seconds = time.perf_counter() - start
    means = {name: r.layer_means().to_dict() for name, r in results.items()}
    meta = results["NV"].metadata
    out = {"seconds": seconds, "means": means, "images": meta["images_forwarded"],
           "ranks": meta.get("distributed"), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if distributed:
        torch.distributed.destroy_process_group()
    return out


def run(world: int, args: argparse.Namespace) -> dict:
    """Start ``world`` worker processes of this script (1: without a process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        command = [sys.executable, __file__, "--worker", "--n", str(args.n), "--m", str(args.m),
                   "--device", args.device]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: exit codes {[p.returncode for p in procs]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="MNIST test images")
    parser.add_argument("--m", type=int, default=25, help="rotations")
    parser.add_argument("--world", type=int, default=2, help="processes of the distributed run")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (every rank on cuda:LOCAL_RANK)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return
    one = run(1, args)
    many = run(args.world, args)
    worst = max(abs(many["means"][k][layer] / v - 1) if v else abs(many["means"][k][layer])
                for k, per_layer in one["means"].items() for layer, v in per_layer.items())
    ranks = many["ranks"]
    print(f"SimpleConv, {args.n} MNIST test images × {args.m} rotations, TV + SV + NV (element) + NV (channel), "
          f"{args.device}")
    print(f"  1 process × 1 thread : {one['seconds']:7.2f} s   ({one['images']} images forwarded; "
          f"peak RSS {one['peak_rss_mb']:.0f} MB)")
    print(f"  {args.world} processes × 1 thread: {many['seconds']:7.2f} s   ({many['images']} images forwarded in total; "
          f"rank 0 peak RSS {many['peak_rss_mb']:.0f} MB)")
    print(f"  speed-up             : {one['seconds'] / many['seconds']:.2f}×")
    for r, (samples, secs) in enumerate(zip(ranks["rank_samples"], ranks["rank_seconds"])):
        print(f"    rank {r}: {samples} samples, pass {secs['pass']:.2f} s, collectives {secs['collectives']:.3f} s")
    print(f"  largest relative difference of the layer means from 1 process: {worst:.1e}")
    assert np.isfinite(worst)


if __name__ == "__main__":
    main()
