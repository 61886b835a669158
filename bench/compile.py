"""``training.compile`` A/B: eager vs ``torch.compile`` of the dense task arch, same process.

For each census config (``configs/census_kdd/<name>.yaml``) two ``bench/_common.Trainer``
(exactly the loop's training step) are built from the same seed, one with
``training.compile: true``. The first step of each is timed (the compile time is the
difference), then ``--rounds`` interleaved windows of ``--steps`` steps over the same
pre-built batches (off, on, off, on, ...: drift of the shared machine hits both alike).
One JSON line per config::

    {"bench": "compile", "config": "autoint_plus", "threads": 1, "compile_s": ...,
     "eager_samples_per_s": ..., "compiled_samples_per_s": ..., "ratio": compiled / eager,
     "loss_eager": ..., "loss_compiled": ..., "loadavg": [...]}

(samples/s: median over rounds; the losses: after the same first step, for parity.)

Usage: ``.venv/bin/python bench/compile.py [--threads 1] [--rounds 3] [--steps 30]
[--configs autoint_plus mmoe]``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import _common as C

CENSUS = C.REPO / "configs" / "census_kdd"


def bench_config(name: str, args: argparse.Namespace) -> None:
    cfg, spec = C.load_experiment(CENSUS / f"{name}.yaml")
    eager = C.Trainer(cfg, spec, threads=args.threads)
    cfg_on, _ = C.load_experiment(CENSUS / f"{name}.yaml", ["training.compile=true"], fit=False)
    compiled = C.Trainer(cfg_on, spec, threads=args.threads)
    enc = C.load_train_split(cfg, spec)
    batches = list(itertools.islice(eager.batches(enc), 8))
    first: dict[str, float] = {}
    losses: dict[str, float] = {}
    for label, trainer in (("eager", eager), ("compiled", compiled)):
        t0 = time.perf_counter()
        losses[label] = float(trainer.step(batches[0]).detach())
        first[label] = time.perf_counter() - t0
        C.log(f"{name}: first {label} step {first[label]:.1f}s")
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for label, trainer in (("eager", eager), ("compiled", compiled)):
            rates[label].append(C.time_steps(trainer, batches, 3, args.steps)["samples_per_s"])
    e, c = statistics.median(rates["eager"]), statistics.median(rates["compiled"])
    C.emit(
        "compile",
        config=name,
        threads=args.threads,
        compile_s=round(first["compiled"] - first["eager"], 1),
        eager_samples_per_s=e,
        compiled_samples_per_s=c,
        ratio=round(c / e, 3),
        rounds=args.rounds,
        eager_rounds=rates["eager"],
        compiled_rounds=rates["compiled"],
        loss_eager=round(losses["eager"], 6),
        loss_compiled=round(losses["compiled"], 6),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per window")
    ap.add_argument("--configs", nargs="+", default=["autoint_plus", "mmoe"])
    args = ap.parse_args()
    C.warn_if_contended(args.threads)
    for name in args.configs:
        bench_config(name, args)


if __name__ == "__main__":
    main()
