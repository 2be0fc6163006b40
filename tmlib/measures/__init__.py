"""Measures of invariance, and :func:`evaluate`, the single pass that feeds them all.

The public face of the measure architecture: the measure classes, the pass (:func:`evaluate`,
:func:`collect` → :class:`PassStates`, :func:`merge_states`), :func:`evaluate_stratified`, and
the pieces a new measure is written with (:class:`Measure`, :class:`StatSpec`, the state
primitives :class:`ShiftedMoments` and :class:`SumState`). This package is a facade: the
modules below it never import the engine.
"""

from ..engine import NonFiniteActivationError, collect, collect_references, evaluate
from ..stratified import evaluate_stratified
from .anova import AnovaMeasure
from .base import LayerInfo, LayerValue, Measure, PassContext, StatSpec
from .collection import PassStates, merge_states
from .distance import NormalizedDistance, SampleDistance, TransformationDistance
from .geed import GEEDEquivariance, GEEDInvariance, GEEDOutputKL, geed_table
from .goodfellow import GoodfellowMeasure
from .moments import Moments, STMoments
from .same_equivariance import (
    DistanceSameEquivariance,
    NormalizedVarianceSE,
    SampleVarianceSE,
    TransformationVarianceSE,
)
from .states import ShiftedMoments, SumState
from .variance import NormalizedVariance, SampleVariance, TransformationVariance

__all__ = [
    "evaluate",
    "collect",
    "collect_references",
    "merge_states",
    "PassStates",
    "NonFiniteActivationError",
    "Measure",
    "StatSpec",
    "LayerInfo",
    "LayerValue",
    "PassContext",
    "Moments",
    "STMoments",
    "ShiftedMoments",
    "SumState",
    "TransformationVariance",
    "SampleVariance",
    "NormalizedVariance",
    "TransformationDistance",
    "SampleDistance",
    "NormalizedDistance",
    "TransformationVarianceSE",
    "SampleVarianceSE",
    "NormalizedVarianceSE",
    "DistanceSameEquivariance",
    "AnovaMeasure",
    "GoodfellowMeasure",
    "evaluate_stratified",
    "GEEDInvariance",
    "GEEDOutputKL",
    "GEEDEquivariance",
    "geed_table",
]
