"""Evaluation benchmark: speed and memory of `mtrec evaluate`, and exact-AUC speed vs sklearn.

Prints two JSON lines::

    {"bench": "evaluate", "rows", "rows_per_s", "score_rows_per_s", "wall_s",
     "timing": {"score_s", "metrics_s", "plots_s"}, "peak_rss_mb", "baseline_rss_mb",
     "scores_mb", "workers", "bootstrap", ...}
    {"bench": "evaluate_auc", "rows", "auc_s", "sklearn_auc_s", "speedup",
     "auc_abs_diff", "bootstrap_ms_per_resample": {"multinomial", "poisson"}, ...}

* ``evaluate``: ``evaluate_run`` of a small trained MMoE (the planted data's default
  model, trained for a few steps: speed does not depend on its quality) on ALL rows of
  the planted data set (train + valid + test files, ``--rows`` in total, 5M by default),
  with ``--bootstrap`` resamples and the plots, in a fresh process. ``rows_per_s`` =
  rows / wall time of the whole evaluation; ``score_rows_per_s`` = rows / scoring time
  (streamed read + encode + forward). ``peak_rss_mb`` is the process's ``VmHWM``
  (imports included, ``baseline_rss_mb`` after imports); ``scores_mb`` is what the
  collected labels / predictions / true probabilities / group ids take: memory must
  track this, not the size of the data files.
* ``evaluate_auc``: on the same number of scores (the planted true probabilities of task
  ``click`` as float32, so with ties, and its labels), best-of-3 time of
  ``mtrec.metrics.auc`` vs best-of-2 of ``sklearn.metrics.roc_auc_score`` (target:
  ``speedup`` >= 1), and the time per bootstrap resample (AUC and logloss together).

Usage: ``.venv/bin/python bench/evaluate.py [--rows 5000000] [--bootstrap 200]
[--workers 1] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common as C


def _trained_run(cache_dir: Path, data: Path, threads: int) -> Path:
    """A briefly trained run of the data's own config (cached beside the data)."""
    run = cache_dir / f"eval-run-{data.name}"
    if (run / "checkpoints" / "best.pt").exists():
        C.log(f"reusing {run}")
        return run
    import shutil

    from mtrec.config import load_config
    from mtrec.train.loop import train

    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(
        data / "config.yaml",
        overrides=[
            "training.epochs=1",
            "training.max_steps_per_epoch=30",
            f"training.threads={threads}",
            "training.progress=false",
        ],
    )
    C.log(f"training a small run into {run} (fits statistics on the train split) ...")
    t0 = time.perf_counter()
    train(cfg, run)
    C.log(f"trained in {time.perf_counter() - t0:.1f}s")
    return run


def _eval_child(run: Path, data: Path, workers: int, bootstrap: int) -> dict:
    """In a fresh process: the whole evaluation, its timing and peak memory."""
    from mtrec.evaluate.report import evaluate_run

    baseline = C.rss_mb()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = evaluate_run(
            run, data=data, out=out, bootstrap_resamples=bootstrap, workers=workers
        )
        wall = time.perf_counter() - t0
        report = json.loads(Path(summary["report"]).read_text())
    rows, tasks = report["rows"], len(report["tasks"])
    has_true = any("oracle_auc" in m for m in report["tasks"].values())
    has_groups = report["group_key"] is not None
    scores_bytes = rows * (4 * tasks * (3 if has_true else 2) + (8 if has_groups else 0))
    return {
        "rows": rows,
        "tasks": tasks,
        "wall_s": round(wall, 2),
        "timing": report["timing"],
        "peak_rss_mb": round(C.peak_rss_mb(), 1),
        "baseline_rss_mb": round(baseline, 1),
        "scores_mb": round(scores_bytes / 2**20, 1),
        "auc": {t: round(m["auc"], 6) for t, m in report["tasks"].items()},
    }


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _auc_speed(data: Path, rows: int, resamples: int) -> dict:
    import numpy as np
    import polars as pl

    from mtrec import metrics

    frame = pl.scan_parquet(sorted(data.glob("*.parquet"))).select("click", "p_click")
    frame = frame.collect()
    y = frame.get_column("click").to_numpy().astype(bool)
    s = frame.get_column("p_click").to_numpy().astype(np.float32)
    del frame
    ours_s, ours = _best(lambda: metrics.auc(y, s), 3)
    out = {"rows": int(y.size), "auc_s": round(ours_s, 3), "auc": ours}
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:  # scikit-learn is a dev dependency
        C.log("scikit-learn is not installed: skipping the comparison")
    else:
        sk_s, sk = _best(lambda: roc_auc_score(y, s), 2)
        out.update(
            sklearn_auc_s=round(sk_s, 3),
            speedup=round(sk_s / ours_s, 2),
            auc_abs_diff=abs(float(sk) - float(ours)),
        )
    per = {}
    for method in metrics.BOOTSTRAP_METHODS:
        t0 = time.perf_counter()
        metrics.bootstrap(y, s, n_resamples=resamples, method=method)
        per[method] = round(1000 * (time.perf_counter() - t0) / resamples, 1)
    out["bootstrap_ms_per_resample"] = per
    out["bootstrap_timed_resamples"] = resamples
    out["unique_scores"] = int(np.unique(s).size)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=5_000_000, help="planted rows (all splits)")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples in the evaluation")
    p.add_argument("--workers", type=int, default=1, help="evaluate --workers")
    p.add_argument("--auc-resamples", type=int, default=20, help="timed bootstrap resamples")
    p.add_argument("--eval-child", nargs=2, type=Path, help=argparse.SUPPRESS)  # internal
    C.add_common_args(p)
    args = p.parse_args(argv)

    if args.eval_child is not None:
        run, data = args.eval_child
        print(json.dumps(_eval_child(run, data, args.workers, args.bootstrap)), flush=True)
        return

    C.warn_if_contended(args.threads)
    data = C.ensure_synthetic(args.cache_dir, args.rows)
    run = _trained_run(args.cache_dir, data, args.threads)
    C.log(f"evaluating {args.rows:,} rows ({data}) in a fresh process ...")
    argv_child = [__file__, "--eval-child", str(run), str(data)]
    argv_child += ["--workers", str(args.workers), "--bootstrap", str(args.bootstrap)]
    res = C.run_child(argv_child)
    timing = res["timing"]
    C.emit(
        "evaluate",
        rows=res["rows"],
        rows_per_s=round(res["rows"] / res["wall_s"], 1),
        score_rows_per_s=round(res["rows"] / max(timing["score_s"], 1e-9), 1),
        wall_s=res["wall_s"],
        timing=timing,
        peak_rss_mb=res["peak_rss_mb"],
        baseline_rss_mb=res["baseline_rss_mb"],
        scores_mb=res["scores_mb"],
        tasks=res["tasks"],
        workers=args.workers,
        bootstrap=args.bootstrap,
        threads=args.threads,
    )
    C.log("timing exact AUC against scikit-learn ...")
    C.emit("evaluate_auc", **_auc_speed(data, args.rows, args.auc_resamples))


if __name__ == "__main__":
    sys.exit(main())
