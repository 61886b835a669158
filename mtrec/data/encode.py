"""Encode polars chunks into tensors: stable ids, raw numeric values, labels.

An :class:`EncodedChunk` holds N rows column-wise as tensors so that batches
are cheap slices (or gathers, when shuffling). Numeric values stay raw float64
(NaN for missing): the model's normaliser applies the fitted statistics and casts
to float32 only after normalising, so training and serving share one code path and
large-magnitude columns (timestamps, ``1e8 + N(0, 1)``) keep their resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from mtrec.config import FeatureConfig
from mtrec.data.errors import DataError
from mtrec.data.hashing import hash_series
from mtrec.data.numeric import FLOAT32_MAX, LOG_TRANSFORMS, representable, transformed
from mtrec.data.spec import FeatureSpec

__all__ = ["EncodedChunk", "encode_chunk", "feature_major_ids"]


@dataclass
class EncodedChunk:
    """N encoded rows.

    Attributes:
        cat_ids: N x F_cat int64 ids of single-valued categorical features.
        multi_values: per multi-hot feature, int64 ids of all tokens (row-major).
        multi_offsets: per multi-hot feature, int64 [N + 1] row offsets into its values.
        dense: N x F_num float64 raw numeric values (NaN = missing).
        labels: N x T float32.
        true_probs: N x T float32 or None.
        groups: N int64 or None.
    """

    cat_ids: torch.Tensor
    multi_values: list[torch.Tensor]
    multi_offsets: list[torch.Tensor]
    dense: torch.Tensor
    labels: torch.Tensor
    true_probs: torch.Tensor | None
    groups: torch.Tensor | None

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor) -> EncodedChunk:
        """Rows ``index`` (int64 [K]) as a new chunk."""
        multi_values, multi_offsets = [], []
        for values, offsets in zip(self.multi_values, self.multi_offsets):
            v, o = _jagged_take(values, offsets, index)
            multi_values.append(v)
            multi_offsets.append(o)
        return EncodedChunk(
            cat_ids=self.cat_ids.index_select(0, index),
            multi_values=multi_values,
            multi_offsets=multi_offsets,
            dense=self.dense.index_select(0, index),
            labels=self.labels.index_select(0, index),
            true_probs=None if self.true_probs is None else self.true_probs.index_select(0, index),
            groups=None if self.groups is None else self.groups.index_select(0, index),
        )

    def slice(self, start: int, end: int) -> EncodedChunk:
        multi_values, multi_offsets = [], []
        for values, offsets in zip(self.multi_values, self.multi_offsets):
            o = offsets[start : end + 1]
            multi_values.append(values[int(o[0]) : int(o[-1])])
            multi_offsets.append(o - o[0])
        return EncodedChunk(
            cat_ids=self.cat_ids[start:end],
            multi_values=multi_values,
            multi_offsets=multi_offsets,
            dense=self.dense[start:end],
            labels=self.labels[start:end],
            true_probs=None if self.true_probs is None else self.true_probs[start:end],
            groups=None if self.groups is None else self.groups[start:end],
        )

    @staticmethod
    def concat(chunks: list[EncodedChunk]) -> EncodedChunk:
        if len(chunks) == 1:
            return chunks[0]
        first = chunks[0]
        multi_values, multi_offsets = [], []
        for i in range(len(first.multi_values)):
            multi_values.append(torch.cat([c.multi_values[i] for c in chunks]))
            parts, base = [torch.zeros(1, dtype=torch.int64)], 0
            for c in chunks:
                parts.append(c.multi_offsets[i][1:] + base)
                base += int(c.multi_offsets[i][-1])
            multi_offsets.append(torch.cat(parts))
        return EncodedChunk(
            cat_ids=torch.cat([c.cat_ids for c in chunks]),
            multi_values=multi_values,
            multi_offsets=multi_offsets,
            dense=torch.cat([c.dense for c in chunks]),
            labels=torch.cat([c.labels for c in chunks]),
            true_probs=None
            if first.true_probs is None
            else torch.cat([c.true_probs for c in chunks]),  # type: ignore[misc]
            groups=None if first.groups is None else torch.cat([c.groups for c in chunks]),  # type: ignore[misc]
        )


def _jagged_take(
    values: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = offsets[index]
    lengths = offsets[index + 1] - starts
    new_offsets = torch.zeros(index.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    total = int(new_offsets[-1])
    if total == 0:
        return values[:0], new_offsets
    # position of each output token in ``values``: row start + rank within the row
    shift = torch.repeat_interleave(starts - new_offsets[:-1], lengths, output_size=total)
    return values[torch.arange(total) + shift], new_offsets


def _first_bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check(
    bad: np.ndarray, values: np.ndarray, path: str, what: str, row_offset: int, fix: str
) -> None:
    """Raise naming the file, the column (``what``), the first bad row and its value."""
    if bad.any():
        i = _first_bad_row(bad)
        raise DataError(f"{path}: {what} has value {values[i]} at row {row_offset + i}; {fix}")


# separators a text multi-hot column may use; one of them in most values but the
# delimiter in none means the delimiter is wrong (or missing)
_SEPARATORS = ("|", ",", " ", ";", "\t")
# values showing another separator before a wrong delimiter is refused (a few rows whose
# single token holds a space prove nothing)
_MIN_EVIDENCE = 8


def _split_text(s: pl.Series, f: FeatureConfig, path: str, row_offset: int) -> pl.Series:
    """Split a text multi-hot column on ``f.delimiter`` (empty tokens dropped).

    Refuses a column without a delimiter, and one whose delimiter no value contains while
    most values contain another separator: split on the wrong character, ``"a b c"``
    would be ONE token, a new id per combination of tags, and train silently.
    """
    where = f"{path}: column '{f.source}' (multi_hot feature '{f.name}')"
    text = s.drop_nulls()
    text = text.filter(text.str.len_bytes() > 0)
    seen = {c: text.str.contains(c, literal=True) for c in _SEPARATORS if c != f.delimiter}
    likely = max(seen, key=lambda c: int(seen[c].sum()))
    count = int(seen[likely].sum())
    example = ""
    if count:
        i = int(np.flatnonzero(s.str.contains(likely, literal=True).fill_null(False).to_numpy())[0])
        example = f" (e.g. {s[i]!r} at row {row_offset + i})"
    if f.delimiter is None:
        hint = f"its values contain {likely!r}{example}: " if count else ""
        raise DataError(
            f"{where} holds text but the feature sets no `delimiter`; {hint}set `delimiter:` "
            "to the text between tokens (text is never split on ',' by default), or store "
            "the column as a list"
        )
    uses = bool(text.str.contains(f.delimiter, literal=True).any())
    if not uses and count >= _MIN_EVIDENCE and 2 * count >= text.len():
        raise DataError(
            f"{where}: no value contains the delimiter {f.delimiter!r}, but {count} of "
            f"{text.len()} values contain {likely!r}{example}, so each combination of tokens "
            f"would be one token; set `delimiter: {likely!r}`, or declare the feature "
            "`kind: categorical` if every row holds one value"
        )
    s = s.str.split(f.delimiter)
    return s.list.eval(pl.element().filter(pl.element().str.len_bytes() > 0))


def _encode_multi_hot(
    df: pl.DataFrame, f: FeatureConfig, path: str, row_offset: int
) -> tuple[np.ndarray, np.ndarray]:
    s = df.get_column(f.source)
    if s.dtype == pl.String:
        s = _split_text(s, f, path, row_offset)
    lengths = s.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = s.explode().drop_nulls()
    if flat.len() != lengths.sum():  # null tokens inside lists are dropped too
        s = s.list.drop_nulls()
        lengths = s.list.len().fill_null(0).to_numpy().astype(np.int64)
        flat = s.explode().drop_nulls()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return hash_series(flat), offsets


def _checked_numeric(
    col: np.ndarray, f: FeatureConfig, nan_policy: str, path: str, row_offset: int
) -> np.ndarray:
    """A numeric column (float64) after ``nan_policy``: with ``fail``, an error for the first
    null / NaN / inf or value whose transform overflows float32; with ``fill``, such an
    overflowing value becomes NaN (missing: the normaliser fills it, fitting skips it)."""
    fits = representable(transformed(col, np.array(f.transform in LOG_TRANSFORMS)))
    if fits.all():
        return col
    where = f"{path}: column '{f.source}' (numeric feature '{f.name}')"
    if nan_policy == "fail":
        i = _first_bad_row(~fits)
        if not np.isfinite(col[i]):
            raise DataError(
                f"{where} has a non-finite value ({col[i]}) at row {row_offset + i}; clean the "
                "data or set `dataset.nan_policy: fill` to replace null/NaN/inf with "
                "`dataset.fill_value`"
            )
        raise DataError(
            f"{where} has value {float(col[i])!r} at row {row_offset + i}, beyond the float32 "
            f"range (±{FLOAT32_MAX:.4g}) of transform '{f.transform}'; clean the data, use "
            "`transform: log1p_standardize` for such magnitudes, or set "
            "`dataset.nan_policy: fill` to treat such values as missing"
        )
    return np.where(np.isfinite(col) & ~fits, np.nan, col)


def encode_chunk(
    df: pl.DataFrame, spec: FeatureSpec, path: str, row_offset: int = 0, need_labels: bool = True
) -> EncodedChunk:
    """Encode one polars chunk; ``row_offset`` is the chunk's first row in the file (for errors)."""
    n = df.height
    cat = [f for f in spec.sparse if f.kind == "categorical"]
    cat_ids = np.empty((n, len(cat)), dtype=np.int64)
    for j, f in enumerate(cat):
        cat_ids[:, j] = hash_series(df.get_column(f.source))
    multi_values, multi_offsets = [], []
    for f in spec.sparse:
        if f.kind == "multi_hot":
            v, o = _encode_multi_hot(df, f, path, row_offset)
            multi_values.append(torch.from_numpy(v))
            multi_offsets.append(torch.from_numpy(o))

    dense = np.empty((n, len(spec.numeric)), dtype=np.float64)
    for j, f in enumerate(spec.numeric):
        col = df.get_column(f.source).cast(pl.Float64).fill_null(float("nan")).to_numpy()
        dense[:, j] = _checked_numeric(col, f, spec.nan_policy, path, row_offset)

    labels = np.zeros((n, len(spec.tasks)), dtype=np.float32)
    true_probs = np.empty((n, len(spec.tasks)), dtype=np.float32) if spec.has_true_probs else None
    if need_labels:
        for j, t in enumerate(spec.tasks):
            s = df.get_column(t.source)
            if s.null_count():
                i = _first_bad_row(s.is_null().to_numpy())
                raise DataError(
                    f"{path}: label column '{t.source}' (task '{t.name}') is null at row "
                    f"{row_offset + i}; labels must be 0 or 1"
                )
            col = s.cast(pl.Float64).to_numpy()
            what = f"label column '{t.source}' (task '{t.name}')"
            _check(
                (col != 0.0) & (col != 1.0), col, path, what, row_offset, "labels must be 0 or 1"
            )
            labels[:, j] = col
            if true_probs is not None:
                p = df.get_column(t.true_prob).cast(pl.Float64).fill_null(float("nan"))  # type: ignore[arg-type]
                p = p.to_numpy()
                what = f"column '{t.true_prob}' (true probability of task '{t.name}')"
                _check(
                    ~((p >= 0.0) & (p <= 1.0)),
                    p,
                    path,
                    what,
                    row_offset,
                    "expected a value in [0, 1]",
                )
                true_probs[:, j] = p
    else:
        true_probs = None  # scoring without labels: no oracle either

    groups = None
    if spec.group_key and spec.group_key in df.columns:
        groups = torch.from_numpy(hash_series(df.get_column(spec.group_key)))
    return EncodedChunk(
        cat_ids=torch.from_numpy(cat_ids),
        multi_values=multi_values,
        multi_offsets=multi_offsets,
        dense=torch.from_numpy(dense),
        labels=torch.from_numpy(labels),
        true_probs=None if true_probs is None else torch.from_numpy(true_probs),
        groups=groups,
    )


def feature_major_ids(chunk: EncodedChunk, spec: FeatureSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The KJT ``values`` (int64) and ``lengths`` (int32, feature-major: every row of
    feature 0, then feature 1, ...) of encoded rows, in ``spec.sparse`` order."""
    b = chunk.rows
    kinds = [f.kind for f in spec.sparse]
    if "multi_hot" not in kinds:
        # single-valued features only: one transpose gives the feature-major values
        values = chunk.cat_ids.t().reshape(-1)
        return values, torch.ones(values.numel(), dtype=torch.int32)
    vals, lens = [], []
    ci = mi = 0
    for kind in kinds:
        if kind == "categorical":
            vals.append(chunk.cat_ids[:, ci])
            lens.append(torch.ones(b, dtype=torch.int32))
            ci += 1
        else:
            offsets = chunk.multi_offsets[mi]
            vals.append(chunk.multi_values[mi])
            lens.append((offsets[1:] - offsets[:-1]).to(torch.int32))
            mi += 1
    return torch.cat(vals), torch.cat(lens)
