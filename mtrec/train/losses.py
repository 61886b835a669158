"""Multi-task loss: Σ_t w_t · BCE_t."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WeightedBCELoss"]


class WeightedBCELoss(nn.Module):
    """Weighted sum over tasks of the mean binary cross-entropy with logits.

    Shapes: logits B x T, labels B x T → scalar.
    """

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_task = nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="none"
        ).mean(0)
        return (per_task * self.weights).sum()
