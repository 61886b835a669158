"""Multi-task training loss: Σ_t w_t · BCE_t, plus the auxiliary losses blocks declare."""

from __future__ import annotations

import torch
from torch import nn

from mtrec.config import ExperimentConfig
from mtrec.model import SparseArch

__all__ = ["EmbeddingPenalty", "WeightedBCELoss", "sparse_penalties"]


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


class EmbeddingPenalty:
    """L2 penalty on the looked-up sparse field tokens (``model.embedding.weight_decay``),
    or on the output of another looked-up module given as ``arch`` (the linear term's
    per-id weights, :class:`~mtrec.embeddings.linear.LinearArch`:
    ``model.linear.weight_decay``).

    A forward hook on the model's :class:`~mtrec.model.SparseArch` keeps its training
    output (B x F_s x d); :meth:`take` returns ``weight_decay / 2 * mean_b Σ_{f,j}
    tokens²``. Its gradient reaches each looked-up row inside FBGEMM's fused backward, so
    row-wise Adagrad sees ``g + weight_decay * row / B`` per use of the row: an L2 decay
    on exactly the rows a batch touched, strongest on the most used. (FBGEMM's own
    ``weight_decay`` of row-wise Adagrad is ignored by its CPU kernel.) A hook rather than a
    second forward path keeps the local and the Ray (sharded) models unchanged.
    """

    def __init__(
        self, model: nn.Module, weight_decay: float, arch: type[nn.Module] = SparseArch
    ) -> None:
        self.weight_decay = weight_decay
        self._tokens: torch.Tensor | None = None
        arches = [m for m in model.modules() if isinstance(m, arch)]
        if len(arches) != 1:
            raise ValueError(f"expected one {arch.__name__} in the model, found {len(arches)}")
        arches[0].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            self._tokens = output

    def take(self) -> torch.Tensor:
        """The penalty of the last training forward (a scalar; forgets the tokens)."""
        tokens, self._tokens = self._tokens, None
        if tokens is None:
            raise RuntimeError("EmbeddingPenalty.take: no training forward since the last take")
        return 0.5 * self.weight_decay * tokens.float().square().sum(dim=(1, 2)).mean()


def sparse_penalties(model: nn.Module, cfg: ExperimentConfig) -> dict[str, EmbeddingPenalty]:
    """The L2 penalties the config asks for, by aux-loss name: ``embedding_l2`` on the deep
    model's sparse tokens, ``linear_l2`` on the linear term's per-id weights (each only
    when its weight decay is > 0 and the model has the module)."""
    from mtrec.embeddings.linear import LinearArch

    out: dict[str, EmbeddingPenalty] = {}
    decay = cfg.model.embedding.weight_decay
    if decay > 0 and any(isinstance(m, SparseArch) for m in model.modules()):
        out["embedding_l2"] = EmbeddingPenalty(model, decay)
    decay = cfg.model.linear.weight_decay
    if decay > 0 and any(isinstance(m, LinearArch) for m in model.modules()):
        out["linear_l2"] = EmbeddingPenalty(model, decay, LinearArch)
    return out
