"""The local (single-process) training loop.

One epoch = one pass over the training split in a seeded order (the order and
dropout depend only on ``seed`` and the epoch number, so a resumed run
reproduces an uninterrupted one). After each epoch the
:class:`~mtrec.train.ledger.EpochLedger` validates, writes the ``metrics.jsonl`` line,
``checkpoints/last.pt`` and, when the mean validation AUC improved,
``checkpoints/best.pt``, and stops early after ``training.early_stopping_patience``
epochs without improvement. The run directory (layout, lock, config hash, loading the
trained model) is :mod:`mtrec.run`'s.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from mtrec.checkpoint import CheckpointError, last_path
from mtrec.config import ExperimentConfig
from mtrec.data.batcher import encoded_chunks, iter_batches, load_encoded
from mtrec.data.columns import count_rows
from mtrec.data.encode import EncodedChunk
from mtrec.data.fitting import fit_statistics
from mtrec.data.readers import read_schema
from mtrec.data.spec import FeatureSpec
from mtrec.errors import DivergenceError
from mtrec.model import MultiTaskModel
from mtrec.multitask.diagnostics import model_diagnostics
from mtrec.run import (
    VOCAB_FILE,
    RunError,
    RunLock,
    check_run_dir,
    config_hash,
    load_run_config,
    load_trained_model,
    remove_unfinished_run,
    run_config_hash,
    write_run_files,
)
from mtrec.scoring import evaluate_split
from mtrec.threads import apply_threads, resolve_threads
from mtrec.train.adaptive_threads import AdaptiveThreads
from mtrec.train.ledger import EpochLedger, LoopState, LossWatch, nonfinite_loss
from mtrec.train.progress import Progress
from mtrec.train.schedule import planned_steps
from mtrec.train.step import TrainStep

# the run-directory names used to live here; re-exported so old imports keep working
__all__ = [
    "VOCAB_FILE",
    "RunError",
    "block_health",
    "config_hash",
    "load_run_config",
    "load_trained_model",
    "run_config_hash",
    "train",
    "write_run_files",
]


# the local loop's signature: (cfg, spec, out, resume_state, train_source, valid_source,
# stop_after_epochs, wall_start) -> run summary
Runner = Callable[
    [
        ExperimentConfig,
        FeatureSpec,
        Path,
        dict[str, Any] | None,
        EncodedChunk | str,
        EncodedChunk | None,
        int | None,
        float,
    ],
    dict[str, Any],
]


def train(
    cfg: ExperimentConfig,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` locally; returns the run summary (also the CLI's last stdout line).

    ``stop_after_epochs`` ends this invocation after that many epochs (used to
    test resuming); the run can continue with ``resume=True``.
    ``runner`` (the Ray Train trainer passes one) trains instead of the local loop, once
    the data is validated, the statistics fitted and the run directory checked; it
    takes the local loop's arguments and the training split stays on disk.

    The run directory is locked (:class:`~mtrec.run.RunLock`) for the whole call and
    checked (:func:`~mtrec.run.check_run_dir`) before anything is read or written; a
    call that starts (or restarts) a run and fails before completing an epoch removes
    the files it wrote.
    """
    wall_start = time.perf_counter()
    tr = cfg.training
    out = Path(out) if out else Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    apply_threads(tr)
    if resume and not out.is_dir():  # before the lock, which would create it
        check_run_dir(cfg, out, resume)
    # held until this call returns: a second training into ``out`` fails at once
    with RunLock(out):
        resume_state = check_run_dir(cfg, out, resume)
        try:
            return _prepare_and_run(cfg, out, resume_state, stop_after_epochs, runner, wall_start)
        except BaseException:
            if resume_state is None and not last_path(out).exists():
                # this call (re)started the run and completed no epoch: leave no
                # half-made run behind
                remove_unfinished_run(out)
            raise


