"""Assembles embedding → (interaction) → multi-task block → task towers from a config.

The multi-task block is looked up by ``model.multitask.type`` in the block registry
(:mod:`mtrec.multitask.registry`), so new blocks plug in without touching the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.config import ExperimentConfig
from mtrec.data.spec import FeatureSpec
from mtrec.embeddings.numeric import NumericEmbedding, NumericNormalizer
from mtrec.embeddings.per_feature import PerFeatureEmbedding
from mtrec.embeddings.unified import UnifiedEmbedding
from mtrec.interaction import AutoInt, build_interaction
from mtrec.multitask.base import BlockInputs
from mtrec.multitask.registry import BlockBuilder, block_spec, build_block, registered_blocks
from mtrec.multitask.towers import TaskTowers

__all__ = ["MULTITASK_REGISTRY", "BlockInputs", "MultiTaskModel", "build_model", "chain_logits"]


class _Registry(Mapping[str, BlockBuilder]):
    """Read-only view of the block registry by name (for code that iterated the old dict)."""

    def __getitem__(self, name: str) -> BlockBuilder:
        return block_spec(name).build

    def __iter__(self) -> Iterator[str]:
        return iter(registered_blocks())

    def __len__(self) -> int:
        return len(registered_blocks())


MULTITASK_REGISTRY: Mapping[str, BlockBuilder] = _Registry()


def chain_logits(logits: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
    """ESMM chaining: B x T conditional logits → B x T where task ``chain[j]`` (j ≥ 1; chain
    is a 1-D long tensor of task indices) holds
    the logit of the joint probability ∏_{i≤j} σ(logit[chain[i]]).

    Computed in log space (log p = Σ log σ) so tiny joint probabilities stay finite; the
    joint probability never exceeds the first step's.
    """
    n = chain.numel()
    if n < 2:
        return logits
    cols = list(logits.unbind(1))
    log_p = torch.nn.functional.logsigmoid(logits[:, int(chain[0])])
    for j in range(1, n):
        t = int(chain[j])
        log_p = log_p + torch.nn.functional.logsigmoid(logits[:, t])
        # logit(p) = log p - log(1 - p); clamp keeps p < 1 so log(1 - p) is finite
        safe = log_p.clamp(max=-1e-7)
        # the round trip through log space can land an ulp above the previous step
        cols[t] = torch.minimum(safe - torch.log(-torch.expm1(safe)), cols[int(chain[j - 1])])
    return torch.stack(cols, dim=1)


class MultiTaskModel(nn.Module):
    """Field embeddings → (interaction) → flat v → multi-task block → towers → logits.

    Args:
        sparse_embedding: KJT of raw ids → B x F_s x d (or None without sparse features).
        normalizer: raw numeric values → normalised values.
        numeric_embedding: B x F_n → B x F_n x d (or None without numeric features).
        block: v → T task representations; v is B x F·d, or the interaction's flat output.
        towers: T representations → B x T logits.
        interaction: B x F x d tokens → flat v (``forward_flat``), or None (v = flat tokens).

    ``forward(sparse, dense)`` returns B x T logits; ``predict`` returns probabilities;
    ``forward_with_aux`` also returns the auxiliary losses for training.
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
        chain: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.sparse_embedding = sparse_embedding
        self.normalizer = normalizer
        self.numeric_embedding = numeric_embedding
        self.interaction = interaction
        self.block = block
        self.towers = towers
        self.task_names = list(task_names)
        # task indices of the ESMM chain, funnel order (empty: no chaining); a buffer, as
        # TorchScript cannot type an empty list attribute
        self.register_buffer(
            "chain", torch.tensor(list(chain or []), dtype=torch.long), persistent=False
        )
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

    def block_inputs(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor, aux: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(v, tokens) as the block reads them: v is B x |v|; tokens are X⁰ (B x F x d),
        then each interaction layer's B x F x d' output."""
        x0 = self.field_tokens(sparse, dense)
        if self.interaction is not None:
            layers = self.interaction.forward_layers(x0, aux)
            v = self.interaction.flatten_output(x0, layers[-1])
            return v, [x0] + layers  # noqa: RUF005 (TorchScript has no list unpacking)
        return x0.flatten(1), [x0]

    @torch.jit.export
    def forward_with_aux(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """B x T logits and the auxiliary losses (already weighted) that blocks declared;
        the training loss adds their sum to the task loss."""
        aux: dict[str, torch.Tensor] = {}
        v, tokens = self.block_inputs(sparse, dense, aux)
        logits = self.towers(self.block(v, tokens, aux))
        return chain_logits(logits, self.chain), aux

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """B x T logits (of the joint probability for chained tasks)."""
        return self.forward_with_aux(sparse, dense)[0]

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
        normalizer = NumericNormalizer.from_stats(stats, spec.fill_value)
        numeric = NumericEmbedding(len(spec.numeric), d)
    field_names = [f.name for f in spec.sparse] + [f.name for f in spec.numeric]
    num_fields = len(field_names)
    interaction = build_interaction(cfg.model.interaction, num_fields, d)
    if interaction is not None:
        flat = interaction.flat_features(num_fields)
        token_dims = [d] + [interaction.out_features_per_field] * len(interaction.layers)
    else:
        flat, token_dims = num_fields * d, [d]
    inputs = BlockInputs(flat, list(spec.task_names), field_names, token_dims)
    block = build_block(inputs, mt_cfg)
    towers = TaskTowers(
        len(spec.tasks),
        block.out_features,
        mt_cfg.tower_hidden,
        mt_cfg.activation,
        mt_cfg.dropout,
    )
    chain = [spec.task_names.index(t) for t in mt_cfg.chain]
    return MultiTaskModel(
        sparse, normalizer, numeric, block, towers, spec.task_names, interaction, chain
    )
