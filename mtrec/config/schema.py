"""The experiment schema: typed dataclasses, one per YAML section.

Each field's ``#`` comment is its entry in ``docs/configuration.md`` (see
:mod:`mtrec.docs`). Numeric fields declare their valid range with :func:`num`; one walker
(:mod:`mtrec.config.checks`) checks every number against it and refuses NaN / inf. The
settings of a multi-task block live in the block's own module (see
:mod:`mtrec.multitask.registry`) and hang under ``model.multitask.<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CHANGED_DEFAULTS",
    "DEFAULT_CHANGES",
    "DEFAULT_CHUNK_ROWS",
    "Bounds",
    "DatasetConfig",
    "EmbeddingConfig",
    "ExperimentConfig",
    "FeatureConfig",
    "HeadsRoutingConfig",
    "InteractionConfig",
    "LinearConfig",
    "ModelConfig",
    "MultiTaskConfig",
    "TaskConfig",
    "TrainingConfig",
    "bounds",
    "num",
]


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric setting (``None``: open on that side)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def contains(self, x: float) -> bool:
        return not (
            (self.gt is not None and not x > self.gt)
            or (self.ge is not None and not x >= self.ge)
            or (self.lt is not None and not x < self.lt)
            or (self.le is not None and not x <= self.le)
        )

    def __str__(self) -> str:
        """``> 0``, ``>= 0`` or ``in [0, 1)``: the form of the error messages."""
        low = ("(", self.gt) if self.gt is not None else ("[", self.ge)
        high = (")", self.lt) if self.lt is not None else ("]", self.le)
        if low[1] is not None and high[1] is not None:
            return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
        if low[1] is not None:
            return f"{'>' if low[0] == '(' else '>='} {low[1]:g}"
        if high[1] is not None:
            return f"{'<' if high[0] == ')' else '<='} {high[1]:g}"
        return "any finite number"


def bounds(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> dict[str, Bounds]:
    """Field metadata declaring a valid range, for list / mapping fields of numbers (each
    item is checked): ``field(default_factory=list, metadata=bounds(gt=0))``."""
    return {"bounds": Bounds(gt=gt, ge=ge, lt=lt, le=le)}


#: schema defaults that changed after runs had been written, one change set per release
#: that changed them, oldest first, each key (dotted) with its value before the change. A
#: run's config hash leaves keys at their default out, so a run hashed between two change
#: sets left out the keys of later sets at their OLD defaults: ``mtrec.run`` accepts the
#: hash of every generation, and reads a run's config.yaml that predates a key with the
#: old value. Append a change set whenever defaults below change.
DEFAULT_CHANGES: list[dict[str, Any]] = [
    {
        "model.linear.enabled": False,  # -> True (issue #16)
        "model.embedding.id_dropout": 0.0,  # -> "auto" (issue #16)
    },
    {
        "model.embedding.numeric_bins": 0,  # -> 16 (issue #16, second round)
    },
    {
        "model.linear.prior_std": None,  # -> 0.15 (issue #16, third round)
        "model.linear.learning_rate": 0.05,  # -> 0.2 (issue #16, third round)
    },
    {
        "training.ema_decay": None,  # -> 0.95 (issue #16, fourth round)
    },
    {
        "model.linear.id_dropout": True,  # new key, off (issue #16, fifth round)
    },
    {
        "training.reset_embeddings_each_epoch": False,  # new key, on (issue #16, sixth round)
    },
]

#: every changed key with its value before its (first) change
CHANGED_DEFAULTS: dict[str, Any] = {
    key: old for changes in reversed(DEFAULT_CHANGES) for key, old in changes.items()
}


def num(
    default: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A numeric field with its valid range; every value must also be finite. ``None``
    (an optional field left unset) is not checked.

    Example::

        learning_rate: float = num(1e-3, gt=0)
        dropout: float = num(0.0, ge=0, lt=1)
    """
    return field(default=default, metadata=bounds(gt=gt, ge=ge, lt=lt, le=le))


def _block_names() -> list[str]:
    from mtrec.multitask.registry import block_names

    return block_names()


def _block_configs() -> dict[str, type]:
    from mtrec.multitask.registry import registered_blocks

    return {n: s.config for n, s in registered_blocks().items() if s.config is not None}


# rows per chunk streamed from disk: bounds loader memory (measured: peak RSS streaming
# 5M rows / 0.5M rows = 1.40 at 131072, 1.5 at 262144)
DEFAULT_CHUNK_ROWS = 131072

