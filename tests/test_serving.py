"""Client helpers (mtrec.serving) and the Ray Serve example (pipelines/serve.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import polars as pl
import pytest
import torch
from helpers import trained_run

from mtrec.data.batcher import encoded_chunks, to_batch
from mtrec.data.errors import DataError
from mtrec.data.hashing import MISSING_ID, hash_value
from mtrec.export.errors import ExportError
from mtrec.export.exporter import export_run
from mtrec.serving import Scorer, encode, load_model, read_signature, spec_from_signature
from mtrec.train.loop import load_trained_model

SERVE = Path(__file__).resolve().parent.parent / "pipelines" / "serve.py"
ROWS = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def model_file(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "model.pt"
    export_run(run, out=out, parity_rows=64)
    return out


@pytest.fixture(scope="module")
def test_rows(run: Path) -> pl.DataFrame:
    cfg, _, _ = load_trained_model(run)
    return pl.read_parquet(cfg.dataset.test, n_rows=ROWS)


# ------------------------------------------------------------------ encode == training path


def test_encode_matches_the_training_data_path(run: Path, model_file: Path, test_rows) -> None:
    cfg, spec, model = load_trained_model(run)
    chunk = next(encoded_chunks(spec, cfg.dataset.test, ROWS, need_labels=False))
    batch = to_batch(chunk.slice(0, ROWS), spec)
    with torch.no_grad():
        expected = model.predict(batch.sparse, batch.dense)
    module, signature = load_model(model_file)
    for rows in (test_rows, test_rows.to_dicts()):
        values, lengths, dense = encode(rows, signature)
        assert torch.equal(values, batch.sparse.values())
        assert torch.equal(lengths, batch.sparse.lengths())
        torch.testing.assert_close(dense, batch.dense, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(module(values, lengths, dense), expected, rtol=0, atol=1e-6)


def test_scorer_records_one_dict_per_row(model_file: Path, test_rows) -> None:
    scorer = Scorer(model_file)
    rows = test_rows.head(3).to_dicts()
    records = scorer.records(rows)
    assert [list(r) for r in records] == [scorer.tasks] * 3
    probs = scorer(rows)
    assert [[r[t] for t in scorer.tasks] for r in records] == probs.tolist()
    # one dict is one row; extra keys (labels, ids) are ignored
    torch.testing.assert_close(scorer({**rows[1], "extra": "x"}), probs[1:2])


# -------------------------------------------------------------- raw values → ids, by hand


SIGNATURE = {
    "sparse_features": [
        {"name": "user", "column": "user", "kind": "categorical"},
        {"name": "tags", "column": "tags", "kind": "multi_hot", "delimiter": "|"},
        {"name": "age_value", "column": "age", "kind": "categorical"},
    ],
    "numeric_features": [{"name": "age", "column": "age", "transform": "standardize"}],
    "tasks": ["click"],
}


def test_encode_hashes_raw_values_as_training_does() -> None:
    rows = [
        {"user": 42, "tags": ["a", "b"], "age": 34},
        {"user": "42", "tags": "a|b", "age": 34.0},
        {"user": 42.0, "tags": "b||", "age": 0.5},
        {"user": None, "tags": None, "age": None},
    ]
    values, lengths, dense = encode(rows, SIGNATURE)
    # feature-major: user × 4 rows, then tags (2, 2, 1, 0 ids), then age_value × 4
    assert lengths.tolist() == [1, 1, 1, 1, 2, 2, 1, 0, 1, 1, 1, 1]
    a, b = hash_value("a"), hash_value("b")
    assert values.tolist() == [
        *[hash_value(42)] * 3,
        MISSING_ID,
        a,
        b,
        a,
        b,
        b,
        hash_value("34"),
        hash_value(34),
        hash_value(0.5),
        MISSING_ID,
    ]
    assert values.dtype == torch.int64 and lengths.dtype == torch.int32
    assert dense.shape == (4, 1) and dense.dtype == torch.float64
    assert dense[:3, 0].tolist() == [34.0, 34.0, 0.5] and torch.isnan(dense[3, 0])


def test_encode_of_a_frame_equals_encode_of_its_dicts() -> None:
    frame = pl.DataFrame(
        {"user": ["x", None, "z"], "tags": ["p|q", "", None], "age": [1.5, None, 3.0]}
    )
    from_frame = encode(frame, SIGNATURE)
    from_dicts = encode(frame.to_dicts(), SIGNATURE)
    for a, b in zip(from_frame, from_dicts):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    empty = encode([], SIGNATURE)
    assert empty.values.numel() == 0 and empty.dense.shape == (0, 1)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"user": 1, "tags": [], "agee": 3}], r"rows\[0\]: no key 'age'.*did you mean 'agee'"),
        ([{"user": True, "tags": [], "age": 3}], r"\['user'\].*True of type bool"),
        ([{"user": 1, "tags": [], "age": "old"}], r"\['age'\].*expected a number"),
        ([{"user": 1, "tags": {"a": 1}, "age": 3}], r"\['tags'\].*a list of values"),
        ([{"user": [1], "tags": [], "age": 3}], r"\['user'\].*a string, an integer"),
        (["user=1"], r"rows\[0\]: expected a dict"),
        ("user=1", "expected a polars DataFrame, a list of dicts or a dict"),
    ],
)
def test_encode_names_the_bad_row_and_column(rows, message: str) -> None:
    with pytest.raises(DataError, match=message):
        encode(rows, SIGNATURE)


def test_multi_hot_text_needs_a_delimiter() -> None:
    sig = json.loads(json.dumps(SIGNATURE))
    sig["sparse_features"][1]["delimiter"] = None
    with pytest.raises(DataError, match="no delimiter is set"):
        encode([{"user": 1, "tags": "a|b", "age": 3}], sig)
    assert encode([{"user": 1, "tags": ["a", "b"], "age": 3}], sig).lengths.tolist() == [1, 2, 1]
    with pytest.raises(DataError, match="column 'tags'.*delimiter"):
        encode(pl.DataFrame({"user": [1], "tags": ["a|b"], "age": [3]}), sig)


# ---------------------------------------------------------------------- signature reading


def test_signature_is_read_from_the_file_without_loading_it(model_file: Path) -> None:
    sig = read_signature(model_file)
    assert sig == json.loads(model_file.with_name("model.signature.json").read_text())
    assert read_signature(model_file.with_name("model.signature.json")) == sig
    spec = spec_from_signature(sig)
    assert spec.sparse_names == [f["name"] for f in sig["sparse_features"]]
    assert spec.nan_policy == "fill"


def test_unreadable_exports_are_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no such file"):
        read_signature(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="junk.pt: cannot read the signature"):
        load_model(junk)
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(plain))
    with pytest.raises(ExportError, match="not an mtrec export"):
        load_model(plain)


def test_client_helpers_import_no_torchrec() -> None:
    code = (
        "import sys, mtrec.serving; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'fbgemm_gpu')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ Ray Serve on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.mark.timeout(300)
def test_ray_serve_example_answers_on_loopback(model_file: Path, test_rows) -> None:
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (requirements/cpu.txt)")
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, str(SERVE), "--model", str(model_file), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()  # the ready line, once the endpoint answers
        assert line, proc.stderr.read()[-3000:] if proc.poll() is not None else "no ready line"
        ready = json.loads(line)
        url = ready["url"]
        assert url == f"http://127.0.0.1:{port}/predict"
        rows = test_rows.head(5).to_dicts()
        expected = Scorer(model_file)(rows)
        status, body = post(url, {"rows": rows})
        assert status == 200, body
        assert body["tasks"] == read_signature(model_file)["tasks"]
        torch.testing.assert_close(torch.tensor(body["probabilities"]), expected)
        status, body = post(url, rows[0])  # one bare row
        assert status == 200 and len(body["probabilities"]) == 1
        status, body = post(url, {"rows": [{"nothing": 1}]})
        assert status == 400 and "rows[0]: no key" in body["error"]
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert json.load(resp)["tasks"] == read_signature(model_file)["tasks"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]


def test_ray_serve_example_refuses_a_missing_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SERVE), "--model", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "x.pt: no such file" in proc.stderr
