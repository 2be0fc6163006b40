"""What do Kvinge et al.'s G-EED metrics cost, next to the forwards they need?

In one run, side by side: bare no_grad forwards of the n·m transformed images, and evaluate() with
the four G-EED measures (raw and normalised invariance share one state; latent equivariance; output
KL), for SimpleConv (every channel's map rotated) and the C4-steerable CNN (its field types' own
action), under exact C4 and under 25 sampled rotations (SimpleConv only: the steerable model's
action is defined for C4). Each G-EED pass runs twice: with the fused CPU kernels (the default) and
with ``backend="torch"`` (the torch ops: the GPU path, and the CPU path before the kernels).

Usage: python benchmarks/bench_geed.py [--n 500] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_engine import add_device_argument, bare_forwards

from tmlib import data, models, transforms
from tmlib.engine import default_batch_size
from tmlib.equivariant import SteerableCNN
from tmlib.experiments import geed_measures
from tmlib.measures import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_argument(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    dataset = data.load("mnist", "test", n=args.n)
    x, _ = dataset.tensors()
    x = x.to(args.device)
    cases = [
        ("SimpleConv(16)", models.SimpleConv(filters=16, fc_units=64).eval(), transforms.c4()),
        ("SimpleConv(16)", models.SimpleConv(filters=16, fc_units=64).eval(), transforms.rotations(25)),
        ("SteerableCNN C4 (8,16,32)", SteerableCNN(fields=(8, 16, 32)).eval(), transforms.c4()),
    ]
    print(f"n={args.n} MNIST test images, {torch.get_num_threads()} threads, device {args.device}, best of {args.repeats}")
    for label, model, ts in cases:
        model = model.to(args.device)
        batch_size = default_batch_size(len(ts))
        measures = geed_measures(model, ts)
        kw = {"batch_size": batch_size, "fill": dataset.fill, "progress": False, "device": args.device}
        evaluate(model, x[:8], ts, measures, **kw)  # warm-up (and numba's compilation)
        bare, full, ops = [], [], []
        for _ in range(args.repeats):  # interleaved, so that the machine's drift hits all three alike
            bare.append(bare_forwards(model, x, ts, batch_size, dataset.fill))
            for backend, times in (("auto", full), ("torch", ops)):
                start = time.perf_counter()
                evaluate(model, x, ts, geed_measures(model, ts), backend=backend, **kw)
                times.append(time.perf_counter() - start)
        print(f"{label:26s} {ts.name:18s} m={len(ts):3d}  bare forwards {min(bare):6.2f} s   "
              f"G-EED (4 measures, every layer) {min(full):6.2f} s = {min(full) / min(bare):.2f} × forwards; "
              f"as torch ops {min(ops):6.2f} s = {min(ops) / min(bare):.2f} ×")


if __name__ == "__main__":
    main()
