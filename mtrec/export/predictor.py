"""Batch scoring of a data file through an exported model (streaming)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mtrec.config import DEFAULT_CHUNK_ROWS, FeatureConfig, TaskConfig
from mtrec.data.batcher import encoded_chunks, to_batch
from mtrec.data.spec import FeatureSpec
from mtrec.export.exporter import load_exported
from mtrec.io import atomic_path

__all__ = ["predict_file", "spec_from_signature"]


def spec_from_signature(signature: dict[str, Any], data_format: str) -> FeatureSpec:
    """The FeatureSpec an exported model expects (no labels needed)."""
    sparse = [
        FeatureConfig(
            name=f["name"],
            kind=f["kind"],
            column=f["column"],
            delimiter=f.get("delimiter"),
            pooling=f.get("pooling", "sum"),
        )
        for f in signature["sparse_features"]
    ]
    numeric = [
        FeatureConfig(
            name=f["name"], kind="numeric", column=f["column"], transform=f.get("transform", "none")
        )
        for f in signature["numeric_features"]
    ]
    return FeatureSpec(
        sparse=sparse,
        numeric=numeric,
        tasks=[TaskConfig(name=t) for t in signature["tasks"]],
        data_format=data_format,
        # the exported module fills null / NaN numerics itself; scoring must not refuse them
        nan_policy="fill",
        fill_value=signature.get("fill_value", 0.0),
    )


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv",):
        return "csv"
    if suffix in (".txt", ".tsv"):
        return "criteo"
    return "parquet"


@torch.no_grad()
def predict_file(
    model_path: str | Path,
    input_path: str | Path,
    out: str | Path | None = None,
    batch_size: int = 8192,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, Any]:
    """Score every row of ``input_path``; write one probability column per task."""
    t0 = time.perf_counter()
    module, signature = load_exported(model_path)
    input_path = Path(input_path)
    spec = spec_from_signature(signature, _format_of(input_path))
    out = Path(out) if out else input_path.with_name(input_path.stem + ".predictions.parquet")
    parts: list[np.ndarray] = []
    for chunk in encoded_chunks(spec, input_path, chunk_rows, need_labels=False):
        for start in range(0, chunk.rows, batch_size):
            batch = to_batch(chunk.slice(start, min(start + batch_size, chunk.rows)), spec)
            kjt = batch.sparse
            parts.append(module(kjt.values(), kjt.lengths(), batch.dense).numpy())
    probs = np.concatenate(parts) if parts else np.zeros((0, len(spec.tasks)), np.float32)
    frame = pl.DataFrame({t: probs[:, i] for i, t in enumerate(spec.task_names)})
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".csv":
            frame.write_csv(tmp)
        else:
            frame.write_parquet(tmp)
    return {
        "out": str(out),
        "rows": int(probs.shape[0]),
        "tasks": spec.task_names,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
