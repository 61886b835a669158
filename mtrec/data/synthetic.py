"""Planted multi-task CTR data with a known optimum.

:func:`synthesize` writes ``train.parquet`` / ``valid.parquet`` / ``test.parquet``
(an 80/10/10 split) and a ready-to-train ``config.yaml`` into one directory. Every
row carries, beside its features and 0/1 labels, the *true* probability of each
label (``p_<task>`` columns), so the Bayes-optimal ("oracle") AUC of each task is
known and can be printed beside a model's.

Three presets:

``default`` (the quick-start demo)
    ``user_id`` (Zipf over ~10k users, also the GAUC group key), eight Zipf
    categorical features ``c0..c7`` with vocabularies from 10 to 10^6, a multi-hot
    ``tags`` list (0..5 tokens from a Zipf vocabulary of 1000) and four numeric
    features ``n0..n3`` (``n1`` lognormal, ``n3`` gamma). Tasks ``click``, ``like``,
    ``share``, ``follow`` (``num_tasks`` of them) in two groups: the first half is
    group ``engage_a``, the second half ``engage_b``. The hidden teacher is::

        logit_t(x) = bias_t + shared(x) + group_g(t)(x) + own_t(x)

    where each component is a sum of per-feature per-value effects (random normal
    per value, decaying with the value's frequency rank so that rare values carry
    little and the optimum is learnable from ~160k rows), low-rank pairwise crosses
    over frequent values, smooth non-linear numeric effects (sine + threshold) and
    the mean of per-token multi-hot effects. Shared / group / own carry 40% / 30% /
    30% of each task's logit variance.

``criteo-like`` (scale and speed benchmarks)
    13 skewed non-negative counts ``I1..I13`` (Float64, 5-10% nulls) and 26 Zipf
    categorical features ``C1..C26`` (Int64, 0-4% nulls) whose nominal vocabularies
    (:func:`criteo_like_vocab_sizes`) span 10 to 10^6 values, 3.7M in total. Tasks
    ``click`` (~22% positive) and ``conversion`` (~4%): a conversion needs a click,
    ``p_conversion = p_click * p_cvr``, with ``p_cvr`` sharing a teacher component
    with ``p_click``.

``cold-start`` (generalisation to new users, issue #16)
    Time-ordered interactions split by time (column ``ts``): users and items arrive over
    time with power-law activity, so ~85-90% of test rows carry a ``user_id`` unseen in
    training; labels depend on per-id effects and on side features that generalise. See
    :mod:`mtrec.data.synth_cold_start` (it holds all rows in memory).

The other presets are vectorised NumPy written in chunks of :data:`CHUNK_ROWS` rows
(parquet row groups of at most :data:`ROW_GROUP_ROWS`), so memory stays bounded
whatever ``rows`` is. Output is a deterministic function of ``(rows, seed, preset,
vocab_scale, num_tasks)`` (and the fixed :data:`CHUNK_ROWS`): every chunk of every split
draws from its own seeded stream. Files are
written into a temporary directory beside the targets and renamed into place only
when all of them are complete.

Categorical values are Zipf-distributed over ranks ``r = 0..V-1`` with
``P(r) ∝ (r + 1)^(1-s) - (r + 2)^(1-s)`` (a discretised power law, tail
``∝ r^-s``), drawn by inverting its CDF in closed form. The stored id of rank
``r`` is ``(a * r + b) mod V`` for a per-feature ``a`` coprime to ``V``, so ids are
not sorted by frequency.

Example::

    summary = synthesize("demo_out/data", rows=200_000, seed=0)
    summary["oracle_auc"]  # {'click': 0.8..., 'like': ..., 'share': ..., 'follow': ...}
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

__all__ = [
    "CHUNK_ROWS",
    "CRITEO_LIKE_NOMINAL_VOCABS",
    "DEFAULT_TASK_NAMES",
    "LARGE_BATCH_ROWS",
    "ROW_GROUP_ROWS",
    "SPLITS",
    "batch_size_for",
    "criteo_like_vocab_sizes",
    "default_vocab_sizes",
    "oracle_auc",
    "synthesize",
]

Preset = Literal["default", "criteo-like", "cold-start"]

#: rows generated (and held in memory) at a time
CHUNK_ROWS = 262_144
#: maximum rows per parquet row group
ROW_GROUP_ROWS = 131_072
#: split names and their share of ``rows``
SPLITS: tuple[tuple[str, float], ...] = (("train", 0.8), ("valid", 0.1), ("test", 0.1))
#: task names of the default preset (further tasks are called ``task4``, ``task5``, ...)
DEFAULT_TASK_NAMES = ("click", "like", "share", "follow")

#: nominal vocabulary sizes of ``C1..C26`` (criteo-like), 3.7M values in total
CRITEO_LIKE_NOMINAL_VOCABS: tuple[int, ...] = (
    1_460, 583, 1_000_000, 600_000, 305, 24, 12_517, 633, 10, 93_145, 5_683, 800_000, 3_194,
    27, 14_992, 500_000, 10, 5_652, 2_173, 10, 230_691, 18, 15, 286_181, 105, 142_572,
)  # fmt: skip

_DEFAULT_CAT_VOCABS: dict[str, int] = {
    "c0": 10,
    "c1": 40,
    "c2": 200,
    "c3": 1_000,
    "c4": 5_000,
    "c5": 30_000,
    "c6": 200_000,
    "c7": 1_000_000,
}
_DEFAULT_CAT_EXPONENTS = (1.10, 1.20, 1.15, 1.10, 1.20, 1.15, 1.10, 1.15)
_USER_VOCAB = 10_000
_TAG_VOCAB = 1_000
_MAX_TAGS = 5

# default preset: per-task target positive rate and logit standard deviation
_DEFAULT_RATES = (0.35, 0.15, 0.05, 0.10)
_DEFAULT_SIGMAS = (1.4, 1.5, 1.6, 1.5)
# variance shares of the shared / group / own components of each task logit
_SHARE_SHARED, _SHARE_GROUP, _SHARE_OWN = 0.4, 0.3, 0.3

# criteo-like: click rate, conversion rate (marginal) and logit standard deviations
_CRITEO_CLICK_RATE, _CRITEO_CONV_RATE = 0.22, 0.04
_CRITEO_SIGMAS = (1.4, 1.2)

# effects are defined for the HEAD most frequent values; value rank r gets an effect of
# standard deviation (1 + r / DECAY)^-POWER (rarer values carry little), ranks >= HEAD none.
# The decay keeps the planted signal on values frequent enough to be learnt from the
# default 200k rows (a value must be seen ~100+ times before its effect on a 5%-positive
# task rises above the sampling noise), so a good model can approach the oracle.
_EFFECT_HEAD = 5_000
_EFFECT_DECAY = 5.0
_EFFECT_POWER = 1.5
_CROSS_HEAD = 1_000
_CROSS_DECAY = 5.0
_CROSS_RANK = 4
_CALIBRATION_ROWS = 65_536
_PRESET_CODE = {"default": 1, "criteo-like": 2, "cold-start": 3}


def _scaled(v: int, vocab_scale: float) -> int:
    return max(2, round(v * vocab_scale))


def criteo_like_vocab_sizes(vocab_scale: float = 1.0) -> list[int]:
    """Nominal vocabulary sizes of ``C1..C26`` of the criteo-like preset.

    Each of :data:`CRITEO_LIKE_NOMINAL_VOCABS` times ``vocab_scale`` (at least 2);
    about ``3.7e6 * vocab_scale`` in total.
    """
    _check_scale(vocab_scale)
    return [_scaled(v, vocab_scale) for v in CRITEO_LIKE_NOMINAL_VOCABS]


def default_vocab_sizes(vocab_scale: float = 1.0) -> dict[str, int]:
    """Vocabulary sizes of the default preset's categorical / multi-hot features."""
    _check_scale(vocab_scale)
    sizes = {"user_id": _scaled(_USER_VOCAB, vocab_scale)}
    sizes.update({k: _scaled(v, vocab_scale) for k, v in _DEFAULT_CAT_VOCABS.items()})
    sizes["tags"] = _scaled(_TAG_VOCAB, vocab_scale)
    return sizes