FeatureKind = Literal["categorical", "multi_hot", "numeric"]
NumericTransform = Literal["none", "log1p", "standardize", "log1p_standardize", "robust"]
DataFormat = Literal["parquet", "csv", "criteo"]


@dataclass
class FeatureConfig:
    """One input feature.

    ``column`` defaults to ``name``. Categorical values (string or integer) and
    multi-hot tokens are turned into stable int64 ids (see ``mtrec.data.hashing``).
    """

    # feature name (unique; also the column unless `column` is set)
    name: str
    # categorical (one id), multi_hot (a list of ids) or numeric (a float)
    kind: FeatureKind
    # source column (default: name); one column may feed several features
    column: str | None = None
    # numeric only; robust: (x - median) / (IQR / 1.349) clipped to ±5, for heavy tails
    transform: NumericTransform = "standardize"
    # multi_hot only: split string columns on this delimiter (list columns need none)
    delimiter: str | None = None
    # multi_hot only: how the ids of one row combine
    pooling: Literal["sum", "mean"] = "sum"
    # per-feature hash buckets of the baseline embedding (None: model.embedding.buckets)
    buckets: int | None = num(None, gt=0)
    # values seen fewer times in the training split share one "rare" embedding
    # (None: model.embedding.min_count)
    min_count: int | None = num(None, ge=0)
    # training only: probability that each id is replaced by the id unseen values read
    # (auto: the share of valid ids unseen in training, at most 0.5; None:
    # model.embedding.id_dropout)
    id_dropout: float | Literal["auto"] | None = num(None, ge=0, lt=1)
    # where ids absent from the training split go (None: model.embedding.unseen)
    unseen: Literal["rare", "own_row"] | None = None
    # categorical only: report metrics separately for rows whose id was seen / unseen in
    # training (None: the highest-cardinality features, unless another feature says true)
    slice: bool | None = None
    # categorical / multi_hot only; false: a "wide-only" column (Wide & Deep) that feeds
    # only the first-order term (model.linear), e.g. a user or item id mostly new at
    # serving: its per-id weights are shrunk by model.linear.prior_std, and the deep
    # model learns from the features that carry over to new ids
    deep: bool = True

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass
class TaskConfig:
    """A binary task: ``label`` column with values in {0, 1}."""

    # task name (unique)
    name: str
    # label column of 0/1 values (default: name)
    label: str | None = None
    # weight of this task's BCE in the training loss
    weight: float = num(1.0, ge=0)
    # column holding the true probability (planted synthetic data) for oracle AUC
    true_prob: str | None = None

    @property
    def source(self) -> str:
        return self.label or self.name


@dataclass
class DatasetConfig:
    """Where the data lies. Paths may use ``${MTREC_DATA_DIR}`` and are resolved
    relative to the YAML file that sets them."""

    # file format of the splits (criteo: raw TSV or its header'd CSV variant)
    format: DataFormat = "parquet"
    # training split: a file, a directory of shards or a glob (relative paths: to the YAML file)
    train: str = ""
    # validation split (early stopping, best checkpoint); optional
    valid: str | None = None
    # test split read by `mtrec evaluate`; optional
    test: str | None = None
    # what to do with NaN / inf / null in numeric columns
    nan_policy: Literal["fail", "fill"] = "fail"
    # with nan_policy fill: the value missing / NaN numerics become
    fill_value: float = 0.0
    # rows per chunk read from disk by the streaming batcher
    chunk_rows: int = num(DEFAULT_CHUNK_ROWS, gt=0)
    # CSV only
    csv_separator: str = ","


