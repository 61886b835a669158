"""Per-task towers: T task representations → T logits."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from mtrec.nn.layers import FastDropout, GroupedLinear, activate_, activation

__all__ = ["TaskTowers"]


class TaskTowers(nn.Module):
    """T independent MLP towers ending in one logit each, run as batched matmuls.

    Shapes: T tensors of B x in → B x T logits.

    Example::

        towers = TaskTowers(num_tasks=2, in_features=16, hidden=[8])
        towers([torch.randn(4, 16), torch.randn(4, 16)]).shape  # torch.Size([4, 2])
    """

    def __init__(
        self,
        num_tasks: int,
        in_features: int,
        hidden: list[int],
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList([GroupedLinear(num_tasks, a, b) for a, b in pairwise(widths)])
        self.out = GroupedLinear(num_tasks, widths[-1], 1)
        self.act = activation(act)
        self.act_name = act
        self.dropout = FastDropout(dropout)

    def forward(self, reprs: list[torch.Tensor]) -> torch.Tensor:
        h = torch.stack(reprs, dim=0)  # T x B x in
        inference = not self.training and not torch.is_grad_enabled()
        for layer in self.hidden:
            if inference:  # in place on the layer's fresh output
                h = activate_(layer(h), self.act_name)
            else:
                h = self.dropout(self.act(layer(h)))
        return self.out(h).squeeze(-1).t()  # B x T
