"""What a trained model attends to and routes through, averaged over a bounded sample.

Two views, each drawn only when the model has the part it needs:

* **Field attention** (AutoInt): the LAST interacting layer's attention, averaged over
  rows and heads: ``A[i, j]`` = how much field i attends to field j (rows sum to 1).
  Read from ``model.interaction.attention_maps(x0)`` with ``x0 = model.field_tokens``.
* **Expert gates** (blocks with a ``diagnostics(v, tokens)`` method, format in
  :mod:`mtrec.multitask.diagnostics`): the mean weight each task's gate
  (``gates["task:<name>"]``) puts on each expert, as a task × expert matrix; an expert a
  task's gate does not mix is NaN. Also each expert's dead-activation fraction and, for
  shared experts, each task's share of the gate weight they receive (HoME's collapse,
  degradation and underfitting failure modes, measured).

Both are means over at most ``max_rows`` rows (the first rows of the split, streamed), so
the cost is bounded whatever the size of the test set. Batches are weighted by their rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtrec.config import DEFAULT_CHUNK_ROWS
from mtrec.data.batcher import encoded_chunks, iter_batches
from mtrec.data.encode import EncodedChunk
from mtrec.data.spec import FeatureSpec

__all__ = ["ModelInsights", "collect_insights"]

_TASK_GATE = "task:"


@dataclass
class ModelInsights:
    """Row-weighted means over ``rows`` rows.

    ``attention``: F x F (``fields`` on both axes, query field = row), or None.
    ``gates``: T x E (``gate_tasks`` x ``gate_experts``; NaN where a task's gate does not
    mix that expert), or None. ``gate_entropy``: mean gate entropy (nats) per task.
    """

    rows: int = 0
    fields: list[str] = field(default_factory=list)
    attention: np.ndarray | None = None
    gate_tasks: list[str] = field(default_factory=list)
    gate_experts: list[str] = field(default_factory=list)
    gates: np.ndarray | None = None
    gate_entropy: dict[str, float] = field(default_factory=dict)
    # expert -> row-weighted mean fraction of (near-)zero activations
    expert_dead_fraction: dict[str, float] = field(default_factory=dict)
    # shared expert -> task -> share of the gate weight it receives
    shared_usage: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN cells stay NaN; ``mtrec.io.to_json`` writes them as null)."""
        out: dict[str, Any] = {"rows": self.rows}
        if self.attention is not None:
            out["attention"] = {
                "layer": "last",
                "fields": list(self.fields),
                "mean": self.attention.tolist(),
            }
        if self.gates is not None:
            out["gates"] = {
                "tasks": list(self.gate_tasks),
                "experts": list(self.gate_experts),
                "mean_weight": self.gates.tolist(),
                "entropy": dict(self.gate_entropy),
            }
        if self.expert_dead_fraction:
            out["expert_dead_fraction"] = dict(self.expert_dead_fraction)
        if self.shared_usage:
            out["shared_usage"] = {e: dict(u) for e, u in self.shared_usage.items()}
        return out


class _GateSums:
    """Row-weighted running sums of the task gates of ``diagnostics`` outputs."""

    def __init__(self) -> None:
        self.weight: dict[str, dict[str, float]] = {}  # task -> expert -> sum(rows * w)
        self.entropy: dict[str, float] = {}
        self.experts: list[str] = []  # first-seen order
        self.dead: dict[str, float] = {}  # expert -> sum(rows * dead fraction)
        self.usage: dict[str, dict[str, float]] = {}  # expert -> task -> sum(rows * share)

    def add(self, diagnostics: dict[str, Any], rows: int) -> None:
        for expert, health in diagnostics.get("experts", {}).items():
            self.dead[expert] = self.dead.get(expert, 0.0) + rows * float(health["dead_fraction"])
        for expert, shares in diagnostics.get("shared_usage", {}).items():
            acc = self.usage.setdefault(expert, {})
            for task, share in shares.items():
                acc[task] = acc.get(task, 0.0) + rows * float(share)
        for gate, summary in diagnostics.get("gates", {}).items():
            if not gate.startswith(_TASK_GATE):
                continue
            task = gate[len(_TASK_GATE) :]
            experts, weights = summary["experts"], summary["mean_weight"]
            if len(experts) != len(weights):
                raise ValueError(
                    f"diagnostics gate {gate!r}: {len(weights)} weights for {len(experts)} experts"
                )
            per_task = self.weight.setdefault(task, {})
            for expert, w in zip(experts, weights, strict=True):
                if expert not in self.experts:
                    self.experts.append(expert)
                per_task[expert] = per_task.get(expert, 0.0) + rows * float(w)
            self.entropy[task] = self.entropy.get(task, 0.0) + rows * float(summary["entropy"])

    def finish(self, rows: int, task_order: list[str]) -> tuple[list[str], np.ndarray, dict]:
        tasks = [t for t in task_order if t in self.weight]
        tasks += [t for t in self.weight if t not in tasks]
        mat = np.full((len(tasks), len(self.experts)), np.nan)
        for i, t in enumerate(tasks):
            for j, e in enumerate(self.experts):
                if e in self.weight[t]:
                    mat[i, j] = self.weight[t][e] / rows
        return tasks, mat, {t: self.entropy[t] / rows for t in tasks}


