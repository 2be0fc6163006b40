"""tmlib: how invariant and equivariant is a neural network's internal representation?

Submodules: ``transforms`` (affine sets and exact groups), ``activations`` (observe any layer),
``measures`` (``evaluate``, ``collect`` and the measures), ``results``, ``stats`` (jackknife
intervals, paired differences, seeds), ``models``, ``data``, ``train``.
"""

from . import activations, measures, results, transforms
from .measures import NormalizedVariance, SampleVariance, TransformationVariance, evaluate
from .results import MeasureResult

__version__ = "0.1.0"

__all__ = [
    "activations",
    "measures",
    "results",
    "transforms",
    "evaluate",
    "MeasureResult",
    "TransformationVariance",
    "SampleVariance",
    "NormalizedVariance",
    "__version__",
]
