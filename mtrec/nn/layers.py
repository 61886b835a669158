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

    The mask costs a quarter of one random draw per element: every draw of torch's
    generator gives 63 random bits (``int64.random_()``), read as four 15-bit numbers r,
    and an element is kept when ``r >= round(p · 2^15)``. So p is rounded to a multiple of
    2^-15 (0.2 → 0.20001; a p > 0 must round to 1..32767 steps, about 2e-5 ≤ p ≤ 1 - 2e-5)
    and the scale is the exact 1 / (1 - p) of that rounded p: in float32 the output stays
    unbiased (under bf16 autocast the scale rounds to bf16). Measured (CPU, 2 threads, a
    4 x 1024 x 128 activation, forward + backward): 0.8 ms against 1.6 ms for
    ``rand < 1 - p`` (one float draw per element), itself about 2.5x cheaper than
    ``bernoulli_``. A TorchScript-compiled module in training mode (exports are in eval
    mode, where dropout is off) has no dtype views and draws one float per element, with
    the same rounded p.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        # drop when the 15-bit number is below this; p rounded to a multiple of 2^-15
        self.low_bits = (1 << 15) - 1
        self.threshold = round(p * (1 << 15))
        if p > 0.0 and not 0 < self.threshold < (1 << 15):
            raise ValueError(
                f"dropout probability {p} rounds to {self.threshold}/32768: use 0, or a p "
                "between about 2e-5 and 1 - 2e-5 (masks are drawn in steps of 2^-15)"
            )
        self.scale = 1.0 / (1.0 - self.threshold / (1 << 15))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if torch.jit.is_scripting():  # no dtype views in TorchScript: one float per element
            keep = torch.rand_like(x) >= self.threshold / (1 << 15)
            return x * keep.to(x.dtype).mul_(self.scale)
        return x * self.keep_mask(x)

    @torch.jit.unused
    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """x-shaped mask in x's dtype: ``scale`` where the element is kept, else 0."""
        n = x.numel()
        draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        # each draw is in [0, 2^63): its four int16 pieces, masked to their low 15 bits,
        # are four uniform 15-bit numbers
        bits = draws.view(torch.int16)[:n].view(x.shape).bitwise_and_(self.low_bits)
        return (bits >= self.threshold).to(x.dtype).mul_(self.scale)


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
