"""Client helpers (mtrec.serving) and the Ray Serve example (pipelines/serve.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
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


def _load_serve():
    """pipelines/serve.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("mtrec_serve_script", SERVE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


serve_script = _load_serve()


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


# ------------------------------------------------------------ request limits (no Ray needed)


LIMITS = serve_script.Limits(max_rows=3, max_bytes=300_000, max_depth=4)


@pytest.mark.parametrize(
    ("data", "status", "message", "limit"),
    [
        (b'{"rows": [{"age": ' + b"9" * 400 + b"}]}", 400, "400 digits.*64 bits", None),
        (b'[{"user": -' + b"1" * 21 + b"}]", 400, "21 digits.*as strings", None),
        (b'[{"age": NaN}]', 400, "NaN is not a JSON number.*null", None),
        (b'[{"age": -Infinity}]', 400, "-Infinity is not a JSON number", None),
        (b'[{"age": 1e400}]', 400, "1e400 is out of range", None),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply", "max_depth"),
        (b'{"rows": [{"tags": [[1]]}]}', 400, "nested 5 deep", "max_depth"),
        (b'{"rows": [' + b" " * 300_000 + b"]}", 413, "300012 bytes", "max_bytes"),
        (b'{"rows": [1, 2, 3, 4]}', 413, "4 rows", "max_rows"),
        (b"[{}, {}, {}, {}]", 413, "4 rows", "max_rows"),
        (b'{"rows": [}', 400, "not JSON", None),
        (b'{"rows": "\xff"}', 400, "not JSON", None),
    ],
)
def test_requests_beyond_the_limits_are_refused(
    data: bytes, status: int, message: str, limit: str | None
) -> None:
    with pytest.raises(serve_script.RequestError, match=message) as info:
        serve_script.rows_of(serve_script.parse_body(data, LIMITS), LIMITS)
    assert info.value.status == status
    if limit is None:
        assert "limit" not in info.value.body
    else:
        flag = serve_script.LIMIT_FLAGS[limit]
        assert info.value.body["limit"] == {
            "name": limit,
            "value": getattr(LIMITS, limit),
            "flag": flag,
        }
        assert f"{limit}={getattr(LIMITS, limit)}" in info.value.body["error"]
        assert flag in info.value.body["error"]


def test_requests_within_the_limits_parse_as_json() -> None:
    body = {"rows": [{"u": 2**64 - 1, "v": -(2**63), "t": [1.5e308, -0.0]}, {}, {}]}
    data = json.dumps(body).encode()
    assert serve_script.parse_body(data, LIMITS) == body
    assert serve_script.rows_of(body, LIMITS) == body["rows"]
    assert serve_script.rows_of({"u": 1}, LIMITS) == {"u": 1}  # one bare row


class FakeRequest:
    """The two things read_body uses of a Starlette request."""

    def __init__(self, chunks: list[bytes], content_length: str | None) -> None:
        self.headers = {} if content_length is None else {"content-length": content_length}
        self.chunks = chunks
        self.read = 0

    async def stream(self):
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def test_oversize_bodies_are_refused_before_or_while_reading() -> None:
    cap = serve_script.DRAIN_FACTOR * LIMITS.max_bytes
    declared = FakeRequest([b"x" * 200_000] * 20, str(cap + 1))
    with pytest.raises(serve_script.RequestError, match=f"{cap + 1} bytes") as info:
        asyncio.run(serve_script.read_body(declared, LIMITS))
    assert info.value.status == 413 and declared.read == 0  # refused on the header alone
    # a little over the limit: read to the end (so the client sees the 413), not kept
    drained = FakeRequest([b"x" * 200_000] * 2, "400000")
    with pytest.raises(serve_script.RequestError, match="400000 bytes") as info:
        asyncio.run(serve_script.read_body(drained, LIMITS))
    assert info.value.status == 413 and drained.read == 2
    # no Content-Length (chunked): stops reading at the drain cap
    chunked = FakeRequest([b"x" * 200_000] * 100, None)
    with pytest.raises(serve_script.RequestError, match="over 300000 bytes") as info:
        asyncio.run(serve_script.read_body(chunked, LIMITS))
    assert info.value.status == 413 and chunked.read == cap // 200_000 + 1
    with pytest.raises(serve_script.RequestError, match="bad Content-Length"):
        asyncio.run(serve_script.read_body(FakeRequest([], "-1"), LIMITS))
    ok = FakeRequest([b"[1,", b"2]"], None)
    assert asyncio.run(serve_script.read_body(ok, LIMITS)) == b"[1,2]"


def test_numbers_beyond_float32_are_read_as_missing_as_in_training() -> None:
    # the encoder's overflow rule (mtrec.data.numeric): a value whose transform float32
    # cannot hold is missing, as training reads it under nan_policy: fill
    spec = spec_from_signature(SIGNATURE)
    inputs = encode(
        [{"user": 1, "tags": [], "age": 3.0e38}, {"user": 1, "tags": [], "age": -1e39}], spec
    )
    assert inputs.dense[0, 0].item() == 3.0e38
    assert torch.isnan(inputs.dense[1, 0])


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


@pytest.mark.integration  # a fresh Python process
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


def post_raw(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def non_loopback_listeners(pid: int) -> list[str]:
    """Listening TCP / UDP sockets of ``pid`` and its descendants on a non-loopback address."""
    import psutil  # requirements/dev.txt (the check must not skip silently)

    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:  # exited meanwhile
            continue
        for c in conns:
            if c.status not in (psutil.CONN_LISTEN, psutil.CONN_NONE) or c.raddr:
                continue
            ip = ipaddress.ip_address(c.laddr.ip)
            ip = getattr(ip, "ipv4_mapped", None) or ip
            if not ip.is_loopback:
                found.append(f"{name} (pid {proc.pid}) on {c.laddr.ip}:{c.laddr.port}")
    assert len([root, *root.children(recursive=True)]) > 3  # the Ray processes were seen
    return found


def check_refusals(url: str, row: dict, signature: dict) -> None:
    """Oversize, too deep and malformed requests: 413 / 400 with the limit named."""
    numeric = signature["numeric_features"][0]["column"]
    category = next(f["column"] for f in signature["sparse_features"] if f["kind"] == "categorical")
    status, body = post(url, {"rows": [row] * 5000})  # default --max-rows 4096
    assert status == 413 and body["limit"]["flag"] == "--max-rows", body
    assert "5000 rows" in body["error"] and "--max-rows" in body["error"]
    # a body over --max-bytes (8 MiB): read and dropped, so the client gets the 413
    status, body = post(url, {"rows": [row], "pad": "x" * 9 * 2**20})
    assert status == 413 and body["limit"]["name"] == "max_bytes", body
    status, body = post_raw(url, b"[" * 50_000 + b"]" * 50_000)
    assert status == 400 and body["limit"]["flag"] == "--max-depth", body
    status, body = post(url, {"rows": [[[[[[[[[1]]]]]]]]]})
    assert status == 400 and "nested 10 deep" in body["error"], body
    big = "1" * 400
    for column in (numeric, category):
        data = json.dumps({"rows": [{**row, column: 0}]}).replace(
            f'"{column}": 0', f'"{column}": {big}'
        )
        status, body = post_raw(url, data.encode())
        assert status == 400 and "400 digits" in body["error"], body
    status, body = post_raw(url, json.dumps([{**row, numeric: float("nan")}]).encode())
    assert status == 400 and "NaN is not a JSON number" in body["error"], body
    status, body = post(url, [{**row, numeric: "NaN"}])
    assert status == 400 and f"['{numeric}']" in body["error"], body
    # beyond float32 after the transform: missing, as in training (scored as a null)
    status, body = post(url, [{**row, numeric: 1e39}, {**row, numeric: None}])
    assert status == 200 and body["probabilities"][0] == body["probabilities"][1], body


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_ray_serve_example_answers_on_loopback(model_file: Path, test_rows) -> None:
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (requirements/cpu.txt)")
    port = free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the script must keep Ray on loopback
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
        check_refusals(url, rows[0], read_signature(model_file))
        status, body = post(url, {"rows": rows})  # still serving after the refusals
        assert status == 200, body
        assert non_loopback_listeners(proc.pid) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]


def test_ray_serve_example_refuses_a_missing_model(tmp_path: Path, capsys) -> None:
    assert serve_script.main(["--model", str(tmp_path / "x.pt")]) == 2  # before Ray starts
    assert "x.pt: no such file" in capsys.readouterr().err


def test_ray_serve_example_refuses_a_busy_port(model_file: Path, capsys) -> None:
    with socket.socket() as busy:  # refused before Ray starts (else: a traceback after ~1 min)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serve_script.main(["--model", str(model_file), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_ray_serve_example_refuses_an_unloadable_model(
    model_file: Path, tmp_path: Path, capsys
) -> None:
    import zipfile

    with zipfile.ZipFile(model_file) as good:  # the signature reads, the model does not load
        name = next(n for n in good.namelist() if n.endswith("extra/signature.json"))
        signature = good.read(name)
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(broken, "w") as out:
        out.writestr(name, signature)
        out.writestr(name.split("/")[0] + "/data.pkl", b"junk")
    assert read_signature(broken)["tasks"]
    assert serve_script.main(["--model", str(broken), "--port", str(free_port())]) == 2
    assert "broken.pt: cannot load the TorchScript model" in capsys.readouterr().err
