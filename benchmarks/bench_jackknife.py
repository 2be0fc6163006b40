"""What does the delete-one-block jackknife (evaluate(..., blocks=K)) cost?

Measures, in one run: (a) the bytes held by the states of every layer with one block and with K
blocks (PassStates.nbytes), against the formula (3m + 2)·F·8 bytes per block for the variance
family; (b) the wall time of evaluate without blocks and with K blocks (the same n·m forwards; the
difference is the per-block updates, the merges and the K replicate computations), best of
``--repeats``; (c) how far the blocked values are from the unblocked ones; (d) the time of
``PassStates.compute`` alone (the K·⌈log₂ K⌉ merges of the tree and the K + 1 readouts) with the
fused numba merge and SV readout, and with the same arithmetic as torch ops, side by side.

Usage: python benchmarks/bench_jackknife.py [--n 200] [--m 25] [--blocks 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from tmlib import data, models, transforms
from tmlib.measures import NormalizedVariance, SampleVariance, TransformationVariance, collect, evaluate
from tmlib.measures import states as state_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--m", type=int, default=25)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = models.SimpleConv(1, 10, filters=16, fc_units=64).eval()
    x = data.load("mnist", "test", n=args.n)
    ts = transforms.rotations(args.m)
    measures = [TransformationVariance(mode="channel"), SampleVariance(mode="channel"), NormalizedVariance(mode="channel")]

    single = collect(model, x, ts, measures, progress=False)
    one, shapes = single.nbytes(), {name: info.shape for name, info in single.layers.items()}
    del single
    many = collect(model, x, ts, measures, blocks=args.blocks, progress=False).nbytes()
    print(f"SimpleConv(16), n={args.n}, m={args.m}, K={args.blocks}: state bytes per layer")
    print(f"{'layer':>10} {'F':>8} {'1 block MiB':>12} {'K blocks MiB':>13} {'ratio':>6} {'(3m+2)F8 MiB':>13}")
    for layer in one:
        f = math.prod(shapes[layer])
        print(f"{layer:>10} {f:>8} {one[layer] / 2**20:>12.3f} {many[layer] / 2**20:>13.3f} "
              f"{many[layer] / one[layer]:>6.2f} {(3 * args.m + 2) * f * 8 / 2**20:>13.3f}")
    print(f"{'total':>10} {'':>8} {sum(one.values()) / 2**20:>12.2f} {sum(many.values()) / 2**20:>13.2f}")

    def timed(**kwargs) -> tuple[float, dict]:
        best, out = math.inf, None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = evaluate(model, x, ts, measures, progress=False, **kwargs)
            best = min(best, time.perf_counter() - start)
        return best, out

    plain_s, plain = timed()
    blocked_s, blocked = timed(blocks=args.blocks)
    worst = max(float(np.nanmax(np.abs(blocked[k][layer] - plain[k][layer]) / np.maximum(np.abs(plain[k][layer]), 1e-300)))
                for k in plain for layer in plain[k].layer_names)
    print(f"evaluate: {plain_s:.2f} s without blocks, {blocked_s:.2f} s with K={args.blocks} "
          f"(ratio {blocked_s / plain_s:.2f}); worst relative change of the values {worst:.1e}")


    blocked_states = collect(model, x, ts, measures, blocks=args.blocks, progress=False)
    fused_s, torch_s = compute_times(blocked_states, measures, args.repeats)
    print(f"compute (K={args.blocks} replicates): {fused_s:.2f} s fused, {torch_s:.2f} s as torch ops "
          f"(torch / fused {torch_s / fused_s:.2f})")


def compute_times(states, measures, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` time of ``states.compute(measures)`` with the fused kernels and with the
    torch ops (numba switched off for the merges, the torch readout of SV), alternating."""
    fused_flag = state_module._HAVE_NUMBA
    moments = [s for parts in states.states.values() for s in parts]
    backends = [s.backend for s in moments]
    best = {True: math.inf, False: math.inf}
    try:
        for _ in range(repeats):
            for fused in (True, False):
                state_module._HAVE_NUMBA = fused and fused_flag
                for s, backend in zip(moments, backends):
                    s.backend = backend if fused else "torch"
                start = time.perf_counter()
                states.compute(measures)
                best[fused] = min(best[fused], time.perf_counter() - start)
    finally:
        state_module._HAVE_NUMBA = fused_flag
        for s, backend in zip(moments, backends):
            s.backend = backend
    return best[True], best[False]


if __name__ == "__main__":
    main()
