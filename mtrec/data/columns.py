"""What a split is read as: its columns and its row count (one source for every reader).

The local batcher, the per-worker shards of distributed training and the row-range
scoring of evaluation read the same columns in the same order, so a row is encoded
identically on every path.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mtrec.data.errors import DataError
from mtrec.data.spec import FeatureSpec

__all__ = ["count_rows", "read_columns"]


def read_columns(spec: FeatureSpec, need_labels: bool = True) -> list[str]:
    """Source columns a split is read with, deduplicated in first-use order: the features
    (sparse, then numeric), with labels the tasks' label and true-probability columns,
    then the group key."""
    columns = [f.source for f in spec.sparse + spec.numeric]
    if need_labels:
        columns += [t.source for t in spec.tasks]
        columns += [t.true_prob for t in spec.tasks if t.true_prob]
    if spec.group_key:
        columns.append(spec.group_key)
    return list(dict.fromkeys(columns))


def count_rows(spec: FeatureSpec, path: str | Path) -> int:
    """Rows of the split at ``path`` (parquet: read from the footers, no data pages)."""
    lf = spec.scan(path)
    try:
        return int(lf.select(pl.len()).collect().item())
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path}: cannot count rows: {str(exc).splitlines()[0]}") from None