def _check_scale(vocab_scale: float) -> None:
    if not (isinstance(vocab_scale, (int, float)) and math.isfinite(vocab_scale)):
        raise ValueError(f"vocab_scale must be a finite number, got {vocab_scale!r}")
    if vocab_scale <= 0:
        raise ValueError(f"vocab_scale must be > 0, got {vocab_scale}")


# ------------------------------------------------------------------------------ features


@dataclass
class _CatSpec:
    """A Zipf categorical feature: ranks in [0, vocab), id = (mul * rank + add) mod vocab."""

    name: str
    vocab: int
    exponent: float
    null_rate: float
    mul: int
    add: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Ranks (int64), -1 where null."""
        ranks = _zipf_ranks(rng, n, self.vocab, self.exponent)
        if self.null_rate > 0:
            ranks[rng.random(n) < self.null_rate] = -1
        return ranks

    def ids(self, ranks: np.ndarray) -> pa.Array:
        ids = (ranks * self.mul + self.add) % self.vocab
        return pa.array(ids, type=pa.int64(), mask=ranks < 0 if self.null_rate > 0 else None)


@dataclass
class _NumSpec:
    """A numeric feature; ``z`` is its natural standardised scale the teacher works on."""

    name: str
    kind: Literal["normal", "lognormal", "uniform", "gamma", "count"]
    a: float
    b: float
    null_rate: float = 0.0
    zero_rate: float = 0.0
    transform: Literal["standardize", "log1p_standardize"] = "standardize"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Values (float64), NaN where null."""
        if self.kind == "normal":
            x = rng.normal(self.a, self.b, n)
        elif self.kind == "lognormal":
            x = rng.lognormal(self.a, self.b, n)
        elif self.kind == "uniform":
            x = rng.uniform(self.a, self.b, n)
        elif self.kind == "gamma":
            x = rng.gamma(self.a, self.b, n)
        else:  # zero-inflated floor(lognormal) counts
            x = np.floor(rng.lognormal(self.a, self.b, n))
            x[rng.random(n) < self.zero_rate] = 0.0
        if self.null_rate > 0:
            x[rng.random(n) < self.null_rate] = np.nan
        return x

    def z(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "normal":
            return (x - self.a) / self.b
        if self.kind == "lognormal":
            return (np.log(x) - self.a) / self.b
        if self.kind == "uniform":
            return (x - 0.5 * (self.a + self.b)) / ((self.b - self.a) / math.sqrt(12.0))
        if self.kind == "gamma":
            return (x - self.a * self.b) / (math.sqrt(self.a) * self.b)
        return (np.log1p(x) - self.a) / self.b


@dataclass
class _Chunk:
    """Raw features of a block of rows: categorical ranks, numerics, multi-hot tokens."""

    n: int
    ranks: dict[str, np.ndarray]
    nums: dict[str, np.ndarray]
    tag_counts: np.ndarray | None = None
    tag_ranks: np.ndarray | None = None


def _zipf_ranks(rng: np.random.Generator, n: int, vocab: int, s: float) -> np.ndarray:
    """Discretised power law on ranks 0..vocab-1 by closed-form CDF inversion."""
    u = rng.random(n)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * math.log(vocab + 1.0))
    else:
        e = 1.0 - s
        top = (vocab + 1.0) ** e - 1.0
        x = (1.0 + u * top) ** (1.0 / e)
    ranks = x.astype(np.int64) - 1
    np.clip(ranks, 0, vocab - 1, out=ranks)
    return ranks


