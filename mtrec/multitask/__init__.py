"""Multi-task blocks: one interface, ``forward(x) -> list of T task representations``."""

from mtrec.multitask.mmoe import MMoE, SharedBottom
from mtrec.multitask.towers import TaskTowers

__all__ = ["MMoE", "SharedBottom", "TaskTowers"]
