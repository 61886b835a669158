"""TorchScript export: parity for every block, a torch-only fresh-process load, the
signature, streaming predict, malformed inputs, and failures that write nothing."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from helpers import copy_run, fitted_spec, small_config, small_data_dir, snapshot, trained_run

from mtrec.cli import main as cli_main
from mtrec.data.batch import Batch
from mtrec.data.batcher import encoded_chunks, iter_batches, to_batch
from mtrec.data.hashing import hash_value
from mtrec.export.exporter import (
    PARITY_TOLERANCE,
    ExportError,
    check_parity,
    export_run,
    load_exported,
    script_serving,
)
from mtrec.export.predictor import predict_file
from mtrec.export.serving import ServingModule
from mtrec.model import MULTITASK_REGISTRY, build_model
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


def sample_rows(eager, rows: int = ROWS) -> Batch:
    cfg, spec, _ = eager
    chunk = next(encoded_chunks(spec, cfg.dataset.test, rows, need_labels=False))
    return to_batch(chunk.slice(0, rows), spec)


def eager_probs(eager, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return eager[2].predict(batch.sparse, batch.dense)


def serving_inputs(eager) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = sample_rows(eager)
    return batch.sparse.values(), batch.sparse.lengths(), batch.dense


def code_files(archive: bytes) -> dict[str, str]:
    """The TorchScript code of a saved module (file name → source)."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return {
            n: zf.read(n).decode() for n in zf.namelist() if "/code/" in n and n.endswith(".py")
        }


# ------------------------------------------------------------------- the trained run's export


def test_export_parity_and_summary(exported) -> None:
    path, summary = exported
    assert summary["model"] == str(path) and path.is_file()
    assert summary["parity_max_abs_diff"] <= PARITY_TOLERANCE <= 1e-5
    assert summary["parity_rows"] > 0
    assert summary["requires"] == ["torch"]
    sig_file = Path(summary["signature"])
    assert sig_file == path.with_name("model.signature.json") and sig_file.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt", "model.signature.json"]


