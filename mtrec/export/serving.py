"""The TorchScript serving module: plain tensors in, per-task probabilities out.

Training reads sparse features as a torchrec ``KeyedJaggedTensor`` and pools them with
an ``EmbeddingBagCollection``. Scripting those puts torchrec's KJT code into the saved
graph, and that code calls FBGEMM operators (``fbgemm::asynchronous_complete_cumsum``,
``fbgemm::permute_2D_sparse_data``, ...), so the file would only load after
``import fbgemm_gpu``. The serving module therefore composes the sparse arch's
torch-only pooling (:meth:`mtrec.model.SparseArch.torch_pooling`: the embedding's own
id → row maths, ``embedding_bag`` over the same weights) with the trained model's
:class:`~mtrec.model.TaskArch` object itself. Nothing of the forward is restated here:
this module only checks the plain-tensor inputs. :func:`mtrec.export.exporter.export_run`
checks the scripted module against the eager model before anything is written.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.model import MultiTaskModel, TaskArch

__all__ = ["ServingModule"]


class ServingModule(nn.Module):
    """Scores raw inputs with a trained model; scriptable, torch-only, no side files.

    Inputs (B rows, F_s sparse features in signature order, F_n numeric features):
        values: int64 [sum(lengths)], stable value ids (``mtrec.data.hashing``; ≥ 0),
            feature-major: all ids of feature 0 for rows 0..B-1, then feature 1, ...
        lengths: int32/int64 [F_s · B], ids per (feature, row), feature-major.
        dense: float64 [B, F_n] (float32 accepted), RAW numeric values (NaN = missing);
            the module applies the normalisation fitted at training time. B comes from ``dense``
            (a model without numeric features takes a [B, 0] tensor).

    Returns: float32 [B, T] probabilities, tasks in signature order (chained ESMM tasks:
    the joint probability of the funnel up to that task).

    Args:
        model: the trained model, in eval mode.
        sparse_names: sparse feature names, in the model's KJT key order.
        num_numeric: F_n.

    Example::

        serving = torch.jit.script(ServingModule(model, spec.sparse_names, len(spec.numeric)))
        probs = serving(values, lengths, dense)  # B x T
    """

    def __init__(self, model: MultiTaskModel, sparse_names: list[str], num_numeric: int) -> None:
        super().__init__()
        # (values, lengths, B) → B x F_s x d: the sparse arch's torch-only twin
        self.sparse: nn.Module | None = (
            None if model.sparse_arch is None else model.sparse_arch.torch_pooling()
        )
        # the deep features' share of the ids (features with deep: false feed only the
        # linear term): the sparse arch's own selection module, or None when all are deep
        self.select: nn.Module | None = (
            None if model.sparse_arch is None else model.sparse_arch.select
        )
        # (values, lengths, B) → B x F_s x W per-task id weights of the linear term
        self.linear: nn.Module | None = (
            None if model.linear_arch is None else model.linear_arch.torch_pooling()
        )
        # the linear term filters ids as the embedding does (same features, kept and
        # seen sets): in eval mode the filter is deterministic, so filter once and pool
        # both from that
        self.shared_filter = (
            self.sparse is not None
            and self.linear is not None
            and self.select is None
            and self.sparse.value_filter.same_as(self.linear.value_filter)
        )
        self.task_arch: TaskArch = model.task_arch  # the trained object, not a copy
        self.feature_names = list(sparse_names)
        self.task_names = list(model.task_names)
        self.num_sparse = len(sparse_names)
        self.num_numeric = num_numeric
        self.num_tasks = len(model.task_names)

    def _check(self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor) -> int:
        """Raise a readable error for a malformed batch; returns B."""
        if dense.dim() != 2 or dense.size(1) != self.num_numeric:
            raise RuntimeError(
                "dense must be float [B, "
                + str(self.num_numeric)
                + "] (raw numeric features in signature order), got shape "
                + str(list(dense.shape))
            )
        if dense.dtype == torch.bool or dense.is_complex():
            raise RuntimeError("dense must be a float tensor, got " + str(dense.dtype))
        batch = dense.size(0)
        if lengths.dim() != 1 or lengths.numel() != self.num_sparse * batch:
            raise RuntimeError(
                "lengths must have num_sparse_features * B = "
                + str(self.num_sparse)
                + " * "
                + str(batch)
                + " entries (feature-major), got "
                + str(lengths.numel())
                + "; B is dense.size(0)"
            )
        if lengths.dtype not in [torch.int32, torch.int64]:
            raise RuntimeError("lengths must be int32 or int64, got " + str(lengths.dtype))
        if values.dim() != 1 or values.dtype not in [torch.int32, torch.int64]:
            raise RuntimeError(
                "values must be a 1-D int64 tensor of value ids, got "
                + str(values.dtype)
                + " of shape "
                + str(list(values.shape))
            )
        if lengths.numel() > 0 and int(lengths.min()) < 0:
            raise RuntimeError("lengths must be >= 0, got " + str(int(lengths.min())))
        total = int(lengths.sum())
        if total != values.numel():
            raise RuntimeError(
                "values has " + str(values.numel()) + " ids but lengths sum to " + str(total)
            )
        if values.numel() > 0 and int(values.min()) < 0:
            raise RuntimeError(
                "values must be stable ids >= 0 (mtrec.data.hashing), got " + str(int(values.min()))
            )
        return batch

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        batch = self._check(values, lengths, dense)
        # one return: TorchScript mishandles an early return beside the no_grad block
        probs = torch.zeros(0, self.num_tasks, dtype=torch.float32)
        if batch > 0:
            with torch.no_grad():
                probs = torch.sigmoid(
                    self.logits(values.to(torch.int64), lengths.to(torch.int64), dense, batch)
                )
        return probs

    def logits(
        self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """B x T logits of checked inputs: torch-only pooling, then the task arch."""
        tokens: torch.Tensor | None = None
        linear_ids: torch.Tensor | None = None
        if self.shared_filter and self.sparse is not None and self.linear is not None:
            ids, feature_of = self.linear.value_filter.filter_bags(values, lengths)
            tokens = self.sparse.forward_filtered(ids, feature_of, lengths, batch)
            linear_ids = self.linear.forward_filtered(ids, feature_of, lengths, batch)
        else:
            if self.sparse is not None:
                deep_values, deep_lengths = values, lengths
                if self.select is not None:
                    deep_values, deep_lengths = self.select(values, lengths, batch)
                tokens = self.sparse(deep_values, deep_lengths, batch)
            if self.linear is not None:
                linear_ids = self.linear(values, lengths, batch)
        return self.task_arch(tokens, dense.to(torch.float64), linear_ids)
