"""Multi-task training loss: Σ_t w_t · BCE_t, plus the auxiliary losses blocks declare."""

from __future__ import annotations

import torch
from torch import nn

from mtrec.config import ExperimentConfig
from mtrec.model import SparseArch

__all__ = ["EmbeddingPenalty", "UsePrior", "WeightedBCELoss", "sparse_penalties"]


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
    output (B x F_d x d); :meth:`take` returns ``weight_decay / 2 * mean_b Σ_{f,j}
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


class UsePrior:
    """Gaussian prior N(0, σ²) on every row of a looked-up table: the L2 penalty of a
    regression fitted to its optimum, spread over each row's uses
    (``model.linear.prior_std``, ``model.embedding.prior_std``).

    The looking-up module (:class:`~mtrec.embeddings.linear.LinearArch`, or the deep
    model's embedding, built with use counts) records ``prior_terms`` in every training
    forward: its pooled vectors (``[..., w]``) and their weights (``[...]``: 1 / the
    expected epoch uses of the rows a bag read, over the batch size B;
    :mod:`mtrec.embeddings.prior`). :meth:`take` returns ``Σ weight · |vector|² / (2σ²)``.
    Over one full epoch these add up to ``Σ_rows |row|² / (2σ² B)``: the prior once per
    epoch, in the units of the batch-mean loss, whatever a row's frequency: for task t's
    column of the linear term the L2 of a regression with ``C = w_t σ²`` (``w_t`` its task
    weight). (A per-use penalty, ``weight_decay``, holds the most frequent ids back most;
    this one shrinks the rare ones, as a regression's L2 does.) The model gives multi-hot
    features no counts: a pooled bag is not its rows.
    Read from the module itself, so the local and the Ray (sharded) steps share it.
    """

    def __init__(self, module: nn.Module, prior_std: float) -> None:
        if getattr(module, "inverse_uses", None) is None:
            raise ValueError(f"UsePrior: {type(module).__name__} was built without use counts")
        self.scale = 0.5 / (prior_std * prior_std)
        self.module = module

    def take(self) -> torch.Tensor:
        """The penalty of the last training forward (a scalar; forgets it)."""
        terms = self.module.prior_terms
        if terms is None:
            raise RuntimeError("UsePrior.take: no training forward since the last take")
        self.module.prior_terms = None
        vectors, weights = terms
        return self.scale * (vectors.float().square().sum(-1) * weights).sum()


def sparse_penalties(
    model: nn.Module, cfg: ExperimentConfig
) -> dict[str, EmbeddingPenalty | UsePrior]:
    """The L2 penalties the config asks for, by aux-loss name: ``embedding_l2`` on the deep
    model's sparse tokens, ``linear_l2`` on the linear term's per-id weights (each only
    when its weight decay is > 0 and the model has the module); ``linear_prior`` and
    ``embedding_prior`` (:class:`UsePrior`) when ``prior_std`` is set and the module was
    built with use counts (some single-id feature has a fitted id set)."""
    from mtrec.embeddings.linear import LinearArch

    out: dict[str, EmbeddingPenalty | UsePrior] = {}
    decay = cfg.model.embedding.weight_decay
    if decay > 0 and any(isinstance(m, SparseArch) for m in model.modules()):
        out["embedding_l2"] = EmbeddingPenalty(model, decay)
    decay = cfg.model.linear.weight_decay
    if decay > 0 and any(isinstance(m, LinearArch) for m in model.modules()):
        out["linear_l2"] = EmbeddingPenalty(model, decay, LinearArch)
    # the priors, on the modules built with use counts (filtered features)
    std = cfg.model.linear.prior_std
    arches = [m for m in model.modules() if isinstance(m, LinearArch)]
    if std is not None and arches and arches[0].inverse_uses is not None:
        out["linear_prior"] = UsePrior(arches[0], std)
    std = cfg.model.embedding.prior_std
    sparse = [m.embedding for m in model.modules() if isinstance(m, SparseArch)]
    if std is not None and sparse and getattr(sparse[0], "inverse_uses", None) is not None:
        out["embedding_prior"] = UsePrior(sparse[0], std)
    return out
