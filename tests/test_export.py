"""TorchScript export: parity, a fresh-process load, the signature, predict, and failures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
import torch
from helpers import copy_run, snapshot, trained_run

from mtrec.data.batch import Batch
from mtrec.data.batcher import encoded_chunks, iter_batches, to_batch
from mtrec.export.exporter import PARITY_TOLERANCE, export_run, load_exported
from mtrec.export.predictor import predict_file
from mtrec.export.serving import ServingModule
from mtrec.train.checkpoint import CheckpointError
from mtrec.train.loop import load_trained_model

ROWS = 48


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "model.pt"
    summary = export_run(run, out=out, parity_rows=256)
    return out, summary


@pytest.fixture(scope="module")
def eager(run: Path):
    return load_trained_model(run)


def sample_rows(eager) -> Batch:
    cfg, spec, _ = eager
    chunk = next(encoded_chunks(spec, cfg.dataset.test, ROWS, need_labels=False))
    return to_batch(chunk.slice(0, ROWS), spec)


def eager_probs(eager, batch: Batch) -> torch.Tensor:
    _, _, model = eager
    with torch.no_grad():
        return torch.sigmoid(model(batch.sparse, batch.dense))


def test_export_parity_and_summary(exported) -> None:
    path, summary = exported
    assert summary["model"] == str(path) and path.is_file()
    assert summary["parity_max_abs_diff"] <= PARITY_TOLERANCE <= 1e-5
    assert summary["parity_rows"] > 0
    sig_file = Path(summary["signature"])
    assert sig_file == path.with_name("model.signature.json") and sig_file.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_signature_is_inside_the_file(exported, eager) -> None:
    path, summary = exported
    cfg, spec, _ = eager
    extra = {"signature.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    sig = json.loads(extra["signature.json"])
    assert sig == json.loads(Path(summary["signature"]).read_text())
    assert sig["tasks"] == cfg.task_names
    assert [f["name"] for f in sig["sparse_features"]] == spec.sparse_names
    assert [f["name"] for f in sig["numeric_features"]] == spec.numeric_names
    tags = next(f for f in sig["sparse_features"] if f["name"] == "tags")
    assert tags["kind"] == "multi_hot" and tags["pooling"] == "mean"
    for f in sig["numeric_features"]:
        stats = spec.numeric_stats[f["name"]]
        assert f["mean"] == pytest.approx(stats.mean) and f["std"] == pytest.approx(stats.std)
    assert "FNV-1a-64" in sig["hash"]
    _, loaded_sig = load_exported(path)
    assert loaded_sig == sig


FRESH = textwrap.dedent(
    """
    import json, sys
    import torch
    import fbgemm_gpu  # noqa: F401
    extra = {"signature.json": ""}
    module = torch.jit.load(sys.argv[1], _extra_files=extra)
    inputs = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        out = module(inputs["values"], inputs["lengths"], inputs["dense"])
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("mtrec", "torchrec"))
    sig = json.loads(extra["signature.json"])
    print(json.dumps({"out": out.tolist(), "tasks": sig["tasks"], "leaked": leaked}))
    """
)


def test_exported_file_scores_in_a_fresh_process(exported, eager, tmp_path: Path) -> None:
    path, _ = exported
    batch = sample_rows(eager)
    inputs = tmp_path / "inputs.pt"
    kjt = batch.sparse
    torch.save({"values": kjt.values(), "lengths": kjt.lengths(), "dense": batch.dense}, inputs)
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(path), str(inputs)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["leaked"] == [], "the exported file needed mtrec/torchrec to load"
    assert result["tasks"] == eager[0].task_names
    out = torch.tensor(result["out"])
    assert out.shape == (ROWS, len(eager[0].tasks))
    torch.testing.assert_close(out, eager_probs(eager, batch), rtol=0, atol=1e-6)
    assert out.std(0).min() > 0


def test_loaded_module_accepts_int64_lengths_and_nan_as_missing(exported, eager) -> None:
    module, sig = load_exported(exported[0])
    batch = sample_rows(eager)
    kjt = batch.sparse
    base = module(kjt.values(), kjt.lengths(), batch.dense)
    torch.testing.assert_close(base, eager_probs(eager, batch), rtol=0, atol=1e-6)
    torch.testing.assert_close(module(kjt.values(), kjt.lengths().long(), batch.dense), base)
    # NaN is a missing value: it normalises to fill_value (0), i.e. the training mean
    mean0 = sig["numeric_features"][0]["mean"]
    assert sig["numeric_features"][0]["transform"] == "standardize"
    missing, at_mean = batch.dense.clone(), batch.dense.clone()
    missing[:, 0] = float("nan")
    at_mean[:, 0] = mean0
    out_missing = module(kjt.values(), kjt.lengths(), missing)
    assert torch.isfinite(out_missing).all()
    torch.testing.assert_close(out_missing, module(kjt.values(), kjt.lengths(), at_mean))


def test_predict_file_equals_eager_model(exported, eager, tmp_path: Path) -> None:
    cfg, spec, model = eager
    out = tmp_path / "pred.parquet"
    summary = predict_file(exported[0], cfg.dataset.test, out=out, batch_size=100)
    frame = pl.read_parquet(out)
    assert summary["out"] == str(out) and summary["rows"] == frame.height
    assert frame.height == pl.scan_parquet(cfg.dataset.test).select(pl.len()).collect().item()
    assert frame.columns == cfg.task_names
    expected = []
    with torch.no_grad():
        for batch in iter_batches(cfg.dataset.test, spec, 128):
            expected.append(torch.sigmoid(model(batch.sparse, batch.dense)))
    torch.testing.assert_close(
        torch.from_numpy(frame.to_numpy()), torch.cat(expected), rtol=0, atol=1e-6
    )


def serving_inputs(eager) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = sample_rows(eager)
    return batch.sparse.values(), batch.sparse.lengths(), batch.dense


def bad_inputs(eager) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    values, lengths, dense = serving_inputs(eager)
    negative = lengths.clone()
    negative[0] -= 1 + int(negative[0])  # -1
    negative[1] += 1 + int(lengths[0])  # same total
    return [
        ("lengths must have num_sparse_features", (values, lengths[:-1], dense)),
        ("lengths must be >= 0", (values, negative, dense)),
        ("values has", (values[:-1], lengths, dense)),
        ("lengths sum to", (torch.cat([values, values[:2]]), lengths, dense)),
        (r"dense must be float \[B, 4\]", (values, lengths, dense[:, :-1])),
        ("dense must be", (values, lengths, dense[0])),
    ]


def test_serving_module_rejects_malformed_inputs_eager(eager) -> None:
    cfg, spec, model = eager
    serving = ServingModule(model, spec.sparse_names, len(spec.numeric)).eval()
    assert serving(*serving_inputs(eager)).shape == (ROWS, len(cfg.tasks))
    for message, args in bad_inputs(eager):
        with pytest.raises(RuntimeError, match=message):
            serving(*args)


def test_exported_module_rejects_malformed_inputs(exported, eager) -> None:
    module, _ = load_exported(exported[0])
    for message, args in bad_inputs(eager):
        # TorchScript re-raises the module's RuntimeError as torch.jit.Error
        with pytest.raises((RuntimeError, torch.jit.Error), match=message) as info:
            module(*args)
        assert "RuntimeError" in str(info.value)


# ------------------------------------------------------------------------------- failures


def test_export_without_best_checkpoint_writes_nothing(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    (copy / "checkpoints" / "best.pt").unlink()
    target = tmp_path / "out" / "model.pt"
    with pytest.raises(CheckpointError, match="best.pt"):
        export_run(copy, out=target)
    assert not target.parent.exists()
    with pytest.raises(CheckpointError):
        export_run(copy)
    assert not (copy / "export").exists()


def test_export_of_corrupt_checkpoint_names_the_file(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    best = copy / "checkpoints" / "best.pt"
    data = best.read_bytes()
    best.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(best)):
        export_run(copy)
    assert not (copy / "export" / "model.pt").exists()


def test_failed_export_leaves_an_existing_model_intact(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    target = tmp_path / "serve" / "model.pt"
    export_run(copy, out=target, parity_rows=64)
    before = snapshot(target.parent)
    assert set(before) == {"model.pt", "model.signature.json"}
    best = copy / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        export_run(copy, out=target)
    assert snapshot(target.parent) == before
    # the surviving file still loads and scores
    module, _ = load_exported(target)
    values, lengths, dense = serving_inputs(load_trained_model(run))
    assert torch.isfinite(module(values, lengths, dense)).all()


def test_export_refuses_a_modified_run_config(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    cfg_file = copy / "config.yaml"
    text = cfg_file.read_text()
    assert "learning_rate: 0.01\n" in text
    cfg_file.write_text(text.replace("learning_rate: 0.01\n", "learning_rate: 0.02\n"))
    with pytest.raises(CheckpointError, match="config hash differs"):
        export_run(copy)
    assert not (copy / "export").exists()


def test_serving_module_scores_an_empty_batch(run: Path) -> None:
    from mtrec.export.serving import ServingModule
    from mtrec.train.loop import load_trained_model

    _, spec, model = load_trained_model(run)
    serving = torch.jit.script(ServingModule(model, spec.sparse_names, len(spec.numeric)))
    out = serving(
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(0, len(spec.numeric)),
    )
    assert out.shape == (0, len(spec.task_names))
