"""Score a split with a model, streaming, and compute per-task metrics.

Below train and evaluate: the training loop validates with :func:`evaluate_split`, and
offline evaluation collects scores with the same code.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtrec.config import DEFAULT_CHUNK_ROWS
from mtrec.data.batch import Batch
from mtrec.data.batcher import iter_batches
from mtrec.data.encode import EncodedChunk
from mtrec.data.spec import FeatureSpec
from mtrec.metrics import ScoreCollector

__all__ = ["collect_scores", "evaluate_split", "score_batches"]


@torch.no_grad()
def collect_scores(
    model: nn.Module,
    spec: FeatureSpec,
    source: EncodedChunk | str | Path,
    batch_size: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    expected_rows: int | None = None,
) -> ScoreCollector:
    """Run ``model`` over ``source`` (in memory or streamed); collect labels and probabilities.

    Only labels, probabilities (and true probabilities / group ids) are kept, never the
    features; ``expected_rows`` sizes the buffers once (no doubling copies)."""
    batches = iter_batches(source, spec, batch_size, chunk_rows=chunk_rows)
    return score_batches(model, batches, expected_rows or 4096)


@torch.no_grad()
def score_batches(model: nn.Module, batches: Iterable[Batch], capacity: int) -> ScoreCollector:
    """Probabilities of ``model`` (eval mode, restored after) on ``batches``, collected with
    the labels (and true probabilities / group ids); ``capacity``: expected rows."""
    was_training = model.training
    model.eval()
    collector = ScoreCollector(initial_capacity=max(1, capacity))
    try:
        for batch in batches:
            probs = torch.sigmoid(model(batch.sparse, batch.dense))
            collector.add(
                labels=batch.labels.numpy(),
                probs=probs.numpy(),
                true_probs=None if batch.true_probs is None else batch.true_probs.numpy(),
                groups=None if batch.groups is None else batch.groups.numpy(),
            )
    finally:
        model.train(was_training)
    return collector


def evaluate_split(
    model: nn.Module,
    spec: FeatureSpec,
    source: EncodedChunk | str | Path,
    batch_size: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, dict[str, Any]]:
    """Per-task metrics ({task: {"auc", "logloss", ...}}) of ``model`` on ``source``."""
    return collect_scores(model, spec, source, batch_size, chunk_rows).compute(spec.task_names)
