"""Serving latency: the exported TorchScript module vs the eager model, per batch size.

The model is built from a YAML experiment (``--config``; default: the config that
``mtrec data synth`` writes, i.e. the demo's model, on planted data cached under
``bench/.cache``), its numeric statistics and kept ids fitted on the train split and
its weights seeded (latency does not depend on training; ``--run RUN_DIR`` takes a
trained run's best model instead). The serving module is scripted exactly as
``mtrec export`` does it (parity-checked), saved to bytes and loaded back, and timed
on ``--threads`` intra-op threads (default 1) at batch sizes 1, 64 and 512 of real
test rows, already encoded (``mtrec.serving.encode`` is client-side work).

Timed per call, after a warm-up, alternating call by call (both see the same load):
``module(values, lengths, dense)`` (scripted) and ``model.predict(kjt, dense)`` of the
eager training model (KJT prebuilt). Printed::

    {"bench": "serving", "p50_ms_batch1", "p99_ms_batch1" (target <= 1 ms), ...,
     "rows_per_s_batch512" (batch / p50; target >= 50k), "cpu_rows_per_s_batch512", ...,
     "cpu_p50_ms_batch1", "cpu_p99_ms_batch1" (thread CPU time: no descheduling), ...,
     "eager_p50_ms_batch1", "eager_p99_ms_batch1", ...,
     "eager_over_scripted_p50_batch1", ..., "model": {...}, "file_mb", "loadavg", ...}

Before / after a code change: ``--save old.pt`` from one checkout, ``--compare old.pt``
from the other (same config and seed: the same weights) times both modules alternately
in one process (``compare_*`` figures; the load drifts on a shared machine).

Usage: ``.venv/bin/python bench/serving.py [--config CFG] [--set key=value ...]
[--run RUN_DIR] [--threads 1] [--calls 2000] [--save PATH] [--compare PATH]``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import add_common_args, emit, ensure_synthetic, load_experiment, log

BATCH_SIZES = (1, 64, 512)


def percentiles(times_s: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(times_s)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return 1000 * statistics.median(ordered), 1000 * p99


def time_interleaved(
    calls_of: dict[str, tuple[Any, tuple[Any, ...]]], calls: int, warmup: int
) -> dict[str, tuple[float, float, float, float]]:
    """Per variant ``fn(*inputs)``: p50 / p99 ms of wall time, then of this thread's CPU
    time. Calls alternate between the variants so that every one sees the same machine
    load (it drifts on a shared machine); CPU time leaves out the time the thread was
    descheduled (with one intra-op thread, torch runs every op on the calling thread)."""
    clock, cpu = time.perf_counter, time.thread_time
    for fn, inputs in calls_of.values():
        for _ in range(warmup):
            fn(*inputs)
    wall: dict[str, list[float]] = {name: [] for name in calls_of}
    busy: dict[str, list[float]] = {name: [] for name in calls_of}
    for _ in range(calls):
        for name, (fn, inputs) in calls_of.items():
            c0, t0 = cpu(), clock()
            fn(*inputs)
            wall[name].append(clock() - t0)
            busy[name].append(cpu() - c0)
    return {name: (*percentiles(wall[name]), *percentiles(busy[name])) for name in calls_of}


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(cfg, spec, model)`` in eval mode: a trained run's best model or a seeded one."""
    import torch

    if args.run:
        from mtrec.run import load_trained_model

        return load_trained_model(args.run)
    from mtrec.model import build_model

    config = args.config
    if config is None:
        data = ensure_synthetic(args.cache_dir, rows=args.rows)
        config = data / "config.yaml"
    log(f"building the model of {config} (statistics fitted on its train split)")
    cfg, spec = load_experiment(config, overrides=args.set)
    torch.manual_seed(cfg.seed)
    return cfg, spec, build_model(cfg, spec).eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.set_defaults(threads=1)
    p.add_argument("--config", type=Path, help="YAML experiment (default: synthetic demo config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run", type=Path, help="time this trained run's best model instead")
    p.add_argument("--rows", type=int, default=200_000, help="planted rows for the default")
    p.add_argument("--calls", type=int, default=2000, help="timed calls at batch 1")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument(
        "--save", type=Path, help="also write the timed serving module here (TorchScript)"
    )
    p.add_argument(
        "--compare",
        type=Path,
        help="a serving module saved by --save (e.g. from another checkout), timed "
        "alternately with this one on the same inputs: compare_* figures",
    )
    args = p.parse_args(argv)

    import torch

    from mtrec.data.batcher import encoded_chunks, to_batch
    from mtrec.export.exporter import check_parity, script_serving

    torch.set_num_threads(args.threads)
    cfg, spec, model = build(args)
    split = cfg.dataset.test or cfg.dataset.valid or cfg.dataset.train
    chunk = next(encoded_chunks(spec, split, max(BATCH_SIZES), need_labels=False))
    scripted = script_serving(model, spec)
    parity = check_parity(scripted, model, to_batch(chunk, spec), where=str(split))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    module = torch.jit.load(io.BytesIO(buffer.getvalue()))
    if args.save:
        args.save.write_bytes(buffer.getvalue())
    other = None if args.compare is None else torch.jit.load(str(args.compare))
    figures: dict[str, Any] = {}
    for b in BATCH_SIZES:
        batch = to_batch(chunk.slice(0, b), spec)
        inputs = (batch.sparse.values(), batch.sparse.lengths(), batch.dense)
        # fewer calls for bigger batches: about the same time per batch size
        calls = max(200, args.calls // max(1, b // 8)) if b > 1 else args.calls
        variants: dict[str, tuple[Any, tuple[Any, ...]]] = {
            "scripted": (module, inputs),
            "eager": (model.predict, (batch.sparse, batch.dense)),
        }
        if other is not None:
            variants["compare"] = (other, inputs)
        with torch.no_grad():
            timed = time_interleaved(variants, calls, args.warmup)
            if other is not None:  # the same model: the same scores
                gap = float((other(*inputs) - module(*inputs)).abs().max())
                figures[f"compare_max_abs_diff_batch{b}"] = gap
        (s50, s99, c50, c99), (e50, e99, _, _) = timed["scripted"], timed["eager"]
        figures |= {
            f"p50_ms_batch{b}": round(s50, 4),
            f"p99_ms_batch{b}": round(s99, 4),
            f"eager_p50_ms_batch{b}": round(e50, 4),
            f"eager_p99_ms_batch{b}": round(e99, 4),
            f"eager_over_scripted_p50_batch{b}": round(e50 / s50, 3),
            f"cpu_p50_ms_batch{b}": round(c50, 4),
            f"cpu_p99_ms_batch{b}": round(c99, 4),
            f"rows_per_s_batch{b}": round(1000 * b / s50),
            f"cpu_rows_per_s_batch{b}": round(1000 * b / c50),
            f"calls_batch{b}": calls,
        }
        if other is not None:
            o50, o99, oc50, oc99 = timed["compare"]
            figures |= {
                f"compare_p50_ms_batch{b}": round(o50, 4),
                f"compare_p99_ms_batch{b}": round(o99, 4),
                f"compare_cpu_p50_ms_batch{b}": round(oc50, 4),
                f"compare_cpu_p99_ms_batch{b}": round(oc99, 4),
                f"compare_over_scripted_cpu_p50_batch{b}": round(oc50 / c50, 3),
            }
        log(f"batch {b}: scripted p50 {s50:.3f} ms p99 {s99:.3f} ms; eager p50 {e50:.3f} ms")
    m = cfg.model
    emit(
        "serving",
        **figures,
        target_p99_ms_batch1=1.0,
        target_rows_per_s_batch512=50_000,
        model={
            "embedding": m.embedding.type,
            "interaction": m.interaction.type,
            "multitask": m.multitask.type,
        },
        config=str(args.run or args.config or "synthetic default"),
        overrides=args.set,
        parity_max_abs_diff=parity,
        file_mb=round(buffer.getbuffer().nbytes / 2**20, 2),
        threads=args.threads,
        pid=os.getpid(),
    )


if __name__ == "__main__":
    main()
