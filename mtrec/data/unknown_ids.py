"""Unknown ids at training time: fit ``id_dropout: auto`` and warn about untrained cold rows.

An id absent from the training split reads one row at serving (``RARE_ID`` or
``UNSEEN_ID``, see ``mtrec.embeddings.per_feature.FrequencyFilter``). That row learns only
from the training ids that reach it: rare ids (below ``min_count``) and, with id dropout,
the ids dropped at random. On data split by time most test rows can carry such ids
(issue #16), so the row must see training data that looks like cold traffic.

* ``auto`` id dropout: ``p = min(AUTO_CAP, share of valid ids unseen in training)``, the
  rate at which cold ids arrive; without a valid split, the Good-Turing estimate of the
  same rate, the share of training ids that occur once.
* the warning: a feature whose valid ids are more than :data:`WARN_UNSEEN_SHARE` unseen
  while its unknown row is trained on fewer than :data:`WARN_MIN_ROWS` expected rows.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection
from pathlib import Path

import numpy as np

from mtrec.data.batcher import encoded_chunks
from mtrec.data.errors import DataWarning
from mtrec.data.hashing import MISSING_ID
from mtrec.data.spec import FeatureSpec

__all__ = [
    "AUTO_CAP",
    "WARN_MIN_ROWS",
    "WARN_UNSEEN_SHARE",
    "fit_id_dropout",
    "fit_unknown_ids",
    "unknown_row_warnings",
    "valid_unseen_shares",
]

log = logging.getLogger("mtrec")

#: the most ``auto`` id dropout takes from the data (the rest of the rows teach the ids)
AUTO_CAP = 0.5
#: valid share of unseen ids above which an undertrained unknown row is warned about
WARN_UNSEEN_SHARE = 0.2
#: expected training ids per epoch below which the unknown row counts as undertrained
WARN_MIN_ROWS = 1000


def _feature_ids(spec: FeatureSpec, chunk: object, name: str) -> np.ndarray:
    cats = [f.name for f in spec.sparse if f.kind == "categorical"]
    multis = [f.name for f in spec.sparse if f.kind == "multi_hot"]
    if name in cats:
        return chunk.cat_ids[:, cats.index(name)].numpy()  # type: ignore[attr-defined]
    return chunk.multi_values[multis.index(name)].numpy()  # type: ignore[attr-defined]


def valid_unseen_shares(
    spec: FeatureSpec, seen: dict[str, np.ndarray], valid: str | Path, chunk_rows: int
) -> dict[str, float]:
    """Per feature of ``seen``: the share of the valid split's non-missing ids absent from
    ``seen[name]`` (sorted training ids). NaN for a feature with no valid id."""
    unseen = dict.fromkeys(seen, 0)
    total = dict.fromkeys(seen, 0)
    for chunk in encoded_chunks(spec, valid, chunk_rows):
        for name, ids_seen in seen.items():
            ids = _feature_ids(spec, chunk, name)
            ids = ids[ids != MISSING_ID]
            total[name] += len(ids)
            unseen[name] += int((~np.isin(ids, ids_seen, assume_unique=False)).sum())
    return {n: unseen[n] / total[n] if total[n] else float("nan") for n in seen}


def fit_id_dropout(spec: FeatureSpec, shares: dict[str, float]) -> None:
    """Resolve ``id_dropout: auto`` into ``spec.id_dropout`` from the valid unseen shares
    (``shares``), else from the training singletons (Good-Turing); needs
    ``spec.id_census`` (``mtrec.data.fitting.fit_statistics``)."""
    for name in spec.kept_ids:
        if spec.id_dropout_of(name) != "auto":
            continue
        share = shares.get(name, float("nan"))
        if not np.isfinite(share):
            census = spec.id_census[name]
            # ids seen once / all ids: the chance the next id is new (Good-Turing)
            share = census.singletons / census.rows if census.rows else 0.0
        spec.id_dropout[name] = round(min(AUTO_CAP, float(share)), 4)
        log.info("%s: id_dropout auto = %.4f", name, spec.id_dropout[name])


def unknown_row_warnings(
    spec: FeatureSpec, shares: dict[str, float], deep_features: Collection[str] | None = None
) -> list[str]:
    """One message per feature whose valid ids are mostly unseen while the row they read
    is trained on few ids (rare training ids + expected dropped ids per epoch), or, for a
    feature without a filter, reads rows trained for other ids. The first only for the
    features the deep embedding reads (``deep_features``; None: all): the linear term keeps
    an unseen id's weight at the prior mean by design (``model.linear.id_dropout``)."""
    out: list[str] = []
    fix = (
        "set model.embedding.id_dropout: auto (or a probability) so the row unseen ids "
        "read learns from simulated cold ids"
    )
    for name, share in shares.items():
        if not np.isfinite(share) or share <= WARN_UNSEEN_SHARE:
            continue
        if name not in spec.id_census:
            out.append(
                f"feature {name!r}: {share:.0%} of the valid ids are unseen in training and "
                "hash onto rows trained for other ids; " + fix
            )
            continue
        if deep_features is not None and name not in deep_features:
            continue
        census = spec.id_census[name]
        p = spec.id_dropout.get(name, 0.0)
        rare = census.rare_rows if spec.unseen_of(name) == "rare" else 0
        trained = rare + p * census.rows
        if trained < WARN_MIN_ROWS:
            out.append(
                f"feature {name!r}: {share:.0%} of the valid ids are unseen in training but "
                f"the row they read is trained on ~{trained:.0f} ids per epoch "
                f"(< {WARN_MIN_ROWS}); " + fix
            )
    return out


def fit_unknown_ids(
    spec: FeatureSpec,
    valid: str | Path | None,
    chunk_rows: int,
    extra_seen: dict[str, np.ndarray] | None = None,
    deep_features: Collection[str] | None = None,
) -> dict[str, float]:
    """At the start of a new run: the valid unseen share of every filtered feature (and of
    ``extra_seen``'s features, e.g. the sliced ones), ``auto`` id dropout resolved into
    ``spec.id_dropout``, and a :class:`DataWarning` per undertrained unknown row (of the
    ``deep_features``, see :func:`unknown_row_warnings`). Returns
    the shares."""
    seen = {n: c.seen for n, c in spec.id_census.items()}
    seen |= {n: v for n, v in (extra_seen or {}).items() if n not in seen}
    shares: dict[str, float] = {}
    if valid and seen:
        shares = valid_unseen_shares(spec, seen, valid, chunk_rows)
    fit_id_dropout(spec, shares)
    for msg in unknown_row_warnings(spec, shares, deep_features):
        warnings.warn(msg, DataWarning, stacklevel=2)
    return shares
