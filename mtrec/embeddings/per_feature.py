"""PerFeatureEmbedding: one hashed table per sparse feature (the baseline)."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["PerFeatureEmbedding"]


class PerFeatureEmbedding(nn.Module):
    """One table of ``buckets[i]`` rows per feature; raw int64 ids are hashed by ``id mod buckets``.

    The modulo runs inside the module, so a scripted model takes the raw stable
    ids of ``mtrec.data.hashing``. Backed by torchrec's ``EmbeddingBagCollection``
    (FBGEMM table-batched kernels once fused or sharded).

    Args:
        feature_names: sparse features, in KJT key order.
        buckets: rows of each feature's table.
        dim: embedding dim d.
        poolings: "sum" or "mean" per feature (multi-hot pooling).

    Example::

        emb = PerFeatureEmbedding(["a", "b"], [100, 50], dim=8, poolings=["sum", "sum"])
        kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([7, 123, 9]),
                                lengths=torch.tensor([1, 1, 1, 0], dtype=torch.int32))
        emb(kjt).shape  # torch.Size([2, 2, 8])
    """

    def __init__(
        self, feature_names: list[str], buckets: list[int], dim: int, poolings: list[str]
    ) -> None:
        super().__init__()
        self.feature_names = list(feature_names)
        self.num_features = len(feature_names)
        self.dim = dim
        tables = [
            EmbeddingBagConfig(
                name=f"t_{name}",
                embedding_dim=dim,
                num_embeddings=rows,
                feature_names=[name],
                pooling=PoolingType.MEAN if pool == "mean" else PoolingType.SUM,
            )
            for name, rows, pool in zip(feature_names, buckets, poolings)
        ]
        self.ebc = EmbeddingBagCollection(tables=tables)
        self.register_buffer("buckets", torch.tensor(buckets, dtype=torch.int64), persistent=False)

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """KJT of raw ids (keys = ``feature_names``) → B x F x d."""
        lengths = sparse.lengths()
        per_key = lengths.view(self.num_features, -1).sum(1)
        modulus = torch.repeat_interleave(self.buckets, per_key)
        hashed = KeyedJaggedTensor(
            keys=self.feature_names,
            values=torch.remainder(sparse.values(), modulus),
            lengths=lengths,
            stride=sparse.stride(),
        )
        pooled = self.ebc(hashed).values()
        return pooled.view(-1, self.num_features, self.dim)