@torch.no_grad()
def collect_insights(
    model: nn.Module,
    spec: FeatureSpec,
    source: EncodedChunk | str | Path,
    batch_size: int,
    max_rows: int = 8192,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> ModelInsights:
    """Field attention and expert-gate means of ``model`` over the first ``max_rows`` rows.

    ``model`` is a :class:`mtrec.model.MultiTaskModel` (anything with ``field_tokens`` and
    ``block_inputs``); parts it lacks are left None. Runs in eval mode (no dropout).

    Example::

        ins = collect_insights(model, spec, "data/test.parquet", batch_size=4096)
        ins.attention.shape  # (F, F), or None without an AutoInt interaction
    """
    out = ModelInsights(fields=list(spec.field_names))
    interaction = getattr(model, "interaction", None)
    has_attention = interaction is not None and hasattr(interaction, "attention_maps")
    block = getattr(model, "block", None)
    has_gates = block is not None and callable(getattr(block, "diagnostics", None))
    if max_rows <= 0 or not (has_attention or has_gates):
        return out
    was_training = model.training
    model.eval()
    attention_sum: torch.Tensor | None = None
    gate_sums = _GateSums()
    try:
        for batch in iter_batches(
            _first_rows(spec, source, max_rows, chunk_rows), spec, batch_size
        ):
            rows = batch.batch_size
            if has_attention:
                x0 = model.field_tokens(batch.sparse, batch.dense)
                last = interaction.attention_maps(x0)[-1]  # B x H x F x F
                mean = last.double().mean(dim=(0, 1)) * rows
                attention_sum = mean if attention_sum is None else attention_sum + mean
            if has_gates:
                v, tokens = model.block_inputs(batch.sparse, batch.dense, {})
                gate_sums.add(block.diagnostics(v, tokens), rows)
            out.rows += rows
    finally:
        model.train(was_training)
    if out.rows == 0:
        return out
    if attention_sum is not None:
        out.attention = (attention_sum / out.rows).numpy()
    if has_gates and gate_sums.weight:
        out.gate_tasks, out.gates, out.gate_entropy = gate_sums.finish(
            out.rows, list(spec.task_names)
        )
        out.gate_experts = list(gate_sums.experts)
    if has_gates:
        out.expert_dead_fraction = {e: d / out.rows for e, d in gate_sums.dead.items()}
        out.shared_usage = {
            e: {t: v / out.rows for t, v in u.items()} for e, u in gate_sums.usage.items()
        }
    return out


def _first_rows(
    spec: FeatureSpec, source: EncodedChunk | str | Path, max_rows: int, chunk_rows: int
) -> EncodedChunk:
    """The first ``max_rows`` rows of ``source``, encoded in memory (reads no further)."""
    if isinstance(source, EncodedChunk):
        return source.slice(0, min(max_rows, source.rows))
    parts: list[EncodedChunk] = []
    have = 0
    for chunk in encoded_chunks(spec, source, min(chunk_rows, max_rows)):
        parts.append(chunk.slice(0, min(chunk.rows, max_rows - have)))
        have += parts[-1].rows
        if have >= max_rows:
            break
    return EncodedChunk.concat(parts)
