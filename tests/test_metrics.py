"""Tests for mtrec.metrics against scikit-learn and hand-computed references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from mtrec import metrics as metrics_mod
from mtrec.metrics import (
    ScoreCollector,
    auc,
    bootstrap_ci,
    calibration,
    ece,
    gauc,
    logloss,
    task_metrics,
)


def _data(
    n: int, seed: int, decimals: int | None = 1, pos_rate: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_rate).astype(np.int64)
    s = np.clip(rng.random(n) * 0.8 + 0.2 * y, 0.0, 1.0)
    if decimals is not None:
        s = np.round(s, decimals)  # many ties
    return y, s


# --------------------------------------------------------------------------- auc


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [0, 1, 2, None])
@pytest.mark.parametrize("pos_rate", [0.03, 0.5, 0.9])
def test_auc_matches_sklearn_with_ties(seed: int, decimals: int | None, pos_rate: float) -> None:
    y, s = _data(3000, seed, decimals, pos_rate)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc(y, s.astype(np.float32)) == pytest.approx(
        roc_auc_score(y, s.astype(np.float32)), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(4))
def test_weighted_auc_matches_sklearn(seed: int) -> None:
    y, s = _data(2000, seed, decimals=1)
    rng = np.random.default_rng(100 + seed)
    w = rng.random(y.size) * 3
    w[rng.random(y.size) < 0.1] = 0.0  # zero-weight rows must not matter
    assert auc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)


def test_integer_weights_equal_row_repetition() -> None:
    y, s = _data(500, 7, decimals=1)
    w = np.random.default_rng(7).integers(0, 4, y.size)
    assert auc(y, s, w) == pytest.approx(auc(np.repeat(y, w), np.repeat(s, w)), abs=1e-12)


def test_auc_tiny_and_exact_values() -> None:
    assert auc([0, 1], [0.1, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.1]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert auc([True, False], [3, 3]) == 0.5
    # pairs (pos, neg): (.4,.1)=1, (.4,.4)=.5, (.4,.8)=0, (.8,.1)=1, (.8,.4)=1, (.8,.8)=.5
    assert auc([1, 1, 0, 0, 0], [0.4, 0.8, 0.1, 0.4, 0.8]) == pytest.approx(4.0 / 6.0)
    # -0.0 and 0.0 are the same score
    assert auc([1, 0], [-0.0, 0.0]) == 0.5
    # the larger class is the query side in one branch: both branches agree with sklearn
    for y in ([1, 1, 1, 0], [0, 0, 0, 1]):
        s = [0.2, 0.2, 0.7, 0.2]
        assert auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_auc_single_class_is_nan() -> None:
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    assert math.isnan(auc([], []))
    assert math.isnan(auc([0, 1, 1], [0.1, 0.2, 0.3], weights=[0.0, 1.0, 2.0]))


def test_auc_accepts_inf_scores() -> None:
    y = [0, 1, 0, 1]
    s = [-np.inf, np.inf, 0.0, np.inf]
    assert auc(y, s) == 1.0


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], "0/1"),
        ([0, 0.5, 1], [0.1, 0.2, 0.3], "0/1"),
        ([0, np.nan, 1], [0.1, 0.2, 0.3], "0/1"),
        (["a", "b"], [0.1, 0.2], "dtype"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
        ([0, 1, 1], [0.1, 0.3], "length"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_auc_invalid_input(labels: list, scores: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        auc(labels, scores)


def test_invalid_weights() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        auc([0, 1], [0.1, 0.2], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="finite"):
        auc([0, 1], [0.1, 0.2], weights=[1.0, np.nan])
    with pytest.raises(ValueError, match="length"):
        auc([0, 1], [0.1, 0.2], weights=[1.0])


# --------------------------------------------------------------------------- logloss etc.


@pytest.mark.parametrize("seed", range(3))
def test_logloss_matches_sklearn(seed: int) -> None:
    y, p = _data(2000, seed, decimals=3)
    p = np.clip(p, 1e-3, 1 - 1e-3)
    assert logloss(y, p) == pytest.approx(log_loss(y, p, labels=[0, 1]), rel=1e-10)
    w = np.random.default_rng(seed).random(y.size)
    assert logloss(y, p, w) == pytest.approx(
        log_loss(y, p, sample_weight=w, labels=[0, 1]), rel=1e-10
    )


def test_logloss_clips_and_validates() -> None:
    # p = 0 for a positive is clipped to eps instead of giving inf
    assert logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    assert logloss([0], [1.0], eps=1e-3) == pytest.approx(-math.log(1e-3))
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert math.isnan(logloss([], []))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        logloss([0, 1], [0.2, 1.5])
    with pytest.raises(ValueError, match="NaN"):
        logloss([0, 1], [0.2, np.nan])


def test_calibration() -> None:
    assert calibration([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.0)
    assert calibration([1, 0], [0.75, 0.25]) == pytest.approx(1.0)
    assert calibration([1, 0], [0.2, 0.6], weights=[3.0, 1.0]) == pytest.approx(
        (3 * 0.2 + 0.6) / 3.0
    )
    assert math.isnan(calibration([0, 0], [0.1, 0.2]))


def test_ece_hand_computed() -> None:
    # n_bins=2: bin0 = [0, .5), bin1 = [.5, 1] (p = 1 included)
    y = [0, 1, 0, 1, 1]
    p = [0.1, 0.3, 0.6, 0.9, 1.0]
    # bin0: mean_p=.2, mean_y=.5 -> |-.3| * 2/5 ; bin1: mean_p=2.5/3, mean_y=2/3 -> 1/6 * 3/5
    expected = 0.3 * 2 / 5 + (2.5 / 3 - 2 / 3) * 3 / 5
    assert ece(y, p, n_bins=2) == pytest.approx(expected)
    # weights act as row multiplicities
    w = [2, 1, 1, 1, 3]
    assert ece(y, p, n_bins=2, weights=w) == pytest.approx(
        ece(np.repeat(y, w), np.repeat(p, w), n_bins=2)
    )
    assert ece([0, 1], [0.0, 1.0]) == 0.0
    assert ece([1, 0], [0.7, 0.7], n_bins=1) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="n_bins"):
        ece(y, p, n_bins=0)


def test_ece_matches_loop_reference() -> None:
    y, p = _data(4000, 11, decimals=None)
    n_bins = 15
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for b in range(n_bins):
        hi_ok = p <= edges[b + 1] if b == n_bins - 1 else p < edges[b + 1]
        m = (p >= edges[b]) & hi_ok
        if m.any():
            total += m.mean() * abs(p[m].mean() - y[m].mean())
    assert ece(y, p, n_bins=n_bins) == pytest.approx(total, abs=1e-12)


# --------------------------------------------------------------------------- gauc


def _gauc_reference(y: np.ndarray, s: np.ndarray, g: np.ndarray) -> dict[str, float]:
    aucs, imps, clicks, skipped = [], [], [], 0
    for key in np.unique(g):
        m = g == key
        if len(np.unique(y[m])) < 2:
            skipped += 1
            continue
        aucs.append(roc_auc_score(y[m], s[m]))
        imps.append(m.sum())
        clicks.append(y[m].sum())
    a = np.array(aucs)
    return {
        "impressions": float(np.average(a, weights=imps)),
        "clicks": float(np.average(a, weights=clicks)),
        "uniform": float(a.mean()),
        "used": len(aucs),
        "skipped": skipped,
    }


@pytest.mark.parametrize("seed", range(3))
def test_gauc_matches_per_group_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 4000
    y, s = _data(n, seed, decimals=1)
    keys = rng.integers(-(10**15), 10**15, 300)  # sparse int64 keys
    freq = 1.0 / np.arange(1, 301) ** 1.5  # skewed sizes: some groups have 1-2 rows
    g = keys[rng.choice(300, size=n, p=freq / freq.sum())]
    ref = _gauc_reference(y, s, g)
    for weighting in ("impressions", "clicks", "uniform"):
        out = gauc(y, s, g, weighting=weighting)
        assert out["gauc"] == pytest.approx(ref[weighting], abs=1e-12)
        assert out["gauc_unweighted"] == pytest.approx(ref["uniform"], abs=1e-12)
        assert out["groups_used"] == ref["used"]
        assert out["groups_skipped"] == ref["skipped"]
    assert ref["skipped"] > 0 and ref["used"] > 20  # both paths exercised


def test_gauc_skips_single_class_groups() -> None:
    y = [1, 0, 1, 1, 0, 0, 1, 0]
    s = [0.9, 0.1, 0.5, 0.6, 0.3, 0.3, 0.2, 0.2]
    g = [7, 7, 3, 3, 5, 5, 9, 9]
    out = gauc(y, s, g)
    # group 7: 1.0; group 9: tie -> 0.5; groups 3 (all pos) and 5 (all neg) skipped
    assert out == {"gauc": 0.75, "gauc_unweighted": 0.75, "groups_used": 2, "groups_skipped": 2}
    none = gauc([1, 1], [0.1, 0.2], [1, 2])
    assert math.isnan(none["gauc"]) and none["groups_used"] == 0 and none["groups_skipped"] == 2
    with pytest.raises(ValueError, match="weighting"):
        gauc(y, s, g, weighting="views")
    with pytest.raises(ValueError, match="length"):
        gauc(y, s, g[:-1])
    with pytest.raises(ValueError, match="integer"):
        gauc(y, s, np.asarray(g, dtype=float))


def test_gauc_lexsort_fallback_matches_packed_path() -> None:
    rng = np.random.default_rng(5)
    y, s = _data(3000, 5, decimals=2)
    g = rng.integers(0, 200, y.size)
    yb = y.astype(bool)
    ranks = metrics_mod._dense_rank(g)
    packed = metrics_mod._gauc(yb, s, ranks, "impressions")
    fallback = metrics_mod._gauc(yb, s, ranks, "impressions", max_bits=4)  # forces np.lexsort
    assert packed == pytest.approx(fallback, abs=1e-15)
    assert packed["gauc"] == pytest.approx(_gauc_reference(y, s, g)["impressions"], abs=1e-12)


# --------------------------------------------------------------------------- bootstrap


def _layout(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows in the bootstrap's layout: negatives by score, then positives by score."""
    yb = y.astype(bool)
    order = np.concatenate(
        [np.flatnonzero(~yb)[np.argsort(s[~yb])], np.flatnonzero(yb)[np.argsort(s[yb])]]
    )
    return y[order], s[order]


