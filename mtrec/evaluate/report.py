"""Offline evaluation of a run: metrics per task on a split, written as JSON, Markdown, PNGs.

``evaluate_run`` scores the split with the run's best checkpoint (streamed in batches:
only labels and predictions are kept), then computes per task:

* exact AUC (ties count 1/2) with a percentile-bootstrap 95% interval, logloss with its
  interval from the same resamples, calibration (mean prediction / mean label), ECE
  (15 equal-width bins), positive rate, rows;
* GAUC when ``dataset.group_key`` is set: per-group AUC weighted by impressions (rows
  per group), plus the unweighted mean over groups; one-class groups are skipped;
* oracle AUC (AUC of the true probabilities) when the data carries them.

Plots (``<report>.<kind>.png`` beside the report): ROC, reliability and prediction
histograms per task; the AutoInt last-layer field attention and the task × expert gate
heatmap where the model has them (means over the first ``diag_rows`` rows).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtrec.checkpoint import best_path
from mtrec.data.columns import count_rows
from mtrec.data.errors import DataError
from mtrec.data.readers import read_schema
from mtrec.data.spec import FeatureSpec
from mtrec.evaluate.floor import floor_markdown, floor_section, read_floor_report
from mtrec.evaluate.insights import ModelInsights, collect_insights
from mtrec.evaluate.parallel import collect_scores_sharded
from mtrec.evaluate.slices import slice_markdown, slice_report
from mtrec.io import atomic_write_text, to_json
from mtrec.metrics import BOOTSTRAP_METHODS, ScoreCollector, bootstrap, reliability, roc_curve
from mtrec.run import VOCAB_FILE, RunError, load_run_config, load_trained_model
from mtrec.scoring import collect_scores
from mtrec.threads import resolve_threads

__all__ = ["check_data_matches", "check_run_files", "evaluate_run", "task_curves"]

ALPHA = 0.05  # 95% intervals
GAUC_WEIGHTING = "impressions"
HIST_BINS = 50
SUMMARY_KEYS = ("auc", "auc_ci", "logloss", "logloss_ci", "oracle_auc", "gauc")


# ----------------------------------------------------------------------------- checks


def check_run_files(run_dir: Path) -> None:
    """Raise :class:`RunError` naming every file evaluation needs that the run lacks."""
    cfg = load_run_config(run_dir)  # "not a run directory" when config.yaml is absent
    needed = {
        run_dir / "feature_stats.json": "numeric statistics fitted at training time",
        best_path(run_dir): "the best checkpoint",
    }
    spec = FeatureSpec.from_config(cfg)
    if any(spec.filtered(f.name) for f in spec.sparse):
        needed[run_dir / VOCAB_FILE] = "kept ids of filtered features"
    missing = [f"{p} ({why})" for p, why in needed.items() if not p.exists()]
    if missing:
        raise RunError(
            f"{run_dir}: cannot evaluate, the run lacks " + "; ".join(missing) + ". Train it "
            f"to completion first (`mtrec train --config ... --out {run_dir}`, or --resume)"
        )


def check_data_matches(spec: FeatureSpec, path: str | Path, run_dir: Path) -> None:
    """Raise :class:`DataError` listing every column the run needs that ``path`` lacks
    (features, task labels, true probabilities, group key), with the run's tasks."""
    schema = read_schema(spec.scan(path), path)
    need: dict[str, str] = {}
    for f in spec.sparse + spec.numeric:
        need.setdefault(f.source, f"feature '{f.name}'")
    for t in spec.tasks:
        need.setdefault(t.source, f"label of task '{t.name}'")
        if t.true_prob:
            need.setdefault(t.true_prob, f"true probability of task '{t.name}'")
    if spec.group_key:
        need.setdefault(spec.group_key, "GAUC group key")
    missing = [f"'{c}' ({role})" for c, role in need.items() if c not in schema]
    if not missing:
        spec.check_schema(schema, path)  # dtypes
        return
    tasks = [t.name for t in spec.tasks]
    lacks_tasks = [t.name for t in spec.tasks if t.source not in schema]
    hint = (
        f" The run was trained on tasks {tasks}; this data has no label for {lacks_tasks}."
        if lacks_tasks
        else ""
    )
    raise DataError(
        f"{path}: does not match the run {run_dir}: missing column(s) "
        + ", ".join(missing)
        + f".{hint} Evaluate data with the run's columns (see {run_dir}/config.yaml)"
    )


