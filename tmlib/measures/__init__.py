"""Measures of invariance, and :func:`evaluate`, the single pass that feeds them all."""

from ..engine import NonFiniteActivationError, evaluate
from .anova import AnovaMeasure
from .base import LayerInfo, Measure
from .distance import NormalizedDistance, SampleDistance, TransformationDistance
from .geed import GEEDEquivariance, GEEDInvariance, GEEDOutputKL, geed_table
from .goodfellow import GoodfellowMeasure
from .moments import STMoments
from .same_equivariance import (
    DistanceSameEquivariance,
    NormalizedVarianceSE,
    SampleVarianceSE,
    TransformationVarianceSE,
)
from .stratified import evaluate_stratified
from .variance import NormalizedVariance, SampleVariance, TransformationVariance

__all__ = [
    "evaluate",
    "NonFiniteActivationError",
    "Measure",
    "LayerInfo",
    "STMoments",
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
