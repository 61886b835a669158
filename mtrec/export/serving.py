"""The TorchScript serving module: plain tensors in, per-task probabilities out.

Training reads sparse features as a torchrec ``KeyedJaggedTensor`` and pools them with
an ``EmbeddingBagCollection``. Scripting those puts torchrec's KJT code into the saved
graph, and that code calls FBGEMM operators (``fbgemm::asynchronous_complete_cumsum``,
``fbgemm::permute_2D_sparse_data``, ...), so the file would only load after
``import fbgemm_gpu``. The serving module therefore scores with a torch-only twin of the
embedding: the same tables (for Unified Embedding the physical tables interleaved back
into the logical one), the same frequency filter and hashing modules, pooled with
``torch.nn.functional.embedding_bag``. Everything after the field tokens (numeric
normalisation and embedding, interaction, multi-task block, towers, ESMM chaining) is the
trained model's own modules. :func:`mtrec.export.exporter.export_run` checks the
scripted module against the eager model before anything is written.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.embeddings.numeric import NumericEmbedding, NumericNormalizer
from mtrec.embeddings.per_feature import PerFeatureEmbedding
from mtrec.embeddings.unified import UnifiedEmbedding, salted_hash
from mtrec.model import MultiTaskModel, chain_logits

__all__ = [
    "ServingModule",
    "ServingPerFeatureEmbedding",
    "ServingUnifiedEmbedding",
    "serving_embedding",
]


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _mean_divisor(counts: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Bag sizes (≥ 1) where the feature is mean-pooled, 1 elsewhere; ``mean`` broadcasts."""
    counts = counts.to(torch.float32)
    return torch.where(mean, counts.clamp(min=1.0), torch.ones_like(counts))


class ServingPerFeatureEmbedding(nn.Module):
    """Torch-only :class:`~mtrec.embeddings.per_feature.PerFeatureEmbedding`.

    The per-feature tables are stacked into one weight (feature ``i`` owns rows
    ``base[i] .. base[i] + buckets[i] - 1``), so a batch is one ``embedding_bag`` call
    over F·B feature-major bags.

    Shapes: values [N] int64, lengths [F·B] int64 (feature-major) → B x F x d.

    Example::

        emb = PerFeatureEmbedding(["a", "b"], [100, 50], dim=8, poolings=["sum", "mean"])
        twin = ServingPerFeatureEmbedding(emb)
        twin(torch.tensor([7, 123, 9]), torch.tensor([1, 1, 1, 0]), 2).shape  # [2, 2, 8]
    """

    def __init__(self, emb: PerFeatureEmbedding) -> None:
        super().__init__()
        tables = [emb.ebc.embedding_bags[f"t_{name}"].weight for name in emb.feature_names]
        self.num_features = emb.num_features
        self.dim = emb.dim
        self.weight = nn.Parameter(torch.cat([t.detach() for t in tables]), requires_grad=False)
        buckets = emb.buckets.clone()
        self.register_buffer("buckets", buckets)
        self.register_buffer("base", _exclusive_cumsum(buckets))
        self.register_buffer("mean_pooled", emb.mean_pooled.clone())
        self.has_mean = emb.has_mean
        self.value_filter = emb.value_filter

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, batch: int) -> torch.Tensor:
        per_feature = lengths.view(self.num_features, batch).sum(1)
        feature_of = torch.repeat_interleave(torch.arange(self.num_features), per_feature)
        ids = self.value_filter(values, feature_of)
        rows = torch.remainder(ids, self.buckets[feature_of]) + self.base[feature_of]
        pooled = nn.functional.embedding_bag(
            rows, self.weight, _exclusive_cumsum(lengths), mode="sum"
        )
        out = pooled.view(self.num_features, batch, self.dim).transpose(0, 1)
        if self.has_mean:
            counts = lengths.view(self.num_features, batch).t()  # B x F
            out = out / _mean_divisor(counts, self.mean_pooled).unsqueeze(-1)
        return out


