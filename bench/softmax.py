"""Softmax over a short dimension: ``torch.softmax`` vs ``mtrec.nn.short_softmax``.

Two parts, one process, each variant interleaved round by round so they see the same load:

* ``softmax_kernel`` lines — forward and forward + backward time of one softmax over the
  last dim of a ``batch x n x n`` tensor (AutoInt's attention map at F = n fields), ATen vs
  the whole-tensor path, for n around the SIMD width (``SHORT_SOFTMAX_BELOW``);
* ``softmax_training`` lines — training samples/s of whole configs (``--configs``: the
  planted default experiment, i.e. the demo's model, and census AutoInt+ / MMoE) with the
  short path on vs forced off (``short_below = 0``: every softmax is ``torch.softmax``), and
  the ratio ``speedup`` = on ÷ off.

Usage: ``.venv/bin/python bench/softmax.py [--threads 2] [--rounds 5] [--steps 10]``
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

import _common as C

CENSUS = C.REPO / "configs" / "census_kdd"
CONFIGS = {
    "default_experiment": None,  # the planted default preset's config (the demo's model)
    "census_autoint_plus": CENSUS / "autoint_plus.yaml",
    "census_mmoe": CENSUS / "mmoe.yaml",
}


def _median_us(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1e6 * statistics.median(times), 1)


def kernel_sweep(sizes: list[int], batch: int, reps: int) -> None:
    import torch

    from mtrec.nn import short_softmax

    for n in sizes:
        x0, grad = torch.randn(batch, n, n), torch.randn(batch, n, n)
        row: dict[str, Any] = {"n": n, "batch": batch}
        for name, below in (("aten", 0), ("short", n + 1)):

            def forward(below: int = below, x0: Any = x0) -> None:
                with torch.no_grad():
                    short_softmax.softmax(x0, -1, below)

            def both(below: int = below, x0: Any = x0, grad: Any = grad) -> None:
                x = x0.clone().requires_grad_()
                short_softmax.softmax(x, -1, below).backward(grad)

            forward(), both()  # warm-up
            row[f"{name}_fwd_us"] = _median_us(forward, reps)
            row[f"{name}_fwd_bwd_us"] = _median_us(both, reps)
        row["speedup_fwd_bwd"] = round(row["aten_fwd_bwd_us"] / row["short_fwd_bwd_us"], 2)
        C.emit("softmax_kernel", **row, short_below=short_softmax.SHORT_SOFTMAX_BELOW)


def training(args: argparse.Namespace) -> None:
    from mtrec.nn import short_softmax

    defaults = short_softmax.softmax.__defaults__
    assert defaults is not None
    default_below, min_numel = defaults
    for name in args.configs:
        path = CONFIGS[name]
        if path is None:
            path = C.ensure_synthetic(args.cache_dir, args.rows) / "config.yaml"
        cfg, spec = C.load_experiment(path)
        trainer = C.Trainer(cfg, spec, threads=args.threads)
        batches = list(itertools.islice(trainer.batches(C.load_train_split(cfg, spec)), 20))
        rates: dict[str, list[float]] = {"short": [], "aten": []}
        for r in range(args.rounds + 1):  # round 0 warms up
            for variant, below in (("short", default_below), ("aten", 0)):
                short_softmax.softmax.__defaults__ = (below, min_numel)
                timed = C.time_steps(trainer, batches, warmup=0, steps=args.steps)
                if r:
                    rates[variant].append(timed["samples_per_s"])
        short_softmax.softmax.__defaults__ = defaults
        median = {k: round(statistics.median(v), 1) for k, v in rates.items()}
        C.emit(
            "softmax_training",
            config=name,
            threads=args.threads,
            samples_per_s_short=median["short"],
            samples_per_s_aten=median["aten"],
            speedup=round(median["short"] / median["aten"], 3),
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(p)
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 14, 16, 24, 41])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--rows", type=int, default=200_000, help="planted rows (default config)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--skip-kernel", action="store_true")
    args = p.parse_args()
    C.warn_if_contended(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if not args.skip_kernel:
        kernel_sweep(args.sizes, args.batch, args.reps)
    training(args)


if __name__ == "__main__":
    main()
