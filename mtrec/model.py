"""Assembles embedding → (interaction) → multi-task block → task towers from a config.

``MULTITASK_REGISTRY`` maps the ``model.multitask.type`` name to a builder, so
new blocks plug in without touching the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.config import ExperimentConfig, MultiTaskConfig
from mtrec.data.spec import FeatureSpec
from mtrec.embeddings.numeric import NumericEmbedding, NumericNormalizer
from mtrec.embeddings.per_feature import PerFeatureEmbedding
from mtrec.embeddings.unified import UnifiedEmbedding
from mtrec.interaction import AutoInt, build_interaction
from mtrec.multitask.mmoe import MMoE, SharedBottom
from mtrec.multitask.towers import TaskTowers

__all__ = ["MULTITASK_REGISTRY", "MultiTaskModel", "build_model"]

BlockBuilder = Callable[[int, int, MultiTaskConfig], nn.Module]

MULTITASK_REGISTRY: dict[str, BlockBuilder] = {
    "mmoe": lambda d, t, c: MMoE(d, t, c.num_experts, c.expert_hidden, c.activation, c.dropout),
    "shared_bottom": lambda d, t, c: SharedBottom(d, t, c.expert_hidden, c.activation, c.dropout),
}


class MultiTaskModel(nn.Module):
    """Field embeddings → (interaction) → flat v → multi-task block → towers → logits.

    Args:
        sparse_embedding: KJT of raw ids → B x F_s x d (or None without sparse features).
        normalizer: raw numeric values → normalised values.
        numeric_embedding: B x F_n → B x F_n x d (or None without numeric features).
        block: v → T task representations; v is B x F·d, or the interaction's flat output.
        towers: T representations → B x T logits.
        interaction: B x F x d tokens → flat v (``forward_flat``), or None (v = flat tokens).

    ``forward(sparse, dense)`` returns B x T logits; ``predict`` returns probabilities.
    """

    def __init__(
        self,
        sparse_embedding: PerFeatureEmbedding | UnifiedEmbedding | None,
        normalizer: NumericNormalizer | None,
        numeric_embedding: NumericEmbedding | None,
        block: nn.Module,
        towers: TaskTowers,
        task_names: list[str],
        interaction: AutoInt | None = None,
    ) -> None:
        super().__init__()
        self.sparse_embedding = sparse_embedding
        self.normalizer = normalizer
        self.numeric_embedding = numeric_embedding
        self.interaction = interaction
        self.block = block
        self.towers = towers
        self.task_names = list(task_names)
        # epoch of the checkpoint the weights came from (-1: not loaded from a run)
        self.trained_epoch = -1

    def field_tokens(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """B x F x d tokens: sparse fields, then numeric fields."""
        tokens: list[torch.Tensor] = []
        if self.sparse_embedding is not None:
            tokens.append(self.sparse_embedding(sparse))
        if self.numeric_embedding is not None and self.normalizer is not None:
            tokens.append(self.numeric_embedding(self.normalizer(dense)))
        return torch.cat(tokens, dim=1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        tokens = self.field_tokens(sparse, dense)
        if self.interaction is not None:
            v = self.interaction.forward_flat(tokens)
        else:
            v = tokens.flatten(1)
        reprs = self.block(v)
        return self.towers(reprs)

    @torch.jit.export
    def predict(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(sparse, dense))


def build_model(cfg: ExperimentConfig, spec: FeatureSpec) -> MultiTaskModel:
    """Build the model of ``cfg``; ``spec`` must carry the fitted numeric statistics and
    (for features with ``min_count``) the fitted kept ids."""
    emb_cfg, mt_cfg = cfg.model.embedding, cfg.model.multitask
    d = emb_cfg.dim
    sparse: PerFeatureEmbedding | UnifiedEmbedding | None = None
    if spec.sparse:
        kept = [
            torch.from_numpy(spec.kept_ids[f.name]) if f.name in spec.kept_ids else None
            for f in spec.sparse
        ]
        buckets = [f.buckets or emb_cfg.buckets for f in spec.sparse]
        poolings = [f.pooling for f in spec.sparse]
        if emb_cfg.type == "unified":
            tables = emb_cfg.num_tables
            sparse = UnifiedEmbedding(
                spec.sparse_names,
                emb_cfg.rows or -(-sum(buckets) // tables) * tables,
                d,
                poolings,
                chunks=[emb_cfg.chunks.get(f.name, 1) for f in spec.sparse],
                chunk_dim=emb_cfg.chunk_dim or d,
                num_tables=tables,
                kept_ids=kept,
            )
        else:
            sparse = PerFeatureEmbedding(spec.sparse_names, buckets, d, poolings, kept_ids=kept)
    normalizer = numeric = None
    if spec.numeric:
        stats = [spec.numeric_stats[f.name] for f in spec.numeric]
        normalizer = NumericNormalizer(
            mean=[s.mean for s in stats],
            std=[s.std for s in stats],
            log1p=[s.transform.startswith("log1p") for s in stats],
            fill=spec.fill_value,
        )
        numeric = NumericEmbedding(len(spec.numeric), d)
    num_fields = len(spec.sparse) + len(spec.numeric)
    interaction = build_interaction(cfg.model.interaction, num_fields, d)
    flat = interaction.flat_features(num_fields) if interaction is not None else num_fields * d
    builder = MULTITASK_REGISTRY[mt_cfg.type]
    block = builder(flat, len(spec.tasks), mt_cfg)
    towers = TaskTowers(
        len(spec.tasks),
        block.out_features,
        mt_cfg.tower_hidden,
        mt_cfg.activation,
        mt_cfg.dropout,
    )
    return MultiTaskModel(sparse, normalizer, numeric, block, towers, spec.task_names, interaction)
