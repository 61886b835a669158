"""Side-by-side comparison of runs: runs × tasks, and mean ± std over seeds.

Runs whose stored configs differ by nothing but ``seed`` form one *experiment*. Per
experiment and task: the mean and standard deviation (ddof=1) of the runs' test AUCs,
and an interval: the union of the runs' 95% bootstrap intervals (``[min lo, max hi]``),
which spans both test-set sampling noise and the seed-to-seed spread.

Which differences are supported: in each task, the experiment with the highest mean AUC
is the reference; another experiment's difference to it is *supported* only when the
two intervals are disjoint. Overlapping intervals mark it as not supported by the
bootstrap. This is a deliberately conservative rule (two 95% intervals can overlap
while a paired test would still separate the models), so a "supported" mark means
something and an "≈" mark means "this evaluation cannot tell them apart".
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mtrec.evaluate.report import evaluate_run
from mtrec.io import atomic_write_text
from mtrec.run import RunError, config_hash, load_run_config

__all__ = ["compare_runs", "intervals_disjoint", "pool_interval"]

_NAN = float("nan")


def _report(run: Path, split: str) -> dict[str, Any]:
    path = run / "eval" / ("report.json" if split == "test" else f"report_{split}.json")
    if not path.exists():
        evaluate_run(run, split=split)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not a valid report ({exc}); rerun `mtrec evaluate`") from None


def pool_interval(intervals: list[list[float] | None]) -> tuple[float, float] | None:
    """Union ``[min lo, max hi]`` of the runs' intervals; None if any run has none."""
    if not intervals or any(iv is None or any(v is None for v in iv) for iv in intervals):
        return None
    return min(float(iv[0]) for iv in intervals), max(float(iv[1]) for iv in intervals)


def intervals_disjoint(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool | None:
    """True when the intervals do not overlap (touching counts as overlap); None if either
    is unknown."""
    if a is None or b is None:
        return None
    return a[1] < b[0] or b[1] < a[0]


def _fmt(x: float, digits: int = 4) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _experiment_key(run: Path) -> str:
    """Name and hash of the stored config without its seed (runs that differ only by
    seed share it)."""
    cfg = load_run_config(run)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw.pop("seed", None)
    return f"{cfg.name} [{config_hash(raw)[:8]}]"


def compare_runs(
    runs: list[str | Path], split: str = "test", out: str | Path | None = None
) -> dict[str, Any]:
    """Compare runs on ``split``; evaluates a run whose report is missing. Prints the
    Markdown tables to stderr and writes them to ``out`` if given.

    Returns ``{"split", "runs": [{"run", "name", "seed", "experiment", "auc": {task: x},
    "auc_ci": {task: [lo, hi] | None}}], "experiments": {name: {"runs", "auc": {task:
    {"mean", "std", "interval", "vs_best"}}}}, "differences": [...], "markdown", "out"}``.
    """
    rows: list[dict[str, Any]] = []
    pools: dict[str, list[int]] = defaultdict(list)
    for run in map(Path, runs):
        cfg = load_run_config(run)
        report = _report(run, split)
        tasks = report["tasks"]
        key = _experiment_key(run)
        pools[key].append(len(rows))
        rows.append(
            {
                "run": str(run),
                "name": cfg.name,
                "seed": cfg.seed,
                "experiment": key,
                "auc": {t: _float(m.get("auc")) for t, m in tasks.items()},
                "auc_ci": {t: m.get("auc_ci") for t, m in tasks.items()},
            }
        )
    task_names = sorted({t for r in rows for t in r["auc"]})

    experiments: dict[str, Any] = {}
    for key, members in pools.items():
        stats: dict[str, Any] = {}
        for t in task_names:
            present = [rows[i] for i in members if t in rows[i]["auc"]]
            vals = np.array([r["auc"][t] for r in present], dtype=np.float64)
            interval = pool_interval([r["auc_ci"].get(t) for r in present])
            stats[t] = {
                "mean": float(vals.mean()) if vals.size else _NAN,
                "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                "runs": int(vals.size),
                "interval": None if interval is None else list(interval),
            }
        experiments[key] = {"runs": len(members), "auc": stats}

    differences = _differences(experiments, task_names)
    markdown = _markdown(rows, experiments, task_names, split)
    print(markdown, file=sys.stderr)
    if out is not None:
        atomic_write_text(out, markdown + "\n")
    return {
        "split": split,
        "runs": rows,
        "experiments": experiments,
        "differences": differences,
        "rule": "supported = the experiments' pooled 95% bootstrap intervals are disjoint",
        "markdown": markdown,
        "out": None if out is None else str(out),
    }


def _float(x: Any) -> float:
    return _NAN if x is None else float(x)


def _differences(experiments: dict[str, Any], task_names: list[str]) -> list[dict[str, Any]]:
    """Every pair of experiments per task; also marks each experiment against the best."""
    out: list[dict[str, Any]] = []
    for t in task_names:
        means = {k: e["auc"][t]["mean"] for k, e in experiments.items()}
        finite = {k: m for k, m in means.items() if not math.isnan(m)}
        best = max(finite, key=finite.__getitem__) if finite else None
        for k, e in experiments.items():
            s = e["auc"][t]
            if best is None or math.isnan(s["mean"]):
                s["vs_best"] = "unknown"
            elif k == best:
                s["vs_best"] = "best"
            else:
                ok = intervals_disjoint(_iv(s), _iv(experiments[best]["auc"][t]))
                s["vs_best"] = {None: "unknown", True: "supported", False: "not_supported"}[ok]
        for a, b in itertools.combinations(experiments, 2):
            sa, sb = experiments[a]["auc"][t], experiments[b]["auc"][t]
            out.append(
                {
                    "task": t,
                    "a": a,
                    "b": b,
                    "delta_auc": sa["mean"] - sb["mean"],
                    "supported": intervals_disjoint(_iv(sa), _iv(sb)),
                }
            )
    return out


def _iv(stats: dict[str, Any]) -> tuple[float, float] | None:
    iv = stats.get("interval")
    return None if iv is None else (iv[0], iv[1])


_MARKS = {"best": " (best)", "supported": "", "not_supported": " ≈", "unknown": " ?"}


def _markdown(
    rows: list[dict[str, Any]], experiments: dict[str, Any], tasks: list[str], split: str
) -> str:
    lines = [
        f"## Runs (AUC on `{split}`, 95% bootstrap interval)",
        "",
        "| run | experiment | seed | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 3) + "|",
    ]
    for r in rows:
        cells = []
        for t in tasks:
            a, ci = r["auc"].get(t, _NAN), r["auc_ci"].get(t)
            iv = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci and None not in ci else ""
            cells.append(_fmt(a) + iv)
        lines.append(
            f"| {r['run']} | {r['experiment']} | {r['seed']} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "## Experiments (runs that differ only by seed: mean ± std of AUC)",
        "",
        "| experiment | runs | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for key, e in experiments.items():
        cells = []
        for t in tasks:
            s = e["auc"][t]
            cells.append(f"{_fmt(s['mean'])} ± {_fmt(s['std'])}{_MARKS[s['vs_best']]}")
        lines.append(f"| {key} | {e['runs']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per task, (best) has the highest mean AUC. ≈: the difference to the best is not "
        "supported by the bootstrap: the experiments' pooled intervals (union of their runs' "
        "95% bootstrap intervals) overlap. No mark: the intervals are disjoint. ?: a run has "
        "no interval (report made with --bootstrap 0 or by an older mtrec).",
    ]
    return "\n".join(lines)
