"""The first-order (linear) term of every task, as in Wide & Deep / DeepFM.

Split like the deep model, so serving reuses the trained objects:

* :class:`LinearArch` (beside ``SparseArch``): raw ids → B x F_s x T per-task weights.
  It IS a :class:`PerFeatureEmbedding` of width T (one hashed table per feature, so the
  frequency filter, ``id mod buckets`` and mean divisor are the embedding's own code,
  :class:`~mtrec.embeddings.per_feature.PerFeatureLayout`), started at zero; its
  torchrec collection is fused with its own row-wise Adagrad settings (``model.linear``),
  and ``torch_pooling()`` is the embedding's torch-only twin for export.
* :class:`LinearHead` (inside ``TaskArch``): sums those weights over the fields and adds
  one weight per task for each normalised numeric feature and a per-task bias → B x T.

Together: ``logit_t = b_t + Σ_f Σ_{id ∈ bag_f} w_{f,t}[row(id)] (÷|bag_f| for mean
pooling) + Σ_j u_{j,t} · x̃_j`` (+ ``Σ_j Σ_k r_jk · U_{j,k,t}`` over the numerics' ramps with
``model.embedding.numeric_bins``): a logistic regression per task over the one-hot hashed
ids and the normalised numerics.
"""

from __future__ import annotations

import torch
from torch import nn

from mtrec.embeddings.per_feature import PerFeatureEmbedding

__all__ = ["LinearArch", "LinearHead", "linear_width"]


def linear_width(num_tasks: int) -> int:
    """Row width of the per-id tables: T rounded up to a multiple of 4 (FBGEMM's kernels
    take no narrower rows). The padding columns get no gradient and stay zero; they do
    count in row-wise Adagrad's mean squared gradient, so a row's step is that of width T
    times sqrt(width / T)."""
    return -(-num_tasks // 4) * 4


class LinearArch(PerFeatureEmbedding):
    """Per-task weight of every hashed id: KJT of raw ids → B x F_s x W (W =
    :func:`linear_width` of T; column t < T is task t's weight, the rest stay zero).

    Args:
        feature_names: sparse features, in KJT key order.
        buckets: rows of each feature's table (the per-feature buckets of the embedding).
        num_tasks: T, one weight per task in every row.
        poolings: "sum" or "mean" per feature (multi-hot bags).
        kept_ids, seen_ids, unknown_ids, id_dropout: the frequency filter and unseen-id
            handling of the deep embedding (see ``PerFeatureEmbedding``), so an unseen id
            reads the same trained unknown row here as there.
        id_uses: per feature, int64 [K + 2] training counts (each kept id's, then the
            rare rows, then the missing rows; ``mtrec.data.vocab.IdCounter.uses``) or
            None: with them training forwards record ``prior_terms`` for the prior
            (``model.linear.prior_std``; see ``PerFeatureEmbedding``).

    All weights start at zero (the logistic-regression start: every logit = bias).
    """

    def __init__(
        self,
        feature_names: list[str],
        buckets: list[int],
        num_tasks: int,
        poolings: list[str],
        kept_ids: list[torch.Tensor | None] | None = None,
        seen_ids: list[torch.Tensor | None] | None = None,
        unknown_ids: list[int] | None = None,
        id_dropout: list[float] | None = None,
        id_uses: list[torch.Tensor | None] | None = None,
    ) -> None:
        super().__init__(
            feature_names,
            buckets,
            linear_width(num_tasks),
            poolings,
            kept_ids=kept_ids,
            seen_ids=seen_ids,
            unknown_ids=unknown_ids,
            id_dropout=id_dropout,
            id_uses=id_uses,
        )
        self.num_tasks = num_tasks
        with torch.no_grad():
            for table in self.ebc.embedding_bags.values():
                table.weight.zero_()


class LinearHead(nn.Module):
    """Per-id weights and normalised numerics → B x T first-order logits.

    With ``num_bins`` K > 0 each numeric feature also gets one weight per ramp and task
    (``Σ_j Σ_k r_jk · U_jkt``, the ramps of
    :class:`~mtrec.embeddings.piecewise.PiecewiseLinearEncoding`): the first-order term
    becomes a piecewise-linear function of each numeric. Zero start, like every weight here.

    Args:
        num_numeric: F_n, normalised numeric features.
        num_tasks: T.
        num_bins: K ramps per numeric feature (0: off; the module is then exactly the
            plain one, same parameters).

    Shapes: ids B x F_s x W (W ≥ T, :class:`LinearArch`; None without sparse features),
    dense B x F_n, ramps B x F_n x K (or None) → B x T.
    """

    def __init__(self, num_numeric: int, num_tasks: int, num_bins: int = 0) -> None:
        super().__init__()
        self.num_numeric = num_numeric
        self.num_tasks = num_tasks
        # T x F_n and T, zero start; trained by the dense optimizer
        self.weight = nn.Parameter(torch.zeros(num_tasks, num_numeric))
        self.bias = nn.Parameter(torch.zeros(num_tasks))
        # F_n x K x T; registered only when on, so K = 0 keeps today's state-dict keys
        self.bin_weight: nn.Parameter | None = (
            nn.Parameter(torch.zeros(num_numeric, num_bins, num_tasks))
            if num_bins > 0 and num_numeric > 0
            else None
        )

    def forward(
        self, ids: torch.Tensor | None, dense: torch.Tensor, ramps: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.bias.expand(dense.size(0), -1)
        if self.num_numeric > 0:
            out = out + dense @ self.weight.t()
        bin_weight = self.bin_weight
        if bin_weight is not None and ramps is not None:
            # (B x F_n·K) @ (F_n·K x T)
            out = out + ramps.flatten(1) @ bin_weight.flatten(0, 1)
        if ids is not None:
            out = out + ids.sum(1)[:, : self.num_tasks]
        return out
