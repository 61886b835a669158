"""Export a run's best model to TorchScript, verified against the eager model.

The file carries its contract as the TorchScript extra file ``signature.json``
(features in input order, kinds, numeric normalisation, tasks, the stable-hash
definition, mtrec version, config hash); the same JSON is written beside it as
``<model stem>.signature.json``.
Loading needs ``torch`` plus ``import fbgemm_gpu`` (torchrec's KeyedJaggedTensor
uses fbgemm operators inside the scripted graph).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import mtrec
from mtrec.data.batcher import encoded_chunks, to_batch
from mtrec.data.hashing import __doc__ as HASH_DOC
from mtrec.data.spec import FeatureSpec
from mtrec.export.serving import ServingModule
from mtrec.io import atomic_path, atomic_write_text
from mtrec.train.loop import load_trained_model, run_config_hash

__all__ = ["ExportError", "export_run", "load_exported", "signature_of"]

PARITY_TOLERANCE = 1e-5


class ExportError(RuntimeError):
    """Export failed; nothing was written."""


def signature_of(spec: FeatureSpec, cfg_hash: str) -> dict[str, Any]:
    return {
        "format": "mtrec-serving-v1",
        "mtrec_version": mtrec.__version__,
        "config_hash": cfg_hash,
        "inputs": {
            "values": "int64 [sum(lengths)] stable value ids, feature-major",
            "lengths": "int32 [num_sparse * B] ids per (feature, row), feature-major",
            "dense": "float32 [B, num_numeric] raw numeric values, NaN = missing",
        },
        "output": "float32 [B, T] probabilities",
        "sparse_features": [
            {
                "name": f.name,
                "column": f.source,
                "kind": f.kind,
                "delimiter": f.delimiter,
                "pooling": f.pooling,
            }
            for f in spec.sparse
        ],
        "numeric_features": [
            {"name": f.name, "column": f.source, **spec.stats_dict()[f.name]} for f in spec.numeric
        ],
        "nan_policy": spec.nan_policy,
        "fill_value": spec.fill_value,
        "tasks": spec.task_names,
        "hash": (HASH_DOC or "").strip(),
    }


def _signature_path(model_path: Path) -> Path:
    """``model.pt`` → ``model.signature.json`` beside it (one per exported file)."""
    return model_path.with_name(model_path.stem + ".signature.json")


def _parity_batch(spec: FeatureSpec, path: str, rows: int) -> Any:
    for chunk in encoded_chunks(spec, path, rows, need_labels=False):
        return to_batch(chunk.slice(0, min(rows, chunk.rows)), spec)
    raise ExportError(f"{path}: no rows for the parity check")


def export_run(
    run_dir: str | Path, out: str | Path | None = None, parity_rows: int = 512
) -> dict[str, Any]:
    """Script the run's best model, check parity on held-out rows, write atomically."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    cfg, spec, model = load_trained_model(run_dir)
    out = Path(out) if out else run_dir / "export" / "model.pt"
    serving = ServingModule(model, spec.sparse_names, len(spec.numeric)).eval()
    scripted = torch.jit.script(serving)
    held_out = cfg.dataset.valid or cfg.dataset.test or cfg.dataset.train
    batch = _parity_batch(spec, held_out, parity_rows)
    kjt = batch.sparse
    with torch.no_grad():
        eager = torch.sigmoid(model(kjt, batch.dense))
        script_out = scripted(kjt.values(), kjt.lengths(), batch.dense)
    diff = float((eager - script_out).abs().max())
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(
            f"{run_dir}: scripted and eager models differ by {diff:.3g} > {PARITY_TOLERANCE} on "
            f"{batch.batch_size} rows of {held_out}; nothing was written"
        )
    signature = signature_of(spec, run_config_hash(run_dir))
    sig_text = json.dumps(signature, indent=2) + "\n"
    with atomic_path(out) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={"signature.json": sig_text})
        # reload what was written before it replaces anything
        reloaded = torch.jit.load(str(tmp))
        with torch.no_grad():
            again = reloaded(kjt.values(), kjt.lengths(), batch.dense)
        if float((again - script_out).abs().max()) > PARITY_TOLERANCE:
            raise ExportError(f"{out}: the saved file does not reproduce the scripted model")
    atomic_write_text(_signature_path(out), sig_text)
    return {
        "model": str(out),
        "signature": str(_signature_path(out)),
        "parity_max_abs_diff": diff,
        "parity_rows": batch.batch_size,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def load_exported(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load an exported model and its signature."""
    import fbgemm_gpu  # noqa: F401  (registers the fbgemm operators the graph calls)

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no exported model; run `mtrec export --run RUN_DIR` first")
    extra = {"signature.json": ""}
    try:
        module = torch.jit.load(str(path), _extra_files=extra)
    except RuntimeError as exc:
        raise ExportError(
            f"{path}: cannot load TorchScript model: {str(exc).splitlines()[0]}"
        ) from None
    if not extra["signature.json"]:
        raise ExportError(f"{path}: not an mtrec export (no signature.json inside)")
    return module, json.loads(extra["signature.json"])
