"""How much of a measurement's forwards were torch's max pooling and ELU, and what tmlib.fast_layers saves.

Side by side in one run, interleaved, median of ``--repeats``: torch's ``nn.MaxPool2d(2)`` and
``nn.ELU()`` beside tmlib's on the blocks SimpleConv computes (16 samples × 17 rotations, real
activations for the ELU: a negative value is what costs torch's kernel), then the bare
``no_grad`` forwards of SimpleConv on n·m rotated MNIST images with torch's layers, with tmlib's
pooling alone and with both (the logits compared).

Usage: python benchmarks/bench_layers.py [--n 200] [--rotations 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from tmlib import data, fast_layers, models, transforms
from tmlib.adapters import images_of


def median_seconds(runs: dict, repeats: int) -> dict:
    """label → median seconds of ``runs[label]()``, the runs interleaved (drift hits all alike)."""
    for run in runs.values():
        run()  # warm
    times = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def with_torchs(model: nn.Module, kinds: tuple[type, ...]) -> nn.Module:
    """A copy of ``model`` whose tmlib layers of ``kinds`` are torch's own again."""
    copied = copy.deepcopy(model)
    for parent in copied.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, fast_layers.MaxPool2d) and fast_layers.MaxPool2d in kinds:
                setattr(parent, name, nn.MaxPool2d(2))
            elif isinstance(child, fast_layers.ELU) and fast_layers.ELU in kinds:
                setattr(parent, name, nn.ELU(child.alpha))
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rotations", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    model = models.SimpleConv().eval()
    images = images_of(data.load("mnist", "test", n=args.n))
    ts = transforms.rotations(args.rotations)
    with torch.no_grad():
        for shape in [(272, 16, 28, 28), (272, 32, 14, 14)]:
            x = torch.randn(shape)
            t = median_seconds({"torch": lambda x=x: nn.MaxPool2d(2)(x),
                                "tmlib": lambda x=x: fast_layers.MaxPool2d(2)(x)}, args.repeats)
            same = torch.equal(nn.MaxPool2d(2)(x), fast_layers.MaxPool2d(2)(x))
            print(f"max pooling {list(shape)}: torch {t['torch'] * 1e3:.2f} ms, tmlib {t['tmlib'] * 1e3:.2f} ms "
                  f"({t['torch'] / t['tmlib']:.1f}× faster; same values: {same})")
        block = ts.apply(images[:16]).reshape(-1, *images.shape[1:])
        for layer in ("conv0", "conv2"):
            x = model.conv0(block) if layer == "conv0" else model.conv2(model.pool1(model.act1(model.conv1(model.act0(model.conv0(block))))))
            t = median_seconds({"torch": lambda x=x: nn.ELU()(x), "tmlib": lambda x=x: fast_layers.ELU()(x)}, args.repeats)
            differ = float((nn.ELU()(x) != fast_layers.ELU()(x)).double().mean())
            print(f"ELU of {layer}'s output {list(x.shape)} ({float((x <= 0).double().mean()):.0%} ≤ 0): torch "
                  f"{t['torch'] * 1e3:.2f} ms, tmlib {t['tmlib'] * 1e3:.2f} ms ({t['torch'] / t['tmlib']:.1f}× faster; "
                  f"values differing by 1 ulp: {differ:.3%})")

    def forwards(net):
        outs = []
        with torch.no_grad():
            for i in range(0, args.n, 16):
                chunk = images[i : i + 16]
                outs.append(net(ts.apply(chunk).reshape(-1, *chunk.shape[1:])))
        return torch.cat(outs)

    nets = {"torch's layers": with_torchs(model, (fast_layers.MaxPool2d, fast_layers.ELU)),
            "tmlib's pooling": with_torchs(model, (fast_layers.ELU,)), "tmlib's pooling and ELU": model}
    logits = {label: forwards(net) for label, net in nets.items()}
    t = median_seconds({label: lambda net=net: forwards(net) for label, net in nets.items()}, args.repeats)
    base = t["torch's layers"]
    print(f"SimpleConv bare forwards of {args.n} × {args.rotations} images: "
          + ", ".join(f"{label} {seconds:.2f} s ({base / seconds:.2f}×)" for label, seconds in t.items()))
    reference, pooled, fast = logits["torch's layers"], logits["tmlib's pooling"], logits["tmlib's pooling and ELU"]
    print(f"logits: with tmlib's pooling alone bit for bit {torch.equal(pooled, reference)}; "
          f"with its ELU too max |Δ| {float((fast - reference).abs().max()):.1e}, "
          f"the same predictions {torch.equal(fast.argmax(1), reference.argmax(1))}")


if __name__ == "__main__":
    main()