@dataclass
class EmbeddingConfig:
    """Sparse feature embeddings.

    ``type: unified`` (the default) multiplexes every sparse feature into one shared table of
    ``rows`` × ``chunk_dim`` (Unified Embedding, see ``mtrec.embeddings.unified``):
    feature i reads ``chunks[i]`` salted rows and concatenates them; a feature whose
    ``chunks[i] * chunk_dim != dim`` gets its own linear projection to ``dim``.
    ``type: per_feature`` is the baseline: one hashed table per feature (``buckets`` rows
    each). Rule of thumb for ``chunks``: ``k = min(3, 1 + floor(log10(vocabulary) / 2))``
    (1 below ~100 values, 2 up to ~10^4, 3 above), then more for the features that
    matter most. The ``unified`` keys are ignored by ``per_feature`` (so one config can
    switch ``type`` by override) and ``buckets`` is ignored by ``unified``.
    """

    # unified (one multiplexed table, default) or per_feature (baseline)
    type: Literal["per_feature", "unified"] = "unified"
    # d, the width of every field token
    dim: int = num(16, gt=0)
    # default hash buckets per categorical / multi-hot feature
    buckets: int = num(100000, gt=0)
    # row-wise Adagrad (FBGEMM fused) on the embedding rows
    learning_rate: float = num(0.05, gt=0)
    # row-wise Adagrad epsilon
    eps: float = num(1e-8, gt=0)
    # L2 penalty on the looked-up sparse field tokens, added to the loss as
    # weight_decay / 2 * mean over rows of sum of squares (0: off): a row's gradient gains
    # weight_decay * row / batch per use, so frequent ids are held back more. (FBGEMM's
    # own row-wise Adagrad weight_decay is ignored by its CPU kernel.)
    weight_decay: float = num(0.0, ge=0)
    # default frequency filter of categorical / multi-hot features: values seen fewer than
    # this many times in the training split map to one shared "rare" id inside the model
    # (0: off). Stops embeddings of rare values from memorising their few labels.
    min_count: int = num(0, ge=0)
    # id dropout (unknown-id simulation): during training each id of a sparse feature is
    # replaced with this probability by the id that values unseen in training read at
    # serving, so that row learns from traffic like cold traffic (0: off; auto: per
    # feature, the share of valid ids absent from the training split, at most 0.5; the
    # default: without min_count it keeps cold traffic off other ids' rows, and with a
    # random split it fits p ~ 0, a no-op; docs/generalisation.md)
    id_dropout: float | Literal["auto"] = num("auto", ge=0, lt=1)
    # ids absent from the training split: rare (share the frequency filter's "rare" row)
    # or own_row (a row of their own, trained by id dropout). With id_dropout or own_row a
    # feature is filtered even without min_count (unseen ids stop hashing onto other ids)
    unseen: Literal["rare", "own_row"] = "rare"
    # piecewise-linear encoding of numeric features (0: off): K quantile bins per feature,
    # fitted on the training split; each numeric token and the linear term gain a learned
    # weight per bin ramp, so a numeric's effect can bend at the bin edges instead of
    # being one slope (Gorishniy et al. 2022; mtrec.embeddings.piecewise). On by default
    # (chosen on valid, 3 seeds): +0.009 mean test AUC on the default preset at 60k rows,
    # census income +0.002, neutral on the cold-start preset (docs/generalisation.md)
    numeric_bins: int = num(16, ge=0)
    # unified only: M, rows of the shared table (None: the sum of the per-feature buckets,
    # rounded up to a multiple of num_tables: the per_feature parameter budget at chunk_dim=dim)
    rows: int | None = num(None, gt=0)
    # unified only: d_c, the width of one chunk (None: dim)
    chunk_dim: int | None = num(None, gt=0)
    # unified only: chunks (k) per sparse feature name; unlisted features take 1
    chunks: dict[str, int] = field(default_factory=dict, metadata=bounds(gt=0))
    # unified only: physical tables the shared one is split into round-robin (rows % n == 0)
    num_tables: int = num(1, gt=0)
    # std of a Gaussian prior on every embedding row (null: off), as model.linear.prior_std
    # does for the linear term's weights: sum_rows |row|^2 / (2 prior_std^2) once per epoch,
    # spread over each row's uses (rare ids shrunk most). Off by default: 0.03 lifts the
    # default preset at 60k rows by +0.005 test AUC but costs 0.006 on the cold-start
    # preset at 1M, where the ids carry signal (docs/generalisation.md)
    prior_std: float | None = num(None, gt=0)


