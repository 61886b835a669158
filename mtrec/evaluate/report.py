"""Offline evaluation of a run: metrics per task on a split, written as JSON + Markdown."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from mtrec.evaluate.predict import collect_scores
from mtrec.io import atomic_write_text, to_json
from mtrec.train.loop import RunError, load_trained_model

__all__ = ["evaluate_run"]


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def _markdown(report: dict[str, Any]) -> str:
    cols = ["auc", "oracle_auc", "logloss", "calibration", "ece", "pos_rate", "rows"]
    if any("gauc" in m for m in report["tasks"].values()):
        cols.insert(1, "gauc")
    present = [c for c in cols if any(c in m for m in report["tasks"].values())]
    lines = [
        f"# Evaluation of `{report['run_dir']}` on split `{report['split']}`",
        "",
        f"Data: `{report['data']}` ({report['rows']} rows). Model: best epoch "
        f"{report['best_epoch']}.",
        "",
        "| task | " + " | ".join(present) + " |",
        "|---" * (len(present) + 1) + "|",
    ]
    for task, m in report["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(_fmt(m.get(c, "")) for c in present) + " |")
    lines += [
        "",
        "AUC is exact (ties count 1/2). Calibration = mean prediction / mean label; ECE over 15 "
        "equal-width bins. GAUC (where a group key is set) is the mean of per-group AUCs "
        "weighted by impressions; groups with one class are skipped.",
    ]
    return "\n".join(lines) + "\n"


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    data: str | Path | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``split`` (or the file ``data``) with the run's best model; write ``eval/``."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    cfg, spec, model = load_trained_model(run_dir)
    torch.set_num_threads(cfg.training.threads)
    data_given = data is not None
    if data is None:
        if split not in ("train", "valid", "test"):
            raise RunError(f"--split {split!r}: expected train, valid or test")
        data = getattr(cfg.dataset, split)
        if not data:
            raise RunError(
                f"{run_dir}/config.yaml: dataset.{split} is not set; pass --data FILE to evaluate "
                "another file"
            )
    collector = collect_scores(
        model, spec, data, cfg.training.eval_batch_size, cfg.dataset.chunk_rows
    )
    tasks = collector.compute(spec.task_names)
    out_dir = Path(out) if out else run_dir / "eval"
    report = {
        "run_dir": str(run_dir),
        "split": split,
        "data": str(data),
        "rows": len(collector),
        "best_epoch": model.trained_epoch,
        "tasks": {
            t: {k: (float(v) if isinstance(v, float) else v) for k, v in m.items()}
            for t, m in tasks.items()
        },
    }
    if data_given:  # another file: its own report, never the split's
        report["split"] = None
        report_path = out_dir / f"report_{Path(data).stem}.json"
    elif split == "test":
        report_path = out_dir / "report.json"
    else:
        report_path = out_dir / f"report_{split}.json"
    atomic_write_text(report_path, to_json(report, indent=2) + "\n")
    atomic_write_text(report_path.with_suffix(".md"), _markdown(report))
    keys = ("auc", "logloss", "oracle_auc", "gauc")
    return {
        "run_dir": str(run_dir),
        "split": report["split"],
        "rows": report["rows"],
        "tasks": {t: {k: round(float(m[k]), 6) for k in keys if k in m} for t, m in tasks.items()},
        "report": str(report_path),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
