"""Multi-task training loss: Σ_t w_t · BCE_t, plus the auxiliary losses blocks declare."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WeightedBCELoss"]


class WeightedBCELoss(nn.Module):
    """Weighted sum over tasks of the mean binary cross-entropy with logits, plus the
    (already weighted) auxiliary losses of ``MultiTaskModel.forward_with_aux`` (e.g. the MoH
    balance loss) when given: the one place the auxiliary-loss channel joins the loss.

    Shapes: logits B x T, labels B x T → scalar.
    """

    def __init__(self, weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        aux: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        per_task = nn.functional.binary_cross_entropy_with_logits(
            logits.float(), labels, reduction="none"
        ).mean(0)
        loss = (per_task * self.weights).sum()
        if aux is not None:
            for value in aux.values():
                loss = loss + value.float()
        return loss
