"""Expected training uses of every table row, for a Gaussian prior on the rows.

A prior N(0, σ²) on every row of a looked-up table, added to a batch-mean loss as
``Σ_{uses in the batch} |row|² / (2σ² B · uses(row))``, adds up over one epoch to
``Σ_rows |row|² / (2σ² B)``: the L2 of a regression fitted to its optimum, whatever a row's
frequency (``mtrec.train.losses.UsePrior``). This file turns the training use counts of
the kept ids (``mtrec.data.vocab.IdCounter.uses``) into ``1 / uses`` per row; the modules
that look rows up (per-feature tables, the linear term, Unified Embedding) pass their own
id → row map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # per_feature imports this module
    from mtrec.embeddings.per_feature import FrequencyFilter

__all__ = ["bag_mean", "inverse_uses"]


def inverse_uses(
    num_rows: int,
    rows_of: Callable[[int, torch.Tensor], torch.Tensor],
    kept_ids: list[torch.Tensor | None] | None,
    id_uses: list[torch.Tensor | None],
    value_filter: FrequencyFilter,
) -> torch.Tensor:
    """float32 [num_rows]: 1 / the expected uses of each row in one training epoch; 0 for
    rows training never reads (or that only features without counts read).

    ``rows_of(f, ids)`` maps feature ``f``'s int64 ids [n] to rows: [n], or [k, n] for a
    Unified Embedding feature of k chunks (each id reads k rows). ``id_uses[f]``:
    int64 [K + 2], the count of each of the K kept ids (``kept_ids[f]``), then the rare
    rows, then the missing rows. ``value_filter`` is the module's own filter: its unknown
    id and id dropout ``p`` per feature. A kept or rare id is read by its ``(1 - p)`` share
    of uses, the unknown id by the dropped ones, the rare id by the rare ids and id 0 by the
    missing values (never dropped); ids that share a row add up.
    """
    unknown_ids = value_filter.unknown.tolist()
    id_dropout = value_filter.drop_p.tolist()
    rare_id = value_filter.rare_id
    kept_ids = kept_ids or [None] * value_filter.num_features
    uses = torch.zeros(num_rows, dtype=torch.float64)
    for f, (kept, counts, unknown, p) in enumerate(
        zip(kept_ids, id_uses, unknown_ids, id_dropout, strict=True)
    ):
        if counts is None or kept is None:
            continue
        kept_counts = counts[:-2].double()
        rare = float(counts[-2])
        # id dropout sends kept AND rare ids to the unknown id (one row when that is the
        # rare id itself)
        dropped = p * (float(kept_counts.sum()) + rare)
        ids = torch.cat([kept, torch.tensor([unknown, rare_id, 0], dtype=torch.int64)])
        weight = torch.cat(
            [
                kept_counts * (1.0 - p),
                torch.tensor([dropped, rare * (1.0 - p), float(counts[-1])], dtype=torch.float64),
            ]
        )
        rows = rows_of(f, ids)
        uses.index_add_(0, rows.reshape(-1), weight.repeat(rows.numel() // ids.numel()))
    inverse = torch.where(uses > 0, 1.0 / uses.clamp(min=1e-12), torch.zeros_like(uses))
    return inverse.float()


def bag_mean(per_id: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[N] values of the ids of bags of ``lengths`` [n] → [n] their mean per bag (0 for an
    empty bag)."""
    bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    total = torch.zeros(lengths.numel(), dtype=per_id.dtype, device=per_id.device)
    return total.index_add(0, bags, per_id) / lengths.clamp(min=1).to(per_id.dtype)
