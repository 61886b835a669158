"""The epoch ledger: what happens between two epochs, for the local loop and Ray workers.

After each epoch's training: the epoch's loss must be finite; validation decides whether
the epoch is the best so far (higher mean AUC; an undefined AUC keeps the latest epoch);
then ``checkpoints/best.pt`` (when it improved), the ``metrics.jsonl`` line, and
``checkpoints/last.pt``, in that order: a crash before ``last.pt`` is saved redoes the
epoch on resume, which drops lines past the checkpoint's epoch (no gap, no duplicate).
Training stops after ``training.early_stopping_patience`` epochs without improvement.

With ``training.validate_every_steps`` set, validation also runs inside an epoch, after
every that many steps (a point that falls on the epoch's last step is the epoch-end one):
each point may write ``best.pt`` and writes its own ``metrics.jsonl`` line (``epoch``:
the epoch in progress, ``step``: training steps since the run began), and patience
counts validation points (with ``training.reset_embeddings_each_epoch``, from the second
epoch on it ends a run at epoch ends only, :meth:`EpochLedger.stops_mid_epoch`).
``last.pt``, the resume point, is written at epoch ends only, so a resumed run redoes
the interrupted epoch (its mid-epoch lines are dropped and written again, identically).
When patience runs out at a mid-epoch point, the epoch ends there: that point's line is
the epoch's line and ``last.pt`` is written, so the finished run resumes to nothing.

:class:`LossWatch` reads the loss as training goes: a running mean two orders of
magnitude above its lowest warns; a non-finite value, or a running mean six orders of
magnitude above its lowest, stops training (:class:`~mtrec.errors.DivergenceError`)
before the epoch is written: the last good checkpoint stays.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtrec.checkpoint import best_path, last_path, save_checkpoint
from mtrec.config import ExperimentConfig
from mtrec.errors import DivergenceError
from mtrec.io import to_json
from mtrec.run import METRICS_FILE, config_hash, trim_metrics

__all__ = [
    "LOSS_RISE_FACTOR",
    "LOSS_STOP_FACTOR",
    "EpochLedger",
    "LoopState",
    "LossWatch",
    "diverged_message",
    "log",
    "mean_auc",
    "nonfinite_loss",
    "short_metrics",
]

# a running-mean loss this many times its lowest so far warns (two orders of magnitude)
LOSS_RISE_FACTOR = 100.0
# ... and this many times stops training as diverged (six orders of magnitude)
LOSS_STOP_FACTOR = 1e6
# weight of the newest reading in the running mean
_LOSS_EMA = 0.1


def log(message: str) -> None:
    """One ``[mtrec]`` line on stderr (Ray forwards a worker's to the driver)."""
    sys.stderr.write(f"[mtrec] {message}\n")
    sys.stderr.flush()


def mean_auc(metrics: dict[str, dict[str, Any]]) -> float:
    """Mean AUC over the tasks whose AUC is defined (NaN when none is)."""
    aucs = [m["auc"] for m in metrics.values() if not math.isnan(m["auc"])]
    return float(np.mean(aucs)) if aucs else float("nan")


def short_metrics(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The per-task metrics a metrics.jsonl line and the summary keep, rounded."""
    keys = ("auc", "logloss", "oracle_auc")
    return {t: {k: round(float(m[k]), 6) for k in keys if k in m} for t, m in metrics.items()}


@dataclass
class LoopState:
    """Where a run stands (saved in ``last.pt`` under ``"loop"``)."""

    epoch: int = 0  # epochs completed
    best_epoch: int = -1  # 1-based epoch of the best validation (in progress, if mid-epoch)
    best_step: int = -1  # training steps done at the best validation
    step: int = 0  # training steps done (global: every worker takes each step)
    best_auc: float = -math.inf
    best_valid: dict[str, Any] | None = None
    bad_epochs: int = 0
    train_samples: int = 0
    train_seconds: float = 0.0

    def summary(self, out: Path, stopped_early: bool) -> dict[str, Any]:
        """The run summary (the last stdout line of ``mtrec train``) so far."""
        return {
            "run_dir": str(out),
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "epochs_run": self.epoch,
            "stopped_early": stopped_early,
            "valid": self.best_valid or {},
            "samples_per_s": round(self.train_samples / max(self.train_seconds, 1e-9), 1),
        }


class LossWatch:
    """Checks the training loss each time it is read.

    A running mean of the readings above ``LOSS_RISE_FACTOR`` times its lowest value
    warns (once per epoch); a non-finite reading, or a running mean above
    ``LOSS_STOP_FACTOR`` times its lowest (the loss has exploded: no training recovers
    from that), stops training.
    """

    def __init__(self, who: str = "") -> None:
        self.who = who  # e.g. "worker 1/2: " in a Ray worker
        self.running: float | None = None
        self.lowest = math.inf
        self._warned_epoch = -1

    def check(self, value: float, epoch: int, step: int | None = None) -> None:
        """Raise :class:`DivergenceError` when training diverged (see :meth:`verdict`)."""
        error = self.verdict(value, epoch, step)
        if error is not None:
            raise DivergenceError(error)

    def verdict(self, value: float, epoch: int, step: int | None = None) -> str | None:
        """Why training must stop after reading ``value`` at ``epoch`` (0-based) and
        ``step`` (1-based; None: the epoch's mean), or None; warns on a fast rise."""
        if not math.isfinite(value):
            return diverged_message(f"the loss is {value}", epoch, step)
        r = value if self.running is None else (1 - _LOSS_EMA) * self.running + _LOSS_EMA * value
        self.running = r
        self.lowest = min(self.lowest, r)
        if r > LOSS_STOP_FACTOR * self.lowest:
            return diverged_message(
                f"the loss exploded (running mean {r:.4g}, {r / self.lowest:.3g}x its lowest "
                f"{self.lowest:.4g})",
                epoch,
                step,
            )
        if r > LOSS_RISE_FACTOR * self.lowest and self._warned_epoch != epoch:
            self._warned_epoch = epoch
            log(
                f"{self.who}warning: the training loss is rising fast (running mean {r:.4g} at "
                f"{_where(epoch, step)}, {r / self.lowest:.0f}x its lowest {self.lowest:.4g}); "
                "training may be diverging: lower training.learning_rate or check the data"
            )
        return None


def _where(epoch: int, step: int | None) -> str:
    return f"epoch {epoch + 1}" + (f" step {step}" if step is not None else " (epoch mean)")


def nonfinite_loss(value: float, epoch: int, step: int) -> str | None:
    """The divergence error when the loss read at a mid-epoch validation point is not
    finite (nothing may be written from a diverged model), else None."""
    return None if math.isfinite(value) else diverged_message(f"the loss is {value}", epoch, step)


def diverged_message(what: str, epoch: int, step: int | None = None) -> str:
    """The error of a diverged training: what happened, where, the fix."""
    return (
        f"training diverged: {what} at {_where(epoch, step)}; lower training.learning_rate "
        "or check the data (nothing of this epoch was written; the last good checkpoint, "
        "if any, is kept)"
    )


class EpochLedger:
    """The per-epoch bookkeeping of one run directory (see the module docstring).

    The local loop calls every method; under Ray, rank 0 judges and commits and the
    other ranks take over the state it broadcasts.
    """

    def __init__(self, cfg: ExperimentConfig, out: Path, state: LoopState | None = None) -> None:
        self.cfg = cfg
        self.out = out
        self.state = state or LoopState()
        self.chash = config_hash(cfg)
        self.stopped_early = False
        # the epochs' mean losses: the same values on every Ray rank, so every rank
        # reaches the same verdict
        self.epoch_losses = LossWatch()

    @property
    def metrics_file(self) -> Path:
        return self.out / METRICS_FILE

    def trim(self) -> None:
        """On (re)start: drop metrics lines past the epoch ``last.pt`` holds."""
        trim_metrics(self.metrics_file, self.state.epoch)

    def another_epoch(self, done_this_call: int, stop_after: int | None) -> bool:
        """Whether to train one more epoch (sets ``stopped_early`` on patience)."""
        if self.state.epoch >= self.cfg.training.epochs:
            return False
        if self.out_of_patience():
            self.stopped_early = True
            return False
        return stop_after is None or done_this_call < stop_after

    def out_of_patience(self) -> bool:
        """Whether ``early_stopping_patience`` validations in a row brought no improvement."""
        return self.state.bad_epochs >= self.cfg.training.early_stopping_patience > 0

    def stops_mid_epoch(self, epoch: int) -> bool:
        """Whether patience ends the run at a mid-epoch validation point of ``epoch``
        (0-based). Not in an epoch that began with fresh embedding tables
        (``training.reset_embeddings_each_epoch``: every epoch but the first): its early
        points judge tables that have seen part of one pass, so there patience is checked
        at the epoch's end (:meth:`another_epoch`)."""
        if self.cfg.training.reset_embeddings_each_epoch and epoch > 0:
            return False
        return self.out_of_patience()

    def validate_after(self, steps: int) -> bool:
        """Whether a mid-epoch validation falls after the epoch's ``steps``-th step (it runs
        before the next step, so a point on the epoch's last step is the epoch-end one)."""
        every = self.cfg.training.validate_every_steps
        return every is not None and steps % every == 0

    def check_loss(self, record: dict[str, Any], epoch: int, first_loss: float) -> None:
        """Raise :class:`DivergenceError` when the epoch's mean loss is not finite or has
        exploded against the loss of the epoch's first step (``first_loss``, read before
        the epoch's updates), or against earlier epochs. A NaN between two readings ends
        here, before anything of the epoch is written."""
        self.epoch_losses.check(first_loss, epoch, 1)
        self.epoch_losses.check(record["loss"], epoch)

    def judge(self, record: dict[str, Any], metrics: dict[str, dict[str, Any]] | None) -> bool:
        """Validation metrics into ``record``; whether this epoch is the best so far. Updates
        the state (best epoch, patience count)."""
        st = self.state
        improved = True
        if metrics is not None:
            auc = mean_auc(metrics)
            record["valid"] = short_metrics(metrics)
            record["valid_mean_auc"] = round(auc, 6)
            if math.isnan(auc):
                # no task has both classes in the validation split: AUC says nothing, so
                # keep the latest epoch as "best" rather than never writing best.pt
                one_class = [t for t, m in metrics.items() if math.isnan(m["auc"])]
                log(f"warning: validation AUC undefined (one class) for {one_class}")
            else:
                improved = auc > st.best_auc
            if improved:
                st.best_auc, st.best_valid = auc, short_metrics(metrics)
        if improved:
            st.best_epoch, st.best_step, st.bad_epochs = record["epoch"], record["step"], 0
        else:
            st.bad_epochs += 1
        return improved

    def note(self, record: dict[str, Any], improved: bool, model_state: dict[str, Any]) -> None:
        """Write a mid-epoch validation point: ``best.pt`` (when improved), its metrics line."""
        self._write(record, improved, model_state)

    def commit(
        self,
        record: dict[str, Any],
        improved: bool,
        train_state: dict[str, Any],
        best_model_state: dict[str, Any] | None = None,
    ) -> None:
        """Write the epoch: ``best.pt`` (when improved), the metrics line, ``last.pt``.
        ``train_state``: the whole training state (``"model"`` and the optimizers);
        ``best_model_state``: the model state validated and so written to ``best.pt``
        (default ``train_state["model"]``; the dense average with ``training.ema_decay``)."""
        best = train_state["model"] if best_model_state is None else best_model_state
        self._write(record, improved, best)
        save_checkpoint(
            {**train_state, "loop": self.state.__dict__.copy(), "config_hash": self.chash},
            last_path(self.out),
        )

    def _write(self, record: dict[str, Any], improved: bool, model_state: dict[str, Any]) -> None:
        st = self.state
        if improved:
            save_checkpoint(
                {
                    "model": model_state,
                    "epoch": record["epoch"],
                    "step": record["step"],
                    "config_hash": self.chash,
                    "valid": st.best_valid,
                },
                best_path(self.out),
            )
        with open(self.metrics_file, "a") as fh:
            fh.write(to_json(record) + "\n")
        # the console line leaves out the (long) expert diagnostics; metrics.jsonl has them
        shown = {k: v for k, v in record.items() if k != "diagnostics"}
        log(f"epoch {record['epoch']}: " + to_json(shown))

    def summary(self) -> dict[str, Any]:
        return self.state.summary(self.out, self.stopped_early)
