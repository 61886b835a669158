"""The signature of an export: the typed contract between the exporter and its clients.

:func:`mtrec.export.exporter.signature_of` builds a :class:`Signature`; the exporter stores
``signature.to_json()`` inside the TorchScript file (extra file ``signature.json``) and
beside it; :mod:`mtrec.serving` reads it back with :meth:`Signature.from_json` /
:meth:`Signature.from_dict`. One definition, so the two sides cannot drift.

Light on purpose (standard library only): the serving client imports it.

A :class:`Signature` is also a read-only mapping of its JSON form (``sig["tasks"]``,
``sig.get("data_format")``, ``sig == json.loads(text)``) for callers written against
the plain dict.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mtrec.export.errors import ExportError

__all__ = ["SIGNATURE_FORMAT", "NumericFeature", "Signature", "SparseFeature"]

SIGNATURE_FORMAT = "mtrec-serving-v1"


@dataclass(frozen=True)
class SparseFeature:
    """A sparse input of the module, in ``values`` / ``lengths`` order.

    ``column``: the data column it reads; ``kind``: categorical or multi_hot (split on
    ``delimiter`` when given as text); ``pooling``: sum or mean of a multi-hot bag;
    ``min_count``: the frequency filter's threshold (0 or 1: none).
    """

    name: str
    column: str
    kind: str
    delimiter: str | None = None
    pooling: str = "sum"
    min_count: int = 0


@dataclass(frozen=True)
class NumericFeature:
    """A numeric input (a ``dense`` column), normalised inside the module as
    ``(g(x) - mean) / std`` (``g``: the ``transform``)."""

    name: str
    column: str
    transform: str = "none"
    mean: float = 0.0
    std: float = 1.0


def _features(cls: type, raw: Any, key: str) -> list[Any]:
    if not isinstance(raw, list):
        raise ExportError(f"malformed signature: '{key}' must be a list of objects")
    known = {f.name for f in fields(cls)}
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ExportError(f"malformed signature: {key}[{i}] must be an object")
        try:
            out.append(cls(**{k: v for k, v in item.items() if k in known}))
        except TypeError as exc:
            raise ExportError(
                f"malformed signature: missing or bad entry in {key}[{i}] ({exc})"
            ) from None
    return out


@dataclass(frozen=True, eq=False)
class Signature(Mapping[str, Any]):
    """What an exported module takes and returns, and how its inputs are made.

    Only ``sparse_features``, ``numeric_features`` and ``tasks`` are needed to encode
    rows; the rest describes the export (versions, hash definition, model types).
    ``requires`` defaults to what exports made before the key existed needed.
    """

    sparse_features: list[SparseFeature]
    numeric_features: list[NumericFeature]
    tasks: list[str]
    format: str = SIGNATURE_FORMAT
    mtrec_version: str = ""
    torch_version: str = ""
    config_hash: str = ""
    trained_epoch: int = -1
    requires: list[str] = field(default_factory=lambda: ["torch", "fbgemm_gpu"])
    inputs: dict[str, str] = field(default_factory=dict)
    output: str = ""
    normalisation: str = ""
    nan_policy: str = "fill"
    fill_value: float = 0.0
    chain: list[str] = field(default_factory=list)
    chain_note: str = ""
    model: dict[str, str] | None = None
    data_format: str = "parquet"
    csv_separator: str = ","
    hash: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ (de)serialise

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (plain dicts and lists)."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Signature:
        """Parse the JSON form; unknown keys (newer exports) are ignored. Raises
        :class:`ExportError` naming the missing or malformed entry."""
        if isinstance(raw, Signature):
            return raw
        if not isinstance(raw, Mapping):
            raise ExportError(f"malformed signature: expected an object, got {type(raw).__name__}")
        missing = [k for k in ("sparse_features", "numeric_features", "tasks") if k not in raw]
        if missing:
            raise ExportError(f"malformed signature: missing or bad entry {missing[0]!r}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["sparse_features"] = _features(SparseFeature, raw["sparse_features"], "sparse")
        values["numeric_features"] = _features(NumericFeature, raw["numeric_features"], "numeric")
        if not isinstance(raw["tasks"], list) or not all(isinstance(t, str) for t in raw["tasks"]):
            raise ExportError("malformed signature: 'tasks' must be a list of task names")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str | bytes) -> Signature:
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------- read-only mapping (JSON form)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(f.name for f in fields(self))

    def __len__(self) -> int:
        return len(fields(self))

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse_features]

    @property
    def numeric_names(self) -> list[str]:
        return [f.name for f in self.numeric_features]
