"""Distributed training under Ray Train (torchrec DMP over gloo, CPU).

Ray start-up costs ~15 s per fit on 2 cores, so the module shares one embedded Ray
instance and a handful of runs: a local run, 1 and 2 workers (module fixtures), a
resumed run whose worker is killed, and one ``ray job submit`` to a local head started
here. The data helpers (row ranges, padded evaluation batches) and the sharded step's
state round trips (two gloo processes, column-sharded tables) are checked without Ray.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import read_metrics, small_config, small_data_dir, write_small_config

from mtrec.cli import main
from mtrec.config import ExperimentConfig
from mtrec.data.batcher import iter_batches, load_encoded
from mtrec.data.spec import FeatureSpec
from mtrec.errors import DivergenceError
from mtrec.evaluate.predict import evaluate_split
from mtrec.train.distributed_data import (
    count_rows,
    eval_shard,
    load_shard,
    padded_eval_batches,
    train_batches,
    train_shard,
)
from mtrec.train.loop import load_trained_model, train
from mtrec.train.optim import LINEAR_PREFIX
from mtrec.train.ray_trainer import FAULT_ENV, start_local_ray, train_distributed
from mtrec.train.schedule import LrSchedule

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 3
# Ray runs take tens of seconds on a loaded 2-core machine; the ini default (600 s) stays
pytestmark = [pytest.mark.timeout(600), pytest.mark.integration]


# a line Ray forwards from one of its actors, e.g. "(PlacementGroupCleaner pid=7) ..."
_RAY_LINE = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


def one_error_line(err: str) -> str:
    """The one line mtrec wrote (actors of the shared Ray instance may log meanwhile)."""
    lines = [ln for ln in err.strip().splitlines() if not _RAY_LINE.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("mtrec: error: "), err
    return lines[0]


def mean_auc(summary: dict[str, Any]) -> float:
    aucs = [m["auc"] for m in summary["valid"].values()]
    return sum(aucs) / len(aucs)


# the learning-rate schedule on, the tables' rates too: the runs below check that the
# workers decay the rates as the local loop does, and resume the schedule's clock
SCHEDULE = {"lr_schedule": "cosine", "lr_schedule_embeddings": True, "lr_final_ratio": 0.1}


@pytest.fixture(scope="module")
def cfg(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """20k planted rows, small tables, 3 epochs, a cosine learning-rate schedule."""
    return small_config(
        synth_dir, tmp_path_factory.mktemp("ray_cfg"), training={"epochs": EPOCHS, **SCHEDULE}
    )


@pytest.fixture(scope="module")
def ray_local() -> Any:
    """One embedded Ray instance (127.0.0.1, no dashboard) for the module."""
    import ray

    if ray.is_initialized():  # another module's instance: use it, leave it running
        yield ray
        return
    start_local_ray(num_cpus=2)  # Ray's loopback settings first
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(
    cfg: ExperimentConfig, ray_local: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The same experiment locally, with 1 worker and with 2 workers."""
    root = tmp_path_factory.mktemp("ray_runs")
    return {
        "local": train(cfg, root / "local"),
        "w1": train_distributed(cfg, root / "w1", workers=1),
        "w2": train_distributed(cfg, root / "w2", workers=2),
    }


# ------------------------------------------------------------------ data shards (no Ray)