# ----------------------------------------------------------------------------- metrics


def task_curves(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """ROC points, reliability bins and per-class prediction histograms of one task."""
    y = labels == 1
    fpr, tpr, _ = roc_curve(y, probs)
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    return {
        "roc": (fpr, tpr),
        "reliability": reliability(y, probs),
        "hist": {
            "edges": edges,
            "pos": np.histogram(probs[y], bins=edges)[0],
            "neg": np.histogram(probs[~y], bins=edges)[0],
        },
    }


def _task_results(
    collector: ScoreCollector,
    task_names: list[str],
    n_resamples: int,
    seed: int,
    method: str,
    threads: int = 1,
) -> dict[str, dict[str, Any]]:
    tasks = collector.compute(task_names, gauc_weighting=GAUC_WEIGHTING)
    if n_resamples <= 0 or not len(collector):
        return tasks
    labels, probs = collector.labels, collector.probs

    def intervals(j: int) -> dict[str, tuple[float, float]]:
        # each task its own stream (seed, j): adding a task leaves the others' CIs alone
        return bootstrap(
            labels[:, j] == 1,
            np.ascontiguousarray(probs[:, j]),
            n_resamples=n_resamples,
            alpha=ALPHA,
            seed=np.random.SeedSequence([seed, j]).generate_state(1)[0].item(),
            method=method,
        )

    # tasks in parallel threads: numpy releases the GIL in the draws, sorts and sums, and
    # each task has its own generator, so results do not depend on the thread count
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(task_names)))) as pool:
        cis = list(pool.map(intervals, range(len(task_names))))
    for name, ci in zip(task_names, cis, strict=True):
        tasks[name]["auc_ci"] = list(ci["auc"])
        tasks[name]["logloss_ci"] = list(ci["logloss"])
    return tasks


# ----------------------------------------------------------------------------- plots


def _write_plots(
    out_dir: Path,
    stem: str,
    collector: ScoreCollector,
    task_names: list[str],
    tasks: dict[str, dict[str, Any]],
    insights: ModelInsights,
) -> dict[str, str]:
    from mtrec.evaluate import plots

    labels, probs = collector.labels, collector.probs
    curves = {
        name: task_curves(labels[:, j], np.ascontiguousarray(probs[:, j]))
        for j, name in enumerate(task_names)
    }
    figures = {
        "roc": plots.roc_figure(
            {t: (*plots.thin_curve(*c["roc"]), float(tasks[t]["auc"])) for t, c in curves.items()}
        ),
        "reliability": plots.reliability_diagram(
            {t: c["reliability"] for t, c in curves.items()},
            {t: float(tasks[t]["ece"]) for t in task_names},
        ),
        "histograms": plots.histograms({t: c["hist"] for t, c in curves.items()}),
    }
    if insights.attention is not None:
        figures["attention"] = plots.heatmap(
            insights.attention,
            insights.fields,
            insights.fields,
            title=f"AutoInt last-layer attention (mean over {insights.rows} rows, all heads)",
            xlabel="attended field (key)",
            ylabel="field (query)",
        )
    if insights.gates is not None:
        figures["gates"] = plots.heatmap(
            insights.gates,
            insights.gate_tasks,
            insights.gate_experts,
            title=f"Mean gate weight per task (over {insights.rows} rows)",
            xlabel="expert",
            ylabel="task",
        )
    written = {}
    for kind, fig in figures.items():
        path = plots.save_png(fig, out_dir / f"{stem}.{kind}.png")
        written[kind] = path.name
    return written


# ----------------------------------------------------------------------------- markdown


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    if isinstance(x, (list, tuple)) and len(x) == 2:
        return f"[{_fmt(x[0])}, {_fmt(x[1])}]"
    return str(x)


_TITLES = {
    "roc": "ROC",
    "reliability": "Reliability",
    "histograms": "Prediction histograms",
    "attention": "AutoInt attention (last layer)",
    "gates": "Expert gates",
}


