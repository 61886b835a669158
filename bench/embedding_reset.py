"""What MEDA's reset (``training.reset_embeddings_each_epoch``) costs, as a share of an epoch,
measured in one process.

One trainer (exactly the loop's step) times ``--steps`` steps over pre-built batches of the
training split and extrapolates them to the epoch's steps (rows / batch size); the same
trainer then runs ``--resets`` resets of its deep embedding tables (a fresh draw of every
table, the row-wise Adagrad state zeroed). One JSON line::

    {"bench": "embedding_reset", "config": ..., "threads": 1, "step_ms": ...,
     "steps_per_epoch": ..., "epoch_s": ..., "reset_s": [...], "reset_over_epoch": ...,
     "embedding_rows": ..., "loadavg": [...]}

(``reset_over_epoch``: the fastest reset over the extrapolated epoch.)

Usage: ``.venv/bin/python bench/embedding_reset.py [--config C] [--threads 1] [--steps 60]
[--resets 3]`` (no ``--config``: the planted default preset, the demo's model, generated
in the bench cache).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import _common as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    C.add_common_args(ap)
    ap.set_defaults(threads=1)
    ap.add_argument("--config", type=Path, help="experiment YAML (default: the planted preset)")
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the generated preset")
    ap.add_argument("--steps", type=int, default=60, help="training steps timed")
    ap.add_argument("--resets", type=int, default=3, help="resets timed")
    args = ap.parse_args()
    path = args.config or C.ensure_synthetic(args.cache_dir, args.rows) / "config.yaml"
    cfg, spec = C.load_experiment(path)
    trainer = C.Trainer(cfg, spec, threads=args.threads)
    source = C.load_train_split(cfg, spec)
    batches = list(itertools.islice(trainer.batches(source), 20))
    timed = C.time_steps(trainer, batches, warmup=5, steps=args.steps)
    steps_per_epoch = math.ceil(source.rows / cfg.training.batch_size)
    epoch_s = timed["step_ms"] / 1000 * steps_per_epoch
    resets = []
    for epoch in range(1, args.resets + 1):
        t0 = time.perf_counter()
        trainer.reset_embeddings(epoch)
        resets.append(time.perf_counter() - t0)
    C.log(f"step {timed['step_ms']} ms, epoch ~{epoch_s:.1f} s, resets {resets}")
    C.emit(
        "embedding_reset",
        config=str(path),
        threads=args.threads,
        step_ms=timed["step_ms"],
        steps_per_epoch=steps_per_epoch,
        epoch_s=round(epoch_s, 1),
        reset_s=[round(r, 3) for r in resets],
        reset_over_epoch=round(min(resets) / epoch_s, 5),
        embedding_rows=trainer.embedding_rows(),  # every table, the linear term's too
    )


if __name__ == "__main__":
    main()
