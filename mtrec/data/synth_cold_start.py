"""The ``cold-start`` preset: time-ordered interactions where most test users are new.

Users and items arrive over time. Each user has an arrival time ``a_u ~ U(0, 1)``, a
power-law activity weight (Pareto, tail index :data:`USER_ACTIVITY_ALPHA`) and an active
span (exponential, mean :data:`USER_SPAN` for a median user, longer for heavy users); its
rows are spread uniformly over its span, so the newest rows mostly belong to users who
arrived after the training cut. Activity is capped, so no user dominates. Items live longer
(mean :data:`ITEM_LIFE`) with power-law popularity; a row draws its item among the items
alive at its time. Rows are sorted by time and split by time: oldest 80% train, next 10%
valid, newest 10% test (ordered by the ``ts`` column). At the default scale ~85-90% of test
rows carry a ``user_id`` never seen in training.

Tasks ``click`` and ``conversion`` (a conversion needs a click, as in ``criteo-like``):
``p_conversion = p_click * p_cvr``. Each latent logit is

    logit = bias + id_part(user_id, item_id) + side_part(side features)

``id_part`` is a per-user and a per-item random effect (knowable only for ids seen in
training); ``side_part`` generalises to new ids: user attributes (``gender``, ``region``,
``device``, ``user_age``), the item's ``item_category`` and ``item_price``, the ``hour`` of
the interaction and a low-rank user-attribute x category cross. The side part carries
:data:`SIDE_SHARE` of the logit variance, so a model leaning on ids loses on the new users
and one that uses the side features wins. ``p_click`` / ``p_conversion`` hold the true
probabilities (oracle AUC); ``p_click_cold`` / ``p_conversion_cold`` the probabilities
*without* the user's own effect (averaged over its prior); ``p_click_attainable`` /
``p_conversion_attainable`` the best a model trained on the train split can give: the true
probability averaged over the prior of every id (user, item) absent from the train split.
Their AUC on the test rows (``attainable_oracle_auc``, also on the rows of unseen users) is
the most any model can reach; the full oracle also knows the new ids' own effects.

Everything is vectorised NumPy over all rows at once (1M rows: a few seconds, ~200 MB);
the output is a deterministic function of ``(rows, seed, vocab_scale, num_tasks)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtrec.data import synthetic as _syn

__all__ = [
    "COLD_START_TASKS",
    "ITEM_LIFE",
    "SIDE_SHARE",
    "USER_ACTIVITY_ALPHA",
    "USER_SPAN",
    "oracle_knowing",
    "unseen_fraction",
    "write_cold_start",
]

COLD_START_TASKS = ("click", "conversion")
#: mean active span of a median-activity user (fraction of the whole time range)
USER_SPAN = 0.02
#: Pareto tail index of user activity (rows per user)
USER_ACTIVITY_ALPHA = 1.3
#: mean life of an item (fraction of the time range)
ITEM_LIFE = 0.25
#: share of each latent logit's variance carried by the side features
SIDE_SHARE = 0.6
_ROWS_PER_USER = 8
_ACTIVITY_CAP = 200.0
_SPAN_POWER = 0.7
_ROWS_PER_ITEM = 40
_CLICK_RATE, _CVR_RATE = 0.15, 0.2
_SIGMAS = (1.6, 1.4)  # logit std of click, cvr
_TIME_BINS = 200
_BIAS_ROWS = 65_536
_T0 = 1_700_000_000  # ts of time 0 (seconds); the range spans 90 days
_SPAN_SECONDS = 90 * 86_400
_REGIONS, _DEVICES, _GENDERS, _CATEGORIES = 200, 4, 3, 60
_CROSS_RANK = 3
_CODE = 3
_COLD_NODES = 24
_ITEM_EFFECT_STD = 0.7  # per-item effect std, relative to the per-user effect's 1


@dataclass
class _Rows:
    """All rows, sorted by time: raw columns and the two latent logits [n, 2]."""

    cols: dict[str, np.ndarray]
    latent: np.ndarray
    users: np.ndarray
    items: np.ndarray
    n_users: int
    n_items: int
    # the latent logits without the user's own effect [n, 2], and that effect's std [2]
    # (the user effects are N(0, 1) per user times this scale)
    cold_latent: np.ndarray
    user_scale: np.ndarray
    # each row's item effect in the latent logits [n, 2] (N(0, (0.7 * user_scale)^2))
    item_part: np.ndarray


@dataclass
class _Layout:
    """What :func:`mtrec.data.synthetic._config_dict` reads of a preset."""

    schema: Any
    tasks: list[str]
    groups: dict[str, list[str]] = field(default_factory=dict)


def _activity(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
    # capped so that no single user carries a visible share of the test split
    w = np.minimum(rng.pareto(alpha, n) + 1.0, _ACTIVITY_CAP)
    return w / w.sum()


def _standardised(x: np.ndarray, std: float) -> np.ndarray:
    s = float(x.std())
    return (x - float(x.mean())) * (std / s if s > 0 else 0.0)


def _generate(rows: int, seed: int, vocab_scale: float) -> _Rows:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _CODE]))
    n_users = max(10, round(rows / _ROWS_PER_USER * vocab_scale))
    n_items = max(10, round(rows / _ROWS_PER_ITEM * vocab_scale))

    # users: arrival, span, activity -> rows per user and row times
    arrival = rng.random(n_users)
    activity = _activity(rng, n_users, USER_ACTIVITY_ALPHA)
    # heavy users stay longer (span grows as activity^0.7): the few returning users
    span = rng.exponential(USER_SPAN, n_users) * (activity / np.median(activity)) ** _SPAN_POWER
    span = np.minimum(span, 1.0 - arrival)
    counts = rng.multinomial(rows, activity)
    user_of_row = np.repeat(np.arange(n_users), counts)
    t = arrival[user_of_row] + span[user_of_row] * rng.random(rows)
    order = np.argsort(t, kind="stable")
    t, user_of_row = t[order], user_of_row[order]

    # items: alive in [birth, birth + life); each time bin draws from its alive items
    birth = rng.uniform(-0.3, 1.0, n_items)
    death = birth + rng.exponential(ITEM_LIFE, n_items)
    popularity = rng.pareto(1.2, n_items) + 1.0
    item_of_row = np.empty(rows, dtype=np.int64)
    edges = np.searchsorted(t, np.linspace(0.0, 1.0, _TIME_BINS + 1)[1:-1])
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [rows]])
    for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
        if e <= s:
            continue
        mid = (k + 0.5) / _TIME_BINS
        alive = np.flatnonzero((birth <= mid) & (death > mid))
        if alive.size == 0:
            alive = np.arange(n_items)
        p = popularity[alive] / popularity[alive].sum()
        item_of_row[s:e] = alive[np.searchsorted(np.cumsum(p), rng.random(e - s) * 0.999999)]

    # side attributes: per user, per item, per row
    gender = rng.integers(0, _GENDERS, n_users)
    region = _syn._zipf_ranks(rng, n_users, _REGIONS, 1.1)
    device = rng.integers(0, _DEVICES, n_users)
    age = np.clip(rng.normal(35.0, 11.0, n_users), 16.0, 80.0)
    category = _syn._zipf_ranks(rng, n_items, _CATEGORIES, 1.05)
    cat_price = rng.normal(3.0, 0.8, _CATEGORIES)
    price = np.exp(cat_price[category] + rng.normal(0.0, 0.5, n_items))
    hour = (24.0 * ((t * _SPAN_SECONDS / 86_400) % 1.0) + rng.normal(0.0, 0.5, rows)) % 24.0

    u, i = user_of_row, item_of_row
    age_z = (age[u] - 35.0) / 11.0
    price_z = (np.log(price[i]) - 3.0) / 0.9
    latent = np.empty((rows, 2))
    cold_latent = np.empty((rows, 2))
    item_part = np.empty((rows, 2))
    user_scale = np.zeros(2)
    for j in range(2):
        # side part: per-value effects, smooth numeric effects, a user x category cross
        eff = {
            "g": rng.normal(0.0, 0.4, _GENDERS),
            "r": rng.normal(0.0, 0.5, _REGIONS),
            "d": rng.normal(0.0, 0.4, _DEVICES),
            "c": rng.normal(0.0, 0.8, _CATEGORIES),
        }
        user_vec = rng.normal(0.0, 0.6, (_GENDERS, _CROSS_RANK))[gender[u]] + np.outer(
            np.tanh(age_z), rng.normal(0.0, 0.8, _CROSS_RANK)
        )
        cat_vec = rng.normal(0.0, 0.8, (_CATEGORIES, _CROSS_RANK))[category[i]]
        a_age, a_price, a_hour = rng.uniform(0.3, 0.8, 3)
        side = (
            eff["g"][gender[u]]
            + eff["r"][region[u]]
            + eff["d"][device[u]]
            + eff["c"][category[i]]
            + a_age * np.sin(1.3 * age_z + rng.uniform(0, math.pi))
            - (a_price if j else 0.5 * a_price) * np.tanh(1.5 * price_z)
            + a_hour * np.cos(2.0 * math.pi * (hour - rng.uniform(0, 24)) / 24.0)
            + np.einsum("ij,ij->i", user_vec, cat_vec)
        )
        user_eff = rng.normal(0.0, 1.0, n_users)[u]
        ids = user_eff + rng.normal(0.0, _ITEM_EFFECT_STD, n_items)[i]
        sigma = _SIGMAS[j]
        id_std = float(ids.std())
        user_scale[j] = sigma * math.sqrt(1.0 - SIDE_SHARE) / id_std if id_std > 0 else 0.0
        latent[:, j] = (
            _standardised(side, sigma * math.sqrt(SIDE_SHARE))
            + (ids - float(ids.mean())) * user_scale[j]
        )
        cold_latent[:, j] = latent[:, j] - user_scale[j] * user_eff
        item_part[:, j] = user_scale[j] * (ids - user_eff)

    # stored ids: a fixed per-seed permutation, so id order says nothing about arrival
    user_ids = rng.permutation(n_users).astype(np.int64) + 1
    item_ids = rng.permutation(n_items).astype(np.int64) + 1
    cols = {
        "ts": (_T0 + t * _SPAN_SECONDS).astype(np.int64),
        "user_id": user_ids[u],
        "item_id": item_ids[i],
        "gender": gender[u].astype(np.int64),
        "region": region[u].astype(np.int64),
        "device": device[u].astype(np.int64),
        "item_category": category[i].astype(np.int64),
        "user_age": np.round(age[u], 1),
        "item_price": np.round(price[i], 2),
        "hour": np.round(hour, 3),
    }
    return _Rows(cols, latent, u, i, n_users, n_items, cold_latent, user_scale, item_part)


def _labels(
    latent: np.ndarray, seed: int, num_tasks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Biases [2] for the target rates (fitted on a fixed subsample), then 0/1 labels and
    true probabilities [n, num_tasks]."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _CODE, 1]))
    sub = latent[rng.choice(len(latent), min(len(latent), _BIAS_ROWS), replace=False)]
    b_click = _syn._bias_for_rates(sub[:, :1], np.array([_CLICK_RATE]))
    p_sub = _syn._sigmoid(sub[:, :1] + b_click)
    # the conversion target is marginal: mean(p_click * p_cvr) = click rate * cvr
    b_cvr = _syn._bias_for_rates(sub[:, 1:], np.array([_CLICK_RATE * _CVR_RATE]), weights=p_sub)
    bias = np.concatenate([b_click, b_cvr])
    p = _syn._sigmoid(latent + bias)
    draw = rng.random(p.shape)
    click = draw[:, 0] < p[:, 0]
    conversion = click & (draw[:, 1] < p[:, 1])
    labels = np.stack([click, conversion], axis=1).astype(np.int64)
    probs = np.stack([p[:, 0], p[:, 0] * p[:, 1]], axis=1)
    return labels[:, :num_tasks], probs[:, :num_tasks], bias


def _expected_probs(base: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``E[sigmoid(base + scale * x)]`` for ``x ~ N(0, 1)`` per row and logit [n, 2]
    (Gauss-Hermite, 24 nodes); ``scale`` broadcasts against ``base``."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(_COLD_NODES)
    weights = weights / weights.sum()
    p = np.zeros_like(base)
    for x, w in zip(nodes, weights, strict=True):
        p += w * _syn._sigmoid(base + scale * x)
    return p


def _task_probs(p: np.ndarray, num_tasks: int) -> np.ndarray:
    # the click and cvr effects are independent, so E[p_click * p_cvr] = E[p_click] E[p_cvr]
    return np.stack([p[:, 0], p[:, 0] * p[:, 1]], axis=1)[:, :num_tasks]


def _cold_probs(rows: _Rows, bias: np.ndarray, num_tasks: int) -> np.ndarray:
    """The best probabilities without the user id [n, num_tasks]: the true probability
    averaged over the user-effect prior."""
    return _task_probs(_expected_probs(rows.cold_latent + bias, rows.user_scale), num_tasks)


def _attainable_probs(rows: _Rows, bias: np.ndarray, num_tasks: int, train_rows: int) -> np.ndarray:
    """The best probabilities a model trained on the first ``train_rows`` rows can give
    [n, num_tasks]: the true probability averaged over the prior of the effect of every id
    (user, item) absent from those rows."""
    new_user = ~np.isin(rows.users, rows.users[:train_rows])
    new_item = ~np.isin(rows.items, rows.items[:train_rows])
    return _probs_without(rows, bias, num_tasks, new_user, new_item)


def _probs_without(
    rows: _Rows, bias: np.ndarray, num_tasks: int, new_user: np.ndarray, new_item: np.ndarray
) -> np.ndarray:
    """The true probability [n, num_tasks] averaged over the prior of the user effect where
    ``new_user`` [n] and of the item effect where ``new_item`` [n]. The user and item effects
    are independent normals, so their sum is one normal of variance
    ``user_scale^2 (new_user + 0.7^2 new_item)``."""
    base = rows.latent + bias
    base = base - new_user[:, None] * (rows.latent - rows.cold_latent)
    base = base - new_item[:, None] * rows.item_part
    var = new_user + _ITEM_EFFECT_STD**2 * new_item
    scale = rows.user_scale[None, :] * np.sqrt(var)[:, None]
    return _task_probs(_expected_probs(base, scale), num_tasks)


def oracle_knowing(
    rows: int, seed: int, known: Sequence[tuple[int, int]], vocab_scale: float = 1.0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Test labels [n_test, 2] and, for each ``(user_min_rows, item_min_rows)`` of
    ``known``, the best test probabilities [n_test, 2] of a learner that knows the effect
    of every user with at least ``user_min_rows`` training rows and of every item with at
    least ``item_min_rows``, and only the prior of the others; the rest of the logit (side
    features, bias) is known. ``(1, 1)`` is ``p_<task>_attainable``; ``(20, 20)`` what a
    ``min_count: 20`` filter leaves knowable; a count above the rows (e.g. ``rows + 1``)
    knows none of that kind. Regenerates the preset's rows once (the output is a
    deterministic function of the arguments; 1M rows: a few seconds)."""
    data = _generate(rows, seed, vocab_scale)
    labels, _, bias = _labels(data.latent, seed, 2)
    sizes = _syn._split_sizes(rows)
    train = sizes["train"]
    user_rows = np.bincount(data.users[:train], minlength=data.n_users)[data.users]
    item_rows = np.bincount(data.items[:train], minlength=data.n_items)[data.items]
    test = slice(train + sizes["valid"], rows)
    probs = [
        _probs_without(data, bias, 2, user_rows < users, item_rows < items)[test]
        for users, items in known
    ]
    return labels[test], probs


