"""Measures of invariance, and :func:`evaluate`, the single pass that feeds them all."""

from ..engine import NonFiniteActivationError, evaluate
from .base import LayerInfo, Measure
from .moments import STMoments
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
]