class ServingUnifiedEmbedding(nn.Module):
    """Torch-only :class:`~mtrec.embeddings.unified.UnifiedEmbedding`.

    Implements the definition in ``mtrec.embeddings.unified`` directly: bag (key, row)
    holds the row's ids of the key's feature, each read at logical row
    ``salted_hash(id, salt(feature, chunk), M)`` of the logical table (the physical
    round-robin tables interleaved back: logical row ``r`` = table ``r % n``, row
    ``r // n``). Keys are in the embedding's ``key_names`` order (features grouped by
    chunk count), so each group's chunk vectors go through the embedding's own
    per-group pass-through / projection module.

    Shapes: values [N] int64, lengths [F·B] int64 (feature-major) → B x F x d.

    Example::

        emb = UnifiedEmbedding(["a", "b"], rows=1000, dim=8, poolings=["sum", "mean"],
                               chunks=[1, 2], chunk_dim=4)
        twin = ServingUnifiedEmbedding(emb)
        twin(torch.tensor([7, 123, 9]), torch.tensor([1, 1, 1, 0]), 2).shape  # [2, 2, 8]
    """

    def __init__(self, emb: UnifiedEmbedding) -> None:
        super().__init__()
        tables = [emb.ebc.embedding_bags[name].weight.detach() for name in emb.kjt_keys]
        # [M/n, n, d_c] → [M, d_c]: logical row l·n + t is row l of table t
        logical = torch.stack(tables, dim=1).reshape(emb.rows, emb.chunk_dim)
        self.weight = nn.Parameter(logical.contiguous(), requires_grad=False)
        self.num_features = emb.num_features
        self.num_keys = emb.num_keys
        self.rows = emb.rows
        self.chunk_dim = emb.chunk_dim
        self.register_buffer("key_feature", emb.key_feature.clone())
        self.register_buffer("key_salt", emb.key_salt.clone())
        self.register_buffer("mean_feature", emb.mean_feature.clone())
        self.has_mean = emb.has_mean
        self.group_fields = list(emb.group_fields)
        self.group_chunks = list(emb.group_chunks)
        self.groups = emb.groups
        self.reorder = emb.reorder
        self.register_buffer("inverse_order", emb.inverse_order.clone())
        self.value_filter = emb.value_filter

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, batch: int) -> torch.Tensor:
        by_feature = lengths.view(self.num_features, batch)
        per_feature = by_feature.sum(1)
        feature_of = torch.repeat_interleave(torch.arange(self.num_features), per_feature)
        ids = self.value_filter(values, feature_of)
        # every key (feature f, chunk j) reads all of feature f's ids, in feature-major order
        key_len = per_feature[self.key_feature]
        key_of = torch.repeat_interleave(torch.arange(self.num_keys), key_len)
        src_start = _exclusive_cumsum(per_feature)[self.key_feature] - _exclusive_cumsum(key_len)
        src = torch.arange(key_of.numel()) + src_start[key_of]
        rows = salted_hash(ids[src], self.key_salt[key_of], self.rows)
        bag_lengths = by_feature[self.key_feature]  # K x B
        pooled = nn.functional.embedding_bag(
            rows, self.weight, _exclusive_cumsum(bag_lengths.reshape(-1)), mode="sum"
        )  # [K·B, d_c], key-major
        if self.has_mean:
            divisor = _mean_divisor(bag_lengths, self.mean_feature[self.key_feature][:, None])
            pooled = pooled / divisor.reshape(-1, 1)
        tokens: list[torch.Tensor] = []
        start = 0
        for i, group in enumerate(self.groups):
            g, k = self.group_fields[i], self.group_chunks[i]
            block = pooled[start : start + g * k * batch].view(g, k, batch, self.chunk_dim)
            # the group modules read (field, row, chunk) order
            tokens.append(group(block.transpose(1, 2).reshape(-1, self.chunk_dim), batch))
            start += g * k * batch
        out = tokens[0] if len(tokens) == 1 else torch.cat(tokens, 0)  # F x B x d, key order
        if self.reorder:
            out = out.index_select(0, self.inverse_order)
        return out.transpose(0, 1)


def serving_embedding(emb: nn.Module) -> nn.Module:
    """The torch-only twin of a trained sparse embedding module."""
    if isinstance(emb, UnifiedEmbedding):
        return ServingUnifiedEmbedding(emb)
    if isinstance(emb, PerFeatureEmbedding):
        return ServingPerFeatureEmbedding(emb)
    raise TypeError(
        f"no torch-only serving path for {type(emb).__name__}; add one to mtrec/export/serving.py"
    )


