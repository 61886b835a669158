"""Learning-rate decay over the planned training steps (``training.lr_schedule``).

Why: with a constant step the optimizer keeps moving as much at the end of training as
at the start; decaying the step lets the last epochs settle into the region the first
ones found instead of wandering through it (and, for the id embeddings, fitting the
training rows' noise at full speed).

The factor multiplies every learning rate the schedule covers (every dense parameter
group, and with ``training.lr_schedule_embeddings`` the row-wise Adagrad step of the
fused embedding and linear id tables); the progress ``p`` is the steps taken over the
steps planned (``training.epochs`` x the steps of an epoch), clipped to 1:

* ``constant``: 1 (the learning rates as configured; the schedule is never applied);
* ``linear``: ``1 - (1 - r) p``;
* ``cosine``: ``r + (1 - r) (1 + cos(π p)) / 2``;

with ``r = training.lr_final_ratio``, the factor at the end of the plan. Early stopping
ends a run before the plan's end, at a factor above ``r``.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["LrSchedule", "ScheduleKind", "planned_steps"]

ScheduleKind = Literal["constant", "linear", "cosine"]


def planned_steps(rows: int, batch_size: int, epochs: int, max_steps_per_epoch: int = 0) -> int:
    """Training steps of ``epochs`` epochs over ``rows`` rows (an epoch's last batch may be
    short; ``max_steps_per_epoch`` > 0 caps each epoch)."""
    per_epoch = math.ceil(rows / batch_size)
    if max_steps_per_epoch:
        per_epoch = min(per_epoch, max_steps_per_epoch)
    return max(per_epoch * epochs, 1)


class LrSchedule:
    """The learning-rate factor of step ``t`` (0-based) of a ``total``-step plan."""

    def __init__(self, kind: ScheduleKind, total: int, final_ratio: float = 0.0) -> None:
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr schedule {kind!r}: must be constant, linear or cosine")
        if total < 1:
            raise ValueError(f"planned steps {total}: must be at least 1")
        if not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f"final ratio {final_ratio}: must be in [0, 1]")
        self.kind = kind
        self.total = total
        self.final_ratio = final_ratio

    def factor(self, t: int) -> float:
        """The factor of the step taken after ``t`` steps."""
        if self.kind == "constant":
            return 1.0
        p = min(max(t, 0) / self.total, 1.0)
        r = self.final_ratio
        if self.kind == "linear":
            return 1.0 - (1.0 - r) * p
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))
