"""Statistics fitted on the training split, in ONE pass over its encoded chunks.

* numeric normalisation: mean and std of each numeric feature's transformed value
  (``sign(x)·log1p(|x|)`` for the log transforms), over its finite values;
* the frequency filter: the ids each ``min_count`` feature keeps (``mtrec.data.vocab``).

Encoding validates every value, so fitting before a run directory is created is also
the check that nothing in the training split will fail later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mtrec.config import DEFAULT_CHUNK_ROWS
from mtrec.data.batcher import encoded_chunks
from mtrec.data.encode import EncodedChunk
from mtrec.data.spec import FeatureSpec, NumericStats
from mtrec.data.vocab import IdCounter

__all__ = ["fit_statistics", "fit_statistics_on_file"]

_LOG = ("log1p", "log1p_standardize")
_STANDARDIZE = ("standardize", "log1p_standardize")


def fit_statistics(spec: FeatureSpec, chunks: Iterable[EncodedChunk]) -> None:
    """Set ``spec.numeric_stats`` and ``spec.kept_ids`` from one pass over ``chunks``."""
    width = len(spec.numeric)
    log = np.array([f.transform in _LOG for f in spec.numeric], dtype=bool)
    total = np.zeros(width)
    squares = np.zeros(width)
    count = np.zeros(width)
    counter = IdCounter(spec)
    for chunk in chunks:
        counter.add(chunk)
        if width:
            x = chunk.dense.numpy().astype(np.float64)
            x = np.where(log, np.sign(x) * np.log1p(np.abs(x)), x)
            finite = np.isfinite(x)
            x = np.where(finite, x, 0.0)
            total += x.sum(0)
            squares += (x * x).sum(0)
            count += finite.sum(0)
    stats: dict[str, NumericStats] = {}
    for j, f in enumerate(spec.numeric):
        mean, std = 0.0, 1.0
        if f.transform in _STANDARDIZE and count[j] > 0:
            mean = float(total[j] / count[j])
            var = max(float(squares[j] / count[j]) - mean * mean, 0.0)
            std = math.sqrt(var) if var > 1e-12 else 1.0
        stats[f.name] = NumericStats(transform=f.transform, mean=mean, std=std)
    spec.numeric_stats = stats
    spec.kept_ids = counter.kept()


def fit_statistics_on_file(
    spec: FeatureSpec, path: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> None:
    """:func:`fit_statistics` streaming the file (or shards) at ``path``."""
    fit_statistics(spec, encoded_chunks(spec, path, chunk_rows))
