"""A/B training speed of two settings of one experiment, measured in one run.

Builds one trainer per variant (``--a`` and ``--b``: ``key=value`` overrides, as ``mtrec
train --set``; empty: the config as is) on the same training batches and times them round
by round, interleaved, so both see the same load. One ``ab`` JSON line: each variant's
median samples/s and the ratio ``b_over_a``. For levers that change the step, e.g. the
linear term's prior::

    .venv/bin/python bench/ab.py --b model.linear.prior_std=null

Usage: ``.venv/bin/python bench/ab.py [--config C] [--a SET ...] [--b SET ...]
[--threads 2] [--rounds 5] [--steps 15]`` (no ``--config``: the planted default preset,
the demo's model, generated in the bench cache).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import _common as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    C.add_common_args(ap)
    ap.add_argument("--config", type=Path, help="experiment YAML (default: the planted preset)")
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the generated preset")
    ap.add_argument("--a", nargs="*", default=[], metavar="SET", help="overrides of variant a")
    ap.add_argument("--b", nargs="*", default=[], metavar="SET", help="overrides of variant b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15, help="training steps per variant and round")
    args = ap.parse_args()
    path = args.config or C.ensure_synthetic(args.cache_dir, args.rows) / "config.yaml"
    trainers, batches = {}, None
    for name, sets in (("a", args.a), ("b", args.b)):
        cfg, spec = C.load_experiment(path, sets)
        trainers[name] = C.Trainer(cfg, spec, threads=args.threads)
        if batches is None:  # the same batches for both (the data settings must agree)
            source = C.load_train_split(cfg, spec)
            batches = list(itertools.islice(trainers[name].batches(source), 20))
    assert batches is not None
    rates: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, trainer in trainers.items():
            timed = C.time_steps(trainer, batches, warmup=0, steps=args.steps)
            if r:
                rates[name].append(timed["samples_per_s"])
        C.log(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items() if v))
    median = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    C.emit(
        "ab",
        config=str(path),
        a=args.a,
        b=args.b,
        threads=args.threads,
        samples_per_s_a=median["a"],
        samples_per_s_b=median["b"],
        b_over_a=round(median["b"] / median["a"], 3),
    )


if __name__ == "__main__":
    main()
