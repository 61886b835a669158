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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from mtrec.config.schema import TrainingConfig

__all__ = ["LrSchedule", "ScheduleKind", "ScheduledRates", "planned_steps", "scheduled_rates"]

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


class ScheduledRates:
    """An :class:`LrSchedule` applied to optimizer parameter groups: :meth:`apply` sets each
    group's rate to its configured rate (read once, when built) times the schedule's factor.

    Args:
        schedule: the factor per step.
        groups: returns the groups to scale, in a fixed order (called on every
            :meth:`apply`: loading an optimizer's state replaces its group dicts).
        push: called after the rates are set, for optimizers that read a group's rate only
            in their own ``step`` (torchrec's fused tables hand it to FBGEMM's kernel there).
    """

    def __init__(
        self,
        schedule: LrSchedule,
        groups: Callable[[], list[dict[str, Any]]],
        push: Callable[[], None] | None = None,
    ) -> None:
        self.schedule = schedule
        self.groups = groups
        self.push = push
        self.base = [float(group["lr"]) for group in groups()]

    def apply(self, steps: int) -> None:
        """The rates of the step taken after ``steps`` steps."""
        factor = self.schedule.factor(steps)
        for group, base in zip(self.groups(), self.base, strict=True):
            group["lr"] = base * factor
        if self.push is not None:
            self.push()


def scheduled_rates(
    training: TrainingConfig,
    planned: int | None,
    dense: Optimizer,
    tables: Sequence[Any] = (),
) -> ScheduledRates | None:
    """``training.lr_schedule`` over ``planned`` steps for the dense optimizer and, with
    ``training.lr_schedule_embeddings``, the fused ``tables`` optimizers (torchrec keyed
    optimizers, whose ``step()`` hands the new rate to FBGEMM); None when constant. Local
    and sharded training build theirs here, so both decay the same rates alike."""
    if training.lr_schedule == "constant":
        return None
    if planned is None:
        raise ValueError(f"training.lr_schedule: {training.lr_schedule} needs the planned steps")
    fused = list(tables) if training.lr_schedule_embeddings else []

    def groups() -> list[dict[str, Any]]:
        return [*dense.param_groups, *(g for table in fused for g in table.param_groups)]

    def push() -> None:
        for table in fused:
            table.step()

    schedule = LrSchedule(training.lr_schedule, planned, training.lr_final_ratio)
    return ScheduledRates(schedule, groups, push if fused else None)
