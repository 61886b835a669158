"""Stable value ids: the one hash that turns raw categorical values into int64 ids.

Definition (identical in training, evaluation and serving; any client can
re-implement it in a few lines):

1. The value is written as UTF-8 text. Integers use their decimal form, so the
   integer ``42`` and the string ``"42"`` get the same id. Floats (a numeric
   column used as categories): NaN is missing; integral values below 2**62 in
   magnitude hash like integers (``34.0`` → ``"34"``); others use Python's
   ``repr`` (shortest round-trip text: ``0.5`` → ``"0.5"``, ``1e-05``, ``inf``).
2. ``h = FNV-1a-64(bytes)``: start at ``0xcbf29ce484222325``; for each byte
   ``h = (h XOR byte) * 0x100000001b3 mod 2**64``.
3. ``h = fmix64(h)`` (MurmurHash3's 64-bit finaliser, for avalanche):
   ``h ^= h >> 33; h *= 0xff51afd7ed558ccd; h ^= h >> 33;
   h *= 0xc4ceb9fe1a85ec53; h ^= h >> 33`` (all mod 2**64).
4. ``id = h >> 1`` (a non-negative int64); an id of 0 or 1 becomes 2.

Two ids are reserved: :data:`MISSING_ID` = 0 for a missing value (null / None),
and :data:`RARE_ID` = 1, which the model substitutes for values seen fewer than
``min_count`` times in training (clients never send it). The model also uses
:data:`UNSEEN_ID` = -1, which the hash never produces, for values absent from the
training split of a feature with ``unseen: own_row``.

The implementation below is vectorised NumPy over Arrow string buffers; it
does not depend on the polars version, the process or the machine. Golden
values are pinned in ``tests/test_hashing.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import polars as pl

__all__ = ["MISSING_ID", "RARE_ID", "UNSEEN_ID", "hash_series", "hash_value", "hash_values"]

MISSING_ID = 0
RARE_ID = 1
UNSEEN_ID = -1

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_MASK64 = (1 << 64) - 1


def _text(value: str | int | float) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2.0**62:
            return str(int(value))
        return repr(value)
    return str(value)


def hash_value(value: str | int | float | None) -> int:
    """Reference (scalar, pure Python) implementation of the id of one value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING_ID
    if isinstance(value, bool):
        raise TypeError("booleans are not categorical values; cast them to int or str first")
    data = _text(value).encode("utf-8")
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK64
    h ^= h >> 33
    out = h >> 1
    return out if out > RARE_ID else 2


def _fnv1a_buffers(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """FNV-1a-64 of each string given Arrow offsets [N+1] and UTF-8 bytes."""
    starts = offsets[:-1]
    lengths = offsets[1:] - starts
    n = len(starts)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    max_len = int(lengths.max())
    if max_len == 0:
        return h
    # Most categorical values are short; step through byte positions, restricted
    # to the strings that are still long enough (the set shrinks as j grows).
    active = np.arange(n)
    for j in range(max_len):
        if j > 0:
            keep = lengths[active] > j
            if not keep.all():
                active = active[keep]
        else:
            active = active[lengths > 0]
        if active.size == 0:
            break
        byte = data[starts[active] + j].astype(np.uint64)
        h[active] = (h[active] ^ byte) * _FNV_PRIME
    return h


def _finalise(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _S33)
    h = h * _M1
    h = h ^ (h >> _S33)
    h = h * _M2
    h = h ^ (h >> _S33)
    ids = (h >> np.uint64(1)).astype(np.int64)
    ids[ids <= RARE_ID] = 2
    return ids


def hash_series(series: pl.Series) -> np.ndarray:
    """Ids of every value of a polars Series (string, integer or categorical) → int64 [N].

    Nulls map to :data:`MISSING_ID`.
    """
    dtype = series.dtype
    if dtype.is_integer():
        text = series.cast(pl.String)
    elif dtype.is_float():
        # a numeric column read as categories (see the definition above): NaN is
        # missing, integral values hash like integers, others by Python's repr of the
        # few distinct values (polars' float text differs from it, e.g. 1e-05)
        series = series.fill_nan(None)
        integral = series.is_finite() & (series == series.round(0)) & (series.abs() < 2.0**62)
        distinct = series.filter(~integral.fill_null(True)).unique().drop_nulls()
        mapping = {v: repr(float(v)) for v in distinct.to_list()}
        text = pl.select(
            pl.when(integral.fill_null(False))
            .then(series.cast(pl.Int64, strict=False).cast(pl.String))
            .otherwise(series.replace_strict(mapping, default=None, return_dtype=pl.String))
            .alias(series.name)
        ).to_series()
    elif dtype in (pl.String, pl.Categorical, pl.Enum):
        text = series.cast(pl.String)
    elif dtype == pl.Null:
        return np.zeros(len(series), dtype=np.int64)
    else:
        raise TypeError(
            f"column {series.name!r} has dtype {dtype}; "
            "categorical values must be strings, integers or floats"
        )
    arr = text.to_arrow(compat_level=pl.CompatLevel.oldest())
    # oldest compat level gives a (large_)string array: validity, offsets, data
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_string(arr.type):
        arr = arr.cast(pa.large_string())
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    ids = _finalise(_fnv1a_buffers(offsets, data))
    if arr.null_count:
        ids[np.asarray(arr.is_null())] = MISSING_ID
    return ids


def hash_values(values: Iterable[str | int | None]) -> np.ndarray:
    """Vectorised ids of a Python iterable of values (strings, ints or None)."""
    items = list(values)
    if any(isinstance(v, bool) for v in items):
        raise TypeError("booleans are not categorical values; cast them to int or str first")
    texts = [
        None if v is None or (isinstance(v, float) and math.isnan(v)) else _text(v) for v in items
    ]
    return hash_series(pl.Series("v", texts, dtype=pl.String))
