"""The ``mtrec`` command line.

Every command prints human-readable progress on stderr and, as its LAST
stdout line, one JSON object summarising what it did, so scripts can chain
commands. Errors print one ``mtrec: error: ...`` line naming the file, key or
column and the fix, and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


class UsageError(ValueError):
    """A command-line argument that cannot work; the message says which and why."""


def _emit(summary: dict[str, Any]) -> None:
    from mtrec.io import to_json

    print(to_json(summary), flush=True)


def _cmd_synth(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.data.synthetic import synthesize

    try:
        return synthesize(
            args.out,
            rows=args.rows,
            seed=args.seed,
            preset=args.preset,
            vocab_scale=args.vocab_scale,
            num_tasks=args.tasks,
            progress=True,
        )
    except ValueError as exc:  # the generator's argument checks
        raise UsageError(f"data synth: {exc}") from None


def _cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.config import load_config
    from mtrec.train.loop import train

    if args.workers != 1:
        raise UsageError(
            f"--workers {args.workers}: distributed training under Ray Train is not part of "
            "this release yet; use --workers 1"
        )
    cfg = load_config(args.config, overrides=args.set)
    return train(cfg, args.out, resume=args.resume)


def _cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.evaluate.report import evaluate_run

    return evaluate_run(args.run, split=args.split, data=args.data, out=args.out)


def _cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.export.exporter import export_run

    return export_run(args.run, out=args.out)


def _cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.export.predictor import predict_file

    if args.batch_size <= 0:
        raise UsageError(f"--batch-size {args.batch_size}: must be > 0")
    return predict_file(args.model, args.input, out=args.out, batch_size=args.batch_size)


def _cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.evaluate.compare import compare_runs

    return compare_runs(args.runs, split=args.split)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtrec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("synth", help="write planted multi-task data and its config.yaml")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--rows", type=int, default=200_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", choices=["default", "criteo-like"], default="default")
    s.add_argument("--vocab-scale", type=float, default=1.0)
    s.add_argument(
        "--tasks", type=int, default=None, help="number of tasks (preset default: 4 or 2)"
    )
    s.set_defaults(fn=_cmd_synth)

    t = sub.add_parser("train", help="train a model from a YAML experiment")
    t.add_argument("--config", required=True)
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.epochs=3 (repeatable)",
    )
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--out", help="run directory (default runs/NAME-TIMESTAMP)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a run's best model on a split")
    e.add_argument("--run", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--data", help="evaluate this file instead of the configured split")
    e.add_argument("--out", help="report directory (default RUN/eval)")
    e.set_defaults(fn=_cmd_evaluate)

    x = sub.add_parser("export", help="export a run's best model to TorchScript")
    x.add_argument("--run", required=True)
    x.add_argument("--out", help="model file (default RUN/export/model.pt)")
    x.set_defaults(fn=_cmd_export)

    r = sub.add_parser("predict", help="score a file with an exported model")
    r.add_argument("--model", required=True)
    r.add_argument("--input", required=True)
    r.add_argument("--out")
    r.add_argument("--batch-size", type=int, default=8192)
    r.set_defaults(fn=_cmd_predict)

    c = sub.add_parser("compare", help="side-by-side table of runs")
    c.add_argument("runs", nargs="+")
    c.add_argument("--split", default="test")
    c.set_defaults(fn=_cmd_compare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from mtrec.config import ConfigError
    from mtrec.data.errors import DataError
    from mtrec.export.exporter import ExportError
    from mtrec.train.checkpoint import CheckpointError
    from mtrec.train.loop import RunError

    try:
        summary = args.fn(args)
    except (ConfigError, DataError, RunError, CheckpointError, ExportError, UsageError) as exc:
        print(f"mtrec: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # diverged training
        print(f"mtrec: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. writing next to an input in a read-only folder
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mtrec: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    _emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
