"""Building blocks shared by every part of the model (no mtrec imports: anything may use them)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FastDropout", "GroupedLinear", "activate_", "activation"]


def activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; expected relu, silu or gelu")


def activate_(x: torch.Tensor, name: str) -> torch.Tensor:
    """``activation(name)(x)`` written into ``x`` where torch has an in-place kernel (same
    values): for inference on a fresh tensor, saving a tensor of its size. Not for
    autograd."""
    if name == "relu":
        return x.relu_()
    if name == "silu":
        return nn.functional.silu(x, inplace=True)
    return nn.functional.gelu(x)


class FastDropout(nn.Module):
    """Inverted dropout (as ``nn.Dropout``): keep each element with probability 1 - p,
    scale kept ones by 1 / (1 - p); identity in eval mode.

    Draws the mask as ``rand < 1 - p`` instead of ``bernoulli_``: the same distribution,
    but about 2.5x cheaper forward + backward on CPU, where ``bernoulli_`` was a fifth
    of an MMoE training step at p = 0.2.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.scale = 1.0 / (1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x) >= self.p
        return x * keep.to(x.dtype).mul_(self.scale)


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
