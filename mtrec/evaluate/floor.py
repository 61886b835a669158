"""The model beside its floor: per-task AUC / logloss of a ``mtrec baseline`` run.

``mtrec evaluate --run R --floor R_FLOOR`` reads the floor's report for the same split
(or file), checks it scored the same rows, and adds a ``floor`` section to the model's
report: each task's floor AUC and logloss beside the model's, and the tasks whose AUC
is below the floor's, which the Markdown report says in a plain sentence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtrec.run import RunError

__all__ = ["floor_markdown", "floor_section", "read_floor_report"]


def read_floor_report(floor_run: str | Path, report_name: str) -> dict[str, Any] | None:
    """The floor run's ``eval/<report_name>`` (None when it has not been evaluated yet)."""
    path = Path(floor_run) / "eval" / report_name
    if not path.exists():
        return None
    return json.loads(path.read_text())


def floor_section(
    floor_run: str | Path, floor: dict[str, Any], model: dict[str, Any]
) -> dict[str, Any]:
    """The ``floor`` section of the model's report ``model`` from the floor's ``floor``.

    Returns ``{"run_dir", "tasks": {task: {"auc", "floor_auc", "auc_gain", "logloss",
    "floor_logloss", "below_floor"}}, "below_floor": [tasks]}``; a task is below its
    floor when its AUC is lower than the floor's (the point estimates).
    """
    if floor["rows"] != model["rows"] or floor["data"] != model["data"]:
        raise RunError(
            f"--floor {floor_run}: its report scored {floor['data']} ({floor['rows']} rows), "
            f"the model {model['data']} ({model['rows']} rows); train the floor on the same "
            "experiment (`mtrec baseline --config C`)"
        )
    missing = [t for t in model["tasks"] if t not in floor["tasks"]]
    if missing:
        raise RunError(
            f"--floor {floor_run}: has no task {missing}; its tasks are {list(floor['tasks'])}"
        )
    tasks: dict[str, dict[str, Any]] = {}
    for task, m in model["tasks"].items():
        f = floor["tasks"][task]
        known = m.get("auc") is not None and f.get("auc") is not None  # one-class: no AUC
        tasks[task] = {
            "auc": m.get("auc"),
            "floor_auc": f.get("auc"),
            "auc_gain": m["auc"] - f["auc"] if known else None,
            "logloss": m.get("logloss"),
            "floor_logloss": f.get("logloss"),
            "below_floor": bool(known and m["auc"] < f["auc"]),
        }
    below = [t for t, m in tasks.items() if m["below_floor"]]
    return {"run_dir": str(floor_run), "tasks": tasks, "below_floor": below}


def floor_markdown(section: dict[str, Any] | None) -> list[str]:
    """The report's "Floor" table and its verdict sentence (nothing without a floor)."""
    if not section:
        return []
    lines = [
        "",
        "## Floor: logistic regression",
        "",
        f"Floor run: `{section['run_dir']}` (`mtrec baseline`: one logistic regression per "
        "task over the same hashed ids and normalised numerics).",
        "",
        "| task | auc | floor auc | gain | logloss | floor logloss |",
        "|---|---|---|---|---|---|",
    ]
    for task, m in section["tasks"].items():
        cells = [m["auc"], m["floor_auc"], m["auc_gain"], m["logloss"], m["floor_logloss"]]
        lines.append(f"| {task} | " + " | ".join(_cell(x) for x in cells) + " |")
    below = section["below_floor"]
    lines.append("")
    if below:
        lines.append(
            f"**The model is below its floor** on {', '.join(f'`{t}`' for t in below)}: a "
            "logistic regression on the same features ranks these better (higher AUC)."
        )
    else:
        lines.append("The model is above its floor (AUC) on every task.")
    return lines


def _cell(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"
