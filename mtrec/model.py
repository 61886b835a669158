"""Assembles the model from a config: a sparse arch (ids → field tokens) and a task arch
(numeric embedding → (interaction) → multi-task block → task towers → ESMM chain).

Training composes :class:`SparseArch` (torchrec/FBGEMM lookup) with :class:`TaskArch`;
the exported serving module composes the sparse arch's torch-only pooling with the SAME
task arch object (``mtrec.export.serving``), so the forward exists once.

The multi-task block is looked up by ``model.multitask.type`` in the block registry
(:mod:`mtrec.multitask.registry`), so new blocks plug in without touching the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.config import ConfigError, ExperimentConfig
from mtrec.data.spec import FeatureSpec
from mtrec.embeddings.feature_select import FeatureSelect
from mtrec.embeddings.linear import LinearArch, LinearHead
from mtrec.embeddings.numeric import NumericEmbedding, NumericNormalizer
from mtrec.embeddings.per_feature import (
    RARE_ID,
    UNSEEN_ID,
    PerFeatureEmbedding,
    PerFeaturePooling,
)
from mtrec.embeddings.piecewise import PiecewiseLinearEncoding
from mtrec.embeddings.unified import UnifiedEmbedding, UnifiedPooling
from mtrec.interaction import AutoInt, build_interaction
from mtrec.multitask.base import BlockInputs
from mtrec.multitask.registry import BlockBuilder, block_spec, build_block, registered_blocks
from mtrec.multitask.towers import TaskTowers

__all__ = [
    "MULTITASK_REGISTRY",
    "BlockInputs",
    "MultiTaskModel",
    "SparseArch",
    "TaskArch",
    "build_model",
    "chain_logits",
    "remap_legacy_key",
    "remap_legacy_state_dict",
    "remap_legacy_train_state",
]


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
    steps: list[int] = chain.tolist()
    return _chain_steps(logits, steps, logits.size(1))


def _chain_steps(logits: torch.Tensor, chain: list[int], num_tasks: int) -> torch.Tensor:
    """:func:`chain_logits` with the chain and T as Python ints, so ``torch.fx`` can trace
    it (no tensor-valued control flow)."""
    n = len(chain)
    if n < 2:
        return logits
    cols = [logits[:, t] for t in range(num_tasks)]
    log_p = torch.nn.functional.logsigmoid(logits[:, chain[0]])
    for j in range(1, n):
        t = chain[j]
        log_p = log_p + torch.nn.functional.logsigmoid(logits[:, t])
        # logit(p) = log p - log(1 - p); clamp keeps p < 1 so log(1 - p) is finite
        safe = log_p.clamp(max=-1e-7)
        # the round trip through log space can land an ulp above the previous step
        cols[t] = torch.minimum(safe - torch.log(-torch.expm1(safe)), cols[chain[j - 1]])
    return torch.stack(cols, dim=1)


class SparseArch(nn.Module):
    """Sparse features → field tokens: KJT of raw ids → B x F_d x d.

    Wraps the embedding module (torchrec ``EmbeddingBagCollection`` inside, FBGEMM kernels
    once fused or sharded). :meth:`torch_pooling` gives the same lookup as a torch-only
    module over plain tensors, built from this embedding (same maths, same weights).

    Args:
        embedding: :class:`PerFeatureEmbedding` or :class:`UnifiedEmbedding` over the F_d
            features that feed the deep model.
        select: picks those F_d features out of the model's F_s sparse features (the
            others have ``deep: false`` and feed only the linear term), or None when all
            F_s feed the deep model. Serving applies the same module
            (:class:`~mtrec.export.serving.ServingModule`).
    """

    def __init__(
        self,
        embedding: PerFeatureEmbedding | UnifiedEmbedding,
        select: FeatureSelect | None = None,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.select = select

    def deep_ids(self, sparse: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The KJT of the F_d deep features (``sparse`` itself when all are deep)."""
        select = self.select
        if select is None:
            return sparse
        batch = sparse.stride()
        values, lengths = select(sparse.values(), sparse.lengths(), batch)
        return KeyedJaggedTensor(
            keys=self.embedding.feature_names, values=values, lengths=lengths, stride=batch
        )

    def forward(
        self,
        sparse: KeyedJaggedTensor,
        filtered: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``filtered``: the ids already through the embedding's ``value_filter`` and their
        features, or None (the embedding filters them). Never given with ``select``: the
        linear term then reads other features and filters its own ids."""
        if filtered is None:
            return self.embedding(self.deep_ids(sparse))
        assert self.select is None, "pre-filtered ids cover every sparse feature"
        return self.embedding(sparse, filtered)

    def torch_pooling(self) -> PerFeaturePooling | UnifiedPooling:
        """``(values [N], lengths [F_s·B], B) → B x F_s x d`` without torchrec or FBGEMM."""
        return self.embedding.torch_pooling()


class TaskArch(nn.Module):
    """Field tokens and raw numeric values → B x T task logits.

    Numeric normalisation and embedding, (interaction), multi-task block, towers, ESMM
    chaining: everything after the sparse lookup, shared as is by training (after
    :class:`SparseArch`) and serving (after its torch-only pooling).

    Args:
        normalizer: raw numeric values → normalised values (None without numeric features).
        numeric_embedding: B x F_n → B x F_n x d (None without numeric features).
        block: v → T task representations; v is B x F·d, or the interaction's flat output.
        towers: T representations → B x T logits.
        task_names: the T tasks.
        interaction: B x F x d tokens → per-layer tokens and flat v, or None (v = flat tokens).
        chain: task indices of the ESMM chain, funnel order (empty: no chaining).
        linear: the first-order term (per-id weights of :class:`LinearArch`, normalised
            numerics, bias → B x T), added to the logits before the chain; None: off.
        piecewise: normalised numerics B x F_n → ramps B x F_n x K
            (``model.embedding.numeric_bins``), computed once and read by the numeric
            embedding and the linear term; None: off.

    ``block`` and ``towers`` are None for a linear-only model (``model.deep: false``, the
    logistic-regression floor): then the logits are the linear term alone.

    Shapes: sparse B x F_s x d (or None without sparse features), dense B x F_n,
    linear_ids B x F_s x W (or None) → B x T logits; F = F_s + F_n tokens, sparse first.
    """

    chain_tasks: list[int]  # task indices of the ESMM chain (type set below the class)

    def __init__(
        self,
        normalizer: NumericNormalizer | None,
        numeric_embedding: NumericEmbedding | None,
        block: nn.Module | None,
        towers: TaskTowers | None,
        task_names: list[str],
        interaction: AutoInt | None = None,
        chain: list[int] | None = None,
        linear: LinearHead | None = None,
        piecewise: PiecewiseLinearEncoding | None = None,
    ) -> None:
        super().__init__()
        self.normalizer = normalizer
        self.numeric_embedding = numeric_embedding
        self.interaction = interaction
        self.block = block
        self.towers = towers
        self.linear = linear
        self.piecewise = piecewise
        if (block is None or towers is None) and linear is None:
            raise ValueError("TaskArch needs a block and towers, or a linear term")
        self.task_names = list(task_names)
        self.num_tasks = len(task_names)
        self.chain_tasks = list(chain or [])
        # the chain as a tensor too (exporter, callers); not part of the state dict
        self.register_buffer(
            "chain", torch.tensor(self.chain_tasks, dtype=torch.long), persistent=False
        )

    def normalized(self, dense: torch.Tensor) -> torch.Tensor | None:
        """B x F_n raw values → normalised float32 values (None without a normaliser)."""
        return None if self.normalizer is None else self.normalizer(dense)

    def ramps_of(self, normed: torch.Tensor | None) -> torch.Tensor | None:
        """B x F_n x K piecewise-linear ramps of the normalised numerics (None when off)."""
        if self.piecewise is None or normed is None:
            return None
        return self.piecewise(normed)

    def field_tokens(self, sparse: torch.Tensor | None, dense: torch.Tensor) -> torch.Tensor:
        """B x F x d tokens: sparse fields, then numeric fields."""
        normed = self.normalized(dense)
        return self.tokens_of(sparse, normed, self.ramps_of(normed))

    def tokens_of(
        self,
        sparse: torch.Tensor | None,
        normed: torch.Tensor | None,
        ramps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`field_tokens` from already normalised numerics (``normed``, B x F_n) and
        their ramps (B x F_n x K, or None)."""
        tokens: list[torch.Tensor] = []
        if sparse is not None:
            tokens.append(sparse)
        if self.numeric_embedding is not None and normed is not None:
            tokens.append(self.numeric_embedding(normed, ramps))
        return torch.cat(tokens, dim=1)

    def block_inputs(
        self, x0: torch.Tensor, aux: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(v, tokens) as the block reads them: v is B x |v|; tokens are X⁰ (B x F x d),
        then each interaction layer's B x F x d' output."""
        if self.interaction is not None:
            layers = self.interaction.forward_layers(x0, aux)
            v = self.interaction.flatten_output(x0, layers[-1])
            return v, [x0] + layers  # noqa: RUF005 (TorchScript has no list unpacking)
        return x0.flatten(1), [x0]

    def first_order(
        self,
        linear_ids: torch.Tensor | None,
        dense: torch.Tensor,
        normed: torch.Tensor | None,
        ramps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """B x T logits of the linear term (which must be on); ``normed``: the normalised
        numerics (None without a normaliser: ``dense`` is read as is); ``ramps``: their
        B x F_n x K piecewise-linear ramps (None: off)."""
        assert self.linear is not None
        return self.linear(linear_ids, dense.float() if normed is None else normed, ramps)

    @torch.jit.export
    def forward_with_aux(
        self,
        sparse: torch.Tensor | None,
        dense: torch.Tensor,
        linear_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """B x T logits and the auxiliary losses (already weighted) that blocks declared."""
        aux: dict[str, torch.Tensor] = {}
        # normalised (and encoded) once for the tokens and the linear term
        normed = self.normalized(dense)
        ramps = self.ramps_of(normed)
        if self.block is not None and self.towers is not None:
            v, tokens = self.block_inputs(self.tokens_of(sparse, normed, ramps), aux)
            logits = self.towers(self.block(v, tokens, aux))
            if self.linear is not None:
                logits = logits + self.first_order(linear_ids, dense, normed, ramps)
        else:
            logits = self.first_order(linear_ids, dense, normed, ramps)
        return _chain_steps(logits, self.chain_tasks, self.num_tasks), aux

    def forward(
        self,
        sparse: torch.Tensor | None,
        dense: torch.Tensor,
        linear_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """B x T logits (of the joint probability for chained tasks)."""
        return self.forward_with_aux(sparse, dense, linear_ids)[0]


# TorchScript cannot type an empty list attribute and reads class annotations unevaluated
# (a string under ``from __future__ import annotations``): declare the type itself
TaskArch.__annotations__["chain_tasks"] = list[int]

# the task arch's parts, reachable as model.<name> (model.block, ...) for callers
_TASK_PARTS = ("normalizer", "numeric_embedding", "interaction", "block", "towers")

# state-dict prefixes before the sparse / task split → after
_LEGACY_PREFIXES = [("sparse_embedding.", "sparse_arch.embedding.")] + [
    (f"{name}.", f"task_arch.{name}.") for name in _TASK_PARTS
]


def remap_legacy_key(key: str) -> str:
    """A state-dict key or module name of the model before the sparse / task split
    (``sparse_embedding.*``, ``block.*``, ...) → its current name; other keys unchanged."""
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
        if key + "." == old:  # the module itself
            return new[:-1]
    return key


def remap_legacy_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state dict with pre-split keys → current keys (current keys pass as they are)."""
    return {remap_legacy_key(k): v for k, v in state.items()}


def remap_legacy_train_state(state: dict) -> dict:
    """A ``TrainStep.state_dict()``-layout state (``last.pt``) with pre-split names → current
    names: model keys and the sparse optimizers' module names."""
    out = dict(state)
    out["model"] = remap_legacy_state_dict(state["model"])
    if isinstance(state.get("sparse_optimizer"), dict):
        out["sparse_optimizer"] = {
            remap_legacy_key(k): v for k, v in state["sparse_optimizer"].items()
        }
    return out


def _legacy_keys_hook(
    state: dict[str, torch.Tensor], prefix: str, *_: object, **__: object
) -> None:
    """``load_state_dict`` pre-hook: renames pre-split keys in place, so checkpoints written
    before the sparse / task split load unchanged."""
    for key in [k for k in state if k.startswith(prefix)]:
        new = prefix + remap_legacy_key(key[len(prefix) :])
        if new != key:
            state[new] = state.pop(key)


class MultiTaskModel(nn.Module):
    """Sparse arch → task arch: KJT of raw ids and raw numeric values → B x T logits.

    Args:
        sparse_arch: KJT → B x F_s x d field tokens (None without sparse features, or
            for a linear-only model).
        task_arch: (tokens, dense) → logits: normaliser, numeric embedding, interaction,
            multi-task block, towers, linear term, ESMM chain.
        linear_arch: KJT → B x F_s x W per-task weights of the ids (the sparse half of the
            linear term, ``model.linear``), or None.

    ``forward(sparse, dense)`` returns B x T logits; ``predict`` returns probabilities;
    ``forward_with_aux`` also returns the auxiliary losses for training. The task arch's
    parts stay reachable as ``model.block``, ``model.interaction``, ... (eager only).
    State dicts written before the split (``sparse_embedding.*``, ``block.*``, ...) load
    through :func:`remap_legacy_state_dict` (a load pre-hook).
    """

    __jit_unused_properties__ = ["sparse_embedding", "chain", *_TASK_PARTS]  # noqa: RUF012

    def __init__(
        self,
        sparse_arch: SparseArch | None,
        task_arch: TaskArch,
        linear_arch: LinearArch | None = None,
    ) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        self.task_arch = task_arch
        self.linear_arch = linear_arch
        # the linear term filters ids as the embedding does (built from the same kept /
        # seen sets and unknown ids): then a batch's ids are filtered once for both. With
        # the same id dropout the two share one filter module and the dropped ids too;
        # when only the embedding drops ids (model.linear.id_dropout off) the linear term
        # reads the filtered ids before the embedding's dropout
        self.shared_filter = False
        # whether the linear term drops ids in training (model.linear.id_dropout)
        self.linear_drops = linear_arch is not None and linear_arch.value_filter.dropping
        if sparse_arch is not None and linear_arch is not None and sparse_arch.select is None:
            mine, theirs = sparse_arch.embedding.value_filter, linear_arch.value_filter
            same_drops = torch.equal(mine.drop_p, theirs.drop_p)
            self.shared_filter = mine.same_as(theirs) and (same_drops or not self.linear_drops)
            if self.shared_filter and same_drops:  # one module: its id sets stored once
                linear_arch.value_filter = mine
        self.task_names = list(task_arch.task_names)
        # epoch of the checkpoint the weights came from (-1: not loaded from a run)
        self.trained_epoch = -1
        self._register_load_state_dict_pre_hook(_legacy_keys_hook)

    # eager-only views of the parts (older callers read model.block etc.)
    @property
    def sparse_embedding(self) -> nn.Module | None:
        return None if self.sparse_arch is None else self.sparse_arch.embedding

    @property
    def chain(self) -> torch.Tensor:
        return self.task_arch.chain

    @property
    def normalizer(self) -> NumericNormalizer | None:
        return self.task_arch.normalizer

    @property
    def numeric_embedding(self) -> NumericEmbedding | None:
        return self.task_arch.numeric_embedding

    @property
    def interaction(self) -> AutoInt | None:
        return self.task_arch.interaction

    @property
    def block(self) -> nn.Module:
        return self.task_arch.block

    @property
    def towers(self) -> TaskTowers:
        return self.task_arch.towers

    def __setattr__(self, name: str, value: object) -> None:
        # ``model.block = other`` swaps the task arch's block (as before the split)
        if name in _TASK_PARTS and "task_arch" in self.__dict__.get("_modules", {}):
            setattr(self.task_arch, name, value)
        else:
            super().__setattr__(name, value)

    def sparse_tokens(self, sparse: KeyedJaggedTensor) -> torch.Tensor | None:
        """B x F_d x d sparse field tokens of the deep features (None without any)."""
        if self.sparse_arch is None:
            return None
        return self.sparse_arch(sparse)

    def linear_ids(self, sparse: KeyedJaggedTensor) -> torch.Tensor | None:
        """B x F_s x W per-task weights of the ids (None without the linear term)."""
        if self.linear_arch is None:
            return None
        return self.linear_arch(sparse)

    def sparse_parts(
        self, sparse: KeyedJaggedTensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(:meth:`sparse_tokens`, :meth:`linear_ids`), the ids filtered once for both when
        they filter alike; in training the embedding's ids are then dropped, and the linear
        term's too when it drops ids (``model.linear.id_dropout``)."""
        if self.shared_filter and self.sparse_arch is not None and self.linear_arch is not None:
            value_filter = self.sparse_arch.embedding.value_filter
            ids, feature_of = value_filter.filter_bags(sparse.values(), sparse.lengths(), False)
            # one id dropout mask, drawn for the embedding
            dropped = value_filter.drop(ids, feature_of) if self.training else ids
            deep = (dropped, feature_of)
            linear = deep if self.linear_drops else (ids, feature_of)
            return self.sparse_arch(sparse, deep), self.linear_arch(sparse, linear)
        return self.sparse_tokens(sparse), self.linear_ids(sparse)

    def field_tokens(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """B x F x d tokens: sparse fields, then numeric fields."""
        return self.task_arch.field_tokens(self.sparse_tokens(sparse), dense)

    def block_inputs(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor, aux: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(v, tokens) as the block reads them (see :meth:`TaskArch.block_inputs`)."""
        return self.task_arch.block_inputs(self.field_tokens(sparse, dense), aux)

    @torch.jit.export
    def forward_with_aux(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """B x T logits and the auxiliary losses (already weighted) that blocks declared;
        the training loss adds their sum to the task loss."""
        tokens, linear_ids = self.sparse_parts(sparse)
        return self.task_arch.forward_with_aux(tokens, dense, linear_ids)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """B x T logits (of the joint probability for chained tasks)."""
        return self.forward_with_aux(sparse, dense)[0]

    @torch.jit.export
    def predict(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(sparse, dense))


def build_model(cfg: ExperimentConfig, spec: FeatureSpec) -> MultiTaskModel:
    """Build the model of ``cfg``; ``spec`` must carry the fitted numeric statistics and
    (for features with ``min_count``) the fitted kept ids."""
    emb_cfg = cfg.model.embedding
    # frequency filter and unseen-id handling, shared by the deep embedding and the linear
    # term: own row or the rare one, trained by id dropout (per_feature.FrequencyFilter)
    unknown: dict[str, Any] = {
        "kept_ids": [
            torch.from_numpy(spec.kept_ids[f.name]) if f.name in spec.kept_ids else None
            for f in spec.sparse
        ],
        "seen_ids": [
            torch.from_numpy(spec.seen_ids[f.name]) if f.name in spec.seen_ids else None
            for f in spec.sparse
        ],
        "unknown_ids": [
            UNSEEN_ID if spec.unseen_of(f.name) == "own_row" else RARE_ID for f in spec.sparse
        ],
        "id_dropout": [spec.id_dropout.get(f.name, 0.0) for f in spec.sparse],
    }
    buckets = [f.buckets or emb_cfg.buckets for f in spec.sparse]
    poolings = [f.pooling for f in spec.sparse]
    normalizer = piecewise = None
    if spec.numeric:
        stats = [spec.numeric_stats[f.name] for f in spec.numeric]
        normalizer = NumericNormalizer.from_stats(stats, spec.fill_value)
        piecewise = _piecewise(spec, emb_cfg.numeric_bins)
    bins = 0 if piecewise is None else piecewise.num_bins
    sparse_arch = numeric = interaction = block = towers = None
    if cfg.model.deep:
        sparse_arch, numeric, interaction, block, towers = _deep_parts(
            cfg, spec, unknown, buckets, poolings, bins
        )
    # built after the deep parts, so switching it on leaves their seeded init unchanged
    linear_arch = linear = None
    if cfg.model.linear.enabled:
        if spec.sparse:
            uses = None
            if cfg.model.linear.prior_std is not None:
                uses = _prior_counts(spec, "model.linear.prior_std")
            # model.linear.id_dropout off: the linear term keeps every id (the embedding
            # alone simulates cold ids), so its prior counts each kept id's every use
            linear_unknown = dict(unknown)
            if not cfg.model.linear.id_dropout:
                linear_unknown["id_dropout"] = [0.0] * len(spec.sparse)
            linear_arch = LinearArch(
                spec.sparse_names,
                buckets,
                len(spec.tasks),
                poolings,
                **linear_unknown,
                id_uses=uses,
            )
        linear = LinearHead(len(spec.numeric), len(spec.tasks), bins)
    chain = [spec.task_names.index(t) for t in cfg.model.multitask.chain]
    task_arch = TaskArch(
        normalizer, numeric, block, towers, spec.task_names, interaction, chain, linear, piecewise
    )
    return MultiTaskModel(sparse_arch, task_arch, linear_arch)


def _prior_counts(spec: FeatureSpec, key: str) -> list[torch.Tensor | None]:
    """The training use counts of every sparse feature for the prior of ``key``; None (no
    prior on its rows) for a feature without a fitted id set, and for a multi-hot one: a
    pooled bag of several ids is one vector, and its squared norm is not the sum of its
    rows' (the prior's epoch total holds for one id per bag)."""
    out: list[torch.Tensor | None] = []
    for f in spec.sparse:
        if not spec.filtered(f.name) or f.kind == "multi_hot":
            out.append(None)
        elif f.name not in spec.id_uses:
            raise ConfigError(
                f"sparse feature '{f.name}': {key} needs its training use counts, which "
                f"this run's feature_vocab.pt predates; train a new run, or set {key}: null"
            )
        else:
            out.append(torch.from_numpy(spec.id_uses[f.name]))
    return out


def _piecewise(spec: FeatureSpec, bins: int) -> PiecewiseLinearEncoding | None:
    """The piecewise-linear encoding of the fitted bin edges (None when ``bins`` is 0)."""
    if bins <= 0:
        return None
    edges = []
    for f in spec.numeric:
        e = spec.numeric_stats[f.name].edges
        if e is None or len(e) != bins + 1:
            have = "no bin edges" if e is None else f"{len(e) - 1} bins"
            raise ConfigError(
                f"numeric feature '{f.name}': model.embedding.numeric_bins is {bins} but its "
                f"fitted statistics (feature_stats.json) hold {have}; train a new run with "
                "this setting (the edges are fitted on the training split)"
            )
        edges.append(e)
    return PiecewiseLinearEncoding(edges)


def _deep_parts(
    cfg: ExperimentConfig,
    spec: FeatureSpec,
    unknown: dict[str, Any],
    buckets: list[int],
    poolings: list[str],
    bins: int = 0,
) -> tuple[SparseArch | None, NumericEmbedding | None, AutoInt | None, nn.Module, TaskTowers]:
    """The deep model's parts: sparse arch, numeric embedding (with ``bins`` ramps per
    feature), interaction, block, towers."""
    emb_cfg, mt_cfg = cfg.model.embedding, cfg.model.multitask
    d = emb_cfg.dim
    # the features with ``deep: false`` feed only the linear term: the deep embedding is
    # built over the others (their per-feature settings picked from the lists of all)
    deep = [i for i, f in enumerate(spec.sparse) if f.deep]
    names = [spec.sparse[i].name for i in deep]
    buckets, poolings = [buckets[i] for i in deep], [poolings[i] for i in deep]
    sparse: PerFeatureEmbedding | UnifiedEmbedding | None = None
    if deep:
        if emb_cfg.prior_std is not None:  # the prior's use counts beside the id handling
            unknown = {**unknown, "id_uses": _prior_counts(spec, "model.embedding.prior_std")}
        unknown = {key: [values[i] for i in deep] for key, values in unknown.items()}
        if emb_cfg.type == "unified":
            tables = emb_cfg.num_tables
            sparse = UnifiedEmbedding(
                names,
                emb_cfg.rows or -(-sum(buckets) // tables) * tables,
                d,
                poolings,
                chunks=[emb_cfg.chunks.get(name, 1) for name in names],
                chunk_dim=emb_cfg.chunk_dim or d,
                num_tables=tables,
                **unknown,
            )
        else:
            sparse = PerFeatureEmbedding(names, buckets, d, poolings, **unknown)
    numeric = NumericEmbedding(len(spec.numeric), d, bins) if spec.numeric else None
    field_names = spec.field_names  # the tokens: deep sparse features, then numeric ones
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
    arch = None
    if sparse is not None:  # None too when every sparse feature is wide-only
        whole = len(deep) == len(spec.sparse)
        arch = SparseArch(sparse, None if whole else FeatureSelect(len(spec.sparse), deep))
    return arch, numeric, interaction, block, towers
