"""Checkpoints: atomic saves, safe loads (``weights_only=True``).

``checkpoints/last.pt`` holds everything needed to resume (model, dense and
sparse optimizer state, epoch, history); ``checkpoints/best.pt`` holds the
model of the best validation epoch, which evaluation and export read.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mtrec.errors import CheckpointError
from mtrec.io import atomic_torch_save

__all__ = ["CheckpointError", "best_path", "last_path", "load_checkpoint", "save_checkpoint"]


def last_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.pt"


def best_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "best.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no checkpoint; train the run first "
            f"(`mtrec train ... --out {path.parent.parent}`)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise CheckpointError(
            f"{path}: cannot load checkpoint ({str(exc).splitlines()[0]}); the file is corrupt "
            "or not an mtrec checkpoint"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not an mtrec checkpoint (no 'model' entry)")
    return state
