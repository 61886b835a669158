"""An exponential moving average of the dense parameters (``training.ema_decay``).

Why: on small data the dense weights are noisy from step to step (a 1024-row batch of a
48k-row split), and validation reads one point of that noisy path. An average over the
last few hundred steps sits nearer the centre of the region the optimizer wanders in,
which usually scores better on held-out rows than any single iterate (Polyak averaging;
SWA / model EMA in vision and CTR models).

What is averaged: every parameter the dense optimizer (Adam) trains. The embedding
tables and the linear term's per-id weights are FBGEMM-fused: they are updated inside the
backward pass, one row at a time, and averaging them would touch every row of every
table each step (a million-row table per step on the demo), so they stay as trained.
Buffers are not averaged either (they are statistics, not trained).

The average is bias-corrected: after ``t`` updates it is
``Σ_i d^(t-i) θ_i / Σ_i d^(t-i)`` (every iterate since the start, weighted by ``d`` to
the power of its age), so the first steps are not pulled towards the initial weights
and ``d = 0`` is the raw weights exactly. In update form: ``avg ← avg + (1 - β_t)(θ - avg)``
with ``β_t = d (1 - d^(t-1)) / (1 - d^t)``.

The training loop validates, writes ``best.pt`` and so evaluates and exports with the
averaged weights; ``last.pt`` keeps the raw weights (training resumes from them) and the
average itself, so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["DenseAverage"]


class DenseAverage:
    """The bias-corrected exponential moving average of the parameters ``named`` (the
    dense optimizer's, by their name in ``model.state_dict()``), with decay ``decay``."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay {decay}: must be in [0, 1)")
        self.decay = decay
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0  # t: parameter updates averaged so far

    def update(self) -> None:
        """Fold the parameters' current values in (call after each optimizer step)."""
        self.updates += 1
        d, t = self.decay, self.updates
        # β_t: the weight the old average keeps; 0 on the first update (and for d = 0)
        keep = d * (1.0 - d ** (t - 1)) / (1.0 - d**t)
        with torch.no_grad():
            torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - keep)

    def values(self) -> dict[str, torch.Tensor]:
        """The averaged values by parameter name (CPU copies)."""
        return {n: a.detach().cpu().clone() for n, a in zip(self.names, self.average, strict=True)}

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """``model.state_dict()`` with the averaged values (copies) in place of the averaged
        parameters: what ``best.pt`` holds. The other entries are the state dict's own
        detached tensors: the loop asks for this every epoch, and copying the embedding
        tables each time for a ``best.pt`` written only on improvement would be waste."""
        return {**model.state_dict(), **self.values()}

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the averaged values (to validate); the raw
        values come back after it, exactly."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.data for p in self.params], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], raw)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "average": {n: a.clone() for n, a in zip(self.names, self.average, strict=True)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["average"]
        if sorted(saved) != sorted(self.names):
            raise ValueError(
                "the saved dense average covers other parameters than this model's: "
                f"{sorted(set(saved) ^ set(self.names))[:5]}"
            )
        self.updates = int(state["updates"])
        with torch.no_grad():
            for name, avg in zip(self.names, self.average, strict=True):
                avg.copy_(saved[name])
