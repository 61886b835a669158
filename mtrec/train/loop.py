"""The local (single-process) training loop.

One epoch = one pass over the training split in a seeded order (the order and
dropout depend only on ``seed`` and the epoch number, so a resumed run
reproduces an uninterrupted one). After each epoch: validation, a line in
``metrics.jsonl``, ``checkpoints/last.pt``, and ``checkpoints/best.pt`` when
the mean validation AUC improved; training stops early after
``training.early_stopping_patience`` epochs without improvement.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mtrec.config import ExperimentConfig, config_to_dict, load_config, parse_config
from mtrec.data.batcher import encoded_chunks, iter_batches, load_encoded
from mtrec.data.encode import EncodedChunk
from mtrec.data.fitting import fit_statistics
from mtrec.data.readers import read_schema
from mtrec.data.spec import FeatureSpec
from mtrec.data.vocab import load_kept_ids, save_kept_ids
from mtrec.evaluate.predict import evaluate_split
from mtrec.evaluate.slices import SEEN_IDS_FILE, fit_seen_ids, save_seen_ids
from mtrec.io import atomic_write_text, to_json
from mtrec.model import MultiTaskModel, build_model
from mtrec.multitask.diagnostics import model_diagnostics
from mtrec.train.checkpoint import (
    CheckpointError,
    best_path,
    last_path,
    load_checkpoint,
    save_checkpoint,
)
from mtrec.train.progress import Progress
from mtrec.train.step import TrainStep

__all__ = [
    "RunError",
    "config_hash",
    "load_run_config",
    "load_trained_model",
    "run_config_hash",
    "train",
]


VOCAB_FILE = "feature_vocab.pt"


class RunError(RuntimeError):
    """A problem with a run directory (exists, mismatched, incomplete)."""


# keys that may change when a run is resumed (how long / how it runs, not what it learns)
_RUN_LENGTH_KEYS = (
    "epochs",
    "early_stopping_patience",
    "threads",
    "eval_batch_size",
    "progress",
    "log_every_steps",
)


def config_hash(cfg: ExperimentConfig | dict[str, Any]) -> str:
    """Hash of a resolved config, ignoring keys that do not change the result.

    Only keys that differ from their schema defaults count, so a later mtrec that adds
    config keys (with defaults) still matches, resumes and pools older runs. A dict (a
    run's stored ``config.yaml``) is validated first.
    """
    if not isinstance(cfg, ExperimentConfig):
        cfg = parse_config(dict(cfg), source="config.yaml")
    raw = config_to_dict(cfg, drop_defaults=True)
    raw["training"] = {
        k: v for k, v in raw.get("training", {}).items() if k not in _RUN_LENGTH_KEYS
    }
    blob = json.dumps(raw, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_config_hash(run_dir: str | Path) -> str:
    """Hash of the config stored in ``run_dir/config.yaml``, as written at training time."""
    return config_hash(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise RunError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_config(path)


def _mean_auc(metrics: dict[str, dict[str, Any]]) -> float:
    aucs = [m["auc"] for m in metrics.values() if not math.isnan(m["auc"])]
    return float(np.mean(aucs)) if aucs else float("nan")


def _short(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ("auc", "logloss", "oracle_auc")
    return {t: {k: round(float(m[k]), 6) for k in keys if k in m} for t, m in metrics.items()}


@dataclass
class _State:
    epoch: int = 0  # epochs completed
    best_epoch: int = -1
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
            "epochs_run": self.epoch,
            "stopped_early": stopped_early,
            "valid": self.best_valid or {},
            "samples_per_s": round(self.train_samples / max(self.train_seconds, 1e-9), 1),
        }


def _check_run_dir(cfg: ExperimentConfig, out: Path, resume: bool) -> dict[str, Any] | None:
    """Check (reading only) that ``out`` can take this run; returns the checkpoint to
    resume from, if any."""
    if last_path(out).exists():
        if not resume:
            raise RunError(
                f"{out}: already holds a training run; pass --resume to continue it or choose "
                "another --out (nothing was changed)"
            )
        state = load_checkpoint(last_path(out))
        if state.get("config_hash") != config_hash(cfg):
            raise RunError(
                f"{out}: the checkpoint was trained with a different config "
                f"({state.get('config_hash')} != {config_hash(cfg)}); use another --out"
            )
        return state
    if out.exists() and any(out.iterdir()) and not resume:
        raise RunError(f"{out}: directory exists and is not empty; choose another --out")
    return None


def _trim_metrics(path: Path, epochs: int) -> None:
    """Keep the metrics.jsonl lines of the first ``epochs`` epochs (those last.pt holds)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= epochs]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _update_run_length(cfg: ExperimentConfig, out: Path) -> None:
    """On resume, record changed run-length keys (e.g. more epochs) in config.yaml."""
    stored = yaml.safe_load((out / "config.yaml").read_text())
    new = config_to_dict(cfg)
    keys = ("epochs", "early_stopping_patience", "threads", "eval_batch_size")
    if any(stored.get("training", {}).get(k) != new["training"][k] for k in keys):
        stored.setdefault("training", {}).update({k: new["training"][k] for k in keys})
        atomic_write_text(out / "config.yaml", yaml.safe_dump(stored, sort_keys=False))


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