@dataclass
class MultiTaskConfig:
    """Multi-task block and task towers. ``type`` picks a registered block (see
    :mod:`mtrec.multitask.registry`; your own with top-level ``imports:``); its own settings
    live under the key of the same name (``ple``, ``home``, ``apem``, ``task_expert``, ...).
    ``num_experts`` / ``expert_hidden`` / ``activation`` / ``dropout`` are shared by every
    expert-based block. ``chain`` (ESMM): task names in funnel order, e.g.
    ``[click, purchase]``; each later task predicts the joint probability
    p(click ∧ purchase) = p(click) · p(purchase | click) and is trained on the joint label."""

    # the multi-task block: a registered name (a block of your own: list its module in imports)
    type: str = field(default="mmoe", metadata={"choices": _block_names})
    # experts of MMoE (PLE/HoME/TaskExpert have their own counts)
    num_experts: int = num(4, gt=0)
    # expert MLP widths; the last is the task representation size
    expert_hidden: list[int] = field(default_factory=lambda: [128, 64], metadata=bounds(gt=0))
    # hidden widths of each task's tower (ends in one logit)
    tower_hidden: list[int] = field(default_factory=lambda: [64], metadata=bounds(gt=0))
    # activation of experts and towers (HoME's normalised experts use Swish)
    activation: Literal["relu", "silu", "gelu"] = "relu"
    # dropout after expert and tower layers
    dropout: float = num(0.0, ge=0, lt=1)
    # ESMM funnel: task names in order; later tasks predict joint probabilities
    chain: list[str] = field(default_factory=list)
    # block name -> its settings: in YAML each is a key of its own, model.multitask.<name>
    blocks: dict[str, Any] = field(default_factory=dict, metadata={"sections": _block_configs})

    def __getattr__(self, name: str) -> Any:
        # cfg.ple, cfg.home, ...: a registered block's settings (its defaults if not set)
        if name.startswith("__") or name == "blocks":
            raise AttributeError(name)
        cls = _block_configs().get(name)
        if cls is None:
            raise AttributeError(f"MultiTaskConfig has no key or block settings {name!r}")
        return self.blocks.setdefault(name, cls())

    @property
    def block(self) -> Any:
        """The settings of the selected block (``None`` if it has none)."""
        cls = _block_configs().get(self.type)
        return None if cls is None else getattr(self, self.type)


@dataclass
class HeadsRoutingConfig:
    """MoH (arXiv 2410.11842): ``shared`` heads always on; a per-token router picks
    ``top_k`` of the remaining heads; ``balance_weight`` β of the load-balance loss."""

    # h_s heads always on
    shared: int = num(1, ge=0)
    # routed heads each token picks
    top_k: int = num(1, ge=1)
    # β of the load-balance auxiliary loss
    balance_weight: float = num(0.01, ge=0)


@dataclass
class InteractionConfig:
    """Feature interaction between the field tokens and the multi-task block.

    ``type: none`` feeds the flattened field tokens to the block. ``type: autoint``
    runs ``layers`` multi-head self-attention layers over the F field tokens
    (``heads`` heads of ``attention_dim / heads`` each; ``residual``: a W_res path;
    ``layer_norm``: LayerNorm before each layer's ReLU; ``dropout``: on attention
    weights) and feeds the block their flattened output (F × ``attention_dim``).
    A non-empty ``dnn`` makes it AutoInt+: a ReLU MLP of these widths on the flattened
    tokens, concatenated to the attention output (see ``mtrec.interaction.autoint``).
    """

    # none (flattened tokens to the block) or autoint
    type: Literal["none", "autoint"] = "none"
    # interacting layers
    layers: int = num(3, gt=0)
    # A, output width per field (all heads)
    attention_dim: int = num(32, gt=0)
    # attention heads (divide attention_dim)
    heads: int = num(2, gt=0)
    # add the W_res residual projection
    residual: bool = True
    # LayerNorm on the residual sum, before the ReLU
    layer_norm: bool = False
    # dropout on attention weights
    dropout: float = num(0.0, ge=0, lt=1)
    # AutoInt+: widths of the parallel MLP on the flattened tokens (empty: off)
    dnn: list[int] = field(default_factory=list, metadata=bounds(gt=0))
    # Mixture-of-Head routing (MoH); None: every head always on
    heads_routing: HeadsRoutingConfig | None = None