def _coprime_multiplier(rng: np.random.Generator, vocab: int) -> int:
    if vocab <= 2:
        return 1
    while True:
        a = int(rng.integers(1, vocab))
        if math.gcd(a, vocab) == 1:
            return a


@dataclass
class _Schema:
    """The features of a preset and how a chunk of them is sampled and stored."""

    cats: list[_CatSpec]
    nums: list[_NumSpec]
    tag_spec: _CatSpec | None = None

    def sample(self, rng: np.random.Generator, n: int) -> _Chunk:
        ranks = {c.name: c.sample(rng, n) for c in self.cats}
        nums = {f.name: f.sample(rng, n) for f in self.nums}
        chunk = _Chunk(n=n, ranks=ranks, nums=nums)
        if self.tag_spec is not None:
            counts = rng.integers(0, _MAX_TAGS + 1, n)
            chunk.tag_counts = counts
            chunk.tag_ranks = self.tag_spec.sample(rng, int(counts.sum()))
        return chunk

    def feature_arrays(self, chunk: _Chunk) -> dict[str, pa.Array]:
        cols: dict[str, pa.Array] = {}
        for c in self.cats:
            cols[c.name] = c.ids(chunk.ranks[c.name])
        if self.tag_spec is not None:
            assert chunk.tag_counts is not None and chunk.tag_ranks is not None
            offsets = np.zeros(chunk.n + 1, dtype=np.int32)
            np.cumsum(chunk.tag_counts, out=offsets[1:])
            cols["tags"] = pa.ListArray.from_arrays(
                pa.array(offsets), self.tag_spec.ids(chunk.tag_ranks)
            )
        for f in self.nums:
            x = chunk.nums[f.name]
            cols[f.name] = pa.array(x, type=pa.float64(), mask=np.isnan(x) if f.null_rate else None)
        return cols


# ------------------------------------------------------------------------------- teacher


@dataclass
class _Term:
    """One additive effect of the teacher, evaluated to one value per row."""

    kind: Literal["main", "cross", "num", "tags"]
    component: int
    weight: float
    feature: str = ""
    feature_b: str = ""
    table: np.ndarray | None = None  # main/tags: [H + 2] (tail, null); cross: [H + 1, k]
    table_b: np.ndarray | None = None  # cross only
    params: tuple[float, ...] = ()  # num: a, w, phi, b, c, tau, null_effect

    def evaluate(self, chunk: _Chunk, nums: dict[str, _NumSpec]) -> np.ndarray:
        if self.kind == "main":
            assert self.table is not None
            return self.table[_table_index(chunk.ranks[self.feature], len(self.table) - 2)]
        if self.kind == "cross":
            assert self.table is not None and self.table_b is not None
            ia = _cross_index(chunk.ranks[self.feature], len(self.table) - 1)
            ib = _cross_index(chunk.ranks[self.feature_b], len(self.table_b) - 1)
            return np.einsum("ij,ij->i", self.table[ia], self.table_b[ib])
        if self.kind == "num":
            a, w, phi, b, c, tau, null_effect = self.params
            z = nums[self.feature].z(chunk.nums[self.feature])
            v = a * np.sin(w * z + phi) + b * np.tanh(c * (z - tau))
            return np.where(np.isnan(v), null_effect, v)
        assert self.table is not None
        return _tag_means(chunk, self.table[:, None])[:, 0]


def _table_index(ranks: np.ndarray, head: int) -> np.ndarray:
    """Row of an effect table: the rank if < head, ``head`` (tail) else, ``head+1`` if null."""
    return np.where(ranks < 0, head + 1, np.minimum(ranks, head))


def _cross_index(ranks: np.ndarray, head: int) -> np.ndarray:
    """Row of a cross factor table; nulls and ranks >= head share the zero row ``head``."""
    return np.where(ranks < 0, head, np.minimum(ranks, head))


