"""Atomic file writes: a reader never sees a half-written file where a good one was."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["atomic_path", "atomic_torch_save", "atomic_write_text"]


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    _write(path, lambda p: p.write_text(text))


def atomic_torch_save(obj: object, path: str | os.PathLike[str]) -> None:
    _write(path, lambda p: torch.save(obj, p))