@dataclass
class LinearConfig:
    """First-order (linear) term per task, as in Wide & Deep / DeepFM: one weight per task
    for every hashed id of every sparse feature (the ids, buckets and frequency filter of
    ``per_feature`` embeddings; multi-hot bags pooled as the feature's ``pooling``), plus
    one per task for every normalised numeric feature and a per-task bias. Added to each
    task's logit before the ESMM chain. ``mtrec baseline`` trains this term alone (the
    logistic-regression floor, ``model.deep: false``).
    """

    # add the linear term to every task's logit (on by default: +0.012 to +0.016 test AUC
    # on the cold-start preset, +0.005 mean on the default one; docs/generalisation.md)
    enabled: bool = True
    # row-wise Adagrad (FBGEMM fused) on the per-id weights (0.2 with the prior: it
    # reaches the prior's optimum sooner; 0.5 over-shoots, docs/generalisation.md)
    learning_rate: float = num(0.2, gt=0)
    # row-wise Adagrad epsilon of the per-id weights
    eps: float = num(1e-8, gt=0)
    # Adam learning rate of the numeric weights and the per-task bias (the bias must reach
    # the base-rate logit, e.g. -3.5 for a 3% label, within a few hundred steps)
    dense_learning_rate: float = num(0.05, gt=0)
    # L2 penalty on the looked-up per-id weights, as model.embedding.weight_decay does for
    # the embedding rows (0: off): weight_decay / 2 * mean over rows of their sum of squares
    weight_decay: float = num(0.0, ge=0)
    # std of a Gaussian prior on every per-id weight of the single-id features with a fitted
    # id set (null: off): adds sum_rows w^2 / (2 prior_std^2) once per training epoch, spread
    # over each row's uses (so rare ids are shrunk most), the L2 of a logistic regression
    # with C = prior_std^2 (times the task weight)
    # Default 0.15, chosen on valid (docs/generalisation.md)
    prior_std: float | None = num(0.15, gt=0)
    # drop ids here too, as model.embedding.id_dropout does for the embedding. Off
    # (default): every kept id's weights learn from all of its rows, and an unseen id reads
    # an unknown row that no dropped id trains (it stays at zero, the prior mean, unless
    # rare ids or hash collisions reach it), as in a logistic regression; the embedding
    # still drops ids, so its unknown row learns what cold traffic looks like. Off won on
    # the cold-start preset on every seed (docs/generalisation.md)
    id_dropout: bool = False


@dataclass
class ModelConfig:
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    multitask: MultiTaskConfig = field(default_factory=MultiTaskConfig)
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    # the deep part (embeddings, interaction, block, towers); false leaves only the linear
    # term (needs linear.enabled): the logistic-regression floor of `mtrec baseline`
    deep: bool = True


