"""Numeric values in float64: the transforms, the float32 range, and one-pass statistics.

Raw numeric values stay float64 from the file to the model's normaliser
(``mtrec.embeddings.numeric``); only normalised values are cast to float32. Casting
earlier loses what the model needs: ``1e8 + N(0, 1)`` (or a unix timestamp) rounds to
multiples of 8 in float32, and ``1e300`` becomes ``inf``.

* :func:`transformed`: ``f(x)`` of each feature (``sign(x)·log1p(|x|)`` or identity);
* :func:`representable`: whether ``f(x)`` fits float32 (beyond it a value is treated
  like a non-finite one: ``dataset.nan_policy`` applies);
* :class:`RunningMoments`: mean and variance merged chunk by chunk (Chan et al.),
  accurate for data far from zero, where ``E[x²] - E[x]²`` cancels to noise;
* :class:`QuantileSample`: a seeded uniform sample of at most ``capacity`` values per
  column (all of them when fewer), for medians / quartiles in one streaming pass.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FLOAT32_MAX",
    "LOG_TRANSFORMS",
    "QuantileSample",
    "RunningMoments",
    "representable",
    "transformed",
]

FLOAT32_MAX = float(np.finfo(np.float32).max)
LOG_TRANSFORMS = ("log1p", "log1p_standardize")


def transformed(x: np.ndarray, log: np.ndarray) -> np.ndarray:
    """``f(x)`` of N x F float64 values; ``log`` (bool [F]) marks the log1p features."""
    with np.errstate(invalid="ignore"):
        return np.where(log, np.sign(x) * np.log1p(np.abs(x)), x)


def representable(t: np.ndarray) -> np.ndarray:
    """Whether transformed values are finite and within the float32 range (bool, same shape)."""
    with np.errstate(invalid="ignore"):
        return np.abs(t) <= FLOAT32_MAX


class RunningMoments:
    """Count, mean and sum of squared deviations (M2) of F columns, over finite entries.

    Each chunk's mean and M2 are taken about its own mean, then merged with the running
    ones (Chan, Golub & LeVeque): no large sums of squares that cancel.
    """

    def __init__(self, width: int) -> None:
        self.count = np.zeros(width)
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)

    def add(self, x: np.ndarray, ok: np.ndarray) -> None:
        """Merge the entries of N x F ``x`` where ``ok`` (bool N x F) is set."""
        n = ok.sum(0).astype(np.float64)
        has = n > 0
        safe = np.where(has, n, 1.0)
        v = np.where(ok, x, 0.0)
        mean = v.sum(0) / safe
        m2 = (np.where(ok, x - mean, 0.0) ** 2).sum(0)
        total = self.count + n
        delta = mean - self.mean
        share = np.where(has, n / np.where(total > 0, total, 1.0), 0.0)
        self.m2 = np.where(has, self.m2 + m2 + delta * delta * self.count * share, self.m2)
        self.mean = np.where(has, self.mean + delta * share, self.mean)
        self.count = total

    def std(self) -> np.ndarray:
        """Population standard deviation per column (0 where no entry)."""
        return np.sqrt(self.m2 / np.where(self.count > 0, self.count, 1.0))


class QuantileSample:
    """A uniform sample without replacement of at most ``capacity`` entries per column.

    Every entry draws a key from a generator seeded with ``seed`` (in file order, so the
    sample does not depend on the chunk size); a column keeps the entries of its
    ``capacity`` smallest keys. With fewer entries than ``capacity`` it holds them all
    and its quantiles are exact.
    """

    def __init__(self, width: int, capacity: int = 1 << 16, seed: int = 0) -> None:
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.keys = [np.empty(0, dtype=np.float32) for _ in range(width)]
        self.values = [np.empty(0) for _ in range(width)]

    def add(self, x: np.ndarray, ok: np.ndarray) -> None:
        """Offer the entries of N x F ``x`` where ``ok`` (bool N x F) is set."""
        keys = self.rng.random(x.shape, dtype=np.float32)  # float32: half the cost
        # a full column only admits keys below its largest kept key
        bound = [k.max() if len(k) >= self.capacity else np.inf for k in self.keys]
        candidate = ok & (keys < np.array(bound, dtype=np.float32))
        cols, rows = np.nonzero(candidate.T)  # grouped by column
        edges = np.searchsorted(cols, np.arange(x.shape[1] + 1))
        new_keys, new_values = keys[rows, cols], x[rows, cols]
        for j in range(x.shape[1]):
            a, b = edges[j], edges[j + 1]
            if a == b:
                continue
            k = np.concatenate([self.keys[j], new_keys[a:b]])
            v = np.concatenate([self.values[j], new_values[a:b]])
            if len(k) > self.capacity:
                keep = np.argpartition(k, self.capacity - 1)[: self.capacity]
                k, v = k[keep], v[keep]
            self.keys[j], self.values[j] = k, v

    def quantiles(self, j: int, q: list[float]) -> np.ndarray | None:
        """Quantiles ``q`` of column ``j`` (linear interpolation); None if it has no entry."""
        if not len(self.values[j]):
            return None
        return np.quantile(self.values[j], q)

    def column(self, j: int) -> np.ndarray:
        return self.values[j]
