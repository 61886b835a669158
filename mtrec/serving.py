"""Client helpers for an exported model: its signature, raw rows → input tensors, scoring.

An export (``mtrec export``) is one TorchScript file taking ``(values, lengths, dense)``
(see ``signature["inputs"]``) and returning per-task probabilities. This module turns
raw rows into those tensors exactly as training does: the same stable hash
(``mtrec.data.hashing``) and the same encoder (``mtrec.data.encode.encode_chunk``).

Light on purpose: it imports torch, numpy, polars and mtrec's data encoding, never
torchrec or FBGEMM, so a serving process needs nothing else.

Example::

    from mtrec.serving import Scorer, encode, load_model

    module, signature = load_model("runs/x/export/model.pt")
    inputs = encode([{"user_id": 17, "c0": "a", "tags": [3, 5], "n0": 0.5}], signature)
    probs = module(*inputs)  # B x T, tasks = signature.tasks

    scorer = Scorer("runs/x/export/model.pt")
    scorer.records(rows)  # [{"click": 0.31, "like": 0.05}, ...]
"""

from __future__ import annotations

import difflib
import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
import torch

from mtrec.config import FeatureConfig, TaskConfig
from mtrec.data.encode import EncodedChunk, encode_chunk, feature_major_ids
from mtrec.data.errors import DataError
from mtrec.data.hashing import _text as category_text
from mtrec.data.spec import FeatureSpec
from mtrec.export.errors import ExportError
from mtrec.export.signature import Signature

__all__ = [
    "SIGNATURE_FILE",
    "Scorer",
    "ServingInputs",
    "Signature",
    "chunk_inputs",
    "encode",
    "load_model",
    "read_signature",
    "spec_from_signature",
]

SIGNATURE_FILE = "signature.json"
"""Name of the TorchScript extra file holding the signature inside an export."""

Rows = pl.DataFrame | Mapping[str, Any] | Sequence[Mapping[str, Any]]
SignatureLike = Mapping[str, Any] | str | Path


class ServingInputs(NamedTuple):
    """The exported module's arguments: ``module(*inputs)``.

    values: int64 [sum(lengths)] value ids, feature-major.
    lengths: int32 [F_s · B] ids per (feature, row), feature-major.
    dense: float64 [B, F_n] raw numeric values (NaN = missing).
    """

    values: torch.Tensor
    lengths: torch.Tensor
    dense: torch.Tensor


# ----------------------------------------------------------------------------- signature


def read_signature(source: SignatureLike) -> Signature:
    """The signature of an export: from a dict, a ``*.json`` file or the model file itself.

    The model file is a zip archive; its ``<archive>/extra/signature.json`` member is
    read directly, without loading the model.
    """
    if isinstance(source, Mapping):
        return Signature.from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise ExportError(f"{path}: no such file; export a run first (`mtrec export --run RUN`)")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
        else:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("extra/" + SIGNATURE_FILE)]
                if not names:
                    raise ExportError(
                        f"{path}: not an mtrec export (no {SIGNATURE_FILE} inside); "
                        "export it with `mtrec export --run RUN_DIR`"
                    )
                raw = json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ExportError(
            f"{path}: cannot read the signature ({str(exc).splitlines()[0]}); "
            "the file is corrupt or not an mtrec export"
        ) from None
    try:
        return Signature.from_dict(raw)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from None


def spec_from_signature(signature: SignatureLike, data_format: str | None = None) -> FeatureSpec:
    """The :class:`FeatureSpec` an export reads (features and tasks; no labels needed).

    Missing / NaN numeric values are passed through (the module fills them itself), so
    the spec's ``nan_policy`` is ``fill`` whatever training used.
    """
    sig = read_signature(signature)
    sparse = [
        FeatureConfig(
            name=f.name, kind=f.kind, column=f.column, delimiter=f.delimiter, pooling=f.pooling
        )
        for f in sig.sparse_features
    ]
    numeric = [
        FeatureConfig(name=f.name, kind="numeric", column=f.column, transform=f.transform)
        for f in sig.numeric_features
    ]
    return FeatureSpec(
        sparse=sparse,
        numeric=numeric,
        tasks=[TaskConfig(name=t) for t in sig.tasks],
        data_format=data_format or sig.data_format,
        csv_separator=sig.csv_separator,
        nan_policy="fill",
        fill_value=sig.fill_value,
    )


def load_model(path: str | Path) -> tuple[torch.jit.ScriptModule, Signature]:
    """Load an export (eval mode, CPU) and its signature.

    Imports ``fbgemm_gpu`` only for files whose signature says they need it (exports
    older than the torch-only serving module).
    """
    path = Path(path)
    signature = read_signature(path)
    if "fbgemm_gpu" in signature.requires:
        import fbgemm_gpu  # noqa: F401  (registers the fbgemm operators such a graph calls)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise ExportError(
            f"{path}: cannot load the TorchScript model: {str(exc).strip().splitlines()[0]}"
        ) from None
    module.eval()
    return module, signature


# -------------------------------------------------------------------------- rows → tensors


def chunk_inputs(chunk: EncodedChunk, spec: FeatureSpec) -> ServingInputs:
    """The module's inputs for encoded rows: the values / lengths of the training batch's
    KJT (``mtrec.data.batcher.to_batch``), as plain tensors."""
    values, lengths = feature_major_ids(chunk, spec)
    return ServingInputs(
        values=values,
        lengths=lengths,
        dense=chunk.dense,
    )


