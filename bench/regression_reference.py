"""A logistic-regression reference on the default planted preset: what a wide model reaches.

The default preset's teacher (``mtrec/data/synthetic.py``) is additive in per-value
effects of every categorical, mean-pooled tag effects, smooth non-linear numeric effects
and low-rank pairwise crosses of categoricals. A logistic regression per task over
features of those families is close to well specified; fitted on the same splits, it
says how much of the model's gap to the oracle is estimation error at this many rows.
Variants, each adding one family (``--variants``):

* ``plain`` — one-hot of every categorical value seen in training (unseen: all-zero),
  mean-pooled one-hots of the tags, standardised numerics (``log1p`` first where the
  config says so): the design of the package's floor;
* ``splines`` — the numerics as cubic B-splines with 8 quantile knots instead;
* ``crosses`` — plus, for every pair of categoricals, a one-hot of the pair of their
  ``--top-k`` most frequent values (others pooled), scaled by ``s``.

The L2 strength ``C`` (and ``s``) are chosen per task on the valid split's logloss; test
AUC beside the oracle's (the true probabilities). One ``regression_reference`` JSON line
per variant: per-task AUC and gap, mean AUC and mean gap.

Usage: ``.venv/bin/python bench/regression_reference.py [--rows 60000] [--data DIR]``
(``--data``: a ``mtrec data synth`` directory of the default preset; else one of
``--rows`` rows is generated in the bench cache). ~3 min for all variants at 60k rows.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

GRID_C = (0.03, 0.1, 0.3)
GRID_CROSS_SCALE = (0.5, 1.0)
SPLINE_KNOTS = 8
VARIANTS = ("plain", "splines", "crosses")


def _kept(column: pl.Series, min_count: int) -> np.ndarray:
    """Sorted values seen at least ``min_count`` times (the others get no column, like
    unseen ones: the package's frequency filter)."""
    ids, counts = np.unique(column.to_numpy(), return_counts=True)
    return ids[counts >= min_count]


def _csr(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int, width: int) -> Any:
    from scipy import sparse

    return sparse.csr_matrix((values, (rows, cols)), shape=(n, width))


class Design:
    """Raw split columns → the sparse design matrix of one variant."""

    def __init__(
        self, cfg: Any, train: pl.DataFrame, variant: str, top_k: int, min_count: int = 1
    ) -> None:
        from sklearn.preprocessing import SplineTransformer

        self.variant, self.top_k = variant, top_k
        self.cats = [f.source for f in cfg.features if f.kind == "categorical"]
        self.multi = [f.source for f in cfg.features if f.kind == "multi_hot"]
        numeric = [f for f in cfg.features if f.kind == "numeric"]
        self.nums = [(f.source, f.transform.startswith("log1p")) for f in numeric]
        self.vocab = {c: _kept(train.get_column(c).drop_nulls(), min_count) for c in self.cats}
        self.tokens = {
            c: np.unique(train.get_column(c).explode().drop_nulls().to_numpy()) for c in self.multi
        }
        self.top: dict[str, np.ndarray] = {}
        for c in self.cats:
            ids, counts = np.unique(train.get_column(c).drop_nulls().to_numpy(), return_counts=True)
            self.top[c] = np.sort(ids[np.argsort(-counts, kind="stable")[:top_k]])
        raw = {c: self._numeric(train, c, log) for c, log in self.nums}
        self.moments = {
            c: (float(np.nanmean(x)), float(np.nanstd(x)) or 1.0) for c, x in raw.items()
        }
        self.splines = {
            c: SplineTransformer(n_knots=SPLINE_KNOTS, knots="quantile").fit(
                np.nan_to_num(x, nan=self.moments[c][0])[:, None]
            )
            for c, x in raw.items()
        }

    @staticmethod
    def _numeric(df: pl.DataFrame, column: str, log: bool) -> np.ndarray:
        x = df.get_column(column).cast(pl.Float64).to_numpy()
        return np.sign(x) * np.log1p(np.abs(x)) if log else x

    @staticmethod
    def _lookup(values: np.ndarray, vocab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(vocab, values), max(len(vocab) - 1, 0))
        return pos, vocab[pos] == values if len(vocab) else np.zeros(len(values), bool)

    def __call__(self, df: pl.DataFrame, cross_scale: float = 1.0) -> Any:
        from scipy import sparse

        n, blocks = len(df), []
        for c in self.cats:
            pos, hit = self._lookup(df.get_column(c).fill_null(-1).to_numpy(), self.vocab[c])
            r = np.flatnonzero(hit)
            blocks.append(_csr(np.ones(len(r)), r, pos[hit], n, len(self.vocab[c])))
        for c in self.multi:
            lens = df.get_column(c).list.len().fill_null(0).to_numpy()
            flat = np.concatenate([x for x in df.get_column(c).to_list() if x] or [np.array([])])
            rows = np.repeat(np.arange(n), lens)
            pos, hit = self._lookup(flat.astype(np.int64), self.tokens[c])
            weight = 1.0 / np.maximum(lens, 1)[rows]
            blocks.append(_csr(weight[hit], rows[hit], pos[hit], n, len(self.tokens[c])))
        for c, log in self.nums:
            mean, std = self.moments[c]
            x = np.nan_to_num(self._numeric(df, c, log), nan=mean)
            if self.variant == "plain":
                blocks.append(sparse.csr_matrix(((x - mean) / std)[:, None]))
            else:
                blocks.append(sparse.csr_matrix(self.splines[c].transform(x[:, None])))
        if self.variant == "crosses":
            k = self.top_k
            code = {}
            for c in self.cats:
                pos, hit = self._lookup(df.get_column(c).fill_null(-1).to_numpy(), self.top[c])
                code[c] = np.where(hit, pos, k)
            for a, b in itertools.combinations(self.cats, 2):
                cell = code[a] * (k + 1) + code[b]
                blocks.append(_csr(np.full(n, cross_scale), np.arange(n), cell, n, (k + 1) ** 2))
        return sparse.hstack(blocks).tocsr()


def run_variant(
    cfg: Any, frames: dict[str, pl.DataFrame], variant: str, top_k: int, min_count: int = 1
) -> dict:
    from sklearn.linear_model import LogisticRegression

    from mtrec.metrics import auc, logloss

    design = Design(cfg, frames["train"], variant, top_k, min_count)
    scales = GRID_CROSS_SCALE if variant == "crosses" else (1.0,)
    xs = {s: {k: design(df, s) for k, df in frames.items()} for s in scales}
    tasks: dict[str, Any] = {}
    for t in cfg.tasks:
        y = {k: df.get_column(t.label or t.name).to_numpy() for k, df in frames.items()}
        best: tuple[float, float, float, np.ndarray] | None = None
        for s in scales:
            for c in GRID_C:
                model = LogisticRegression(C=c, max_iter=1000).fit(xs[s]["train"], y["train"])
                ll = logloss(y["valid"], model.predict_proba(xs[s]["valid"])[:, 1])
                if best is None or ll < best[0]:
                    best = (ll, c, s, model.predict_proba(xs[s]["test"])[:, 1])
        assert best is not None
        truth = frames["test"].get_column(t.true_prob).to_numpy()
        a, oracle = auc(y["test"], best[3]), auc(y["test"], truth)
        tasks[t.name] = {"auc": a, "oracle_auc": oracle, "gap": oracle - a, "C": best[1]}
        C.log(f"{variant} {t.name}: C={best[1]} s={best[2]} test AUC {a:.4f} (oracle {oracle:.4f})")
    return C.emit(
        "regression_reference",
        variant=variant,
        min_count=min_count,
        rows=sum(len(df) for df in frames.values()),
        tasks=tasks,
        mean_auc=round(statistics.fmean(r["auc"] for r in tasks.values()), 4),
        mean_gap=round(statistics.fmean(r["gap"] for r in tasks.values()), 4),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    C.add_common_args(ap)
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--data", type=Path, help="a default-preset `mtrec data synth` directory")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--top-k", type=int, default=10, help="values per categorical in crosses")
    ap.add_argument(
        "--min-count",
        type=int,
        default=1,
        help="one-hot columns only for categorical values seen this often in train",
    )
    args = ap.parse_args()
    from mtrec.config import load_config

    data = args.data or C.ensure_synthetic(args.cache_dir, args.rows)
    cfg = load_config(data / "config.yaml")
    frames = {s: pl.read_parquet(data / f"{s}.parquet") for s in ("train", "valid", "test")}
    for variant in args.variants:
        run_variant(cfg, frames, variant, args.top_k, args.min_count)


if __name__ == "__main__":
    main()
