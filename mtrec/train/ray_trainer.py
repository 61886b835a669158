"""Distributed training under Ray Train: ``mtrec train --workers N [--address HOST:PORT]``.

The driver validates the data, fits the statistics and prepares the run directory
exactly as the local loop does (:func:`mtrec.train.loop.train`), then runs a Ray Train
``TorchTrainer`` with N workers. Each worker:

* joins the process group (gloo on CPU; NCCL when the workers have GPUs) and builds
  the model with torchrec ``DistributedModelParallel`` (:mod:`mtrec.train.distributed`);
* reads only its own rows of the training split (:mod:`mtrec.train.distributed_data`);
* trains epoch by epoch in lock step; validation scores each worker's rows and rank 0
  computes the metrics on ALL rows (predictions are gathered, not averaged);
* after each epoch reports a Ray checkpoint holding its shards, the optimizers and the
  loop position (``checkpoints/ray/checkpoint_*/rank_K.pt``); when a worker dies, Ray
  restarts the group (``FailureConfig(max_failures)``) and every rank resumes from the
  latest one, redoing only the unfinished epoch.

The driver holds the run directory's lock (:class:`mtrec.run.RunLock`) for the whole
run. Rank 0 also writes the run directory of a local run through the same epoch ledger
(:class:`mtrec.train.ledger.EpochLedger`): ``metrics.jsonl``, ``checkpoints/last.pt`` and
``best.pt`` (unsharded, the local layout), so ``mtrec evaluate / export`` and
``--resume`` (with any number of workers, or locally) work on it. A non-finite loss on
any worker stops every worker and the driver raises
:class:`mtrec.errors.DivergenceError`. The run directory must be reachable from rank 0
(one machine, or shared storage on a multi-node cluster, as Ray Train's
``storage_path`` needs anyway).

Without an address an embedded Ray instance is started on 127.0.0.1; with
``--address`` (or ``RAY_ADDRESS``) the run joins that cluster (:mod:`mtrec.cluster`).

Example::

    summary = train_distributed(load_config("configs/census_kdd/mmoe.yaml"), "runs/c", workers=2)
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mtrec.checkpoint import last_path, load_checkpoint
from mtrec.cluster import (
    check_reachable,
    cluster_address,
    connect,
    set_ray_env,
    start_local_ray,
)
from mtrec.config import ConfigError, ExperimentConfig
from mtrec.data.columns import count_rows
from mtrec.data.encode import EncodedChunk
from mtrec.data.spec import FeatureSpec
from mtrec.errors import ClusterError, DataError, DivergenceError, RunError
from mtrec.metrics import ScoreCollector
from mtrec.run import METRICS_FILE, trim_metrics, write_run_files
from mtrec.threads import resolve_threads
from mtrec.train.distributed import ShardedTrainStep, ShardingError, check_sharding_types
from mtrec.train.distributed_data import (
    RowRange,
    eval_shard,
    load_shard,
    padded_eval_batches,
    train_batches,
    train_shard,
)
from mtrec.train.ledger import (
    EpochLedger,
    LoopState,
    LossWatch,
    diverged_message,
    nonfinite_loss,
)
from mtrec.train.ledger import log as _log
from mtrec.train.loop import train
from mtrec.train.schedule import planned_steps

__all__ = [
    "FAULT_ENV",
    "ClusterError",
    "cluster_address",
    "start_local_ray",
    "train_distributed",
]

# "rank=R,epoch=E,step=S,marker=PATH": worker R calls os._exit(1) at step S of epoch E
# (1-based) unless PATH exists; it creates PATH first, so the fault happens once.
# For fault-tolerance tests.
FAULT_ENV = "MTREC_FAULT_INJECT"

_CHECKPOINT_DIR = "ray"  # under RUN/checkpoints/
_RANK_SEED_STRIDE = 1_000_003  # rank r's shuffle / dropout seeds; rank 0 = the local loop's
_LOG_INTERVAL_S = 10.0


@dataclass
class _Job:
    """What every worker needs (pickled into ``train_loop_config``)."""

    cfg: ExperimentConfig
    spec: FeatureSpec
    out: str
    train_rows: int
    valid_rows: int
    start_epoch: int
    stop_after_epochs: int | None
    sharding_types: tuple[str, ...]
    fault: dict[str, Any] | None
    # rows per worker and step: training.batch_size is the GLOBAL batch, so N workers
    # take the steps of a local run, each step on the same number of rows
    rank_batch: int
    threads: int  # intra-op threads (and Ray CPUs) of each worker


# ---------------------------------------------------------------------------- driver


def train_distributed(
    cfg: ExperimentConfig,
    out: str | Path | None = None,
    *,
    workers: int,
    address: str | None = None,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    use_gpu: bool | None = None,
    sharding_types: list[str] | None = None,
    max_failures: int = 2,
) -> dict[str, Any]:
    """Train ``cfg`` with ``workers`` Ray Train workers; returns the run summary (the
    same keys as :func:`mtrec.train.loop.train`, plus ``workers``).

    Args:
        address: a Ray cluster (``host:port``, ``ray://host:port`` or ``auto``); default
            ``$RAY_ADDRESS``, else an embedded instance on 127.0.0.1.
        use_gpu: one GPU per worker with NCCL and FBGEMM's CUDA kernels (default: when
            the cluster has a GPU per worker).
        sharding_types: torchrec sharding types the planner may use (default: all that
            work on the device, see :mod:`mtrec.train.distributed`).
        max_failures: worker-group restarts (from the latest checkpoint) before giving up.
    """
    set_ray_env()
    if workers < 1:
        raise ClusterError(f"--workers {workers}: must be at least 1")
    if cfg.training.batch_size < workers:
        raise ConfigError(
            f"training.batch_size: {cfg.training.batch_size} is the global batch, split over "
            f"{workers} workers; set it to at least {workers}"
        )
    address = cluster_address(address)
    fault = _parse_fault(os.environ.get(FAULT_ENV))
    # cheap cluster checks first: nothing is read or started when they fail
    cpus = len(os.sched_getaffinity(0))
    if address is None:
        if workers > cpus:
            raise ClusterError(
                f"--workers {workers}: this machine has {cpus} CPUs and each worker needs one; "
                f"use --workers {cpus} or fewer, or join a larger cluster with --address"
            )
        gpu = torch.cuda.is_available() and torch.cuda.device_count() >= workers
        use_gpu = gpu if use_gpu is None else use_gpu
    else:
        check_reachable(address)
    import ray

    started = connected = False
    try:
        if not ray.is_initialized() and address is not None:
            connect(address)
            connected = True
        if ray.is_initialized():
            use_gpu, cpus = _check_resources(workers, use_gpu)
        try:
            types = check_sharding_types(sharding_types, bool(use_gpu))
        except ShardingError as exc:
            raise ClusterError(str(exc)) from None

        def runner(
            cfg: ExperimentConfig,
            spec: FeatureSpec,
            out: Path,
            resume_state: dict[str, Any] | None,
            train_source: EncodedChunk | str,
            valid_source: EncodedChunk | None,
            stop_after_epochs: int | None,
            wall_start: float,
        ) -> dict[str, Any]:
            nonlocal started
            write_run_files(cfg, spec, out, resume_state)
            train_rows = count_rows(spec, cfg.dataset.train)
            valid_rows = count_rows(spec, cfg.dataset.valid) if cfg.dataset.valid else 0
            for split, rows in (("train", train_rows), ("valid", valid_rows)):
                if rows < workers and (split == "train" or rows > 0):
                    raise DataError(
                        f"{getattr(cfg.dataset, split)}: {rows} rows cannot be split over "
                        f"{workers} workers; use --workers {max(rows, 1)} or fewer"
                    )
            job = _Job(
                cfg=cfg,
                spec=spec,
                out=str(out.resolve()),
                train_rows=train_rows,
                valid_rows=valid_rows,
                start_epoch=int(resume_state["loop"]["epoch"]) if resume_state else 0,
                stop_after_epochs=stop_after_epochs,
                sharding_types=types,
                fault=fault,
                rank_batch=cfg.training.batch_size // workers,
                # training.threads per worker, as far as the CPUs go: more threads than
                # cores make OpenMP spin against the other workers (several times slower)
                threads=max(1, min(resolve_threads(cfg.training.threads), cpus // workers)),
            )
            if not ray.is_initialized():
                t0 = time.perf_counter()
                start_local_ray()
                started = True
                _log(f"started an embedded Ray instance in {time.perf_counter() - t0:.1f} s")
            try:
                summary = _fit(job, workers, bool(use_gpu), max_failures)
            except BaseException:
                if not last_path(out).exists():  # no epoch completed: leave nothing behind
                    shutil.rmtree(out / "checkpoints" / _CHECKPOINT_DIR, ignore_errors=True)
                raise
            summary["wall_s"] = round(time.perf_counter() - wall_start, 2)
            return summary

        return train(cfg, out, resume=resume, stop_after_epochs=stop_after_epochs, runner=runner)
    finally:
        if started or connected:  # a Ray session the caller opened stays open
            ray.shutdown()


def _check_resources(workers: int, use_gpu: bool | None) -> tuple[bool, int]:
    """Whether workers get GPUs, and the cluster's CPUs; fails when the cluster cannot
    place ``workers`` workers."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
    if use_gpu is None:
        use_gpu = gpus >= workers
    if workers > cpus:
        raise ClusterError(
            f"--workers {workers}: the Ray cluster has {cpus} CPUs and each worker needs one; "
            f"use --workers {cpus} or fewer, or add nodes"
        )
    if use_gpu and workers > gpus:
        raise ClusterError(f"--workers {workers}: the Ray cluster has {gpus} GPUs, one per worker")
    return use_gpu, cpus


