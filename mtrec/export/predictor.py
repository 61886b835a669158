"""Batch scoring of a data file through an exported model, streaming.

The input is read chunk by chunk with the training reader and encoder
(``encoded_chunks``), each chunk is scored in batches through the exported file and
written out at once (one parquet row group / a block of CSV lines per chunk), so
memory is bounded by ``chunk_rows`` whatever the file size. The output appears
atomically: a temporary file renamed over ``out`` when every row is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mtrec.config import DEFAULT_CHUNK_ROWS
from mtrec.data.batcher import encoded_chunks
from mtrec.data.errors import DataError
from mtrec.data.readers import resolve_files
from mtrec.io import atomic_path
from mtrec.serving import chunk_inputs, load_model, spec_from_signature

__all__ = ["input_format", "predict_file"]

_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".txt": "criteo",
    ".tsv": "criteo",
}


def input_format(path: str | Path, default: str = "parquet") -> str:
    """The reader for ``path`` by its suffix; a directory by the suffix of its files."""
    p = Path(path)
    if p.is_dir():
        found = {_FORMATS[f.suffix.lower()] for f in p.iterdir() if f.suffix.lower() in _FORMATS}
        if len(found) == 1 or default in found:
            return found.pop() if len(found) == 1 else default
        raise DataError(
            f"{path}: directory holds "
            + (f"several formats {sorted(found)}" if found else "no .parquet / .csv / .txt files")
            + "; pass one file or a glob such as DIR/part-*.parquet"
        )
    suffix = p.suffix.lower()
    if suffix in _FORMATS:
        return _FORMATS[suffix]
    raise DataError(
        f"{path}: cannot tell the input format from the suffix {suffix or '(none)'!r}; "
        "expected .parquet / .pq, .csv, or .txt / .tsv (Criteo layout)"
    )


class _Writer:
    """Appends blocks of probabilities (one column per task) to a parquet or CSV file."""

    def __init__(self, path: Path, tasks: list[str], csv: bool) -> None:
        self.path, self.tasks, self.csv = path, tasks, csv
        self._parquet: pq.ParquetWriter | None = None
        self._csv: IO[bytes] | None = None
        self.schema = pa.schema([(t, pa.float32()) for t in tasks])

    def write(self, probs: np.ndarray) -> None:
        frame = pl.DataFrame(
            {t: probs[:, i] for i, t in enumerate(self.tasks)},
            schema={t: pl.Float32 for t in self.tasks},
        )
        if self.csv:
            if self._csv is None:
                self._csv = open(self.path, "wb")  # closed in close()
                frame.write_csv(self._csv, include_header=True)
            else:
                frame.write_csv(self._csv, include_header=False)
            return
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.path, self.schema)
        self._parquet.write_table(frame.to_arrow().cast(self.schema))

    def close(self) -> None:
        if self._parquet is None and self._csv is None:  # no rows: header / schema only
            self.write(np.zeros((0, len(self.tasks)), np.float32))
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._csv.close()


@torch.no_grad()
def predict_file(
    model_path: str | Path,
    input_path: str | Path,
    out: str | Path | None = None,
    batch_size: int = 8192,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, Any]:
    """Score every row of ``input_path`` (a file, a directory of shards or a glob) and
    write one probability column per task, rows in input order.

    ``out`` ending in ``.csv`` is written as CSV, anything else as parquet (default:
    ``<input stem>.predictions.parquet`` beside the input).
    """
    if batch_size <= 0 or chunk_rows <= 0:
        raise ValueError(f"batch_size ({batch_size}) and chunk_rows ({chunk_rows}) must be > 0")
    t0 = time.perf_counter()
    module, signature = load_model(model_path)
    input_path = Path(input_path)
    fmt = input_format(input_path, signature.data_format)
    spec = spec_from_signature(signature, fmt)
    if out is None:
        stem = input_path.stem.replace("*", "_")
        out = input_path.parent / f"{stem}.predictions.parquet"
    out = Path(out)
    inputs = {f.resolve() for f in resolve_files(input_path, fmt)}
    if out.resolve() in inputs:
        raise DataError(f"{out}: the output would overwrite the input; choose another --out")
    rows = 0
    with atomic_path(out) as tmp:
        writer = _Writer(tmp, spec.task_names, csv=out.suffix.lower() == ".csv")
        try:
            for chunk in encoded_chunks(spec, input_path, chunk_rows, need_labels=False):
                parts = [
                    module(*chunk_inputs(chunk.slice(s, min(s + batch_size, chunk.rows)), spec))
                    for s in range(0, chunk.rows, batch_size)
                ]
                writer.write(torch.cat(parts).numpy())
                rows += chunk.rows
        finally:
            writer.close()
    return {
        "out": str(out),
        "rows": rows,
        "tasks": spec.task_names,
        "model": str(model_path),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
