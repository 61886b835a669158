"""Atomic writes: readable permissions, old file kept on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mtrec.io import atomic_path, atomic_write_text


def test_atomic_write_has_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    atomic_write_text(target, "{}\n")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert target.read_text() == "{}\n"


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
