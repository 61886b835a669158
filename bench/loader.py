"""Loader benchmark: is the streaming batcher fast enough and bounded in memory?

Prints one JSON line::

    {"bench": "loader", "rows_per_s": ..., "train_samples_per_s": ..., "ratio": ...,
     "rss_ratio_5m_vs_0p5m": ..., "peak_rss_mb_0p5m": ..., "peak_rss_mb_5m": ..., ...,
     "loadavg": [1m, 5m, 15m]}

* ``rows_per_s`` — rows/s of ``iter_batches`` streaming the train split of the large
  file (shuffled within chunks, batches fully built, KJT included), measured in a
  fresh process.
* ``peak_rss_mb_*`` — peak RSS of that process for the small and the large file
  (imports included: see ``baseline_rss_mb``); target ``rss_ratio`` <= 1.5.
* ``train_samples_per_s`` — training throughput of the default model on pre-built
  batches in this process; target ``ratio = rows_per_s / train_samples_per_s`` >= 10.

Usage: ``.venv/bin/python bench/loader.py [--rows-small 500000] [--rows-large 5000000]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import _common as C


def _label(rows: int) -> str:
    return f"{rows / 1e6:g}m".replace(".", "p")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows-small", type=int, default=500_000)
    p.add_argument("--rows-large", type=int, default=5_000_000)
    p.add_argument("--train-batches", type=int, default=50, help="pre-built batches")
    p.add_argument("--train-steps", type=int, default=50, help="timed training steps")
    p.add_argument("--stream-child", type=Path, help=argparse.SUPPRESS)  # internal
    C.add_common_args(p)
    args = p.parse_args(argv)

    if args.stream_child is not None:
        print(json.dumps(C.stream_split(args.stream_child, threads=args.threads)), flush=True)
        return

    C.warn_if_contended(args.threads)
    small = C.ensure_synthetic(args.cache_dir, args.rows_small)
    large = C.ensure_synthetic(args.cache_dir, args.rows_large)

    streams = {}
    for name, d in (("small", small), ("large", large)):
        C.log(f"streaming {d.name}/train.parquet in a fresh process ...")
        res = C.run_child(
            [__file__, "--stream-child", str(d / "config.yaml"), "--threads", str(args.threads)]
        )
        C.log(
            f"  {res['rows']:,} rows in {res['seconds']:.2f}s = {res['rows_per_s']:,.0f} rows/s, "
            f"peak RSS {res['peak_rss_mb']:.0f} MiB (after imports {res['baseline_rss_mb']:.0f})"
        )
        streams[name] = res

    C.log(f"training throughput of the default model on {small.name} ...")
    cfg, spec = C.load_experiment(small / "config.yaml")
    trainer = C.Trainer(cfg, spec, threads=args.threads)
    enc = C.load_train_split(cfg, spec)
    batches = list(itertools.islice(trainer.batches(enc, seed=cfg.seed), args.train_batches))
    del enc
    timing = C.time_steps(trainer, batches, warmup=5, steps=args.train_steps)
    C.log(f"  {timing['samples_per_s']:,.0f} samples/s ({timing['step_ms']:.1f} ms/step)")

    s, l_ = streams["small"], streams["large"]
    rows_per_s = l_["rows_per_s"]
    ls, ll = _label(args.rows_small), _label(args.rows_large)
    C.emit(
        "loader",
        rows_per_s=rows_per_s,
        train_samples_per_s=timing["samples_per_s"],
        ratio=round(rows_per_s / timing["samples_per_s"], 2),
        # key names fixed by the issue for the default sizes (5M vs 0.5M)
        rss_ratio_5m_vs_0p5m=round(l_["peak_rss_mb"] / s["peak_rss_mb"], 3),
        peak_rss_mb_0p5m=s["peak_rss_mb"],
        peak_rss_mb_5m=l_["peak_rss_mb"],
        rows_small=args.rows_small,
        rows_large=args.rows_large,
        sizes=f"{ls} vs {ll}",
        stream_rows_large=l_["rows"],
        rows_per_s_small=s["rows_per_s"],
        baseline_rss_mb=l_["baseline_rss_mb"],
        stream_rss_delta_mb_small=round(s["peak_rss_mb"] - s["baseline_rss_mb"], 1),
        stream_rss_delta_mb_large=round(l_["peak_rss_mb"] - l_["baseline_rss_mb"], 1),
        batch_size=cfg.training.batch_size,
        chunk_rows=cfg.dataset.chunk_rows,
        train_step_ms=timing["step_ms"],
        threads=args.threads,
    )


if __name__ == "__main__":
    sys.exit(main())
