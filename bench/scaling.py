"""Distributed training speed: samples/s with 1 and 2 Ray Train workers on one machine.

Prints JSON lines (progress on stderr):

``{"bench": "scaling_ray_init", "ray_init_s"}`` — start of the embedded Ray instance.

``{"bench": "scaling", "round": r, "workers": N, ...}`` for N = 1 and 2 in each of the
``--rounds`` rounds, each worker with ``--threads`` intra-op threads (default 1) and one
CPU:

* ``samples_per_s``: training rows/s of all workers together over the epochs after the
  first (warm-up) one, from the run's ``metrics.jsonl`` (training steps only: no
  validation, checkpoints or start-up);
* ``samples_per_s_per_worker``: the same per worker (last epoch);
* ``workers_start_s``: seconds from ``fit()`` to the workers' train function (Ray
  actors, process group); ``worker_setup_s``: then to the first step (sharded model,
  data shards); ``fit_wall_s``: the whole ``train_distributed`` call.

``{"bench": "scaling_summary", "speedup_2_workers", ...}`` — median ``samples_per_s`` of 2
workers over that of 1 worker (target >= 1.5 on 2 cores, issue #17), each round's ratio, and
the local loop's samples/s with the same threads for reference.

``training.batch_size`` is the global batch (``--batch-size``, default 4096): each of
N workers takes batch/N rows per step, so both runs do the same steps.

``--rounds R`` (default 2) alternates the two runs R times (1, 2, 1, 2, ...), each round
a fresh fit: the summary's ``speedup_2_workers`` is the ratio of the medians, with every
round's ratio beside it (``round_speedups``). On a shared machine one pair of runs moves
by ±0.15 between minutes (2026-12-07: 0.91-1.19 for four single runs of the same code);
the spread of the rounds says how far one figure can be trusted.

Usage: ``.venv/bin/python bench/scaling.py [--rows 300000] [--epochs 3] [--threads 1]
[--rounds 2] [--preset criteo-like] [--sharding-types column_wise ...] [--set KEY=VALUE ...]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

MODEL = [
    "model.embedding.dim=16",
    "model.multitask.type=mmoe",
    "model.multitask.num_experts=4",
    "model.multitask.expert_hidden=[128, 64]",
    "model.multitask.tower_hidden=[64]",
]


def steady_samples_per_s(run: Path) -> tuple[float, list[float]]:
    """Rows/s over the epochs after the first, and the last epoch's per-worker rows/s."""
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    rows = sum(r["train_rows"] for r in timed)
    seconds = sum(r["train_seconds"] for r in timed)
    return rows / max(seconds, 1e-9), records[-1].get("samples_per_s_per_worker", [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    parser.set_defaults(threads=1)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--preset", default="criteo-like", choices=["default", "criteo-like"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating pairs of 1- and 2-worker runs"
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. model.embedding.num_tables=2 (one table per worker)",
    )
    parser.add_argument(
        "--sharding-types",
        nargs="+",
        default=None,
        metavar="TYPE",
        help="torchrec sharding types the planner may use (default: all that run on CPU)",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    data = C.ensure_synthetic(args.cache_dir, args.rows, preset=args.preset)
    overrides = [
        *MODEL,
        f"training.batch_size={args.batch_size}",
        f"training.epochs={args.epochs}",
        f"training.threads={args.threads}",
        "training.early_stopping_patience=0",
        "training.progress=false",
        *args.sets,
    ]
    from mtrec.config import load_config
    from mtrec.train.loop import train
    from mtrec.train.ray_trainer import start_local_ray, train_distributed

    cfg = load_config(data / "config.yaml", overrides=overrides)
    root = Path(tempfile.mkdtemp(prefix="mtrec-scaling-"))
    try:
        C.log(f"local loop, {args.threads} thread(s)")
        train(cfg, root / "local")
        local, _ = steady_samples_per_s(root / "local")

        t0 = time.perf_counter()
        start_local_ray(num_cpus=2)
        C.emit("scaling_ray_init", ray_init_s=round(time.perf_counter() - t0, 2))

        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for r in range(args.rounds):
            for workers in (1, 2):
                C.log(f"round {r + 1}/{args.rounds}: {workers} worker(s), {args.threads} thread(s)")
                t0 = time.perf_counter()
                out = root / f"r{r}-w{workers}"
                summary = train_distributed(
                    cfg, out, workers=workers, sharding_types=args.sharding_types
                )
                wall = time.perf_counter() - t0
                rate, per_worker = steady_samples_per_s(out)
                shutil.rmtree(out, ignore_errors=True)
                runs[workers].append(
                    C.emit(
                        "scaling",
                        round=r + 1,
                        workers=workers,
                        threads_per_worker=args.threads,
                        samples_per_s=round(rate, 1),
                        samples_per_s_per_worker=per_worker,
                        workers_start_s=summary.get("workers_start_s"),
                        worker_setup_s=summary.get("worker_setup_s"),
                        fit_wall_s=round(wall, 2),
                        rows=args.rows,
                        preset=args.preset,
                        global_batch=args.batch_size,
                        epochs=args.epochs,
                        valid_mean_auc=round(
                            sum(m["auc"] for m in summary["valid"].values())
                            / len(summary["valid"]),
                            5,
                        ),
                    )
                )
        paired = C.paired_speedup(
            [x["samples_per_s"] for x in runs[1]], [x["samples_per_s"] for x in runs[2]]
        )
        C.emit(
            "scaling_summary",
            speedup_2_workers=paired["speedup"],
            round_speedups=paired["round_speedups"],
            samples_per_s_1_worker=paired["median_1"],
            samples_per_s_2_workers=paired["median_2"],
            rounds=args.rounds,
            local_samples_per_s=round(local, 1),
            threads_per_worker=args.threads,
        )
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
