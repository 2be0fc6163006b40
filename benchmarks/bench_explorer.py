"""How long does the layer explorer take to answer? The latencies a person waits for.

Two SimpleConv checkpoints (untrained, seeds 0 and 1) on MNIST test images: the first selection (a
pass for the checkpoint and one for the untrained baseline drawn beside it), then changes of layer,
channel and measure (redraws only), a new transformation set (one more pass per checkpoint shown)
and a cache hit (going back). Each change is timed from the widget's value being set to every
panel updated, as ``Explorer.timings`` records it and by the wall clock. Median of ``--repeats``
over distinct selections (every redraw a first view of that selection: no image cache).

Usage: python benchmarks/bench_explorer.py [--n 200] [--rotations 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tmlib import data, models, transforms, widgets


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rotations", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = data.load("mnist", "test", n=args.n)
    checkpoints = {}
    for seed, label in enumerate(["untrained", "other seed"]):
        torch.manual_seed(seed)
        checkpoints[label] = models.SimpleConv().eval()
    sets = {f"rotation ({args.rotations})": transforms.rotations(args.rotations),
            f"rotation ({args.rotations + 1})": transforms.rotations(args.rotations + 1)}
    start = time.perf_counter()
    explorer = widgets.Explorer(checkpoints, {"mnist": x}, sets, checkpoint="other seed", layer="conv2")
    first = time.perf_counter() - start
    layers = explorer.data.layers
    print(f"{args.n} samples × {args.rotations} rotations, SimpleConv, {len(layers)} layers, "
          f"{len(explorer.data.measures)} measures per pass")
    print(f"first selection (2 passes: the checkpoint and the untrained baseline): {first:.2f} s; "
          f"{explorer.status.value}")

    rows = {"layer": [], "channel": [], "measure": []}
    for i in range(args.repeats):
        rows["layer"].append(timed(lambda i=i: explorer.select(layer=layers[(3 + 2 * i) % len(layers)])))
        rows["channel"].append(timed(lambda i=i: explorer.select(unit=(explorer.unit.value + 1 + i) %
                                                                 (explorer.unit.max + 1))))
        offered = [m for m in explorer.measure.options if m != explorer.measure.value]
        rows["measure"].append(timed(lambda offered=offered, i=i: explorer.select(measure=offered[i % len(offered)])))
    new_set = timed(lambda: setattr(explorer.transformation, "value", list(sets)[1]))
    new_status = explorer.status.value
    back = timed(lambda: setattr(explorer.transformation, "value", list(sets)[0]))
    start = time.perf_counter()
    one = widgets.compute(checkpoints["untrained"], x, sets[list(sets)[0]])
    single = time.perf_counter() - start
    for name, values in rows.items():
        print(f"{name} change: median {statistics.median(values):.2f} s (of {', '.join(f'{v:.2f}' for v in values)})")
    print(f"new transformation set ({args.rotations + 1} rotations, 2 checkpoints): {new_set:.2f} s; {new_status}")
    print(f"back to a cached set: {back:.2f} s; {explorer.status.value}")
    print(f"one pass alone (widgets.compute, {args.n} × {args.rotations}, every measure): {single:.2f} s; "
          f"{one.images_forwarded} images")


if __name__ == "__main__":
    main()