def write_run_files(
    cfg: ExperimentConfig, spec: FeatureSpec, out: Path, resume_state: dict[str, Any] | None
) -> None:
    """A new run: write config.yaml, the fitted statistics and kept ids. A resumed run:
    load them into ``spec`` and record changed run-length keys."""
    stats_file = out / "feature_stats.json"
    if resume_state is not None:
        spec.load_stats(stats_file)
        spec.kept_ids = load_kept_ids(out / VOCAB_FILE, spec)
        _update_run_length(cfg, out)
    else:  # fitted in train(), before the run directory was touched
        spec.save_stats(stats_file)
        if spec.kept_ids:
            save_kept_ids(spec.kept_ids, out / VOCAB_FILE)
        save_seen_ids(fit_seen_ids(spec, cfg.dataset.train), out / SEEN_IDS_FILE)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


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
    """
    wall_start = time.perf_counter()
    tr = cfg.training
    out = Path(out) if out else Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    torch.set_num_threads(tr.threads)

    existed = out.exists()
    resume_state = _check_run_dir(cfg, out, resume)
    spec = FeatureSpec.from_config(cfg)
    # Validate the data (schema and values) before touching the run directory. Encoding
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

    out.mkdir(parents=True, exist_ok=True)
    try:
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
    except BaseException:
        if resume_state is None and not last_path(out).exists():
            # this call created the run and completed no epoch: leave no half-made run behind
            for name in (
                "config.yaml",
                "feature_stats.json",
                VOCAB_FILE,
                SEEN_IDS_FILE,
                "metrics.jsonl",
            ):
                (out / name).unlink(missing_ok=True)
            for sub in (out / "checkpoints", out):
                if sub.exists() and not any(sub.iterdir()) and (sub != out or not existed):
                    sub.rmdir()
        raise


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

    trainer = TrainStep(cfg, spec)
    model = trainer.model
    st = _State()
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        st = _State(**resume_state["loop"])

    metrics_file = out / "metrics.jsonl"
    if resume_state is not None:
        _trim_metrics(metrics_file, st.epoch)
    epochs_this_call = 0
    stopped_early = False
    while st.epoch < tr.epochs:
        if st.bad_epochs >= tr.early_stopping_patience > 0:
            stopped_early = True
            break
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            break
        epoch = st.epoch
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout stream of this epoch
        model.train()
        seen, steps = 0, 0
        loss_sum = torch.zeros(())
        t0 = time.perf_counter()
        total_rows = train_source.rows if isinstance(train_source, EncodedChunk) else None
        bar = Progress(f"epoch {epoch + 1}/{tr.epochs}", total=total_rows, enabled=tr.progress)
        for batch in iter_batches(
            train_source,
            spec,
            tr.batch_size,
            shuffle=True,
            seed=cfg.seed * 1000 + epoch,
            chunk_rows=chunk_rows,
        ):
            loss = trainer.step(batch)
            loss_sum += loss.detach() * batch.batch_size  # read once per epoch, not per step
            steps += 1
            seen += batch.batch_size
            loss_value = None
            if steps % tr.log_every_steps == 0 or steps == 1:
                # reading the loss syncs; do it every few steps, not every step
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"training loss is {loss_value} at epoch {epoch + 1} step {steps}; "
                        "lower training.learning_rate or check the data"
                    )
            bar.update(batch.batch_size, loss_value)
            if tr.max_steps_per_epoch and steps >= tr.max_steps_per_epoch:
                break
        bar.close()
        epoch_seconds = time.perf_counter() - t0
        st.train_samples += seen
        st.train_seconds += epoch_seconds
        st.epoch = epoch + 1
        epochs_this_call += 1

        record: dict[str, Any] = {
            "epoch": st.epoch,
            "train_rows": seen,
            "train_seconds": round(epoch_seconds, 3),
            "samples_per_s": round(seen / max(epoch_seconds, 1e-9), 1),
            "loss": round(float(loss_sum) / max(seen, 1), 6),  # mean over the epoch's rows
        }
        improved = True
        if valid_source is not None:
            valid = evaluate_split(model, spec, valid_source, tr.eval_batch_size)
            mean_auc = _mean_auc(valid)
            record["valid"] = _short(valid)
            record["valid_mean_auc"] = round(mean_auc, 6)
            health = block_health(model, spec, valid_source)
            if health is not None:
                record["diagnostics"] = health
            if math.isnan(mean_auc):
                # no task has both classes in the validation split: AUC says nothing, so
                # keep the latest epoch as "best" rather than never writing best.pt
                one_class = [t for t, m in valid.items() if math.isnan(m["auc"])]
                print(
                    f"[mtrec] warning: validation AUC undefined (one class) for {one_class}",
                    file=sys.stderr,
                    flush=True,
                )
                improved = True
            else:
                improved = mean_auc > st.best_auc
            if improved:
                st.best_auc, st.best_valid = mean_auc, _short(valid)
        if improved:
            st.best_epoch, st.bad_epochs = st.epoch, 0
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "epoch": st.epoch,
                    "config_hash": config_hash(cfg),
                    "valid": st.best_valid,
                },
                best_path(out),
            )
        else:
            st.bad_epochs += 1
        # the line goes first: a crash before last.pt is saved redoes this epoch on resume,
        # and the resume drops lines past the checkpoint's epoch (no gap, no duplicate)
        with open(metrics_file, "a") as fh:
            fh.write(to_json(record) + "\n")
        save_checkpoint(
            {
                **trainer.state_dict(),
                "loop": st.__dict__.copy(),
                "config_hash": config_hash(cfg),
            },
            last_path(out),
        )
        # the console line leaves out the (long) expert diagnostics; metrics.jsonl has them
        shown = {k: v for k, v in record.items() if k != "diagnostics"}
        print(f"[mtrec] epoch {st.epoch}: " + to_json(shown), file=sys.stderr, flush=True)

    if st.best_epoch < 0:
        raise CheckpointError(f"{out}: no epoch completed; nothing to summarise")
    return {**st.summary(out, stopped_early), "wall_s": round(time.perf_counter() - wall_start, 2)}


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


def load_trained_model(run_dir: str | Path) -> tuple[ExperimentConfig, FeatureSpec, MultiTaskModel]:
    """The best model of a run (plain, unfused modules) in eval mode."""
    cfg = load_run_config(run_dir)
    spec = FeatureSpec.from_config(cfg)
    spec.load_stats(Path(run_dir) / "feature_stats.json")
    spec.kept_ids = load_kept_ids(Path(run_dir) / VOCAB_FILE, spec)
    state = load_checkpoint(best_path(run_dir))
    if state.get("config_hash") != run_config_hash(run_dir):
        raise CheckpointError(
            f"{best_path(run_dir)}: checkpoint does not match {run_dir}/config.yaml "
            "(config hash differs); the run directory was modified"
        )
    model = build_model(cfg, spec)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{best_path(run_dir)}: weights do not fit the model of config.yaml: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    model.trained_epoch = int(state.get("epoch", -1))
    model.eval()
    return cfg, spec, model
