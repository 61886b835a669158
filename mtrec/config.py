"""Typed experiment configuration loaded from YAML.

An experiment is one YAML file (optionally ``extends:`` a base file) validated
into the dataclasses below. Every error is a :class:`ConfigError` naming the
file, the key path, what was expected and, for typos, the closest valid key.

Example::

    cfg = load_config("configs/census_kdd/mmoe.yaml", overrides=["training.epochs=3"])
    cfg.model.multitask.num_experts  # -> 4
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "ConfigError",
    "DatasetConfig",
    "EmbeddingConfig",
    "ExperimentConfig",
    "FeatureConfig",
    "InteractionConfig",
    "ModelConfig",
    "MultiTaskConfig",
    "TaskConfig",
    "TrainingConfig",
    "config_to_dict",
    "deep_merge",
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """A configuration problem; the message names file, key path and the fix."""


# rows per chunk streamed from disk: bounds loader memory (measured: peak RSS streaming
# 5M rows / 0.5M rows = 1.40 at 131072, 1.5 at 262144)
DEFAULT_CHUNK_ROWS = 131072

FeatureKind = Literal["categorical", "multi_hot", "numeric"]
NumericTransform = Literal["none", "log1p", "standardize", "log1p_standardize"]
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
    # numeric only
    transform: NumericTransform = "standardize"
    # multi_hot only: split string columns on this delimiter (list columns need none)
    delimiter: str | None = None
    # multi_hot only: how the ids of one row combine
    pooling: Literal["sum", "mean"] = "sum"
    # per-feature hash buckets of the baseline embedding (None: model.embedding.buckets)
    buckets: int | None = None
    # values seen fewer times in the training split share one "rare" embedding
    # (None: model.embedding.min_count)
    min_count: int | None = None
    # categorical only: report metrics separately for rows whose id was seen / unseen in
    # training (None: the highest-cardinality features, unless another feature says true)
    slice: bool | None = None

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
    weight: float = 1.0
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
    chunk_rows: int = DEFAULT_CHUNK_ROWS
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
    dim: int = 16
    # default hash buckets per categorical / multi-hot feature
    buckets: int = 100000
    # row-wise Adagrad (FBGEMM fused) on the embedding rows
    learning_rate: float = 0.05
    # row-wise Adagrad epsilon
    eps: float = 1e-8
    # default frequency filter of categorical / multi-hot features: values seen fewer than
    # this many times in the training split map to one shared "rare" id inside the model
    # (0: off). Stops embeddings of rare values from memorising their few labels.
    min_count: int = 0
    # unified only: M, rows of the shared table (None: the sum of the per-feature buckets,
    # rounded up to a multiple of num_tables: the per_feature parameter budget at chunk_dim=dim)
    rows: int | None = None
    # unified only: d_c, the width of one chunk (None: dim)
    chunk_dim: int | None = None
    # unified only: chunks (k) per sparse feature name; unlisted features take 1
    chunks: dict[str, int] = field(default_factory=dict)
    # unified only: physical tables the shared one is split into round-robin (rows % n == 0)
    num_tables: int = 1


@dataclass
class PLEConfig:
    """PLE (CGC stacked ``levels`` times): per level, ``shared_experts`` shared experts and
    ``task_experts`` experts per task; task gates mix own + shared experts, the shared
    gate mixes all experts (not needed on the last level)."""

    # CGC levels stacked
    levels: int = 2
    # shared experts per level
    shared_experts: int = 2
    # experts per task per level
    task_experts: int = 1


@dataclass
class HoMEConfig:
    """HoME (Wang et al. 2024). ``task_groups`` maps a group (meta-category) name to its
    tasks; every task in exactly one group (empty: one group of all tasks). Each fix can
    be switched off for ablation."""

    # group (meta-category) name -> its tasks; empty: one group
    task_groups: dict[str, list[str]] = field(default_factory=dict)
    # shared experts per level
    shared_experts: int = 1
    # experts per group (level 1 and 2)
    group_experts: int = 1
    # experts per task (level 2)
    task_experts: int = 1
    # expert normalisation: Swish(BatchNorm(MLP(v)))
    expert_norm: bool = True
    # two-level hierarchy mask (off: one flat CGC level over all tasks)
    hierarchy: bool = True
    # per-expert LoRA-style feature gate v * 2σ(v B A), rank feature_gate_rank
    feature_gate: bool = True
    # rank l of the feature gates' B A
    feature_gate_rank: int = 8
    # residual self-gate over a node's own experts
    self_gate: bool = True


@dataclass
class APEMConfig:
    """APEM (arXiv 2301.02494) on the last field tokens: field groups → set attention
    with ``inducing_points`` learnable points (``heads`` heads; must divide the token
    width) → SE over fields → per-task pattern selector; each task's r_t then goes through
    a per-task MLP of ``expert_hidden`` widths. ``field_groups`` lists field names per
    group; fields listed in no group form one extra group (empty: one group of all
    fields)."""

    # field names per group; unlisted fields form one more group
    field_groups: list[list[str]] = field(default_factory=list)
    # m, learnable inducing points of each group's set attention
    inducing_points: int = 4
    # attention heads of the set attention (divide the token width)
    heads: int = 2
    # squeeze-and-excitation bottleneck: F / se_reduction
    se_reduction: int = 4
    # hidden width of the pattern selector's sample-adaptive MLP
    selector_hidden: int = 32


@dataclass
class TaskExpertConfig:
    """TaskExpert (Ye & Xu 2023) over field tokens: ``num_experts`` experts per layer,
    per-task per-token gates over experts + the task's feature memory. With AutoInt there
    is one layer per interacting layer (reading its output) and ``layers`` is ignored;
    without, ``layers`` layers each read the field tokens. Each task's head is a per-task
    MLP of ``expert_hidden`` widths on its flattened final memory."""

    # expert layers without AutoInt (with it: one per AutoInt layer)
    layers: int = 2
    # n, experts per layer
    num_experts: int = 4
    # width of every expert and of the memory (0: the width of the last tokens read)
    expert_dim: int = 0
    # memory write: replace (M_t^l = F_t^l) or residual (M_t^l = M_t^{l-1} + F_t^l)
    memory: Literal["replace", "residual"] = "replace"


@dataclass
class MultiTaskConfig:
    """Multi-task block and task towers. ``type`` picks the block; its own settings live
    under the key of the same name (``ple``, ``home``, ``apem``, ``task_expert``).
    ``num_experts`` / ``expert_hidden`` / ``activation`` / ``dropout`` are shared by every
    expert-based block. ``chain`` (ESMM): task names in funnel order, e.g.
    ``[click, purchase]``; each later task predicts the joint probability
    p(click ∧ purchase) = p(click) · p(purchase | click) and is trained on the joint label."""

    # the multi-task block
    type: Literal["mmoe", "shared_bottom", "ple", "home", "apem", "task_expert"] = "mmoe"
    # experts of MMoE (PLE/HoME/TaskExpert have their own counts)
    num_experts: int = 4
    # expert MLP widths; the last is the task representation size
    expert_hidden: list[int] = field(default_factory=lambda: [128, 64])
    # hidden widths of each task's tower (ends in one logit)
    tower_hidden: list[int] = field(default_factory=lambda: [64])
    # activation of experts and towers (HoME's normalised experts use Swish)
    activation: Literal["relu", "silu", "gelu"] = "relu"
    # dropout after expert and tower layers
    dropout: float = 0.0
    # ESMM funnel: task names in order; later tasks predict joint probabilities
    chain: list[str] = field(default_factory=list)
    ple: PLEConfig = field(default_factory=PLEConfig)
    home: HoMEConfig = field(default_factory=HoMEConfig)
    apem: APEMConfig = field(default_factory=APEMConfig)
    task_expert: TaskExpertConfig = field(default_factory=TaskExpertConfig)


@dataclass
class HeadsRoutingConfig:
    """MoH (arXiv 2410.11842): ``shared`` heads always on; a per-token router picks
    ``top_k`` of the remaining heads; ``balance_weight`` β of the load-balance loss."""

    # h_s heads always on
    shared: int = 1
    # routed heads each token picks
    top_k: int = 1
    # β of the load-balance auxiliary loss
    balance_weight: float = 0.01


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
    layers: int = 3
    # A, output width per field (all heads)
    attention_dim: int = 32
    # attention heads (divide attention_dim)
    heads: int = 2
    # add the W_res residual projection
    residual: bool = True
    # LayerNorm on the residual sum, before the ReLU
    layer_norm: bool = False
    # dropout on attention weights
    dropout: float = 0.0
    # AutoInt+: widths of the parallel MLP on the flattened tokens (empty: off)
    dnn: list[int] = field(default_factory=list)
    # Mixture-of-Head routing (MoH); None: every head always on
    heads_routing: HeadsRoutingConfig | None = None


@dataclass
class ModelConfig:
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    multitask: MultiTaskConfig = field(default_factory=MultiTaskConfig)
    interaction: InteractionConfig = field(default_factory=InteractionConfig)


@dataclass
class TrainingConfig:
    # rows per training step (global over Ray workers)
    batch_size: int = 1024
    # rows per batch when scoring
    eval_batch_size: int = 8192
    # maximum epochs
    epochs: int = 10
    # Adam learning rate of the dense parameters
    learning_rate: float = 1e-3
    # Adam weight decay of the dense parameters
    weight_decay: float = 0.0
    # stop after this many epochs without a better mean validation AUC (0: never)
    early_stopping_patience: int = 2
    # CPU threads for torch intra-op work
    threads: int = 2
    # dense math of the training forward: fp32, or bf16 autocast (about 2x faster on CPUs
    # with AVX512-BF16 / AMX; embeddings, loss and optimizer state stay fp32)
    precision: Literal["fp32", "bf16"] = "fp32"
    # keep the encoded training split in memory after the first pass (fast epochs);
    # off: stream it from disk every epoch with a bounded shuffle buffer
    cache_in_memory: bool = True
    # stop an epoch after this many batches (0: full epoch); for smoke runs
    max_steps_per_epoch: int = 0
    # read the loss (and log it) every this many steps
    log_every_steps: int = 50
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
    seed: int = 2026
    # column used to group rows for GAUC (e.g. user id)
    group_key: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def features_of(self, *kinds: str) -> list[FeatureConfig]:
        return [f for f in self.features if f.kind in kinds]


# --------------------------------------------------------------------------- loading

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PATH_KEYS = ("train", "valid", "test")


def _default_data_dir() -> str:
    # ../shared/data relative to the repository root (where this package lives)
    return str(Path(__file__).resolve().parent.parent.parent / "shared" / "data")


def _expand(value: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "MTREC_DATA_DIR":
            return os.environ.get(name, _default_data_dir())
        if name == "MTREC_SYNTH_DIR":
            # where `make demo` writes its planted data (configs/synthetic/*.yaml extend it)
            return os.environ.get(name, str(Path("demo_out/data").resolve()))
        if name not in os.environ:
            raise KeyError(name)
        return os.environ[name]

    return _ENV_PATTERN.sub(repl, value)


def _read_yaml(path: Path, where: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping of experiment keys")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` (mappings recursively; other values replace)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_dataset_paths(raw: dict[str, Any], base_dir: Path, path: Path) -> None:
    ds = raw.get("dataset")
    if not isinstance(ds, dict):
        return
    for key in _PATH_KEYS:
        value = ds.get(key)
        if isinstance(value, str) and value:
            try:
                expanded = _expand(value)
            except KeyError as exc:
                raise ConfigError(
                    f"{path}: dataset.{key}: environment variable {exc.args[0]} is not set"
                ) from None
            p = Path(expanded)
            ds[key] = str(p if p.is_absolute() else (base_dir / p).resolve())


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: extends: circular chain {cycle}")
    where = str(chain[-1]) if chain else "config"
    raw = _read_yaml(path, where)
    _resolve_dataset_paths(raw, path.parent, path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(
            f"{path}: extends: expected a file path (str), got {type(parent).__name__}"
        )
    try:
        parent_path = Path(_expand(parent))
    except KeyError as exc:
        raise ConfigError(
            f"{path}: extends: environment variable {exc.args[0]} is not set"
        ) from None
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    if not parent_path.exists():
        hint = ""
        if "MTREC_SYNTH_DIR" in parent:
            hint = (
                "; run `make demo` (or `mtrec data synth --out DIR` and set MTREC_SYNTH_DIR=DIR)"
                " to create the synthetic data first"
            )
        raise ConfigError(f"{path}: extends: base file {parent_path} does not exist{hint}")
    return deep_merge(_load_raw(parent_path, (*chain, path)), raw)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key.path=value")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"--set {override!r}: {'.'.join(parts[: i + 1])} is not a mapping, cannot set {key}"
            )
        node = child
    if len(parts) == 2 and parts[0] == "dataset" and parts[1] in _PATH_KEYS:
        if isinstance(value, str) and value:
            # a path given on the command line is relative to where the command runs
            try:
                value = str(Path(_expand(value)).resolve())
            except KeyError as exc:
                raise ConfigError(
                    f"--set {override!r}: environment variable {exc.args[0]} is not set"
                ) from None
    node[parts[-1]] = value


def load_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load, merge (``extends:``), override (``key.path=value``) and validate a YAML experiment."""
    path = Path(path)
    raw = _load_raw(path)
    for item in overrides or []:
        _apply_override(raw, item)
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    cfg = _build(ExperimentConfig, raw, source, "")
    _check_semantics(cfg, source)
    return cfg


