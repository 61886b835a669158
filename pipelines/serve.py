"""Serve an exported model over HTTP with Ray Serve: JSON rows in, probabilities out.

    python pipelines/serve.py --model runs/x/export/model.pt [--port 8000] [--replicas 1]

Endpoints (all on 127.0.0.1 unless ``--host`` says otherwise):

* ``POST /predict`` with ``{"rows": [{COLUMN: raw value, ...}, ...]}`` (or a bare list
  of rows, or one row) → ``200 {"tasks": [...], "probabilities": [[p_task, ...], ...],
  "config_hash": ...}``. Keys are the data's column names (``signature.json``:
  ``sparse_features[i].column`` / ``numeric_features[i].column``); values are raw
  (strings or integers for categories, lists for multi-hot features, numbers for
  numeric ones, ``null`` for missing). Rows the model cannot read → ``400 {"error":
  "rows[0]: no key 'c0' ..."}``. Malformed numbers (integers beyond 64 bits, ``NaN`` /
  ``Infinity``, text for a numeric column, values beyond float32) → 400.
* Limits (:class:`Limits`, flags ``--max-rows`` / ``--max-bytes`` / ``--max-depth``): more
  rows or bytes → 413, deeper JSON → 400, with ``{"error": ..., "limit": {"name":
  "max_rows", "value": 4096, "flag": "--max-rows"}}``.
* ``GET /predict`` → the model's signature (features, tasks, hash definition).

Each replica loads ``model.pt`` with :class:`mtrec.serving.Scorer` (torch only) and
turns rows into tensors with :func:`mtrec.serving.encode`, the training encoder. The
script starts an embedded Ray instance whose services (GCS, raylet, dashboard and
runtime-env agents, workers) all listen on 127.0.0.1 only (:mod:`mtrec.ray_local`;
``--address`` joins a running cluster instead), prints one JSON line ``{"url": ...}``
when the endpoint answers, and shuts Serve and Ray down on Ctrl-C or SIGTERM.

Client example (stdlib only)::

    import json, urllib.request
    body = json.dumps({"rows": [{"user_id": 17, "c0": 3, "tags": [1, 2], "n0": 0.4}]})
    req = urllib.request.Request("http://127.0.0.1:8000/predict", body.encode(),
                                 {"Content-Type": "application/json"})
    print(json.load(urllib.request.urlopen(req))["probabilities"])
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the job's working dir

ROUTE = "/predict"
DRAIN_FACTOR = 8  # an oversize body is read (and dropped) up to this many times the limit


# ------------------------------------------------------------------------- request limits


@dataclass(frozen=True)
class Limits:
    """What one request may hold; each field has a command-line flag (``LIMIT_FLAGS``).

    max_rows: rows per request (413 above).
    max_bytes: bytes of request body (413 above; checked on Content-Length and while
        reading, so an oversize body is never held in memory).
    max_depth: nesting of JSON arrays / objects (400 above). ``{"rows": [{"tags": [..]}]}``
        is 4 deep.
    """

    max_rows: int = 4096
    max_bytes: int = 8 * 2**20
    max_depth: int = 8


LIMIT_FLAGS = {"max_rows": "--max-rows", "max_bytes": "--max-bytes", "max_depth": "--max-depth"}
_LIMIT_HINTS = {
    "max_rows": "send fewer rows per request",
    "max_bytes": "send fewer rows per request",
    "max_depth": "rows are flat objects, with lists only for multi-hot values",
}


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a JSON body naming what to fix.

    ``limit`` names the :class:`Limits` field that refused it (the body then says which
    flag raises it)."""

    def __init__(
        self, status: int, message: str, limit: str | None = None, limits: Limits | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": message}
        if limit is not None and limits is not None:
            flag = LIMIT_FLAGS[limit]
            self.body["limit"] = {"name": limit, "value": getattr(limits, limit), "flag": flag}
            self.body["error"] = (
                f"{message}; the limit is {limit}={getattr(limits, limit)}: "
                f"{_LIMIT_HINTS[limit]}, or start the server with a larger {flag} "
                f"(pipelines/serve.py {flag} N)"
            )


def _parse_int(text: str) -> int:
    # ids are int64 / uint64 in every data file; a longer integer is a client bug, and
    # float() of it (a numeric column) overflows
    digits = len(text.lstrip("-"))
    if digits > 20 or not -(2**63) <= int(text) < 2**64:
        shown = text if len(text) <= 24 else f"{text[:20]}..."
        raise RequestError(
            400,
            f"the integer {shown} ({digits} digits) does not fit in 64 bits; "
            "send such ids as strings",
        )
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise RequestError(400, f"the number {text[:40]} is out of range (beyond ±1.8e308)")
    return value


def _parse_constant(text: str) -> float:
    raise RequestError(400, f"{text} is not a JSON number; send null for a missing value")


def _depth(value: Any) -> int:
    """Nesting of arrays / objects in a parsed JSON value (a scalar: 0); iterative."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_body(data: bytes, limits: Limits) -> Any:
    """The JSON of a request body, within ``limits``; a :class:`RequestError` otherwise.

    Stricter than ``json.loads``: integers must fit in 64 bits, numbers must be finite,
    ``NaN`` / ``Infinity`` are refused (not JSON), nesting is at most ``max_depth``.
    """
    if len(data) > limits.max_bytes:
        raise RequestError(413, f"the request body has {len(data)} bytes", "max_bytes", limits)
    try:
        body = json.loads(
            data,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except RecursionError:
        raise RequestError(
            400, "the request body is nested too deeply", "max_depth", limits
        ) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise RequestError(400, f"the request body is not JSON: {exc}") from None
    depth = _depth(body)
    if depth > limits.max_depth:
        raise RequestError(400, f"the request body is nested {depth} deep", "max_depth", limits)
    return body


def rows_of(body: Any, limits: Limits | None = None) -> Any:
    """The rows of a request body: ``{"rows": [...]}``, a list of rows, or one row;
    at most ``limits.max_rows`` of them."""
    rows = body["rows"] if isinstance(body, dict) and "rows" in body else body
    if limits is not None and isinstance(rows, list) and len(rows) > limits.max_rows:
        raise RequestError(413, f"the request has {len(rows)} rows", "max_rows", limits)
    return rows


async def read_body(request: Any, limits: Limits) -> bytes:
    """The body of a Starlette request, refusing (413) more than ``limits.max_bytes``.

    An oversize body is never held in memory. It is read and dropped up to
    ``DRAIN_FACTOR`` times the limit, so that an ordinary client (one that sends the
    whole body before reading the answer) gets the 413 rather than a connection reset;
    a larger declared Content-Length is refused without reading.
    """
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise RequestError(400, f"bad Content-Length header {declared[:40]!r}")
    refusal = RequestError(
        413,
        f"the request body has {declared or f'over {limits.max_bytes}'} bytes",
        "max_bytes",
        limits,
    )
    if declared is not None and int(declared) > DRAIN_FACTOR * limits.max_bytes:
        raise refusal
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_FACTOR * limits.max_bytes:
            raise refusal
        if size <= limits.max_bytes:
            chunks.append(chunk)
    if size > limits.max_bytes:
        raise refusal
    return b"".join(chunks)


# ------------------------------------------------------------------------------ Ray Serve


def build_app(
    model_path: str, replicas: int = 1, threads: int = 1, limits: Limits = Limits()
) -> Any:
    """The Ray Serve application: ``replicas`` copies of the scorer of ``model_path``."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1})
    class MtrecScorer:
        def __init__(self, path: str, threads: int, limits: Limits) -> None:
            from mtrec.ray_local import serve_replica_on_loopback
            from mtrec.serving import Scorer

            serve_replica_on_loopback()
            self.scorer = Scorer(path, threads=threads)
            self.limits = limits

        async def __call__(self, request: Request) -> Any:
            if request.method == "GET":
                return self.scorer.signature.to_dict()
            try:
                return self.predict(await read_body(request, self.limits))
            except RequestError as exc:
                return JSONResponse(exc.body, exc.status)

        def predict(self, data: bytes) -> dict[str, Any]:
            import torch

            from mtrec.data.errors import DataError
            from mtrec.serving import encode

            rows = rows_of(parse_body(data, self.limits), self.limits)
            try:
                inputs = encode(rows, self.scorer.spec)
            except DataError as exc:
                raise RequestError(400, str(exc)) from None
            with torch.no_grad():
                probs = self.scorer.module(*inputs)
            return {
                "tasks": self.scorer.tasks,
                "probabilities": probs.tolist(),
                "config_hash": self.scorer.signature.config_hash,
            }

    return MtrecScorer.bind(model_path, threads, limits)


def _wait_until_up(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _port_problem(host: str, port: int) -> str | None:
    """Why the HTTP endpoint could not listen on ``host:port`` (None: it can).

    Checked before Ray starts: Ray Serve's own failure comes after a minute, as a
    traceback."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as exc:
        return (
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port / --host"
        )
    return None


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an exported model.pt (mtrec export)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--address", help="join this Ray cluster (default: embedded, loopback)")
    default = Limits()
    p.add_argument(
        "--max-rows", type=int, default=default.max_rows, help="rows per request (413 above)"
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=default.max_bytes,
        help="bytes per request body (413 above)",
    )
    p.add_argument(
        "--max-depth",
        type=int,
        default=default.max_depth,
        help="nesting of JSON arrays/objects (400 above)",
    )
    args = p.parse_args(argv)
    limits = Limits(args.max_rows, args.max_bytes, args.max_depth)
    if min(limits.max_rows, limits.max_bytes, limits.max_depth) < 1:
        p.error("--max-rows, --max-bytes and --max-depth must be positive")

    from mtrec.export.errors import ExportError
    from mtrec.serving import load_model

    model = str(Path(args.model).resolve())
    try:
        load_model(model)  # fail here, not in replicas that Serve restarts for minutes
    except ExportError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2
    problem = _port_problem(args.host, args.port)
    if problem:
        print(f"serve: error: {problem}", file=sys.stderr)
        return 2

    from mtrec.ray_local import loopback_init_kwargs, use_loopback

    if not args.address:
        use_loopback()  # before Ray is imported: it reads the setting once, on import
    import ray
    from ray import serve

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=max(1, args.replicas),
            log_to_driver=False,
            configure_logging=False,
            **loopback_init_kwargs(),
        )
    signal.signal(signal.SIGTERM, _stop)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(
            build_app(model, args.replicas, args.threads, limits), name="mtrec", route_prefix=ROUTE
        )
        url = f"http://{args.host}:{args.port}{ROUTE}"
        _wait_until_up(url, timeout=120)
        print(json.dumps({"url": url, "model": model, "replicas": args.replicas}), flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