def _parse_fault(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        fields = dict(part.split("=", 1) for part in text.split(","))
        return {
            "rank": int(fields["rank"]),
            "epoch": int(fields["epoch"]),
            "step": int(fields["step"]),
            "marker": fields["marker"],
        }
    except (KeyError, ValueError):
        raise ClusterError(
            f"{FAULT_ENV}={text!r}: expected rank=R,epoch=E,step=S,marker=PATH"
        ) from None


def _fit(job: _Job, workers: int, use_gpu: bool, max_failures: int) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import WorkerGroupError

    storage = Path(job.out) / "checkpoints"
    # the run resumes from last.pt (any worker count); Ray's own storage only serves
    # restarts within this fit, so an older one must not be picked up
    shutil.rmtree(storage / _CHECKPOINT_DIR, ignore_errors=True)
    resources = {"CPU": float(job.threads), **({"GPU": 1.0} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job, "submitted": time.time()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=_CHECKPOINT_DIR,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except WorkerGroupError as exc:
        raise RunError(_worker_failure(exc, max_failures)) from None
    summary = result.return_value
    if not isinstance(summary, dict):
        raise RunError(f"training under Ray returned no summary ({result.error or 'no error'})")
    if "error" in summary:
        raise DivergenceError(summary["error"])
    if "run_error" in summary:
        raise RunError(summary["run_error"])
    return summary


def _worker_failure(exc: Any, max_failures: int) -> str:
    """One line: which worker failed, with what, after how many restarts."""
    failures: dict[int, BaseException] = getattr(exc, "worker_failures", {}) or {}

    def secondary(item: tuple[int, BaseException]) -> tuple[bool, int]:
        # a worker that died takes its peers' collectives down with it: name the first
        text = str(getattr(item[1], "cause", None) or item[1])
        return ("gloo" in text or "NCCL" in text or "by peer" in text), item[0]

    for rank, error in sorted(failures.items(), key=secondary):
        cause = getattr(error, "cause", None) or error
        lines = str(cause).strip().splitlines()
        detail = lines[-1] if lines else ""
        if len(detail) > 240:
            detail = detail[:240] + "..."
        return (
            f"training failed on worker {rank} (after {max_failures} restart(s)): "
            f"{type(cause).__name__}: {detail} (worker logs above)"
        )
    return f"training failed: {str(exc).splitlines()[0]}"


# ---------------------------------------------------------------------------- workers


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """FBGEMM logs every table's kernel arguments through the root logger at INFO while
    the sharded model is built; Ray's own INFO lines stay."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def _quiet_libraries() -> None:
    """torchrec logs at INFO per table; keep warnings (less a planner note about dry
    runs, which these are not)."""
    for name in ("torchrec", "fbgemm_gpu", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torchrec.distributed.planner.storage_reservations").setLevel(logging.ERROR)


def _worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The train function of every Ray Train worker; Python warnings of the libraries are
    silenced for its duration, as the CLI does."""
    with warnings.catch_warnings():
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.simplefilter("ignore", category)
        return _worker_body(config)


def _worker_body(config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch

    job: _Job = config["job"]
    cfg, spec, tr = job.cfg, job.spec, job.cfg.training
    _quiet_libraries()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.threads)  # Ray sets OMP_NUM_THREADS=1 in workers
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives of *_object run on it
    out = Path(job.out)
    entered = time.time()
    # seconds from fit() to this function (actors, process group), then to training
    # (sharded model, data shards): the fixed cost of a distributed run
    timing = {"workers_start_s": round(entered - config["submitted"], 2)}
    rows = train_shard(job.train_rows, rank, world)

    with _quiet_root_logger():
        step = ShardedTrainStep(
            cfg,
            spec,
            device=device,
            sharding_types=job.sharding_types,
            batch_size=job.rank_batch,
            local_world_size=ctx.get_local_world_size(),
            # training.lr_schedule's clock: every rank takes its shard's steps, in lockstep
            planned_steps=planned_steps(
                rows.rows, job.rank_batch, tr.epochs, tr.max_steps_per_epoch
            ),
        )
    st, resumed_at, source = _restore(step, job, rank)
    if rank == 0:
        trim_metrics(out / METRICS_FILE, st.epoch)
        _log(
            f"{world} workers started {timing['workers_start_s']:.1f} s after submission, "
            f"{job.threads} thread(s) each; plan: {step.plan_summary()}"
        )
        if tr.threads == "adaptive":
            # workers step in lockstep: a worker's step time includes waiting for the
            # slowest, so it cannot tell which thread count is its own fastest
            _log(
                f"each Ray worker keeps {job.threads} thread(s) (training.threads: adaptive "
                "follows the load in local training only)"
            )
        for hint in step.plan_hints():
            _log(f"hint: {hint}")
        if resumed_at:
            _log(f"restarted from {source} after epoch {st.epoch}")

    train_source: EncodedChunk | tuple[str, RowRange] = (cfg.dataset.train, rows)
    if tr.cache_in_memory:
        train_source = load_shard(spec, cfg.dataset.train, rows, cfg.dataset.chunk_rows)
    valid_rows = eval_shard(job.valid_rows, rank, world) if job.valid_rows else None
    valid = (
        load_shard(spec, cfg.dataset.valid, valid_rows, cfg.dataset.chunk_rows)
        if valid_rows is not None
        else None
    )
    timing["worker_setup_s"] = round(time.time() - entered, 2)
    summary = _epochs(job, step, st, rank, world, train_source, valid, rows, resumed_at)
    if summary is not None and "run_dir" in summary:
        summary.update(timing)
        if resumed_at:
            summary["last_restart_from"] = source
    # tear-down order that avoids gloo's intermittent abort at exit (STACK.md); Ray
    # destroys the process group after this function returns
    dist.barrier()
    del step
    gc.collect()
    return summary


def _restore(step: ShardedTrainStep, job: _Job, rank: int) -> tuple[LoopState, list[int], str]:
    """The state this worker group starts from: ``(loop state, epochs after which this
    fit restarted, source)``.

    The newest of: this fit's latest Ray checkpoint (each rank's own shards: exact), and
    the run directory's ``last.pt`` (unsharded; written just before each report, and
    the state ``--resume`` continues). ``last.pt`` wins when it is newer (a worker died
    before Ray registered the epoch's report) or when the plan changed; all ranks agree
    on the choice (one collective).
    """
    import ray.train

    saved: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = torch.load(
                Path(directory) / f"rank_{rank}.pt", map_location="cpu", weights_only=True
            )
    last = last_path(job.out)
    last_epoch = -1
    if last.exists():  # only the loop state is read here (the tensors are memory-mapped)
        last_epoch = int(
            torch.load(last, map_location="cpu", weights_only=True, mmap=True)["loop"]["epoch"]
        )
    use_ray = saved is not None and saved["loop"]["epoch"] >= last_epoch
    use_ray = use_ray and step.layout_matches(saved["step"])  # type: ignore[index]
    agree = torch.tensor([1 if use_ray else 0], device=step.device)  # NCCL: on the GPU
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    earlier = list(saved["resumed_at"]) if saved is not None else []
    if int(agree) == 1:
        assert saved is not None
        step.load_sharded_state(saved["step"])
        st = LoopState(**saved["loop"])
        return st, [*earlier, st.epoch], "ray_checkpoint"
    del saved
    if last_epoch < 0:
        return LoopState(), [], "scratch"
    state = load_checkpoint(last)
    step.load_full_state(state)
    st = LoopState(**state["loop"])
    restarted = checkpoint is not None or st.epoch > job.start_epoch
    return st, [*earlier, st.epoch] if restarted else [], "last.pt"


def _epochs(
    job: _Job,
    step: ShardedTrainStep,
    st: LoopState,
    rank: int,
    world: int,
    train_source: EncodedChunk | tuple[str, RowRange],
    valid: EncodedChunk | None,
    rows: RowRange,
    resumed_at: list[int],
) -> dict[str, Any] | None:
    cfg, spec, tr = job.cfg, job.spec, job.cfg.training
    out = Path(job.out)
    ledger = EpochLedger(cfg, out, st)  # rank 0 judges and writes; the others follow
    watch = LossWatch(f"worker {rank}/{world}: ")
    # epochs of this invocation, restarts included
    while ledger.another_epoch(st.epoch - job.start_epoch, job.stop_after_epochs):
        epoch = st.epoch
        seed = cfg.seed * 1000 + epoch + rank * _RANK_SEED_STRIDE
        torch.manual_seed(seed)  # this rank's dropout stream of this epoch
        if epoch > 0 and tr.reset_embeddings_each_epoch:
            step.reset_embeddings(epoch)  # MEDA: this epoch's embeddings learn from one pass
        seen, steps = 0, 0
        loss_sum = torch.zeros((), device=step.device)  # read once per epoch (a GPU sync)
        first_loss = float("nan")
        t0 = last_log = time.perf_counter()
        batches = train_batches(train_source, spec, job.rank_batch, seed, cfg.dataset.chunk_rows)
        # a mid-epoch validation point that ran out of patience: (record, improved)
        stop_point: tuple[dict[str, Any], bool] | None = None
        loss = torch.zeros((), device=step.device)  # the last step's loss
        for batch in batches:
            if steps and valid is not None and ledger.validate_after(steps):
                # before this step, not after the last one: the epoch end validates that
                outcome = _validate_mid_epoch(job, step, ledger, valid, rank, world, loss, steps)
                if isinstance(outcome, str):
                    return {"error": outcome} if rank == 0 else None
                if outcome is not None:
                    stop_point = outcome
                    break
            loss = step.step(batch)
            loss_sum += loss.detach() * batch.batch_size
            steps += 1
            st.step += 1
            seen += batch.batch_size
            _maybe_fail(job.fault, rank, epoch + 1, steps)
            if steps % tr.log_every_steps == 0 or steps == 1:
                value = float(loss.detach())
                first_loss = value if steps == 1 else first_loss
                verdict = watch.verdict(value, epoch, steps)
                error = _agree_to_stop(verdict, epoch, steps, step.device)
                if error is not None:  # returned, not raised: Ray would retry a raised error
                    return {"error": error} if rank == 0 else None
            now = time.perf_counter()
            if tr.progress and now - last_log >= _LOG_INTERVAL_S:
                last_log = now
                _log(
                    f"worker {rank}/{world} epoch {epoch + 1}/{tr.epochs}: {seen:,}/{rows.rows:,} "
                    f"rows, {seen / (now - t0):,.0f} rows/s"
                )
            if tr.max_steps_per_epoch and steps >= tr.max_steps_per_epoch:
                break
        seconds = time.perf_counter() - t0
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (seen, seconds, float(loss_sum), first_loss))
        total = sum(p[0] for p in parts)
        epoch_seconds = max(p[1] for p in parts)  # ranks run in lock step
        per_worker = [round(p[0] / max(p[1], 1e-9), 1) for p in parts]
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": st.step,
            "train_rows": total,
            "train_seconds": round(epoch_seconds, 3),
            "samples_per_s": round(total / max(epoch_seconds, 1e-9), 1),
            "loss": round(sum(p[2] for p in parts) / max(total, 1), 6),
            "workers": world,
            "samples_per_s_per_worker": per_worker,
        }
        try:  # every rank holds the same record: all stop together
            ledger.check_loss(record, epoch, sum(p[3] for p in parts) / world)
        except DivergenceError as exc:
            return {"error": str(exc)} if rank == 0 else None
        st.train_samples += total
        st.train_seconds += epoch_seconds
        st.epoch = epoch + 1
        decision: list[Any] = [None]
        if stop_point is not None:  # judged already (every rank): its validation is the epoch's
            record.update({k: v for k, v in stop_point[0].items() if k.startswith("valid")})
            decision[0] = (stop_point[1], st.__dict__.copy())
        else:
            with step.averaged():  # the weights best.pt would hold
                scores = _score(step, spec, valid, job.valid_rows, rank, world, tr.eval_batch_size)
            if rank == 0:
                metrics = scores.compute(spec.task_names) if scores is not None else None
                decision[0] = (ledger.judge(record, metrics), st.__dict__.copy())
            dist.broadcast_object_list(decision, src=0)
        improved, st_dict = decision[0]
        for key, value in st_dict.items():
            setattr(st, key, value)
        full = step.full_state()  # collective; the whole state on rank 0
        if rank == 0:
            assert full is not None
            ledger.commit(record, improved, full, step.best_model_state(full))
        del full
        _log(
            f"worker {rank}/{world} epoch {st.epoch}: {parts[rank][0]:,} rows, "
            f"{per_worker[rank]:,.0f} samples/s (all workers: {record['samples_per_s']:,.0f})"
        )
        _report(step, st, ledger.chash, rank, resumed_at, record if rank == 0 else {})
    if rank != 0:
        return None
    if st.best_epoch < 0:  # returned, not raised: Ray would retry a raised error
        return {"run_error": f"{out}: no epoch completed; nothing to summarise"}
    return {
        **ledger.summary(),
        "workers": world,
        "restarts": len(resumed_at),
        "resumed_after_epochs": resumed_at,
    }


def _validate_mid_epoch(
    job: _Job,
    step: ShardedTrainStep,
    ledger: EpochLedger,
    valid: EncodedChunk,
    rank: int,
    world: int,
    loss: torch.Tensor,
    steps: int,
) -> tuple[dict[str, Any], bool] | str | None:
    """A validation point inside the epoch in progress, after its ``steps``-th step (every
    rank calls it: scoring and the checkpoint are collective). Rank 0 judges; every rank
    takes its verdict and state. Returns the divergence error (a non-finite loss on any
    rank: nothing is written), (record, improved) when patience ran out (the epoch ends
    there, the caller writes it), else None once ``best.pt`` (when improved) and the
    point's metrics line are written."""
    st, tr = ledger.state, job.cfg.training
    epoch = st.epoch
    error = _agree_to_stop(
        nonfinite_loss(float(loss.detach()), epoch, steps), epoch, steps, step.device
    )
    if error is not None:
        return error
    record: dict[str, Any] = {"epoch": epoch + 1, "step": st.step, "epoch_step": steps}
    with step.averaged():  # the weights best.pt would hold
        scores = _score(step, job.spec, valid, job.valid_rows, rank, world, tr.eval_batch_size)
    decision: list[Any] = [None]
    if rank == 0:
        metrics = scores.compute(job.spec.task_names) if scores is not None else None
        improved = ledger.judge(record, metrics)
        decision[0] = (improved, st.__dict__.copy(), record)
    dist.broadcast_object_list(decision, src=0)
    improved, st_dict, record = decision[0]
    for key, value in st_dict.items():
        setattr(st, key, value)
    if ledger.stops_mid_epoch(epoch):
        return record, improved
    full = step.full_state() if improved else None  # collective; the whole state on rank 0
    if rank == 0:
        ledger.note(record, improved, step.best_model_state(full) if full is not None else {})
    return None


def _agree_to_stop(verdict: str | None, epoch: int, steps: int, device: torch.device) -> str | None:
    """Whether any rank's loss diverged (``verdict``: this rank's reason): every rank
    checks the same global flag, so all stop together (no rank is left waiting in a
    collective); rank 0 reports its own reason, or how many workers diverged."""
    flag = torch.tensor([0.0 if verdict is None else 1.0], device=device)
    dist.all_reduce(flag)
    if float(flag) == 0.0:
        return None
    return verdict or diverged_message(
        f"the loss diverged on {int(flag)} other worker(s)", epoch, steps
    )


def _maybe_fail(fault: dict[str, Any] | None, rank: int, epoch: int, steps: int) -> None:
    if fault is None or (fault["rank"], fault["epoch"], fault["step"]) != (rank, epoch, steps):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"worker {rank} killed at epoch {epoch} step {steps}\n")
    # model a worker that dies after its last checkpoint was registered: Ray collects a
    # report from the worker's queue on its next poll (without this, _restore falls
    # back to last.pt; no epoch is lost either way)
    from ray.train.v2._internal.execution.context import get_train_context

    queue = get_train_context().get_result_queue()
    deadline = time.monotonic() + 10
    while not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.05)
    _log(f"worker {rank}: fault injection ({FAULT_ENV}), exiting at epoch {epoch} step {steps}")
    os._exit(1)


