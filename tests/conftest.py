"""Shared fixtures: data paths and a small planted synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("MTREC_DATA_DIR", REPO.parent / "shared" / "data"))
CENSUS = DATA_DIR / "census-kdd"
SAMPLES = DATA_DIR / "samples"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"{path} is absent: set MTREC_DATA_DIR to the shared data folder to run this test"
        )
    return path


@pytest.fixture(scope="session")
def census_dir() -> Path:
    return need(CENSUS)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return need(SAMPLES)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20k planted rows (default preset), generated once per test session."""
    from mtrec.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, rows=20_000, seed=3)
    return out