def test_bootstrap_auc_deterministic_and_matches_naive_resampling() -> None:
    y, s = _data(800, 3, decimals=1)
    ci = bootstrap_ci(y, s, "auc", n_resamples=60, seed=42, method="multinomial")
    assert ci == bootstrap_ci(y, s, "auc", n_resamples=60, seed=42, method="multinomial")
    assert ci != bootstrap_ci(y, s, "auc", n_resamples=60, seed=43, method="multinomial")
    point = auc(y, s)
    assert ci[0] < point < ci[1]
    # The count-based resampling equals literally resampling rows (of the sorted layout,
    # which is a permutation of the rows: the bootstrap does not depend on row order).
    ly, ls = _layout(y, s)
    rng = np.random.default_rng(42)
    vals = []
    for _ in range(60):
        idx = rng.integers(0, y.size, y.size)
        vals.append(roc_auc_score(ly[idx], ls[idx]))
    lo, hi = np.quantile(vals, [0.025, 0.975])
    assert ci == pytest.approx((lo, hi), abs=1e-12)


def test_bootstrap_does_not_depend_on_row_order() -> None:
    y, s = _data(600, 8, decimals=2)
    perm = np.random.default_rng(0).permutation(y.size)
    out = metrics_mod.bootstrap(y, s, n_resamples=40, seed=5)
    assert out == metrics_mod.bootstrap(y[perm], s[perm], n_resamples=40, seed=5)


