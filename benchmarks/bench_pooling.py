"""How much of a measurement's forwards was torch's 2×2 max pooling, and what tmlib.pooling saves.

Side by side in one run, interleaved, median of ``--repeats``: ``nn.MaxPool2d(2)`` and
``tmlib.pooling.MaxPool2d(2)`` on the blocks SimpleConv pools (16 samples × 17 rotations), then the
bare ``no_grad`` forwards of SimpleConv on n·m rotated MNIST images with either pooling (the same
logits, checked).

Usage: python benchmarks/bench_pooling.py [--n 200] [--rotations 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from tmlib import data, models, pooling, transforms
from tmlib.adapters import images_of


def median_seconds(run, repeats: int) -> float:
    run()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rotations", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    with torch.no_grad():
        for shape in [(272, 16, 28, 28), (272, 32, 14, 14)]:
            x = torch.randn(shape)
            theirs = median_seconds(lambda x=x: nn.MaxPool2d(2)(x), args.repeats)
            mine = median_seconds(lambda x=x: pooling.MaxPool2d(2)(x), args.repeats)
            same = torch.equal(nn.MaxPool2d(2)(x), pooling.MaxPool2d(2)(x))
            print(f"max pooling {list(shape)}: torch {theirs * 1e3:.2f} ms, tmlib {mine * 1e3:.2f} ms "
                  f"({theirs / mine:.1f}× faster; same values: {same})")

    model = models.SimpleConv().eval()
    reference = copy.deepcopy(model)
    for parent in reference.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, pooling.MaxPool2d):
                setattr(parent, name, nn.MaxPool2d(2))
    images = images_of(data.load("mnist", "test", n=args.n))
    ts = transforms.rotations(args.rotations)

    def forwards(net):
        outs = []
        with torch.no_grad():
            for i in range(0, args.n, 16):
                block = images[i : i + 16]
                outs.append(net(ts.apply(block).reshape(-1, *block.shape[1:])))
        return torch.cat(outs)

    same = torch.equal(forwards(model), forwards(reference))
    times = {"torch": [], "tmlib": []}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both
        for label, net in (("torch", reference), ("tmlib", model)):
            start = time.perf_counter()
            forwards(net)
            times[label].append(time.perf_counter() - start)
    theirs, mine = statistics.median(times["torch"]), statistics.median(times["tmlib"])
    print(f"SimpleConv bare forwards of {args.n} × {args.rotations} images: torch's pooling {theirs:.2f} s, "
          f"tmlib's {mine:.2f} s ({theirs / mine:.2f}×; same logits: {same})")


if __name__ == "__main__":
    main()
