"""Training benchmark: samples/s, and how much of the machine's GEMM speed the model uses.

Prints two JSON lines (progress on stderr):

``{"bench": "train", ...}`` — MMoE on Census-Income KDD (``configs/census_kdd/mmoe.yaml``,
data under ``$MTREC_DATA_DIR/census-kdd``; skipped with a message when absent):

* ``samples_per_s`` over full epochs (after a warm-up epoch) of the loop's own pieces:
  in-memory encoded train split, shuffled batch build, fused row-wise Adagrad on the
  embeddings, Adam on dense parameters; batch 1024, 2 threads; ``epoch_s`` per epoch.
* ``model_gflop_per_sample`` — forward + backward FLOPs of one training step
  (``torch.utils.flop_counter.FlopCounterMode``, matmuls) divided by the batch size.
* ``gemm_peak_gflops`` — measured in the same run on exactly the GEMM calls one step
  issues (every ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` with its shapes and strides,
  forward and backward, recorded by a dispatch mode): their FLOPs over their best time.
* ``dense_utilization = samples_per_s * model_gflop_per_sample / gemm_peak_gflops`` —
  the share of the GEMM speed the whole training step achieves.
* ``phase_ms`` — mean ms per step of batch build / forward / backward / optimizer.

``{"bench": "train_criteo_like", ...}`` — MMoE (4 experts [128, 64], towers [64],
dim 16, batch 4096) on 1M planted criteo-like rows and on the same with 10x the
vocabularies: samples/s over one full epoch each, and the embedding rows.
Targets: ``samples_per_s`` >= 55,000 and ``samples_per_s_10x_vocab`` >= 0.9 x base.

Usage: ``.venv/bin/python bench/train.py [--rows N] [--epochs E] [--skip-census]
[--skip-criteo] [--profile-steps 30]``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as C
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

CENSUS_CONFIG = C.REPO / "configs" / "census_kdd" / "mmoe.yaml"

# the criteo-like model the targets are stated for
CRITEO_MODEL = {
    "model.embedding.dim": 16,
    "model.multitask.type": "mmoe",
    "model.multitask.num_experts": 4,
    "model.multitask.expert_hidden": [128, 64],
    "model.multitask.tower_hidden": [64],
    "training.batch_size": 4096,
}

aten = torch.ops.aten
_GEMMS = {
    aten.mm.default: "mm",
    aten.addmm.default: "addmm",
    aten.bmm.default: "bmm",
    aten.baddbmm.default: "baddbmm",
}


# ------------------------------------------------------------------------ GEMM peak


@dataclass
class _TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype)
        t.normal_()  # fills the whole storage, also where strides overlap
        return t


@dataclass
class GemmCall:
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return _GEMMS[self.func]

    def operands(self) -> tuple[_TensorSpec, _TensorSpec]:
        # mm / bmm: (a, b); addmm / baddbmm: (bias, a, b)
        a, b = self.args[:2] if self.name in ("mm", "bmm") else self.args[1:3]
        return a, b

    @property
    def flops(self) -> int:
        a, b = self.operands()
        if self.name in ("mm", "addmm"):
            (m, k), n = a.shape, b.shape[1]
            return 2 * m * k * n
        (g, m, k), n = a.shape, b.shape[2]
        return 2 * g * m * k * n

    @property
    def label(self) -> str:
        a, b = self.operands()
        shape = "x".join(map(str, a.shape)) + " @ " + "x".join(map(str, b.shape))
        ta = "" if a.stride[-1] == 1 else "ᵀ"
        tb = "" if b.stride[-1] == 1 else "ᵀ"
        return f"{self.name} {shape}{' (' + ta + ',' + tb + ')' if ta or tb else ''}"

    def materialise(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args = tuple(a.make() if isinstance(a, _TensorSpec) else a for a in self.args)
        return args, dict(self.kwargs)


class GemmRecorder(TorchDispatchMode):
    """Records every mm / addmm / bmm / baddbmm call (shapes, strides, scalars)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[GemmCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _GEMMS:

            def spec(x: Any) -> Any:
                if isinstance(x, torch.Tensor):
                    return _TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype)
                return x

            self.calls.append(
                GemmCall(
                    func, tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}
                )
            )
        return func(*args, **kwargs)