def _prepare_and_run(
    cfg: ExperimentConfig,
    out: Path,
    resume_state: dict[str, Any] | None,
    stop_after_epochs: int | None,
    runner: Runner | None,
    wall_start: float,
) -> dict[str, Any]:
    tr = cfg.training
    spec = FeatureSpec.from_config(cfg)
    # Validate the data (schema and values) before writing the run's files. Encoding
    # does not depend on the numeric statistics: the model normalises raw values itself.
    for split in ("train", "valid"):
        path = getattr(cfg.dataset, split)
        if path:
            spec.check_schema(read_schema(spec.scan(path), path), path)
    chunk_rows = cfg.dataset.chunk_rows
    train_source: EncodedChunk | str = cfg.dataset.train
    if tr.cache_in_memory and runner is None:
        train_source = load_encoded(spec, cfg.dataset.train, chunk_rows)
    if resume_state is None:
        # one pass fits the statistics and, encoding every row, validates the values
        fit_statistics(
            spec,
            [train_source]
            if isinstance(train_source, EncodedChunk)
            else encoded_chunks(spec, train_source, chunk_rows),
        )
    valid_source: EncodedChunk | None = None
    if cfg.dataset.valid:
        valid_source = load_encoded(spec, cfg.dataset.valid, chunk_rows)
    return (runner or _train_in)(
        cfg,
        spec,
        out,
        resume_state,
        train_source,
        valid_source,
        stop_after_epochs,
        wall_start,
    )


def _train_in(
    cfg: ExperimentConfig,
    spec: FeatureSpec,
    out: Path,
    resume_state: dict[str, Any] | None,
    train_source: EncodedChunk | str,
    valid_source: EncodedChunk | None,
    stop_after_epochs: int | None,
    wall_start: float,
) -> dict[str, Any]:
    tr = cfg.training
    chunk_rows = cfg.dataset.chunk_rows
    write_run_files(cfg, spec, out, resume_state)

    plan = None
    if tr.lr_schedule != "constant":
        rows = (
            train_source.rows
            if isinstance(train_source, EncodedChunk)
            else count_rows(spec, train_source)
        )
        plan = planned_steps(rows, tr.batch_size, tr.epochs, tr.max_steps_per_epoch)
    trainer = TrainStep(cfg, spec, planned_steps=plan)
    model = trainer.model
    ledger = EpochLedger(cfg, out)
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        ledger.state = LoopState(**resume_state["loop"])
        ledger.trim()
    st = ledger.state
    watch = LossWatch()
    # threads: adaptive — the count follows the step times (None: fixed by apply_threads)
    governor = None
    if tr.threads == "adaptive":
        governor = AdaptiveThreads(resolve_threads(tr.threads))
        if tr.compile:
            governor.keep("training.compile builds its kernels for one thread count")
    # validation scores at one fixed count, whatever the load (see starting_count)
    scoring_threads = governor.starting_count if governor is not None else nullcontext
    epochs_this_call = 0
    while ledger.another_epoch(epochs_this_call, stop_after_epochs):
        epoch = st.epoch
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout stream of this epoch
        if epoch > 0 and tr.reset_embeddings_each_epoch:
            trainer.reset_embeddings(epoch)  # MEDA: this epoch's embeddings learn from one pass
        model.train()
        seen, steps = 0, 0
        loss_sum = torch.zeros(())
        first_loss = float("nan")
        t0 = time.perf_counter()
        total_rows = train_source.rows if isinstance(train_source, EncodedChunk) else None
        bar = Progress(f"epoch {epoch + 1}/{tr.epochs}", total=total_rows, enabled=tr.progress)
        # a mid-epoch validation point that ran out of patience: (record, improved)
        stop_point: tuple[dict[str, Any], bool] | None = None
        loss = torch.zeros(())  # the last step's loss (read at validation points)
        for batch in iter_batches(
            train_source,
            spec,
            tr.batch_size,
            shuffle=True,
            seed=cfg.seed * 1000 + epoch,
            chunk_rows=chunk_rows,
        ):
            if steps and valid_source is not None and ledger.validate_after(steps):
                # before this step, not after the last one: the epoch end validates that
                with scoring_threads():
                    stop_point = _validate_mid_epoch(
                        trainer, spec, valid_source, ledger, loss, epoch, steps
                    )
                if stop_point is not None:
                    break
            if governor is None:
                loss = trainer.step(batch)
            else:
                if not governor.checked:  # which counts train this model bit for bit alike
                    governor.check_repeatable(functools.partial(trainer.trial_gradients, batch))
                t_step = time.perf_counter()
                loss = trainer.step(batch)
                governor.observe(time.perf_counter() - t_step, batch.batch_size)
            loss_sum += loss.detach() * batch.batch_size  # read once per epoch, not per step
            steps += 1
            st.step += 1
            seen += batch.batch_size
            loss_value = None
            if steps % tr.log_every_steps == 0 or steps == 1:
                # reading the loss syncs; do it every few steps, not every step
                loss_value = float(loss.detach())
                watch.check(loss_value, epoch, steps)
                if steps == 1:
                    first_loss = loss_value
            bar.update(batch.batch_size, loss_value)
            if tr.max_steps_per_epoch and steps >= tr.max_steps_per_epoch:
                break
        bar.close()
        epoch_seconds = time.perf_counter() - t0
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": st.step,
            "train_rows": seen,
            "train_seconds": round(epoch_seconds, 3),
            "samples_per_s": round(seen / max(epoch_seconds, 1e-9), 1),
            "loss": round(float(loss_sum) / max(seen, 1), 6),  # mean over the epoch's rows
        }
        if governor is not None:
            record["threads"] = governor.summary()
        ledger.check_loss(record, epoch, first_loss)
        st.train_samples += seen
        st.train_seconds += epoch_seconds
        st.epoch = epoch + 1
        epochs_this_call += 1

        valid, health = None, None
        if valid_source is not None:
            # the weights best.pt would hold, swapped in once; at a fixed thread count
            with scoring_threads(), trainer.averaged():
                if stop_point is None:
                    valid = evaluate_split(model, spec, valid_source, tr.eval_batch_size)
                health = block_health(model, spec, valid_source)
        if stop_point is not None:  # judged already: its validation is the epoch's
            improved = stop_point[1]
            record.update({k: v for k, v in stop_point[0].items() if k.startswith("valid")})
        else:
            improved = ledger.judge(record, valid)
        if health is not None:
            record["diagnostics"] = health
        ledger.commit(record, improved, trainer.state_dict(), trainer.eval_model_state())

    if st.best_epoch < 0:
        raise CheckpointError(f"{out}: no epoch completed; nothing to summarise")
    return {**ledger.summary(), "wall_s": round(time.perf_counter() - wall_start, 2)}