def _markdown(report: dict[str, Any]) -> str:
    cols = [
        "auc",
        "auc_ci",
        "gauc",
        "gauc_unweighted",
        "oracle_auc",
        "logloss",
        "logloss_ci",
        "calibration",
        "ece",
        "pos_rate",
        "rows",
    ]
    present = [c for c in cols if any(c in m for m in report["tasks"].values())]
    where = f"split `{report['split']}`" if report["split"] else f"`{report['data']}`"
    lines = [
        f"# Evaluation of `{report['run_dir']}` on {where}",
        "",
        f"Data: `{report['data']}` ({report['rows']} rows). Model: best epoch "
        f"{report['best_epoch']}.",
        "",
        "| task | " + " | ".join(present) + " |",
        "|---" * (len(present) + 1) + "|",
    ]
    for task, m in report["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(_fmt(m.get(c)) for c in present) + " |")
    lines += floor_markdown(report.get("floor"))
    boot = report["bootstrap"]
    lines += [
        "",
        "AUC is exact (ties count 1/2). Calibration = mean prediction / mean label (1 is "
        "calibrated); ECE over 15 equal-width probability bins.",
    ]
    if boot["resamples"]:
        lines.append(
            f"`*_ci`: {100 * (1 - boot['alpha']):.0f}% percentile bootstrap intervals over "
            f"{boot['resamples']} {boot['method']} resamples of the rows (seed {boot['seed']}); "
            "AUC and logloss from the same resamples."
        )
    if any("gauc" in m for m in report["tasks"].values()):
        lines.append(
            f"`gauc`: per-group AUC grouped by `{report['group_key']}`, weighted by "
            "impressions (rows per group); `gauc_unweighted`: plain mean over groups; groups "
            "with one class are skipped."
        )
    if any("oracle_auc" in m for m in report["tasks"].values()):
        lines.append(
            "`oracle_auc`: AUC of the true probabilities: the best any model can reach here."
        )
    lines += slice_markdown(report.get("slices", {}))
    lines += _health_markdown(report.get("insights", {}))
    for kind, name in report.get("plots", {}).items():
        lines += ["", f"## {_TITLES.get(kind, kind)}", "", f"![{kind}]({name})"]
    return "\n".join(lines) + "\n"


def _health_markdown(insights: dict[str, Any]) -> list[str]:
    """Expert health: dead-activation fraction per expert, shared experts' use per task."""
    dead = insights.get("expert_dead_fraction") or {}
    if not dead:
        return []
    lines = [
        "",
        f"## Expert health (first {insights['rows']} rows)",
        "",
        "| expert | dead fraction |",
        "|---|---|",
    ]
    lines += [f"| {e} | {_fmt(float(d))} |" for e, d in dead.items()]
    usage = insights.get("shared_usage") or {}
    if usage:
        tasks = sorted({t for u in usage.values() for t in u})
        lines += [
            "",
            "Share of each shared expert's gate weight by task (one task near 1: the expert "
            "has degraded into that task's own):",
            "",
            "| shared expert | " + " | ".join(tasks) + " |",
            "|---" * (len(tasks) + 1) + "|",
        ]
        lines += [
            f"| {e} | " + " | ".join(_fmt(u.get(t)) for t in tasks) + " |" for e, u in usage.items()
        ]
    lines.append(
        "\nDead fraction: share of activations with |a| <= 1e-4 after the expert's "
        "activation (ReLU experts die at exactly 0)."
    )
    return lines


# ----------------------------------------------------------------------------- entry


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    bootstrap_resamples: int = 200,
    seed: int = 0,
    bootstrap_method: str = "poisson",
    workers: int = 1,
    address: str | None = None,
    plots: bool = True,
    diag_rows: int = 8192,
    floor: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``split`` (or the dataset ``data``) with the run's best model; write the report.

    Returns the CLI summary: ``{"run_dir", "split", "rows", "tasks": {task: {"auc",
    "auc_ci", "logloss", "logloss_ci", ["oracle_auc"], ["gauc"]}}, "report", "wall_s"}``
    (plus ``"below_floor": [tasks]`` with ``floor``, and ``"slices": {feature: {"seen" |
    "unseen": {"rows", "tasks": {task: {"auc", "logloss"}}}}}`` for the sliced features).
    ``workers > 1`` scores disjoint row ranges as Ray tasks (same metrics as 1 worker).
    ``floor``: a ``mtrec baseline`` run shown beside the model (:mod:`mtrec.evaluate.floor`);
    evaluated first on the same data (same bootstrap, no plots) if it has no report yet.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if bootstrap_resamples < 0:
        raise ValueError(f"bootstrap resamples must be >= 0, got {bootstrap_resamples}")
    if bootstrap_method not in BOOTSTRAP_METHODS:
        raise ValueError(f"bootstrap method must be one of {BOOTSTRAP_METHODS}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    check_run_files(run_dir)
    cfg, spec, model = load_trained_model(run_dir)
    threads = resolve_threads(cfg.training.threads)
    torch.set_num_threads(threads)
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
    check_data_matches(spec, data, run_dir)
    batch_size, chunk_rows = cfg.training.eval_batch_size, cfg.dataset.chunk_rows
    t_score = time.perf_counter()
    if workers == 1:
        # parquet footers give the row count for free; CSV would need an extra pass
        known = count_rows(spec, data) if spec.data_format == "parquet" else None
        collector = collect_scores(model, spec, data, batch_size, chunk_rows, known)
    else:
        collector = collect_scores_sharded(
            run_dir,
            spec,
            data,
            workers,
            batch_size,
            chunk_rows,
            threads=max(1, threads // workers),
            address=address,
        )
    t_metrics = time.perf_counter()
    tasks = _task_results(
        collector,
        spec.task_names,
        bootstrap_resamples,
        seed,
        bootstrap_method,
        threads=threads,
    )
    timing = {
        "score_s": round(t_metrics - t_score, 3),
        "metrics_s": round(time.perf_counter() - t_metrics, 3),
    }

    out_dir = Path(out) if out else run_dir / "eval"
    if data_given:  # another file: its own report, never the split's
        report_path = out_dir / f"report_{Path(data).stem}.json"
    elif split == "test":
        report_path = out_dir / "report.json"
    else:
        report_path = out_dir / f"report_{split}.json"
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "split": None if data_given else split,
        "data": str(data),
        "rows": len(collector),
        "best_epoch": model.trained_epoch,
        "group_key": spec.group_key,
        "gauc_weighting": GAUC_WEIGHTING if spec.group_key else None,
        "bootstrap": {
            "resamples": bootstrap_resamples,
            "method": bootstrap_method,
            "alpha": ALPHA,
            "seed": seed,
        },
        "workers": workers,
        "timing": timing,
        "tasks": {
            t: {k: (float(v) if isinstance(v, float) else v) for k, v in m.items()}
            for t, m in tasks.items()
        },
    }
    if floor is not None:
        floor_report = read_floor_report(floor, report_path.name)
        if floor_report is None:
            evaluate_run(
                floor,
                split,
                data if data_given else None,
                bootstrap_resamples=bootstrap_resamples,
                seed=seed,
                bootstrap_method=bootstrap_method,
                workers=workers,
                address=address,
                plots=False,
            )
            floor_report = read_floor_report(floor, report_path.name)
        assert floor_report is not None
        report["floor"] = floor_section(floor, floor_report, report)
    report["slices"] = slice_report(run_dir, spec, data, collector)
    if plots and len(collector):
        t_plots = time.perf_counter()
        insights = collect_insights(model, spec, data, batch_size, diag_rows, chunk_rows)
        if insights.rows:
            report["insights"] = insights.to_dict()
        report["plots"] = _write_plots(
            out_dir, report_path.stem, collector, spec.task_names, tasks, insights
        )
        timing["plots_s"] = round(time.perf_counter() - t_plots, 3)
    atomic_write_text(report_path, to_json(report, indent=2) + "\n")
    atomic_write_text(report_path.with_suffix(".md"), _markdown(report))
    return {
        "run_dir": str(run_dir),
        "split": report["split"],
        "rows": report["rows"],
        "tasks": {t: _summary(m) for t, m in tasks.items()},
        "report": str(report_path),
        "wall_s": round(time.perf_counter() - t0, 2),
        **({"below_floor": report["floor"]["below_floor"]} if "floor" in report else {}),
        **({"slices": _slice_summary(report["slices"])} if report["slices"] else {}),
    }


def _slice_summary(slices: dict[str, Any]) -> dict[str, Any]:
    """``{feature: {seen|unseen: {"rows", "tasks": {task: {"auc", "logloss"}}}}}``."""
    return {
        feature: {
            part: {
                "rows": m["rows"],
                "tasks": {
                    t: {k: round(float(v[k]), 6) for k in ("auc", "logloss")}
                    for t, v in m["tasks"].items()
                },
            }
            for part, m in parts.items()
        }
        for feature, parts in slices.items()
    }


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in SUMMARY_KEYS:
        if k in m:
            v = m[k]
            out[k] = [round(float(x), 6) for x in v] if isinstance(v, list) else round(float(v), 6)
    return out
