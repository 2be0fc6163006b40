"""Cost of tmlib.lie in forward-equivalents: time of the JVP-based computation divided by the time of
a plain ``torch.no_grad()`` forward of the same images, per generator.

    python benchmarks/bench_lie.py [--n 256] [--batch-size 64] [--repeats 5] [--threads 1]

LEE (``lie_equivariance_error``) is timed with k = 1 and k = 5 generators (all observed layers at
once), LieGG with its 4 basis generators; the ratio is divided by k. Best of ``repeats`` runs after
a warm-up (the first vmap call traces). Models: SimpleConv (quick-profile size) and an MLP. The last
row per model times the input tangents alone (central differences), which the JVP rows include.

Each JVP row is timed twice, interleaved repeat by repeat: with ``jvp="torch.func"`` (``vmap`` of
``torch.func.jvp``) and with ``jvp="tangents"`` (the k tangents propagated beside one plain forward,
:mod:`tmlib.lie.forward_mode`, what ``"auto"`` runs for these models); the last column is their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from tmlib import lie, models


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def best_times(fns, repeats: int) -> list[float]:
    """Best time of each function, their repeats interleaved (the machine's drift hits all alike)."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(t) for t in times]


def forward(model, x, batch_size):
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.n, 1, 28, 28)
    nets = {
        "SimpleConv(16, 64)": models.SimpleConv(filters=16, fc_units=64).eval(),
        "MLP 3×128": nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                   nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval(),
    }
    five = ["rotation", "scale", "shear_x", "translation_x", "translation_y"]
    gens = torch.stack([lie.generator_matrix(g) for g in five])
    print(f"n={args.n} images, batch {args.batch_size}, {args.threads} thread(s), best of {args.repeats}; "
          "forward-equivalents per generator")
    print(f"{'model':20s} {'computation':34s} {'torch.func':>10s} {'tangents':>10s} {'speed-up':>9s}")
    for name, model in nets.items():
        t_fwd = best_time(lambda model=model: forward(model, x, args.batch_size), args.repeats)
        print(f"{name:20s} {'plain forward (no_grad), seconds':34s} {t_fwd:10.4f}")
        cases = [
            ("LEE, output, 1 generator", 1, lambda jvp, model=model: lie.lie_equivariance_error(
                model, x, ["rotation"], layers=["output"], batch_size=args.batch_size, progress=False, jvp=jvp)),
            ("LEE, output, 5 generators", 5, lambda jvp, model=model: lie.lie_equivariance_error(
                model, x, five, layers=["output"], batch_size=args.batch_size, progress=False, jvp=jvp)),
            ("LEE, all layers, 5 generators", 5, lambda jvp, model=model: lie.lie_equivariance_error(
                model, x, five, batch_size=args.batch_size, progress=False, jvp=jvp)),
            ("LieGG, output, 4 basis generators", 4, lambda jvp, model=model: lie.liegg(
                model, x, batch_size=args.batch_size, progress=False, jvp=jvp)),
        ]
        for label, k, fn in cases:
            t_func, t_tangents = best_times([lambda fn=fn: fn("torch.func"), lambda fn=fn: fn("tangents")],
                                            args.repeats)
            print(f"{name:20s} {label:34s} {t_func / t_fwd / k:10.2f} {t_tangents / t_fwd / k:10.2f} "
                  f"{t_func / t_tangents:8.2f}×")
        t = best_time(lambda: [lie.tangents(x[s:s + args.batch_size], gens) for s in range(0, len(x), args.batch_size)],
                      args.repeats)
        print(f"{name:20s} {'  of which: input tangents (5 gen.)':34s} {t / t_fwd / 5:10.2f} {t / t_fwd / 5:10.2f}")


if __name__ == "__main__":
    main()
