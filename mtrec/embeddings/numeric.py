"""Numeric features: normalisation inside the model, and AutoInt-style embedding."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NumericEmbedding", "NumericNormalizer"]


class NumericNormalizer(nn.Module):
    """Raw values → normalised values: ``(f(x) - mean) / std``, non-finite → ``fill``.

    ``f`` is ``sign(x)·log1p(|x|)`` where ``log1p[i]`` is set, else identity. The
    statistics are fitted on the training split and stored as buffers, so a
    scripted model takes raw values and needs no side files.

    Args:
        mean, std, log1p: per-feature statistics (length N).
        fill: value of a missing (null / NaN / inf) input after normalisation.
    """

    def __init__(
        self, mean: list[float], std: list[float], log1p: list[bool], fill: float = 0.0
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("log1p", torch.tensor(log1p, dtype=torch.bool))
        self.fill = fill

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        """B x N raw → B x N normalised."""
        logged = torch.sign(dense) * torch.log1p(torch.abs(dense))
        x = torch.where(self.log1p, logged, dense)
        x = (x - self.mean) / self.std
        return torch.where(torch.isfinite(x), x, torch.full_like(x, self.fill))


class NumericEmbedding(nn.Module):
    """AutoInt's numeric field embedding: ``e_m = v_m · x_m``.

    Args:
        num_features: N numeric fields.
        dim: embedding dim d.

    Example::

        NumericEmbedding(3, 8)(torch.randn(4, 3)).shape  # torch.Size([4, 3, 8])
    """

    def __init__(self, num_features: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_features, dim))
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """B x N normalised values → B x N x d."""
        return values.unsqueeze(-1) * self.weight