def _score(
    step: ShardedTrainStep,
    spec: FeatureSpec,
    valid: EncodedChunk | None,
    valid_rows: int,
    rank: int,
    world: int,
    batch_size: int,
) -> ScoreCollector | None:
    """Score this rank's validation rows; rank 0 gets everyone's, in row order.

    The rows travel as tensors (``dist.gather``), not pickles: rank 0 holds each rank's
    float32 block once, where ``gather_object`` held the pickled bytes beside the
    unpickled arrays (the pickled full state once exhausted a 24 GB machine)."""
    if valid is None:
        return None
    probs: list[torch.Tensor] = []
    for batch, real in padded_eval_batches(valid, spec, batch_size, valid_rows, rank, world):
        logits = step.logits(batch)  # collective: every rank, every batch (even all padding)
        if real:
            probs.append(torch.sigmoid(logits[:real]))
    # this shard's rows in order, one float32 column block per kind: labels | probs | truth
    columns = [valid.labels, torch.cat(probs)]
    if valid.true_probs is not None:
        columns.append(valid.true_probs)
    block = torch.cat([c.to(torch.float32) for c in columns], dim=1)
    sizes = [eval_shard(valid_rows, r, world).rows for r in range(world)]
    blocks = _gather_rows(block, sizes, rank)
    groups = None if valid.groups is None else _gather_rows(valid.groups, sizes, rank)
    if blocks is None:
        return None
    tasks = valid.labels.shape[1]
    collector = ScoreCollector()
    for r, part in enumerate(blocks):
        parts = part.numpy()
        collector.add(
            labels=parts[:, :tasks],
            probs=parts[:, tasks : 2 * tasks],
            true_probs=parts[:, 2 * tasks :] if valid.true_probs is not None else None,
            groups=None if groups is None else groups[r].numpy(),
        )
    return collector


