"""Export a run's best model to TorchScript, verified against the eager model.

``export_run`` scripts :class:`~mtrec.export.serving.ServingModule` around the run's
best checkpoint (eval mode: BatchNorm running statistics, no dropout), checks it on
held-out rows, and only then writes the file (atomically, with its ``.signature.json``
beside it). The file carries its contract as the TorchScript extra file
``signature.json``: features in input order (names, columns, kinds, pooling),
numeric normalisation, tasks and ESMM chaining, the stable-hash definition with
example ids, mtrec version and config hash. It loads with ``torch`` alone
(``signature["requires"]``): the serving graph holds no torchrec or FBGEMM code.
"""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mtrec
from mtrec.data.batch import Batch
from mtrec.data.batcher import encoded_chunks, to_batch
from mtrec.data.hashing import MISSING_ID, RARE_ID, hash_value
from mtrec.data.hashing import __doc__ as HASH_DOC
from mtrec.data.spec import FeatureSpec
from mtrec.export.errors import ExportError
from mtrec.export.serving import ServingModule
from mtrec.export.signature import SIGNATURE_FORMAT, NumericFeature, Signature, SparseFeature
from mtrec.io import atomic_path
from mtrec.model import MultiTaskModel
from mtrec.run import load_trained_model, run_config_hash
from mtrec.serving import SIGNATURE_FILE, load_model

__all__ = [
    "PARITY_TOLERANCE",
    "ExportError",
    "check_parity",
    "export_run",
    "load_exported",
    "script_serving",
    "signature_of",
]

PARITY_TOLERANCE = 1e-5
"""Largest |scripted - eager| probability an export accepts."""

# values whose ids the signature lists, so a client can check its own hash implementation
_HASH_EXAMPLES: list[str | int | float | None] = [42, "42", "abc", "", "日本", 34.0, 0.5, -7, None]


def signature_of(
    spec: FeatureSpec,
    cfg_hash: str,
    model: MultiTaskModel | None = None,
    model_cfg: Any = None,
    data_format: str = "parquet",
    csv_separator: str = ",",
    requires: list[str] | None = None,
) -> Signature:
    """The contract of an export (stored inside the file as ``signature.json``)."""
    stats = spec.stats_dict()
    chain = [] if model is None else [model.task_names[int(i)] for i in model.chain.tolist()]
    return Signature(
        format=SIGNATURE_FORMAT,
        mtrec_version=mtrec.__version__,
        torch_version=torch.__version__.split("+")[0],
        config_hash=cfg_hash,
        trained_epoch=-1 if model is None else model.trained_epoch,
        requires=requires or ["torch"],
        inputs={
            "values": "int64 [sum(lengths)] stable value ids (see hash), feature-major: every "
            "id of sparse feature 0 for rows 0..B-1, then feature 1, ...",
            "lengths": "int32 or int64 [num_sparse_features * B] ids per (feature, row), "
            "feature-major (torchrec KeyedJaggedTensor layout)",
            "dense": "float64 [B, num_numeric_features] RAW numeric values in numeric_features "
            "order, NaN = missing (float32 accepted, at float32 resolution); the module "
            "normalises them itself",
        },
        output="float32 [B, T] probabilities, tasks in `tasks` order",
        sparse_features=[
            SparseFeature(
                name=f.name,
                column=f.source,
                kind=f.kind,
                delimiter=f.delimiter,
                pooling=f.pooling,
                min_count=spec.min_count_of(f.name),
            )
            for f in spec.sparse
        ],
        # the normalisation a caller may reproduce; the piecewise-linear bin edges
        # (model.embedding.numeric_bins) are the module's own state, not part of the contract
        numeric_features=[
            NumericFeature(
                name=f.name,
                column=f.source,
                **{k: v for k, v in stats[f.name].items() if k in ("transform", "mean", "std")},
            )
            for f in spec.numeric
        ],
        normalisation="x' = (g(x) - mean) / std with g(x) = sign(x)·log1p(|x|) for "
        "log1p_* transforms, else g(x) = x; a non-finite x' becomes fill_value",
        nan_policy=spec.nan_policy,
        fill_value=spec.fill_value,
        tasks=list(spec.task_names),
        chain=chain,
        chain_note="ESMM: task chain[j] (j >= 1) outputs the joint probability "
        "p(chain[0] and ... and chain[j])",
        model=None
        if model_cfg is None
        else {
            "embedding": model_cfg.embedding.type,
            "interaction": model_cfg.interaction.type,
            "multitask": model_cfg.multitask.type,
        },
        data_format=data_format,
        csv_separator=csv_separator,
        hash={
            "name": "fnv1a64-fmix64",
            "definition": (HASH_DOC or "").strip(),
            "missing_id": MISSING_ID,
            "rare_id": RARE_ID,
            "examples": [{"value": v, "id": hash_value(v)} for v in _HASH_EXAMPLES],
            "inside_the_module": "per-feature bucketing (id mod buckets), the frequency "
            "filter (rare ids) and Unified Embedding's salted (feature, chunk) hash",
        },
    )


