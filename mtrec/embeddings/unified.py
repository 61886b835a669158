"""UnifiedEmbedding: feature multiplexing, one hashed table shared by every sparse feature.

Coleman et al., "Unified Embedding: Battle-Tested Feature Representations for
Web-Scale ML Systems" (NeurIPS 2023, arXiv 2305.12102). One logical table
``W`` of ``M`` rows × ``d_c`` columns serves all categorical features; feature
``i`` has ``k_i`` chunks ("multi-probe"), chunk ``j`` reads row
``h(id, salt(i, j)) mod M``, and the feature's embedding is the concatenation of
its ``k_i`` chunk vectors (dim ``k_i·d_c``). The table holds ``M·d_c``
parameters whatever the number of features or their vocabularies; no
vocabulary is fitted and unseen ids still embed.

The salted hash (exact definition; :func:`salted_row` is the pure-Python reference)
--------------------------------------------------------------------------------

All arithmetic is on 64-bit words (mod 2**64); ``>>>`` is the logical right shift.

1. ``salt(i, j) = fmix64(FNV-1a-64(utf8(f"{name_i}@{j}")))`` — a function of the
   feature's *name* and the chunk index (not of the feature's position), computed
   once in ``__init__``. FNV-1a-64 is the one of ``mtrec.data.hashing`` (offset
   ``0xcbf29ce484222325``, prime ``0x100000001b3``).
2. ``x = id XOR salt(i, j)`` (``id`` is the raw int64 stable id of
   ``mtrec.data.hashing``, after the optional frequency filter).
3. ``h = fmix64(x)``, MurmurHash3's 64-bit finaliser:
   ``x ^= x >>> 33; x *= 0xff51afd7ed558ccd; x ^= x >>> 33;
   x *= 0xc4ceb9fe1a85ec53; x ^= x >>> 33``.
4. ``row = (h >>> 1) mod M`` (a non-negative 63-bit value reduced modulo M).

In torch the words are int64 tensors: multiplication wraps around two's
complement like uint64 arithmetic, and ``x >>> s`` is ``(x >> s) & (2**(64-s) - 1)``
(torch's ``>>`` on int64 is arithmetic, the mask clears the sign-extended bits).
fmix64 is a bijection, so one id in two (feature, chunk) pairs lands on different
rows except for the unavoidable ``1/M`` chance of a modulo collision.

Physical layout
---------------

A torchrec ``EmbeddingBagCollection`` with ``num_tables`` equal tables
(``EmbeddingBagConfig`` ``"unified"``, or ``"unified_0"`` … when split) of
``M / num_tables`` rows; logical row ``r`` is row ``r // num_tables`` of table
``r % num_tables`` (round-robin). Each table has ONE KJT key (named like the table)
whose "batch" is every (feature, chunk, row) bag of the batch: K·B bags for the K
(feature, chunk) keys of ``key_names``. Once
:func:`mtrec.train.optim.fuse_sparse_optimizer` swaps the collection for the fused
one, FBGEMM's table-batched kernel does every lookup of a batch in one call and the
row-wise Adagrad update inside backward. Pooling is SUM in the kernel; features with
``pooling: mean`` are divided by their bag size afterwards (an empty bag embeds as
zeros). With a split table each chunk is the sum of its per-table partial pools.

Bag order: when every feature is already d wide (one chunk count k with k·d_c = d,
e.g. the default k = 1, d_c = d) bags are batch-major (row, feature, chunk), so the
pooled [K·B, d_c] output *is* the B x F x d answer. Otherwise they are field-major
(feature, row, chunk), features sorted by k: the features with the same k are then
one contiguous [G, B, k·d_c] block, each row the concatenation of the feature's
chunks, which the group's batched projection reads without a copy.

Why one key per table and not one key per (feature, chunk): FBGEMM's CPU backward
for row-wise Adagrad takes its JIT-compiled, multi-threaded path only for a table
read by a single feature; a table shared by several KJT keys falls back to a serial
scalar loop (``is_shared_table`` in ``embedding_backward_split_cpu_template.cpp``;
measured 2x slower backward for 58 keys × 4096 rows on one 2M-row table).
Splitting (``num_tables > 1``) multiplies the bags and the pooled output by
``num_tables`` (each table sees every bag, most of them empty): on CPU it is slower;
it exists for sharding a very large M.

Choosing ``k_i`` (``model.embedding.chunks``)
---------------------------------------------

Default 1. Give more chunks to high-cardinality or important features: a
starting rule is ``k_i = min(3, 1 + floor(log10(vocabulary_i) / 2))`` (1 below
~100 distinct values, 2 up to ~10^4, 3 above), then move chunks toward features
that matter most for the tasks. More chunks lower the collision damage of a
feature (its k_i rows rarely all collide) at the cost of k_i lookups.

Per-field projection
--------------------

The model consumes tokens of a common dim ``d``. A feature with
``k_i·d_c == d`` is passed through unchanged; any other gets its own linear map
``k_i·d_c → d`` (weight and bias, initialised like ``nn.Linear``). Features with
the same ``k_i`` are projected together in one batched matmul.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.embeddings.per_feature import FrequencyFilter
from mtrec.embeddings.prior import bag_mean, inverse_uses
from mtrec.nn.layers import GroupedLinear

__all__ = [
    "UnifiedEmbedding",
    "UnifiedLayout",
    "UnifiedPooling",
    "chunk_salt",
    "salted_hash",
    "salted_row",
]

_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_FMIX_C1 = 0xFF51AFD7ED558CCD
_FMIX_C2 = 0xC4CEB9FE1A85EC53


def _signed(x: int) -> int:
    """A 64-bit word as a signed int64 value."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _fmix64(x: int) -> int:
    x &= _MASK64
    x ^= x >> 33
    x = (x * _FMIX_C1) & _MASK64
    x ^= x >> 33
    x = (x * _FMIX_C2) & _MASK64
    x ^= x >> 33
    return x


