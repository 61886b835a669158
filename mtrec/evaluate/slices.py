"""Cold / warm slices: metrics on rows whose id was seen vs unseen in the training split.

At training time ``mtrec.data.seen_ids.fit_seen_ids`` collects, for each *sliced*
feature, the sorted int64 ids (as ``mtrec.data.hashing`` encodes them) that occur in the
training split, and ``save_seen_ids`` stores them in the run directory
(``SEEN_IDS_FILE``, one array per feature). Evaluation reads the same feature's ids of
the scored rows and reports, per feature and per slice (``seen`` / ``unseen``): rows,
AUC, logloss, mean prediction, observed rate, calibration (their ratio) and, on planted
data, the oracle AUC.

Sliced features: those with ``slice: true`` in the config; when none is marked, the
``DEFAULT_SLICED`` single-valued categorical features with the most distinct training
values (``slice: false`` opts a feature out). Null values (``MISSING_ID``) count as seen:
they are no id at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mtrec.data.errors import DataError
from mtrec.data.hashing import MISSING_ID, hash_series
from mtrec.data.seen_ids import DEFAULT_SLICED, SEEN_IDS_FILE, fit_seen_ids, load_seen_ids
from mtrec.data.seen_ids import save_seen_ids as save_seen_ids
from mtrec.data.spec import FeatureSpec
from mtrec.metrics import auc, calibration, logloss

__all__ = [
    "DEFAULT_SLICED",
    "SEEN_IDS_FILE",
    "fit_seen_ids",
    "load_seen_ids",
    "row_ids",
    "save_seen_ids",
    "slice_markdown",
    "slice_metrics",
    "slice_report",
]


def _ids(spec: FeatureSpec, path: str | Path, names: list[str]) -> dict[str, np.ndarray]:
    """Encoded int64 ids [N] of the single-valued categorical ``names``, in file row order."""
    by_name = {f.name: f for f in spec.sparse}
    sources = list(dict.fromkeys(by_name[n].source for n in names))
    df = spec.scan(path).select(sources).collect()
    return {n: hash_series(df.get_column(by_name[n].source)) for n in names}


def row_ids(spec: FeatureSpec, path: str | Path, names: list[str]) -> dict[str, np.ndarray]:
    """Encoded ids [N] of ``names`` for every row of ``path`` (the order evaluation scores)."""
    return _ids(spec, path, names)


def _metrics(y: np.ndarray, p: np.ndarray, t: np.ndarray | None) -> dict[str, Any]:
    m: dict[str, Any] = {
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "mean_pred": float(p.mean()),
        "observed": float(y.mean()),
        "calibration": calibration(y, p),
    }
    if t is not None:
        m["oracle_auc"] = auc(y, t)
    return m


def slice_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    true_probs: np.ndarray | None,
    ids: dict[str, np.ndarray],
    seen: dict[str, np.ndarray],
    task_names: list[str],
) -> dict[str, dict[str, Any]]:
    """Per feature and slice: ``{"rows", "tasks": {task: {auc, logloss, mean_pred, observed,
    calibration[, oracle_auc]}}}``. ``labels`` / ``probs`` / ``true_probs``: [N, T];
    ``ids[f]``: [N]; ``seen[f]``: sorted training ids. Metrics of an empty slice are NaN."""
    out: dict[str, dict[str, Any]] = {}
    for name, row in ids.items():
        if len(row) != len(labels):
            raise DataError(
                f"slice {name!r}: {len(row)} ids for {len(labels)} scored rows; the data "
                "changed while it was evaluated"
            )
        known = np.isin(row, seen[name], assume_unique=False) | (row == MISSING_ID)
        out[name] = {}
        for key, mask in (("seen", known), ("unseen", ~known)):
            y, p = labels[mask] == 1, probs[mask]
            t = None if true_probs is None else true_probs[mask]
            out[name][key] = {
                "rows": int(mask.sum()),
                "tasks": {
                    task: _metrics(y[:, j], p[:, j], None if t is None else t[:, j])
                    for j, task in enumerate(task_names)
                },
            }
    return out


def slice_report(
    run_dir: str | Path, spec: FeatureSpec, data: str | Path, collector: Any
) -> dict[str, dict[str, Any]]:
    """:func:`slice_metrics` of a scored ``collector`` (a ``ScoreCollector`` over ``data``,
    in file row order) with the run's stored training ids; ``{}`` if the run stored none."""
    seen = load_seen_ids(Path(run_dir) / SEEN_IDS_FILE)
    known = {f.name for f in spec.sparse if f.kind == "categorical"}
    seen = {k: v for k, v in seen.items() if k in known}
    if not seen or not len(collector):
        return {}
    ids = row_ids(spec, data, list(seen))
    return slice_metrics(
        collector.labels, collector.probs, collector.true_probs, ids, seen, spec.task_names
    )


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.4f}"


def slice_markdown(slices: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: one table per sliced feature (rows = slice x task)."""
    if not slices:
        return []
    lines = [
        "",
        "## Seen / unseen ids",
        "",
        "Rows whose id occurs in the training split (`seen`, nulls included) vs not "
        "(`unseen`). Calibration = mean prediction / observed rate.",
    ]
    for feature, parts in slices.items():
        oracle = any("oracle_auc" in m for s in parts.values() for m in s["tasks"].values())
        cols = ["auc", "logloss", "mean_pred", "observed", "calibration"]
        cols += ["oracle_auc"] if oracle else []
        lines += [
            "",
            f"`{feature}`",
            "",
            "| slice | rows | task | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 3) + "|",
        ]
        for key, s in parts.items():
            for task, m in s["tasks"].items():
                vals = " | ".join(_fmt(float(m[c])) for c in cols)
                lines.append(f"| {key} | {s['rows']} | {task} | {vals} |")
    return lines
