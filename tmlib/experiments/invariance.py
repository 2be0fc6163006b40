"""G-EED results as numbers with intervals: the relative deviation per layer, seed profiles, gains.

Kvinge et al.'s invariance G-EED, 1 − S (S the mean cosine similarity of f(g·x) to its orbit's
centroid), depends on how similar *any* two samples are in a layer: ReLU/ELU features of unrelated
images already have cos > 0. The comparison between models (and between layers) therefore uses the
**relative deviation** (1 − S)/(1 − M), M the mean cosine similarity of two different untransformed
samples: 0 = invariant, 1 = an orbit as spread as the data (:func:`tmlib.measures.geed_table`).
:func:`relative_deviation` gives it per layer *with its jackknife replicates*, from the two results
of one pass (normalised S/M and raw 1 − S, both computed on the same leave-one-block-out states:
M = S / (S/M) replicate by replicate), so every difference of it has an interval
(:class:`~tmlib.experiments.analysis.Jack`; over seeds :func:`~tmlib.experiments.seed_profile`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..measures import geed_table
from ..results import MeasureResult
from .analysis import Estimate, Jack, seed_mean

__all__ = [
    "KL",
    "NORMALIZED",
    "RAW",
    "layer_estimates",
    "relative_deviation",
    "relative_frame",
    "relative_gain",
    "spatial_layers",
]

NORMALIZED = "GEED-inv[cosine,True]"  # S/M
RAW = "GEED-inv[cosine,False]"  # 1 − S
KL = "GEED-KL"


def relative_deviation(results: Mapping[str, MeasureResult], normalized: str = NORMALIZED, raw: str = RAW) -> Jack:
    """(1 − S)/(1 − M) per layer, with its K jackknife replicates.

    ``results``: one pass of :func:`~tmlib.experiments.measure_geed` (or any pass with both
    ``GEEDInvariance(normalize=True)`` and ``GEEDInvariance()``), measured with ``blocks=K``.
    On a layer where the normalised measure fell back to Euclidean distances (M ≤ its guard), the
    value is the fallback's ratio (RMS orbit distance / RMS pair distance), as in ``geed_table``.
    """
    for name in (normalized, raw):
        if name not in results:
            raise ValueError(f"results has no {name!r}; measure GEEDInvariance(normalize=True) and GEEDInvariance()")
    ratio, deviation = Jack.of(results[normalized]), Jack.of(results[raw])
    if list(ratio.value.index) != list(deviation.value.index):
        raise ValueError("the normalised and raw results must cover the same layers (one pass)")
    # S = 1 − raw; M = S / (S/M); relative = raw / (1 − M): the same arithmetic on every replicate.
    similarity = -deviation + 1.0
    baseline = similarity / ratio
    relative = deviation / (-baseline + 1.0)
    methods = geed_table(results[normalized]).set_index("layer")["method"]
    fallback = [layer for layer in relative.value.index if methods.get(layer) != "cosine"]
    if fallback:
        value, replicates = relative.value.copy(), relative.replicates.copy()
        value[fallback] = ratio.value[fallback]
        replicates[fallback] = ratio.replicates[fallback]
        relative = Jack(value, replicates)
    return relative


def relative_frame(results: Mapping[str, MeasureResult], confidence: float = 0.95, **columns) -> pd.DataFrame:
    """:func:`tmlib.measures.geed_table` of one pass (raw, M, S/M, method per layer) with the
    relative deviation's jackknife se and interval (columns ``value`` = ``relative``, se, low,
    high), and constant ``columns`` (e.g. label=…): the frame ``plots.layer_curves`` draws."""
    table = geed_table(results[NORMALIZED])
    intervals = relative_deviation(results).frame(confidence).set_index("layer")
    table["value"] = table["relative"]
    for column in ("se", "low", "high"):
        table[column] = intervals.loc[table["layer"], column].to_numpy()
    return table.assign(measure="relative deviation (1 − S)/(1 − M)", **columns)


def layer_estimates(jacks: Sequence[Jack], layers: Sequence[str]) -> dict[str, Estimate]:
    """``{layer: seed_mean(...)}`` for per-layer Jacks, one per seed."""
    return {layer: seed_mean([j.mean([layer]) for j in jacks]) for layer in layers}


def relative_gain(plain: Jack, augmented: Jack) -> Jack:
    """1 − augmented / plain: the fraction of the plain model's deviation that augmentation removes
    (1 = invariant, 0 = no gain, < 0 = less invariant), with the replicates of both."""
    return -(augmented / plain) + 1.0


def spatial_layers(result: MeasureResult) -> list[str]:
    """The layers of a latent-equivariance result under the ``"spatial"`` action: the layers with
    feature maps (G-EED skips the vector layers there), in forward order."""
    skipped = set(result.metadata.get("skipped_layers", []) or [])
    return [layer for layer in result.layer_names if layer not in skipped
            and np.isfinite(result.layer_means().get(layer, np.nan))]
