"""How much does measuring cost on top of the forwards it needs?

Measures, in one run and side by side:
  (a) evaluate(TV + SV + NV) on SimpleConv, n MNIST test images × m rotations, divided by the time of
      bare no_grad forwards of the same n·m warped images (same blocks, same batch size);
  (b) the number of images the model saw during evaluate (must be n·m);
  (c) peak memory: the process's peak RSS growth during evaluate, and the float64 accumulators.
Also reports the same ratio for the eager torch-op statistics (the reference; what CUDA runs by
default) and for the same update compiled by torch.compile (``backend="compile"``; its one-off
compile is in the warm-up, not in the times), for comparison.

With ``--sweep`` it prints instead how the ratio (fused statistics only) grows with n ∈ {250, 500,
1000} and m ∈ {8, 25, 100}, and for SimpleConv with 64 filters, beside the accumulator memory of
one pass per layer (``PassStates.nbytes``) against the formula (3m + 2)·F·8 bytes.

Usage: python benchmarks/bench_engine.py [--n 500] [--m 25] [--repeats 3] [--sweep] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from tmlib import data, models, transforms
from tmlib.engine import default_batch_size
from tmlib.measures import NormalizedVariance, SampleVariance, TransformationVariance, collect, evaluate


class CountingModel(torch.nn.Module):
    """Wraps a model and counts the images it is given (the wrapper adds no layers to measure)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.images = 0

    def layer_names(self):
        return [f"inner.{name}" for name in self.inner.layer_names()]

    def forward(self, x):
        self.images += x.shape[0]
        return self.inner(x)


