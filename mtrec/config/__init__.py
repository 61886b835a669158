"""Typed experiment configuration loaded from YAML.

An experiment is one YAML file (optionally ``extends:`` a base file) validated into the
dataclasses of :mod:`mtrec.config.schema`. Every error is a :class:`ConfigError` naming
the file, the key path, what was expected and, for typos, the closest valid key.

The package, by concern: ``schema`` (the dataclasses and their ranges), ``loading``
(YAML, ``extends:``, ``--set``, ``imports:``), ``builder`` (dict ↔ typed config),
``checks`` (ranges and cross-key rules), ``diff`` (which keys two configs differ in).

Example::

    cfg = load_config("configs/census_kdd/mmoe.yaml", overrides=["training.epochs=3"])
    cfg.model.multitask.num_experts  # -> 4
"""

from mtrec.config.builder import config_to_dict
from mtrec.config.checks import check_bounds
from mtrec.config.diff import diff_configs
from mtrec.config.errors import ConfigError
from mtrec.config.loading import deep_merge, load_config, parse_config
from mtrec.config.schema import (
    DEFAULT_CHUNK_ROWS,
    DatasetConfig,
    EmbeddingConfig,
    ExperimentConfig,
    FeatureConfig,
    HeadsRoutingConfig,
    InteractionConfig,
    LinearConfig,
    ModelConfig,
    MultiTaskConfig,
    TaskConfig,
    TrainingConfig,
    bounds,
    num,
)

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "ConfigError",
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
    "check_bounds",
    "config_to_dict",
    "deep_merge",
    "diff_configs",
    "load_config",
    "num",
    "parse_config",
]


def __getattr__(name: str) -> type:
    # a block's settings class (PLEConfig, HoMEConfig, ...) lives in the block's module;
    # found here by class name for code written against the single-file config module
    from mtrec.multitask.registry import registered_blocks

    for spec in registered_blocks().values():
        if spec.config is not None and spec.config.__name__ == name:
            return spec.config
    raise AttributeError(f"module 'mtrec.config' has no attribute {name!r}")
