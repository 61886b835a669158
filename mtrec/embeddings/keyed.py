"""Pooled embeddings of a torchrec collection, read in the order the caller asked for.

An ``EmbeddingBagCollection`` returns a ``KeyedTensor``: B x Σ_k d_k values with the
features' columns side by side. A plain (or fused) collection lays them out in its
configs' order, but a sharded one (``DistributedModelParallel``) lays them out in the
order of its shards, rank by rank: with tables on two ranks, features ``f0 f1 f2 f3``
placed on ranks ``0 1 0 1`` come back as ``f0 f2 f1 f3``. Code that reads the values as
B x F x d by position must reorder them by key first, or a model trained on several
workers sees its fields permuted (and evaluates differently once unsharded).
"""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

__all__ = ["values_in_order"]


def values_in_order(pooled: KeyedTensor, keys: list[str]) -> torch.Tensor:
    """B x Σ d_k pooled values with the columns of ``keys`` in that order (the values
    themselves when the collection already returns that order: every local collection)."""
    if pooled.keys() == keys:
        return pooled.values()
    return KeyedTensor.regroup([pooled], [keys])[0]
