"""Piecewise-linear encoding (PLE) of normalised numeric features.

Gorishniy et al. 2022, "On Embeddings for Numerical Features in Tabular Deep Learning":
feature j with bin edges ``b_0 < b_1 < ... < b_K`` (quantiles of the training split, in
normalised units, ``mtrec.data.fitting``) becomes K ramps

    e_k(x) = clamp((x - b_{k-1}) / (b_k - b_{k-1}), 0, 1),   k = 1..K,

so a linear function of ``e(x)`` is a piecewise-linear function of x with knots at the
edges: the shape a single ``x · v`` cannot learn. A zero-width bin (a repeated quantile of
discrete data) is a step, ``1 if x >= b_k else 0``. Outside ``[b_0, b_K]`` the ramps are
constant (all 0 below, all 1 above); the model's plain ``x · v`` term carries the trend.

The ramps feed the numeric field tokens (``NumericEmbedding``) and the linear term
(``LinearHead``), computed once per forward by ``TaskArch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PiecewiseLinearEncoding"]


class PiecewiseLinearEncoding(nn.Module):
    """B x F_n normalised values → B x F_n x K ramps in [0, 1].

    Args:
        edges: F_n x (K+1) bin edges per feature, non-decreasing along each row, in the
            normaliser's output units. Stored as a persistent buffer, so a checkpoint or a
            scripted model carries them with no side file.

    Example::

        ple = PiecewiseLinearEncoding([[0.0, 1.0, 3.0]])
        ple(torch.tensor([[2.0]]))  # tensor([[[1.0, 0.5]]])
    """

    def __init__(self, edges: Sequence[Sequence[float]] | torch.Tensor) -> None:
        super().__init__()
        table = torch.as_tensor(edges, dtype=torch.float32)
        if table.dim() != 2 or table.size(1) < 2:
            raise ValueError(f"edges must be F_n x (K+1) with K >= 1, got {tuple(table.shape)}")
        if bool((table[:, 1:] < table[:, :-1]).any()):
            raise ValueError("edges must be non-decreasing along each feature's row")
        self.register_buffer("edges", table.clone())
        self.num_bins = table.size(1) - 1

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """B x F_n → B x F_n x K."""
        left = self.edges[:, :-1]  # F_n x K
        width = self.edges[:, 1:] - left
        shifted = values.unsqueeze(-1) - left  # B x F_n x K
        wide = width > 0
        # a zero width would divide 0 by 0: divide by 1 there and take the step instead
        ramp = (shifted / torch.where(wide, width, torch.ones_like(width))).clamp(0.0, 1.0)
        step = (shifted >= 0).to(values.dtype)
        return torch.where(wide, ramp, step)