def unseen_fraction(train_ids: np.ndarray, test_ids: np.ndarray) -> float:
    """Share of ``test_ids`` rows whose id does not occur in ``train_ids``."""
    if test_ids.size == 0:
        return float("nan")
    return float(np.mean(~np.isin(test_ids, np.unique(train_ids))))


def _layout(n_users: int, n_items: int, tasks: list[str]) -> _Layout:
    vocab = {
        "user_id": n_users,
        "item_id": n_items,
        "gender": _GENDERS,
        "region": _REGIONS,
        "device": _DEVICES,
        "item_category": _CATEGORIES,
    }
    cats = [_syn._CatSpec(name, v, 1.0, 0.0, 1, 0) for name, v in vocab.items()]
    nums = [
        _syn._NumSpec("user_age", "normal", 35.0, 11.0),
        _syn._NumSpec("item_price", "lognormal", 3.0, 0.9, transform="log1p_standardize"),
        _syn._NumSpec("hour", "uniform", 0.0, 24.0),
    ]
    return _Layout(schema=_syn._Schema(cats=cats, nums=nums), tasks=tasks)


def write_cold_start(
    tmp: Path, rows: int, seed: int, vocab_scale: float, num_tasks: int
) -> tuple[dict[str, Any], _Layout]:
    """Write the three splits into ``tmp``; return the summary fields and the layout."""
    data = _generate(rows, seed, vocab_scale)
    labels, probs, bias = _labels(data.latent, seed, num_tasks)
    cold = _cold_probs(data, bias, num_tasks)
    tasks = list(COLD_START_TASKS[:num_tasks])
    sizes = _syn._split_sizes(rows)
    attainable = _attainable_probs(data, bias, num_tasks, sizes["train"])
    bounds = {"train": (0, sizes["train"])}
    bounds["valid"] = (sizes["train"], sizes["train"] + sizes["valid"])
    bounds["test"] = (bounds["valid"][1], rows)
    for split, (s, e) in bounds.items():
        cols: dict[str, pa.Array] = {k: pa.array(v[s:e]) for k, v in data.cols.items()}
        for t, name in enumerate(tasks):
            cols[name] = pa.array(labels[s:e, t], type=pa.int64())
        for t, name in enumerate(tasks):
            cols[f"p_{name}"] = pa.array(probs[s:e, t], type=pa.float64())
        for t, name in enumerate(tasks):
            cols[f"p_{name}_cold"] = pa.array(cold[s:e, t], type=pa.float64())
        for t, name in enumerate(tasks):
            cols[f"p_{name}_attainable"] = pa.array(attainable[s:e, t], type=pa.float64())
        pq.write_table(
            pa.table(cols),
            tmp / f"{split}.parquet",
            row_group_size=_syn.ROW_GROUP_ROWS,
            compression="zstd",
        )
    s, e = bounds["test"]
    tr = bounds["train"][1]
    new = s + np.flatnonzero(~np.isin(data.users[s:e], data.users[:tr]))
    summary = {
        "splits": sizes,
        "positive_rate": {t: float(labels[:, j].mean()) for j, t in enumerate(tasks)},
        "oracle_auc": {
            t: _syn.oracle_auc(labels[s:e, j], probs[s:e, j]) for j, t in enumerate(tasks)
        },
        # the best AUC on test rows of users unseen in training: without the user's effect
        "cold_user_oracle_auc": {
            t: _syn.oracle_auc(labels[new, j], cold[new, j]) for j, t in enumerate(tasks)
        },
        # the best AUC on all test rows of a model trained on the train split: ids unseen
        # in training contribute only their prior (p_<task>_attainable)
        "attainable_oracle_auc": {
            t: _syn.oracle_auc(labels[s:e, j], attainable[s:e, j]) for j, t in enumerate(tasks)
        },
        "attainable_oracle_auc_unseen": {
            t: _syn.oracle_auc(labels[new, j], attainable[new, j]) for j, t in enumerate(tasks)
        },
        "unseen_test_fraction": {
            "user_id": unseen_fraction(data.users[:tr], data.users[s:e]),
            "item_id": unseen_fraction(data.items[:tr], data.items[s:e]),
        },
    }
    return summary, _layout(data.n_users, data.n_items, tasks)