# attributes of the serving module that callers read off a loaded export
_PRESERVED_ATTRS = ["feature_names", "task_names", "num_sparse", "num_numeric", "num_tasks"]


def script_serving(
    model: MultiTaskModel, spec: FeatureSpec, freeze: bool = True
) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the serving module around ``model`` (put in eval mode).

    With ``freeze`` (the default, what ``mtrec export`` writes) the scripted module goes
    through ``torch.jit.freeze``: weights and buffers become constants of the graph, so
    work on them alone is done once here instead of on every call (the expert banks'
    per-slot weight gathers, the eval-mode branches, attribute reads), about 15% of a
    batch-1 call. A frozen module keeps ``forward`` and the attributes callers read
    (``task_names``, ``feature_names``, ...); its mode is folded in (``train()`` no
    longer changes it). ``freeze=False`` keeps the plain scripted module.
    """
    model.eval()
    serving = ServingModule(model, spec.sparse_names, len(spec.numeric)).eval()
    try:
        scripted = torch.jit.script(serving)
    except Exception as exc:  # TorchScript's frontend raises several types
        raise ExportError(
            "cannot script the serving module; every block must be TorchScript-compatible "
            f"({type(exc).__name__}: {str(exc).strip()[:1500]})"
        ) from None
    training = [name or "<root>" for name, m in scripted.named_modules() if m.training]
    if training:
        raise ExportError(f"modules still in training mode after eval(): {training[:5]}")
    if freeze:
        scripted = torch.jit.freeze(scripted, preserved_attrs=_PRESERVED_ATTRS)
    return scripted


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def check_parity(
    scripted: nn.Module, model: MultiTaskModel, batch: Batch, where: str = "the parity batch"
) -> float:
    """Max |scripted - eager| probability on ``batch``; raises past the tolerance.

    Also scores the first row alone: a module whose output depends on the rest of the
    batch (BatchNorm or dropout left in training mode) fails here.
    """
    kjt = batch.sparse
    with torch.no_grad():
        eager = model.predict(kjt, batch.dense)
        script_out = scripted(kjt.values(), kjt.lengths(), batch.dense)
    diff = _max_diff(eager, script_out)
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(
            f"scripted and eager models differ by {diff:.3g} > {PARITY_TOLERANCE} on "
            f"{batch.batch_size} rows of {where}; nothing was written"
        )
    if batch.batch_size > 1:
        values, lengths = _first_row(kjt.values(), kjt.lengths(), len(kjt.keys()))
        with torch.no_grad():
            alone = scripted(values, lengths, batch.dense[:1])
        single = _max_diff(alone, script_out[:1])
        if not single <= PARITY_TOLERANCE:
            raise ExportError(
                f"the scripted model scores row 0 of {where} differently alone than in a batch "
                f"(by {single:.3g}): a module depends on the batch (BatchNorm or dropout in "
                "training mode?); nothing was written"
            )
    return diff


def _first_row(
    values: torch.Tensor, lengths: torch.Tensor, num_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and lengths of row 0 alone, from feature-major KJT values / lengths."""
    if num_features == 0:
        return values[:0], lengths[:0]
    by_feature = lengths.view(num_features, -1).to(torch.int64)
    starts = (torch.cumsum(by_feature.sum(1), 0) - by_feature.sum(1)).tolist()
    counts = by_feature[:, 0].tolist()
    parts = [values[s : s + n] for s, n in zip(starts, counts)]
    first = torch.cat(parts) if parts else values[:0]
    return first, lengths.view(num_features, -1)[:, 0].contiguous()