def chunk_salt(name: str, chunk: int) -> int:
    """``salt(i, j)`` of feature ``name``, chunk ``chunk``, as a signed int64 value."""
    h = _FNV_OFFSET
    for byte in f"{name}@{chunk}".encode():
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return _signed(_fmix64(h))


def salted_row(value: int, name: str, chunk: int, rows: int) -> int:
    """Pure-Python reference of the logical row of ``value`` (any int64) in ``name``@``chunk``."""
    h = _fmix64((value & _MASK64) ^ (chunk_salt(name, chunk) & _MASK64))
    return (h >> 1) % rows


def salted_hash(values: torch.Tensor, salts: torch.Tensor, rows: int) -> torch.Tensor:
    """Logical rows ``(fmix64(values XOR salts) >>> 1) mod rows`` of int64 tensors (same shape).

    Vectorised int64 torch ops, TorchScript-compatible; see the module docstring.
    """
    low31 = 2147483647  # (1 << 31) - 1: clears the bits an arithmetic >> 33 sign-extends
    x = torch.bitwise_xor(values, salts)  # a fresh tensor: the rest works in place
    x.bitwise_xor_(torch.bitwise_right_shift(x, 33).bitwise_and_(low31))
    x.mul_(-49064778989728563)  # 0xff51afd7ed558ccd as an int64 (products wrap like uint64)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 33).bitwise_and_(low31))
    x.mul_(-4265267296055464877)  # 0xc4ceb9fe1a85ec53 as an int64
    x.bitwise_xor_(torch.bitwise_right_shift(x, 33).bitwise_and_(low31))
    x.bitwise_right_shift_(1).bitwise_and_(9223372036854775807)  # logical >>> 1
    return torch.remainder(x, rows)


class _PassThrough(nn.Module):
    """G fields already d wide: their [G·B·k, d_c] bags (field, row, chunk) → G x B x d."""

    def __init__(self, fields: int, dim: int) -> None:
        super().__init__()
        self.fields, self.dim = fields, dim

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        return x.view(self.fields, batch, self.dim)


class _Projection(nn.Module):
    """G fields of width w = k·d_c, each mapped w → d by its own linear layer (one batched
    matmul): their [G·B·k, d_c] bags (field, row, chunk) → G x B x d."""

    def __init__(self, fields: int, width: int, dim: int) -> None:
        super().__init__()
        self.fields, self.width = fields, width
        self.linear = GroupedLinear(fields, width, dim)

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        return self.linear(x.view(self.fields, batch, self.width))


