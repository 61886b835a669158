"""Sparse and numeric feature embeddings."""

from mtrec.embeddings.numeric import NumericEmbedding, NumericNormalizer
from mtrec.embeddings.per_feature import PerFeatureEmbedding
from mtrec.embeddings.piecewise import PiecewiseLinearEncoding
from mtrec.embeddings.unified import UnifiedEmbedding

__all__ = [
    "NumericEmbedding",
    "NumericNormalizer",
    "PerFeatureEmbedding",
    "PiecewiseLinearEncoding",
    "UnifiedEmbedding",
]
