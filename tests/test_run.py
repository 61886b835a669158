"""The run directory under faults: a lock per training, --resume only into a run, a
diverging training stopped with the last good checkpoint kept (docs/failure_behaviour.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import copy_run, small_config, small_data_dir, snapshot, trained_run

from mtrec.checkpoint import best_path, last_path, load_checkpoint
from mtrec.cli import main
from mtrec.data.batch import Batch
from mtrec.errors import CheckpointError, DivergenceError, RunError, RunLockedError
from mtrec.run import LOCK_FILE, RunLock, diff_configs, load_run_config, load_trained_model
from mtrec.train.ledger import LossWatch
from mtrec.train.loop import train
from mtrec.train.step import TrainStep

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory)


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("mtrec: error: "), lines
    return lines[-1]


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("train_seconds")
        line.pop("samples_per_s")
    return lines


# ---------------------------------------------------------------------------------- lock


def test_a_second_training_fails_at_once_naming_the_holder(data: Path, tmp_path: Path) -> None:
    cfg = small_config(data, tmp_path)
    out = tmp_path / "run"
    with RunLock(out):
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
        for resume in (False, True):
            started = time.perf_counter()
            with pytest.raises(RunLockedError, match=f"in use by .*pid {os.getpid()}"):
                train(cfg, out, resume=resume)
            assert time.perf_counter() - started < 5  # no waiting, no data read
        # the Ray driver takes the same lock before Ray starts
        from mtrec.train.ray_trainer import train_distributed

        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            train_distributed(cfg, out, workers=1)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    assert not out.exists()  # the lock made the directory and takes it away again


_SLOW_TRAINER = """
import sys, time
from mtrec.train.step import TrainStep
real = TrainStep.step
def slow(self, batch):  # an epoch that takes long
    time.sleep(300)
    return real(self, batch)
