"""Golden numbers of every measure family on small deterministic cases (issue 12's refactor guard).

``python tests/golden/make_golden.py OUT.npz`` writes them; ``tests/test_golden.py`` recomputes
them with the current code and compares to rel 1e-12. The model and the samples are float64: the
float32 forwards of the same model differ between CPUs (oneDNN picks its kernels by instruction
set; on an AVX-512 EPYC every family read 1e-8 to 5e-7 away from a file written elsewhere), which
a 1e-12 guard of the measures' arithmetic must not see. A first file, in float32, written at the
base commit f1074ee before the measure architecture was rewritten, held at 1e-12 on the machines of
that rewrite; the float64 file in this folder was written at 1ddcd31. Only public entry points are
used (``evaluate``, the measure classes, ``evaluate_stratified``, ``widgets.compute``, ``lie``),
so the same script runs before and after the rewrite.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import torch
from torch import nn

from tmlib import lie, widgets
from tmlib import transforms as T
from tmlib.measures import (
    AnovaMeasure,
    DistanceSameEquivariance,
    GEEDEquivariance,
    GEEDInvariance,
    GEEDOutputKL,
    GoodfellowMeasure,
    NormalizedDistance,
    NormalizedVariance,
    NormalizedVarianceSE,
    SampleDistance,
    SampleVariance,
    SampleVarianceSE,
    TransformationDistance,
    TransformationVariance,
    TransformationVarianceSE,
    evaluate,
    evaluate_stratified,
)

BACKENDS = ("numba", "torch")


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ELU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    ).double().eval()


def samples(n: int = 9, size: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def variance_family() -> list:
    out = []
    for cls in (TransformationVariance, SampleVariance, NormalizedVariance):
        for stat in ("std", "var"):
            out += [cls(mode="element", stat=stat), cls(mode="channel", stat=stat)]
            out += [cls(mode="aggregate", stat=stat, agg=a) for a in ("mean", "sum", "max")]
    return out


def distance_family() -> list:
    return [
        cls(unit=u, metric=me, normalize=no)
        for cls in (TransformationDistance, SampleDistance, NormalizedDistance)
        for u in ("element", "channel")
        for me in ("sqeuclidean", "euclidean")
        for no in (False, True)
    ]


def anova() -> list:
    return [AnovaMeasure(), AnovaMeasure(output="p"), AnovaMeasure(output="reject"),
            AnovaMeasure(output="reject", bonferroni=False, alpha=0.05)]


def goodfellow() -> list:
    return [GoodfellowMeasure(r, th, lo, out) for th in ("percentile", "normal") for lo in ("all", "firing")
            for r in (0.1, 0.3) for out in ("threshold", "global", "local", "score")]


def same_equivariance(reference: bool) -> list:
    out = [cls(mode=mo, stat=st) for cls in (TransformationVarianceSE, SampleVarianceSE, NormalizedVarianceSE)
           for mo in ("element", "channel") for st in ("std", "var")]
    return out + [DistanceSameEquivariance(normalize=no, reference=reference) for no in (False, True)]


def geed() -> list:
    return [GEEDInvariance(), GEEDInvariance(metric="euclidean"), GEEDInvariance(normalize=True), GEEDOutputKL(),
            GEEDEquivariance(), GEEDEquivariance(metric="euclidean"), GEEDEquivariance(action="trivial")]


def _scalar_items(prefix: str, value, out: dict) -> None:
    """Numbers of a metadata entry (dicts of layers, scalars) as arrays; strings are skipped."""
    if isinstance(value, dict):
        for k, v in value.items():
            _scalar_items(f"{prefix}/{k}", v, out)
    elif isinstance(value, (bool, int, float, np.floating, np.integer)) and not isinstance(value, bool):
        out[prefix] = np.asarray(float(value))


def add_results(tag: str, results: dict, out: dict, meta_keys=()) -> None:
    for name, result in results.items():
        for layer in result.layer_names:
            out[f"{tag}|{name}|{layer}"] = np.asarray(result[layer], dtype=np.float64)
        for key in meta_keys:
            if key in result.metadata:
                _scalar_items(f"{tag}|{name}|meta:{key}", result.metadata[key], out)


def golden_values() -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    model, x = tiny_cnn(), samples()
    rot5, rot4 = T.rotations(5), T.rotations(4, degrees=90)  # rot4: no identity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in BACKENDS:
            kw = dict(batch_size=3, progress=False, backend=backend)
            add_results(f"variance/{backend}", evaluate(model, x, rot5, variance_family(), **kw), out)
            add_results(f"anova/{backend}", evaluate(model, x, rot5, anova(), **kw), out,
                        ("rejection_fraction", "alpha_per_test", "df_between", "df_within"))
            add_results(f"goodfellow/{backend}", evaluate(model, x, rot5, goodfellow(), **kw), out,
                        ("global_firing_rate", "silent_units"))
            add_results(f"distance/{backend}", evaluate(model, x, rot5, distance_family(), **kw), out)
            add_results(f"se/{backend}", evaluate(model, x, rot5, same_equivariance(False), **kw), out)
            add_results(f"se-ref/{backend}", evaluate(model, x, rot4, same_equivariance(True), **kw), out)
            add_results(f"se-c4/{backend}", evaluate(model, x, T.c4(), same_equivariance(False), **kw), out)
            for ts_name, ts in (("c4", T.c4()), ("rot5", rot5)):
                add_results(f"geed-{ts_name}/{backend}", evaluate(model, x, ts, geed(), **kw), out,
                            ("raw", "baseline", "pair_distance"))
            # Centred features: the normalised G-EED's Euclidean fallback.
            half = samples(n=4, seed=3)
            centred = torch.cat([half, -half])
            add_results(f"geed-fallback/{backend}",
                        evaluate(nn.Sequential(nn.Identity()), centred, T.c4(), GEEDInvariance(normalize=True), **kw),
                        out, ("raw", "baseline"))
            labels = torch.tensor([0, 1, 2] * 3)
            add_results(f"stratified/{backend}",
                        evaluate_stratified(model, x, rot5, [NormalizedVariance(), AnovaMeasure(output="reject"),
                                                             GoodfellowMeasure(0.3)], labels=labels, **kw), out)
        data = widgets.compute(model, x, T.rotations(4), image=5, max_st_samples=4, batch_size=2)
        for layer in data.layers:
            out[f"explorer|st_means|{layer}"] = data.st_means[layer].astype(np.float64)
            out[f"explorer|maps|{layer}"] = data.maps[layer].astype(np.float64)
            for measure in ("NV", "TV", "SV"):  # the explorer's measures at the base commit
                out[f"explorer|{measure}|{layer}"] = data.values(measure, layer)
        lee = lie.lie_equivariance_error(model, samples(n=5, size=6), generators=["rotation", "scale"],
                                         layers=["0", "3", "6"], batch_size=2, progress=False)
        for column in ("value", "sem", "variance", "relative"):
            out[f"lie|lee|{column}"] = lee[column].to_numpy(dtype=np.float64)
        gg = lie.liegg(model, samples(n=5, size=6), batch_size=2, progress=False)
        out["lie|liegg|gram"] = gg.gram.numpy()
    return out


def compare(expected: dict, got: dict, rtol: float = 1e-12) -> list[str]:
    """Differences beyond rtol (NaN = NaN, inf = inf), as readable lines; [] when all agree."""
    problems = []
    for key in sorted(set(expected) | set(got)):
        if key not in got or key not in expected:
            problems.append(f"{key}: only in {'expected' if key in expected else 'current'}")
            continue
        a, b = np.asarray(expected[key], dtype=np.float64), np.asarray(got[key], dtype=np.float64)
        if a.shape != b.shape:
            problems.append(f"{key}: shape {a.shape} != {b.shape}")
            continue
        same = (a == b) | (np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= rtol * np.abs(a))
        if not same.all():
            worst = np.nanmax(np.abs(a - b) / np.maximum(np.abs(a), 1e-300))
            problems.append(f"{key}: {int((~same).sum())} of {a.size} values differ, worst rel {worst:.3g}")
    return problems


def save(path: str, values: dict[str, np.ndarray]) -> None:
    """One flat float64 array plus an index (key, shape): a few hundred KB instead of 3,000 npz entries."""
    keys = sorted(values)
    flat = np.concatenate([np.asarray(values[k], dtype=np.float64).ravel() for k in keys])
    shapes = json.dumps([[k, list(np.shape(values[k]))] for k in keys])
    np.savez_compressed(path, values=flat, index=np.array(shapes))


def load(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        flat, index = data["values"], json.loads(str(data["index"]))
    out, start = {}, 0
    for key, shape in index:
        size = int(np.prod(shape)) if shape else 1
        out[key] = flat[start : start + size].reshape(shape)
        start += size
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    save(sys.argv[1], golden_values())
    print(f"wrote {sys.argv[1]}")
