"""Side-by-side comparison of runs: runs × tasks, and mean ± std over seeds."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mtrec.evaluate.report import evaluate_run
from mtrec.train.loop import config_hash, load_run_config

__all__ = ["compare_runs"]


def _report(run: Path, split: str) -> dict[str, Any]:
    path = run / "eval" / ("report.json" if split == "test" else f"report_{split}.json")
    if not path.exists():
        evaluate_run(run, split=split)
    return json.loads(path.read_text())


def compare_runs(runs: list[str], split: str = "test") -> dict[str, Any]:
    """Table of per-task AUC per run; runs whose configs differ only by seed are pooled."""
    rows: list[dict[str, Any]] = []
    pools: dict[str, list[dict[str, float]]] = defaultdict(list)
    for run in map(Path, runs):
        cfg = load_run_config(run)
        report = _report(run, split)
        aucs = {t: float(m["auc"]) for t, m in report["tasks"].items()}
        rows.append({"run": str(run), "name": cfg.name, "seed": cfg.seed, "auc": aucs})
        # runs pool together only when their configs differ by nothing but the seed
        raw = yaml.safe_load((run / "config.yaml").read_text())
        raw.pop("seed", None)
        pools[f"{cfg.name} [{config_hash(raw)[:8]}]"].append(aucs)
    tasks = sorted({t for r in rows for t in r["auc"]})
    lines = ["| run | seed | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for r in rows:
        cells = [f"{r['auc'].get(t, float('nan')):.4f}" for t in tasks]
        lines.append(f"| {r['run']} | {r['seed']} | " + " | ".join(cells) + " |")
    summary: dict[str, Any] = {}
    lines += [
        "",
        "| experiment | runs | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for name, items in pools.items():
        stats = {}
        for t in tasks:
            vals = np.array([i[t] for i in items if t in i])
            stats[t] = {
                "mean": float(vals.mean()),
                "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            }
        summary[name] = {"runs": len(items), "auc": stats}
        cells = [f"{stats[t]['mean']:.4f} ± {stats[t]['std']:.4f}" for t in tasks]
        lines.append(f"| {name} | {len(items)} | " + " | ".join(cells) + " |")
    print("\n".join(lines), file=sys.stderr)
    return {"split": split, "runs": rows, "experiments": summary, "markdown": "\n".join(lines)}
