"""Model comparison: train + evaluate configs over seeds; per-task test AUC mean ± std.

For each ``--configs`` file and each seed in ``--seeds`` it runs ``mtrec train``
(``--set seed=S``, plus any ``--set`` given here) into ``OUT/<config stem>/seed<S>``,
then ``mtrec evaluate`` on the test split, in child processes, exactly as a user would.
A run directory that already holds an evaluation report is reused (delete it to rerun),
so an interrupted comparison continues where it stopped.

Output, one JSON line per run, then one per config and a table::

    {"bench": "models_run", "config": ..., "seed": s, "test": {TASK: auc}, "oracle": {...},
     "params": n, "samples_per_s": x, "wall_s": y}
    {"bench": "models", "config": ..., "seeds": [...], "auc": {TASK: [mean, std]},
     "mean_auc": [mean, std], "oracle_mean_auc": z, "params": n, "samples_per_s": x}

``--markdown FILE`` also writes the table (runs × tasks, mean ± std over seeds).

Usage::

    .venv/bin/python bench/models.py --out bench/.runs/census \\
        --configs configs/census_kdd/{mmoe,ple,home,apem,task_expert}.yaml --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, log

MTREC = [sys.executable, "-m", "mtrec.cli"]


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON summary in output:\n{text[-2000:]}")


def _run(cmd: list[str], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return _last_json(done.stdout)


def _params(run_dir: Path) -> int:
    from mtrec.run import load_trained_model

    _, _, model = load_trained_model(run_dir)
    return sum(p.numel() for p in model.parameters())


def run_one(
    config: Path, seed: int, out: Path, overrides: list[str], threads: int
) -> dict[str, Any]:
    """Train + evaluate one (config, seed); reuses a finished run directory."""
    run_dir = out / config.stem / f"seed{seed}"
    report = run_dir / "eval" / "report.json"
    summary_file = run_dir / "bench-train.json"
    if not report.exists():
        if run_dir.exists():
            # unfinished: start over (a finished train without evaluation is reused)
            if not summary_file.exists():
                import shutil

                shutil.rmtree(run_dir)
        if not summary_file.exists():
            sets = [f"seed={seed}", "training.progress=false", f"training.threads={threads}"]
            sets += overrides
            cmd = [*MTREC, "train", "--config", str(config), "--out", str(run_dir)]
            for s in sets:
                cmd += ["--set", s]
            t0 = time.perf_counter()
            train = _run(cmd, threads)
            train["bench_wall_s"] = round(time.perf_counter() - t0, 1)
            summary_file.write_text(json.dumps(train))
        _run([*MTREC, "evaluate", "--run", str(run_dir)], threads)
    train = json.loads(summary_file.read_text())
    rep = json.loads(report.read_text())
    tasks = rep["tasks"]
    return emit(
        "models_run",
        config=str(config),
        seed=seed,
        test={t: m["auc"] for t, m in tasks.items()},
        oracle={t: m["oracle_auc"] for t, m in tasks.items() if m.get("oracle_auc") is not None},
        best_epoch=train["best_epoch"],
        params=_params(run_dir),
        samples_per_s=train["samples_per_s"],
        wall_s=train.get("bench_wall_s", train["wall_s"]),
    )


def _mean_std(xs: list[float]) -> list[float]:
    return [round(statistics.fmean(xs), 4), round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", nargs="+", type=Path, required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / ".runs")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()

    rows: list[dict[str, Any]] = []
    for config in args.configs:
        runs = []
        for seed in args.seeds:
            log(f"{config} seed {seed}")
            runs.append(run_one(config, seed, args.out, args.overrides, args.threads))
        tasks = list(runs[0]["test"])
        per_task = {t: _mean_std([r["test"][t] for r in runs]) for t in tasks}
        means = [statistics.fmean(r["test"].values()) for r in runs]
        oracle = runs[0]["oracle"]
        rows.append(
            emit(
                "models",
                config=str(config),
                seeds=args.seeds,
                auc=per_task,
                mean_auc=_mean_std(means),
                oracle_mean_auc=round(statistics.fmean(oracle.values()), 4) if oracle else None,
                params=runs[0]["params"],
                samples_per_s=round(statistics.fmean(r["samples_per_s"] for r in runs), 1),
            )
        )
    if args.markdown:
        tasks = list(rows[0]["auc"])
        head = "| config | " + " | ".join(tasks) + " | mean AUC | params | samples/s |"
        lines = [head, "|" + "---|" * (len(tasks) + 4)]
        for r in rows:
            cells = [f"{r['auc'][t][0]:.4f} ± {r['auc'][t][1]:.4f}" for t in tasks]
            mean = f"{r['mean_auc'][0]:.4f} ± {r['mean_auc'][1]:.4f}"
            name = Path(r["config"]).stem
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | {mean} | {r['params']:,} | "
                f"{r['samples_per_s']:,.0f} |"
            )
        if rows[0]["oracle_mean_auc"] is not None:
            lines.append(f"\nOracle mean AUC: {rows[0]['oracle_mean_auc']:.4f}")
        args.markdown.write_text("\n".join(lines) + "\n")
        log(f"table -> {args.markdown}")


if __name__ == "__main__":
    main()
