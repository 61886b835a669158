"""The streaming batcher: data files → encoded chunks → :class:`Batch` objects.

Memory is bounded by the chunk size (``dataset.chunk_rows``), not the file
size: polars streams the file in chunks, each chunk is encoded to tensors and
cut into batches. For training, rows are shuffled within a chunk (the chunk is
the shuffle buffer) and chunks are visited in file order; with
``training.cache_in_memory`` the encoded split is kept and shuffled globally.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.config import DEFAULT_CHUNK_ROWS
from mtrec.data.batch import Batch
from mtrec.data.columns import read_columns
from mtrec.data.encode import EncodedChunk, encode_chunk, feature_major_ids
from mtrec.data.errors import DataError
from mtrec.data.readers import iter_chunks, read_schema
from mtrec.data.spec import FeatureSpec

__all__ = [
    "encoded_chunks",
    "iter_batches",
    "load_encoded",
    "stream_batches",
    "to_batch",
]


def to_batch(chunk: EncodedChunk, spec: FeatureSpec) -> Batch:
    """Assemble a Batch (KJT in ``spec.sparse`` order) from encoded rows."""
    b = chunk.rows
    values, lengths = feature_major_ids(chunk, spec)
    sparse = KeyedJaggedTensor(keys=spec.sparse_names, values=values, lengths=lengths, stride=b)
    return Batch(
        sparse=sparse,
        dense=chunk.dense,
        labels=chunk.labels,
        true_probs=chunk.true_probs,
        groups=chunk.groups,
    )


def encoded_chunks(
    spec: FeatureSpec, path: str | Path, chunk_rows: int, need_labels: bool = True
) -> Iterator[EncodedChunk]:
    """Stream a data file as encoded chunks of about ``chunk_rows`` rows."""
    lf = spec.scan(path)
    spec.check_schema(read_schema(lf, path), path, need_labels=need_labels)
    offset, seen = 0, False
    for df in iter_chunks(lf.select(read_columns(spec, need_labels)), path, chunk_rows):
        seen = True
        yield encode_chunk(df, spec, str(path), row_offset=offset, need_labels=need_labels)
        offset += df.height
    if not seen:
        raise DataError(f"{path}: file has no rows; expected at least one")


def load_encoded(spec: FeatureSpec, path: str | Path, chunk_rows: int) -> EncodedChunk:
    """The whole file encoded in memory (for splits that fit)."""
    return EncodedChunk.concat(list(encoded_chunks(spec, path, chunk_rows)))


def _batches_of(
    chunk: EncodedChunk, spec: FeatureSpec, batch_size: int, generator: torch.Generator | None
) -> Iterator[Batch]:
    if generator is not None:
        order = torch.randperm(chunk.rows, generator=generator)
        for start in range(0, chunk.rows, batch_size):
            yield to_batch(chunk.take(order[start : start + batch_size]), spec)
    else:
        for start in range(0, chunk.rows, batch_size):
            yield to_batch(chunk.slice(start, min(start + batch_size, chunk.rows)), spec)


def stream_batches(
    chunks: Iterable[EncodedChunk],
    spec: FeatureSpec,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[Batch]:
    """Batches of a stream of encoded chunks: each chunk permuted with ``generator`` (if
    given), rows left over at a chunk's end rolled into the next one, so every batch but
    the last has exactly ``batch_size`` rows."""
    carry: EncodedChunk | None = None
    for chunk in chunks:
        if carry is not None:
            chunk = EncodedChunk.concat([carry, chunk])
        if generator is not None:
            chunk = chunk.take(torch.randperm(chunk.rows, generator=generator))
        full = chunk.rows - chunk.rows % batch_size
        for start in range(0, full, batch_size):
            yield to_batch(chunk.slice(start, start + batch_size), spec)
        carry = chunk.slice(full, chunk.rows) if full < chunk.rows else None
    if carry is not None:
        yield to_batch(carry, spec)


def iter_batches(
    source: EncodedChunk | str | Path,
    spec: FeatureSpec,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[Batch]:
    """Batches from an in-memory encoded split or by streaming a file.

    ``shuffle`` permutes rows with a generator seeded by ``seed`` (pass e.g.
    ``seed + epoch`` for a new, reproducible order each epoch). When streaming,
    rows left over at the end of a chunk roll into the next one, so every batch
    but the last has exactly ``batch_size`` rows.
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    if isinstance(source, EncodedChunk):
        yield from _batches_of(source, spec, batch_size, generator)
        return
    yield from stream_batches(encoded_chunks(spec, source, chunk_rows), spec, batch_size, generator)
