"""The ``mtrec`` command line: the JSON last line of every command, and its error contract."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from helpers import write_small_config

from mtrec.cli import main

DATA_KEYS = {"out", "config", "rows", "tasks"}
TRAIN_KEYS = {"run_dir", "best_epoch", "valid", "samples_per_s", "wall_s"}
EVAL_KEYS = {"run_dir", "split", "rows", "tasks", "report"}


def last_json(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no stdout"
    return json.loads(lines[-1])


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def quiet_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process outside a test function (module fixtures have no capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mtrec: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """synth → train (1 epoch) through the CLI, on small buckets; shared by the module."""
    root = tmp_path_factory.mktemp("cli")
    code, out, _ = quiet_cli(
        ["data", "synth", "--out", root / "data", "--rows", 3000, "--vocab-scale", 0.05]
    )
    assert code == 0
    synth = last_json(out)
    config = write_small_config(Path(synth["out"]), root / "small.yaml")
    code, out, err = quiet_cli(
        ["train", "--config", config, "--set", "training.epochs=1", "--out", root / "run"]
    )
    assert code == 0, err
    return {"root": root, "synth": synth, "config": config, "run": root / "run", "train": out}


def test_data_synth_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["data", "synth", "--out", tmp_path / "d", "--rows", 3000], capsys)
    assert code == 0
    summary = last_json(out)
    assert DATA_KEYS <= summary.keys()
    assert summary["out"] == str(tmp_path / "d")
    assert summary["config"] == str(tmp_path / "d" / "config.yaml")
    assert summary["rows"] == 3000
    assert summary["tasks"] == ["click", "like", "share", "follow"]
    assert Path(summary["config"]).is_file()
    total = sum(
        pl.scan_parquet(tmp_path / "d" / f"{s}.parquet").select(pl.len()).collect().item()
        for s in ("train", "valid", "test")
    )
    assert total == 3000


def test_train_last_line(chain: dict[str, Any]) -> None:
    summary = last_json(chain["train"])
    assert TRAIN_KEYS <= summary.keys()
    assert summary["run_dir"] == str(chain["run"])
    assert summary["best_epoch"] == 1
    assert set(summary["valid"]) == set(chain["synth"]["tasks"])
    for m in summary["valid"].values():
        assert 0.0 <= m["auc"] <= 1.0 and m["logloss"] > 0
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > 0
    assert (chain["run"] / "checkpoints" / "best.pt").is_file()


def test_evaluate_last_line(chain: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["evaluate", "--run", chain["run"]], capsys)
    assert code == 0
    summary = last_json(out)
    assert EVAL_KEYS <= summary.keys()
    assert summary["run_dir"] == str(chain["run"]) and summary["split"] == "test"
    test_rows = pl.scan_parquet(chain["synth"]["out"] + "/test.parquet").select(pl.len())
    assert summary["rows"] == test_rows.collect().item()
    assert set(summary["tasks"]) == set(chain["synth"]["tasks"])
    for m in summary["tasks"].values():
        assert {"auc", "logloss", "oracle_auc"} <= m.keys()
        assert 0.5 < m["oracle_auc"] <= 1.0
    report = Path(summary["report"])
    assert report == chain["run"] / "eval" / "report.json"
    saved = json.loads(report.read_text())
    for task, m in summary["tasks"].items():
        assert saved["tasks"][task]["auc"] == pytest.approx(m["auc"], abs=1e-6)
    assert report.with_suffix(".md").is_file()


def test_evaluate_valid_split(chain: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["evaluate", "--run", chain["run"], "--split", "valid"], capsys)
    assert code == 0
    summary = last_json(out)
    assert summary["split"] == "valid"
    assert Path(summary["report"]).name == "report_valid.json"
    # the valid split is what training validated on: same metrics as the train summary
    trained = last_json(chain["train"])["valid"]
    for task, m in summary["tasks"].items():
        assert m["auc"] == pytest.approx(trained[task]["auc"], abs=2e-6)


def test_export_then_predict(chain: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    model = chain["root"] / "serve" / "model.pt"
    code, out, _ = cli(["export", "--run", chain["run"], "--out", model], capsys)
    assert code == 0
    summary = last_json(out)
    assert {"model", "parity_max_abs_diff"} <= summary.keys()
    assert summary["model"] == str(model) and model.is_file()
    assert summary["parity_max_abs_diff"] <= 1e-5

    test_file = Path(chain["synth"]["out"]) / "test.parquet"
    pred = chain["root"] / "pred.parquet"
    code, out, _ = cli(["predict", "--model", model, "--input", test_file, "--out", pred], capsys)
    assert code == 0
    summary = last_json(out)
    assert {"out", "rows"} <= summary.keys()
    assert summary["out"] == str(pred)
    frame = pl.read_parquet(pred)
    assert summary["rows"] == frame.height == pl.read_parquet(test_file).height
    assert frame.columns == chain["synth"]["tasks"]
    probs = frame.to_numpy()
    assert ((probs > 0) & (probs < 1)).all()


def test_default_export_location(chain: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["export", "--run", chain["run"]], capsys)
    assert code == 0
    assert last_json(out)["model"] == str(chain["run"] / "export" / "model.pt")
    assert (chain["run"] / "export" / "model.signature.json").is_file()


def test_compare_two_runs(chain: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    second = chain["root"] / "run_seed7"
    code, out, err = cli(
        [
            "train",
            "--config",
            chain["config"],
            "--set",
            "training.epochs=1",
            "--set",
            "seed=7",
            "--out",
            second,
        ],
        capsys,
    )
    assert code == 0, err
    code, out, err = cli(["compare", chain["run"], second], capsys)
    assert code == 0, err
    summary = last_json(out)
    assert [r["run"] for r in summary["runs"]] == [str(chain["run"]), str(second)]
    assert [r["seed"] for r in summary["runs"]][1] == 7
    # runs that differ only by seed are pooled into one experiment
    (pooled,) = summary["experiments"].values()
    assert pooled["runs"] == 2
    for task in chain["synth"]["tasks"]:
        aucs = [r["auc"][task] for r in summary["runs"]]
        assert pooled["auc"][task]["mean"] == pytest.approx(sum(aucs) / 2)
    assert "| run |" in summary["markdown"] and str(second) in err
    assert (second / "eval" / "report.json").is_file()


# --------------------------------------------------------------------------------- errors


def test_unknown_config_key_via_set(
    chain: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--config", chain["config"], "--set", "training.epochz=3"]
    code, out, err = cli([*argv, "--out", tmp_path / "run"], capsys)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "training.epochz" in line and "did you mean 'epochs'" in line
    assert not (tmp_path / "run").exists()


def test_set_without_equals(chain: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["train", "--config", chain["config"], "--set", "training.epochs"], capsys)
    assert code == 2
    assert "training.epochs" in one_error_line(err)


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    code, out, err = cli(["train", "--config", missing], capsys)
    assert code == 2 and out == ""
    assert str(missing) in one_error_line(err)


def test_evaluate_a_directory_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(["evaluate", "--run", tmp_path], capsys)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert str(tmp_path) in line and "not a run directory" in line
    assert not (tmp_path / "eval").exists()


def test_training_into_an_existing_run(
    chain: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    best = chain["run"] / "checkpoints" / "best.pt"
    before = best.read_bytes()
    argv = ["train", "--config", chain["config"], "--set", "training.epochs=1"]
    code, _, err = cli([*argv, "--out", chain["run"]], capsys)
    assert code == 2
    assert "--resume" in one_error_line(err)
    assert best.read_bytes() == before


def test_predict_errors(chain: dict[str, Any], tmp_path: Path, capsys) -> None:
    missing = tmp_path / "model.pt"
    test_file = Path(chain["synth"]["out"]) / "test.parquet"
    code, _, err = cli(["predict", "--model", missing, "--input", test_file], capsys)
    assert code == 2 and str(missing) in one_error_line(err)
    # an input without a feature column names the column
    model = chain["run"] / "export" / "model.pt"
    if not model.exists():
        assert cli(["export", "--run", chain["run"]], capsys)[0] == 0
    broken = tmp_path / "broken.parquet"
    pl.read_parquet(test_file).drop("c2").write_parquet(broken)
    code, _, err = cli(["predict", "--model", model, "--input", broken], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "'c2'" in line and str(broken) in line
    assert not broken.with_name("broken.predictions.parquet").exists()


@pytest.mark.parametrize("case", ["workers", "rows"])
def test_other_usage_errors_follow_the_contract(
    case: str, chain: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if case == "workers":
        argv = ["train", "--config", chain["config"], "--workers", 0, "--out", tmp_path / "r"]
    else:
        argv = ["data", "synth", "--out", tmp_path / "d", "--rows", 5]
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse-style exit instead of a return code
        code = exc.code if isinstance(exc.code, int) else 1
    except ValueError:
        code = -1
    err = capsys.readouterr().err
    assert code == 2
    one_error_line(err)


@pytest.mark.integration  # a fresh Python process
def test_console_script_exit_status(tmp_path: Path) -> None:
    """A real process: exit status 2 and exactly one stderr line."""
    script = Path(sys.executable).with_name("mtrec")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mtrec.cli"]
    missing = tmp_path / "missing.yaml"
    proc = subprocess.run(
        [*cmd, "train", "--config", str(missing)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert str(missing) in one_error_line(proc.stderr)


def test_pipeline_entry_points_wrap_the_cli() -> None:
    """`ray job submit -- python pipelines/<cmd>.py ...` takes the CLI's arguments."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for cmd in ("train", "baseline", "evaluate", "export"):
        proc = subprocess.run(
            [sys.executable, str(root / "pipelines" / f"{cmd}.py"), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"mtrec {cmd}" in proc.stdout


def test_evaluate_other_file_keeps_the_test_report(
    chain: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(["evaluate", "--run", chain["run"]], capsys)
    assert code == 0
    test_report = Path(last_json(out)["report"])
    before = test_report.read_bytes()
    other = Path(chain["synth"]["out"]) / "valid.parquet"
    code, out, _ = cli(["evaluate", "--run", chain["run"], "--data", other], capsys)
    assert code == 0
    summary = last_json(out)
    assert summary["split"] is None
    assert (
        Path(summary["report"]).name == "report_valid.json"
        and Path(summary["report"]) != test_report
    )
    assert test_report.read_bytes() == before
