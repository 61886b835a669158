"""PerFeatureEmbedding: one hashed table per sparse feature (the baseline)."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["FrequencyFilter", "PerFeatureEmbedding", "PerFeatureLayout", "PerFeaturePooling"]

RARE_ID = 1  # mtrec.data.hashing.RARE_ID (kept local: serving code needs no data imports)


class FrequencyFilter(nn.Module):
    """Replaces ids outside each feature's kept set by ``RARE_ID`` (missing ids pass).

    All kept sets live in ONE sorted int64 tensor of keys ``id XOR salt[feature]`` so one
    ``searchsorted`` filters a whole batch. Within a feature the key is a bijection of the
    id (no collisions); across features a false match needs two 63-bit hash ids to differ
    by exactly the XOR of two salts.

    Shapes: values [N] int64, feature_of [N] int64 → [N] int64.
    """

    def __init__(self, num_features: int, kept_ids: list[torch.Tensor | None] | None) -> None:
        super().__init__()
        mask = (1 << 62) - 1  # salts below 2**62 keep keys of non-negative ids non-negative
        salts = [((f + 1) * 0x9E3779B97F4A7C15) & mask for f in range(num_features)]
        filtered = [False] * num_features
        keys: list[torch.Tensor] = []
        for f, ids in enumerate(kept_ids or []):
            if ids is None:
                continue
            filtered[f] = True
            keys.append(ids.to(torch.int64) ^ salts[f])
        key_tensor = torch.cat(keys).sort().values if keys else torch.zeros(0, dtype=torch.int64)
        # rebuilt from the run's feature_vocab.pt, so not part of the state dict
        self.register_buffer("keys", key_tensor, persistent=False)
        self.register_buffer("salts", torch.tensor(salts, dtype=torch.int64), persistent=False)
        self.register_buffer("filtered", torch.tensor(filtered, dtype=torch.bool), persistent=False)
        self.active = any(filtered)
        self.rare_id = RARE_ID

    def forward(self, values: torch.Tensor, feature_of: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return values
        key = values ^ self.salts[feature_of]
        if self.keys.numel() > 0:
            pos = torch.searchsorted(self.keys, key).clamp(max=self.keys.numel() - 1)
            known = self.keys[pos] == key
        else:
            known = torch.zeros_like(values, dtype=torch.bool)
        rare = self.filtered[feature_of] & ~known & (values != 0)
        return torch.where(rare, torch.full_like(values, self.rare_id), values)


class PerFeatureLayout(nn.Module):
    """The per-feature id maths shared by training and serving, torch only.

    Base of :class:`PerFeatureEmbedding` (torchrec/FBGEMM lookup) and
    :class:`PerFeaturePooling` (``embedding_bag`` over the same weights): frequency filter,
    ``id mod buckets[feature]``, and the mean divisor. Holds no table.
    """

    def share_layout(self, src: PerFeatureLayout) -> None:
        """Make this module read ``src``'s layout (same buffers and filter, not copies)."""
        self.num_features, self.dim, self.has_mean = src.num_features, src.dim, src.has_mean
        self.register_buffer("mean_pooled", src.mean_pooled, persistent=False)
        self.register_buffer("buckets", src.buckets, persistent=False)
        self.value_filter = src.value_filter

    def local_rows(
        self, values: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row of each id in its feature's table, and its feature.

        Shapes: values [N] int64 raw ids, lengths [F·B] (feature-major) → [N], [N] int64.
        """
        per_key = lengths.view(self.num_features, -1).sum(1)
        feature_of = torch.repeat_interleave(
            torch.arange(self.num_features, device=lengths.device), per_key
        )
        values = self.value_filter(values, feature_of)
        return torch.remainder(values, self.buckets[feature_of]), feature_of

    def mean_divide(self, pooled: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """B x F x d SUM-pooled → mean-pooled features divided by their bag size (≥ 1)."""
        if not self.has_mean:
            return pooled
        counts = lengths.view(self.num_features, -1).t().to(pooled.dtype)  # B x F
        divisor = torch.where(self.mean_pooled, counts.clamp(min=1.0), torch.ones_like(counts))
        return pooled / divisor.unsqueeze(-1)


class PerFeatureEmbedding(PerFeatureLayout):
    """One table of ``buckets[i]`` rows per feature; raw int64 ids are hashed by ``id mod buckets``.

    The modulo runs inside the module, so a scripted model takes the raw stable
    ids of ``mtrec.data.hashing``. Backed by torchrec's ``EmbeddingBagCollection``
    (FBGEMM table-batched kernels once fused or sharded).

    Args:
        feature_names: sparse features, in KJT key order.
        buckets: rows of each feature's table.
        dim: embedding dim d.
        poolings: "sum" or "mean" per feature (multi-hot pooling).
        kept_ids: per feature, the sorted ids seen at least ``min_count`` times in
            training, or None for no frequency filter. Other ids of a filtered
            feature become ``RARE_ID`` before hashing, so rare values share one row.

    Example::

        emb = PerFeatureEmbedding(["a", "b"], [100, 50], dim=8, poolings=["sum", "sum"])
        kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([7, 123, 9]),
                                lengths=torch.tensor([1, 1, 1, 0], dtype=torch.int32))
        emb(kjt).shape  # torch.Size([2, 2, 8])
    """

    def __init__(
        self,
        feature_names: list[str],
        buckets: list[int],
        dim: int,
        poolings: list[str],
        kept_ids: list[torch.Tensor | None] | None = None,
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
                # always SUM: torchrec's fused collection groups tables by pooling type
                # and would emit mean-pooled fields out of order; means are taken below
                pooling=PoolingType.SUM,
            )
            for name, rows in zip(feature_names, buckets)
        ]
        self.ebc = EmbeddingBagCollection(tables=tables)
        self.register_buffer(
            "mean_pooled", torch.tensor([p == "mean" for p in poolings]), persistent=False
        )
        self.has_mean = any(p == "mean" for p in poolings)
        self.register_buffer("buckets", torch.tensor(buckets, dtype=torch.int64), persistent=False)
        self.value_filter = FrequencyFilter(len(feature_names), kept_ids)

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """KJT of raw ids (keys = ``feature_names``) → B x F x d."""
        lengths = sparse.lengths()
        rows, _ = self.local_rows(sparse.values(), lengths)
        hashed = KeyedJaggedTensor(
            keys=self.feature_names, values=rows, lengths=lengths, stride=sparse.stride()
        )
        pooled = self.ebc(hashed).values().view(-1, self.num_features, self.dim)
        return self.mean_divide(pooled, lengths)

    def torch_pooling(self) -> PerFeaturePooling:
        """This embedding as a torch-only module over plain tensors (for serving)."""
        return PerFeaturePooling(self)


class PerFeaturePooling(PerFeatureLayout):
    """Torch-only twin of a :class:`PerFeatureEmbedding`: no torchrec, no FBGEMM.

    Reads the embedding's own layout (:class:`PerFeatureLayout`); the per-feature tables
    are stacked into one weight (feature ``i`` owns rows ``base[i] ..``), so a batch is one
    ``embedding_bag`` call over its F·B feature-major bags.

    Shapes: values [N] int64 raw ids, lengths [F·B] int64 (feature-major) → B x F x d.

    Example::

        emb = PerFeatureEmbedding(["a", "b"], [100, 50], dim=8, poolings=["sum", "mean"])
        pool = emb.torch_pooling()
        pool(torch.tensor([7, 123, 9]), torch.tensor([1, 1, 1, 0]), 2).shape  # [2, 2, 8]
    """

    def __init__(self, emb: PerFeatureEmbedding) -> None:
        super().__init__()
        self.share_layout(emb)
        state = emb.ebc.state_dict()  # same keys for the plain and the fused collection
        tables = [state[f"embedding_bags.t_{name}.weight"].detach() for name in emb.feature_names]
        self.weight = nn.Parameter(torch.cat(tables), requires_grad=False)
        self.register_buffer("base", torch.cumsum(emb.buckets, 0) - emb.buckets, persistent=False)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, batch: int) -> torch.Tensor:
        rows, feature_of = self.local_rows(values, lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        pooled = nn.functional.embedding_bag(
            rows + self.base[feature_of], self.weight, offsets, mode="sum"
        )
        out = pooled.view(self.num_features, batch, self.dim).transpose(0, 1)
        return self.mean_divide(out, lengths)
