"""Frequency filter: which value ids were seen at least ``min_count`` times in training.

The kept ids of each filtered feature are fitted on the training split (like the
numeric statistics), stored in the run directory as ``feature_vocab.pt`` and
compiled into the model (see ``PerFeatureEmbedding``), so serving applies the
same filter with no side files.

A feature is filtered when it has ``min_count > 1``, id dropout or ``unseen: own_row``
(:meth:`FeatureSpec.filtered`); its kept ids are those seen ``max(min_count, 1)`` times.
With ``unseen: own_row`` and ``min_count > 1`` the file also holds every id seen at all
(key ``seen@<name>``: seen-but-rare ids read the rare row, never-seen ids their own), and
it records each filtered feature's fitted id dropout (key ``id_dropout@<name>``) so
resume, evaluate and export rebuild the same model, and its training use counts (key
``uses@<name>``: the count of each kept id in kept order, then the rare rows, then the
missing rows) for the linear term's prior (``model.linear.prior_std``).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtrec.data.encode import EncodedChunk
from mtrec.data.errors import DataError
from mtrec.data.hashing import MISSING_ID
from mtrec.data.spec import FeatureSpec
from mtrec.io import atomic_torch_save

__all__ = [
    "IdCensus",
    "IdCounter",
    "fit_kept_ids",
    "load_kept_ids",
    "load_vocab",
    "save_kept_ids",
    "save_vocab",
]

_SEEN = "seen@"
_DROPOUT = "id_dropout@"
_USES = "uses@"


@dataclass
class IdCensus:
    """What training taught one filtered feature: its ids seen at all (sorted int64), the
    training ids (non-missing occurrences), those outside the kept set (rare ids) and
    those whose value occurs once (singletons)."""

    seen: np.ndarray
    rows: int
    rare_rows: int
    singletons: int


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
        # filtered features: keep ids seen max(min_count, 1) times
        self.min_counts = {
            f.name: max(spec.min_count_of(f.name), 1) for f in spec.sparse if spec.filtered(f.name)
        }
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

    def _tallies(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per filtered feature: its sorted ids and their counts, which ids are kept
        (count >= min_count) and which is the missing id."""
        for name, min_count in self.min_counts.items():
            empty = np.zeros(0, dtype=np.int64)
            ids, counts = self.acc[name] or (empty, empty)
            missing = ids == MISSING_ID
            yield name, ids, counts, (counts >= min_count) & ~missing, missing

    def kept(self) -> dict[str, np.ndarray]:
        """Sorted int64 ids with count >= min_count, per filtered feature."""
        return {name: ids[keep].astype(np.int64) for name, ids, _, keep, _ in self._tallies()}

    def uses(self) -> dict[str, np.ndarray]:
        """Per filtered feature, int64 [K + 2]: the training count of each of its K kept ids
        (in :meth:`kept` order), then the rows of its rare ids, then its missing rows."""
        return {
            name: np.concatenate(
                [counts[keep], [counts[~keep & ~missing].sum(), counts[missing].sum()]]
            ).astype(np.int64)
            for name, _, counts, keep, missing in self._tallies()
        }

    def census(self) -> dict[str, IdCensus]:
        """Per filtered feature: ids seen at all, training ids and rare (not kept) ids."""
        out: dict[str, IdCensus] = {}
        for name, ids, counts, keep, missing in self._tallies():
            valid = ~missing
            out[name] = IdCensus(
                ids[valid].astype(np.int64),
                int(counts[valid].sum()),
                int(counts[valid & ~keep].sum()),
                int((valid & (counts == 1)).sum()),
            )
        return out


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
    expected = [f.name for f in spec.sparse if spec.filtered(f.name)]
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


def save_vocab(spec: FeatureSpec, path: str | Path) -> None:
    """Write the kept ids, the seen ids (``unseen: own_row``), the fitted id dropout and the
    use counts of ``spec`` into one file."""
    out: dict[str, torch.Tensor] = {k: torch.from_numpy(v) for k, v in spec.kept_ids.items()}
    out |= {_SEEN + k: torch.from_numpy(v) for k, v in spec.seen_ids.items()}
    out |= {_USES + k: torch.from_numpy(v) for k, v in spec.id_uses.items()}
    for k, p in spec.id_dropout.items():
        out[_DROPOUT + k] = torch.tensor(float(p), dtype=torch.float64)
    atomic_torch_save(out, path)


def load_vocab(path: str | Path, spec: FeatureSpec) -> None:
    """Set ``spec.kept_ids``, ``spec.seen_ids``, ``spec.id_dropout`` and ``spec.id_uses`` from
    :func:`save_vocab`'s file. A run written before id dropout has no probabilities: its
    configured (numeric) ones apply; one written before use counts has none."""
    spec.kept_ids = load_kept_ids(path, spec)
    spec.seen_ids, spec.id_dropout, spec.id_uses = {}, {}, {}
    if not spec.kept_ids:
        return
    raw = torch.load(Path(path), weights_only=True)
    for name in spec.kept_ids:
        if spec.unseen_of(name) == "own_row" and spec.min_count_of(name) > 1:
            if _SEEN + name not in raw:
                raise DataError(f"{path}: the fitted value filter lacks the seen ids of {name!r}")
            spec.seen_ids[name] = raw[_SEEN + name].numpy()
        if _USES + name in raw:
            uses = raw[_USES + name].numpy()
            if len(uses) != len(spec.kept_ids[name]) + 2:
                raise DataError(
                    f"{path}: {_USES + name} holds {len(uses)} counts for "
                    f"{len(spec.kept_ids[name])} kept ids (expected kept + 2); the file was "
                    "modified: retrain the run"
                )
            spec.id_uses[name] = uses
        if _DROPOUT + name in raw:
            spec.id_dropout[name] = float(raw[_DROPOUT + name])
        else:
            p = spec.id_dropout_of(name)
            if p == "auto":
                raise DataError(
                    f"{path}: no fitted id dropout for {name!r} (id_dropout: auto); the run "
                    "directory predates it: retrain"
                )
            spec.id_dropout[name] = float(p)
