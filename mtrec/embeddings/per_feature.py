"""PerFeatureEmbedding: one hashed table per sparse feature (the baseline)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.embeddings.keyed import values_in_order
from mtrec.embeddings.prior import bag_mean, inverse_uses

__all__ = [
    "UNSEEN_ID",
    "FrequencyFilter",
    "PerFeatureEmbedding",
    "PerFeatureLayout",
    "PerFeaturePooling",
]

RARE_ID = 1  # mtrec.data.hashing.RARE_ID (kept local: serving code needs no data imports)
UNSEEN_ID = -1  # mtrec.data.hashing.UNSEEN_ID: never produced by the hash (ids are >= 0)


def _keys(ids: list[torch.Tensor | None], salts: list[int]) -> torch.Tensor:
    """One sorted int64 tensor of ``id XOR salt[feature]`` over every given id set."""
    keys = [t.to(torch.int64) ^ salts[f] for f, t in enumerate(ids) if t is not None]
    return torch.cat(keys).sort().values if keys else torch.zeros(0, dtype=torch.int64)


# a bucket table (see _bucket_table) for key sets up to this size: ~80 bytes a key
_TABLE_MAX_KEYS = 1 << 17
_TABLE_MAX_WIDTH = 16


def _bucket_table(keys: torch.Tensor) -> torch.Tensor:
    """Keys laid out for a membership test by one gather: row ``b`` of an M x W table
    (M a power of two ≥ 2·len(keys)) holds the keys whose low bits are ``b``, padded with
    ``b ^ 1``, a value that no key of row b can equal. ``key`` is a member iff
    ``(table[key & (M - 1)] == key).any()``: exact for any int64, and at batch 512 (6k
    ids) ~3x faster than ``searchsorted``'s binary search. Empty [0, 0] (use the binary
    search) for a large or badly spread set."""
    n = keys.numel()
    empty = torch.zeros(0, 0, dtype=torch.int64)
    if n == 0 or n > _TABLE_MAX_KEYS:
        return empty
    rows = 2
    while rows < 2 * n:
        rows *= 2
    bucket = keys & (rows - 1)
    counts = torch.bincount(bucket, minlength=rows)
    width = int(counts.max())
    if width > _TABLE_MAX_WIDTH:
        return empty
    order = torch.argsort(bucket, stable=True)
    first = torch.cumsum(counts, 0) - counts
    column = torch.arange(n) - first[bucket[order]]
    table = (torch.arange(rows, dtype=torch.int64) ^ 1)[:, None].repeat(1, width)
    table[bucket[order], column] = keys[order]
    return table


class FrequencyFilter(nn.Module):
    """Maps ids outside each feature's kept set to the feature's unknown id (missing ids
    pass), and in training replaces ids by it at random (id dropout).

    The unknown id is ``RARE_ID`` (``unseen: rare``: unseen and rare ids share one row) or
    ``UNSEEN_ID`` (``unseen: own_row``); with a seen set too, ids seen in training but not
    kept (rare) still read ``RARE_ID`` and only never-seen ids read ``UNSEEN_ID``.

    All kept sets live in ONE sorted int64 tensor of keys ``id XOR salt[feature]`` so one
    ``searchsorted`` filters a whole batch (likewise the seen sets). Within a feature the
    key is a bijection of the id (no collisions); across features a false match needs two
    63-bit hash ids to differ by exactly the XOR of two salts.

    Shapes: values [N] int64, feature_of [N] int64 → [N] int64.

    Args:
        num_features: F.
        kept_ids: per feature, sorted ids kept, or None (not filtered).
        seen_ids: per feature, sorted ids seen in training at all, or None (kept = seen).
        unknown_ids: per feature, the id ids outside the kept set become (default RARE_ID).
        drop_p: per feature, the id dropout probability in training (default 0).
    """

    def __init__(
        self,
        num_features: int,
        kept_ids: list[torch.Tensor | None] | None,
        seen_ids: list[torch.Tensor | None] | None = None,
        unknown_ids: list[int] | None = None,
        drop_p: list[float] | None = None,
    ) -> None:
        super().__init__()
        mask = (1 << 62) - 1  # salts below 2**62 keep keys of non-negative ids non-negative
        salts = [((f + 1) * 0x9E3779B97F4A7C15) & mask for f in range(num_features)]
        kept = list(kept_ids or []) + [None] * (num_features - len(kept_ids or []))
        seen = list(seen_ids or []) + [None] * (num_features - len(seen_ids or []))
        filtered = [t is not None for t in kept]
        has_seen = [t is not None and k is not None for t, k in zip(seen, kept)]
        unknown = list(unknown_ids) if unknown_ids is not None else [RARE_ID] * num_features
        p = list(drop_p) if drop_p is not None else [0.0] * num_features
        if any(q > 0 and not f for q, f in zip(p, filtered)):
            raise ValueError("id dropout needs the feature's kept ids (a filtered feature)")
        # rebuilt from the run's feature_vocab.pt, so not part of the state dict
        self.register_buffer("keys", _keys(kept, salts), persistent=False)
        seen_keys = _keys([t if h else None for t, h in zip(seen, has_seen)], salts)
        self.register_buffer("seen_keys", seen_keys, persistent=False)
        self.register_buffer("key_table", _bucket_table(self.keys), persistent=False)
        self.register_buffer("seen_table", _bucket_table(seen_keys), persistent=False)
        self.register_buffer("salts", torch.tensor(salts, dtype=torch.int64), persistent=False)
        self.register_buffer("filtered", torch.tensor(filtered, dtype=torch.bool), persistent=False)
        self.register_buffer("has_seen", torch.tensor(has_seen, dtype=torch.bool), persistent=False)
        self.register_buffer("unknown", torch.tensor(unknown, dtype=torch.int64), persistent=False)
        self.register_buffer("drop_p", torch.tensor(p, dtype=torch.float32), persistent=False)
        self.num_features = num_features
        self.active = any(filtered)
        self.seen_active = any(has_seen)
        self.dropping = any(q > 0 for q in p)
        self.rare_id = RARE_ID

    def same_as(self, other: FrequencyFilter) -> bool:
        """Whether ``other`` maps every id as this filter does (in eval mode): the same
        kept and seen sets, salts and unknown ids."""
        if (self.active, self.seen_active) != (other.active, other.seen_active):
            return False
        names = ("keys", "seen_keys", "salts", "filtered", "has_seen", "unknown")
        return all(torch.equal(getattr(self, n), getattr(other, n)) for n in names)

    @staticmethod
    def _member(keys: torch.Tensor, table: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Whether each ``key`` is in the sorted ``keys`` (``table``: their bucket table)."""
        if keys.numel() == 0:
            return torch.zeros_like(key, dtype=torch.bool)
        if table.numel() > 0:
            # index_select: a row gather ~3x faster than indexing with a tensor on CPU
            rows = table.index_select(0, key & (table.shape[0] - 1))
            return (rows == key.unsqueeze(1)).any(1)
        pos = torch.searchsorted(keys, key).clamp(max=keys.numel() - 1)
        return keys[pos] == key

    def forward(self, values: torch.Tensor, feature_of: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return values
        # (index_select: 1-D gathers ~2x faster than indexing with a tensor on CPU)
        key = values ^ self.salts.index_select(0, feature_of)
        kept = self._member(self.keys, self.key_table, key)
        outside = self.filtered.index_select(0, feature_of) & ~kept & (values != 0)
        out = torch.where(outside, self.unknown.index_select(0, feature_of), values)
        if self.seen_active:  # seen in training but not kept: the rare row
            seen = self._member(self.seen_keys, self.seen_table, key)
            rare = outside & self.has_seen.index_select(0, feature_of) & seen
            out = torch.where(rare, torch.full_like(values, self.rare_id), out)
        return out

    def drop(self, values: torch.Tensor, feature_of: torch.Tensor) -> torch.Tensor:
        """Id dropout (training only; the caller checks the mode): each non-missing id
        becomes its feature's unknown id with probability ``drop_p[feature]``. Draws from
        torch's global RNG, so a seeded run repeats its masks.

        Shapes: values [N] int64 (filtered), feature_of [N] int64 → [N] int64."""
        if not self.dropping or values.numel() == 0:
            return values
        u = torch.rand(values.shape, device=values.device)
        hit = (u < self.drop_p.index_select(0, feature_of)) & (values != 0)
        return torch.where(hit, self.unknown.index_select(0, feature_of), values)

    @torch.jit.export
    def filter_bags(
        self, values: torch.Tensor, lengths: torch.Tensor, dropout: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids of a feature-major batch as every lookup reads them: filtered, and in
        training through id dropout (unless ``dropout`` is False: the caller drops them
        with :meth:`drop`). Also returns each id's feature.

        Shapes: values [N] int64 raw ids, lengths [F·B] → ids [N] int64, feature_of [N]."""
        feature_of = torch.repeat_interleave(
            torch.arange(self.num_features, device=lengths.device),
            lengths.view(self.num_features, -1).sum(1),
        )
        values = self.forward(values, feature_of)
        if self.training and dropout:  # id dropout: the unknown row learns from cold ids
            values = self.drop(values, feature_of)
        return values, feature_of


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
        values, feature_of = self.value_filter.filter_bags(values, lengths)
        return torch.remainder(values, self.buckets.index_select(0, feature_of)), feature_of

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
        seen_ids, unknown_ids, id_dropout: unseen-id handling and id dropout per feature
            (see :class:`FrequencyFilter`).
        id_uses: per feature, int64 [K + 2] training use counts of its kept ids
            (``mtrec.data.vocab.IdCounter.uses``) or None: with them every training
            forward records ``prior_terms`` for a Gaussian prior on the rows: its output
            and, per bag, the mean of 1 / the expected epoch uses of the rows it read,
            divided by B (``mtrec.embeddings.prior``, ``mtrec.train.losses.UsePrior``).

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
        seen_ids: list[torch.Tensor | None] | None = None,
        unknown_ids: list[int] | None = None,
        id_dropout: list[float] | None = None,
        id_uses: list[torch.Tensor | None] | None = None,
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
                # always SUM: means are taken below (``mean_divide``), by the code the
                # torch-only serving twin runs too
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
        self.value_filter = FrequencyFilter(
            len(feature_names), kept_ids, seen_ids, unknown_ids, id_dropout
        )
        # the prior's 1 / uses per row, features stacked at their base row (rebuilt from
        # the run's feature_vocab.pt, so not part of the state dict)
        base = torch.tensor([0, *buckets[:-1]], dtype=torch.int64).cumsum(0)
        inverse: torch.Tensor | None = None
        if id_uses is not None and any(u is not None for u in id_uses):
            inverse = inverse_uses(
                sum(buckets),
                lambda f, ids: base[f] + torch.remainder(ids, buckets[f]),
                kept_ids,
                id_uses,
                self.value_filter,
            )
        self.register_buffer("inverse_uses", inverse, persistent=False)
        self.register_buffer("row_base", base, persistent=False)
        self.prior_terms: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self,
        sparse: KeyedJaggedTensor,
        filtered: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """KJT of raw ids (keys = ``feature_names``) → B x F x d. ``filtered``: the KJT's
        ids already through ``value_filter.filter_bags`` and their features (a model
        filters once for its embedding and its linear term)."""
        lengths = sparse.lengths()
        if filtered is None:
            rows, feature_of = self.local_rows(sparse.values(), lengths)
        else:
            values, feature_of = filtered
            rows = torch.remainder(values, self.buckets.index_select(0, feature_of))
        out = self.pool_rows(rows, lengths, sparse.stride())
        inverse = self.inverse_uses
        if self.training and inverse is not None and torch.is_grad_enabled():
            per_id = inverse.index_select(0, self.row_base.index_select(0, feature_of) + rows)
            weights = bag_mean(per_id, lengths).view(self.num_features, -1).t()
            self.prior_terms = (out, weights / sparse.stride())
        return out

    def pool_rows(self, rows: torch.Tensor, lengths: torch.Tensor, batch: int) -> torch.Tensor:
        """Table rows of a feature-major batch ([N], from :meth:`local_rows`), lengths
        [F·B] → B x F x d pooled features."""
        hashed = KeyedJaggedTensor(
            keys=self.feature_names, values=rows, lengths=lengths, stride=batch
        )
        pooled = values_in_order(self.ebc(hashed), self.feature_names)
        pooled = pooled.view(-1, self.num_features, self.dim)
        return self.mean_divide(pooled, lengths)

    def torch_pooling(self) -> PerFeaturePooling:
        """This embedding as a torch-only module over plain tensors (for serving)."""
        return PerFeaturePooling(self)


# TorchScript reads class annotations unevaluated (a string under ``from __future__ import
# annotations``): declare the attribute's type itself
PerFeatureEmbedding.__annotations__["prior_terms"] = Optional[tuple[torch.Tensor, torch.Tensor]]  # noqa: UP045


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
        return self._pool(rows, feature_of, lengths, batch)

    @torch.jit.export
    def forward_filtered(
        self, values: torch.Tensor, feature_of: torch.Tensor, lengths: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """:meth:`forward` of ids already through ``value_filter``, ``feature_of`` their
        features: serving filters once for the embedding and the linear term."""
        rows = torch.remainder(values, self.buckets.index_select(0, feature_of))
        return self._pool(rows, feature_of, lengths, batch)

    def _pool(
        self, rows: torch.Tensor, feature_of: torch.Tensor, lengths: torch.Tensor, batch: int
    ) -> torch.Tensor:
        offsets = torch.cumsum(lengths, 0) - lengths
        pooled = nn.functional.embedding_bag(
            rows + self.base.index_select(0, feature_of), self.weight, offsets, mode="sum"
        )
        out = pooled.view(self.num_features, batch, self.dim).transpose(0, 1)
        return self.mean_divide(out, lengths)
