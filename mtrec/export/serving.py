"""The TorchScript serving module: plain tensors in, per-task probabilities out."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["ServingModule"]


class ServingModule(nn.Module):
    """Scores raw inputs with a trained model; scriptable, no side files.

    Inputs (B rows, F_s sparse features in signature order, F_n numeric features):
        values: int64 [sum(lengths)], stable value ids (``mtrec.data.hashing``),
            feature-major: all ids of feature 0 for rows 0..B-1, then feature 1, ...
        lengths: int32/int64 [F_s · B], ids per (feature, row), feature-major.
        dense: float32 [B, F_n], RAW numeric values (NaN = missing); the module
            applies the normalisation fitted at training time.

    Returns: float32 [B, T] probabilities, tasks in signature order.
    """

    def __init__(self, model: nn.Module, sparse_names: list[str], num_numeric: int) -> None:
        super().__init__()
        self.model = model
        self.sparse_names = list(sparse_names)
        self.num_sparse = len(sparse_names)
        self.num_numeric = num_numeric
        self.num_tasks = len(model.task_names)

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        if dense.dim() != 2 or dense.size(1) != self.num_numeric:
            raise RuntimeError(
                "dense must be float [B, "
                + str(self.num_numeric)
                + "], got shape "
                + str(list(dense.shape))
            )
        batch = dense.size(0)
        if lengths.dim() != 1 or lengths.numel() != self.num_sparse * batch:
            raise RuntimeError(
                "lengths must have num_sparse_features * B = "
                + str(self.num_sparse)
                + " * "
                + str(batch)
                + " entries (feature-major), got "
                + str(lengths.numel())
            )
        if lengths.numel() > 0 and int(lengths.min()) < 0:
            raise RuntimeError("lengths must be >= 0")
        if int(lengths.sum()) != values.numel():
            raise RuntimeError(
                "values has "
                + str(values.numel())
                + " ids but lengths sum to "
                + str(int(lengths.sum()))
            )
        # one return: TorchScript mishandles an early return beside the no_grad block
        probs = torch.zeros(0, self.num_tasks, dtype=torch.float32)
        if batch > 0:  # torchrec's KJT/EBC cannot take an empty batch
            sparse = KeyedJaggedTensor(
                keys=self.sparse_names,
                values=values.to(torch.int64),
                lengths=lengths.to(torch.int32),
                stride=batch,
            )
            with torch.no_grad():
                probs = torch.sigmoid(self.model(sparse, dense.to(torch.float32)))
        return probs
