"""Small data, small configs and a shared trained run for the model/train/export/CLI tests.

Everything here is sized for 2 CPU cores: a few thousand planted rows with tiny
vocabularies, embedding tables of at most a few hundred rows, a two-expert MMoE
with narrow layers, and no progress bars. Builders that are expensive (data,
the trained run) are cached per test session through ``tmp_path_factory``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.config import ExperimentConfig, deep_merge, load_config
from mtrec.data.batch import Batch
from mtrec.data.batcher import iter_batches, load_encoded
from mtrec.data.fitting import fit_statistics_on_file
from mtrec.data.spec import FeatureSpec

MAX_BUCKETS = 256

#: tests of the fused CPU kernels (mtrec/nn/csrc): they build on first use with a compiler
needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler on this machine: the fused kernel cannot be built (layers use ATen)",
)


def assert_kernels_built() -> None:
    from mtrec.nn import field_attention

    assert field_attention.kernel() is not None, "the kernel must build where a compiler is"


# the plain stack (MMoE on the flattened tokens) unless a test asks for more: the data's
# own config.yaml is the full demo stack (AutoInt → HoME)
SMALL_MODEL: dict[str, Any] = {
    "embedding": {"dim": 8, "buckets": MAX_BUCKETS, "learning_rate": 0.05},
    "interaction": {"type": "none"},
    "multitask": {"type": "mmoe", "num_experts": 2, "expert_hidden": [16, 8], "tower_hidden": [8]},
}

SMALL_TRAINING: dict[str, Any] = {
    "batch_size": 256,
    "eval_batch_size": 4096,
    "epochs": 2,
    "learning_rate": 0.01,
    "early_stopping_patience": 0,
    # one intra-op thread: these models are tiny, and two threads on a busy 2-core
    # machine spin against each other (observed: 0.4 s vs 50 s for the same run)
    "threads": 1,
    "progress": False,
}

_CACHE: dict[str, Path] = {}


def make_small_data(out: Path, rows: int = 4000, seed: int = 3, num_tasks: int = 2) -> Path:
    """Planted data with tiny vocabularies (``vocab_scale=0.05``) and its config.yaml."""
    from mtrec.data.synthetic import synthesize

    synthesize(out, rows=rows, seed=seed, vocab_scale=0.05, num_tasks=num_tasks)
    return out


def write_small_config(
    data_dir: Path,
    dest: Path,
    training: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    **top: Any,
) -> Path:
    """A YAML experiment at ``dest`` extending ``data_dir/config.yaml`` with small buckets.

    Features are a list, so they are replaced whole (each ``buckets`` capped at
    :data:`MAX_BUCKETS`); ``model`` / ``training`` / ``top`` keys are merged over the
    small defaults.
    """
    base = data_dir / "config.yaml"
    doc: dict[str, Any] = {
        "extends": str(base.resolve()),
        "features": small_features(data_dir),
        "model": deep_merge(SMALL_MODEL, model or {}),
        "training": {**SMALL_TRAINING, **(training or {})},
        **top,
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def small_features(data_dir: Path, **changes: dict[str, Any]) -> list[dict[str, Any]]:
    """``data_dir/config.yaml``'s features, each ``buckets`` capped at :data:`MAX_BUCKETS`,
    with ``changes[name]`` merged into feature ``name`` (e.g. ``user_id={"deep": False}``);
    pass the list as ``features=`` to :func:`small_config`."""
    raw = yaml.safe_load((data_dir / "config.yaml").read_text())
    out = []
    for f in raw["features"]:
        f = dict(f)
        if "buckets" in f:
            f["buckets"] = min(int(f["buckets"]), MAX_BUCKETS)
        f.update(changes.get(f["name"], {}))
        out.append(f)
    return out


def small_config(
    data_dir: Path, tmp: Path, overrides: list[str] | None = None, **kw: Any
) -> ExperimentConfig:
    """Write :func:`write_small_config` into ``tmp`` and load it with ``overrides``."""
    path = write_small_config(data_dir, tmp / "small.yaml", **kw)
    return load_config(path, overrides=overrides)


def fitted_spec(cfg: ExperimentConfig) -> FeatureSpec:
    spec = FeatureSpec.from_config(cfg)
    fit_statistics_on_file(spec, cfg.dataset.train)
    return spec


def first_batch(
    cfg: ExperimentConfig, spec: FeatureSpec, split: str = "valid", rows: int = 64
) -> Batch:
    chunk = load_encoded(spec, getattr(cfg.dataset, split), cfg.dataset.chunk_rows)
    return next(iter_batches(chunk, spec, rows))


# ------------------------------------------------------------------ session-cached builders


def small_data_dir(factory: pytest.TempPathFactory) -> Path:
    """4000 planted rows, 2 tasks, tiny vocabularies; built once per session."""
    if "data" not in _CACHE:
        _CACHE["data"] = make_small_data(factory.mktemp("small") / "data")
    return _CACHE["data"]


def trained_run(factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run on :func:`small_data_dir`; built once per session.

    Tests that modify a run must work on a copy (:func:`copy_run`).
    """
    if "run" not in _CACHE:
        from mtrec.train.loop import train

        data = small_data_dir(factory)
        root = factory.mktemp("trained")
        cfg = small_config(data, root)
        train(cfg, root / "run")
        _CACHE["run"] = root / "run"
    return _CACHE["run"]


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path → bytes)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The lines of a run directory's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, bit-identical tensors."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kjt(keys: list[str], per_key: list[list[list[int]]]) -> KeyedJaggedTensor:
    """KJT from per key, per row id lists (feature-major)."""
    values = [v for rows in per_key for row in rows for v in row]
    lengths = [len(row) for rows in per_key for row in rows]
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
        stride=len(per_key[0]),
    )


def eval_loss(model: torch.nn.Module, batch: Batch, weights: list[float]) -> float:
    """The weighted task loss of ``model`` on ``batch`` in eval mode, without autograd;
    the model is put back in training mode (a probe of a training run)."""
    from mtrec.train.losses import WeightedBCELoss

    model.eval()
    with torch.no_grad():
        value = float(WeightedBCELoss(weights)(model(batch.sparse, batch.dense), batch.labels))
    model.train()
    return value


def one_numeric_config(
    path: Path,
    transform: str = "standardize",
    nan_policy: str = "fail",
    numeric_bins: int | None = None,
) -> ExperimentConfig:
    """One categorical ``a``, one numeric ``x`` (``transform``), one task ``y`` on ``path``
    (``numeric_bins``: None leaves the package default)."""
    from mtrec.config import parse_config

    embedding = dict(SMALL_MODEL["embedding"])
    if numeric_bins is not None:
        embedding["numeric_bins"] = numeric_bins
    return parse_config(
        {
            "dataset": {"train": str(path), "nan_policy": nan_policy},
            "features": [
                {"name": "a", "kind": "categorical", "buckets": 16},
                {"name": "x", "kind": "numeric", "transform": transform},
            ],
            "tasks": [{"name": "y"}],
            "model": {**SMALL_MODEL, "embedding": embedding},
        }
    )