@pytest.mark.parametrize("method", ["multinomial", "poisson"])
def test_resampled_metrics_equal_weighted_sklearn(method: str) -> None:
    y, s = _data(1500, 4, decimals=2)
    s = np.clip(s, 0.01, 0.99)
    ly, ls = _layout(y, s)
    res = metrics_mod._Resampler(ly.astype(bool), ls, with_logloss=True)
    rng = np.random.default_rng(3)
    for _ in range(5):
        counts = metrics_mod._draw_counts(rng, y.size, method)
        a, ll = res.metrics(counts)
        assert a == pytest.approx(roc_auc_score(ly, ls, sample_weight=counts), abs=1e-12)
        assert ll == pytest.approx(log_loss(ly, ls, sample_weight=counts, labels=[0, 1]), rel=1e-10)


def test_poisson_counts_are_poisson_one() -> None:
    counts = metrics_mod._draw_counts(np.random.default_rng(0), 400_000, "poisson")
    freq = np.bincount(counts, minlength=5)[:5] / counts.size
    expected = [math.exp(-1) / math.factorial(k) for k in range(5)]
    assert freq == pytest.approx(expected, abs=3e-3)
    assert counts.mean() == pytest.approx(1.0, abs=5e-3)
    assert counts.var() == pytest.approx(1.0, abs=2e-2)
    # thresholds are increasing and the table reaches P(X >= 13) < 2^-32
    t = metrics_mod._POISSON_THRESHOLDS.astype(np.int64)
    assert (np.diff(t) > 0).all() and 2**32 - t[-1] < 2**32 * 1e-9


