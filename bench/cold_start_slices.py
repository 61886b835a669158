"""Where a run's gap to the attainable oracle sits on the cold-start preset.

``bench/generalisation.py`` gives one number per task (the gap of all test rows to the
attainable oracle). This bench splits it, for one data directory of that bench (``DATA``:
``data-seed<S>``, with its ``bench-meta.json``) and the runs trained on it:

* ``cold_start_oracles``: test AUC of the best learner that knows only some id effects
  (``mtrec.data.synth_cold_start.oracle_knowing``): every seen id (the attainable oracle),
  the ids of >= 20 training rows (what ``min_count: 20`` leaves knowable), the items only,
  the users only, the items of >= 20 rows only, none (side features only);
* ``cold_start_slices`` per run: AUC and calibration (mean predicted / observed) of the run
  and of the attainable oracle on the four slices of (user seen in training or not) x
  (item seen or not), their gap, and the slice's share of the test rows. The run is
  exported (``mtrec export``, into ``RUN/export/``) and scores the test split with ``mtrec
  predict`` (the serving path).

Usage::

    G=bench/.runs/generalisation/rows1000000
    .venv/bin/python bench/cold_start_slices.py --data $G/data-seed0 \\
        --runs $G/runs-seed0/config/seed0 [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, log

TASKS = ("click", "conversion")
MTREC = [sys.executable, "-m", "mtrec.cli"]


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(y, p)), 4) if 0 < y.sum() < len(y) else None


def oracles(rows: int, seed: int) -> dict[str, dict[str, float | None]]:
    from mtrec.data.synth_cold_start import oracle_knowing

    never = rows + 1
    known = {
        "every_seen_id": (1, 1),
        "ids_of_20_rows": (20, 20),
        "items_only": (never, 1),
        "users_only": (1, never),
        "items_of_20_rows_only": (never, 20),
        "side_features_only": (never, never),
    }
    y, probs = oracle_knowing(rows, seed, list(known.values()))
    return {
        name: {t: _auc(y[:, j], p[:, j]) for j, t in enumerate(TASKS)}
        for name, p in zip(known, probs, strict=True)
    }


def _predict(run: Path, test: Path, tmp: Path) -> pl.DataFrame:
    model = run / "export" / "model.pt"
    if not model.exists():
        subprocess.run([*MTREC, "export", "--run", str(run)], check=True, capture_output=True)
    out = tmp / "pred.parquet"
    cmd = [*MTREC, "predict", "--model", str(model), "--input", str(test), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return pl.read_parquet(out)


def slices(run: Path, data: Path) -> dict[str, dict[str, dict[str, float | None]]]:
    test = pl.read_parquet(data / "test.parquet")
    train = pl.read_parquet(data / "train.parquet", columns=["user_id", "item_id"])
    user_seen = test["user_id"].is_in(train["user_id"].unique().implode()).to_numpy()
    item_seen = test["item_id"].is_in(train["item_id"].unique().implode()).to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        pred = _predict(run, data / "test.parquet", Path(tmp))
    masks = {
        "all": np.ones(len(test), dtype=bool),
        "user_seen_item_seen": user_seen & item_seen,
        "user_seen_item_unseen": user_seen & ~item_seen,
        "user_unseen_item_seen": ~user_seen & item_seen,
        "user_unseen_item_unseen": ~user_seen & ~item_seen,
    }
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for t in TASKS:
        y = test[t].to_numpy()
        model, best = pred[t].to_numpy(), test[f"p_{t}_attainable"].to_numpy()
        out[t] = {}
        for name, m in masks.items():
            a, b = _auc(y[m], model[m]), _auc(y[m], best[m])
            out[t][name] = {
                "share": round(float(m.mean()), 4),
                "auc": a,
                "attainable_auc": b,
                "gap": round(b - a, 4) if a is not None and b is not None else None,
                "calibration": round(float(model[m].mean() / max(y[m].mean(), 1e-12)), 3),
                "attainable_calibration": round(float(best[m].mean() / max(y[m].mean(), 1e-12)), 3),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a data-seed<S> directory")
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="run directories")
    args = ap.parse_args()
    meta_file = args.data / "bench-meta.json"
    if not meta_file.exists():
        sys.exit(f"{meta_file}: missing; DATA must be a data directory of bench/generalisation.py")
    meta = json.loads(meta_file.read_text())
    if meta.get("preset") != "cold-start":
        sys.exit(f"{meta_file}: preset {meta.get('preset')!r}, this bench reads cold-start data")
    log(f"oracles of {args.data} ({meta['rows']:,} rows, seed {meta['seed']})")
    emit("cold_start_oracles", data=str(args.data), auc=oracles(meta["rows"], meta["seed"]))
    for run in args.runs:
        log(f"slices of {run}")
        emit("cold_start_slices", data=str(args.data), run=str(run), tasks=slices(run, args.data))


if __name__ == "__main__":
    main()