class ServingModule(nn.Module):
    """Scores raw inputs with a trained model; scriptable, torch-only, no side files.

    Inputs (B rows, F_s sparse features in signature order, F_n numeric features):
        values: int64 [sum(lengths)], stable value ids (``mtrec.data.hashing``; ≥ 0),
            feature-major: all ids of feature 0 for rows 0..B-1, then feature 1, ...
        lengths: int32/int64 [F_s · B], ids per (feature, row), feature-major.
        dense: float64 [B, F_n] (float32 accepted), RAW numeric values (NaN = missing);
            the module applies the normalisation fitted at training time. B comes from ``dense``
            (a model without numeric features takes a [B, 0] tensor).

    Returns: float32 [B, T] probabilities, tasks in signature order (chained ESMM tasks:
    the joint probability of the funnel up to that task).

    Args:
        model: the trained model, in eval mode.
        sparse_names: sparse feature names, in the model's KJT key order.
        num_numeric: F_n.

    Example::

        serving = torch.jit.script(ServingModule(model, spec.sparse_names, len(spec.numeric)))
        probs = serving(values, lengths, dense)  # B x T
    """

    def __init__(self, model: MultiTaskModel, sparse_names: list[str], num_numeric: int) -> None:
        super().__init__()
        self.sparse: nn.Module | None = (
            None if model.sparse_embedding is None else serving_embedding(model.sparse_embedding)
        )
        self.normalizer: NumericNormalizer | None = model.normalizer
        self.numeric_embedding: NumericEmbedding | None = model.numeric_embedding
        self.interaction = model.interaction
        self.block = model.block
        self.towers = model.towers
        self.register_buffer("chain", model.chain.clone())
        self.feature_names = list(sparse_names)
        self.task_names = list(model.task_names)
        self.num_sparse = len(sparse_names)
        self.num_numeric = num_numeric
        self.num_tasks = len(model.task_names)

    def _check(self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor) -> int:
        """Raise a readable error for a malformed batch; returns B."""
        if dense.dim() != 2 or dense.size(1) != self.num_numeric:
            raise RuntimeError(
                "dense must be float [B, "
                + str(self.num_numeric)
                + "] (raw numeric features in signature order), got shape "
                + str(list(dense.shape))
            )
        if dense.dtype == torch.bool or dense.is_complex():
            raise RuntimeError("dense must be a float tensor, got " + str(dense.dtype))
        batch = dense.size(0)
        if lengths.dim() != 1 or lengths.numel() != self.num_sparse * batch:
            raise RuntimeError(
                "lengths must have num_sparse_features * B = "
                + str(self.num_sparse)
                + " * "
                + str(batch)
                + " entries (feature-major), got "
                + str(lengths.numel())
                + "; B is dense.size(0)"
            )
        if lengths.dtype not in [torch.int32, torch.int64]:
            raise RuntimeError("lengths must be int32 or int64, got " + str(lengths.dtype))
        if values.dim() != 1 or values.dtype not in [torch.int32, torch.int64]:
            raise RuntimeError(
                "values must be a 1-D int64 tensor of value ids, got "
                + str(values.dtype)
                + " of shape "
                + str(list(values.shape))
            )
        if lengths.numel() > 0 and int(lengths.min()) < 0:
            raise RuntimeError("lengths must be >= 0, got " + str(int(lengths.min())))
        total = int(lengths.sum())
        if total != values.numel():
            raise RuntimeError(
                "values has " + str(values.numel()) + " ids but lengths sum to " + str(total)
            )
        if values.numel() > 0 and int(values.min()) < 0:
            raise RuntimeError(
                "values must be stable ids >= 0 (mtrec.data.hashing), got " + str(int(values.min()))
            )
        return batch

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        batch = self._check(values, lengths, dense)
        # one return: TorchScript mishandles an early return beside the no_grad block
        probs = torch.zeros(0, self.num_tasks, dtype=torch.float32)
        if batch > 0:
            with torch.no_grad():
                probs = torch.sigmoid(
                    self.logits(values.to(torch.int64), lengths.to(torch.int64), dense, batch)
                )
        return probs

    def logits(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """B x T logits of checked inputs; mirrors ``MultiTaskModel.forward_with_aux``."""
        tokens: list[torch.Tensor] = []
        if self.sparse is not None:
            tokens.append(self.sparse(values, lengths, batch))
        if self.normalizer is not None and self.numeric_embedding is not None:
            tokens.append(self.numeric_embedding(self.normalizer(dense.to(torch.float64))))
        x0 = torch.cat(tokens, dim=1)
        aux: dict[str, torch.Tensor] = {}
        if self.interaction is not None:
            layers = self.interaction.forward_layers(x0, aux)
            v = self.interaction.flatten_output(x0, layers[-1])
            block_tokens = [x0] + layers  # noqa: RUF005 (TorchScript has no list unpacking)
        else:
            v = x0.flatten(1)
            block_tokens = [x0]
        return chain_logits(self.towers(self.block(v, block_tokens, aux)), self.chain)
