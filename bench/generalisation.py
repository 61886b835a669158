"""Generalisation to new users: the package-default config vs a one-hot logistic floor.

On ``mtrec data synth --preset cold-start`` data (split by time, ~85-90% of test rows carry
a ``user_id`` never seen in training; issue #16), for each seed in ``--seeds`` (the data
seed and the training seed):

* ``model``: the config ``mtrec data synth`` writes (package defaults), trained and
  evaluated with the ``mtrec`` CLI as ``bench/models.py`` does: per task test AUC (with its
  bootstrap interval), logloss, and the same on the ``unseen`` ``user_id`` slice
  (``report.json`` ``slices``, from the training ids the run stored);
* ``floor``: a one-hot logistic regression (scikit-learn, L2, ``C`` picked on the valid
  split) on the SAME hashed ids (``mtrec.data.hashing``; an id absent from training is an
  all-zero row) plus the numerics transformed as the config says and standardised with
  training statistics; per task AUC (bootstrap interval), logloss and unseen-user slice;
* ``base_rate_logloss``: logloss of the training positive rate; ``oracle_auc``: AUC of the
  true probabilities (all rows and unseen-user rows); ``cold_user_oracle_auc_unseen``: AUC
  on unseen-user rows of the best probabilities without the user's own effect
  (``p_<task>_cold``); ``attainable_oracle_auc`` (all rows, and ``_unseen``): AUC of the
  best probabilities of a model trained on the train split (``p_<task>_attainable``: the
  effects of ids absent from training replaced by their prior), the most any model can
  reach; ``gap_to_attainable`` and ``gain_over_floor`` per task (the issue's targets).
  The floor's test probabilities are stored next to the data, shared by the variants.

Output: one ``generalisation_run`` JSON line per seed, then one ``generalisation`` line
with mean ± std over seeds of every number (each line carries the load average).

Usage::

    .venv/bin/python bench/generalisation.py --rows 1000000 --seeds 0 1 2
    .venv/bin/python bench/generalisation.py --rows 200000 --seeds 0   # quick, ~10 min on 2 cores
    .venv/bin/python bench/generalisation.py --rows 100000 --seeds 0 \
        --set model.embedding.id_dropout=auto --tag=-drop-auto   # a variant of the config
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, log
from models import run_one

SLICE_FEATURE = "user_id"
FLOOR_C = (0.03, 0.3, 3.0)  # L2 strengths tried on the valid split (sklearn's C)
BOOT = 100


def _data(out: Path, rows: int, seed: int) -> Path:
    import mtrec.data.synth_cold_start as generator
    from mtrec.data.synthetic import synthesize

    d = out / f"data-seed{seed}"
    meta = d / "bench-meta.json"
    code = hashlib.sha256(Path(generator.__file__).read_bytes()).hexdigest()[:12]
    want = {"rows": rows, "seed": seed, "preset": "cold-start", "code": code}
    if meta.exists() and json.loads(meta.read_text()) == want:
        return d
    log(f"generating {rows:,} cold-start rows (seed {seed}) into {d}")
    for stale in d.glob("floor-seed*.npz"):  # the floor of the old data
        stale.unlink()
    synthesize(d, rows=rows, seed=seed, preset="cold-start")
    meta.write_text(json.dumps(want) + "\n")
    return d


def _design(cfg: Any, frames: dict[str, pl.DataFrame]) -> dict[str, Any]:
    """Sparse one-hot (hashed ids seen in train) + standardised numerics, per split."""
    from scipy import sparse

    from mtrec.data.hashing import hash_series

    cats = [f for f in cfg.features if f.kind == "categorical"]
    nums = [f for f in cfg.features if f.kind == "numeric"]
    vocab = {f.name: np.unique(hash_series(frames["train"].get_column(f.source))) for f in cats}
    offsets = np.cumsum([0] + [len(v) for v in vocab.values()])

    def numeric(df: pl.DataFrame) -> np.ndarray:
        cols = []
        for f in nums:
            x = df.get_column(f.source).cast(pl.Float64).to_numpy()
            if f.transform.startswith("log1p"):
                x = np.sign(x) * np.log1p(np.abs(x))
            cols.append(x)
        return np.stack(cols, 1) if cols else np.zeros((len(df), 0))

    tr = numeric(frames["train"])
    mean, std = np.nanmean(tr, 0), np.nanstd(tr, 0)
    std[std == 0] = 1.0
    out: dict[str, Any] = {}
    for split, df in frames.items():
        rows, cols = [], []
        for j, f in enumerate(cats):
            ids = hash_series(df.get_column(f.source))
            pos = np.searchsorted(vocab[f.name], ids)
            pos = np.minimum(pos, len(vocab[f.name]) - 1)
            hit = vocab[f.name][pos] == ids  # unseen ids: an all-zero block
            rows.append(np.flatnonzero(hit))
            cols.append(offsets[j] + pos[hit])
        r, c = np.concatenate(rows), np.concatenate(cols)
        onehot = sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(df), offsets[-1]))
        z = np.nan_to_num((numeric(df) - mean) / std)
        out[split] = sparse.hstack([onehot, sparse.csr_matrix(z)]).tocsr()
    return out


def _floor(cfg: Any, frames: dict[str, pl.DataFrame], seed: int) -> dict[str, np.ndarray]:
    """Test probabilities of the logistic floor per task (C chosen by valid logloss)."""
    from sklearn.linear_model import LogisticRegression

    from mtrec.metrics import logloss

    x = _design(cfg, frames)
    probs: dict[str, np.ndarray] = {}
    for t in cfg.tasks:
        y = {s: frames[s].get_column(t.label or t.name).to_numpy() for s in frames}
        best: tuple[float, Any] | None = None
        for c in FLOOR_C:
            lr = LogisticRegression(C=c, max_iter=300, random_state=seed)
            lr.fit(x["train"], y["train"])
            ll = logloss(y["valid"], lr.predict_proba(x["valid"])[:, 1])
            if best is None or ll < best[0]:
                best = (ll, lr)
        assert best is not None
        probs[t.name] = best[1].predict_proba(x["test"])[:, 1]
        log(f"floor {t.name}: C={best[1].C} valid logloss {best[0]:.5f}")
    return probs


def _cached_floor(
    data: Path, cfg: Any, frames: dict[str, pl.DataFrame], seed: int
) -> dict[str, np.ndarray]:
    """:func:`_floor`, stored next to the data: it depends only on the data and the seed,
    so the variants of one comparison (``--set``) share it."""
    path = data / f"floor-seed{seed}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    probs = _floor(cfg, frames, seed)
    np.savez(path, **probs)
    return probs


def _metrics(y: np.ndarray, p: np.ndarray, seed: int) -> dict[str, Any]:
    from mtrec.metrics import auc, bootstrap, calibration, logloss

    ci = bootstrap(y, p, n_resamples=BOOT, seed=seed)
    return {
        "auc": auc(y, p),
        "auc_ci": list(ci["auc"]),
        "logloss": logloss(y, p),
        "calibration": calibration(y, p),
    }


def run_seed(
    out: Path, rows: int, seed: int, threads: int, sets: list[str] | None = None, tag: str = ""
) -> dict[str, Any]:
    from mtrec.config import load_config
    from mtrec.metrics import auc, logloss

    data = _data(out, rows, seed)
    config = data / "config.yaml"
    runs = out / f"runs{tag}-seed{seed}"
    run_one(config, seed, runs, list(sets or []), threads)
    report = json.loads((runs / "config" / f"seed{seed}" / "eval" / "report.json").read_text())
    cfg = load_config(config)
    frames = {s: pl.read_parquet(data / f"{s}.parquet") for s in ("train", "valid", "test")}
    test, train = frames["test"], frames["train"]
    unseen = ~np.isin(
        test.get_column(SLICE_FEATURE).to_numpy(), train.get_column(SLICE_FEATURE).to_numpy()
    )
    floor_probs = _cached_floor(data, cfg, frames, seed)
    model_slice = report["slices"][SLICE_FEATURE]["unseen"]
    res: dict[str, Any] = {
        "unseen_user_fraction": float(unseen.mean()),
        "model": {},
        "floor": {},
        "base_rate_logloss": {},
        "oracle_auc": {},
        "oracle_auc_unseen": {},
        "cold_user_oracle_auc_unseen": {},
        "attainable_oracle_auc": {},
        "attainable_oracle_auc_unseen": {},
        "gap_to_attainable": {},
        "gap_to_attainable_unseen": {},
        "gain_over_floor": {},
    }
    for t in cfg.tasks:
        y = test.get_column(t.label or t.name).to_numpy()
        truth = test.get_column(t.true_prob).to_numpy()
        m = report["tasks"][t.name]
        ms = model_slice["tasks"][t.name]
        res["model"][t.name] = {
            "auc": m["auc"],
            "auc_ci": m.get("auc_ci"),
            "logloss": m["logloss"],
            "calibration": m["calibration"],
            "unseen": {k: ms[k] for k in ("auc", "logloss", "calibration")},
        }
        fp = floor_probs[t.name]
        fm = _metrics(y, fp, seed)
        fm["unseen"] = {
            k: v for k, v in _metrics(y[unseen], fp[unseen], seed).items() if k != "auc_ci"
        }
        res["floor"][t.name] = fm
        rate = float(train.get_column(t.label or t.name).mean())
        res["base_rate_logloss"][t.name] = logloss(y, np.full(len(y), rate))
        res["oracle_auc"][t.name] = auc(y, truth)
        res["oracle_auc_unseen"][t.name] = auc(y[unseen], truth[unseen])
        cold = test.get_column(f"{t.true_prob}_cold").to_numpy()
        res["cold_user_oracle_auc_unseen"][t.name] = auc(y[unseen], cold[unseen])
        best = test.get_column(f"{t.true_prob}_attainable").to_numpy()
        res["attainable_oracle_auc"][t.name] = auc(y, best)
        res["attainable_oracle_auc_unseen"][t.name] = auc(y[unseen], best[unseen])
        res["gap_to_attainable"][t.name] = res["attainable_oracle_auc"][t.name] - m["auc"]
        res["gap_to_attainable_unseen"][t.name] = (
            res["attainable_oracle_auc_unseen"][t.name] - ms["auc"]
        )
        res["gain_over_floor"][t.name] = m["auc"] - fm["auc"]
    names = [t.name for t in cfg.tasks]
    res["mean_auc"] = statistics.fmean(res["model"][n]["auc"] for n in names)
    res["mean_attainable_oracle_auc"] = statistics.fmean(
        res["attainable_oracle_auc"][n] for n in names
    )
    res["mean_oracle_auc"] = statistics.fmean(res["oracle_auc"][n] for n in names)
    return emit("generalisation_run", rows=rows, seed=seed, **res)


def _leaves(d: Any, prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts to ``a.b.c`` -> number (lists such as intervals are skipped)."""
    if isinstance(d, dict):
        out: dict[str, float] = {}
        for k, v in d.items():
            out |= _leaves(v, f"{prefix}.{k}" if prefix else k)
        return out
    return {prefix: float(d)} if isinstance(d, (int, float)) else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / ".runs" / "generalisation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to `mtrec train` (repeatable), e.g. "
        "model.embedding.id_dropout=auto",
    )
    ap.add_argument("--tag", default="", help="suffix of the run directories (needed with --set)")
    args = ap.parse_args()
    if args.set and not args.tag:
        ap.error("--set needs --tag (runs of other settings would be reused)")
    out = args.out / f"rows{args.rows}"
    runs = [run_seed(out, args.rows, s, args.threads, args.set, args.tag) for s in args.seeds]
    keys = (
        "model",
        "floor",
        "base_rate_logloss",
        "oracle_auc",
        "oracle_auc_unseen",
        "cold_user_oracle_auc_unseen",
        "attainable_oracle_auc",
        "attainable_oracle_auc_unseen",
        "gap_to_attainable",
        "gap_to_attainable_unseen",
        "gain_over_floor",
        "mean_auc",
        "mean_attainable_oracle_auc",
        "mean_oracle_auc",
    )
    flat = [_leaves({k: r[k] for k in (*keys, "unseen_user_fraction")}) for r in runs]
    summary = {
        k: [
            round(statistics.fmean(f[k] for f in flat), 4),
            round(statistics.stdev(f[k] for f in flat), 4) if len(flat) > 1 else 0.0,
        ]
        for k in flat[0]
    }
    emit("generalisation", rows=args.rows, seeds=args.seeds, sets=args.set, mean_std=summary)


if __name__ == "__main__":
    main()
