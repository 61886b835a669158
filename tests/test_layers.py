"""The package's layers: train, evaluate and export sit side by side on the run layer
(mtrec.run) and never import one another; importing mtrec sets no warning filters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ("mtrec.train", "mtrec.evaluate", "mtrec.export")

# every module of a package, and the packages it must not load
LAYERS = {
    "mtrec.train": [
        "mtrec.train.loop",
        "mtrec.train.ray_trainer",
        "mtrec.train.ledger",
        "mtrec.train.distributed",
        "mtrec.train.distributed_data",
        "mtrec.train.checkpoint",
    ],
    "mtrec.evaluate": [
        "mtrec.evaluate.report",
        "mtrec.evaluate.compare",
        "mtrec.evaluate.parallel",
        "mtrec.evaluate.plots",
        "mtrec.evaluate.insights",
        "mtrec.evaluate.predict",
    ],
    "mtrec.export": ["mtrec.export.exporter", "mtrec.export.predictor", "mtrec.export.serving"],
    None: ["mtrec.run", "mtrec.errors", "mtrec.cluster", "mtrec.scoring", "mtrec.cli"],
}


def loaded_after_import(modules: list[str]) -> set[str]:
    """The mtrec modules a fresh interpreter holds after importing ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mtrec'))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.integration  # a fresh interpreter per layer
@pytest.mark.parametrize("package", list(LAYERS), ids=lambda p: str(p or "shared"))
def test_no_imports_between_train_evaluate_and_export(package: str | None) -> None:
    loaded = loaded_after_import(LAYERS[package])
    for other in PACKAGES:
        if other == package:
            continue
        leaked = sorted(m for m in loaded if m == other or m.startswith(other + "."))
        assert not leaked, f"importing {package or 'the shared layer'} loads {leaked}"


@pytest.mark.integration  # a fresh interpreter
def test_importing_mtrec_sets_no_warning_filters() -> None:
    """Filters belong to the command that runs (the CLI scopes its own), not to an import."""
    every = [m for ms in LAYERS.values() for m in ms]
    code = (
        "import importlib, warnings\n"
        "import numpy, polars, torch, torchrec, yaml\n"  # the libraries' own filters first
        "before = list(warnings.filters)\n"
        f"for m in {every!r}: importlib.import_module(m)\n"
        "added = [f for f in warnings.filters if f not in before]\n"
        "print(len(added), added)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert proc.stdout.strip().splitlines()[-1] == "0 []"


def test_errors_are_gathered_and_old_imports_keep_working() -> None:
    from mtrec import errors
    from mtrec.config import ConfigError
    from mtrec.data.errors import DataError
    from mtrec.export.errors import ExportError
    from mtrec.export.exporter import ExportError as ExporterExportError
    from mtrec.train.checkpoint import CheckpointError
    from mtrec.train.loop import RunError
    from mtrec.train.ray_trainer import ClusterError

    assert errors.ConfigError is ConfigError
    assert errors.DataError is DataError
    assert errors.ExportError is ExportError is ExporterExportError
    assert errors.CheckpointError is CheckpointError
    assert errors.RunError is RunError
    assert errors.ClusterError is ClusterError and issubclass(ClusterError, RunError)
    assert set(errors.user_errors()) >= {ConfigError, DataError, RunError, CheckpointError}


def test_the_cli_scopes_its_warning_filters(tmp_path: Path) -> None:
    import warnings

    from mtrec.cli import main

    before = list(warnings.filters)
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert warnings.filters == before
