"""Expert-health diagnostics (HoME's three failure modes, measured on a batch).

A block's ``diagnostics(v, tokens)`` (plain Python, eval-time only, not scripted)
returns a :data:`Diagnostics` dict::

    {
      "experts": {expert: {"dead_fraction": float}},     # |activation| <= DEAD_EPS
      "gates": {gate: {"experts": [expert, ...],         # what the gate mixes
                       "mean_weight": [float, ...],      # batch(-and-token) mean weight
                       "entropy": float}},               # mean entropy (nats) of the gate
      "shared_usage": {expert: {task: share}},           # shared experts: each task's share
    }

Task gates are named ``task:<task name>`` (for multi-level blocks: the last level's), so
a task × expert heatmap can be drawn for every block the same way. A shared expert whose
usage comes almost all from one task has degraded into a task-specific one.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "DEAD_EPS",
    "Diagnostics",
    "dead_fraction",
    "gate_summary",
    "model_diagnostics",
    "shared_usage",
]

Diagnostics = dict[str, Any]

# an activation this close to 0 carries no signal: exact zeros for ReLU, the flat left
# tail for Swish / GELU
DEAD_EPS = 1e-4


def dead_fraction(activations: torch.Tensor) -> float:
    """Fraction of entries with |a| <= DEAD_EPS (any shape)."""
    if activations.numel() == 0:
        return float("nan")
    return float((activations.abs() <= DEAD_EPS).float().mean())


def gate_summary(weights: torch.Tensor, experts: list[str]) -> dict[str, Any]:
    """``weights``: ... x E gate weights (rows sum to 1) → mean weight per expert and the
    mean entropy of the rows."""
    if weights.shape[-1] != len(experts):
        raise ValueError(f"gate has {weights.shape[-1]} slots but {len(experts)} expert names")
    flat = weights.detach().reshape(-1, weights.shape[-1]).double()
    entropy = -(flat * flat.clamp_min(1e-12).log()).sum(-1).mean()
    return {
        "experts": list(experts),
        "mean_weight": [float(w) for w in flat.mean(0)],
        "entropy": float(entropy),
    }


def shared_usage(
    gates: dict[str, dict[str, Any]], shared: list[str]
) -> dict[str, dict[str, float]]:
    """For each shared expert, each task gate's share of the total weight it receives.

    ``gates`` is the ``"gates"`` part of a :data:`Diagnostics`; only ``task:<name>`` gates
    count. Shares of one expert sum to 1 (all-zero usage gives equal shares of NaN).
    """
    usage: dict[str, dict[str, float]] = {}
    task_gates = {k[len("task:") :]: g for k, g in gates.items() if k.startswith("task:")}
    for expert in shared:
        weights = {
            task: g["mean_weight"][g["experts"].index(expert)]
            for task, g in task_gates.items()
            if expert in g["experts"]
        }
        total = sum(weights.values())
        usage[expert] = {t: (w / total if total > 0 else float("nan")) for t, w in weights.items()}
    return usage


def model_diagnostics(model: torch.nn.Module, batch: Any) -> Diagnostics | None:
    """The block's diagnostics on one :class:`~mtrec.data.batch.Batch` (None when the
    block has no ``diagnostics`` method), with numbers rounded for logging.

    Runs in the model's current mode under ``torch.no_grad()``.
    """
    block = getattr(model, "block", None)
    method = getattr(block, "diagnostics", None)
    if method is None:
        return None
    with torch.no_grad():
        aux: dict[str, torch.Tensor] = {}
        v, tokens = model.block_inputs(batch.sparse, batch.dense, aux)
        return _rounded(method(v, tokens))


def _rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value