def count_step(trainer: C.Trainer, batch: Any) -> tuple[int, list[GemmCall]]:
    """FLOPs of one training step (FlopCounterMode) and the GEMM calls it issues."""
    with FlopCounterMode(display=False) as counter:
        trainer.step(batch)
    total = counter.get_total_flops()
    recorder = GemmRecorder()
    with recorder:
        trainer.step(batch)
    return total, recorder.calls


def gemm_peak(calls: list[GemmCall], min_seconds: float = 1.5, min_reps: int = 10) -> dict:
    """Best time of the recorded GEMM sequence → GFLOP/s, with per-call rates."""
    prepared = [(c, *c.materialise()) for c in calls]
    flops = sum(c.flops for c in calls)
    clock = time.perf_counter
    for c, args, kwargs in prepared * 3:  # warm-up
        c.func(*args, **kwargs)
    best_total = float("inf")
    best_each = [float("inf")] * len(prepared)
    reps, t_start = 0, clock()
    while reps < min_reps or clock() - t_start < min_seconds:
        total = 0.0
        for i, (c, args, kwargs) in enumerate(prepared):
            t0 = clock()
            c.func(*args, **kwargs)
            dt = clock() - t0
            total += dt
            best_each[i] = min(best_each[i], dt)
        best_total = min(best_total, total)
        reps += 1
    per_call = [
        {
            "gemm": c.label,
            "mflop": round(c.flops / 1e6, 2),
            "best_ms": round(1000 * t, 3),
            "gflops": round(c.flops / t / 1e9, 1),
        }
        for (c, _, _), t in zip(prepared, best_each)
    ]
    return {
        "gflops": flops / best_total / 1e9,
        "gflop_per_step": flops / 1e9,
        "best_ms": 1000 * best_total,
        "reps": reps,
        "per_call": per_call,
    }


# ------------------------------------------------------------------------------ census


def bench_census(args: argparse.Namespace) -> None:
    cfg, _ = C.load_experiment(CENSUS_CONFIG, fit=False)
    missing = [p for p in (cfg.dataset.train,) if not Path(p).exists()]
    if missing:
        C.log(
            f"SKIP census-kdd bench: {missing[0]} not found (set MTREC_DATA_DIR to the folder "
            "holding census-kdd/, default ../shared/data)"
        )
        return
    cfg, spec = C.load_experiment(
        CENSUS_CONFIG,
        overrides=[f"training.threads={args.threads}", f"training.precision={args.precision}"],
    )
    batch_size = cfg.training.batch_size
    enc = C.load_train_split(cfg, spec)
    trainer = C.Trainer(cfg, spec, threads=args.threads)

    # FLOPs and the GEMM calls of one full-size step
    probe = next(iter(trainer.batches(enc, seed=123)))
    counted, calls = count_step(trainer, probe)
    gemm_flops = sum(c.flops for c in calls)
    C.log(
        f"one step: {counted / 1e9:.4f} GFLOP (flop counter), {len(calls)} GEMM calls "
        f"= {gemm_flops / 1e9:.4f} GFLOP"
    )

    epochs = args.epochs or 2
    timing = C.time_epochs(trainer, enc, epochs=epochs, warmup_epochs=1, seed=cfg.seed * 1000)
    phases = C.phase_breakdown(trainer, enc, steps=50)
    C.log(f"phase ms/step: {phases}")

    peak = gemm_peak(calls)
    C.log(
        f"GEMM peak on the model's {len(calls)} calls: {peak['gflops']:.1f} GFLOP/s "
        f"(best {peak['best_ms']:.2f} ms/step of GEMMs over {peak['reps']} reps)"
    )
    for row in peak["per_call"]:
        C.log(f"  {row['gemm']:<44} {row['mflop']:>8.1f} MFLOP {row['gflops']:>7.1f} GFLOP/s")

    gflop_per_sample = counted / batch_size / 1e9
    achieved = timing["samples_per_s"] * gflop_per_sample
    if args.profile_steps:
        batches = list(itertools.islice(trainer.batches(enc, seed=5), args.profile_steps))
        C.log(f"torch.profiler over {len(batches)} steps (pre-built batches):")
        print(C.profile_steps(trainer, batches), file=sys.stderr, flush=True)
    C.emit(
        "train",
        config=str(CENSUS_CONFIG.relative_to(C.REPO)),
        samples_per_s=timing["samples_per_s"],
        model_gflop_per_sample=round(gflop_per_sample, 6),
        gemm_peak_gflops=round(peak["gflops"], 2),
        dense_utilization=round(achieved / peak["gflops"], 4),
        achieved_gflops=round(achieved, 2),
        epoch_s=timing["epoch_s"],
        epoch_s_each=timing["epoch_s_each"],
        epochs=epochs,
        train_rows=timing["rows"],
        steps_per_epoch=timing["steps_per_epoch"],
        batch_size=batch_size,
        threads=args.threads,
        precision=args.precision,
        gemm_calls_per_step=len(calls),
        gemm_ms_per_step_at_peak=round(peak["best_ms"], 3),
        step_ms=round(1000 * timing["epoch_s"] / timing["steps_per_epoch"], 3),
        phase_ms=phases,
    )