@dataclass
class TrainingConfig:
    # rows per training step (global over Ray workers)
    batch_size: int = num(1024, gt=0)
    # rows per batch when scoring
    eval_batch_size: int = num(8192, gt=0)
    # maximum epochs
    epochs: int = num(10, gt=0)
    # Adam learning rate of the dense parameters
    learning_rate: float = num(1e-3, gt=0)
    # Adam weight decay of the dense parameters
    weight_decay: float = num(0.0, ge=0)
    # stop after this many validations without a better mean validation AUC (0: never): epochs,
    # or validation points when validate_every_steps is set
    early_stopping_patience: int = num(2, ge=0)
    # learning-rate decay over the planned steps (epochs x steps per epoch; early stopping
    # ends a run before the end of the plan). constant: the rates as configured. linear /
    # cosine: every dense parameter group's rate times 1 - (1 - r) p, or
    # r + (1 - r) (1 + cos(pi p)) / 2, at progress p = steps taken / steps planned and
    # r = lr_final_ratio (mtrec/train/schedule.py). Ray workers decay theirs alike, over
    # the steps of their shard
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    # the learning-rate factor lr_schedule reaches at the end of the plan
    lr_final_ratio: float = num(0.0, ge=0, le=1)
    # lr_schedule also decays the row-wise Adagrad step of the embedding tables and of the
    # linear term's per-id weights (model.embedding.learning_rate, model.linear.learning_rate)
    lr_schedule_embeddings: bool = False
    # exponential moving average of the dense parameters (null: off), with this decay per
    # step and bias-corrected (0: the raw weights). Validation, checkpoints/best.pt and so
    # evaluation and export use the averaged weights; last.pt keeps the raw ones and the
    # average. The fused embedding tables and per-id linear weights are not averaged (they
    # are updated inside the backward pass; mtrec/train/averaging.py). 0.95 (an average
    # over ~20 steps): best valid AUC on the 60k planted preset (+0.0021, 3 of 3 seeds),
    # the cold-start preset (+0.0016 at 200k rows) and census (+0.0002);
    # docs/generalisation.md
    ema_decay: float | None = num(0.95, ge=0, lt=1)
    # MEDA (multi-epoch learning with data augmentation): at the start of every epoch
    # after the first, the deep model's embedding tables are drawn afresh from their
    # initial distribution and their row-wise Adagrad state cleared, while the dense layers
    # and the linear term's per-id weights keep training. Id embeddings over-fit from the
    # second pass on; the layers above meet a new embedding space each epoch instead
    # (mtrec/train/embedding_reset.py). Best valid AUC on the cold-start preset (+0.0018 at
    # 1M rows, 3 of 3 seeds), the 60k planted preset (+0.0014), census (+0.0008) and the
    # demo's data; runs then train for more epochs (census: best epoch 14-26 against 6-9).
    # With lr_schedule_embeddings, late epochs start fresh tables at a decayed rate. With
    # validate_every_steps, patience ends a run at epoch ends only from the second epoch on
    # (a point early in an epoch judges tables that have seen part of one pass);
    # docs/generalisation.md
    reset_embeddings_each_epoch: bool = True
    # also validate every this many training steps inside an epoch (null: at epoch ends only).
    # checkpoints/best.pt may then come from any validation point (metrics.jsonl gets one line
    # each, with its global step); last.pt, the resume point, stays at epoch ends. Id
    # embeddings over-fit within an epoch or two, so a finer grain finds the peak
    validate_every_steps: int | None = num(None, gt=0)
    # CPU threads for torch intra-op work. adaptive (default; local training): start at
    # the cores this process may use and follow the load by timing the steps, fewer
    # threads while another process shares the cores (beside a 2-thread process ~0.4x of
    # solo speed where a fixed count falls to 0.1-0.2x; bench/contention.py). It moves
    # only between counts whose gradients on the first batch are bit-identical to the
    # starting count's and validates at the starting count, so a run does not depend on
    # the load; a model whose kernels round differently at another count, or one trained
    # with training.compile, keeps its count (one log line says so). Ray workers keep a
    # fixed count. auto: the cores this process may use (its CPU affinity; Ray workers on
    # one node split them), fixed. An integer: that many, fixed
    threads: int | Literal["auto", "adaptive"] = num("adaptive", gt=0)
    # how OpenMP's threads wait between parallel regions. auto (default): libgomp's own
    # (spin ~300k iterations, then sleep): fastest alone, but beside another 2-thread
    # process it falls to 0.10x of its solo speed. short: spin 3000 iterations, then
    # sleep (GOMP_SPINCOUNT): 0.43x of solo beside that process, 0.75-0.85x alone
    # (threads: adaptive, the default, keeps the solo speed and 0.42x). active: spin without end
    # (an idle process keeps a core busy). passive: sleep at once (never collapses,
    # 0.5x alone). bench/contention.py has the figures. Read when torch loads: the
    # mtrec command sets it in time; a notebook that already imported torch cannot
    # (export GOMP_SPINCOUNT / OMP_WAIT_POLICY before Python starts)
    omp_wait_policy: Literal["auto", "passive", "active", "short"] = "auto"
    # torch.compile the dense task arch for training (Inductor's C++ backend: a one-off
    # compile of 10-80 s; export and evaluation run the eager module). Measured slower
    # than eager on a 2-core CPU (bench/compile.py); dropout masks come from Inductor's
    # own generator, so losses match eager only without dropout
    compile: bool = False
    # dense math of the training forward: fp32, or bf16 autocast (about 2x faster on CPUs
    # with AVX512-BF16 / AMX; embeddings, loss and optimizer state stay fp32)
    precision: Literal["fp32", "bf16"] = "fp32"
    # keep the encoded training split in memory after the first pass (fast epochs);
    # off: stream it from disk every epoch with a bounded shuffle buffer
    cache_in_memory: bool = True
    # stop an epoch after this many batches (0: full epoch); for smoke runs
    max_steps_per_epoch: int = num(0, ge=0)
    # read the loss (and log it) every this many steps
    log_every_steps: int = num(50, gt=0)
    # show a progress bar on stderr
    progress: bool = True


@dataclass
class ExperimentConfig:
    """A whole experiment: data, features, tasks, model and training."""

    dataset: DatasetConfig
    features: list[FeatureConfig]
    tasks: list[TaskConfig]
    # experiment name (shown in reports and `mtrec compare`)
    name: str = "experiment"
    # seed of weight init, shuffling and dropout: same seed + data = same metrics
    seed: int = num(2026, ge=0)
    # column used to group rows for GAUC (e.g. user id)
    group_key: str | None = None
    # modules defining your own blocks (register_block), e.g. [my_blocks]: a name is looked
    # up as my_blocks.py next to the YAML file that lists it, then on sys.path; the run's
    # config.yaml records the resolved file path, so evaluate / export re-import it
    imports: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        # pickled (Ray workers, deepcopy) as its plain dict: rebuilding imports the config's
        # `imports` first, so a user block's settings unpickle in a fresh process too
        from mtrec.config.builder import config_to_dict
        from mtrec.config.loading import rebuild_config

        return (rebuild_config, (config_to_dict(self),))

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def features_of(self, *kinds: str) -> list[FeatureConfig]:
        return [f for f in self.features if f.kind in kinds]