def synchronize(device) -> None:
    """Wait for the device's queued work (the clock stops after the GPU finished, not before)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bare_forwards(model, x, ts, batch_size, fill) -> float:
    # Warp first, outside the clock: the ratio compares measuring with forwards only. On the
    # device x is on (the model's): the warps run where the measurement runs them.
    blocks = [ts.apply(x[i : i + batch_size], fill=fill).flatten(0, 1) for i in range(0, len(x), batch_size)]
    synchronize(x.device)
    start = time.perf_counter()
    with torch.no_grad():
        for block in blocks:
            model(block)
    synchronize(x.device)
    return time.perf_counter() - start


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model, the images and the states live "
                        "(e.g. cuda; the statistics then run as torch ops, or compiled)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--m", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="the ratio over n, m and a wider model")
    add_device_argument(parser)
    args = parser.parse_args()
    if args.sweep:
        if args.device != "cpu":
            parser.error("--sweep measures the CPU path; leave out --device")
        sweep(args.repeats)
        return

    torch.manual_seed(0)
    dataset = data.load("mnist", "test", n=args.n)
    x, _ = dataset.tensors()
    x = x.to(args.device)
    ts = transforms.rotations(args.m)
    model = CountingModel(models.SimpleConv()).eval().to(args.device)
    measures = [TransformationVariance(), SampleVariance(), NormalizedVariance()]
    batch_size = default_batch_size(args.m)
    kw = dict(batch_size=batch_size, fill=dataset.fill, progress=False, device=args.device)
    evaluate(model, x[:4], ts, measures, **kw)  # warm-up: numba compile/cache load, allocator
    start = time.perf_counter()
    evaluate(model, x[:4], ts, measures, backend="compile", **kw)  # warm-up: torch.compile
    compile_seconds = time.perf_counter() - start

    print(f"SimpleConv, n={args.n} MNIST test images × m={args.m} rotations = {args.n * args.m} images; "
          f"{batch_size} samples ({batch_size * args.m} images) per forward; {torch.get_num_threads()} threads; "
          f"device {args.device}")
    rows = {"forward": [], "numba": [], "torch": [], "compile": []}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    auto = "fused numba stats" if torch.device(args.device).type == "cpu" else "auto (torch ops)"
    for _ in range(args.repeats):  # interleaved, so that machine noise hits all three alike
        rows["forward"].append(bare_forwards(model, x, ts, batch_size, dataset.fill))
        model.images = 0
        start = time.perf_counter()
        results = evaluate(model, x, ts, measures, backend="auto", **kw)
        rows["numba"].append(time.perf_counter() - start)
        images = model.images
        start = time.perf_counter()
        evaluate(model, x, ts, measures, backend="torch", **kw)
        rows["torch"].append(time.perf_counter() - start)
        start = time.perf_counter()
        evaluate(model, x, ts, measures, backend="compile", **kw)
        rows["compile"].append(time.perf_counter() - start)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = {k: min(v) for k, v in rows.items()}
    layers = results["NV[element,std]"].layer_names
    features = sum(results["TV[element,std]"][name].size for name in layers)
    accumulators = features * (3 * args.m + 2) * 8  # STMoments: shift, Σ, Σ² [m, F] and two row sums [F]

    print(f"(a) bare forwards               {best['forward']:7.2f} s")
    print(f"    evaluate, {auto:17s} {best['numba']:7.2f} s   ratio {best['numba'] / best['forward']:.2f}")
    print(f"    evaluate, torch-op stats    {best['torch']:7.2f} s   ratio {best['torch'] / best['forward']:.2f}")
    print(f"    evaluate, torch.compile'd   {best['compile']:7.2f} s   ratio {best['compile'] / best['forward']:.2f}"
          f"   (first call with its compile: {compile_seconds:.1f} s)")
    print(f"(b) images forwarded by evaluate: {images} (n·m = {args.n * args.m})")
    print(f"(c) peak RSS growth during the runs: {(rss_after - rss_before) / 1024:.0f} MiB; "
          f"float64 accumulators: {accumulators / 2**20:.0f} MiB for {features} activations in {len(layers)} layers")
    print(f"    best of {args.repeats}; all times (s): " + ", ".join(f"{k}={[round(t, 2) for t in v]}" for k, v in rows.items()))


def ratio(model, x, ts, fill, repeats: int) -> tuple[float, float]:
    """(bare forwards s, evaluate TV+SV+NV s), best of ``repeats`` interleaved runs."""
    measures = [TransformationVariance(), SampleVariance(), NormalizedVariance()]
    batch_size = default_batch_size(len(ts))
    evaluate(model, x[:4], ts, measures, batch_size=batch_size, fill=fill, progress=False)  # warm-up
    bare, full = [], []
    for _ in range(repeats):
        bare.append(bare_forwards(model, x, ts, batch_size, fill))
        start = time.perf_counter()
        evaluate(model, x, ts, measures, batch_size=batch_size, fill=fill, progress=False)
        full.append(time.perf_counter() - start)
    return min(bare), min(full)


def sweep(repeats: int) -> None:
    dataset = data.load("mnist", "test", n=1000)
    x, _ = dataset.tensors()
    narrow, wide = models.SimpleConv().eval(), models.SimpleConv(filters=64).eval()
    cases = [("SimpleConv", narrow, n, 25) for n in (250, 500, 1000)]
    cases += [("SimpleConv", narrow, 500, m) for m in (8, 100)]
    cases += [("SimpleConv(64)", wide, 500, 25)]
    print(f"TV + SV + NV, fused statistics; {torch.get_num_threads()} threads, best of {repeats}")
    print(f"{'model':>15} {'n':>5} {'m':>4} {'forwards s':>11} {'evaluate s':>11} {'ratio':>6} "
          f"{'states MiB':>11} {'(3m+2)F·8 MiB':>14}")
    for label, model, n, m in cases:
        ts = transforms.rotations(m)
        bare, full = ratio(model, x[:n], ts, dataset.fill, repeats)
        states = collect(model, x[:8], ts, [TransformationVariance(), SampleVariance(), NormalizedVariance()],
                         progress=False)
        measured = sum(states.nbytes().values())
        formula = sum(math.prod(info.shape) for info in states.layers.values()) * (3 * m + 2) * 8
        print(f"{label:>15} {n:>5} {m:>4} {bare:>11.2f} {full:>11.2f} {full / bare:>6.2f} "
              f"{measured / 2**20:>11.1f} {formula / 2**20:>14.1f}")


if __name__ == "__main__":
    main()
