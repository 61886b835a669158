"""How close to the attainable oracle can ANY learner get on the cold-start preset?

``bench/generalisation.py`` measures the package defaults against the attainable oracle
(``p_<task>_attainable``: the true probability with every id absent from training replaced
by its prior), which knows the effect of every SEEN id exactly. A learner has to estimate
those effects from the training rows, so some gap is estimation error no model removes.
This bench measures it with the strongest simple learner there is: a logistic regression
told the generator's true functional form (``mtrec/data/synth_cold_start.py``):

* one-hot ``user_id`` and ``item_id`` (ids seen in training; unseen ids an all-zero block,
  i.e. the prior mean), scaled by ``s`` so their L2 penalty differs from the side part's;
* one-hot ``gender``, ``region``, ``device``, ``item_category`` and the ``gender x
  category`` cross; ``tanh(age_z) x category`` (the low-rank user x category cross);
  ``sin / cos(1.3 age_z)``, ``tanh(1.5 price_z)``, ``sin / cos`` of the hour's angle;
* the conversion task as the generator builds it: ``p_click x p_cvr``, the cvr model
  fitted on the clicked training rows.

``C`` (sklearn's inverse L2 strength) and ``s`` are chosen on the valid split's logloss;
test AUC and ``gap_to_attainable`` per task are reported as ``bench/generalisation.py``
does (same data directories, ``--out``), one ``well_specified_run`` JSON line per seed,
then a ``well_specified`` line with mean ± std over seeds. A gap this learner cannot close
is not the package's to close; the package's gap beyond it is.

Ablations, each one ingredient the package's default model handles differently:
``--min-count N`` treats ids seen fewer than N times in training as unseen (the preset
config's frequency filter, ``min_count: 20``); ``--no-chain`` fits the conversion task
directly on all rows (the default model's conversion tower); ``--no-ids`` drops the id
columns (side features only).

Usage: ``.venv/bin/python bench/well_specified.py --rows 1000000 --seeds 0 1 2``
(~5 min per seed at 1M rows, one core) ``[--min-count 20] [--no-chain] [--no-ids]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, log
from generalisation import _data

GRID_C = (0.1, 0.3, 1.0)
GRID_ID_SCALE = (0.7, 1.0, 1.4)
_GENDERS, _REGIONS, _DEVICES, _CATEGORIES = 3, 200, 4, 60


def _onehot(codes: np.ndarray, width: int, values: np.ndarray | None = None) -> Any:
    from scipy import sparse

    n = len(codes)
    data = np.ones(n) if values is None else values
    return sparse.csr_matrix((data, (np.arange(n), codes)), shape=(n, width))


def design(df: pl.DataFrame, train_ids: dict[str, np.ndarray], id_scale: float) -> Any:
    """Rows → the well-specified design matrix (sparse CSR)."""
    from scipy import sparse

    blocks = []
    for col, vocab in train_ids.items():
        ids = df.get_column(col).to_numpy()
        pos = np.minimum(np.searchsorted(vocab, ids), len(vocab) - 1)
        seen = vocab[pos] == ids
        rows = np.flatnonzero(seen)
        blocks.append(
            sparse.csr_matrix(
                (np.full(len(rows), id_scale), (rows, pos[seen])), shape=(len(df), len(vocab))
            )
        )
    gender = df.get_column("gender").to_numpy()
    category = df.get_column("item_category").to_numpy()
    age_z = (df.get_column("user_age").to_numpy() - 35.0) / 11.0
    price_z = (np.log(df.get_column("item_price").to_numpy()) - 3.0) / 0.9
    angle = 2.0 * np.pi * df.get_column("hour").to_numpy() / 24.0
    blocks += [
        _onehot(gender, _GENDERS),
        _onehot(df.get_column("region").to_numpy(), _REGIONS),
        _onehot(df.get_column("device").to_numpy(), _DEVICES),
        _onehot(category, _CATEGORIES),
        _onehot(gender * _CATEGORIES + category, _GENDERS * _CATEGORIES),
        _onehot(category, _CATEGORIES, np.tanh(age_z)),
    ]
    smooth = [np.sin(1.3 * age_z), np.cos(1.3 * age_z), np.tanh(1.5 * price_z)]
    smooth += [np.sin(angle), np.cos(angle), np.tanh(age_z)]
    blocks.append(sparse.csr_matrix(np.stack(smooth, 1)))
    return sparse.hstack(blocks).tocsr()


def train_vocab(train: pl.DataFrame, min_count: int, use_ids: bool) -> dict[str, np.ndarray]:
    """Sorted ids per id column that get their own weight: seen >= ``min_count`` times."""
    if not use_ids:
        return {}
    vocab = {}
    for col in ("user_id", "item_id"):
        ids, counts = np.unique(train.get_column(col).to_numpy(), return_counts=True)
        vocab[col] = ids[counts >= max(min_count, 1)]
    return vocab


def run_seed(out: Path, rows: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    from mtrec.metrics import auc, bootstrap, logloss

    data = _data(out, rows, seed)
    frames = {s: pl.read_parquet(data / f"{s}.parquet") for s in ("train", "valid", "test")}
    train_ids = train_vocab(frames["train"], args.min_count, not args.no_ids)
    y = {
        t: {s: frames[s].get_column(t).to_numpy() for s in frames} for t in ("click", "conversion")
    }
    clicked = y["click"]["train"] == 1
    fits: dict[str, Any] = {}  # task -> (valid logloss, C, s, valid probs, test probs)
    for task in ("click", "conversion"):
        for scale in GRID_ID_SCALE if train_ids else (1.0,):
            x = {s: design(frames[s], train_ids, scale) for s in frames}
            for c in GRID_C:
                t0 = time.perf_counter()
                model = LogisticRegression(C=c, max_iter=500)
                if task == "click" or args.no_chain:
                    model.fit(x["train"], y[task]["train"])
                    pv, pt = (model.predict_proba(x[s])[:, 1] for s in ("valid", "test"))
                else:  # p(conversion) = p(click) * p(conversion | click)
                    model.fit(x["train"][clicked], y["conversion"]["train"][clicked])
                    click_v, click_t = fits["click"][3], fits["click"][4]
                    pv = click_v * model.predict_proba(x["valid"])[:, 1]
                    pt = click_t * model.predict_proba(x["test"])[:, 1]
                ll = logloss(y[task]["valid"], pv)
                log(
                    f"seed {seed} {task} C={c} s={scale}: valid logloss {ll:.5f} "
                    f"({time.perf_counter() - t0:.0f}s)"
                )
                if task not in fits or ll < fits[task][0]:
                    fits[task] = (ll, c, scale, pv, pt)
    res: dict[str, Any] = {"tasks": {}}
    test = frames["test"]
    for task, (ll, c, scale, _, pt) in fits.items():
        yt = y[task]["test"]
        attainable = auc(yt, test.get_column(f"p_{task}_attainable").to_numpy())
        a = auc(yt, pt)
        res["tasks"][task] = {
            "C": c,
            "id_scale": scale,
            "valid_logloss": ll,
            "auc": a,
            "auc_ci": list(bootstrap(yt, pt, n_resamples=100, seed=seed)["auc"]),
            "logloss": logloss(yt, pt),
            "attainable_oracle_auc": attainable,
            "gap_to_attainable": attainable - a,
        }
    res["mean_gap_to_attainable"] = statistics.fmean(
        r["gap_to_attainable"] for r in res["tasks"].values()
    )
    return emit("well_specified_run", rows=rows, seed=seed, variant=_variant(args), **res)


def _variant(args: argparse.Namespace) -> dict[str, Any]:
    return {"min_count": args.min_count, "chain": not args.no_chain, "ids": not args.no_ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / ".runs" / "generalisation")
    ap.add_argument("--min-count", type=int, default=1, help="ids seen fewer times: unseen")
    ap.add_argument("--no-chain", action="store_true", help="fit conversion directly")
    ap.add_argument("--no-ids", action="store_true", help="side features only")
    args = ap.parse_args()
    runs = [run_seed(args.out / f"rows{args.rows}", args.rows, s, args) for s in args.seeds]
    keys = [f"{t}.{k}" for t in ("click", "conversion") for k in ("auc", "gap_to_attainable")]
    values = {k: [r["tasks"][k.split(".")[0]][k.split(".")[1]] for r in runs] for k in keys}
    values["mean_gap_to_attainable"] = [r["mean_gap_to_attainable"] for r in runs]
    summary = {
        k: [round(statistics.fmean(v), 4), round(statistics.stdev(v), 4) if len(v) > 1 else 0.0]
        for k, v in values.items()
    }
    emit(
        "well_specified",
        rows=args.rows,
        seeds=args.seeds,
        variant=_variant(args),
        mean_std=summary,
    )


if __name__ == "__main__":
    main()