def test_shards_are_disjoint_and_read_only_their_rows(synth_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(synth_dir, tmp_path)
    spec = FeatureSpec.from_config(cfg)
    total = count_rows(spec, cfg.dataset.valid)
    whole = load_encoded(spec, cfg.dataset.valid, cfg.dataset.chunk_rows)
    assert total == whole.rows
    for world in (1, 2, 3):
        ranges = [eval_shard(total, r, world) for r in range(world)]
        assert ranges[0].start == 0 and ranges[-1].stop == total
        assert all(a.stop == b.start for a, b in itertools.pairwise(ranges))
        trains = [train_shard(total, r, world) for r in range(world)]
        assert {t.rows for t in trains} == {total // world}  # equal steps for every rank
    # a shard read with a small chunk size holds exactly its rows of the file
    rows = eval_shard(total, 1, 3)
    shard = load_shard(spec, cfg.dataset.valid, rows, chunk_rows=500)
    expected = whole.slice(rows.start, rows.stop)
    assert torch.equal(shard.cat_ids, expected.cat_ids)
    assert torch.equal(shard.labels, expected.labels)
    torch.testing.assert_close(shard.dense, expected.dense, equal_nan=True)
    # streaming batches of a shard cover its rows once (same rows as in memory)
    streamed = list(train_batches((cfg.dataset.valid, rows), spec, 256, seed=1, chunk_rows=700))
    assert sum(b.batch_size for b in streamed) == rows.rows
    assert all(b.batch_size == 256 for b in streamed[:-1])
    got = torch.cat([b.labels for b in streamed]).sum(0)
    torch.testing.assert_close(got, expected.labels.sum(0))


def test_padded_eval_batches_line_up_across_ranks(synth_dir: Path, tmp_path: Path) -> None:
    cfg = small_config(synth_dir, tmp_path)
    spec = FeatureSpec.from_config(cfg)
    whole = load_encoded(spec, cfg.dataset.valid, cfg.dataset.chunk_rows).slice(0, 1001)
    world, batch = 3, 128
    sizes, real_rows = [], []
    for rank in range(world):
        rows = eval_shard(whole.rows, rank, world)
        shard = whole.slice(rows.start, rows.stop)
        out = list(padded_eval_batches(shard, spec, batch, whole.rows, rank, world))
        sizes.append([b.batch_size for b, _ in out])
        real_rows.append(sum(real for _, real in out))
        # the real rows come first and in order
        labels = torch.cat([b.labels[:real] for b, real in out])
        assert torch.equal(labels, shard.labels)
    assert sizes[0] == sizes[1] == sizes[2]  # same number and size of forward passes
    assert sum(real_rows) == whole.rows


# ------------------------------------------------------------------ sharded step (gloo, no Ray)


def _no_pickled_gather(*_: object, **__: object) -> None:
    raise AssertionError("full_state must not gather the pickled state (gather_object)")


def _column_wise_worker(rank: int, world: int, cfg: ExperimentConfig, store: str) -> None:
    """One rank: train a column-sharded model a few steps, round-trip its states."""
    import torch.distributed as dist

    from mtrec.data.fitting import fit_statistics_on_file
    from mtrec.train.distributed import ShardedTrainStep
    from mtrec.train.embedding_reset import fresh_tables

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    spec = FeatureSpec.from_config(cfg)
    fit_statistics_on_file(spec, cfg.dataset.train)
    rows = train_shard(count_rows(spec, cfg.dataset.train), rank, world)
    shard = load_shard(spec, cfg.dataset.train, rows, cfg.dataset.chunk_rows)
    batches = list(train_batches(shard, spec, 64, seed=rank, chunk_rows=4096))[:6]
    step = ShardedTrainStep(cfg, spec, device=torch.device("cpu"), sharding_types=["column_wise"])
    for batch in batches[:3]:
        step.step(batch)
    saved = step.sharded_state()
    before = [float(step.step(b)) for b in batches[3:]]
    step.load_sharded_state(saved)
    after = [float(step.step(b)) for b in batches[3:]]
    step.load_sharded_state(saved)
    # the whole state moves as tensors, shard by shard: pickling every rank's state
    # (gather_object) took several times its size in memory and exhausted a 24 GB machine
    real_gather = dist.gather_object
    dist.gather_object = _no_pickled_gather  # type: ignore[assignment]
    try:
        full = step.full_state()
    finally:
        dist.gather_object = real_gather
    box = [full]
    dist.broadcast_object_list(box, src=0)
    # each column-split table's whole accumulator is its shards' mean weighted by width
    every: list[Any] = [None] * world
    dist.all_gather_object(every, saved["sparse_optimizer"])
    momentum_checks = _momentum_checks(step, every, full) if rank == 0 else []
    fresh = ShardedTrainStep(cfg, spec, device=torch.device("cpu"), sharding_types=["column_wise"])
    fresh.load_full_state(box[0])
    again = fresh.full_state()
    # the same state under the names of the model before the sparse / task split
    old = ShardedTrainStep(cfg, spec, device=torch.device("cpu"), sharding_types=["column_wise"])
    old.load_full_state(_pre_split_names(box[0]))
    from_legacy = old.full_state()
    # MEDA's reset: each rank copies its columns of the whole tables' draw
    step.reset_embeddings(1)
    reset = step.full_state()
    if rank == 0:
        assert full is not None and again is not None
        torch.save(
            {
                "plan": step.plan_summary(),
                "hints": step.plan_hints(),
                "before": before,
                "after": after,
                "full": full,
                "again": again,
                "from_legacy": from_legacy,
                "momentum_checks": momentum_checks,
                "reset": reset,
                "fresh": dict(fresh_tables(step.tables, cfg.seed, 1)),
            },
            Path(store).with_name("result.pt"),
        )
    dist.barrier()
    del step, fresh, old
    dist.destroy_process_group()


def _momentum_checks(
    step: Any, every: list[Any], full: dict[str, Any] | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(full_state's accumulator, Σ_i width_i · shard_i / Σ width_i from every rank's
    momentum shards) of each table split by columns."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from mtrec.train.distributed import _momentum_names, _strip

    assert full is not None
    checks = []
    for key, value in step.model.state_dict().items():
        if not isinstance(value, ShardedTensor):
            continue
        meta = sorted(value.metadata().shards_metadata, key=lambda m: m.shard_offsets[1])
        if len(meta) < 2:
            continue
        rows, widths = int(value.size()[0]), [m.shard_sizes[1] for m in meta]
        for state_name in {n for part in every for n in part.get(key, {})}:
            pieces = sorted(
                (offsets[0], t)
                for part in every
                for offsets, t in part.get(key, {}).get(state_name, [])
            )
            assert [o for o, _ in pieces] == [i * rows for i in range(len(widths))]
            w = torch.tensor(widths, dtype=torch.float32)
            expected = sum(wi * t for wi, (_, t) in zip(w, pieces)) / w.sum()
            module, param, local = _momentum_names(_strip(key), state_name)
            checks.append((full["sparse_optimizer"][module]["state"][param][local], expected))
    return checks


def _pre_split_names(state: dict[str, Any]) -> dict[str, Any]:
    """A ``last.pt`` state renamed as written before the model's sparse / task split."""

    def rename(key: str) -> str:
        if key.startswith("sparse_arch.embedding."):
            return "sparse_embedding." + key[len("sparse_arch.embedding.") :]
        # the linear term and the piecewise numerics came after the split
        if key.startswith(("task_arch.linear.", "task_arch.piecewise.")):
            return key
        return key[len("task_arch.") :] if key.startswith("task_arch.") else key

    legacy = dict(state)
    legacy["model"] = {rename(k): v for k, v in state["model"].items()}
    legacy["sparse_optimizer"] = {rename(k): v for k, v in state["sparse_optimizer"].items()}
    assert any(k.startswith("sparse_embedding.") for k in legacy["sparse_optimizer"])
    return legacy


def _field_order_worker(rank: int, world: int, cfg: ExperimentConfig, store: str) -> None:
    """One rank: the sharded model's logits on this rank's batch beside the unsharded
    model's, both loaded with one state whose tables (deep and linear) are random, so
    every field's weights reach the logits."""
    import torch.distributed as dist

    from mtrec.data.fitting import fit_statistics_on_file
    from mtrec.model import build_model
    from mtrec.train.distributed import ShardedTrainStep
    from mtrec.train.step import TrainStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    spec = FeatureSpec.from_config(cfg)
    fit_statistics_on_file(spec, cfg.dataset.train)
    chunk = load_encoded(spec, cfg.dataset.valid, cfg.dataset.chunk_rows)
    batch = list(iter_batches(chunk, spec, 128))[rank]
    state = TrainStep(cfg, spec).state_dict()
    noise = torch.Generator().manual_seed(7)  # the same tables on both ranks
    for key, value in state["model"].items():
        if ".embedding_bags." in key:  # the linear term's tables start at zero
            state["model"][key] = 0.3 * torch.randn(value.shape, generator=noise)
    step = ShardedTrainStep(cfg, spec, device=torch.device("cpu"), sharding_types=["table_wise"])
    step.load_full_state(state)
    sharded = step.logits(batch)
    local = build_model(cfg, spec)
    local.load_state_dict(state["model"])
    local.eval()
    with torch.no_grad():
        expected = local(batch.sparse, batch.dense)
    both: list[Any] = [None] * world
    dist.all_gather_object(both, (sharded, expected))
    if rank == 0:
        torch.save({"plan": step.plan_summary(), "logits": both}, Path(store).with_name("out.pt"))
    dist.barrier()
    del step
    dist.destroy_process_group()


def _ranks_in_feature_order(plan: str, module: str, features: list[str]) -> list[int]:
    """The rank of each feature's table of ``module`` (``t_<feature>``), in feature order."""
    ranks = dict(re.findall(rf"{re.escape(module)}\.t_(\w+): \w+ on ranks \[(\d+)\]", plan))
    return [int(ranks[f]) for f in features]


def test_sharded_forward_reads_fields_in_order_with_tables_on_both_ranks(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A sharded collection returns its features grouped by rank; per-feature tables
    placed on both ranks out of feature order must still reach the model in the config's
    field order (deep tokens and the linear term's per-feature weights), so two workers
    compute what the unsharded model does."""
    import torch.multiprocessing as mp

    cfg = small_config(
        small_data_dir(tmp_path_factory),
        tmp_path,
        model={"embedding": {"type": "per_feature", "dim": 8}},
    )
    assert cfg.model.linear.enabled
    mp.spawn(_field_order_worker, args=(2, cfg, str(tmp_path / "store")), nprocs=2, join=True)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    sparse = [f.name for f in cfg.features if f.kind != "numeric"]
    for module in ("sparse_arch.embedding.ebc", "linear_arch.ebc"):
        ranks = _ranks_in_feature_order(out["plan"], module, sparse)
        # grouped by rank, this module's fields come back permuted: the case the fix is for
        assert ranks != sorted(ranks), (module, ranks)
    for sharded, expected in out["logits"]:
        torch.testing.assert_close(sharded, expected)


def test_column_sharded_state_round_trips(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two gloo processes, tables split by columns over both: a rank's shards reload
    exactly, the gathered unsharded state (last.pt layout) loads back unchanged, and
    MEDA's reset gives the deep tables the whole draw and zero accumulators and leaves the
    rest as it was."""
    import torch.multiprocessing as mp

    cfg = small_config(
        small_data_dir(tmp_path_factory),
        tmp_path,
        model={"embedding": {"dim": 256}, "multitask": {"expert_hidden": [8], "tower_hidden": [4]}},
    )
    mp.spawn(_column_wise_worker, args=(2, cfg, str(tmp_path / "store")), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert "ranks [0, 1]" in result["plan"], result["plan"]
    assert result["hints"] == []  # the 256-wide table is split over both ranks
    assert result["momentum_checks"]  # at least one table split by columns
    for got, expected in result["momentum_checks"]:
        torch.testing.assert_close(got, expected)
    assert result["before"] == result["after"]  # the sharded state restores exactly
    full = result["full"]
    for again in (result["again"], result["from_legacy"]):
        for key, value in full["model"].items():
            torch.testing.assert_close(again["model"][key], value, rtol=0, atol=0, msg=key)
        for module, states in full["sparse_optimizer"].items():
            for param, tensors in states["state"].items():
                for name, value in tensors.items():
                    got = again["sparse_optimizer"][module]["state"][param][name]
                    torch.testing.assert_close(got, value, rtol=0, atol=0, msg=name)
    reset, fresh = result["reset"], result["fresh"]
    assert fresh and all(key in full["model"] for key in fresh)
    for key, value in full["model"].items():
        expected = fresh.get(key, value)  # a deep table's draw, else unchanged
        torch.testing.assert_close(reset["model"][key], expected, rtol=0, atol=0, msg=key)
    for module, states in full["sparse_optimizer"].items():
        deep = not module.startswith(LINEAR_PREFIX)
        for param, tensors in states["state"].items():
            for name, value in tensors.items():
                got = reset["sparse_optimizer"][module]["state"][param][name]
                expected = torch.zeros_like(value) if deep else value
                torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------ bad cluster input


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "case", ["unreachable", "job_server_address", "too_many_workers", "zero_workers"]
)
def test_bad_cluster_input_fails_fast_with_one_line(
    case: str,
    synth_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = write_small_config(synth_dir, tmp_path / "small.yaml")
    out = tmp_path / "run"
    argv = ["train", "--config", config, "--out", out]
    if case == "unreachable":
        argv += ["--address", f"127.0.0.1:{_free_port()}"]
        expected = "cannot reach a Ray cluster"
    elif case == "job_server_address":  # what `ray job` takes, not a cluster to join
        argv += ["--address", "http://127.0.0.1:8265"]
        expected = "job server"
    elif case == "too_many_workers":
        argv += ["--workers", len(os.sched_getaffinity(0)) + 1]
        expected = "CPUs"
    else:
        argv += ["--workers", 0]
        expected = "--workers 0"
    was_running = ray.is_initialized()
    code = main([str(a) for a in argv])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and expected in line, line
    assert not out.exists(), "nothing may be written before the cluster is checked"
    assert ray.is_initialized() == was_running, "no Ray instance may be started"


# ------------------------------------------------------------------ training under Ray


def test_one_worker_reproduces_the_local_loop(runs: dict[str, Any], cfg: ExperimentConfig) -> None:
    local, w1 = Path(runs["local"]["run_dir"]), Path(runs["w1"]["run_dir"])
    assert runs["w1"]["best_epoch"] == runs["local"]["best_epoch"]
    for a, b in zip(read_metrics(local), read_metrics(w1)):
        assert a["epoch"] == b["epoch"] and a["train_rows"] == b["train_rows"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        for task, m in a["valid"].items():
            assert m["auc"] == pytest.approx(b["valid"][task]["auc"], abs=1e-5), task
    for name in ("best.pt", "last.pt"):
        x = torch.load(local / "checkpoints" / name, weights_only=True)
        y = torch.load(w1 / "checkpoints" / name, weights_only=True)
        assert x["model"].keys() == y["model"].keys()
        for key in x["model"]:
            torch.testing.assert_close(x["model"][key], y["model"][key], atol=1e-5, rtol=0)
        assert x["config_hash"] == y["config_hash"]
    # training.ema_decay (on by default): the worker kept the local loop's dense average
    # (best.pt above holds it; last.pt carries it for resuming)
    x, y = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (local, w1))
    assert x["dense_average"]["updates"] == y["dense_average"]["updates"] > 0
    for key, value in x["dense_average"]["average"].items():
        torch.testing.assert_close(value, y["dense_average"]["average"][key], atol=1e-5, rtol=0)
    # training.lr_schedule: the worker took the local loop's steps at its decayed rates
    # (the last step's: the plan's factor after all steps but one)
    steps = x["steps"]
    assert y["steps"] == steps == x["dense_average"]["updates"]
    factor = LrSchedule("cosine", steps, 0.1).factor(steps - 1)
    assert 0.1 < factor < 0.11
    (rest, *_), (rest_w1, *_) = (s["dense_optimizer"]["param_groups"] for s in (x, y))
    assert rest["lr"] == pytest.approx(factor * cfg.training.learning_rate, rel=1e-9)
    assert rest_w1["lr"] == pytest.approx(rest["lr"], rel=1e-12)


def test_two_workers_match_one_worker_and_leave_a_local_run_layout(
    runs: dict[str, Any], cfg: ExperimentConfig
) -> None:
    w1, w2 = runs["w1"], runs["w2"]
    assert w2["workers"] == 2 and w2["epochs_run"] == EPOCHS and w2["restarts"] == 0
    assert mean_auc(w2) == pytest.approx(mean_auc(w1), abs=0.01)
    for task, m in w2["valid"].items():
        assert m["auc"] == pytest.approx(w1["valid"][task]["auc"], abs=0.02), task
        assert m["auc"] > 0.6, task
    run = Path(w2["run_dir"])
    for name in ("config.yaml", "feature_stats.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    for r in records:
        # the global batch is split: all rows of the split are trained on, in total
        assert r["train_rows"] == read_metrics(Path(w1["run_dir"]))[0]["train_rows"]
        assert len(r["samples_per_s_per_worker"]) == 2
        assert all(s > 0 for s in r["samples_per_s_per_worker"])
    # best.pt is a plain unsharded model: the validation AUC recomputed over the whole
    # split equals the one gathered from both workers during training
    _, spec, model = load_trained_model(run)
    valid = evaluate_split(model, spec, cfg.dataset.valid, 4096)
    best = records[w2["best_epoch"] - 1]["valid"]
    for task, m in valid.items():
        assert m["auc"] == pytest.approx(best[task]["auc"], abs=1e-5), task


def test_workers_validate_every_steps_like_the_local_loop(
    cfg: ExperimentConfig, ray_local: Any, tmp_path: Path
) -> None:
    """Mid-epoch validation points are collective: the workers write the local loop's
    lines (epoch, step) and best.pt holds the best point's weights."""
    training = replace(
        cfg.training,
        epochs=2,
        max_steps_per_epoch=6,
        validate_every_steps=2,
        early_stopping_patience=0,
    )
    c = replace(cfg, training=training)
    local = train(c, tmp_path / "local")
    w2 = train_distributed(c, tmp_path / "w2", workers=2)
    lines, local_lines = read_metrics(tmp_path / "w2"), read_metrics(tmp_path / "local")
    steps = [(1, 2), (1, 4), (1, 6), (2, 8), (2, 10), (2, 12)]
    assert [(r["epoch"], r["step"]) for r in lines] == steps
    assert [(r["epoch"], r["step"]) for r in local_lines] == steps
    best_line = max(lines, key=lambda r: r["valid_mean_auc"])
    assert (w2["best_epoch"], w2["best_step"]) == (best_line["epoch"], best_line["step"])
    assert local["best_step"] > 0
    _, spec, model = load_trained_model(tmp_path / "w2")
    valid = evaluate_split(model, spec, cfg.dataset.valid, 4096)
    for task, m in valid.items():
        assert m["auc"] == pytest.approx(best_line["valid"][task]["auc"], abs=1e-5), task


def test_validation_when_one_shard_runs_out_a_batch_early(
    cfg: ExperimentConfig, ray_local: Any, tmp_path: Path
) -> None:
    """1999 validation rows over 2 workers, 333 per eval batch: rank 0's 999 rows fill 3
    batches, rank 1's 1000 need a 4th, which rank 0 runs on padding alone. Scoring is a
    collective forward, so rank 0 must still run it (skipping it left rank 1 waiting)."""
    import polars as pl

    path = tmp_path / "valid.parquet"
    pl.read_parquet(cfg.dataset.valid).head(1999).write_parquet(path)
    spec = FeatureSpec.from_config(cfg)
    whole = load_encoded(spec, str(path), cfg.dataset.chunk_rows)
    rows = eval_shard(whole.rows, 0, 2)
    shard = whole.slice(rows.start, rows.stop)
    reals = [real for _, real in padded_eval_batches(shard, spec, 333, whole.rows, 0, 2)]
    assert reals == [333, 333, 333, 0]  # the case under test
    training = replace(cfg.training, epochs=1, max_steps_per_epoch=2, eval_batch_size=333)
    c = replace(cfg, dataset=replace(cfg.dataset, valid=str(path)), training=training)
    summary = train_distributed(c, tmp_path / "w2", workers=2)
    _, spec, model = load_trained_model(tmp_path / "w2")
    for task, m in evaluate_split(model, spec, str(path), 4096).items():
        assert m["auc"] == pytest.approx(summary["valid"][task]["auc"], abs=1e-5), task


def test_a_local_run_resumes_a_ray_run(
    runs: dict[str, Any], cfg: ExperimentConfig, tmp_path: Path
) -> None:
    """last.pt of a 2-worker run is the local layout: the local loop continues it."""
    run = shutil.copytree(runs["w2"]["run_dir"], tmp_path / "run")
    longer = replace(cfg, training=replace(cfg.training, epochs=EPOCHS + 1))
    summary = train(longer, run, resume=True)
    assert summary["epochs_run"] == EPOCHS + 1
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 2))
    assert records[-1]["loss"] < records[0]["loss"]


def test_a_diverging_run_stops_every_worker(
    cfg: ExperimentConfig, ray_local: Any, tmp_path: Path
) -> None:
    """An exploding loss read on the workers (every step here) stops all of them at the
    same step (no worker left in a collective); the driver fails and leaves nothing."""
    wild = replace(
        cfg,
        training=replace(
            cfg.training,
            epochs=1,
            learning_rate=1e6,
            log_every_steps=1,
            max_steps_per_epoch=5,
        ),
    )
    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"training diverged: .* at epoch 1 step \d"):
        train_distributed(wild, out, workers=2)
    assert not out.exists()


def test_resume_then_a_killed_worker_recovers_from_its_checkpoint(
    runs: dict[str, Any],
    cfg: ExperimentConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tmp_path / "run"
    first = train_distributed(cfg, run, workers=2, stop_after_epochs=1)
    assert first["epochs_run"] == 1
    # --resume reads the unsharded last.pt; then worker 1 dies in the middle of epoch 3
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"rank=1,epoch=3,step=20,marker={marker}")
    summary = train_distributed(cfg, run, workers=2, resume=True)
    assert marker.exists(), "the fault was not injected"
    # epoch 2 was checkpointed through Ray and not redone; the run finished all epochs
    assert summary["restarts"] == 1 and summary["resumed_after_epochs"] == [2]
    assert summary["last_restart_from"] == "ray_checkpoint"
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    # the same result as the uninterrupted 2-worker run (same seeds, same shards)
    reference = read_metrics(Path(runs["w2"]["run_dir"]))
    for got, want in zip(records, reference):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4)
        for task, m in got["valid"].items():
            assert m["auc"] == pytest.approx(want["valid"][task]["auc"], abs=1e-4), task
    _, _, model = load_trained_model(run)
    assert model.trained_epoch == summary["best_epoch"]


# ------------------------------------------------------------------ ray job submit


@pytest.fixture
def ray_head(tmp_path: Path) -> Any:
    """A Ray head on 127.0.0.1 (own ports, own session dir), stopped in teardown."""
    ray_bin = Path(sys.executable).with_name("ray")
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once in teardown
        "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    # a short session path: Ray's unix sockets live under it (107-byte limit)
    temp_dir = tempfile.mkdtemp(prefix="mtrec-ray-", dir="/tmp")
    port, dashboard = _free_port(), _free_port()
    ports = {
        "--port": port,
        "--dashboard-port": dashboard,
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
    }
    cmd = [
        str(ray_bin),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        *[f"{k}={v}" for k, v in ports.items()],
    ]
    log = open(tmp_path / "head.log", "w")  # closed in teardown
    # its own session: teardown signals exactly the processes this test started
    head = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            status = subprocess.run(
                [str(ray_bin), "job", "list", "--address", address],
                env=env,
                capture_output=True,
                text=True,
            )
            if status.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start: {(tmp_path / 'head.log').read_text()}")
            time.sleep(1)
        yield {"address": address, "env": env, "ray": ray_bin}
    finally:
        _stop_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the head this test started: SIGTERM to ``ray start --block`` (it drains and
    stops the Ray processes it launched), then whatever is left of its process group."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # any process of the group left?
            except ProcessLookupError:
                return
            os.killpg(proc.pid, sig)
            time.sleep(0.5)


def test_ray_job_submit_trains_on_a_local_head(
    ray_head: dict[str, Any], synth_dir: Path, tmp_path: Path
) -> None:
    config = write_small_config(synth_dir, tmp_path / "small.yaml", training={"epochs": 1})
    out = tmp_path / "run"
    ray_bin, address, env = str(ray_head["ray"]), ray_head["address"], ray_head["env"]
    job = "mtrec-test-train"
    submit = subprocess.run(
        [
            ray_bin,
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            job,
            "--working-dir",
            str(REPO),
            "--no-wait",
            "--",
            "python",
            "pipelines/train.py",
            "--config",
            str(config),
            "--workers",
            "2",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert submit.returncode == 0, submit.stderr
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 420
    while client.get_job_status(job) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(2)
    logs = subprocess.run(
        [ray_bin, "job", "logs", "--address", address, job],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    # the driver's last line is the train summary; the workers' progress reached the logs
    summary = json.loads([ln for ln in logs.splitlines() if ln.strip()][-1])
    assert summary["run_dir"] == str(out) and summary["workers"] == 2
    assert "samples/s" in logs and "worker 1/2" in logs
    assert (out / "checkpoints" / "best.pt").is_file()
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    _, _, model = load_trained_model(out)
    assert model.trained_epoch == 1


def test_plan_hints_name_num_tables_when_one_rank_holds_the_unified_table() -> None:
    """A single Unified Embedding table placed whole on one of several ranks does every
    rank's lookups there: the hint names the key and the value to set."""
    from mtrec.train.distributed import plan_hints

    ue = "model.sparse_arch.embedding.ebc.unified"
    linear = [("model.linear_arch.ebc.t_a", "table_wise", [1])]
    (hint,) = plan_hints([(ue, "column_wise", [0]), *linear], world_size=2)
    assert ue in hint and "rank 0" in hint and "model.embedding.num_tables=2" in hint
    assert plan_hints([(ue, "column_wise", [0])], world_size=1) == []  # one worker
    assert plan_hints([(ue, "column_wise", [0, 1])], world_size=2) == []  # split
    split = [(ue + "_0", "table_wise", [0]), (ue + "_1", "table_wise", [1])]
    assert plan_hints(split, world_size=2) == []  # num_tables=2 already
    assert plan_hints(linear, world_size=2) == []  # per-feature tables: nothing to say
