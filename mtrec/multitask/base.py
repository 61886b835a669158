"""What every multi-task block is built from, and how blocks are looked up by name."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BlockInputs"]


@dataclass(frozen=True)
class BlockInputs:
    """What a multi-task block is built for.

    Every block's ``forward(v, tokens, aux)`` takes ``v`` (B x ``in_features``, the
    flattened interaction output or flattened field tokens), ``tokens`` (a list of
    B x F x ``token_dims[l]`` tensors: the field tokens X⁰, then each interaction layer's
    output X¹..X^L; ``tokens[-1]`` is the last) and ``aux`` (a dict a block may add
    already-weighted auxiliary losses to), and returns T tensors of B x ``out_features``
    (an attribute of the block).
    """

    in_features: int
    task_names: list[str]
    field_names: list[str]
    token_dims: list[int]

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_fields(self) -> int:
        return len(self.field_names)
