"""How much does measuring cost on top of the forwards it needs?

Measures, in one run and side by side:
  (a) evaluate(TV + SV + NV) on SimpleConv, n MNIST test images × m rotations, divided by the time of
      bare no_grad forwards of the same n·m warped images (same blocks, same batch size);
  (b) the number of images the model saw during evaluate (must be n·m);
  (c) peak memory: the process's peak RSS growth during evaluate, and the float64 accumulators.
Also reports the same ratio for the torch (non-fused) statistics backend, for comparison.

Usage: python benchmarks/bench_engine.py [--n 500] [--m 25] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from tmlib import data, models, transforms
from tmlib.engine import default_batch_size
from tmlib.measures import NormalizedVariance, SampleVariance, TransformationVariance, evaluate


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


def bare_forwards(model, x, ts, batch_size, fill) -> float:
    # Warp first, outside the clock: the ratio compares measuring with forwards only.
    blocks = [ts.apply(x[i : i + batch_size], fill=fill).flatten(0, 1) for i in range(0, len(x), batch_size)]
    start = time.perf_counter()
    with torch.no_grad():
        for block in blocks:
            model(block)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--m", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    dataset = data.load("mnist", "test", n=args.n)
    x, _ = dataset.tensors()
    ts = transforms.rotations(args.m)
    model = CountingModel(models.SimpleConv()).eval()
    measures = [TransformationVariance(), SampleVariance(), NormalizedVariance()]
    batch_size = default_batch_size(args.m)
    kw = dict(batch_size=batch_size, fill=dataset.fill, progress=False)
    evaluate(model, x[:4], ts, measures, **kw)  # warm-up: numba compile/cache load, allocator

    print(f"SimpleConv, n={args.n} MNIST test images × m={args.m} rotations = {args.n * args.m} images; "
          f"{batch_size} samples ({batch_size * args.m} images) per forward; {torch.get_num_threads()} threads")
    rows = {"forward": [], "numba": [], "torch": []}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = {k: min(v) for k, v in rows.items()}
    layers = results["NV[element,std]"].layer_names
    features = sum(results["TV[element,std]"][name].size for name in layers)
    accumulators = features * (2 * args.m + 3) * 8

    print(f"(a) bare forwards               {best['forward']:7.2f} s")
    print(f"    evaluate, fused numba stats {best['numba']:7.2f} s   ratio {best['numba'] / best['forward']:.2f}")
    print(f"    evaluate, torch-op stats    {best['torch']:7.2f} s   ratio {best['torch'] / best['forward']:.2f}")
    print(f"(b) images forwarded by evaluate: {images} (n·m = {args.n * args.m})")
    print(f"(c) peak RSS growth during the runs: {(rss_after - rss_before) / 1024:.0f} MiB; "
          f"float64 accumulators: {accumulators / 2**20:.0f} MiB for {features} activations in {len(layers)} layers")
    print(f"    best of {args.repeats}; all times (s): " + ", ".join(f"{k}={[round(t, 2) for t in v]}" for k, v in rows.items()))


if __name__ == "__main__":
    main()
