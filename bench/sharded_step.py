"""The sharded training step on 1 and 2 gloo processes, without Ray.

The model, data and global batch of ``bench/scaling.py`` (criteo-like planted rows,
MMoE, 4096 rows per step split over the processes), trained by ``ShardedTrainStep`` in
``torch.multiprocessing`` processes with ``--threads`` intra-op threads each (default
1, as ``bench/scaling.py``). Each process builds
its batches from its own shard as a Ray worker does (``train_shard`` / ``load_shard`` /
``train_batches``). Rounds alternate 1 and 2 processes, so both see the same load.

What it separates: the step's own scaling (the embedding all-to-alls, the plan's
balance, the dense all-reduce) from what Ray adds around it (``bench/scaling.py``
measures both together). The sharding plan of each run goes to stderr.

JSON lines (progress on stderr)::

    {"bench": "sharded_step", "round", "processes", "ms_per_step", "samples_per_s"}
    {"bench": "sharded_step_summary", "speedup_2_processes", "round_speedups", ...}

``speedup_2_processes`` is the ratio of the medians of ``samples_per_s``.

Usage: ``.venv/bin/python bench/sharded_step.py [--rows 300000] [--rounds 2] [--steps 20]
[--set KEY=VALUE ...]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Any

import _common as C
from scaling import MODEL

GLOBAL_BATCH = 4096
WARMUP_STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _process(
    rank: int, world: int, cfg: Any, spec: Any, steps: int, threads: int, port: int, out: Any
) -> None:
    """One rank: build the sharded step, warm up, time ``steps`` steps; rank 0 reports."""
    import torch
    import torch.distributed as dist

    from mtrec.train.distributed import ShardedTrainStep
    from mtrec.train.distributed_data import load_shard, train_batches, train_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    batch = GLOBAL_BATCH // world
    rows = train_shard(out["train_rows"], rank, world)
    # the steps timed here, as the plan of a --set training.lr_schedule
    plan = WARMUP_STEPS + steps
    step = ShardedTrainStep(
        cfg, spec, device=torch.device("cpu"), batch_size=batch, planned_steps=plan
    )
    shard = load_shard(spec, cfg.dataset.train, rows, cfg.dataset.chunk_rows)
    batches = train_batches(shard, spec, batch, rank, cfg.dataset.chunk_rows)
    for _ in range(WARMUP_STEPS):
        step.step(next(batches))
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step.step(next(batches))
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        out["queue"].put((seconds / steps, step.plan_summary()))
    del step
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    parser.set_defaults(threads=1)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    import torch.multiprocessing as mp

    from mtrec.data.columns import count_rows

    data = C.ensure_synthetic(args.cache_dir, args.rows, preset="criteo-like")
    cfg, spec = C.load_experiment(
        data / "config.yaml",
        [
            *MODEL,
            f"training.batch_size={GLOBAL_BATCH}",
            f"training.threads={args.threads}",
            *args.sets,
        ],
    )
    ctx = mp.get_context("spawn")
    shared = {"queue": ctx.SimpleQueue(), "train_rows": count_rows(spec, cfg.dataset.train)}
    needed = (WARMUP_STEPS + args.steps) * GLOBAL_BATCH
    if shared["train_rows"] < needed:
        parser.error(
            f"--steps {args.steps} needs {needed:,} training rows (one epoch, no repeats); "
            f"the split has {shared['train_rows']:,}: raise --rows or lower --steps"
        )
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for world in (1, 2):
            mp.start_processes(
                _process,
                args=(world, cfg, spec, args.steps, args.threads, _free_port(), shared),
                nprocs=world,
                start_method="spawn",
            )
            seconds, plan = shared["queue"].get()
            rates[world].append(GLOBAL_BATCH / seconds)
            C.emit(
                "sharded_step",
                round=r + 1,
                processes=world,
                ms_per_step=round(seconds * 1e3, 1),
                samples_per_s=round(GLOBAL_BATCH / seconds, 1),
            )
            C.log(f"{world} process(es), plan: {plan}")
    paired = C.paired_speedup(rates[1], rates[2])
    C.emit(
        "sharded_step_summary",
        speedup_2_processes=paired["speedup"],
        round_speedups=paired["round_speedups"],
        samples_per_s_1_process=paired["median_1"],
        samples_per_s_2_processes=paired["median_2"],
        rounds=args.rounds,
        steps=args.steps,
    )


if __name__ == "__main__":
    main()