def _validate_mid_epoch(
    trainer: TrainStep,
    spec: FeatureSpec,
    valid: EncodedChunk,
    ledger: EpochLedger,
    loss: torch.Tensor,
    epoch: int,
    steps: int,
) -> tuple[dict[str, Any], bool] | None:
    """Validate inside epoch ``epoch`` (0-based) after its ``steps``-th step: judge, write
    ``best.pt`` when improved and the point's metrics line; returns (record, improved)
    instead of writing when patience ran out (the epoch ends there)."""
    # a non-finite loss must not reach best.pt (an undefined AUC counts as improved)
    error = nonfinite_loss(float(loss.detach()), epoch, steps)
    if error is not None:
        raise DivergenceError(error)
    record: dict[str, Any] = {"epoch": epoch + 1, "step": ledger.state.step, "epoch_step": steps}
    with trainer.averaged():  # the weights best.pt would hold
        metrics = evaluate_split(trainer.model, spec, valid, ledger.cfg.training.eval_batch_size)
    improved = ledger.judge(record, metrics)
    if ledger.stops_mid_epoch(epoch):
        return record, improved
    ledger.note(record, improved, trainer.eval_model_state())
    return None


# rows of the validation split the per-epoch expert diagnostics are measured on
DIAGNOSTIC_ROWS = 4096


def block_health(
    model: MultiTaskModel, spec: FeatureSpec, valid: EncodedChunk
) -> dict[str, Any] | None:
    """Expert-health diagnostics of the multi-task block (dead activations per expert, gate
    weights and entropy, shared experts' use per task; see
    :mod:`mtrec.multitask.diagnostics`) on the first validation rows, in eval mode; None
    for a block without diagnostics."""
    if valid.rows == 0 or not callable(getattr(model.block, "diagnostics", None)):
        return None
    rows = min(DIAGNOSTIC_ROWS, valid.rows)
    batch = next(iter(iter_batches(valid.slice(0, rows), spec, rows)))
    model.eval()
    return model_diagnostics(model, batch)
