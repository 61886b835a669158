"""Which ids each sliced feature took in the training split (for cold / warm slices).

Written into the run directory at training time (:data:`SEEN_IDS_FILE`, a sorted int64
array per feature, as ``mtrec.data.hashing`` encodes values) and read by evaluation
(``mtrec.evaluate.slices``) to split the scored rows into seen and unseen ids.

Sliced features: those with ``slice: true``; when none is marked, the
:data:`DEFAULT_SLICED` categorical features with the most distinct training values
(``slice: false`` opts a feature out).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from mtrec.data.errors import DataError
from mtrec.data.hashing import MISSING_ID, hash_series
from mtrec.data.spec import FeatureSpec

__all__ = ["DEFAULT_SLICED", "SEEN_IDS_FILE", "fit_seen_ids", "load_seen_ids", "save_seen_ids"]

#: run-directory file of the training ids of the sliced features
SEEN_IDS_FILE = "train_ids.npz"
#: how many categorical features are sliced when none has ``slice: true``
DEFAULT_SLICED = 2


def fit_seen_ids(spec: FeatureSpec, train_path: str | Path) -> dict[str, np.ndarray]:
    """Sorted unique training ids (int64, without ``MISSING_ID``) per sliced feature."""
    cats = [f for f in spec.sparse if f.kind == "categorical"]
    marked = [f.name for f in cats if getattr(f, "slice", None) is True]
    candidates = marked or [f.name for f in cats if getattr(f, "slice", None) is not False]
    if not candidates:
        return {}
    by_name = {f.name: f for f in spec.sparse}
    lf = spec.scan(train_path)
    uniq: dict[str, np.ndarray] = {}
    for n in candidates:
        # distinct raw values first (memory: the vocabulary, not the rows), then their ids
        col = by_name[n].source
        values = lf.select(pl.col(col).unique()).collect().get_column(col)
        ids = np.unique(hash_series(values))
        uniq[n] = ids[ids != MISSING_ID].astype(np.int64)
    if not marked:  # the highest-cardinality ones (stable order on ties)
        top = sorted(candidates, key=lambda n: -len(uniq[n]))[:DEFAULT_SLICED]
        uniq = {n: uniq[n] for n in candidates if n in top}
    return uniq


def save_seen_ids(seen: dict[str, np.ndarray], path: str | Path) -> None:
    """Write ``seen`` as one compressed ``.npz`` (an array per feature)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **seen)
    tmp.replace(path)


def load_seen_ids(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays :func:`save_seen_ids` wrote; ``{}`` if the run has none (an older run)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the training ids of sliced features: {exc}") from None
