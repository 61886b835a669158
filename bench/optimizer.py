"""Dense Adam step: ``foreach`` (multi-tensor ops) against ``fused`` (one CPU kernel).

Builds ``mtrec.train.step.TrainStep`` for a census-kdd config, runs a few training steps
so every dense parameter has a gradient and Adam state, then times ``dense_opt.step()``
of two copies of the same parameter groups, one per implementation, interleaved round
by round (same load), and the whole training step with each. ``TrainStep`` itself uses
``fused=True`` (``mtrec.train.optim.make_dense_optimizer``); the two agree to float
rounding (~1e-7 after many steps), not bit for bit.

Output, one JSON line::

    {"bench": "optimizer", "config": ..., "opt_ms": {"foreach": x, "fused": y},
     "step_samples_per_s": {"foreach": x, "fused": y}, ...}

Usage: ``.venv/bin/python bench/optimizer.py [--config autoint_plus.yaml] [--threads 1]
[--clock process] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import _common as C


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(p)
    p.add_argument("--config", default="autoint_plus.yaml", help="file in configs/census_kdd")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="training steps per round")
    p.add_argument("--clock", choices=["wall", "process"], default="wall")
    args = p.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    C.warn_if_contended(args.threads)

    import torch

    cfg, spec = C.load_experiment(C.REPO / "configs" / "census_kdd" / args.config)
    trainers = {kind: C.Trainer(cfg, spec, threads=args.threads) for kind in ("foreach", "fused")}
    for kind, t in trainers.items():
        groups = [
            {k: v for k, v in g.items() if k not in ("foreach", "fused")}
            for g in t._step.dense_opt.param_groups
        ]
        t._step.dense_opt = torch.optim.Adam(groups, **{kind: True})
    batches = list(itertools.islice(trainers["fused"].batches(C.load_train_split(cfg, spec)), 8))
    for t in trainers.values():  # warm-up: gradients and Adam state exist
        for b in batches[:3]:
            t.step(b)
    opt_ms: dict[str, list[float]] = {k: [] for k in trainers}
    rate: dict[str, list[float]] = {k: [] for k in trainers}
    for _ in range(args.rounds):
        for kind, t in trainers.items():
            t0 = clock()
            for b in itertools.islice(itertools.cycle(batches), args.steps):
                t.step(b)
            rate[kind].append(args.steps * batches[0].batch_size / (clock() - t0))
            opt = t._step.dense_opt
            t0 = clock()
            for _ in range(args.steps):
                opt.step()
            opt_ms[kind].append((clock() - t0) / args.steps * 1e3)
    C.emit(
        "optimizer",
        config=args.config,
        opt_ms={k: round(statistics.median(v), 3) for k, v in opt_ms.items()},
        step_samples_per_s={k: round(statistics.median(v), 1) for k, v in rate.items()},
        threads=args.threads,
        clock=args.clock,
    )


if __name__ == "__main__":
    main()
