"""Per-worker data for distributed training: disjoint row ranges read with polars.

Each worker reads only its own contiguous rows ``[start, stop)`` of a split: polars
pushes the row slice down into the parquet reader, which skips the row groups (and,
for a sharded dataset, the files) outside it. Rows are encoded by the same
``encode_chunk`` as the local loop, so one worker sees exactly the rows and order of
a local run.

Why not Ray Data: it would add a second process pool and object-store copies on
machines that are CPU-bound already, and a different encoding path; a row range
per worker is all that sharding needs here.

Two kinds of shards:

* **train**: every worker gets ``total // W`` rows, so all take the same number of
  steps per epoch (the sharded embeddings' collectives need every worker in every
  step); the last ``total % W`` rows (fewer than W) are not trained on.
* **eval**: shards cover every row (sizes differ by at most one). Every worker runs the
  same number of same-sized forward passes (:func:`padded_eval_batches` pads short
  batches with repeats of a real row and reports how many rows are real).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mtrec.data.batch import Batch
from mtrec.data.batcher import iter_batches, stream_batches, to_batch
from mtrec.data.columns import count_rows, read_columns
from mtrec.data.encode import EncodedChunk, encode_chunk
from mtrec.data.errors import DataError
from mtrec.data.readers import iter_chunks, read_schema
from mtrec.data.spec import FeatureSpec

__all__ = [
    "RowRange",
    "count_rows",
    "eval_shard",
    "load_shard",
    "padded_eval_batches",
    "shard_chunks",
    "train_batches",
    "train_shard",
]


@dataclass(frozen=True)
class RowRange:
    """Rows ``[start, stop)`` of a split (over its files in name order)."""

    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def train_shard(total_rows: int, rank: int, world_size: int) -> RowRange:
    """Worker ``rank``'s training rows: ``total_rows // world_size`` of them, contiguous."""
    per = total_rows // world_size
    return RowRange(rank * per, (rank + 1) * per)


def eval_shard(total_rows: int, rank: int, world_size: int) -> RowRange:
    """Worker ``rank``'s evaluation rows; the shards of all ranks cover every row in order."""
    return RowRange(rank * total_rows // world_size, (rank + 1) * total_rows // world_size)


def shard_chunks(
    spec: FeatureSpec, path: str | Path, rows: RowRange, chunk_rows: int
) -> Iterator[EncodedChunk]:
    """Stream rows ``rows`` of the split at ``path`` as encoded chunks (bounded memory)."""
    lf = spec.scan(path)
    spec.check_schema(read_schema(lf, path), path)
    offset = rows.start
    sliced = lf.select(read_columns(spec)).slice(rows.start, rows.rows)
    for df in iter_chunks(sliced, path, chunk_rows):
        yield encode_chunk(df, spec, str(path), row_offset=offset)
        offset += df.height
    if offset != rows.stop:
        raise DataError(
            f"{path}: expected rows {rows.start}..{rows.stop}, the file ended at row {offset}; "
            "was it changed during training?"
        )


def load_shard(
    spec: FeatureSpec, path: str | Path, rows: RowRange, chunk_rows: int
) -> EncodedChunk:
    """Rows ``rows`` of the split at ``path``, encoded in memory."""
    return EncodedChunk.concat(list(shard_chunks(spec, path, rows, chunk_rows)))


def train_batches(
    source: EncodedChunk | tuple[str, RowRange],
    spec: FeatureSpec,
    batch_size: int,
    seed: int,
    chunk_rows: int,
) -> Iterator[Batch]:
    """One epoch of shuffled training batches of a worker's shard.

    ``source`` is the shard in memory (shuffled globally, exactly as
    :func:`mtrec.data.batcher.iter_batches`), or ``(path, rows)`` to stream it (each
    chunk shuffled, leftover rows rolled into the next chunk, as the local streaming
    path does). Equal shards give every worker the same number of batches.
    """
    if isinstance(source, EncodedChunk):
        yield from iter_batches(source, spec, batch_size, shuffle=True, seed=seed)
        return
    path, rows = source
    generator = torch.Generator().manual_seed(seed)
    yield from stream_batches(
        shard_chunks(spec, path, rows, chunk_rows), spec, batch_size, generator
    )


def padded_eval_batches(
    shard: EncodedChunk,
    spec: FeatureSpec,
    batch_size: int,
    total_rows: int,
    rank: int,
    world_size: int,
) -> Iterator[tuple[Batch, int]]:
    """``(batch, real_rows)`` over a worker's eval shard (:func:`eval_shard`), in row order.

    Every rank yields the same number of batches, and batch k has the same size on every
    rank (the largest real size among ranks); rows past ``real_rows`` repeat the shard's
    first row and their outputs must be dropped. Needs a non-empty shard
    (``total_rows >= world_size``).
    """
    sizes = [eval_shard(total_rows, r, world_size).rows for r in range(world_size)]
    if min(sizes) == 0:
        raise DataError(
            f"the split has {total_rows} rows, fewer than the {world_size} workers; "
            "use fewer workers"
        )
    steps = max(math.ceil(s / batch_size) for s in sizes)
    mine = shard.rows
    for k in range(steps):
        start = k * batch_size
        want = max(min(batch_size, s - start) for s in sizes)
        real = max(0, min(batch_size, mine - start))
        if real == want:
            yield to_batch(shard.slice(start, start + real), spec), real
            continue
        index = torch.cat(
            [torch.arange(start, start + real), torch.zeros(want - real, dtype=torch.long)]
        )
        yield to_batch(shard.take(index), spec), real
