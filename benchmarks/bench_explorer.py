"""How long does the layer explorer take to answer? The latencies a person waits for.

Two SimpleConv checkpoints (untrained, seeds 0 and 1) on MNIST test images: the first selection (a
pass for the checkpoint and one for the untrained baseline drawn beside it), then changes of layer,
channel and measure (redraws only), a new transformation set (one more pass per checkpoint shown)
and a cache hit (going back). Each change is timed by the wall clock from the widget's value
being set to every panel updated: the kernel's work and the rendering of the ipympl canvases it
redrew (what the browser asks for next; the transfer and the browser's paint are not counted).
Median of ``--repeats`` over distinct selections: first views, then the same views again (the
image panels from the explorer's PNG cache; the canvases are drawn anew). Then where a pass's time
goes: the bare forwards of the same n·m images, and a pass of each measure alone.

Usage: python benchmarks/bench_explorer.py [--n 200] [--rotations 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tmlib import data, keep_freed_blocks, models, transforms, widgets

CANVASES: list = []  # the explorer's canvases, rendered after each action as the browser would ask


def timed(action) -> float:
    start = time.perf_counter()
    action()
    for canvas in CANVASES:
        if canvas.figure.stale:
            canvas.draw()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rotations", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    keep_freed_blocks()  # as the explorer's notebook does (tmlib.experiments.Notebook)
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
    for canvas in (explorer.curve, explorer.heatmap, explorer.st):
        canvas.syncing_data_url = False  # as once JupyterLab shows it: images go to the browser only
        CANVASES.append(canvas)
    layers = explorer.data.layers
    print(f"{args.n} samples × {args.rotations} rotations, SimpleConv, {len(layers)} layers, "
          f"{len(explorer.data.measures)} measures per pass")
    print(f"first selection (2 passes: the checkpoint and the untrained baseline): {first:.2f} s; "
          f"{explorer.status.value}")

    rows = {"layer": [], "channel": [], "measure": []}
    visits, start_layer = [], explorer.layer.value
    for i in range(args.repeats):
        layer = layers[(3 + 2 * i) % len(layers)]
        unit = (explorer.unit.value + 1 + i) % (min(explorer.data.channels(layer), explorer.unit.max + 1))
        offered = [m for m in explorer.data.measures_for(layer) if m != explorer.measure.value]
        measure = offered[i % len(offered)]
        visits.append((layer, unit, measure))
        rows["layer"].append(timed(lambda layer=layer: explorer.select(layer=layer)))
        rows["channel"].append(timed(lambda unit=unit: explorer.select(unit=unit)))
        rows["measure"].append(timed(lambda measure=measure: explorer.select(measure=measure)))
    explorer.select(layer=start_layer, measure="NV", unit=0)  # the same start …
    again = {"layer": [], "channel": [], "measure": []}
    for layer, unit, measure in visits:  # … and the same selections, in the same order
        again["layer"].append(timed(lambda layer=layer: explorer.select(layer=layer)))
        again["channel"].append(timed(lambda unit=unit: explorer.select(unit=unit)))
        again["measure"].append(timed(lambda measure=measure: explorer.select(measure=measure)))
    new_set = timed(lambda: setattr(explorer.transformation, "value", list(sets)[1]))
    new_status = explorer.status.value
    back = timed(lambda: setattr(explorer.transformation, "value", list(sets)[0]))
    # As from the browser (the state JupyterLab sends): the view first, the rest in the background.
    explorer.select(measure="NV")  # on screen: NV (its first step is the moments family alone)
    explorer.cache = widgets.ExplorerCache()
    shown = explorer.data
    start = time.perf_counter()
    explorer.transformation.set_state({"index": 1})
    while explorer.data is shown and explorer.worker.is_alive():
        time.sleep(0.005)
    timed(lambda: None)  # the canvases it drew, rendered
    first_view = time.perf_counter() - start
    explorer.worker.join()
    everything = time.perf_counter() - start
    start = time.perf_counter()
    one = widgets.compute(checkpoints["untrained"], x, sets[list(sets)[0]])
    single = time.perf_counter() - start
    ts = sets[list(sets)[0]]
    images = widgets.data.images_of(x)
    model = checkpoints["untrained"]
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, args.n, 16):
            block = images[i : i + 16]
            model(ts.apply(block).reshape(-1, *block.shape[1:]))
    bare = time.perf_counter() - start
    alone = {}
    for name in widgets.MEASURES:
        measures, _ = widgets.data.applicable_measures([name], ts)
        alone[name] = timed(lambda measures=measures: widgets.compute(model, x, ts, measures=measures))
    for name, values in rows.items():
        print(f"{name} change: median {statistics.median(values):.2f} s (of {', '.join(f'{v:.2f}' for v in values)}); "
              f"seen before: median {statistics.median(again[name]):.3f} s")
    print(f"new transformation set ({args.rotations + 1} rotations, 2 checkpoints): {new_set:.2f} s; {new_status}")
    print(f"back to a cached set: {back:.2f} s")
    print(f"the same new set chosen in the browser (a background pass): its view after {first_view:.2f} s "
          f"({', '.join(explorer.first_measures())}; the selected checkpoint), everything after {everything:.2f} s; {explorer.status.value}")
    print(f"one pass alone (widgets.compute, {args.n} × {args.rotations}, every measure): {single:.2f} s; "
          f"{one.images_forwarded} images")
    print(f"  the bare forwards of those images (warped, blocks of 16 samples, no_grad): {bare:.2f} s")
    print("  a pass of one measure (and the pictures): "
          + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in alone.items()))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        report = widgets.export_html(explorer.data, Path(folder) / "report.html", others=explorer.others,
                                     label=explorer.checkpoint.value)
        html = report.read_text()
        sections = len(re.findall(r"<h2[^>]*>Layer <code>", html))
        print(f"offline report: {time.perf_counter() - start:.1f} s, {report.stat().st_size / 1e6:.2f} MB, "
              f"{sections} layer sections of {len(layers)} layers, {len(explorer.others) + 1} checkpoints")
        explorer.export_dir = Path(folder)
        start = time.perf_counter()
        written = explorer.export()
        print(f"export buttons (PNG + 2 CSV): {time.perf_counter() - start:.2f} s, "
              + ", ".join(f"{path.name} {path.stat().st_size / 1e3:.0f} kB" for path in written))


if __name__ == "__main__":
    main()