def test_signature_is_inside_the_file(exported, eager, run: Path) -> None:
    path, summary = exported
    cfg, spec, _ = eager
    extra = {"signature.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    sig = json.loads(extra["signature.json"])
    assert sig == json.loads(Path(summary["signature"]).read_text())
    assert sig["tasks"] == cfg.task_names and sig["chain"] == []
    assert sig["requires"] == ["torch"]
    m = cfg.model
    assert sig["model"] == {
        "embedding": m.embedding.type,
        "interaction": m.interaction.type,
        "multitask": m.multitask.type,
    }
    assert [f["name"] for f in sig["sparse_features"]] == spec.sparse_names
    assert [f["name"] for f in sig["numeric_features"]] == spec.numeric_names
    tags = next(f for f in sig["sparse_features"] if f["name"] == "tags")
    assert tags["kind"] == "multi_hot" and tags["pooling"] == "mean"
    for f in sig["numeric_features"]:
        stats = spec.numeric_stats[f["name"]]
        assert f["mean"] == pytest.approx(stats.mean) and f["std"] == pytest.approx(stats.std)
        assert f["transform"] == stats.transform
    assert "FNV-1a-64" in sig["hash"]["definition"]
    assert sig["hash"]["missing_id"] == 0 and sig["hash"]["rare_id"] == 1
    for example in sig["hash"]["examples"]:
        assert example["id"] == hash_value(example["value"])
    import mtrec
    from mtrec.train.loop import run_config_hash

    assert sig["mtrec_version"] == mtrec.__version__
    assert sig["config_hash"] == run_config_hash(run)
    _, loaded_sig = load_exported(path)
    assert loaded_sig == sig


def test_saved_graph_holds_no_torchrec_or_fbgemm_code(exported) -> None:
    sources = code_files(exported[0].read_bytes())
    assert sources, "no TorchScript code in the archive"
    for name, text in sources.items():
        assert "torchrec" not in name and "fbgemm" not in text, name


FRESH = textwrap.dedent(
    """
    import json, sys
    import torch
    extra = {"signature.json": ""}
    module = torch.jit.load(sys.argv[1], _extra_files=extra)
    inputs = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        out = module(inputs["values"], inputs["lengths"], inputs["dense"])
    leaked = sorted(
        m for m in sys.modules if m.split(".")[0] in ("mtrec", "torchrec", "fbgemm_gpu")
    )
    sig = json.loads(extra["signature.json"])
    print(json.dumps({"out": out.tolist(), "tasks": sig["tasks"], "leaked": leaked}))
    """
)


@pytest.mark.integration  # a fresh Python process
def test_exported_file_scores_in_a_fresh_process_with_torch_only(
    exported, eager, tmp_path: Path
) -> None:
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
    assert result["leaked"] == [], "loading needed mtrec / torchrec / fbgemm_gpu"
    assert result["tasks"] == eager[0].task_names
    out = torch.tensor(result["out"])
    assert out.shape == (ROWS, len(eager[0].tasks))
    torch.testing.assert_close(out, eager_probs(eager, batch), rtol=0, atol=1e-6)
    assert out.std(0).min() > 0


def test_loaded_module_accepts_int64_lengths_and_nan_as_missing(exported, eager) -> None:
    module, sig = load_exported(exported[0])
    assert not module.training
    assert list(module.task_names) == sig["tasks"]
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


def test_scores_do_not_depend_on_the_batch(exported, eager) -> None:
    cfg, spec, _ = eager
    module, _ = load_exported(exported[0])
    chunk = next(encoded_chunks(spec, cfg.dataset.test, 8, need_labels=False))
    whole = to_batch(chunk.slice(0, 8), spec)
    together = module(whole.sparse.values(), whole.sparse.lengths(), whole.dense)
    for i in range(8):
        one = to_batch(chunk.slice(i, i + 1), spec)
        alone = module(one.sparse.values(), one.sparse.lengths(), one.dense)
        torch.testing.assert_close(alone, together[i : i + 1], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- predict


def expected_test_probs(eager) -> torch.Tensor:
    cfg, spec, model = eager
    with torch.no_grad():
        return torch.cat(
            [model.predict(b.sparse, b.dense) for b in iter_batches(cfg.dataset.test, spec, 128)]
        )


def test_predict_streams_parquet_in_row_order(exported, eager, tmp_path: Path) -> None:
    cfg, _, _ = eager
    out = tmp_path / "pred.parquet"
    summary = predict_file(exported[0], cfg.dataset.test, out=out, batch_size=100, chunk_rows=150)
    frame = pl.read_parquet(out)
    assert summary["out"] == str(out) and summary["rows"] == frame.height
    assert frame.height == pl.scan_parquet(cfg.dataset.test).select(pl.len()).collect().item()
    assert frame.columns == cfg.task_names and frame.dtypes == [pl.Float32] * len(cfg.tasks)
    # written chunk by chunk (bounded memory): one row group per chunk of 150 rows
    assert pq.ParquetFile(out).metadata.num_row_groups == -(-frame.height // 150)
    torch.testing.assert_close(
        torch.from_numpy(frame.to_numpy()), expected_test_probs(eager), rtol=0, atol=1e-6
    )
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_predict_reads_a_directory_of_shards(exported, eager, tmp_path: Path) -> None:
    cfg, _, _ = eager
    rows = pl.read_parquet(cfg.dataset.test)
    shards = tmp_path / "shards"
    shards.mkdir()
    half = rows.height // 2
    rows.head(half).write_parquet(shards / "part-0.parquet")
    rows.tail(rows.height - half).write_parquet(shards / "part-1.parquet")
    summary = predict_file(exported[0], shards, out=tmp_path / "p.parquet", chunk_rows=128)
    frame = pl.read_parquet(tmp_path / "p.parquet")
    assert summary["rows"] == frame.height == rows.height
    torch.testing.assert_close(
        torch.from_numpy(frame.to_numpy()), expected_test_probs(eager), rtol=0, atol=1e-6
    )


def test_predict_through_the_cli_writes_csv(
    exported, eager, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, _, _ = eager
    out = tmp_path / "scores.csv"
    args = ["predict", "--model", str(exported[0]), "--input", cfg.dataset.test, "--out", str(out)]
    assert cli_main([*args, "--batch-size", "64", "--chunk-rows", "100"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scores = pl.read_csv(out)
    assert summary["out"] == str(out) and summary["rows"] == scores.height
    assert scores.columns == cfg.task_names
    torch.testing.assert_close(
        torch.from_numpy(scores.to_numpy()).float(), expected_test_probs(eager), rtol=0, atol=1e-6
    )


def test_predict_names_a_column_the_model_cannot_read(
    exported, eager, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, spec, _ = eager
    tags = next(f.source for f in spec.sparse if f.kind == "multi_hot")
    rows = pl.read_parquet(cfg.dataset.test, n_rows=10)
    # CSV has no list type: a multi-hot column arrives as text, and the model has no delimiter
    rows.with_columns(pl.col(tags).cast(pl.List(pl.String)).list.join("|")).write_csv(
        tmp_path / "in.csv"
    )
    args = ["predict", "--model", str(exported[0]), "--input", str(tmp_path / "in.csv")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert f"column '{tags}'" in err and "delimiter" in err
    assert not (tmp_path / "in.predictions.parquet").exists()


def test_predict_refuses_unknown_format_and_overwriting_its_input(
    exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = tmp_path / "rows.json"
    odd.write_text("[]")
    assert cli_main(["predict", "--model", str(exported[0]), "--input", str(odd)]) == 2
    assert "cannot tell the input format" in capsys.readouterr().err
    data = tmp_path / "rows.parquet"
    pl.DataFrame({"x": [1]}).write_parquet(data)
    args = ["predict", "--model", str(exported[0]), "--input", str(data), "--out", str(data)]
    assert cli_main(args) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    missing = ["predict", "--model", str(tmp_path / "nope.pt"), "--input", str(data)]
    assert cli_main(missing) == 2
    assert "nope.pt: no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------- malformed inputs


def bad_inputs(eager) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    values, lengths, dense = serving_inputs(eager)
    negative = lengths.clone()
    negative[0] -= 1 + int(negative[0])  # -1
    negative[1] += 1 + int(lengths[0])  # same total
    negative_id = values.clone()
    negative_id[3] = -5
    return [
        ("lengths must have num_sparse_features", (values, lengths[:-1], dense)),
        ("lengths must be >= 0", (values, negative, dense)),
        ("values has", (values[:-1], lengths, dense)),
        ("lengths sum to", (torch.cat([values, values[:2]]), lengths, dense)),
        (r"dense must be float \[B, 4\]", (values, lengths, dense[:, :-1])),
        ("dense must be", (values, lengths, dense[0])),
        ("values must be a 1-D int64", (values.double(), lengths, dense)),
        ("values must be stable ids >= 0", (negative_id, lengths, dense)),
        ("lengths must be int32 or int64", (values, lengths.float(), dense)),
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


def test_serving_module_scores_an_empty_batch(exported) -> None:
    module, sig = load_exported(exported[0])
    out = module(
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(0, len(sig["numeric_features"])),
    )
    assert out.shape == (0, len(sig["tasks"]))


# ------------------------------------------------------------------- failures write nothing


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
    assert not (copy / "export").exists()


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


def test_export_refuses_weights_of_another_model(run: Path, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    best = copy / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if "towers" not in k}
    torch.save(state, best)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        export_run(copy)
    assert not (copy / "export").exists()


def test_parity_failure_writes_nothing(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtrec.model import SparseArch

    original = SparseArch.torch_pooling

    def drifted(arch: SparseArch) -> torch.nn.Module:
        twin = original(arch)
        with torch.no_grad():
            twin.weight.add_(0.05)  # a serving path that drifted from training
        return twin

    monkeypatch.setattr(SparseArch, "torch_pooling", drifted)
    target = tmp_path / "out" / "model.pt"
    with pytest.raises(ExportError, match="scripted and eager models differ"):
        export_run(run, out=target)
    assert not target.parent.exists()


def test_parity_check_catches_a_module_left_in_training_mode(tmp_path_factory, tmp_path) -> None:
    data = small_data_dir(tmp_path_factory)
    cfg = small_config(data, tmp_path, model={"multitask": {"dropout": 0.5}})
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, spec).eval()
    scripted = script_serving(model, spec, freeze=False)  # a frozen module has its mode fixed
    batch = first_rows(cfg, spec)
    assert check_parity(scripted, model, batch) <= PARITY_TOLERANCE
    scripted.train()  # dropout on: scores are random
    with pytest.raises(ExportError, match="differ"):
        check_parity(scripted, model, batch)


def test_cli_export_prints_the_summary(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.pt"
    assert cli_main(["export", "--run", str(run), "--out", str(out), "--parity-rows", "32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == str(out) and summary["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert cli_main(["export", "--run", str(tmp_path / "none")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# ------------------------------------------------------- every block the library can train


def first_rows(cfg, spec, rows: int = 64) -> Batch:
    chunk = next(encoded_chunks(spec, cfg.dataset.valid, rows, need_labels=False))
    return to_batch(chunk.slice(0, min(rows, chunk.rows)), spec)


VARIANTS = {
    # per-feature tables straight into the block
    "per_feature": {"embedding": {"type": "per_feature"}},
    # Unified Embedding with mixed chunk counts (pass-through + projected groups, reordered
    # fields), a split table, and AutoInt+ with MoH head routing in front of the block
    "unified+autoint": {
        "embedding": {
            "type": "unified",
            "rows": 512,
            "chunk_dim": 4,
            "chunks": {"c1": 2, "c3": 3},
            "num_tables": 2,
        },
        "interaction": {
            "type": "autoint",
            "layers": 2,
            "attention_dim": 8,
            "heads": 4,
            "dnn": [8],
            "heads_routing": {"shared": 1, "top_k": 1},
        },
    },
}


def build_or_skip(cfg, spec, block: str):
    try:
        return build_model(cfg, spec)
    except ModuleNotFoundError as exc:
        if exc.name == f"mtrec.multitask.{block}":
            pytest.skip(f"model.multitask.type {block!r}: mtrec/multitask/{block}.py not there yet")
        raise


def settle_running_stats(model, batch: Batch, steps: int = 3) -> None:
    """Move BatchNorm running statistics off their init (train-mode forwards), so an
    export that scored with batch statistics would fail parity."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(batch.sparse, batch.dense * 3.0 + 1.0)
    model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("block", sorted(MULTITASK_REGISTRY))
def test_every_block_exports_with_parity(
    block: str, variant: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    data = small_data_dir(tmp_path_factory)
    model_cfg = {**VARIANTS[variant], "multitask": {"type": block}}
    cfg = small_config(data, tmp_path, model=model_cfg)
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    model = build_or_skip(cfg, spec, block)
    batch = first_rows(cfg, spec)
    settle_running_stats(model, batch)
    scripted = script_serving(model, spec)
    assert check_parity(scripted, model, batch) <= PARITY_TOLERANCE
    # saved and reloaded: still the same scores, and no torchrec / fbgemm code inside
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    assert not [n for n, t in code_files(buffer.getvalue()).items() if "fbgemm" in t]
    reloaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    kjt = batch.sparse
    with torch.no_grad():
        probs = reloaded(kjt.values(), kjt.lengths(), batch.dense)
        expected = model.predict(kjt, batch.dense)
    torch.testing.assert_close(probs, expected, rtol=0, atol=PARITY_TOLERANCE)
    assert probs.shape == (batch.batch_size, len(spec.tasks))
    assert ((probs > 0) & (probs < 1)).all() and probs.std(0).min() > 0


def test_chained_tasks_export_joint_probabilities(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from mtrec.export.exporter import signature_of

    data = small_data_dir(tmp_path_factory)
    probe = small_config(data, tmp_path)
    chain = probe.task_names[:2]
    cfg = small_config(data, tmp_path, model={"multitask": {"chain": chain}})
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, spec).eval()
    scripted = script_serving(model, spec)
    batch = first_rows(cfg, spec)
    assert check_parity(scripted, model, batch) <= PARITY_TOLERANCE
    probs = scripted(batch.sparse.values(), batch.sparse.lengths(), batch.dense)
    first, second = (spec.task_names.index(t) for t in chain)
    assert (probs[:, second] <= probs[:, first] + 1e-7).all()
    assert signature_of(spec, "h", model, cfg.model)["chain"] == chain


def test_frozen_export_scores_as_the_plain_scripted_module(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """``script_serving`` freezes by default: same scores as the unfrozen module and the
    eager model (also for ids never seen in training), the attributes callers read, and
    the frozen file saves and loads."""
    data = small_data_dir(tmp_path_factory)
    cfg = small_config(data, tmp_path, model=VARIANTS["unified+autoint"])
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, spec)
    batch = first_rows(cfg, spec)
    settle_running_stats(model, batch)
    plain = script_serving(model, spec, freeze=False)
    frozen = script_serving(model, spec)
    assert not list(frozen.parameters()), "freezing turns weights into graph constants"
    buffer = io.BytesIO()
    torch.jit.save(frozen, buffer)
    loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    assert list(loaded.task_names) == spec.task_names
    assert list(loaded.feature_names) == spec.sparse_names
    kjt = batch.sparse
    values = kjt.values().clone()
    values[::3] = 2**62 + 12345  # an id no feature saw in training
    for ids in (kjt.values(), values):
        with torch.no_grad():
            want = plain(ids, kjt.lengths(), batch.dense)
            eager_kjt = type(kjt)(keys=kjt.keys(), values=ids, lengths=kjt.lengths())
            torch.testing.assert_close(
                model.predict(eager_kjt, batch.dense), want, rtol=0, atol=PARITY_TOLERANCE
            )
            for module in (frozen, loaded):
                torch.testing.assert_close(
                    module(ids, kjt.lengths(), batch.dense), want, rtol=0, atol=1e-6
                )
                one = module(ids[:0], kjt.lengths()[:0], batch.dense[:0])
                assert one.shape == (0, len(spec.tasks))