# ------------------------------------------------------------------------- criteo-like


def _criteo_experiment(data_dir: Path, precision: str = "fp32") -> tuple[Any, Any]:
    config = data_dir / "config.yaml"
    cfg, _ = C.load_experiment(config, fit=False)
    have = {
        "model.embedding.dim": cfg.model.embedding.dim,
        "model.multitask.type": cfg.model.multitask.type,
        "model.multitask.num_experts": cfg.model.multitask.num_experts,
        "model.multitask.expert_hidden": cfg.model.multitask.expert_hidden,
        "model.multitask.tower_hidden": cfg.model.multitask.tower_hidden,
        "training.batch_size": cfg.training.batch_size,
    }
    overrides = [f"{k}={v}" for k, v in CRITEO_MODEL.items() if have[k] != v]
    if overrides:
        C.log(f"generated config differs from the benchmark model; overriding {overrides}")
    return C.load_experiment(config, overrides=[*overrides, f"training.precision={precision}"])


def _criteo_run(data_dir: Path, args: argparse.Namespace, epochs: int) -> dict:
    cfg, spec = _criteo_experiment(data_dir, args.precision)
    enc = C.load_train_split(cfg, spec)
    t0 = time.perf_counter()
    trainer = C.Trainer(cfg, spec, threads=args.threads)
    rows = trainer.embedding_rows()
    C.log(f"model built in {time.perf_counter() - t0:.1f}s: {rows:,} embedding rows")
    timing = C.time_epochs(trainer, enc, epochs=epochs, warmup_steps=10, seed=cfg.seed * 1000)
    result = {**timing, "embedding_rows": rows, "batch_size": cfg.training.batch_size}
    del trainer, enc
    gc.collect()
    return result


def bench_criteo(args: argparse.Namespace) -> None:
    epochs = args.epochs or 1
    base_dir = C.ensure_synthetic(args.cache_dir, args.rows, preset="criteo-like")
    wide_dir = C.ensure_synthetic(args.cache_dir, args.rows, preset="criteo-like", vocab_scale=10)
    C.log("criteo-like, base vocabularies ...")
    base = _criteo_run(base_dir, args, epochs)
    C.log("criteo-like, 10x vocabularies ...")
    wide = _criteo_run(wide_dir, args, epochs)
    C.emit(
        "train_criteo_like",
        samples_per_s=base["samples_per_s"],
        embedding_rows=base["embedding_rows"],
        samples_per_s_10x_vocab=wide["samples_per_s"],
        embedding_rows_10x=wide["embedding_rows"],
        ratio_10x_vs_base=round(wide["samples_per_s"] / base["samples_per_s"], 3),
        epoch_s=base["epoch_s"],
        epoch_s_10x_vocab=wide["epoch_s"],
        rows=args.rows,
        train_rows=base["rows"],
        epochs=epochs,
        batch_size=base["batch_size"],
        threads=args.threads,
        precision=args.precision,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="criteo-like rows (all splits)")
    p.add_argument(
        "--epochs", type=int, default=None, help="timed epochs (default: census 2, criteo 1)"
    )
    p.add_argument("--skip-census", action="store_true")
    p.add_argument("--skip-criteo", action="store_true")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="also print a torch.profiler table of this many census steps to stderr",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="training.precision (bf16: CPU autocast of the dense forward)",
    )
    C.add_common_args(p)
    args = p.parse_args(argv)
    C.warn_if_contended(args.threads)
    if not args.skip_census:
        bench_census(args)
    if not args.skip_criteo:
        bench_criteo(args)


if __name__ == "__main__":
    sys.exit(main())
