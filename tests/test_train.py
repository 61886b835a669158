"""The local training loop: learning, resume, early stopping, run-directory safety."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from helpers import (
    assert_same_weights,
    copy_run,
    read_metrics,
    small_config,
    small_data_dir,
    snapshot,
    trained_run,
)

from mtrec.config import load_config
from mtrec.data.batcher import load_encoded
from mtrec.data.errors import DataError
from mtrec.evaluate.predict import evaluate_split
from mtrec.train.checkpoint import CheckpointError
from mtrec.train.loop import RunError, config_hash, load_run_config, load_trained_model, train

RECORD_KEYS = {
    "epoch",
    "train_rows",
    "train_seconds",
    "samples_per_s",
    "loss",
    "valid",
    "valid_mean_auc",
}
SUMMARY_KEYS = {"run_dir", "best_epoch", "valid", "samples_per_s", "wall_s"}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory)


# ------------------------------------------------------------------------------ learning


def test_training_beats_chance_on_planted_data(synth_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(synth_dir, tmp_path, training={"epochs": 2, "max_steps_per_epoch": 40})
    summary = train(cfg, tmp_path / "run")
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["epochs_run"] == 2 and summary["stopped_early"] is False
    records = read_metrics(tmp_path / "run")
    assert [r["train_rows"] for r in records] == [40 * 256] * 2
    final = records[-1]
    assert final["valid_mean_auc"] > 0.6, final
    assert set(final["valid"]) == set(cfg.task_names)
    for task, m in final["valid"].items():
        assert m["auc"] > 0.55, (task, m)
        # the planted probabilities bound what any model can reach
        assert m["auc"] < m["oracle_auc"] + 0.02, (task, m)
    # better than the best constant prediction (the valid split's base rate)
    valid = pl.read_parquet(cfg.dataset.valid)
    for task in cfg.task_names:
        p = float(valid[task].mean())
        constant = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        assert final["valid"][task]["logloss"] < constant, task
    # best epoch is the one with the highest mean validation AUC
    best = max(records, key=lambda r: r["valid_mean_auc"])
    assert summary["best_epoch"] == best["epoch"]
    assert summary["valid"] == best["valid"]


def test_run_directory_layout_and_metrics(run: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "feature_stats.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best.pt").is_file()
    assert (run / "checkpoints" / "last.pt").is_file()
    assert not [p for p in run.rglob("*.tmp")], "temporary files left behind"
    cfg = load_run_config(run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == cfg.training.epochs
    for i, line in enumerate(lines, start=1):
        record = json.loads(line)
        assert RECORD_KEYS <= record.keys()
        assert record["epoch"] == i
        assert record["train_rows"] > 0 and record["samples_per_s"] > 0
        assert math.isfinite(record["loss"])
        assert set(record["valid"]) == set(cfg.task_names)
        for m in record["valid"].values():
            assert {"auc", "logloss", "oracle_auc"} <= m.keys()
            assert 0.0 <= m["auc"] <= 1.0 and m["logloss"] > 0
        aucs = [m["auc"] for m in record["valid"].values()]
        assert record["valid_mean_auc"] == pytest.approx(sum(aucs) / len(aucs), abs=1e-5)
        # expert health of the block (MMoE here) on the first validation rows, every epoch
        health = record["diagnostics"]
        experts = [f"expert{i}" for i in range(cfg.model.multitask.num_experts)]
        assert list(health["experts"]) == experts
        assert all(0.0 <= h["dead_fraction"] <= 1.0 for h in health["experts"].values())
        assert set(health["gates"]) == {f"task:{t}" for t in cfg.task_names}
        for gate in health["gates"].values():
            assert gate["experts"] == experts and sum(gate["mean_weight"]) == pytest.approx(1)
            assert 0.0 <= gate["entropy"] <= math.log(len(experts)) + 1e-6
        for shares in health["shared_usage"].values():
            assert sum(shares.values()) == pytest.approx(1, abs=1e-3)


def test_checkpoints_load_safely(run: Path) -> None:
    cfg = load_run_config(run)
    best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "epoch", "config_hash", "valid"} <= best.keys()
    assert {"model", "dense_optimizer", "sparse_optimizer", "loop", "config_hash"} <= last.keys()
    assert best["config_hash"] == last["config_hash"] == config_hash(cfg)
    assert last["loop"]["epoch"] == cfg.training.epochs
    assert best["epoch"] == last["loop"]["best_epoch"]
    assert all(isinstance(v, torch.Tensor) for v in best["model"].values())
    # the sparse (fused row-wise Adagrad) optimizer state is saved too
    assert last["sparse_optimizer"]


def test_best_checkpoint_reproduces_its_recorded_validation_metrics(run: Path) -> None:
    cfg, spec, model = load_trained_model(run)
    assert not model.training
    best_epoch = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"]
    record = next(r for r in read_metrics(run) if r["epoch"] == best_epoch)
    valid = load_encoded(spec, cfg.dataset.valid, cfg.dataset.chunk_rows)
    metrics = evaluate_split(model, spec, valid, cfg.training.eval_batch_size)
    for task, m in record["valid"].items():
        assert metrics[task]["auc"] == pytest.approx(m["auc"], abs=2e-6)
        assert metrics[task]["logloss"] == pytest.approx(m["logloss"], abs=2e-6)


# -------------------------------------------------------------------------------- resume


def test_resume_reproduces_an_uninterrupted_run(data: Path, tmp_path: Path) -> None:
    cfg = small_config(data, tmp_path, training={"epochs": 3, "max_steps_per_epoch": 6})
    straight = train(cfg, tmp_path / "a")
    first = train(cfg, tmp_path / "b", stop_after_epochs=1)
    assert first["epochs_run"] == 1
    assert len(read_metrics(tmp_path / "b")) == 1
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert resumed["epochs_run"] == straight["epochs_run"] == 3
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert ra["valid"] == rb["valid"], ra["epoch"]
        assert ra["loss"] == rb["loss"] and ra["train_rows"] == rb["train_rows"]
    assert straight["best_epoch"] == resumed["best_epoch"]
    assert straight["valid"] == resumed["valid"]
    for name in ("best.pt", "last.pt"):
        assert_same_weights(
            weights(tmp_path / "a" / "checkpoints" / name),
            weights(tmp_path / "b" / "checkpoints" / name),
        )
    # the validation metrics move across epochs: the check above is not vacuous
    assert len({r["valid_mean_auc"] for r in a}) > 1


def test_resume_of_finished_run_ignores_cosmetic_keys(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    before = snapshot(copy)
    cfg = load_run_config(copy)
    cfg.training.progress = not cfg.training.progress
    cfg.training.log_every_steps = 7
    summary = train(cfg, copy, resume=True)
    assert summary["epochs_run"] == cfg.training.epochs
    best = torch.load(copy / "checkpoints" / "best.pt", weights_only=True)
    assert summary["best_epoch"] == best["epoch"]
    assert snapshot(copy) == before


def test_resume_with_changed_config_is_refused(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    before = snapshot(copy)
    cfg = load_config(copy / "config.yaml", overrides=["training.learning_rate=0.5"])
    with pytest.raises(RunError, match="different config"):
        train(cfg, copy, resume=True)
    assert snapshot(copy) == before


# ------------------------------------------------------------------------ early stopping


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_when_validation_stalls(data: Path, tmp_path: Path, patience: int) -> None:
    # every task weight 0: the loss and all gradients are exactly 0, so the model (and the
    # validation AUC) never changes and no epoch after the first improves (with MEDA's
    # fresh tables each epoch off: a new draw would change the scores)
    tasks = [
        {"name": t, "label": t, "true_prob": f"p_{t}", "weight": 0.0} for t in ("click", "like")
    ]
    cfg = small_config(
        data,
        tmp_path,
        tasks=tasks,
        training={
            "epochs": 6,
            "max_steps_per_epoch": 3,
            "early_stopping_patience": patience,
            "reset_embeddings_each_epoch": False,
        },
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["stopped_early"] is True
    assert summary["epochs_run"] == 1 + patience < cfg.training.epochs
    assert summary["best_epoch"] == 1
    records = read_metrics(tmp_path / "run")
    assert len(records) == 1 + patience
    assert all(r["valid"] == records[0]["valid"] for r in records)


def test_no_early_stopping_with_patience_zero(data: Path, tmp_path: Path) -> None:
    tasks = [{"name": "click", "label": "click", "weight": 0.0}]
    cfg = small_config(
        data,
        tmp_path,
        tasks=tasks,
        training={
            "epochs": 3,
            "max_steps_per_epoch": 2,
            "early_stopping_patience": 0,
            "reset_embeddings_each_epoch": False,  # the model never changes (as above)
        },
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["stopped_early"] is False and summary["epochs_run"] == 3
    assert summary["best_epoch"] == 1


# ------------------------------------------------------------------ run-directory safety


def test_training_into_an_existing_run_is_refused(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    before = snapshot(copy)
    cfg = load_run_config(copy)
    with pytest.raises(RunError, match="already holds a training run"):
        train(cfg, copy)
    assert snapshot(copy) == before


def test_training_into_a_non_empty_directory_is_refused(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = small_config(data, tmp_path)
    with pytest.raises(RunError, match="not empty"):
        train(cfg, out)
    assert snapshot(out) == {"notes.txt": b"keep me"}


def bad_copy(data: Path, dest: Path, column: str, value: object, row: int = 5) -> Path:
    shutil.copytree(data, dest)
    df = pl.read_parquet(dest / "train.parquet")
    dtype = df.schema[column]
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()) == row)
        .then(pl.lit(value, dtype=dtype))
        .otherwise(pl.col(column))
        .alias(column)
    )
    df.write_parquet(dest / "train.parquet")
    return dest


def test_missing_column_fails_before_the_run_dir_is_created(data: Path, tmp_path: Path) -> None:
    shutil.copytree(data, tmp_path / "data")
    pl.read_parquet(tmp_path / "data" / "train.parquet").drop("c3").write_parquet(
        tmp_path / "data" / "train.parquet"
    )
    cfg = small_config(tmp_path / "data", tmp_path)
    out = tmp_path / "run"
    with pytest.raises(DataError, match="'c3'"):
        train(cfg, out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [("click", 2, "label column 'click'"), ("n0", float("nan"), "non-finite")],
)
def test_bad_values_fail_before_anything_is_written(
    data: Path, tmp_path: Path, column: str, value: object, match: str
) -> None:
    bad = bad_copy(data, tmp_path / "data", column, value)
    cfg = small_config(bad, tmp_path)
    out = tmp_path / "run"
    with pytest.raises(DataError, match=match) as info:
        train(cfg, out)
    assert "row 5" in str(info.value)
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_training_summary_needs_a_completed_epoch(data: Path, tmp_path: Path) -> None:
    cfg = small_config(data, tmp_path, training={"epochs": 1, "max_steps_per_epoch": 1})
    train(cfg, tmp_path / "run", stop_after_epochs=1)
    # resuming a run that already did all its epochs still summarises it
    assert train(cfg, tmp_path / "run", resume=True)["best_epoch"] == 1
    with pytest.raises(CheckpointError, match="no epoch completed"):
        train(cfg, tmp_path / "empty", stop_after_epochs=0)


def test_resume_can_extend_a_finished_run(run: Path, tmp_path: Path) -> None:
    """epochs is a run-length key: resuming with more epochs continues the same run."""
    copy = copy_run(run, tmp_path / "run")
    cfg = load_run_config(copy)
    done = cfg.training.epochs
    cfg.training.epochs = done + 1
    cfg.training.early_stopping_patience = 0
    summary = train(cfg, copy, resume=True)
    assert summary["epochs_run"] == done + 1
    assert load_run_config(copy).training.epochs == done + 1
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == done + 1


def test_config_hash_ignores_keys_at_their_defaults() -> None:
    """A key added later with a default must not change the hash of an older run."""
    from mtrec.config import parse_config

    raw = {
        "dataset": {"train": "/data/t.parquet"},
        "features": [{"name": "a", "kind": "categorical"}],
        "tasks": [{"name": "y"}],
    }
    base = config_hash(parse_config(raw))
    explicit = dict(raw, model={"interaction": {"type": "none"}, "embedding": {"dim": 16}})
    assert config_hash(parse_config(explicit)) == base  # default values spelled out
    assert config_hash(raw) == base  # a stored config.yaml dict
    changed = dict(raw, model={"embedding": {"dim": 8}})
    assert config_hash(parse_config(changed)) != base


def test_resume_after_a_crash_between_metrics_and_checkpoint(run: Path, tmp_path: Path) -> None:
    """A line written for an epoch whose last.pt never landed is dropped, then redone."""
    copy = copy_run(run, tmp_path / "run")
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    ghost = json.loads(lines[-1])
    ghost["epoch"] += 1  # as if the next epoch logged its line and died before last.pt
    (copy / "metrics.jsonl").write_text("\n".join([*lines, json.dumps(ghost)]) + "\n")
    cfg = load_run_config(copy)
    cfg.training.epochs += 1
    cfg.training.early_stopping_patience = 0
    train(cfg, copy, resume=True)
    epochs = [json.loads(ln)["epoch"] for ln in (copy / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, cfg.training.epochs + 1))