def _gather_rows(rows: torch.Tensor, sizes: list[int], rank: int) -> list[torch.Tensor] | None:
    """Every rank's ``rows`` (rank r holds ``sizes[r]`` of them; same trailing shape and
    dtype everywhere) on rank 0, in rank order; None on the other ranks. Padded to the
    largest size: gloo's gather takes equal shapes."""
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    bucket = [torch.empty_like(padded) for _ in sizes] if rank == 0 else None
    dist.gather(padded, bucket, dst=0)
    if bucket is None:
        return None
    return [part[:n] for part, n in zip(bucket, sizes, strict=True)]


def _report(
    step: ShardedTrainStep,
    st: LoopState,
    chash: str,
    rank: int,
    resumed_at: list[int],
    metrics: dict[str, Any],
) -> None:
    """Every rank reports its shards in one Ray checkpoint (Ray merges the ranks' files)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="mtrec-ckpt-") as directory:
        torch.save(
            {
                "step": step.sharded_state(),
                "loop": st.__dict__.copy(),
                "config_hash": chash,
                # data position: epochs are replayed from their seeded order, so the
                # completed epochs and rows say where training continues
                "position": {"epoch": st.epoch, "rows_trained": st.train_samples},
                "resumed_at": resumed_at,
            },
            Path(directory) / f"rank_{rank}.pt",
        )
        ray.train.report(
            {k: v for k, v in metrics.items() if not isinstance(v, dict | list)},
            checkpoint=ray.train.Checkpoint.from_directory(directory),
        )