def test_bootstrap_both_metrics_share_resamples() -> None:
    y, p = _data(700, 6, decimals=2)
    p = np.clip(p, 0.01, 0.99)
    out = metrics_mod.bootstrap(y, p, n_resamples=50, seed=9)
    assert out["auc"] == bootstrap_ci(y, p, "auc", n_resamples=50, seed=9)
    assert out["logloss"] == bootstrap_ci(y, p, "logloss", n_resamples=50, seed=9)
    multi = metrics_mod.bootstrap(y, p, n_resamples=50, seed=9, method="multinomial")
    assert multi != out and multi["auc"][0] < auc(y, p) < multi["auc"][1]
    assert out["auc"][0] < auc(y, p) < out["auc"][1]
    with pytest.raises(ValueError, match="method"):
        metrics_mod.bootstrap(y, p, method="jackknife")


def test_bootstrap_logloss() -> None:
    y, p = _data(800, 4, decimals=2)
    p = np.clip(p, 0.01, 0.99)
    ci = bootstrap_ci(y, p, metric="logloss", n_resamples=80, alpha=0.1, seed=1)
    assert ci == bootstrap_ci(y, p, metric="logloss", n_resamples=80, alpha=0.1, seed=1)
    assert ci[0] < logloss(y, p) < ci[1]
    wide = bootstrap_ci(y, p, metric="logloss", n_resamples=80, alpha=0.01, seed=1)
    assert wide[0] <= ci[0] and wide[1] >= ci[1]


def test_bootstrap_edge_cases() -> None:
    assert all(math.isnan(v) for v in bootstrap_ci([1, 1, 1], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="metric"):
        bootstrap_ci([0, 1], [0.1, 0.2], metric="ece")
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([0, 1], [0.1, 0.2], alpha=1.5)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0, 1], [0.1, np.nan])
    # all-one-class input: every resample's AUC is undefined -> (nan, nan), logloss defined
    one = metrics_mod.bootstrap([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], n_resamples=10)
    assert all(math.isnan(v) for v in one["auc"])
    assert all(math.isfinite(v) for v in one["logloss"])
    assert all(math.isnan(v) for v in metrics_mod.bootstrap([], [], n_resamples=3)["auc"])


# --------------------------------------------------------------------------- curves


@pytest.mark.parametrize("decimals", [1, 3, None])
def test_roc_curve_matches_sklearn(decimals: int | None) -> None:
    from sklearn.metrics import roc_curve as sk_roc_curve

    y, s = _data(2000, 2, decimals=decimals)
    fpr, tpr, thr = metrics_mod.roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf
    # the trapezoid area under the points is the tie-aware AUC
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(y, s), abs=1e-12)


def test_roc_curve_edge_cases() -> None:
    fpr, tpr, thr = metrics_mod.roc_curve([1, 1], [0.2, 0.4])
    assert np.isnan(fpr).all() and tpr.tolist() == [0.0, 0.5, 1.0]
    fpr, tpr, thr = metrics_mod.roc_curve([], [])
    assert fpr.size == tpr.size == thr.size == 1


