"""The ``mtrec`` command line.

Every command prints human-readable progress on stderr and, as its LAST
stdout line, one JSON object summarising what it did, so scripts can chain
commands. Errors (:func:`mtrec.errors.user_errors`) print one ``mtrec: error: ...``
line naming the file, key or column and the fix, and exit with status 2.
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


def _experiment(args: argparse.Namespace) -> Any:
    """The ExperimentConfig of ``--config`` / ``--set``, with its OpenMP wait policy put in
    the environment before the config's blocks (and so torch) are imported: libgomp reads
    it once, when it loads; an embedded Ray's workers inherit it. A bad value is left to
    the config's own check."""
    from mtrec.config import TrainingConfig, parse_config
    from mtrec.config.loading import load_raw_config
    from mtrec.threads import WAIT_POLICIES, set_wait_policy

    raw = load_raw_config(args.config, overrides=args.set)
    training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
    policy = training.get("omp_wait_policy", TrainingConfig.omp_wait_policy)
    if policy in WAIT_POLICIES:
        set_wait_policy(policy)
    return parse_config(raw, source=str(args.config))


def _cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.cluster import cluster_address

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be >= 1")
    cfg = _experiment(args)
    address = cluster_address(args.address)
    if args.workers is None and address is None:
        from mtrec.train.loop import train

        return train(cfg, args.out, resume=args.resume)
    from mtrec.train.ray_trainer import train_distributed

    return train_distributed(
        cfg, args.out, workers=args.workers or 1, address=address, resume=args.resume
    )


def _cmd_baseline(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.train.baseline import train_floor

    return train_floor(_experiment(args), args.out, resume=args.resume)


def _experiment_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """--config, --set, --out, --resume: how every training command names its run."""
    p.add_argument("--config", required=True)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.epochs=3 (repeatable)",
    )
    p.add_argument("--out", help=f"run directory (default {default_out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")


def _cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.evaluate.report import evaluate_run

    for flag, value, low in (("--bootstrap", args.bootstrap, 0), ("--seed", args.seed, 0)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be >= {low}")
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be >= 1")
    if args.diag_rows < 0:
        raise UsageError(f"--diag-rows {args.diag_rows}: must be >= 0")
    return evaluate_run(
        args.run,
        split=args.split,
        data=args.data,
        out=args.out,
        bootstrap_resamples=args.bootstrap,
        seed=args.seed,
        bootstrap_method=args.bootstrap_method,
        workers=args.workers,
        address=args.address,
        plots=not args.no_plots,
        diag_rows=args.diag_rows,
        floor=args.floor,
    )


def _cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.export.exporter import export_run

    if args.parity_rows <= 0:
        raise UsageError(f"--parity-rows {args.parity_rows}: must be > 0")
    return export_run(args.run, out=args.out, parity_rows=args.parity_rows)


def _cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.export.predictor import predict_file

    for flag, value in (("--batch-size", args.batch_size), ("--chunk-rows", args.chunk_rows)):
        if value <= 0:
            raise UsageError(f"{flag} {value}: must be > 0")
    return predict_file(
        args.model, args.input, out=args.out, batch_size=args.batch_size, chunk_rows=args.chunk_rows
    )


def _cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    from mtrec.evaluate.compare import compare_runs

    return compare_runs(args.runs, split=args.split, out=args.out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtrec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("synth", help="write planted multi-task data and its config.yaml")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--rows", type=int, default=200_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", choices=["default", "criteo-like", "cold-start"], default="default")
    s.add_argument("--vocab-scale", type=float, default=1.0)
    s.add_argument(
        "--tasks", type=int, default=None, help="number of tasks (preset default: 4 or 2)"
    )
    s.set_defaults(fn=_cmd_synth)

    t = sub.add_parser("train", help="train a model from a YAML experiment")
    _experiment_args(t, "runs/NAME-TIMESTAMP")
    t.add_argument(
        "--workers",
        type=int,
        default=None,
        help="train with N Ray Train workers (torchrec-sharded embeddings); without it, "
        "--address and $RAY_ADDRESS training runs in this process",
    )
    t.add_argument(
        "--address",
        help="Ray cluster to train on, HOST:PORT (default $RAY_ADDRESS, else an embedded "
        "local instance on 127.0.0.1 when --workers is given)",
    )
    t.set_defaults(fn=_cmd_train)

    b = sub.add_parser(
        "baseline",
        help="train the logistic-regression floor of a YAML experiment (same pipeline, "
        "linear term only)",
    )
    _experiment_args(b, "runs/NAME-floor-TIMESTAMP")
    b.set_defaults(fn=_cmd_baseline)

    e = sub.add_parser("evaluate", help="evaluate a run's best model on a split")
    e.add_argument("--run", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--data", help="evaluate this file instead of the configured split")
    e.add_argument("--out", help="report directory (default RUN/eval)")
    e.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        metavar="N",
        help="bootstrap resamples for the 95%% intervals of AUC and logloss (0: none)",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    e.add_argument(
        "--bootstrap-method",
        choices=["poisson", "multinomial"],
        default="poisson",
        help="Poisson(1) row weights (default; 2x faster at millions of rows) or n rows "
        "drawn with replacement",
    )
    e.add_argument(
        "--workers",
        type=int,
        default=1,
        help="score disjoint row ranges in N parallel Ray tasks (same metrics as 1)",
    )
    e.add_argument(
        "--address",
        help="Ray cluster to run --workers on (default $RAY_ADDRESS, else an embedded "
        "local instance on 127.0.0.1)",
    )
    e.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    e.add_argument(
        "--floor",
        metavar="RUN",
        help="a `mtrec baseline` run: its AUC / logloss go beside the model's in the report, "
        "which says when the model is below its floor (evaluated on the same data if it "
        "has no report yet)",
    )
    e.add_argument(
        "--diag-rows",
        type=int,
        default=8192,
        metavar="N",
        help="rows averaged for the attention / expert-gate heatmaps",
    )
    e.set_defaults(fn=_cmd_evaluate)

    x = sub.add_parser("export", help="export a run's best model to TorchScript")
    x.add_argument("--run", required=True)
    x.add_argument("--out", help="model file (default RUN/export/model.pt)")
    x.add_argument(
        "--parity-rows",
        type=int,
        default=512,
        help="held-out rows scored eager vs scripted before writing (default 512)",
    )
    x.set_defaults(fn=_cmd_export)

    r = sub.add_parser(
        "predict", help="score a file with an exported model (streaming, atomic output)"
    )
    r.add_argument("--model", required=True, help="an exported model.pt")
    r.add_argument("--input", required=True, help="parquet / CSV file, directory or glob")
    r.add_argument("--out", help="output .parquet or .csv (default INPUT_STEM.predictions.parquet)")
    r.add_argument("--batch-size", type=int, default=8192)
    r.add_argument(
        "--chunk-rows",
        type=int,
        default=131072,
        help="rows read, scored and written at a time (bounds memory)",
    )
    r.set_defaults(fn=_cmd_predict)

    c = sub.add_parser("compare", help="side-by-side table of runs")
    c.add_argument("runs", nargs="+")
    c.add_argument("--split", default="test")
    c.add_argument("--out", metavar="FILE", help="also write the tables as Markdown here")
    c.set_defaults(fn=_cmd_compare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from mtrec.errors import user_errors

    # the libraries' Python warnings are not actionable for a user: silenced for this
    # command only (the filters are restored when main returns, e.g. in a test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            summary = args.fn(args)
        except (*user_errors(), UsageError) as exc:  # FloatingPointError: diverged training
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
