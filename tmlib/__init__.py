"""tmlib: how invariant and equivariant is a neural network's internal representation?

Submodules: ``transforms`` (affine sets and exact groups), ``activations`` (observe any layer),
``measures`` (``evaluate``, ``collect`` and the measures), ``results``, ``stats`` (jackknife
intervals, paired differences, seeds), ``models``, ``data``, ``train``; :func:`keep_freed_blocks`
(glibc keeps the forwards' large blocks: faster passes, peak memory kept).
"""

from . import activations, measures, results, transforms
from .allocator import keep_freed_blocks
from .measures import NormalizedVariance, SampleVariance, TransformationVariance, evaluate
from .results import MeasureResult

__version__ = "0.1.0"

__all__ = [
    "activations",
    "measures",
    "results",
    "transforms",
    "evaluate",
    "keep_freed_blocks",
    "MeasureResult",
    "TransformationVariance",
    "SampleVariance",
    "NormalizedVariance",
    "__version__",
]