TrainStep.step = slow
from mtrec.cli import main
from mtrec.data.batch import Batch
sys.exit(main(sys.argv[1:]))
"""


def test_two_trainings_into_one_out(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real second process holds the run: the second command fails at once naming it;
    SIGKILL releases the lock and leaves a partial run, which --resume starts over."""
    small_config(data, tmp_path, training={"epochs": 1})
    config, out = tmp_path / "small.yaml", tmp_path / "run"
    argv = ["train", "--config", str(config), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_TRAINER, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "config.yaml").exists():  # in epoch 1, holding the lock
            assert proc.poll() is None, "the first training exited early"
            assert time.monotonic() < deadline, "the first training did not start"
            time.sleep(0.2)
        before = snapshot(out)
        for extra in ([], ["--resume"]):
            assert main([*argv, *extra]) == 2
            line = error_line(capsys)
            assert f"in use by another mtrec command (pid {proc.pid} on " in line
            assert "train --config" in line
        assert snapshot(out) == before
    finally:
        proc.kill()  # SIGKILL: no clean-up in the holder
        proc.wait(timeout=60)
    assert main(argv) == 2  # the OS released the lock; the run completed no epoch
    line = error_line(capsys)
    assert "completed no epoch" in line and "--resume" in line
    assert main([*argv, "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["epochs_run"] == 1
    assert not (out / LOCK_FILE).exists()


# -------------------------------------------------------------------------------- resume


def test_resume_into_a_foreign_directory_is_refused_unchanged(data: Path, tmp_path: Path) -> None:
    """The data directory holds a config.yaml (written by `mtrec data synth`) but no run."""
    foreign = shutil.copytree(data, tmp_path / "data")
    before = snapshot(foreign)
    cfg = small_config(foreign, tmp_path)
    with pytest.raises(RunError, match="holds no mtrec run to --resume"):
        train(cfg, foreign, resume=True)
    assert snapshot(foreign) == before
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="holds no mtrec run"):
        train(cfg, tmp_path / "empty", resume=True)
    assert not any((tmp_path / "empty").iterdir())


def test_resume_into_a_missing_directory(data: Path, tmp_path: Path) -> None:
    cfg = small_config(data, tmp_path)
    with pytest.raises(RunError, match="no such run directory to --resume"):
        train(cfg, tmp_path / "nope", resume=True)
    assert not (tmp_path / "nope").exists()


def test_resume_with_fewer_epochs_than_already_run(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    before = snapshot(copy)
    cfg = load_run_config(copy)
    done = cfg.training.epochs
    cfg.training.epochs = done - 1
    with pytest.raises(RunError, match=f"already trained {done} epochs.*training.epochs={done}"):
        train(cfg, copy, resume=True)
    assert snapshot(copy) == before  # config.yaml not rewritten


def test_partial_run_guidance_and_restart(run: Path, tmp_path: Path) -> None:
    """A run killed during epoch 1 (its files, no last.pt): refused with a pointer to
    --resume, which starts it over and reproduces the uninterrupted run."""
    partial = copy_run(run, tmp_path / "run")
    shutil.rmtree(partial / "checkpoints")
    (partial / "metrics.jsonl").unlink()
    before = snapshot(partial)
    cfg = load_run_config(partial)
    with pytest.raises(RunError, match="completed no epoch.*pass --resume to start it over"):
        train(cfg, partial)
    assert snapshot(partial) == before
    train(cfg, partial, resume=True)
    assert records(partial) == records(run)


def test_resume_with_changed_config_names_the_keys(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    before = snapshot(copy)
    cfg = load_run_config(copy)
    cfg.model.embedding.dim += 1
    cfg.tasks[1].weight = 3.0
    cfg.training.epochs += 1  # a run-length key: may change, not listed
    with pytest.raises(RunError, match="different config") as info:
        train(cfg, copy, resume=True)
    changed = str(info.value).split("changed: ", 1)[1].split(". ")[0]
    assert changed == f"model.embedding.dim, tasks[{cfg.tasks[1].name}].weight"
    assert snapshot(copy) == before


def _hash_before_the_default_changes(
    cfg: object, monkeypatch: pytest.MonkeyPatch, first: int = 0
) -> str:
    """The hash an mtrec from before change set ``first`` of DEFAULT_CHANGES wrote: that
    set and every later one at the schema's old defaults."""
    import dataclasses

    from mtrec.config import schema
    from mtrec.run import config_hash

    sections = {
        "model.linear": schema.LinearConfig,
        "model.embedding": schema.EmbeddingConfig,
        "training": schema.TrainingConfig,
    }
    with monkeypatch.context() as m:
        for changes in schema.DEFAULT_CHANGES[first:]:
            for key, old in changes.items():
                section, name = key.rsplit(".", 1)
                (f,) = [f for f in dataclasses.fields(sections[section]) if f.name == name]
                m.setattr(f, "default", old)
        return config_hash(cfg)  # type: ignore[arg-type]


def test_every_generation_of_default_changes_is_accepted(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run hashed between two change sets (the later one's keys at their old defaults,
    the earlier one's at their new) is as valid as one from before all of them."""
    from mtrec.config import schema
    from mtrec.run import config_hashes

    # every changed key at its old value: then no whole section equals its (new) default,
    # and patching the field defaults reproduces each older schema faithfully
    olds = [f"{k}={json.dumps(v)}" for k, v in schema.CHANGED_DEFAULTS.items()]
    cfg = small_config(data, tmp_path, olds)
    accepted = config_hashes(cfg)
    for first in range(len(schema.DEFAULT_CHANGES)):
        assert _hash_before_the_default_changes(cfg, monkeypatch, first) in accepted
    assert len(accepted) == 1 + len(schema.DEFAULT_CHANGES)  # each generation its own hash


def test_a_training_section_left_empty_by_an_old_default_is_still_accepted(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose training keys are all at their defaults (bar run-length keys), written
    before a training default changed: the older mtrec hashed an empty training section,
    which undoing the change must not prune."""
    from mtrec.config import schema
    from mtrec.run import config_hashes

    # the newest change set with a training key, every later one's keys at their old
    # values too (so that no later model key keeps a section non-empty)
    last = max(
        i for i, c in enumerate(schema.DEFAULT_CHANGES) if any(k.startswith("training.") for k in c)
    )
    olds = [f"{k}={json.dumps(v)}" for c in schema.DEFAULT_CHANGES[last:] for k, v in c.items()]
    cfg = small_config(data, tmp_path, olds, training={"batch_size": 1024, "learning_rate": 1e-3})
    assert _hash_before_the_default_changes(cfg, monkeypatch, last) in config_hashes(cfg)


@pytest.mark.parametrize("stored", ["with_the_keys", "before_the_keys_existed"])
def test_a_run_from_before_a_default_change_still_loads_and_resumes(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: str
) -> None:
    """A default that changes (CHANGED_DEFAULTS) must not turn every older run into a
    "modified" one: a run written before the change carries the hash of the old defaults,
    and a config.yaml from before the keys existed is read with their old defaults."""
    import yaml

    from mtrec.run import config_hash

    # what an older mtrec trained by default: no linear term, no id dropout
    old_defaults = [
        "model.linear.enabled=false",
        "model.embedding.id_dropout=0",
        "model.linear.prior_std=null",
        "model.linear.learning_rate=0.05",
        "training.ema_decay=null",
        "model.linear.id_dropout=true",
        "training.reset_embeddings_each_epoch=false",
    ]
    cfg = small_config(data, tmp_path, old_defaults, training={"epochs": 1})
    out = tmp_path / "run"
    train(cfg, out)
    old_hash = _hash_before_the_default_changes(cfg, monkeypatch)
    assert old_hash != config_hash(cfg)  # the case the fallback exists for
    for ckpt in (best_path(out), last_path(out)):
        state = load_checkpoint(ckpt)
        state["config_hash"] = old_hash  # as the older mtrec stamped it
        torch.save(state, ckpt)
    if stored == "before_the_keys_existed":
        raw = yaml.safe_load((out / "config.yaml").read_text())
        del raw["model"]["linear"], raw["model"]["embedding"]["id_dropout"]
        for feature in raw["features"]:
            feature.pop("id_dropout", None)
        (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _, _, model = load_trained_model(out)  # no "config hash differs", no missing weights
    assert model.linear_arch is None
    assert load_run_config(out).model.embedding.id_dropout == 0.0
    cfg.training.epochs = 2
    train(cfg, out, resume=True)  # no "trained with a different config"
    # a config.yaml edited after training is still caught
    stored = (out / "config.yaml").read_text()
    assert "dim: 8" in stored
    # the embedding width (not attention_dim, which must stay divisible by the heads)
    edited = re.sub(r"^(\s+)dim: 8$", r"\1dim: 9", stored, count=1, flags=re.M)
    assert edited != stored
    (out / "config.yaml").write_text(edited)
    with pytest.raises(CheckpointError, match="config hash differs"):
        load_trained_model(out)


def test_diff_configs() -> None:
    old = {"a": {"b": 1, "c": [1, 2]}, "f": [{"name": "x", "d": 1}, {"name": "y", "d": 2}]}
    new = {"a": {"b": 1, "c": [1, 3]}, "f": [{"name": "y", "d": 2}, {"name": "x", "d": 5}]}
    assert diff_configs(old, new) == ["a.c[1]", "f[x].d"]
    assert diff_configs(old, {**new, "g": 1}) == ["a.c[1]", "f[x].d", "g"]
    assert diff_configs(old, old) == []


# ------------------------------------------------------------------------------ divergence


def test_poisoned_batch_stops_training_and_keeps_the_last_good_checkpoint(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = small_config(data, tmp_path, training={"epochs": 2, "early_stopping_patience": 0})
    out = tmp_path / "run"
    train(cfg, out, stop_after_epochs=1)
    before = snapshot(out)
    real, calls = TrainStep.step, []

    def poisoned(self: TrainStep, batch: Batch) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # NaN labels in one batch: between two loss readings
            batch.labels.fill_(float("nan"))
        return real(self, batch)

    monkeypatch.setattr(TrainStep, "step", poisoned)
    with pytest.raises(DivergenceError, match="training diverged: the loss is nan at epoch 2"):
        train(cfg, out, resume=True)
    assert snapshot(out) == before  # nothing of epoch 2 written, nothing half-written
    assert load_checkpoint(last_path(out))["loop"]["epoch"] == 1
    assert load_checkpoint(best_path(out))["epoch"] == 1
    assert load_trained_model(out)[2].trained_epoch == 1
    assert [r["epoch"] for r in records(out)] == [1]


def test_exploding_learning_rate_exits_non_zero(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small_config(data, tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--config", tmp_path / "small.yaml", "--out", out]
    # (--set training.learning_rate=1e6 is read as a string by YAML 1.1: a config error)
    code = main([str(a) for a in [*argv, "--set", "training.learning_rate=1000000.0"]])
    assert code == 2
    line = error_line(capsys)
    assert "training diverged: the loss exploded" in line and "learning_rate" in line
    assert not out.exists()  # no epoch completed: nothing left behind


def test_loss_watch(capsys: pytest.CaptureFixture[str]) -> None:
    watch = LossWatch()
    for value in (0.7, 0.6, 0.5):
        watch.check(value, 0, 1)
    assert capsys.readouterr().err == ""
    watch.check(1000.0, 0, 2)  # running mean ~100 > 100 x 0.5: a warning, once per epoch
    watch.check(1000.0, 0, 3)
    err = capsys.readouterr().err
    assert err.count("warning: the training loss is rising fast") == 1
    with pytest.raises(DivergenceError, match="exploded"):
        watch.check(1e12, 1, 1)
    with pytest.raises(DivergenceError, match="the loss is inf at epoch 3 step 7"):
        LossWatch().check(float("inf"), 2, 7)
