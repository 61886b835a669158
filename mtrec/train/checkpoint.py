"""Checkpoints moved to :mod:`mtrec.checkpoint` (shared by train, evaluate and export)."""

from mtrec.checkpoint import (
    CheckpointError,
    best_path,
    last_path,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["CheckpointError", "best_path", "last_path", "load_checkpoint", "save_checkpoint"]
