"""The multi-task block registry: ``model.multitask.type`` name → builder and settings.

A block registers itself where it is defined, so adding one touches only its own file::

    @dataclass
    class TinyConfig:
        # hidden width
        hidden: int = num(32, gt=0)

    @register_block("tiny", config=TinyConfig)
    class Tiny(nn.Module):
        def __init__(self, inputs: BlockInputs, cfg: MultiTaskConfig) -> None:
            ...  # own settings: cfg.block (== cfg.tiny); shared ones: cfg.expert_hidden, ...
            self.out_features = ...

        def forward(self, v, tokens, aux) -> list[torch.Tensor]: ...  # T x (B x out_features)

The YAML then selects it with ``model.multitask: {type: tiny, tiny: {hidden: 48}}``. The
config dataclass (optional) is the schema of ``model.multitask.<name>``: the typed
builder, the bounds walker and the configuration reference read it from here. If it has
a method ``check(self, cfg: ExperimentConfig) -> None``, that runs when the block is the
one selected and raises ``ConfigError("model.multitask.<name>.<key>: ...")``.

Built-in blocks are the modules of :mod:`mtrec.multitask`, imported on first lookup; a
user's blocks come from the modules listed under the top-level ``imports:`` key.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from mtrec.multitask.base import BlockInputs

__all__ = [
    "BlockSpec",
    "block_names",
    "block_spec",
    "build_block",
    "register_block",
    "registered_blocks",
]

BlockBuilder = Callable[[BlockInputs, Any], nn.Module]
B = TypeVar("B", bound=Callable[..., Any])


@dataclass(frozen=True)
class BlockSpec:
    """One registered block: ``build(inputs, multitask_cfg)`` (a class or a function) and
    the dataclass of its own settings (``None``: it has none)."""

    name: str
    build: BlockBuilder
    config: type | None

    @property
    def origin(self) -> str:
        return f"{self.build.__module__}.{self.build.__qualname__}"


_BLOCKS: dict[str, BlockSpec] = {}
_builtins_loaded = False


def register_block(name: str, *, config: type | None = None) -> Callable[[B], B]:
    """Decorator registering a block class (or builder function) under ``name``.

    ``config``: the dataclass of ``model.multitask.<name>``. Registering the same name
    again from the same class (a module imported twice) replaces the entry; from another
    class it is an error.
    """
    if not name.isidentifier():
        raise ValueError(f"block name {name!r} must be an identifier (it is a YAML key)")
    if config is not None and not dataclasses.is_dataclass(config):
        raise TypeError(f"block {name!r}: config must be a dataclass, got {config!r}")

    def decorate(build: B) -> B:
        spec = BlockSpec(name, build, config)
        old = _BLOCKS.get(name)
        if old is not None and old.origin != spec.origin:
            raise ValueError(
                f"block {name!r} is already registered by {old.origin}; "
                f"{spec.origin} needs another name"
            )
        _BLOCKS[name] = spec
        return build

    return decorate


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    package = importlib.import_module("mtrec.multitask")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"mtrec.multitask.{info.name}")


def registered_blocks() -> dict[str, BlockSpec]:
    """Every registered block by name: built-ins sorted by name (whatever order their
    modules were imported in), then user blocks in registration order."""
    _load_builtins()
    builtin = sorted(n for n, s in _BLOCKS.items() if s.build.__module__.startswith("mtrec."))
    return {n: _BLOCKS[n] for n in [*builtin, *(n for n in _BLOCKS if n not in builtin)]}


def block_names() -> list[str]:
    return list(registered_blocks())


def block_spec(name: str) -> BlockSpec:
    blocks = registered_blocks()
    if name not in blocks:
        raise KeyError(
            f"unknown multi-task block {name!r} (registered: {', '.join(blocks)}); "
            "a block from your own file needs its module under the top-level `imports:` key"
        )
    return blocks[name]


def build_block(inputs: BlockInputs, cfg: Any) -> nn.Module:
    """The block ``cfg.type`` (a ``MultiTaskConfig``) built for ``inputs``."""
    return block_spec(cfg.type).build(inputs, cfg)