# ----------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _fail(source: str, key: str, tp: Any, value: Any) -> ConfigError:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return ConfigError(f"{source}: {key or '<top>'}: expected {_type_name(tp)}, got {shown}")


def _build(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(source, key, tp, value)
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        kwargs: dict[str, Any] = {}
        for name, item in value.items():
            sub = f"{key}.{name}" if key else str(name)
            if name not in fields:
                close = difflib.get_close_matches(str(name), list(fields), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                valid = ", ".join(fields)
                raise ConfigError(f"{source}: {sub}: unknown key{hint} (valid keys: {valid})")
            kwargs[name] = _build(hints[name], item, source, sub)
        for name, f in fields.items():
            missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if missing and name not in kwargs:
                sub = f"{key}.{name}" if key else name
                raise ConfigError(
                    f"{source}: {sub}: required key is missing (expected {_type_name(hints[name])})"
                )
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        concrete = [a for a in args if a is not type(None)]
        if len(concrete) == 1:
            # one real type (X | None): its own error is the precise one
            return _build(concrete[0], value, source, key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _build(arg, value, source, key)
            except ConfigError:
                continue
        raise _fail(source, key, tp, value)
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(
                str(value), [str(a) for a in typing.get_args(tp)], n=1
            )
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _fail(source, key, tp, value)
        (item_tp,) = typing.get_args(tp)
        return [_build(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, key, tp, value)
        k_tp, v_tp = typing.get_args(tp)
        return {
            _build(k_tp, k, source, f"{key}.{k}"): _build(v_tp, v, source, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(source, key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(source, key, tp, value)
        return value
    raise ConfigError(f"{source}: {key}: unsupported schema type {tp!r}")  # pragma: no cover


def _positive(source: str, key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{source}: {key}: must be > 0, got {value}")


def _check_semantics(cfg: ExperimentConfig, source: str) -> None:
    if not cfg.dataset.train:
        raise ConfigError(
            f"{source}: dataset.train: required key is missing (expected a file path)"
        )
    if not cfg.features:
        raise ConfigError(f"{source}: features: at least one feature is required")
    if not cfg.tasks:
        raise ConfigError(f"{source}: tasks: at least one task is required")
    seen: set[str] = set()
    for i, f in enumerate(cfg.features):
        if f.name in seen:
            raise ConfigError(f"{source}: features[{i}].name: duplicate feature name {f.name!r}")
        seen.add(f.name)
        if f.buckets is not None:
            _positive(source, f"features[{i}].buckets", f.buckets)
        if f.min_count is not None:
            if f.kind == "numeric":
                raise ConfigError(
                    f"{source}: features[{i}].min_count: only categorical and multi_hot "
                    "features take a min_count"
                )
            if f.min_count < 0:
                raise ConfigError(f"{source}: features[{i}].min_count: must be >= 0")
        if f.slice and f.kind != "categorical":
            raise ConfigError(
                f"{source}: features[{i}].slice: only categorical features can be sliced "
                "by seen / unseen id"
            )
        if f.kind != "multi_hot" and f.delimiter is not None:
            raise ConfigError(
                f"{source}: features[{i}].delimiter: only multi_hot features take a delimiter"
            )
    task_seen: set[str] = set()
    for i, t in enumerate(cfg.tasks):
        if t.name in task_seen:
            raise ConfigError(f"{source}: tasks[{i}].name: duplicate task name {t.name!r}")
        task_seen.add(t.name)
        if t.weight < 0:
            raise ConfigError(f"{source}: tasks[{i}].weight: must be >= 0, got {t.weight}")
    tr, emb, mt = cfg.training, cfg.model.embedding, cfg.model.multitask
    for key, value in (
        ("training.batch_size", tr.batch_size),
        ("training.eval_batch_size", tr.eval_batch_size),
        ("training.epochs", tr.epochs),
        ("training.learning_rate", tr.learning_rate),
        ("training.threads", tr.threads),
        ("model.embedding.dim", emb.dim),
        ("model.embedding.buckets", emb.buckets),
        ("model.embedding.learning_rate", emb.learning_rate),
        ("model.multitask.num_experts", mt.num_experts),
        ("dataset.chunk_rows", cfg.dataset.chunk_rows),
    ):
        _positive(source, key, value)
    if emb.min_count < 0:
        raise ConfigError(f"{source}: model.embedding.min_count: must be >= 0, got {emb.min_count}")
    _check_unified(cfg, source)
    if not 0.0 <= mt.dropout < 1.0:
        raise ConfigError(f"{source}: model.multitask.dropout: must be in [0, 1), got {mt.dropout}")
    if not mt.expert_hidden:
        raise ConfigError(
            f"{source}: model.multitask.expert_hidden: at least one layer is required"
        )
    for i, h in enumerate(mt.expert_hidden):
        _positive(source, f"model.multitask.expert_hidden[{i}]", h)
    for i, h in enumerate(mt.tower_hidden):
        _positive(source, f"model.multitask.tower_hidden[{i}]", h)
    _check_interaction(cfg, source)
    _check_multitask(cfg, source)


def _check_names(source: str, key: str, names: list[str], known: list[str], what: str) -> None:
    for i, name in enumerate(names):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{source}: {key}[{i}]: unknown {what} {name!r}{hint} (known: {', '.join(known)})"
            )


def _check_multitask(cfg: ExperimentConfig, source: str) -> None:
    mt = cfg.model.multitask
    tasks = [t.name for t in cfg.tasks]
    fields = [f.name for f in cfg.features]
    if mt.chain:
        if len(mt.chain) < 2 or len(set(mt.chain)) != len(mt.chain):
            raise ConfigError(
                f"{source}: model.multitask.chain: expected two or more distinct task names "
                f"in funnel order (e.g. [click, purchase]), got {mt.chain}"
            )
        _check_names(source, "model.multitask.chain", mt.chain, tasks, "task")
    ple, home, apem, tex = mt.ple, mt.home, mt.apem, mt.task_expert
    for key, value in (
        ("ple.levels", ple.levels),
        ("ple.task_experts", ple.task_experts),
        ("home.feature_gate_rank", home.feature_gate_rank),
        ("apem.inducing_points", apem.inducing_points),
        ("apem.heads", apem.heads),
        ("apem.se_reduction", apem.se_reduction),
        ("apem.selector_hidden", apem.selector_hidden),
        ("task_expert.layers", tex.layers),
        ("task_expert.num_experts", tex.num_experts),
    ):
        _positive(source, f"model.multitask.{key}", value)
    if tex.expert_dim < 0:
        raise ConfigError(
            f"{source}: model.multitask.task_expert.expert_dim: must be >= 0 (0: the token "
            f"width), got {tex.expert_dim}"
        )
    if mt.type == "apem":
        ia = cfg.model.interaction
        width = ia.attention_dim if ia.type == "autoint" else cfg.model.embedding.dim
        if width % apem.heads:
            raise ConfigError(
                f"{source}: model.multitask.apem.heads: {apem.heads} heads must divide the "
                f"token width {width} (model.embedding.dim, or model.interaction.attention_dim "
                "with AutoInt); pick a divisor"
            )
    for key, value in (
        ("ple.shared_experts", ple.shared_experts),
        ("home.shared_experts", home.shared_experts),
        ("home.group_experts", home.group_experts),
        ("home.task_experts", home.task_experts),
    ):
        if value < 0:
            raise ConfigError(f"{source}: model.multitask.{key}: must be >= 0, got {value}")
    # HoME: every gate needs an expert (level-1 group gates with the hierarchy, task gates
    # without it)
    own_key = "group_experts" if home.hierarchy else "task_experts"
    if mt.type == "home" and home.shared_experts + getattr(home, own_key) < 1:
        raise ConfigError(
            f"{source}: model.multitask.home: shared_experts + {own_key} must be >= 1 "
            f"(hierarchy: {str(home.hierarchy).lower()}); raise one of them"
        )
    # a block's own settings are checked only when it is the block in use, so one config can
    # switch model.multitask.type by override (and drop tasks) without editing them
    if mt.type == "home" and home.task_groups:
        owner: dict[str, str] = {}
        for group, members in home.task_groups.items():
            key = f"model.multitask.home.task_groups.{group}"
            if not members:
                raise ConfigError(f"{source}: {key}: a group needs at least one task")
            _check_names(source, key, members, tasks, "task")
            for name in members:
                if name in owner:
                    raise ConfigError(
                        f"{source}: {key}: task {name!r} is already in group {owner[name]!r}; "
                        "every task belongs to exactly one group"
                    )
                owner[name] = group
        left = [t for t in tasks if t not in owner]
        if left:
            raise ConfigError(
                f"{source}: model.multitask.home.task_groups: tasks {left} are in no group; "
                "add them to a group"
            )
    seen_fields: set[str] = set()
    for g, members in enumerate(apem.field_groups if mt.type == "apem" else []):
        key = f"model.multitask.apem.field_groups[{g}]"
        if not members:
            raise ConfigError(f"{source}: {key}: a group needs at least one field")
        _check_names(source, key, members, fields, "feature")
        dup = seen_fields.intersection(members)
        if dup:
            raise ConfigError(f"{source}: {key}: fields {sorted(dup)} are in two groups")
        seen_fields.update(members)


def _check_interaction(cfg: ExperimentConfig, source: str) -> None:
    ia = cfg.model.interaction
    for key in ("layers", "attention_dim", "heads"):
        _positive(source, f"model.interaction.{key}", getattr(ia, key))
    if ia.attention_dim % ia.heads:
        raise ConfigError(
            f"{source}: model.interaction.attention_dim: must be divisible by "
            f"model.interaction.heads ({ia.heads}), got {ia.attention_dim}"
        )
    if not 0.0 <= ia.dropout < 1.0:
        raise ConfigError(
            f"{source}: model.interaction.dropout: must be in [0, 1), got {ia.dropout}"
        )
    for i, h in enumerate(ia.dnn):
        _positive(source, f"model.interaction.dnn[{i}]", h)
    moh = ia.heads_routing
    if moh is not None:
        key = "model.interaction.heads_routing"
        if moh.shared < 0 or moh.top_k <= 0 or moh.shared + moh.top_k > ia.heads:
            raise ConfigError(
                f"{source}: {key}: needs shared >= 0, top_k >= 1 and shared + top_k <= "
                f"model.interaction.heads ({ia.heads}), got shared={moh.shared}, "
                f"top_k={moh.top_k}"
            )
        if moh.shared + moh.top_k == ia.heads:
            raise ConfigError(
                f"{source}: {key}: shared + top_k == heads ({ia.heads}) routes nothing; "
                "raise model.interaction.heads or lower top_k"
            )
        if moh.balance_weight < 0:
            raise ConfigError(f"{source}: {key}.balance_weight: must be >= 0")


def _check_unified(cfg: ExperimentConfig, source: str) -> None:
    emb = cfg.model.embedding
    if emb.rows is not None:
        _positive(source, "model.embedding.rows", emb.rows)
    if emb.chunk_dim is not None:
        _positive(source, "model.embedding.chunk_dim", emb.chunk_dim)
    _positive(source, "model.embedding.num_tables", emb.num_tables)
    if emb.rows is not None and emb.rows % emb.num_tables:
        raise ConfigError(
            f"{source}: model.embedding.rows: must be a multiple of model.embedding.num_tables "
            f"({emb.num_tables}), got {emb.rows}"
        )
    kinds = {f.name: f.kind for f in cfg.features}
    sparse = [f.name for f in cfg.features if f.kind != "numeric"]
    for name, k in emb.chunks.items():
        key = f"model.embedding.chunks.{name}"
        if name not in kinds:
            close = difflib.get_close_matches(str(name), sparse, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{source}: {key}: unknown feature{hint} (sparse features: {', '.join(sparse)})"
            )
        if kinds[name] == "numeric":
            raise ConfigError(
                f"{source}: {key}: {name!r} is numeric; only categorical and multi_hot "
                "features take chunks"
            )
        if k <= 0:
            raise ConfigError(f"{source}: {key}: must be > 0, got {k}")


def config_to_dict(cfg: ExperimentConfig, drop_defaults: bool = False) -> dict[str, Any]:
    """Plain dict (YAML-safe) of a validated config; ``parse_config`` round-trips it.

    ``drop_defaults`` leaves out every key whose value is its schema default: what
    stays is what the experiment actually chose, so a later mtrec that adds keys with
    defaults describes an older experiment by the same dict.
    """
    if not drop_defaults:
        return dataclasses.asdict(cfg)
    return _non_default(cfg)  # type: ignore[no-any-return]


def _non_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
                continue
            out[f.name] = _non_default(value)
        return out
    if isinstance(obj, list):
        return [_non_default(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _non_default(v) for k, v in obj.items()}
    return obj
