"""What the optional training features add to a step's state (``last.pt``, the Ray
checkpoints): the step count that drives ``training.lr_schedule`` and the dense average
of ``training.ema_decay``. Shared by the local and the sharded step, so a run resumes
across them either way."""

from __future__ import annotations

from typing import Any

from mtrec.train.averaging import DenseAverage
from mtrec.train.schedule import ScheduledRates

__all__ = ["load_options_state", "options_state"]


def options_state(
    steps: int, rates: ScheduledRates | None, average: DenseAverage | None
) -> dict[str, Any]:
    """``{"steps": ..., "planned_steps": ...}`` with a schedule, ``{"dense_average": ...}``
    with the average; no key for an option that is off (a state without them is the layout
    of runs without)."""
    state: dict[str, Any] = {}
    if rates is not None:
        state["steps"] = steps
        state["planned_steps"] = rates.schedule.total
    if average is not None:
        state["dense_average"] = average.state_dict()
    return state


def load_options_state(
    state: dict[str, Any], rates: ScheduledRates | None, average: DenseAverage | None
) -> int:
    """Restore :func:`options_state` into ``rates`` and ``average``; the step count.

    Call it after loading the optimizers: their loaded groups carry the saved rates, which
    the schedule then sets from the step count. A run resumed under another plan (another
    worker count, whose shards take other steps per epoch) keeps its progress through the
    plan: the saved count is rescaled to this one."""
    steps = int(state.get("steps", 0))
    if rates is not None:
        plan, saved_plan = rates.schedule.total, int(state.get("planned_steps") or 0)
        if saved_plan and saved_plan != plan:
            steps = round(steps * plan / saved_plan)
        rates.apply(steps)
    if average is not None:
        if "dense_average" not in state:
            raise ValueError("this state holds no dense average (training.ema_decay)")
        average.load_state_dict(state["dense_average"])
    return steps