def _tag_means(chunk: _Chunk, table: np.ndarray) -> np.ndarray:
    """Mean over each row's tokens of ``table[token]`` ([V + 2, L]); 0 for rows without tokens."""
    assert chunk.tag_counts is not None and chunk.tag_ranks is not None
    counts = chunk.tag_counts
    out = np.zeros((chunk.n, table.shape[1]))
    if chunk.tag_ranks.size == 0:
        return out
    values = table[_table_index(chunk.tag_ranks, table.shape[0] - 2)]
    starts = np.zeros(chunk.n, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    nonempty = counts > 0
    out[nonempty] = np.add.reduceat(values, starts[nonempty], axis=0)
    out[nonempty] /= counts[nonempty, None]
    return out


def _effect_table(rng: np.random.Generator, vocab: int, with_null: bool) -> np.ndarray:
    """Per-value effects over the head ranks, then a zero tail row and a null row."""
    head = min(vocab, _EFFECT_HEAD)
    scale = (1.0 + np.arange(head) / _EFFECT_DECAY) ** -_EFFECT_POWER
    table = np.zeros(head + 2)
    table[:head] = rng.normal(0.0, 1.0, head) * scale
    if with_null:
        table[head + 1] = rng.normal(0.0, 1.0)
    return table


def _cross_table(rng: np.random.Generator, vocab: int) -> np.ndarray:
    head = min(vocab, _CROSS_HEAD)
    scale = (1.0 + np.arange(head) / _CROSS_DECAY) ** -_EFFECT_POWER
    table = np.zeros((head + 1, _CROSS_RANK))
    table[:head] = rng.normal(0.0, 1.0, (head, _CROSS_RANK)) * scale[:, None]
    return table


def _cross_term(
    rng: np.random.Generator, comp: int, cat_names: list[str], vocab_of: dict[str, int]
) -> _Term:
    """A low-rank pairwise cross between two distinct random categorical features."""
    fa, fb = (cat_names[i] for i in rng.choice(len(cat_names), 2, replace=False))
    table_a, table_b = _cross_table(rng, vocab_of[fa]), _cross_table(rng, vocab_of[fb])
    return _Term("cross", comp, 0.8, fa, fb, table=table_a, table_b=table_b)


def _num_params(rng: np.random.Generator) -> tuple[float, ...]:
    return (
        float(rng.normal()),  # sine amplitude
        float(rng.uniform(0.8, 2.0)),  # frequency
        float(rng.uniform(0.0, 2 * math.pi)),  # phase
        float(rng.normal()),  # threshold amplitude
        float(rng.uniform(1.0, 4.0)),  # threshold sharpness
        float(rng.normal(0.0, 0.7)),  # threshold position
        float(rng.normal()),  # effect of a null value
    )


@dataclass
class _Teacher:
    """``L`` latent logits: ``bias + sum_terms outer(value_term, coef_term)``.

    Per-value effects of one feature (over all components) are folded into one
    ``[H + 2, L]`` table, multi-hot token effects into one ``[V + 2, L]`` table.
    """

    bias: np.ndarray
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    tag_table: np.ndarray | None = None
    terms: list[tuple[_Term, np.ndarray]] = field(default_factory=list)

    def logits(self, chunk: _Chunk, nums: dict[str, _NumSpec]) -> np.ndarray:
        out = np.tile(self.bias, (chunk.n, 1))
        for name, table in self.tables.items():
            out += table[_table_index(chunk.ranks[name], table.shape[0] - 2)]
        if self.tag_table is not None:
            out += _tag_means(chunk, self.tag_table)
        for term, coef in self.terms:
            out += term.evaluate(chunk, nums)[:, None] * coef
        return out


def _fit_teacher(
    terms: list[_Term],
    alpha: np.ndarray,
    sigmas: np.ndarray,
    calib: _Chunk,
    nums: dict[str, _NumSpec],
    solve_bias: Callable[[np.ndarray], np.ndarray],
) -> _Teacher:
    """Scale the terms on a calibration sample and fold them into a :class:`_Teacher`.

    Each term is centred and scaled to standard deviation ``weight``; each component
    (sum of its terms) to unit standard deviation; latent logit ``l`` is
    ``sum_c alpha[l, c] * component_c``, rescaled to standard deviation ``sigmas[l]``;
    ``solve_bias`` then picks the biases from the centred calibration logits.
    """
    n_comp = alpha.shape[1]
    comps = np.zeros((calib.n, n_comp))
    stats = []
    for term in terms:
        v = term.evaluate(calib, nums)
        mean, std = float(v.mean()), float(v.std())
        std = std if std > 1e-12 else 1.0
        comps[:, term.component] += (v - mean) * (term.weight / std)
        stats.append((mean, std))
    comp_std = comps.std(axis=0)
    comp_std[comp_std < 1e-12] = 1.0
    latent = (comps / comp_std) @ alpha.T
    lat_std = latent.std(axis=0)
    lat_std[lat_std < 1e-12] = 1.0
    mix = alpha * (sigmas / lat_std)[:, None] / comp_std[None, :]  # [L, C]
    offset = np.zeros(alpha.shape[0])
    teacher = _Teacher(bias=np.zeros(alpha.shape[0]))
    for term, (mean, std) in zip(terms, stats, strict=True):
        coef = mix[:, term.component] * (term.weight / std)
        offset -= mean * coef
        if term.kind == "main":
            assert term.table is not None
            folded = teacher.tables.get(term.feature)
            if folded is None:
                folded = teacher.tables[term.feature] = np.zeros((len(term.table), len(coef)))
            folded += term.table[:, None] * coef
        elif term.kind == "tags":
            assert term.table is not None
            if teacher.tag_table is None:
                teacher.tag_table = np.zeros((len(term.table), len(coef)))
            teacher.tag_table += term.table[:, None] * coef
        else:
            teacher.terms.append((term, coef))
    centred = teacher.logits(calib, nums) + offset
    teacher.bias = offset + solve_bias(centred)
    return teacher


def _bias_for_rates(
    logits: np.ndarray, rates: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Per column ``b`` with ``mean(weights * sigmoid(b + logits)) == rates`` (bisection)."""
    lo = np.full(logits.shape[1], -30.0)
    hi = np.full(logits.shape[1], 30.0)
    w = np.ones_like(logits) if weights is None else weights
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        too_high = (w * _sigmoid(logits + mid)).mean(axis=0) > rates
        hi = np.where(too_high, mid, hi)
        lo = np.where(too_high, lo, mid)
    return 0.5 * (lo + hi)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# ------------------------------------------------------------------------------- presets


@dataclass
class _Preset:
    """Features, teacher and label model of a preset."""

    schema: _Schema
    teacher: _Teacher
    tasks: list[str]
    # latent logits [n, L] and a generator -> (labels [n, T] int64, probabilities [n, T])
    label: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def nums(self) -> dict[str, _NumSpec]:
        return {f.name: f for f in self.schema.nums}


def _independent_labels(
    latent: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    p = _sigmoid(latent)
    return (rng.random(p.shape) < p).astype(np.int64), p


def _task_names(num_tasks: int) -> list[str]:
    return [DEFAULT_TASK_NAMES[t] if t < 4 else f"task{t}" for t in range(num_tasks)]


def _build_default(seed: int, vocab_scale: float, num_tasks: int) -> _Preset:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PRESET_CODE["default"], 0]))
    vocabs = default_vocab_sizes(vocab_scale)
    cat_names = ["user_id", *_DEFAULT_CAT_VOCABS]
    exponents = dict(zip(cat_names, (1.10, *_DEFAULT_CAT_EXPONENTS), strict=True))
    cats = [
        _CatSpec(n, vocabs[n], exponents[n], 0.0, _coprime_multiplier(rng, vocabs[n]), 0)
        for n in cat_names
    ]
    for c in cats:
        c.add = int(rng.integers(0, c.vocab))
    tag_spec = _CatSpec(
        "tags", vocabs["tags"], 1.10, 0.0, _coprime_multiplier(rng, vocabs["tags"]), 0
    )
    tag_spec.add = int(rng.integers(0, tag_spec.vocab))
    nums = [
        _NumSpec("n0", "normal", 0.0, 1.0),
        _NumSpec("n1", "lognormal", 1.0, 1.0, transform="log1p_standardize"),
        _NumSpec("n2", "uniform", 0.0, 100.0),
        _NumSpec("n3", "gamma", 2.0, 3.0),
    ]
    schema = _Schema(cats=cats, nums=nums, tag_spec=tag_spec)

    tasks = _task_names(num_tasks)
    n_a = (num_tasks + 1) // 2
    group_of = [0 if t < n_a else 1 for t in range(num_tasks)]
    # components: 0 shared, 1 group engage_a, 2 group engage_b, 3.. own per task
    n_comp = 3 + num_tasks
    alpha = np.zeros((num_tasks, n_comp))
    for t in range(num_tasks):
        alpha[t, 0] = math.sqrt(_SHARE_SHARED)
        alpha[t, 1 + group_of[t]] = math.sqrt(_SHARE_GROUP)
        alpha[t, 3 + t] = math.sqrt(_SHARE_OWN)

    vocab_of = {c.name: c.vocab for c in cats}
    terms: list[_Term] = []
    for comp in range(n_comp):
        own = comp >= 3
        n_cross = 2 if comp == 0 else 1
        for name in cat_names:
            if own and rng.random() < 0.3:
                continue
            table = _effect_table(rng, vocab_of[name], with_null=False)
            terms.append(_Term("main", comp, float(rng.uniform(0.3, 1.0)), name, table=table))
        for f in nums:
            w = float(rng.uniform(0.3, 0.8))
            terms.append(_Term("num", comp, w, f.name, params=_num_params(rng)))
        if not own or rng.random() < 0.5:
            table = _effect_table(rng, vocabs["tags"], with_null=False)
            terms.append(_Term("tags", comp, 0.7, table=table))
        terms += [_cross_term(rng, comp, cat_names, vocab_of) for _ in range(n_cross)]

    rates = np.array([_DEFAULT_RATES[t % 4] for t in range(num_tasks)])
    sigmas = np.array([_DEFAULT_SIGMAS[t % 4] for t in range(num_tasks)])
    calib_rng = np.random.default_rng(np.random.SeedSequence([seed, _PRESET_CODE["default"], 1]))
    calib = schema.sample(calib_rng, _CALIBRATION_ROWS)
    num_specs = {f.name: f for f in nums}
    teacher = _fit_teacher(
        terms, alpha, sigmas, calib, num_specs, lambda z: _bias_for_rates(z, rates)
    )
    groups = {
        "engage_a": [t for t, g in zip(tasks, group_of, strict=True) if g == 0],
        "engage_b": [t for t, g in zip(tasks, group_of, strict=True) if g == 1],
    }
    return _Preset(schema, teacher, tasks, _independent_labels, groups)


def _build_criteo_like(seed: int, vocab_scale: float, num_tasks: int) -> _Preset:
    code = _PRESET_CODE["criteo-like"]
    rng = np.random.default_rng(np.random.SeedSequence([seed, code, 0]))
    vocabs = criteo_like_vocab_sizes(vocab_scale)
    exps = (1.10, 1.15, 1.20, 1.05)
    cats = []
    for i, v in enumerate(vocabs):
        null_rate = float(rng.choice([0.0, 0.01, 0.02, 0.04]))
        mul = _coprime_multiplier(rng, v)
        cats.append(_CatSpec(f"C{i + 1}", v, exps[i % 4], null_rate, mul, int(rng.integers(0, v))))
    nums = []
    for i in range(13):
        mu, sig = float(rng.uniform(0.0, 4.0)), float(rng.uniform(0.8, 2.0))
        nums.append(
            _NumSpec(
                f"I{i + 1}", "count", mu, sig,
                null_rate=float(rng.uniform(0.05, 0.10)),
                zero_rate=float(rng.uniform(0.0, 0.3)),
                transform="log1p_standardize",
            )
        )  # fmt: skip
    schema = _Schema(cats=cats, nums=nums)

    # latent logits: click, cvr (P(conversion | click)); components: shared, own click, own cvr
    alpha = np.array([[math.sqrt(0.5), math.sqrt(0.5), 0.0], [math.sqrt(0.4), 0.0, math.sqrt(0.6)]])
    cat_names = [c.name for c in cats]
    vocab_of = {c.name: c.vocab for c in cats}
    plan = ((0, 10, 5, 1), (1, 6, 3, 1), (2, 6, 3, 0))  # component, #cats, #nums, #crosses
    terms: list[_Term] = []
    for comp, n_cat, n_num, n_cross in plan:
        for i in rng.choice(len(cats), n_cat, replace=False):
            table = _effect_table(rng, cats[i].vocab, with_null=True)
            terms.append(
                _Term("main", comp, float(rng.uniform(0.4, 1.0)), cats[i].name, table=table)
            )
        for i in rng.choice(len(nums), n_num, replace=False):
            w = float(rng.uniform(0.3, 0.8))
            terms.append(_Term("num", comp, w, nums[i].name, params=_num_params(rng)))
        terms += [_cross_term(rng, comp, cat_names, vocab_of) for _ in range(n_cross)]

    def solve(z: np.ndarray) -> np.ndarray:
        b_click = _bias_for_rates(z[:, :1], np.array([_CRITEO_CLICK_RATE]))
        p_click = _sigmoid(z[:, :1] + b_click)
        b_cvr = _bias_for_rates(z[:, 1:], np.array([_CRITEO_CONV_RATE]), weights=p_click)
        return np.concatenate([b_click, b_cvr])

    calib = schema.sample(
        np.random.default_rng(np.random.SeedSequence([seed, code, 1])), _CALIBRATION_ROWS
    )
    teacher = _fit_teacher(
        terms, alpha, np.array(_CRITEO_SIGMAS), calib, {f.name: f for f in nums}, solve
    )

    def label(latent: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        p = _sigmoid(latent)
        u = rng.random(p.shape)
        click = u[:, 0] < p[:, 0]
        conversion = click & (u[:, 1] < p[:, 1])
        labels = np.stack([click, conversion], axis=1).astype(np.int64)
        probs = np.stack([p[:, 0], p[:, 0] * p[:, 1]], axis=1)
        return labels[:, :num_tasks], probs[:, :num_tasks]

    return _Preset(schema, teacher, ["click", "conversion"][:num_tasks], label)


# --------------------------------------------------------------------------------- oracle


def oracle_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Exact ROC AUC (ties get half credit) of ``scores`` for 0/1 ``labels``; None if one class."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    _, inverse, counts = np.unique(sorted_scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each tie block
    rank_sum = float(avg_rank[inverse][labels[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


# ---------------------------------------------------------------------------------- writer


def _split_sizes(rows: int) -> dict[str, int]:
    train = int(rows * SPLITS[0][1])
    valid = int(rows * SPLITS[1][1])
    return {"train": train, "valid": valid, "test": rows - train - valid}


def _chunks(
    preset: _Preset, seed: int, preset_name: str, split_index: int, n_rows: int
) -> Iterator[tuple[pa.Table, np.ndarray, np.ndarray]]:
    """Arrow tables of ``n_rows`` rows of one split, with their labels and probabilities."""
    code = _PRESET_CODE[preset_name]
    nums = preset.nums
    chunk_rows = CHUNK_ROWS
    for k, start in enumerate(range(0, n_rows, chunk_rows)):
        n = min(chunk_rows, n_rows - start)
        rng = np.random.default_rng(np.random.SeedSequence([seed, code, 2, split_index, k]))
        chunk = preset.schema.sample(rng, n)
        latent = preset.teacher.logits(chunk, nums)
        labels, probs = preset.label(latent, rng)
        cols = preset.schema.feature_arrays(chunk)
        for t, name in enumerate(preset.tasks):
            cols[name] = pa.array(labels[:, t], type=pa.int64())
        for t, name in enumerate(preset.tasks):
            cols[f"p_{name}"] = pa.array(probs[:, t], type=pa.float64())
        yield pa.table(cols), labels, probs


def _write_split(
    path: Path,
    chunks: Iterator[tuple[pa.Table, np.ndarray, np.ndarray]],
    keep: bool,
    on_chunk: Callable[[int], None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream chunks into one parquet file.

    Returns the per-task label sums and, if ``keep``, all labels and probabilities.
    """
    writer: pq.ParquetWriter | None = None
    kept_labels: list[np.ndarray] = []
    kept_probs: list[np.ndarray] = []
    label_sum: np.ndarray | None = None
    try:
        for table, labels, probs in chunks:
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            sums = labels.sum(axis=0)
            label_sum = sums if label_sum is None else label_sum + sums
            if keep:
                kept_labels.append(labels)
                kept_probs.append(probs)
            on_chunk(table.num_rows)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(f"split {path.name} would have no rows")
    assert label_sum is not None
    if keep:
        return label_sum, np.concatenate(kept_labels), np.concatenate(kept_probs)
    return label_sum, np.empty((0, 0)), np.empty((0, 0))


#: rows from which the full stack's default experiment trains on batches of 2048
LARGE_BATCH_ROWS = 500_000


def batch_size_for(preset: Preset, rows: int) -> int:
    """``training.batch_size`` of the config a preset writes for ``rows`` rows (all splits).

    ``criteo-like``: 4096. ``default`` (the full stack, ``make demo``): 2048 from
    :data:`LARGE_BATCH_ROWS` rows, which spreads the step's fixed cost (its many small
    ops) over twice the rows at the same test AUC (the demo's 1M rows: 0.8208 vs 0.8209
    at 1024); 1024 below, where an epoch of 2048 would be a few dozen steps (60k rows:
    24). ``cold-start``: 1024.
    """
    if preset == "criteo-like":
        return 4096
    if preset == "default" and rows >= LARGE_BATCH_ROWS:
        return 2048
    return 1024


def _config_dict(preset_name: Preset, preset: _Preset, seed: int, rows: int) -> dict[str, Any]:
    """The experiment config (``mtrec.config`` schema) of the written data (``rows``: all
    splits together)."""
    features: list[dict[str, Any]] = []
    for c in preset.schema.cats:
        features.append(
            {"name": c.name, "kind": "categorical", "buckets": min(2 * c.vocab, 2_000_000)}
        )
    if preset.schema.tag_spec is not None:
        buckets = min(2 * preset.schema.tag_spec.vocab, 2_000_000)
        features.append(
            {"name": "tags", "kind": "multi_hot", "pooling": "mean", "buckets": buckets}
        )
    for f in preset.schema.nums:
        features.append({"name": f.name, "kind": "numeric", "transform": f.transform})
    criteo = preset_name == "criteo-like"
    dataset: dict[str, Any] = {
        "format": "parquet",
        "train": "train.parquet",
        "valid": "valid.parquet",
        "test": "test.parquet",
    }
    if criteo:
        dataset["nan_policy"] = "fill"
    cfg: dict[str, Any] = {"name": f"synthetic-{preset_name}", "seed": seed}
    if not criteo:
        cfg["group_key"] = "user_id"
    cfg |= {
        "dataset": dataset,
        "features": features,
        "tasks": [{"name": t, "label": t, "true_prob": f"p_{t}"} for t in preset.tasks],
    }
    cfg["model"] = {
        "embedding": {
            "type": "unified",
            "dim": 16,
            "buckets": 100_000,
            "learning_rate": 0.05,
            # Zipf tails: values seen < 20 times in training share one embedding instead of
            # memorising their few labels (measured: mean AUC gap to the oracle 0.058 -> 0.037
            # at 200k rows)
            "min_count": 20,
        },
        "multitask": {
            "type": "mmoe",
            "num_experts": 4,
            "expert_hidden": [128, 64],
            "tower_hidden": [64],
            "activation": "relu",
            "dropout": 0.0,
        },
    }
    groups = {g: list(ts) for g, ts in preset.groups.items() if ts}
    if groups:
        # the design's full stack: unified embedding → AutoInt → HoME over the planted
        # task groups (the structure HoME's hierarchy is for)
        cfg["model"]["interaction"] = {
            "type": "autoint",
            "layers": 2,
            # 8 wide (4 per head) and the DNN at [128, 64]: HoME's first level reads the
            # attention's F x 8 and the DNN's 64 (176 wide instead of 352), the level whose
            # S x B x in feature gates dominate a step (widths below: docs/generalisation.md)
            "attention_dim": 8,
            "heads": 2,
            "layer_norm": True,
            # AutoInt+: the parallel DNN branch (measured on this data, 3 seeds: mean AUC
            # 0.8166 vs 0.8139 DNN-only; the attention alone feeding a block: 0.8113-0.8128)
            "dnn": [128, 64],
        }
        cfg["model"]["multitask"]["type"] = "home"
        cfg["model"]["multitask"]["home"] = {"task_groups": groups}
        # HoME's experts at a quarter of the MMoE width. With the narrower AutoInt+ above
        # and batches of 2048 from 500k rows: the demo's 1M rows train 1.66-1.81x faster
        # (2 threads) at test mean AUC 0.8214 vs 0.8209; 60k rows (batch 1024): gap to the
        # oracle 0.0290 vs 0.0273, 3 seeds (docs/generalisation.md, "The default
        # experiment's widths")
        cfg["model"]["multitask"]["expert_hidden"] = [32, 16]
    cfg["training"] = {
        "batch_size": batch_size_for(preset_name, rows),
        "eval_batch_size": 16384 if criteo else 8192,
        "epochs": 3 if criteo else 4,
        "learning_rate": 0.001,
        "weight_decay": 0.0,
        "early_stopping_patience": 1,
        "threads": "adaptive",
    }
    return cfg


def _config_text(
    cfg: dict[str, Any], preset: _Preset, summary: dict[str, Any], vocab_scale: float
) -> str:
    header = [
        "# Generated by mtrec.data.synthetic.synthesize (mtrec data synth); do not edit.",
        (
            f"# preset: {summary['preset']}, seed: {cfg['seed']}, rows: {summary['rows']}, "
            f"vocab_scale: {vocab_scale:g}"
        ),
        "# Planted data: the true probability of each label is in column p_<task>.",
    ]
    if preset.groups:
        groups = "; ".join(f"{g} = [{', '.join(ts)}]" for g, ts in preset.groups.items() if ts)
        header.append(f"# Task groups (teacher: bias + shared + group + own): {groups}")
    aucs = ", ".join(
        f"{t}={a:.4f}" if a is not None else f"{t}=n/a" for t, a in summary["oracle_auc"].items()
    )
    header.append(f"# Oracle (Bayes-optimal) test AUC: {aucs}")
    one_line = {key: [_FlowMap(item) for item in cfg[key]] for key in ("features", "tasks")}
    body = yaml.dump({**cfg, **one_line}, Dumper=_ConfigDumper, sort_keys=False, width=100)
    return "\n".join(header) + "\n" + body


class _ConfigDumper(yaml.SafeDumper):
    """Block-style YAML, except lists of scalars and :class:`_FlowMap` items (one line each)."""


class _FlowMap(dict[str, Any]):
    """A mapping written on one line (``{name: c0, kind: categorical}``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flat = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


def _represent_flow_map(dumper: yaml.SafeDumper, data: _FlowMap) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)


_ConfigDumper.add_representer(list, _represent_list)
_ConfigDumper.add_representer(_FlowMap, _represent_flow_map)


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished splits and config from ``tmp`` into ``out``, config last (each
    file replaced atomically: a reader never sees a half-written one)."""
    for name in (*(f"{s}.parquet" for s, _ in SPLITS), "config.yaml"):
        os.replace(tmp / name, out / name)


def _write_config(path: Path, text: str) -> None:
    path.write_text(text)


def synthesize(
    out: str | Path,
    rows: int = 200_000,
    seed: int = 0,
    preset: Preset = "default",
    vocab_scale: float = 1.0,
    num_tasks: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write planted multi-task data (train/valid/test parquet) and its ``config.yaml``.

    Args:
        out: output directory (created if missing); existing split / config files in it
            are replaced only once every new file is complete.
        rows: total rows, split 80/10/10 into train / valid / test (at least 10).
        seed: data seed; the same arguments always give the same data.
        preset: ``"default"`` (demo: 4 tasks in 2 groups, user_id, tags, 8 categorical,
            4 numeric), ``"criteo-like"`` (13 numeric + 26 categorical, click and
            conversion) or ``"cold-start"`` (time-ordered, most test users unseen in
            training; see :mod:`mtrec.data.synth_cold_start`).
        vocab_scale: multiplies every vocabulary size (at least 2 values each).
        num_tasks: number of tasks; default 4 for ``"default"`` (any >= 1), 2 for
            ``"criteo-like"`` and ``"cold-start"`` (1: click only).
        progress: print progress lines to stderr.

    Returns:
        ``{"out", "config", "rows", "tasks", "splits": {split: rows}, "preset",
        "positive_rate": {task: rate over all rows}, "oracle_auc": {task: AUC of the
        true probabilities on the test split}, "wall_s"}``; ``"cold-start"`` adds
        ``"unseen_test_fraction": {"user_id", "item_id"}`` (test rows whose id is not in
        the training split).
    """
    start_time = time.perf_counter()
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 10:
        raise ValueError(f"rows must be an integer >= 10, got {rows!r}")
    if preset not in _PRESET_CODE:
        raise ValueError(f"preset must be one of {sorted(_PRESET_CODE)}, got {preset!r}")
    _check_scale(vocab_scale)
    max_tasks = None if preset == "default" else 2
    if num_tasks is None:
        num_tasks = 4 if preset == "default" else 2
    if num_tasks < 1 or (max_tasks is not None and num_tasks > max_tasks):
        raise ValueError(
            f"num_tasks must be >= 1{f' and <= {max_tasks}' if max_tasks else ''} "
            f"for preset {preset!r}, got {num_tasks}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if preset == "cold-start":
        return _synthesize_cold_start(out, rows, seed, float(vocab_scale), num_tasks, start_time)
    build = _build_default if preset == "default" else _build_criteo_like
    spec = build(seed, float(vocab_scale), num_tasks)
    sizes = _split_sizes(rows)

    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            elapsed = time.perf_counter() - start_time
            print(f"[synth] {done:,}/{rows:,} rows ({elapsed:.1f}s)", file=sys.stderr, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix=".synth-tmp-", dir=out))
    try:
        label_sums = np.zeros(num_tasks)
        aucs: dict[str, float | None] = {}
        for split_index, (split, _) in enumerate(SPLITS):
            chunks = _chunks(spec, seed, preset, split_index, sizes[split])
            sums, labels, probs = _write_split(
                tmp / f"{split}.parquet", chunks, keep=split == "test", on_chunk=report
            )
            label_sums += sums
            if split == "test":
                aucs = {t: oracle_auc(labels[:, i], probs[:, i]) for i, t in enumerate(spec.tasks)}
        summary: dict[str, Any] = {
            "out": str(out),
            "config": str(out / "config.yaml"),
            "rows": rows,
            "tasks": list(spec.tasks),
            "splits": sizes,
            "preset": preset,
            "positive_rate": {t: float(label_sums[i] / rows) for i, t in enumerate(spec.tasks)},
            "oracle_auc": aucs,
        }
        cfg = _config_dict(preset, spec, seed, rows)
        _write_config(tmp / "config.yaml", _config_text(cfg, spec, summary, float(vocab_scale)))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["wall_s"] = round(time.perf_counter() - start_time, 3)
    return summary


def _synthesize_cold_start(
    out: Path, rows: int, seed: int, vocab_scale: float, num_tasks: int, start_time: float
) -> dict[str, Any]:
    """The ``cold-start`` preset: split by time, see :mod:`mtrec.data.synth_cold_start`."""
    from mtrec.data.synth_cold_start import write_cold_start

    tmp = Path(tempfile.mkdtemp(prefix=".synth-tmp-", dir=out))
    try:
        fields, layout = write_cold_start(tmp, rows, seed, vocab_scale, num_tasks)
        summary: dict[str, Any] = {
            "out": str(out),
            "config": str(out / "config.yaml"),
            "rows": rows,
            "tasks": list(layout.tasks),
            "preset": "cold-start",
            **fields,
        }
        cfg = _config_dict("cold-start", layout, seed, rows)  # type: ignore[arg-type]
        text = _config_text(cfg, layout, summary, vocab_scale)  # type: ignore[arg-type]
        unseen = summary["unseen_test_fraction"]
        text = text.replace(
            "\n# Oracle",
            f"\n# Split by time (column ts); test rows with a user_id unseen in training: "
            f"{unseen['user_id']:.1%}, item_id: {unseen['item_id']:.1%}\n# Oracle",
            1,
        )
        _write_config(tmp / "config.yaml", text)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["wall_s"] = round(time.perf_counter() - start_time, 3)
    return summary
