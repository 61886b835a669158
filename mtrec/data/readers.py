"""Readers: parquet, CSV and the Criteo TSV layout, all as polars lazy scans.

Every reader returns a ``polars.LazyFrame`` so that the batcher can stream
chunks with bounded memory. A dataset path is one file, a directory (its files of
the format, sorted by name: the usual layout of sharded data) or a glob pattern
(``data/part-*.parquet``). Problems opening a file (missing, empty, corrupt)
become :class:`DataError` naming the file and the fix.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from mtrec.data.errors import DataError

__all__ = ["CRITEO_COLUMNS", "iter_chunks", "read_schema", "resolve_files", "scan"]

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label", *CRITEO_DENSE, *CRITEO_SPARSE]


_SUFFIXES = {"parquet": (".parquet", ".pq"), "csv": (".csv",), "criteo": (".txt", ".tsv")}


def resolve_files(path: str | Path, fmt: str) -> list[Path]:
    """The data files behind a dataset path (file, directory or glob), sorted by name."""
    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text))
        if not files:
            raise DataError(f"{text}: the pattern matches no file; check dataset paths")
    elif Path(text).is_dir():
        suffixes = _SUFFIXES.get(fmt, ())
        files = sorted(p for p in Path(text).iterdir() if p.suffix.lower() in suffixes)
        if not files:
            raise DataError(
                f"{text}: directory holds no {fmt} files ({', '.join(suffixes)}); "
                "check dataset paths or dataset.format"
            )
    else:
        files = [Path(text)]
    for f in files:
        _check_file(f)
    return files


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file does not exist; check dataset paths in the config")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a data file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes); regenerate or remove it")


def _criteo_layout(path: Path) -> tuple[str, bool]:
    """The raw Criteo layout is tab-separated without a header; a widespread variant
    (e.g. DeepCTR's sample) is comma-separated with a ``label,I1,...,C26`` header."""
    with open(path, "rb") as fh:
        first = fh.readline(65536).decode("utf-8", errors="replace").rstrip("\r\n")
    if first.split(",") == CRITEO_COLUMNS:
        return ",", True
    if first.split("\t") == CRITEO_COLUMNS:
        return "\t", True
    fields = first.split("\t")
    if len(fields) != len(CRITEO_COLUMNS):
        raise DataError(
            f"{path}: first line has {len(fields)} tab-separated fields; the Criteo layout has "
            f"{len(CRITEO_COLUMNS)} (label, I1-I13, C1-C26) with no header, or a "
            "comma-separated file with that header"
        )
    return "\t", False


def scan(
    path: str | Path,
    fmt: str,
    csv_separator: str = ",",
    string_columns: list[str] | None = None,
) -> pl.LazyFrame:
    """Lazy scan of the data at ``path`` (file, directory or glob) in ``fmt``.

    ``string_columns`` (CSV) are read as text, not inferred: a categorical code such as
    ``"00123"`` must keep its zeros to get the same id as in a parquet file.
    """
    if fmt not in _SUFFIXES:
        raise DataError(f"{path}: unknown format {fmt!r}; expected parquet, csv or criteo")
    files = resolve_files(path, fmt)
    source: Path | list[Path] = files[0] if len(files) == 1 else files
    try:
        if fmt == "parquet":
            lf = pl.scan_parquet(source)
            lf.collect_schema()  # reads the footer: fails fast on a corrupt file
            return lf
        if fmt == "csv":
            with open(files[0], "rb") as fh:
                header = fh.readline(1 << 20).decode("utf-8", errors="replace").rstrip("\r\n")
            present = set(header.split(csv_separator))
            overrides = {c: pl.String for c in string_columns or [] if c in present}
            return pl.scan_csv(
                source,
                separator=csv_separator,
                infer_schema_length=10000,
                schema_overrides=overrides or None,
            )
        schema = {"label": pl.Int64}
        schema.update({c: pl.Float64 for c in CRITEO_DENSE})
        schema.update({c: pl.String for c in CRITEO_SPARSE})
        separator, has_header = _criteo_layout(files[0])
        return pl.scan_csv(
            source, separator=separator, has_header=has_header, schema=schema, quote_char=None
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(
            f"{path}: cannot read as {fmt}: {str(exc).splitlines()[0]} "
            "(is a file corrupt, truncated, of another format, or are the shards' columns "
            "different?)"
        ) from None


def read_schema(lf: pl.LazyFrame, path: str | Path) -> pl.Schema:
    try:
        return lf.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path}: cannot read the schema: {str(exc).splitlines()[0]}") from None


def iter_chunks(lf: pl.LazyFrame, path: str | Path, chunk_rows: int) -> Iterator[pl.DataFrame]:
    """Stream ``lf`` in DataFrames of about ``chunk_rows`` rows (bounded memory)."""
    try:
        for chunk in lf.collect_batches(chunk_size=chunk_rows):
            if chunk.height:
                yield chunk
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(
            f"{path}: failed while reading: {str(exc).splitlines()[0]} "
            "(is the file corrupt or truncated?)"
        ) from None
