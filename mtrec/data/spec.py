"""FeatureSpec: what the model reads from a data file, and how.

Built from an :class:`~mtrec.config.ExperimentConfig`. It fixes the order of
sparse features (the KJT keys), numeric features (dense columns) and tasks,
validates a file's schema against it, and holds the numeric normalisation
statistics fitted on the training split (stored in the run directory as
``feature_stats.json``).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from mtrec.config import ExperimentConfig, FeatureConfig, TaskConfig
from mtrec.data.errors import DataError
from mtrec.data.readers import scan

__all__ = ["FeatureSpec", "NumericStats"]


@dataclass
class NumericStats:
    """Normalisation of one numeric feature: ``(f(x) - mean) / std`` with ``f`` the transform.

    For ``robust``, ``mean`` is the median and ``std`` is ``IQR / 1.349``; the model clips
    the result to ``±ROBUST_CLIP`` (``mtrec.embeddings.numeric``).

    ``edges``: with ``model.embedding.numeric_bins`` K > 0, the K+1 bin edges of the
    piecewise-linear encoding (``mtrec.embeddings.piecewise``): the training split's
    quantiles at 0, 1/K, ..., 1, normalised as above; None when off (and in files written
    before the encoding existed).
    """

    transform: str
    mean: float = 0.0
    std: float = 1.0
    edges: list[float] | None = None


@dataclass
class FeatureSpec:
    sparse: list[FeatureConfig]
    numeric: list[FeatureConfig]
    tasks: list[TaskConfig]
    group_key: str | None = None
    data_format: str = "parquet"
    csv_separator: str = ","
    nan_policy: str = "fail"
    fill_value: float = 0.0
    default_min_count: int = 0
    default_id_dropout: float | str = 0.0
    default_unseen: str = "rare"
    # K quantile bins per numeric feature for the piecewise-linear encoding (0: off)
    numeric_bins: int = 0
    numeric_stats: dict[str, NumericStats] = field(default_factory=dict)
    # sorted ids seen >= min_count times in training, per filtered feature (mtrec.data.vocab)
    kept_ids: dict[str, Any] = field(default_factory=dict)
    # sorted ids seen at least once in training, per feature with ``unseen: own_row``
    seen_ids: dict[str, Any] = field(default_factory=dict)
    # fitted id dropout probability per filtered feature (``auto`` resolved; mtrec.data.vocab)
    id_dropout: dict[str, float] = field(default_factory=dict)
    # per filtered feature, int64 [K + 2]: training count of each kept id (kept_ids order),
    # then the rare rows, then the missing rows (mtrec.data.vocab.IdCounter.uses)
    id_uses: dict[str, Any] = field(default_factory=dict)
    # training census of each filtered feature (transient: fitted, never stored)
    id_census: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> FeatureSpec:
        return cls(
            sparse=cfg.features_of("categorical", "multi_hot"),
            numeric=cfg.features_of("numeric"),
            tasks=list(cfg.tasks),
            group_key=cfg.group_key,
            data_format=cfg.dataset.format,
            csv_separator=cfg.dataset.csv_separator,
            nan_policy=cfg.dataset.nan_policy,
            fill_value=cfg.dataset.fill_value,
            default_min_count=cfg.model.embedding.min_count,
            default_id_dropout=cfg.model.embedding.id_dropout,
            default_unseen=cfg.model.embedding.unseen,
            numeric_bins=cfg.model.embedding.numeric_bins,
        )

    def min_count_of(self, name: str) -> int:
        """The frequency threshold of a sparse feature (0 or 1: no filter)."""
        for f in self.sparse:
            if f.name == name:
                return self.default_min_count if f.min_count is None else f.min_count
        raise KeyError(name)

    def _feature(self, name: str) -> FeatureConfig:
        for f in self.sparse:
            if f.name == name:
                return f
        raise KeyError(name)

    def id_dropout_of(self, name: str) -> float | str:
        """The configured id dropout of a sparse feature: a probability or ``"auto"``."""
        value = getattr(self._feature(name), "id_dropout", None)
        return self.default_id_dropout if value is None else value

    def unseen_of(self, name: str) -> str:
        """Where ids absent from training go: ``"rare"`` or ``"own_row"``."""
        value = getattr(self._feature(name), "unseen", None)
        return self.default_unseen if value is None else value

    def filtered(self, name: str) -> bool:
        """Whether the model maps this feature's ids through a fitted id set: a frequency
        filter (min_count > 1), id dropout or a row of its own for unseen ids."""
        return (
            self.min_count_of(name) > 1
            or self.id_dropout_of(name) != 0
            or self.unseen_of(name) == "own_row"
        )

    # ------------------------------------------------------------------ names

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @property
    def numeric_names(self) -> list[str]:
        return [f.name for f in self.numeric]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def has_true_probs(self) -> bool:
        return all(t.true_prob for t in self.tasks)

    @property
    def field_names(self) -> list[str]:
        """The deep model's fields in token order: the sparse features it reads (all but
        those with ``deep: false``, which feed only the linear term), then the numeric
        features."""
        return [f.name for f in self.sparse if f.deep] + self.numeric_names

    # ------------------------------------------------------------- validation

    def scan(self, path: str | Path) -> pl.LazyFrame:
        text = [f.source for f in self.sparse if f.kind == "categorical" or f.delimiter]
        return scan(path, self.data_format, self.csv_separator, string_columns=text)

    def check_schema(self, schema: pl.Schema, path: str | Path, need_labels: bool = True) -> None:
        """Raise :class:`DataError` if a column is missing or of the wrong dtype."""
        present = list(schema.names())

        def need(column: str, role: str) -> pl.DataType:
            if column not in schema:
                close = difflib.get_close_matches(column, present, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise DataError(
                    f"{path}: column '{column}' ({role}) is missing.{hint} "
                    f"Columns present: {', '.join(present[:40])}"
                    + (" ..." if len(present) > 40 else "")
                )
            return schema[column]

        for f in self.sparse:
            dt = need(f.source, f"{f.kind} feature '{f.name}'")
            if f.kind == "categorical":
                ok = (
                    dt.is_integer()
                    or dt.is_float()
                    or dt in (pl.String, pl.Categorical, pl.Null)
                    or isinstance(dt, pl.Enum)
                )
                expected = "string, integer or float values"
            else:
                inner = dt.inner if isinstance(dt, pl.List) else None
                ok = (inner is not None and (inner.is_integer() or inner == pl.String)) or (
                    dt == pl.String and f.delimiter is not None
                )
                expected = "a list of strings/integers, or a string with `delimiter:` set"
            if not ok and f.kind == "multi_hot" and dt == pl.String:
                raise DataError(
                    f"{path}: column '{f.source}' (multi_hot feature '{f.name}') holds text but "
                    "the feature sets no `delimiter`; set `delimiter:` to the text between "
                    "tokens (e.g. '|' or ' '; text is never split on ',' by default), or store "
                    "the column as a list"
                )
            if not ok:
                raise DataError(
                    f"{path}: column '{f.source}' (feature '{f.name}') has dtype {dt}; "
                    f"expected {expected}"
                )
        for f in self.numeric:
            dt = need(f.source, f"numeric feature '{f.name}'")
            if not (dt.is_numeric() or dt in (pl.Boolean, pl.Null)):
                raise DataError(
                    f"{path}: column '{f.source}' (numeric feature '{f.name}') has dtype {dt}; "
                    "expected a numeric column (int or float). Declare it `kind: categorical` "
                    "if its values are categories."
                )
        if need_labels:
            for t in self.tasks:
                dt = need(t.source, f"label of task '{t.name}'")
                if not (dt.is_numeric() or dt == pl.Boolean):
                    raise DataError(
                        f"{path}: label column '{t.source}' (task '{t.name}') has dtype {dt}; "
                        "expected 0/1 integers, floats or booleans"
                    )
                if t.true_prob:
                    dt = need(t.true_prob, f"true probability of task '{t.name}'")
                    if not dt.is_float():
                        raise DataError(
                            f"{path}: column '{t.true_prob}' (true probability of task "
                            f"'{t.name}') has dtype {dt}; expected floats in [0, 1]"
                        )
        if self.group_key:
            dt = need(self.group_key, "group key for GAUC")
            if not (dt.is_integer() or dt in (pl.String, pl.Categorical)):
                raise DataError(
                    f"{path}: group key column '{self.group_key}' has dtype {dt}; expected "
                    "integer or string ids"
                )

    # ------------------------------------------------------ numeric statistics

    def stats_dict(self) -> dict[str, Any]:
        # no ``edges`` key when off: the file stays as it was before the encoding existed
        return {
            name: {k: v for k, v in asdict(s).items() if k != "edges" or v is not None}
            for name, s in self.numeric_stats.items()
        }

    def save_stats(self, path: str | Path) -> None:
        from mtrec.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.stats_dict(), indent=2) + "\n")

    def load_stats(self, path: str | Path) -> None:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read numeric statistics: {exc}") from None
        missing = [f.name for f in self.numeric if f.name not in raw]
        if missing:
            raise DataError(f"{path}: numeric statistics lack features {missing}")
        try:
            self.numeric_stats = {k: NumericStats(**v) for k, v in raw.items()}
        except TypeError as exc:
            raise DataError(f"{path}: malformed numeric statistics ({exc})") from None
