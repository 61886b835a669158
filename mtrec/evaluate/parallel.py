"""Scoring a split in disjoint row ranges: in process, or as parallel Ray tasks.

A split of R rows (one file, a directory of shards or a glob: read as one table in
file order) is cut into ``workers`` contiguous row ranges whose boundaries are
multiples of the batch size. Each range is streamed chunk by chunk (memory bounded by
``dataset.chunk_rows``) and cut into exactly the batches a single process would build,
so every row is scored in the same batch with the same weights. The driver
concatenates the ranges' labels / probabilities in row order: the collected arrays,
and therefore every metric, are identical to ``--workers 1``.

Ray (:func:`mtrec.cluster.ray_session`): without ``address`` (and without
``RAY_ADDRESS``) an embedded local instance is started on 127.0.0.1 with no dashboard and
stopped afterwards; with one, the tasks run on that cluster. Workers load the run
themselves, so the run directory and the data must be readable at the same paths on
every node (a shared filesystem).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mtrec.cluster import ray_session
from mtrec.data.batch import Batch
from mtrec.data.batcher import iter_batches
from mtrec.data.columns import count_rows, read_columns
from mtrec.data.encode import EncodedChunk, encode_chunk
from mtrec.data.readers import iter_chunks, read_schema
from mtrec.data.spec import FeatureSpec
from mtrec.metrics import ScoreCollector
from mtrec.run import load_trained_model
from mtrec.scoring import score_batches

__all__ = [
    "collect_scores_sharded",
    "count_rows",
    "iter_range_batches",
    "merge_collectors",
    "ray_session",
    "score_range",
    "score_ranges_locally",
    "shard_ranges",
]


def shard_ranges(rows: int, shards: int, align: int) -> list[tuple[int, int]]:
    """At most ``shards`` contiguous, disjoint ``[lo, hi)`` ranges covering ``range(rows)``,
    every inner boundary a multiple of ``align``, sizes as even as that allows.

    Example::

        shard_ranges(10, 3, align=2)  # [(0, 4), (4, 8), (8, 10)]
    """
    if shards < 1 or align < 1:
        raise ValueError(f"shards and align must be >= 1, got {shards}, {align}")
    blocks = -(-rows // align)  # ceil: the last block may be partial
    shards = max(1, min(shards, blocks))
    cuts = [min(rows, -(-blocks * k // shards) * align) for k in range(shards + 1)]
    return [(lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo]


def iter_range_batches(
    spec: FeatureSpec,
    path: str | Path,
    lo: int,
    hi: int,
    batch_size: int,
    chunk_rows: int,
) -> Iterator[Batch]:
    """Batches of rows ``[lo, hi)`` of the dataset, streamed; the same batches as
    ``iter_batches(path, ...)`` builds for these rows when ``lo`` is a multiple of
    ``batch_size``."""
    lf = spec.scan(path)
    spec.check_schema(read_schema(lf, path), path)
    lf = lf.select(read_columns(spec)).slice(lo, hi - lo)
    carry: EncodedChunk | None = None
    offset = lo
    for df in iter_chunks(lf, path, chunk_rows):
        chunk = encode_chunk(df, spec, str(path), row_offset=offset)
        offset += df.height
        if carry is not None:
            chunk = EncodedChunk.concat([carry, chunk])
        full = chunk.rows - chunk.rows % batch_size
        if full:
            yield from iter_batches(chunk.slice(0, full), spec, batch_size)
        carry = chunk.slice(full, chunk.rows) if full < chunk.rows else None
    if carry is not None:
        yield from iter_batches(carry, spec, batch_size)


@torch.no_grad()
def score_range(
    model: torch.nn.Module,
    spec: FeatureSpec,
    path: str | Path,
    lo: int,
    hi: int,
    batch_size: int,
    chunk_rows: int,
) -> ScoreCollector:
    """Labels, probabilities (and true probs / group ids) of rows ``[lo, hi)``."""
    batches = iter_range_batches(spec, path, lo, hi, batch_size, chunk_rows)
    return score_batches(model, batches, min(hi - lo, 1 << 20))


def _arrays(collector: ScoreCollector) -> dict[str, np.ndarray | None]:
    return {
        "labels": collector.labels.copy(),
        "probs": collector.probs.copy(),
        "true_probs": None if collector.true_probs is None else collector.true_probs.copy(),
        "groups": None if collector.groups is None else collector.groups.copy(),
    }


def _score_range_task(
    run_dir: str, path: str, lo: int, hi: int, threads: int
) -> dict[str, np.ndarray | None]:
    """Body of one Ray task: load the run, score its rows, return plain arrays."""
    torch.set_num_threads(threads)
    cfg, spec, model = load_trained_model(run_dir)
    collector = score_range(
        model, spec, path, lo, hi, cfg.training.eval_batch_size, cfg.dataset.chunk_rows
    )
    return _arrays(collector)


def collect_scores_sharded(
    run_dir: str | Path,
    spec: FeatureSpec,
    path: str | Path,
    workers: int,
    batch_size: int,
    chunk_rows: int,
    threads: int = 1,
    address: str | None = None,
) -> ScoreCollector:
    """Score ``path`` in ``workers`` disjoint row ranges as Ray tasks (one CPU each, each
    with ``threads`` torch threads); merged in row order into one collector."""
    import ray

    ranges = shard_ranges(count_rows(spec, path), workers, batch_size)
    with ray_session(address, num_cpus=len(ranges)):
        task = ray.remote(num_cpus=1, max_retries=0)(_score_range_task)
        refs = [task.remote(str(run_dir), str(path), lo, hi, threads) for lo, hi in ranges]
        try:
            parts = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            # re-raise the worker's own error (a DataError naming the file, say) without
            # Ray's traceback wrapper, so the CLI prints its one-line message
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
    merged = ScoreCollector(initial_capacity=max(1, sum(hi - lo for lo, hi in ranges)))
    for part in parts:
        if part["labels"].shape[0]:
            merged.add(**part)
    return merged


def merge_collectors(parts: list[ScoreCollector]) -> ScoreCollector:
    """Concatenate collectors in order (the in-process counterpart of the Ray merge)."""
    merged = ScoreCollector(initial_capacity=max(1, sum(len(p) for p in parts)))
    for part in parts:
        if len(part):
            merged.add(**_arrays(part))
    return merged


def score_ranges_locally(
    model: torch.nn.Module,
    spec: FeatureSpec,
    path: str | Path,
    ranges: list[tuple[int, int]],
    batch_size: int,
    chunk_rows: int,
) -> ScoreCollector:
    """Score each range in this process and merge: what the Ray path does, without Ray."""
    return merge_collectors(
        [score_range(model, spec, path, lo, hi, batch_size, chunk_rows) for lo, hi in ranges]
    )
