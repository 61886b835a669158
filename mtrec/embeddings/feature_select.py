"""Keeps some features of a feature-major sparse batch: the deep model's share of the ids.

A feature with ``deep: false`` (a Wide & Deep "wide-only" column, ``features[].deep``)
feeds only the first-order term; the deep embedding reads the other features. Training
(a torchrec KJT) and serving (plain ``values`` / ``lengths`` tensors) both call this one
module before the deep embedding, so the two paths select the same ids.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

__all__ = ["FeatureSelect"]


class FeatureSelect(nn.Module):
    """Feature-major ids of F features → those of the features at ``index`` (ascending).

    Args:
        num_features: F, the features of the input batch (in its order).
        index: positions of the kept features, strictly increasing (their order is kept).

    Shapes: values [N] (all ids of feature 0 for rows 0..B-1, then feature 1, ...),
    lengths [F·B] → values [N'] (the kept features' ids, same order), lengths [F'·B].

    Example::

        select = FeatureSelect(3, [0, 2])
        values, lengths = select(torch.tensor([5, 6, 7, 8]), torch.tensor([1, 1, 1, 1, 0, 0]), 2)
        # values [5, 6], lengths [1, 1, 0, 0]: feature 1's ids (7, 8) are gone
    """

    def __init__(self, num_features: int, index: list[int]) -> None:
        super().__init__()
        if not index or any(b <= a for a, b in pairwise(index)):
            raise ValueError(f"index must be non-empty and strictly increasing, got {index}")
        if index[0] < 0 or index[-1] >= num_features:
            raise ValueError(f"index {index} out of range for {num_features} features")
        self.num_features = num_features
        # keep[f]: whether feature f is kept; a buffer so it follows the module's device
        keep = torch.zeros(num_features, dtype=torch.bool)
        keep[index] = True
        self.register_buffer("keep", keep, persistent=False)
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_feature = lengths.view(self.num_features, batch)
        # feature of every id: the features are contiguous runs of the values
        totals = per_feature.sum(1)
        keep_id = torch.repeat_interleave(self.keep, totals, output_size=values.numel())
        kept_lengths = per_feature.index_select(0, self.index).reshape(-1)
        return torch.masked_select(values, keep_id), kept_lengths