def test_reliability_bins_give_ece() -> None:
    y, p = _data(3000, 13, decimals=None)
    rel = metrics_mod.reliability(y, p, n_bins=15)
    ok = rel["count"] > 0
    assert rel["count"].sum() == y.size and rel["edges"].size == 16
    weighted_gap = rel["count"][ok] / y.size * np.abs(rel["mean_prob"][ok] - rel["mean_label"][ok])
    assert weighted_gap.sum() == pytest.approx(ece(y, p, n_bins=15), abs=1e-12)
    assert np.isnan(rel["mean_prob"][~ok]).all()
    # p = 1 falls in the last bin, p = 0 in the first
    edge = metrics_mod.reliability([1, 0], [1.0, 0.0], n_bins=4)
    assert edge["count"].tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="n_bins"):
        metrics_mod.reliability([1], [0.5], n_bins=0)


# --------------------------------------------------------------------------- task_metrics


def test_task_metrics() -> None:
    rng = np.random.default_rng(9)
    true = rng.random(2000) * 0.5
    y = (rng.random(2000) < true).astype(int)
    p = np.clip(true + rng.normal(0, 0.1, 2000), 0, 1)
    out = task_metrics(y, p, true_probs=true)
    assert set(out) == {"auc", "logloss", "calibration", "ece", "pos_rate", "rows", "oracle_auc"}
    assert out["auc"] == auc(y, p)
    assert out["oracle_auc"] == auc(y, true)
    assert out["oracle_auc"] > out["auc"]
    assert out["logloss"] == logloss(y, p)
    assert out["calibration"] == calibration(y, p)
    assert out["ece"] == ece(y, p)
    assert out["pos_rate"] == pytest.approx(y.mean())
    assert out["rows"] == 2000
    assert "oracle_auc" not in task_metrics(y, p)
    empty = task_metrics([], [])
    assert empty["rows"] == 0 and math.isnan(empty["auc"]) and math.isnan(empty["pos_rate"])


# --------------------------------------------------------------------------- ScoreCollector


def test_score_collector_matches_one_shot() -> None:
    rng = np.random.default_rng(12)
    n, t = 5000, 2
    true = rng.random((n, t)) * np.array([0.3, 0.6])
    y = (rng.random((n, t)) < true).astype(np.int64)
    p = np.round(np.clip(true + rng.normal(0, 0.05, (n, t)), 0, 1), 2)
    g = rng.integers(0, 300, n)
    col = ScoreCollector(initial_capacity=16)  # forces several doublings
    cuts = [0, 1, 700, 701, 2500, 4999, n]
    for a, b in itertools.pairwise(cuts):
        col.add(y[a:b].tolist(), p[a:b], true_probs=true[a:b], groups=g[a:b])
    assert len(col) == n and col.num_tasks == t
    out = col.compute(["ctr", "cvr"])
    assert list(out) == ["ctr", "cvr"]
    for j, name in enumerate(["ctr", "cvr"]):
        p32 = p[:, j].astype(np.float32)
        t32 = true[:, j].astype(np.float32)
        expected = task_metrics(y[:, j], p32, true_probs=t32) | gauc(y[:, j], p32, g)
        assert out[name] == expected
        # float32 storage stays close to the float64 one-shot result
        assert out[name]["auc"] == pytest.approx(auc(y[:, j], p[:, j]), abs=1e-12)
        assert out[name]["logloss"] == pytest.approx(logloss(y[:, j], p[:, j]), rel=1e-6)


def test_score_collector_1d_and_validation() -> None:
    col = ScoreCollector()
    assert math.isnan(col.compute(["ctr"])["ctr"]["auc"])
    col.add([0, 1, 1], [0.2, 0.7, 0.4])
    col.add(np.array([0]), np.array([0.5]))
    res = col.compute(["ctr"])["ctr"]
    assert res["rows"] == 4 and res["auc"] == auc([0, 1, 1, 0], [0.2, 0.7, 0.4, 0.5])
    assert "gauc" not in res and "oracle_auc" not in res
    with pytest.raises(ValueError, match="task"):
        col.compute(["ctr", "cvr"])
    with pytest.raises(ValueError, match="task columns"):
        col.add([[0, 1]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="true_probs"):
        col.add([1], [0.3], true_probs=[0.3])
    with pytest.raises(ValueError, match="0/1"):
        col.add([2], [0.3])
    with pytest.raises(ValueError, match="NaN"):
        col.add([1], [np.nan])
    with pytest.raises(ValueError, match="shape"):
        col.add([1, 0], [0.3])
    assert len(col) == 4  # failed batches leave the buffers untouched
    col.reset()
    assert len(col) == 0 and col.num_tasks is None