class UnifiedLayout(nn.Module):
    """The Unified Embedding maths shared by training and serving, torch only.

    Base of :class:`UnifiedEmbedding` (torchrec/FBGEMM lookup) and :class:`UnifiedPooling`
    (``embedding_bag`` over the same weights): ids → logical rows in bag order (frequency
    filter, salting), the mean divisor, and pooled bags → B x F x d tokens (per-group
    pass-through / projection, field reorder). Holds no table; the subclasses pool.
    """

    # (attributes, buffers, submodules) a torch-only twin shares with its embedding
    _SHARED_ATTRS = (
        "num_features",
        "dim",
        "chunk_dim",
        "rows",
        "num_keys",
        "has_mean",
        "batch_major",
        "reorder",
        "group_fields",
        "group_chunks",
    )
    _SHARED_BUFFERS = ("key_feature", "key_salt", "mean_feature", "inverse_order")
    _SHARED_MODULES = ("groups", "value_filter")

    def share_layout(self, src: UnifiedLayout) -> None:
        """Make this module read ``src``'s layout: same buffers and the same group /
        filter modules (shared, not copied, so both always agree)."""
        for name in self._SHARED_ATTRS:
            value = getattr(src, name)
            setattr(self, name, list(value) if isinstance(value, list) else value)
        for name in self._SHARED_BUFFERS:
            self.register_buffer(name, getattr(src, name), persistent=False)
        for name in self._SHARED_MODULES:
            setattr(self, name, getattr(src, name))

    def bag_order(self, x: torch.Tensor) -> torch.Tensor:
        """[K, B] per (key, row) values → flat, in bag order (see the module docstring)."""
        if self.batch_major:
            return x.t().reshape(-1)
        parts: list[torch.Tensor] = []
        start = 0
        for g, k in zip(self.group_fields, self.group_chunks):
            block = x[start : start + g * k].view(g, k, -1)
            parts.append(block.transpose(1, 2).reshape(-1))
            start += g * k
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def bag_rows(
        self, values: torch.Tensor, lengths: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logical rows (of the M-row table) and bag lengths: K·B bags in bag order.

        Shapes: values [N] int64 raw ids, lengths [F·B] (feature-major) →
        rows [K'·N'] int64 (each feature's ids once per chunk), bag lengths [K·B].
        """
        values = self.value_filter.filter_bags(values, lengths)[0]
        return self.filtered_bag_rows(values, lengths, batch)

    def filtered_bag_rows(
        self, values: torch.Tensor, lengths: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`bag_rows` of ids already through ``value_filter`` (and id dropout)."""
        device = lengths.device
        by_feature = lengths.view(self.num_features, batch)
        # each bag reads one feature's ids of one row: one gather from the feature-major
        # values into the bags, each feature's ids once per chunk
        src_start = (torch.cumsum(lengths, 0) - lengths).view(self.num_features, batch)
        src_start = self.bag_order(src_start[self.key_feature])
        bag_lengths = self.bag_order(by_feature[self.key_feature])
        salts = self.bag_order(self.key_salt[:, None].expand(self.num_keys, batch))
        bag_start = torch.cumsum(bag_lengths, 0) - bag_lengths
        bag_of = torch.repeat_interleave(
            torch.arange(bag_lengths.numel(), device=device), bag_lengths
        )
        # index_select: 1-D gathers ~2x faster than indexing with a tensor on CPU
        shift = (src_start - bag_start).index_select(0, bag_of)
        src = torch.arange(bag_of.numel(), device=device) + shift
        return (
            salted_hash(values.index_select(0, src), salts.index_select(0, bag_of), self.rows),
            bag_lengths,
        )

    def mean_divide(self, pooled: torch.Tensor, lengths: torch.Tensor, batch: int) -> torch.Tensor:
        """[K·B, d_c] SUM-pooled bags → mean-pooled features divided by their bag size
        (≥ 1: an empty bag stays zeros)."""
        if not self.has_mean:
            return pooled
        counts = lengths.view(self.num_features, batch).to(pooled.dtype)
        divisor = torch.where(
            self.mean_feature[:, None], counts.clamp(min=1.0), torch.ones_like(counts)
        )
        return pooled / self.bag_order(divisor[self.key_feature])[:, None]

    def tokens(self, pooled: torch.Tensor, batch: int) -> torch.Tensor:
        """[K·B, d_c] pooled chunk vectors in bag order → B x F x d tokens."""
        if self.batch_major:  # (row, feature, chunk) bags, every feature already d wide
            return pooled.view(batch, self.num_features, self.dim)
        sizes = [g * k * batch for g, k in zip(self.group_fields, self.group_chunks)]
        # (a one-piece split would still cost a full copy in backward)
        parts = [pooled] if len(sizes) == 1 else pooled.split(sizes, 0)
        tokens: list[torch.Tensor] = []
        for i, group in enumerate(self.groups):
            tokens.append(group(parts[i], batch))  # G x B x d
        # field-major F x B x d: the reorder gathers whole contiguous slabs
        out = tokens[0] if len(tokens) == 1 else torch.cat(tokens, 0)
        if self.reorder:
            out = out.index_select(0, self.inverse_order)
        return out.transpose(0, 1)


class UnifiedEmbedding(UnifiedLayout):
    """All sparse features multiplexed into one table of ``rows`` × ``chunk_dim``.

    Same interface as :class:`~mtrec.embeddings.per_feature.PerFeatureEmbedding`:
    ``forward(sparse)`` takes a KJT of raw int64 stable ids (keys = ``feature_names``)
    and returns B x F x ``dim`` tokens. The salted hash and the table lookups run inside
    the module (see the module docstring for the exact hash), so a scripted model takes
    the raw ids.

    Args:
        feature_names: sparse features, in KJT key order.
        rows: M, rows of the logical table (a multiple of ``num_tables``).
        dim: token dim d of the model.
        poolings: "sum" or "mean" per feature (multi-hot pooling, per chunk).
        chunks: k_i per feature (default 1 each).
        chunk_dim: d_c (default ``dim``).
        num_tables: physical tables the logical one is split into, round-robin.
        kept_ids: per feature, the sorted ids seen at least ``min_count`` times in
            training, or None for no frequency filter. Other ids of a filtered
            feature become ``RARE_ID`` before salting (as in ``PerFeatureEmbedding``).
        seen_ids, unknown_ids, id_dropout: unseen-id handling and id dropout per feature
            (see :class:`~mtrec.embeddings.per_feature.FrequencyFilter`).

    Example::

        emb = UnifiedEmbedding(["a", "b"], rows=1000, dim=8, poolings=["sum", "mean"],
                               chunks=[1, 2], chunk_dim=4)
        kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([7, 123, 9]),
                                lengths=torch.tensor([1, 1, 1, 0], dtype=torch.int32))
        emb(kjt).shape  # torch.Size([2, 2, 8]); "a" (4 wide) is projected to 8, "b" is not
    """

    def __init__(
        self,
        feature_names: list[str],
        rows: int,
        dim: int,
        poolings: list[str],
        chunks: list[int] | None = None,
        chunk_dim: int | None = None,
        num_tables: int = 1,
        kept_ids: list[torch.Tensor | None] | None = None,
        seen_ids: list[torch.Tensor | None] | None = None,
        unknown_ids: list[int] | None = None,
        id_dropout: list[float] | None = None,
        id_uses: list[torch.Tensor | None] | None = None,
    ) -> None:
        super().__init__()
        num = len(feature_names)
        chunks = [1] * num if chunks is None else list(chunks)
        chunk_dim = dim if chunk_dim is None else chunk_dim
        if len(chunks) != num or len(poolings) != num:
            raise ValueError(
                f"got {num} features, {len(chunks)} chunk counts, {len(poolings)} poolings"
            )
        if rows <= 0 or chunk_dim <= 0 or dim <= 0 or num_tables <= 0:
            raise ValueError("rows, dim, chunk_dim and num_tables must be > 0")
        if rows % num_tables:
            raise ValueError(f"rows ({rows}) must be a multiple of num_tables ({num_tables})")
        if any(k <= 0 for k in chunks):
            raise ValueError(f"every chunk count must be > 0, got {chunks}")
        self.feature_names = list(feature_names)
        self.num_features = num
        self.dim = dim
        self.chunk_dim = chunk_dim
        self.rows = rows
        self.num_tables = num_tables
        self.chunks = chunks
        # k_i·d_c per feature (before projection), in feature_names order
        self.feature_widths = [k * chunk_dim for k in chunks]
        # (feature, chunk) keys ordered by (k_i, feature position, chunk): features with the
        # same k are adjacent blocks of the pooled output, projected by one batched matmul
        order = sorted(range(num), key=lambda f: (chunks[f], f))
        key_feature = [f for f in order for _ in range(chunks[f])]
        key_chunk = [j for f in order for j in range(chunks[f])]
        self.key_names = [f"{self.feature_names[f]}@{j}" for f, j in zip(key_feature, key_chunk)]
        self.num_keys = len(self.key_names)
        if num_tables == 1:
            self.kjt_keys = ["unified"]
        else:
            self.kjt_keys = [f"unified_{t}" for t in range(num_tables)]
        tables = [self._table(name, rows // num_tables) for name in self.kjt_keys]
        self.ebc = EmbeddingBagCollection(tables=tables)
        salts = [chunk_salt(self.feature_names[f], j) for f, j in zip(key_feature, key_chunk)]
        self.register_buffer("key_feature", torch.tensor(key_feature, dtype=torch.int64), False)
        self.register_buffer("key_salt", torch.tensor(salts, dtype=torch.int64), False)
        mean = [p == "mean" for p in poolings]
        self.has_mean = any(mean)
        self.register_buffer("mean_feature", torch.tensor(mean, dtype=torch.bool), False)
        # token of sorted field s is field order[s]: inverse permutation back to input order
        inverse = [0] * num
        for s, f in enumerate(order):
            inverse[f] = s
        self.reorder = inverse != list(range(num))
        self.register_buffer("inverse_order", torch.tensor(inverse, dtype=torch.int64), False)
        groups: list[nn.Module] = []
        self.group_fields: list[int] = []  # G of each group (features with the same k)
        self.group_chunks: list[int] = []  # k of each group
        for k in sorted(set(chunks)):
            fields = sum(1 for c in chunks if c == k)
            self.group_fields.append(fields)
            self.group_chunks.append(k)
            if k * chunk_dim == dim:
                groups.append(_PassThrough(fields, dim))
            else:
                groups.append(_Projection(fields, k * chunk_dim, dim))
        # every field already d wide: batch-major bags make the pooled output the answer
        self.batch_major = len(groups) == 1 and chunks[0] * chunk_dim == dim
        self.groups = nn.ModuleList(groups)
        self.value_filter = FrequencyFilter(num, kept_ids, seen_ids, unknown_ids, id_dropout)
        self.register_buffer(
            "inverse_uses", self._inverse_uses(id_uses, kept_ids), persistent=False
        )
        self.prior_terms: tuple[torch.Tensor, torch.Tensor] | None = None

    def _inverse_uses(
        self, id_uses: list[torch.Tensor | None] | None, kept_ids: list[torch.Tensor | None] | None
    ) -> torch.Tensor | None:
        """The prior's 1 / uses per logical row (None without counts); see
        :mod:`mtrec.embeddings.prior`."""
        if id_uses is None or all(u is None for u in id_uses):
            return None
        salts = [self.key_salt[self.key_feature == f] for f in range(self.num_features)]
        return inverse_uses(
            self.rows,
            lambda f, ids: salted_hash(
                ids.unsqueeze(0).expand(len(salts[f]), -1),
                salts[f].unsqueeze(1).expand(-1, ids.numel()),
                self.rows,
            ),
            kept_ids,
            id_uses,
            self.value_filter,
        )

    def _table(self, name: str, rows: int) -> EmbeddingBagConfig:
        # initialised like a single torchrec table of M rows, however it is split
        bound = math.sqrt(1.0 / self.rows)
        return EmbeddingBagConfig(
            name=name,
            embedding_dim=self.chunk_dim,
            num_embeddings=rows,
            feature_names=[name],
            pooling=PoolingType.SUM,
            weight_init_min=-bound,
            weight_init_max=bound,
        )

    def num_table_parameters(self) -> int:
        """Parameters of the shared table(s): ``rows · chunk_dim``."""
        return sum(c.num_embeddings * c.embedding_dim for c in self.ebc.embedding_bag_configs())

    def lookup(self, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical rows and bag lengths the table collection reads: ``num_tables · K · B``
        bags, table-major, each table's in bag order."""
        lengths = sparse.lengths()
        rows, bag_lengths = self.bag_rows(sparse.values(), lengths, sparse.stride())
        return self.split_tables(rows, bag_lengths)

    def split_tables(
        self, rows: torch.Tensor, bag_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logical rows and bag lengths (:meth:`bag_rows`) → the physical rows and bag
        lengths of :meth:`lookup`."""
        if self.num_tables == 1:
            return rows, bag_lengths
        # round-robin split: table t gets, per bag, the ids whose row % n == t, in order
        bags = bag_lengths.numel()
        bag_of = torch.repeat_interleave(torch.arange(bags, device=rows.device), bag_lengths)
        table = torch.remainder(rows, self.num_tables)
        local = torch.div(rows, self.num_tables, rounding_mode="floor")
        split_lengths = torch.bincount(table * bags + bag_of, minlength=self.num_tables * bags)
        order = torch.cat([torch.nonzero(table == t).squeeze(1) for t in range(self.num_tables)])
        return local[order], split_lengths.to(bag_lengths.dtype)

    def lookup_kjt(self, sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The KJT the table collection reads: keys ``kjt_keys`` (one per table), stride
        K·B (one bag per (feature, chunk) key and batch row), values physical rows."""
        rows, lengths = self.lookup(sparse)
        return KeyedJaggedTensor(
            keys=self.kjt_keys,
            values=rows,
            lengths=lengths,
            stride=sparse.stride() * self.num_keys,
        )

    @torch.jit.unused
    def _fused_pool(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """Eager fast path once ``fuse_sparse_optimizer`` swapped in the fused collection:
        call its one FBGEMM table-batched module directly (the collection's own forward
        splits the KJT per key and concatenates it again). None when not applicable."""
        if not isinstance(self.ebc, FusedEmbeddingBagCollection):
            return None
        lookups = getattr(self.ebc, "_emb_modules", None)
        if lookups is None or len(lookups) != 1:
            return None
        configs = self.ebc.embedding_bag_configs()
        if [k for c in configs for k in c.feature_names] != self.kjt_keys:
            return None
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.int())
        return lookups[0](rows.int(), offsets, None)

    def chunk_vectors(
        self, sparse: KeyedJaggedTensor, filtered: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[K·B, d_c] pooled chunk vectors, one per bag in bag order (mean-pooled
        features already divided by their bag size). ``filtered``: the KJT's ids already
        through ``value_filter.filter_bags``."""
        batch = sparse.stride()
        if filtered is None:
            logical, bag_lengths = self.bag_rows(sparse.values(), sparse.lengths(), batch)
        else:
            logical, bag_lengths = self.filtered_bag_rows(filtered, sparse.lengths(), batch)
        rows, lengths = self.split_tables(logical, bag_lengths)
        pooled: torch.Tensor | None = None
        if not torch.jit.is_scripting():
            pooled = self._fused_pool(rows, lengths)
        if pooled is None:
            kjt = KeyedJaggedTensor(
                keys=self.kjt_keys, values=rows, lengths=lengths, stride=batch * self.num_keys
            )
            # one key per table, read whole: a sharded collection's table order (by rank)
            # does not matter, as the tables' partial pools are summed below
            pooled = self.ebc(kjt).values()
        if self.num_tables > 1:  # [K·B, n·d_c]: sum the per-table partial pools
            pooled = pooled.view(-1, self.num_tables, self.chunk_dim).sum(1)
        pooled = self.mean_divide(pooled, sparse.lengths(), batch)
        inverse = self.inverse_uses
        if (
            self.training and inverse is not None and torch.is_grad_enabled()
        ):  # one prior term per bag
            per_id = inverse.index_select(0, logical)
            self.prior_terms = (pooled, bag_mean(per_id, bag_lengths) / batch)
        return pooled

    def pooled_chunks(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """B x Σ k_i·d_c: each feature's concatenated chunk vectors (before the per-field
        projection), features in ``key_names`` order (sorted by chunk count)."""
        batch = sparse.stride()
        pooled = self.chunk_vectors(sparse)
        if self.batch_major:
            return pooled.view(batch, self.num_keys * self.chunk_dim)
        sizes = [g * k * batch for g, k in zip(self.group_fields, self.group_chunks)]
        parts = pooled.split(sizes, 0)
        blocks: list[torch.Tensor] = []
        for i in range(len(parts)):
            width = self.group_chunks[i] * self.chunk_dim
            block = parts[i].view(self.group_fields[i], batch, width).transpose(0, 1)
            blocks.append(block.reshape(batch, -1))
        return torch.cat(blocks, 1)

    def forward(
        self,
        sparse: KeyedJaggedTensor,
        filtered: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """KJT of raw ids → B x F x d; ``filtered`` as for
        :meth:`PerFeatureEmbedding.forward` (only its ids are read here)."""
        ids = filtered[0] if filtered is not None else None
        return self.tokens(self.chunk_vectors(sparse, ids), sparse.stride())

    def logical_weight(self) -> torch.Tensor:
        """[M, d_c] logical table: the physical round-robin tables interleaved back
        (logical row ``r`` = row ``r // n`` of table ``r % n``)."""
        state = self.ebc.state_dict()  # same keys for the plain and the fused collection
        tables = [state[f"embedding_bags.{name}.weight"].detach() for name in self.kjt_keys]
        # [M/n, n, d_c] → [M, d_c]
        return torch.stack(tables, dim=1).reshape(self.rows, self.chunk_dim).contiguous()

    def torch_pooling(self) -> UnifiedPooling:
        """This embedding as a torch-only module over plain tensors (for serving): the same
        layout maths, ``embedding_bag`` over a copy of the logical table."""
        return UnifiedPooling(self)


# TorchScript reads class annotations unevaluated (a string under ``from __future__ import
# annotations``): declare the attribute's type itself
UnifiedEmbedding.__annotations__["prior_terms"] = Optional[tuple[torch.Tensor, torch.Tensor]]  # noqa: UP045


class UnifiedPooling(UnifiedLayout):
    """Torch-only twin of a :class:`UnifiedEmbedding`: no torchrec, no FBGEMM.

    Reads the embedding's own layout (:class:`UnifiedLayout`: ids → logical rows in bag
    order, mean divisor, group projections, field order; shared modules, not copies) and
    pools the logical table with ``torch.nn.functional.embedding_bag``, so a scripted
    module of it loads with torch alone.

    Shapes: values [N] int64 raw ids, lengths [F·B] int64 (feature-major) → B x F x d.

    Example::

        emb = UnifiedEmbedding(["a", "b"], rows=1000, dim=8, poolings=["sum", "mean"],
                               chunks=[1, 2], chunk_dim=4)
        pool = emb.torch_pooling()
        pool(torch.tensor([7, 123, 9]), torch.tensor([1, 1, 1, 0]), 2).shape  # [2, 2, 8]
    """

    def __init__(self, emb: UnifiedEmbedding) -> None:
        super().__init__()
        self.share_layout(emb)
        self.weight = nn.Parameter(emb.logical_weight(), requires_grad=False)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, batch: int) -> torch.Tensor:
        rows, bag_lengths = self.bag_rows(values, lengths, batch)
        return self._pool(rows, bag_lengths, lengths, batch)

    @torch.jit.export
    def forward_filtered(
        self, values: torch.Tensor, feature_of: torch.Tensor, lengths: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """:meth:`forward` of ids already through ``value_filter`` (``feature_of``: each
        id's feature, unused here): serving filters once for this and the linear term."""
        rows, bag_lengths = self.filtered_bag_rows(values, lengths, batch)
        return self._pool(rows, bag_lengths, lengths, batch)

    def _pool(
        self, rows: torch.Tensor, bag_lengths: torch.Tensor, lengths: torch.Tensor, batch: int
    ) -> torch.Tensor:
        offsets = torch.cumsum(bag_lengths, 0) - bag_lengths
        pooled = nn.functional.embedding_bag(rows, self.weight, offsets, mode="sum")
        return self.tokens(self.mean_divide(pooled, lengths, batch), batch)
