"""Frequency filter: which value ids were seen at least ``min_count`` times in training.

The kept ids of each filtered feature are fitted on the training split (like the
numeric statistics), stored in the run directory as ``feature_vocab.pt`` and
compiled into the model (see ``PerFeatureEmbedding``), so serving applies the
same filter with no side files.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from mtrec.data.encode import EncodedChunk
from mtrec.data.errors import DataError
from mtrec.data.hashing import MISSING_ID
from mtrec.data.spec import FeatureSpec
from mtrec.io import atomic_torch_save

__all__ = ["IdCounter", "fit_kept_ids", "load_kept_ids", "save_kept_ids"]


def _merge(
    acc: tuple[np.ndarray, np.ndarray] | None, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    uniq, counts = np.unique(ids, return_counts=True)
    if acc is None:
        return uniq, counts
    both = np.concatenate([acc[0], uniq])
    weights = np.concatenate([acc[1], counts])
    merged, inverse = np.unique(both, return_inverse=True)
    return merged, np.bincount(inverse, weights=weights).astype(np.int64)


class IdCounter:
    """Counts value ids per filtered feature over encoded chunks (one chunk at a time)."""

    def __init__(self, spec: FeatureSpec) -> None:
        counts = {f.name: spec.min_count_of(f.name) for f in spec.sparse}
        self.min_counts = {k: v for k, v in counts.items() if v > 1}
        cats = [f for f in spec.sparse if f.kind == "categorical"]
        multis = [f for f in spec.sparse if f.kind == "multi_hot"]
        self.cat_index = {f.name: j for j, f in enumerate(cats)}
        self.multi_index = {f.name: j for j, f in enumerate(multis)}
        self.acc: dict[str, tuple[np.ndarray, np.ndarray] | None] = dict.fromkeys(self.min_counts)

    def add(self, chunk: EncodedChunk) -> None:
        for name in self.min_counts:
            if name in self.cat_index:
                ids = chunk.cat_ids[:, self.cat_index[name]].numpy()
            else:
                ids = chunk.multi_values[self.multi_index[name]].numpy()
            self.acc[name] = _merge(self.acc[name], ids)

    def kept(self) -> dict[str, np.ndarray]:
        """Sorted int64 ids with count >= min_count, per filtered feature."""
        kept: dict[str, np.ndarray] = {}
        for name, min_count in self.min_counts.items():
            pair = self.acc[name]
            if pair is None:
                kept[name] = np.zeros(0, dtype=np.int64)
                continue
            ids, counts = pair
            keep = (counts >= min_count) & (ids != MISSING_ID)
            kept[name] = ids[keep].astype(np.int64)  # np.unique output is sorted
        return kept


def fit_kept_ids(spec: FeatureSpec, chunks: Iterable[EncodedChunk]) -> dict[str, np.ndarray]:
    """Sorted int64 ids with count >= min_count, per filtered feature (streams the chunks)."""
    counter = IdCounter(spec)
    for chunk in chunks:
        counter.add(chunk)
    return counter.kept()


def save_kept_ids(kept: dict[str, np.ndarray], path: str | Path) -> None:
    atomic_torch_save({k: torch.from_numpy(v) for k, v in kept.items()}, path)


def load_kept_ids(path: str | Path, spec: FeatureSpec) -> dict[str, np.ndarray]:
    path = Path(path)
    expected = [f.name for f in spec.sparse if spec.min_count_of(f.name) > 1]
    if not expected:
        return {}
    try:
        raw = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: cannot read the fitted value filter: {exc}") from None
    missing = [n for n in expected if n not in raw]
    if missing:
        raise DataError(f"{path}: the fitted value filter lacks features {missing}")
    return {n: raw[n].numpy() for n in expected}
