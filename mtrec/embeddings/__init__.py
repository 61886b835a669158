"""Sparse and numeric feature embeddings."""

from mtrec.embeddings.numeric import NumericEmbedding, NumericNormalizer
from mtrec.embeddings.per_feature import PerFeatureEmbedding

__all__ = ["NumericEmbedding", "NumericNormalizer", "PerFeatureEmbedding"]
