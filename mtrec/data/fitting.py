"""Statistics fitted on the training split, in ONE pass over its encoded chunks.

* numeric normalisation, in float64 over each feature's finite transformed values
  ``f(x)`` (``sign(x)·log1p(|x|)`` for the log transforms):

  - ``standardize`` / ``log1p_standardize``: mean and std (merged chunk by chunk, so
    ``1e8 + N(0, 1)`` keeps its unit std); a warning when a few extreme values inflate
    the std so much that the middle half of the rows normalises to (almost) one value;
  - ``robust``: median and ``IQR / 1.349`` (the std of normal data), from a seeded
    sample of at most 65536 values per feature (exact below that); the model clips
    the result (``mtrec.embeddings.numeric.ROBUST_CLIP``);

* with ``model.embedding.numeric_bins`` K > 0, the bin edges of the piecewise-linear
  encoding: quantiles 0, 1/K, ..., 1 of the same sample, normalised (and clipped, for
  ``robust``) exactly as the model's normaliser will;

* the frequency filter: the ids each ``min_count`` feature keeps (``mtrec.data.vocab``).

Encoding validates every value, so fitting before a run directory is created is also
the check that nothing in the training split will fail later.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mtrec.config import DEFAULT_CHUNK_ROWS
from mtrec.data.batcher import encoded_chunks
from mtrec.data.encode import EncodedChunk
from mtrec.data.errors import DataWarning
from mtrec.data.numeric import (
    LOG_TRANSFORMS,
    QuantileSample,
    RunningMoments,
    representable,
    transformed,
)
from mtrec.data.spec import FeatureSpec, NumericStats
from mtrec.data.vocab import IdCounter
from mtrec.embeddings.numeric import ROBUST_CLIP

__all__ = ["OUTLIER_SPREAD", "fit_statistics", "fit_statistics_on_file"]

_STANDARDIZE = ("standardize", "log1p_standardize")
# IQR of a normal distribution in units of its std: robust-scaled normal data has std ~1
_IQR_PER_STD = 1.3489795
# mean |x - median| of a normal distribution in units of its std (scale when the IQR is 0)
_MAD_PER_STD = math.sqrt(2.0 / math.pi)
# standardize warns when the middle 50% of the rows spans less than this many stds
OUTLIER_SPREAD = 1e-3


def fit_statistics(spec: FeatureSpec, chunks: Iterable[EncodedChunk]) -> None:
    """Set ``spec.numeric_stats``, ``spec.kept_ids`` (and the other id sets of
    :mod:`mtrec.data.vocab`) from one pass over ``chunks``."""
    width = len(spec.numeric)
    log = np.array([f.transform in LOG_TRANSFORMS for f in spec.numeric], dtype=bool)
    moments = RunningMoments(width)
    sample = QuantileSample(width)
    low = np.full(width, np.inf)
    high = np.full(width, -np.inf)
    counter = IdCounter(spec)
    for chunk in chunks:
        counter.add(chunk)
        if width:
            x = transformed(chunk.dense.numpy().astype(np.float64, copy=False), log)
            ok = representable(x)
            moments.add(x, ok)
            sample.add(x, ok)
            low = np.minimum(low, np.where(ok, x, np.inf).min(0))
            high = np.maximum(high, np.where(ok, x, -np.inf).max(0))
    std = moments.std()
    stats: dict[str, NumericStats] = {}
    for j, f in enumerate(spec.numeric):
        center, scale = 0.0, 1.0
        if moments.count[j] > 0 and f.transform in _STANDARDIZE:
            center = float(moments.mean[j])
            scale = float(std[j]) if std[j] * std[j] > 1e-12 else 1.0
            _warn_if_swamped(f.name, f.source, sample, j, center, scale, low[j], high[j])
        elif moments.count[j] > 0 and f.transform == "robust":
            center, scale = _robust(sample, j)
        edges = _edges(sample, j, spec.numeric_bins, center, scale, f.transform)
        stats[f.name] = NumericStats(transform=f.transform, mean=center, std=scale, edges=edges)
    spec.numeric_stats = stats
    spec.kept_ids = counter.kept()
    spec.id_census = counter.census()
    spec.id_uses = counter.uses()
    spec.seen_ids = {
        name: census.seen
        for name, census in spec.id_census.items()
        if spec.unseen_of(name) == "own_row" and spec.min_count_of(name) > 1
    }
    # numeric probabilities now; ``auto`` is fitted against the valid split
    # (mtrec.data.unknown_ids.fit_id_dropout)
    spec.id_dropout = {
        name: float(p) for name in spec.kept_ids if (p := spec.id_dropout_of(name)) != "auto"
    }


def _edges(
    sample: QuantileSample, j: int, bins: int, center: float, scale: float, transform: str
) -> list[float] | None:
    """K+1 bin edges of column ``j`` in normalised units (None when ``bins`` is 0): its
    quantiles at 0, 1/K, ..., 1, through the normaliser's ``(t - center) / scale`` and
    robust clip. A column with no finite value gets zeros (every bin a step at 0)."""
    if bins <= 0:
        return None
    q = sample.quantiles(j, np.linspace(0.0, 1.0, bins + 1).tolist())
    if q is None:
        return [0.0] * (bins + 1)
    edges = (np.asarray(q, dtype=np.float64) - center) / scale
    if transform == "robust":
        edges = np.clip(edges, -ROBUST_CLIP, ROBUST_CLIP)
    # interpolated quantiles can step back by an ulp: keep the edges non-decreasing, in the
    # float32 the model compares them in
    edges = np.maximum.accumulate(edges.astype(np.float32))
    return [float(e) for e in edges]


def _robust(sample: QuantileSample, j: int) -> tuple[float, float]:
    """Median and a std-like scale: ``IQR / 1.349``, else the mean absolute deviation
    from the median (features that are mostly one value), else 1."""
    q25, median, q75 = sample.quantiles(j, [0.25, 0.5, 0.75])  # type: ignore[misc]
    scale = (q75 - q25) / _IQR_PER_STD
    if scale <= 0.0:
        scale = float(np.abs(sample.column(j) - median).mean()) / _MAD_PER_STD
    return float(median), float(scale) if scale > 0.0 else 1.0


def _warn_if_swamped(
    name: str,
    column: str,
    sample: QuantileSample,
    j: int,
    mean: float,
    std: float,
    low: float,
    high: float,
) -> None:
    """Warn when the std is dominated by a few extreme values: the middle 50% of the rows
    (or the middle 98% where the quartiles coincide) then normalises to nearly one value."""
    q01, q25, q75, q99 = sample.quantiles(j, [0.01, 0.25, 0.75, 0.99])  # type: ignore[misc]
    spread = q75 - q25 if q75 > q25 else q99 - q01
    if spread <= 0.0 or spread / std >= OUTLIER_SPREAD:
        return
    extreme = high if abs(high - mean) >= abs(low - mean) else low
    warnings.warn(
        f"numeric feature '{name}' (column '{column}'): extreme values (e.g. {extreme:.6g}, "
        f"{abs(extreme - mean) / std:.3g} stds from the mean) dominate its std ({std:.6g}), "
        f"so the middle of the data (spread {spread:.6g}) standardizes to almost one value "
        "and the feature is nearly dead; use `transform: robust` (median / IQR, clipped) or "
        "`transform: log1p_standardize`, or clean the outliers",
        DataWarning,
        stacklevel=3,
    )


def fit_statistics_on_file(
    spec: FeatureSpec, path: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> None:
    """:func:`fit_statistics` streaming the file (or shards) at ``path``."""
    fit_statistics(spec, encoded_chunks(spec, path, chunk_rows))
