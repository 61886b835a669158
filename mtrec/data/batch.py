"""The unit of training and evaluation: one mini-batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["Batch"]


@dataclass
class Batch:
    """One mini-batch of B rows.

    Attributes:
        sparse: KJT keyed by sparse feature name (feature-major), raw int64 value ids.
        dense: B x N_numeric float64 RAW values (NaN = missing); the model normalises them.
        labels: B x T float32 in {0, 1}.
        true_probs: B x T float32 planted probabilities (synthetic data only).
        groups: B int64 group-key ids for GAUC.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    true_probs: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])
