"""Semantic checks of a typed config: ranges, cross-key rules and the selected block's own.

Ranges are declared on the schema fields (:func:`mtrec.config.schema.num`) and checked by
one walker, :func:`check_bounds`, for every section including a block's settings; the
rest are rules that span keys (names that must exist, divisibility, ...). A block's own
rules live on its config dataclass (``check(cfg)``) and run only when it is selected, so
one config can switch ``model.multitask.type`` by override without editing the others.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable
from typing import Any

from mtrec.config.errors import ConfigError
from mtrec.config.schema import Bounds, ExperimentConfig

__all__ = ["check_bounds", "check_config", "check_deep_fields", "check_names"]


def check_bounds(obj: Any, source: str, key: str = "") -> None:
    """Every number in ``obj`` (a config dataclass, walked recursively) is finite and in
    the range its field declares; the error names the key path and the range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "sections" in f.metadata:  # block settings: model.multitask.<name>
            for name, section in value.items():
                check_bounds(section, source, f"{key}.{name}" if key else name)
            continue
        sub = f"{key}.{f.name}" if key else f.name
        _check_value(value, f.metadata.get("bounds"), source, sub)


def _check_value(value: Any, bounds: Bounds | None, source: str, key: str) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        check_bounds(value, source, key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, bounds, source, f"{key}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_value(item, bounds, source, f"{key}.{name}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        expected = str(bounds) if bounds is not None else "any finite number"
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key}: must be a finite number ({expected}), got {value}")
        if bounds is not None and not bounds.contains(value):
            raise ConfigError(f"{source}: {key}: must be {expected}, got {value}")


def check_names(source: str, key: str, names: list[str], known: list[str], what: str) -> None:
    """Each of ``names`` (the list at ``key``) is one of ``known``."""
    for i, name in enumerate(names):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{source}: {key}[{i}]: unknown {what} {name!r}{hint} (known: {', '.join(known)})"
            )


def check_deep_fields(cfg: ExperimentConfig, key: str, names: Iterable[str]) -> None:
    """``key`` names features as fields of the deep model: none may be wide-only
    (``deep: false``, fed only to the linear term)."""
    wide = {f.name for f in cfg.features if not f.deep}
    for name in names:
        if name in wide:
            raise ConfigError(
                f"{key}: {name!r} has deep: false, so it is no field of the deep model; "
                "drop it here or set its deep: true"
            )


def check_config(cfg: ExperimentConfig, source: str) -> None:
    """All checks of a built config; the first problem raises a :class:`ConfigError`."""
    if not cfg.dataset.train:
        raise ConfigError(
            f"{source}: dataset.train: required key is missing (expected a file path)"
        )
    if not cfg.features:
        raise ConfigError(f"{source}: features: at least one feature is required")
    if not cfg.tasks:
        raise ConfigError(f"{source}: tasks: at least one task is required")
    check_bounds(cfg, source)
    seen: set[str] = set()
    for i, f in enumerate(cfg.features):
        if f.name in seen:
            raise ConfigError(f"{source}: features[{i}].name: duplicate feature name {f.name!r}")
        seen.add(f.name)
        if f.min_count is not None and f.kind == "numeric":
            raise ConfigError(
                f"{source}: features[{i}].min_count: only categorical and multi_hot "
                "features take a min_count"
            )
        if f.slice and f.kind != "categorical":
            raise ConfigError(
                f"{source}: features[{i}].slice: only categorical features can be sliced "
                "by seen / unseen id"
            )
        if not f.deep and f.kind == "numeric":
            raise ConfigError(
                f"{source}: features[{i}].deep: only categorical and multi_hot features can "
                "be wide-only (deep: false); a numeric feature feeds both parts"
            )
        if not f.deep and not cfg.model.linear.enabled:
            raise ConfigError(
                f"{source}: features[{i}].deep: false feeds {f.name!r} to the linear term "
                "only, which is off; set model.linear.enabled: true or drop deep: false"
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
    _check_unified(cfg, source)
    if not cfg.model.multitask.expert_hidden:
        raise ConfigError(
            f"{source}: model.multitask.expert_hidden: at least one layer is required"
        )
    _check_interaction(cfg, source)
    _check_multitask(cfg, source)
    if cfg.model.deep and not any(f.deep for f in cfg.features):
        raise ConfigError(
            f"{source}: features: every feature has deep: false, so the deep model reads "
            "nothing; keep deep: true on at least one feature, or set model.deep: false "
            "(the linear model alone)"
        )
    if not cfg.model.deep and not cfg.model.linear.enabled:
        raise ConfigError(
            f"{source}: model.deep: false leaves no model; set model.linear.enabled: true "
            "(or use `mtrec baseline`, which sets both)"
        )


def _check_multitask(cfg: ExperimentConfig, source: str) -> None:
    mt = cfg.model.multitask
    if mt.chain:
        if len(mt.chain) < 2 or len(set(mt.chain)) != len(mt.chain):
            raise ConfigError(
                f"{source}: model.multitask.chain: expected two or more distinct task names "
                f"in funnel order (e.g. [click, purchase]), got {mt.chain}"
            )
        check_names(source, "model.multitask.chain", mt.chain, cfg.task_names, "task")
    # the selected block's own rules (its settings exist from here on, defaults or not)
    block = mt.block
    check = getattr(block, "check", None)
    if check is not None:
        try:
            check(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def _check_interaction(cfg: ExperimentConfig, source: str) -> None:
    ia = cfg.model.interaction
    if ia.attention_dim % ia.heads:
        raise ConfigError(
            f"{source}: model.interaction.attention_dim: must be divisible by "
            f"model.interaction.heads ({ia.heads}), got {ia.attention_dim}"
        )
    moh = ia.heads_routing
    if moh is not None:
        key = "model.interaction.heads_routing"
        if moh.shared + moh.top_k > ia.heads:
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


def _check_unified(cfg: ExperimentConfig, source: str) -> None:
    emb = cfg.model.embedding
    if emb.rows is not None and emb.rows % emb.num_tables:
        raise ConfigError(
            f"{source}: model.embedding.rows: must be a multiple of model.embedding.num_tables "
            f"({emb.num_tables}), got {emb.rows}"
        )
    kinds = {f.name: f.kind for f in cfg.features}
    sparse = [f.name for f in cfg.features if f.kind != "numeric"]
    for name in emb.chunks:
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
        check_deep_fields(cfg, f"{source}: {key}", [name])
