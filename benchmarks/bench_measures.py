"""What do all the invariance measures cost together, next to the forwards they need?

In one run, side by side: bare no_grad forwards of the n·m warped images, and evaluate() with
TV, SV, NV, ANOVA, ND (squared Euclidean) and Goodfellow on SimpleConv (MNIST test images ×
25 rotations). Goodfellow needs one extra pass over the n untransformed images for its thresholds;
that pass is reported separately, as a ratio to bare forwards of the same n images. Then the
same-equivariance family (TVSE, SVSE, NVSE sharing the de-transformed moments, and DSES: every
feature map warped back, or its reference warped, per transformation) on the same images.

Usage: python benchmarks/bench_measures.py [--n 500] [--m 25] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_engine import CountingModel, add_device_argument, bare_forwards

from tmlib import data, models, transforms
from tmlib.engine import default_batch_size
from tmlib.measures import (
    AnovaMeasure,
    DistanceSameEquivariance,
    GoodfellowMeasure,
    NormalizedDistance,
    NormalizedVariance,
    NormalizedVarianceSE,
    SampleVariance,
    SampleVarianceSE,
    TransformationVariance,
    TransformationVarianceSE,
    evaluate,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--m", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_argument(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    dataset = data.load("mnist", "test", n=args.n)
    x, _ = dataset.tensors()
    x = x.to(args.device)
    ts = transforms.rotations(args.m)
    model = CountingModel(models.SimpleConv()).eval().to(args.device)
    variance_family = [TransformationVariance(), SampleVariance(), NormalizedVariance(), AnovaMeasure(), NormalizedDistance()]
    everything = variance_family + [GoodfellowMeasure()]
    same_equivariance = [TransformationVarianceSE(), SampleVarianceSE(), NormalizedVarianceSE(),
                         DistanceSameEquivariance()]
    batch_size = default_batch_size(args.m)
    kw = dict(batch_size=batch_size, fill=dataset.fill, progress=False, device=args.device)
    evaluate(model, x[:8], ts, everything + same_equivariance, **kw)  # warm-up: numba compile/cache load

    identity = transforms.identity()
    images = 0
    times = {"forward n·m": [], "forward n": [], "variance family": [], "all measures": [], "same-equivariance": []}
    for _ in range(args.repeats):
        times["forward n·m"].append(bare_forwards(model, x, ts, batch_size, dataset.fill))
        times["forward n"].append(bare_forwards(model, x, identity, batch_size * args.m, dataset.fill))
        for label, measures in (("variance family", variance_family), ("all measures", everything),
                                ("same-equivariance", same_equivariance)):
            model.images = 0
            start = time.perf_counter()
            evaluate(model, x, ts, measures, **kw)
            times[label].append(time.perf_counter() - start)
            if label == "all measures":
                images = model.images
    best = {k: min(v) for k, v in times.items()}
    # Goodfellow's reference pass is the only extra forward work: n images, one per sample.
    threshold_pass = best["forward n"]
    print(f"SimpleConv, n={args.n} × m={args.m} rotations, {torch.get_num_threads()} threads, device {args.device}, "
          f"best of {args.repeats}")
    print(f"bare forwards of the n·m warped images       {best['forward n·m']:7.2f} s   ratio 1")
    print(f"TV+SV+NV+ANOVA+ND (one shared state)         {best['variance family']:7.2f} s   "
          f"ratio {best['variance family'] / best['forward n·m']:.2f}")
    print(f"… + Goodfellow (with its threshold pass)     {best['all measures']:7.2f} s   "
          f"ratio {best['all measures'] / best['forward n·m']:.2f}")
    print(f"    of which ≥ the threshold pass's forwards {threshold_pass:7.2f} s   "
          f"({threshold_pass / best['forward n·m']:.2f} of the n·m forwards)")
    print(f"    all measures without the threshold pass's forwards: ratio "
          f"{(best['all measures'] - threshold_pass) / best['forward n·m']:.2f}")
    print(f"TVSE+SVSE+NVSE+DSES (same-equivariance)      {best['same-equivariance']:7.2f} s   "
          f"ratio {best['same-equivariance'] / best['forward n·m']:.2f}")
    print(f"images forwarded with all measures: {images} (n·m + n = {args.n * args.m + args.n})")
    print("all times (s): " + ", ".join(f"{k}={[round(t, 2) for t in v]}" for k, v in times.items()))


if __name__ == "__main__":
    main()