def _bad(where: str, row: int, column: str, role: str, value: Any, expected: str) -> DataError:
    return DataError(
        f"{where}[{row}]['{column}'] ({role}) is {value!r} of type {type(value).__name__}; "
        f"expected {expected}"
    )


def _category(value: Any, where: str, row: int, column: str, role: str) -> str | None:
    """Text of a categorical value as the stable hash reads it (None: missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _bad(where, row, column, role, value, "a string, an integer, a float or null")
    return category_text(value)


def _tokens(
    value: Any, delimiter: str | None, where: str, row: int, column: str, role: str
) -> list[str] | None:
    """Tokens of a multi-hot value: a list, or a string split on the feature's delimiter."""
    if value is None:
        return None
    if isinstance(value, str):
        if delimiter is None:
            raise _bad(where, row, column, role, value, "a list of values (no delimiter is set)")
        return [t for t in value.split(delimiter) if t]  # empty tokens dropped, as in training
    if isinstance(value, (list, tuple)):
        tokens = [_category(v, where, row, column, role) for v in value]
        return [t for t in tokens if t is not None]
    raise _bad(where, row, column, role, value, "a list of values or null")


def _number(value: Any, where: str, row: int, column: str, role: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)):  # bool is an int: 0 / 1, as a Boolean column
        raise _bad(where, row, column, role, value, "a number or null")
    return float(value)


def _frame_from_dicts(rows: Sequence[Mapping[str, Any]], spec: FeatureSpec, where: str):
    """A polars frame of the columns ``spec`` reads, typed as a data file would be.

    Categorical columns become text by the hash's own rule (so ``42``, ``"42"`` and
    ``42.0`` get one id); numeric columns become Float64 (a column read both ways is
    numeric: a Float64 column hashes integral values like integers); multi-hot
    columns become lists of text.
    """
    roles: dict[str, list[FeatureConfig]] = {}
    for f in spec.sparse + spec.numeric:
        roles.setdefault(f.source, []).append(f)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(
                f"{where}[{i}]: expected a dict of column → value, got {type(row).__name__}"
            )
        for column, features in roles.items():
            if column not in row:
                close = difflib.get_close_matches(column, [str(k) for k in row], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise DataError(
                    f"{where}[{i}]: no key '{column}' (feature '{features[0].name}'){hint}; "
                    "every row needs every feature column; send null for a missing value"
                )
    series: list[pl.Series] = []
    for column, features in roles.items():
        role = f"{features[0].kind} feature '{features[0].name}'"
        kinds = {f.kind for f in features}
        values = [row[column] for row in rows]
        if "multi_hot" in kinds:
            delim = next(f.delimiter for f in features if f.kind == "multi_hot")
            data = [_tokens(v, delim, where, i, column, role) for i, v in enumerate(values)]
            series.append(pl.Series(column, data, dtype=pl.List(pl.String)))
        elif "numeric" in kinds:
            data = [_number(v, where, i, column, role) for i, v in enumerate(values)]
            series.append(pl.Series(column, data, dtype=pl.Float64))
        else:
            data = [_category(v, where, i, column, role) for i, v in enumerate(values)]
            series.append(pl.Series(column, data, dtype=pl.String))
    return pl.DataFrame(series, height=len(rows))


def encode(
    rows: Rows, signature: SignatureLike | FeatureSpec, where: str = "rows"
) -> ServingInputs:
    """Raw rows → the ``(values, lengths, dense)`` tensors an export takes.

    Args:
        rows: a polars DataFrame, a list of dicts (column → raw value; null / NaN =
            missing), or one dict. Keys are the data's column names
            (``signature["sparse_features"][i]["column"]``); other keys are ignored.
            Multi-hot values are lists (or strings split on the feature's delimiter).
        signature: the export's signature (dict, ``model.pt`` or ``*.signature.json``),
            or a :class:`FeatureSpec` from :func:`spec_from_signature`.
        where: the name used for the rows in error messages.

    Ids come from the training encoder (``encode_chunk``: hash, multi-hot splitting,
    missing values), so ``module(*encode(rows, sig))`` equals the model's predictions
    on the same rows read from a file.
    """
    spec = signature if isinstance(signature, FeatureSpec) else spec_from_signature(signature)
    if isinstance(rows, Mapping):
        rows = [rows]
    if isinstance(rows, pl.DataFrame):
        frame = rows
    elif isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)):
        frame = _frame_from_dicts(rows, spec, where)
    else:
        raise DataError(
            f"{where}: expected a polars DataFrame, a list of dicts or a dict, "
            f"got {type(rows).__name__}"
        )
    spec.check_schema(frame.schema, where, need_labels=False)
    return chunk_inputs(encode_chunk(frame, spec, where, need_labels=False), spec)


# -------------------------------------------------------------------------------- scoring


class Scorer:
    """An export and its signature: raw rows in, per-task probabilities out.

    Args:
        path: the exported ``model.pt``.
        threads: torch intra-op threads for this process (None: leave as is).

    Example::

        scorer = Scorer("runs/x/export/model.pt")
        scorer(rows)          # float32 tensor B x T
        scorer.records(rows)  # [{task: probability}, ...]
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.path = Path(path)
        self.module, self.signature = load_model(path)
        self.spec = spec_from_signature(self.signature)
        self.tasks: list[str] = list(self.signature.tasks)

    def __call__(self, rows: Rows) -> torch.Tensor:
        with torch.no_grad():
            return self.module(*encode(rows, self.spec))

    def records(self, rows: Rows) -> list[dict[str, float]]:
        """One ``{task: probability}`` dict per row."""
        return [dict(zip(self.tasks, p)) for p in self(rows).tolist()]
