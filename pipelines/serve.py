"""Serve an exported model over HTTP with Ray Serve: JSON rows in, probabilities out.

    python pipelines/serve.py --model runs/x/export/model.pt [--port 8000] [--replicas 1]

Endpoints (all on 127.0.0.1 unless ``--host`` says otherwise):

* ``POST /predict`` with ``{"rows": [{COLUMN: raw value, ...}, ...]}`` (or a bare list
  of rows, or one row) → ``200 {"tasks": [...], "probabilities": [[p_task, ...], ...],
  "config_hash": ...}``. Keys are the data's column names (``signature.json``:
  ``sparse_features[i].column`` / ``numeric_features[i].column``); values are raw
  (strings or integers for categories, lists for multi-hot features, numbers for
  numeric ones, ``null`` for missing). Rows the model cannot read → ``400 {"error":
  "rows[0]: no key 'c0' ..."}``.
* ``GET /predict`` → the model's signature (features, tasks, hash definition).

Each replica loads ``model.pt`` with :class:`mtrec.serving.Scorer` (torch only) and
turns rows into tensors with :func:`mtrec.serving.encode`, the training encoder. The
script starts an embedded Ray instance bound to loopback (``--address`` joins a running
cluster instead), prints one JSON line ``{"url": ..., ...}`` when the endpoint answers,
and shuts Serve and Ray down on Ctrl-C or SIGTERM.

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
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the job's working dir

ROUTE = "/predict"


def rows_of(body: Any) -> Any:
    """The rows of a request body: ``{"rows": [...]}``, a list of rows, or one row."""
    if isinstance(body, dict) and "rows" in body:
        return body["rows"]
    return body


def build_app(model_path: str, replicas: int = 1, threads: int = 1) -> Any:
    """The Ray Serve application: ``replicas`` copies of the scorer of ``model_path``."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1})
    class MtrecScorer:
        def __init__(self, path: str, threads: int) -> None:
            from mtrec.serving import Scorer

            self.scorer = Scorer(path, threads=threads)

        async def __call__(self, request: Request) -> Any:
            from mtrec.data.errors import DataError

            if request.method == "GET":
                return self.scorer.signature
            try:
                body = await request.json()
            except ValueError as exc:
                return JSONResponse({"error": f"request body is not JSON: {exc}"}, 400)
            try:
                probs = self.scorer(rows_of(body))
            except DataError as exc:
                return JSONResponse({"error": str(exc)}, 400)
            return {
                "tasks": self.scorer.tasks,
                "probabilities": probs.tolist(),
                "config_hash": self.scorer.signature.get("config_hash"),
            }

    return MtrecScorer.bind(model_path, threads)


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
    args = p.parse_args(argv)

    from mtrec.export.errors import ExportError
    from mtrec.serving import read_signature

    model = str(Path(args.model).resolve())
    try:
        read_signature(model)  # fail before starting Ray
    except ExportError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        # without this Ray binds to the external interface even when given 127.0.0.1
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray.init(
            address="local",  # a fresh instance, never someone else's cluster
            num_cpus=max(1, args.replicas),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    signal.signal(signal.SIGTERM, _stop)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(model, args.replicas, args.threads), name="mtrec", route_prefix=ROUTE)
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
