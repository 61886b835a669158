"""Building blocks shared by the multi-task blocks."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GroupedLinear", "activation"]


def activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; expected relu, silu or gelu")


class GroupedLinear(nn.Module):
    """G independent linear layers applied as one batched matmul.

    Shapes: G x B x in → G x B x out. Initialised like ``nn.Linear`` per group.
    Running G experts (or towers) this way is one GEMM call instead of G.
    """

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(groups, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)