def _parity_batch(spec: FeatureSpec, path: str, rows: int) -> Batch:
    for chunk in encoded_chunks(spec, path, rows, need_labels=False):
        return to_batch(chunk.slice(0, min(rows, chunk.rows)), spec)
    raise ExportError(f"{path}: no rows for the parity check")


def _requires(archive: bytes) -> list[str]:
    """What loading the saved graph needs: ``torch``, plus ``fbgemm_gpu`` if any of its
    code calls an FBGEMM operator."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        for name in zf.namelist():
            if "/code/" in name and name.endswith(".py") and b"fbgemm" in zf.read(name):
                return ["torch", "fbgemm_gpu"]
    return ["torch"]


def _signature_path(model_path: Path) -> Path:
    """``model.pt`` → ``model.signature.json`` beside it (one per exported file)."""
    return model_path.with_name(model_path.stem + ".signature.json")


def export_run(
    run_dir: str | Path, out: str | Path | None = None, parity_rows: int = 512
) -> dict[str, Any]:
    """Script the run's best model, check parity on held-out rows, write atomically.

    Raises :class:`~mtrec.errors.CheckpointError` for a missing, corrupt or
    mismatched checkpoint and :class:`ExportError` when scripting or the parity check
    fails; in every case nothing is written.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    cfg, spec, model = load_trained_model(run_dir)
    out = Path(out) if out else run_dir / "export" / "model.pt"
    scripted = script_serving(model, spec)
    held_out = cfg.dataset.valid or cfg.dataset.test or cfg.dataset.train
    batch = _parity_batch(spec, held_out, parity_rows)
    diff = check_parity(scripted, model, batch, where=str(held_out))

    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    signature = signature_of(
        spec,
        run_config_hash(run_dir),
        model,
        cfg.model,
        data_format=cfg.dataset.format,
        csv_separator=cfg.dataset.csv_separator,
        requires=_requires(buffer.getvalue()),
    )
    sig_text = signature.to_json()
    kjt = batch.sparse
    with torch.no_grad():
        expected = scripted(kjt.values(), kjt.lengths(), batch.dense)
    sig_path = _signature_path(out)
    # both files appear together or not at all (the inner one is renamed first)
    with atomic_path(out) as tmp, atomic_path(sig_path) as sig_tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={SIGNATURE_FILE: sig_text})
        reloaded, _ = load_model(tmp)  # what was written, before it replaces anything
        with torch.no_grad():
            again = reloaded(kjt.values(), kjt.lengths(), batch.dense)
        if not _max_diff(again, expected) <= PARITY_TOLERANCE:
            raise ExportError(f"{out}: the saved file does not reproduce the scripted model")
        sig_tmp.write_text(sig_text)
    return {
        "model": str(out),
        "signature": str(sig_path),
        "parity_max_abs_diff": diff,
        "parity_rows": batch.batch_size,
        "requires": signature.requires,
        "size_mb": round(out.stat().st_size / 2**20, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def load_exported(path: str | Path) -> tuple[torch.jit.ScriptModule, Signature]:
    """Load an exported model and its signature (:func:`mtrec.serving.load_model`)."""
    return load_model(path)
