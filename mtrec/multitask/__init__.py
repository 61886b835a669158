"""Multi-task blocks: one interface, ``forward(v, tokens, aux) -> list of T task
representations``; each block registers itself by name (:func:`register_block`)."""

from mtrec.multitask.base import BlockInputs
from mtrec.multitask.registry import (
    block_names,
    block_spec,
    build_block,
    register_block,
    registered_blocks,
)

__all__ = [
    "BlockInputs",
    "MMoE",
    "SharedBottom",
    "TaskTowers",
    "block_names",
    "block_spec",
    "build_block",
    "register_block",
    "registered_blocks",
]


def __getattr__(name: str) -> object:
    # the block classes load lazily: importing the registry must not import every block
    if name in ("MMoE", "SharedBottom"):
        from mtrec.multitask import mmoe

        return getattr(mmoe, name)
    if name == "TaskTowers":
        from mtrec.multitask.towers import TaskTowers

        return TaskTowers
    raise AttributeError(f"module 'mtrec.multitask' has no attribute {name!r}")
