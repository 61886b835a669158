"""The run directory: its layout, config hash, lock, checkpoints and the trained model.

``mtrec train`` writes a run; ``mtrec evaluate``, ``export`` and ``compare`` read it.
This module is what they share, so ``mtrec.train``, ``mtrec.evaluate`` and
``mtrec.export`` sit beside each other on top of it and never import one another.

Layout of ``RUN/``::

    config.yaml            the resolved experiment (run-length keys updated on --resume)
    feature_stats.json     numeric statistics fitted on the training split
    feature_vocab.pt       kept ids, seen ids and id dropout of filtered features (if any)
    metrics.jsonl          one line per completed epoch
    checkpoints/last.pt    everything --resume needs (model, optimizers, loop state)
    checkpoints/best.pt    the model of the best validation epoch (evaluate, export)
    run.lock               while a training runs: its holder (pid, host, command, start)

A run is *complete enough to resume* once ``last.pt`` exists (after epoch 1); before
that, ``config.yaml`` and ``feature_stats.json`` mark a *partial* run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shlex
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from mtrec.checkpoint import best_path, last_path, load_checkpoint
from mtrec.config import (
    ExperimentConfig,
    config_to_dict,
    diff_configs,
    load_config,
    parse_config,
)
from mtrec.config.schema import CHANGED_DEFAULTS, DEFAULT_CHANGES
from mtrec.data.seen_ids import SEEN_IDS_FILE, fit_seen_ids, save_seen_ids
from mtrec.data.spec import FeatureSpec
from mtrec.data.unknown_ids import fit_unknown_ids
from mtrec.data.vocab import load_vocab, save_vocab
from mtrec.errors import CheckpointError, RunError, RunLockedError
from mtrec.io import atomic_write_text
from mtrec.model import MultiTaskModel, build_model

__all__ = [
    "CHANGED_DEFAULTS",
    "CONFIG_FILE",
    "LOCK_FILE",
    "METRICS_FILE",
    "RUN_LENGTH_KEYS",
    "STATS_FILE",
    "VOCAB_FILE",
    "RunError",
    "RunLock",
    "check_run_dir",
    "config_hash",
    "config_hashes",
    "diff_configs",
    "load_run_config",
    "load_trained_model",
    "remove_unfinished_run",
    "run_config_hash",
    "run_config_hashes",
    "trim_metrics",
    "write_run_files",
]

CONFIG_FILE = "config.yaml"
STATS_FILE = "feature_stats.json"
VOCAB_FILE = "feature_vocab.pt"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "run.lock"

# keys that may change when a run is resumed (how long / how it runs, not what it learns)
RUN_LENGTH_KEYS = (
    "epochs",
    "early_stopping_patience",
    "threads",
    "omp_wait_policy",
    "eval_batch_size",
    "progress",
    "log_every_steps",
)
# of those, the ones config.yaml is updated with on --resume
_RECORDED_RUN_LENGTH_KEYS = ("epochs", "early_stopping_patience", "threads", "eval_batch_size")


# ---------------------------------------------------------------------- config hash


def _hash_view(raw: dict[str, Any]) -> dict[str, Any]:
    """What the hash reads of a config dict: everything but the run-length keys, with a
    ``training`` section even when empty."""
    raw["training"] = {k: v for k, v in raw.get("training", {}).items() if k not in RUN_LENGTH_KEYS}
    return raw


def _hashed_dict(cfg: ExperimentConfig, drop_defaults: bool) -> dict[str, Any]:
    return _hash_view(config_to_dict(cfg, drop_defaults=drop_defaults))


def _digest(raw: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: ExperimentConfig | dict[str, Any]) -> str:
    """Hash of a resolved config, ignoring keys that do not change the result.

    Only keys that differ from their schema defaults count, so a later mtrec that adds
    config keys (with defaults) still matches, resumes and pools older runs. A dict (a
    run's stored ``config.yaml``) is validated first.
    """
    if not isinstance(cfg, ExperimentConfig):
        cfg = parse_config(dict(cfg), source=CONFIG_FILE)
    return _digest(_hashed_dict(cfg, drop_defaults=True))


def run_config_hash(run_dir: str | Path) -> str:
    """Hash of the config stored in ``run_dir/config.yaml``, as written at training time."""
    return config_hash(_stored_config(run_dir))


_MISSING = object()  # a key absent from a stored config


def _set_path(d: dict[str, Any], path: list[str], value: Any, present: bool) -> None:
    """Set (``present``) or remove ``d[path]``, creating / pruning empty sections."""
    head, *rest = path
    if not rest:
        if present:
            d[head] = value
        else:
            d.pop(head, None)
        return
    child = d.setdefault(head, {})
    _set_path(child, rest, value, present)
    if not child:
        del d[head]


def config_hashes(cfg: ExperimentConfig | dict[str, Any]) -> set[str]:
    """Every hash a run of ``cfg`` may carry: :func:`config_hash`, and for each change set
    of :data:`DEFAULT_CHANGES` the hash an mtrec from just before it wrote for the same
    config (that change set and every later one at their old defaults)."""
    if not isinstance(cfg, ExperimentConfig):
        cfg = parse_config(dict(cfg), source=CONFIG_FILE)
    hashes = {config_hash(cfg)}
    for first in range(len(DEFAULT_CHANGES)):
        raw = config_to_dict(cfg, drop_defaults=True)
        for changes in DEFAULT_CHANGES[first:]:
            for key, old in changes.items():
                value: Any = cfg
                for part in key.split("."):
                    value = getattr(value, part)
                # before the change a key was left out exactly when it held the old default
                _set_path(raw, key.split("."), value, present=value != old)
        hashes.add(_digest(_hash_view(raw)))
    return hashes


def run_config_hashes(run_dir: str | Path) -> set[str]:
    """:func:`config_hashes` of ``run_dir/config.yaml``."""
    return config_hashes(_stored_config(run_dir))


def _changed_keys(stored_file: Path, cfg: ExperimentConfig) -> list[str] | None:
    """Keys (dotted) that differ between a run's stored config and ``cfg``, run-length
    keys aside; None when the stored config cannot be read."""
    try:
        stored = load_run_config(stored_file.parent)
    except Exception:  # any unreadable config: report the hashes only
        return None
    return sorted(diff_configs(_hashed_dict(stored, False), _hashed_dict(cfg, False)))


def _config_mismatch(out: Path, cfg: ExperimentConfig, stored_hash: str | None) -> RunError:
    keys = _changed_keys(out / CONFIG_FILE, cfg)
    what = f" ({stored_hash} != {config_hash(cfg)})"
    if keys:
        what += "; changed: " + ", ".join(keys)
    return RunError(
        f"{out}: the run was trained with a different config{what}. Resume with the run's "
        f"own config ({out / CONFIG_FILE}, run-length keys such as training.epochs may "
        "change), or train the new config into another --out (nothing was changed)"
    )


# --------------------------------------------------------------------- reading a run


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise RunError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    predates = _keys_the_run_predates(yaml.safe_load(path.read_text()))
    return load_config(path, [f"{k}={json.dumps(v)}" for k, v in predates.items()])


def _keys_the_run_predates(stored: Any) -> dict[str, Any]:
    """The :data:`CHANGED_DEFAULTS` keys a stored ``config.yaml`` lacks, at their old
    default: the file holds every key of the mtrec that wrote it, so a missing key did
    not exist then and the run was trained with what is now its old default."""
    out = {}
    for key, old in CHANGED_DEFAULTS.items():
        node = stored
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING:
            out[key] = old
    return out


def _stored_config(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as a dict, the keys it predates at their old default."""
    stored = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text())
    for key, old in _keys_the_run_predates(stored).items():
        _set_path(stored, key.split("."), old, present=True)
    return stored


def load_trained_model(run_dir: str | Path) -> tuple[ExperimentConfig, FeatureSpec, MultiTaskModel]:
    """The best model of a run (plain, unfused modules) in eval mode."""
    cfg = load_run_config(run_dir)
    spec = FeatureSpec.from_config(cfg)
    spec.load_stats(Path(run_dir) / STATS_FILE)
    load_vocab(Path(run_dir) / VOCAB_FILE, spec)
    state = load_checkpoint(best_path(run_dir))
    if state.get("config_hash") not in run_config_hashes(run_dir):
        raise CheckpointError(
            f"{best_path(run_dir)}: checkpoint does not match {run_dir}/{CONFIG_FILE} "
            "(config hash differs); the run directory was modified"
        )
    model = build_model(cfg, spec)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{best_path(run_dir)}: weights do not fit the model of {CONFIG_FILE}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    model.trained_epoch = int(state.get("epoch", -1))
    model.eval()
    return cfg, spec, model


# ------------------------------------------------------------------------------ lock


class RunLock:
    """An exclusive lock on a run directory for a training's lifetime.

    ``fcntl.flock`` on ``RUN/run.lock``: the OS releases it when the holder exits in any
    way (SIGKILL included), so a lock is never stale. The holder writes its pid, host,
    command and start time into the file; a second command fails at once
    (:class:`RunLockedError`) naming it. The directory is created when missing and, when
    this lock created it and it is empty at release, removed again.

    Example::

        with RunLock("runs/a"):
            ...  # no other mtrec train can use runs/a here
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockedError(
                    f"{self.run_dir}: in use by another mtrec command ({_describe(holder)}); "
                    "wait for it to finish, stop it, or choose another --out "
                    "(nothing was changed)"
                ) from None
            # the previous holder unlinks the file on release: a file opened just before
            # that is no longer the lock file, so take the new one instead
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = -1
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        self._fd = fd
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": shlex.join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        # unlink while still holding it (see acquire), then let go
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        return (
            f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
            if isinstance(h, dict)
            else holder.strip()
        )
    except (ValueError, KeyError):
        return holder.strip() or "holder unknown"


# ------------------------------------------------------------- preparing a training


def _is_partial_run(out: Path) -> bool:
    """A run that completed no epoch: its files are written, ``last.pt`` is not."""
    return (
        (out / CONFIG_FILE).is_file()
        and (out / STATS_FILE).is_file()
        and not last_path(out).exists()
    )


def check_run_dir(cfg: ExperimentConfig, out: Path, resume: bool) -> dict[str, Any] | None:
    """Check (reading only) that ``out`` can take this training; returns the checkpoint
    to resume from (None: start at epoch 1). Raises :class:`RunError` saying why not and
    what to do; nothing is changed either way.

    Without ``resume``: ``out`` is missing or empty (the lock file aside). With it: ``out``
    holds an mtrec run of the same config that ran at most ``training.epochs`` epochs,
    or a partial run (restarted from epoch 1).
    """
    last = last_path(out)
    if resume:
        if not out.is_dir():
            raise RunError(
                f"{out}: no such run directory to --resume; check --out, or drop --resume "
                "to start a new run there"
            )
        if not last.exists():
            if _is_partial_run(out):
                stored = _stored_hash(out)
                if stored is not None and stored != config_hash(cfg):
                    raise _config_mismatch(out, cfg, stored)
                return None
            raise RunError(
                f"{out}: holds no mtrec run to --resume (no {CONFIG_FILE}, {STATS_FILE} and "
                f"{last.relative_to(out)}); drop --resume and choose an empty or new --out "
                "(nothing was changed)"
            )
        state = load_checkpoint(last)
        if state.get("config_hash") not in config_hashes(cfg):
            raise _config_mismatch(out, cfg, state.get("config_hash"))
        done = int(state.get("loop", {}).get("epoch", 0))
        if done > cfg.training.epochs:
            raise RunError(
                f"{out}: the run already trained {done} epochs, more than training.epochs="
                f"{cfg.training.epochs}; resume with --set training.epochs={done} or more "
                "(nothing was changed)"
            )
        return state
    if last.exists():
        raise RunError(
            f"{out}: already holds a training run; pass --resume to continue it or choose "
            "another --out (nothing was changed)"
        )
    if _is_partial_run(out):
        raise RunError(
            f"{out}: holds a training run that completed no epoch (it was stopped during "
            "epoch 1); pass --resume to start it over, or choose another --out "
            "(nothing was changed)"
        )
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise RunError(f"{out}: directory exists and is not empty; choose another --out")
    return None


def _stored_hash(out: Path) -> str | None:
    try:
        return run_config_hash(out)
    except Exception:  # an unreadable config.yaml is rewritten by the restart
        return None


def trim_metrics(path: Path, epochs: int) -> None:
    """Keep the metrics.jsonl lines of the first ``epochs`` epochs (those last.pt holds)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= epochs]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _update_run_length(cfg: ExperimentConfig, out: Path) -> None:
    """On resume, record changed run-length keys (e.g. more epochs) in config.yaml."""
    stored = yaml.safe_load((out / CONFIG_FILE).read_text())
    new = config_to_dict(cfg)
    keys = _RECORDED_RUN_LENGTH_KEYS
    if any(stored.get("training", {}).get(k) != new["training"][k] for k in keys):
        stored.setdefault("training", {}).update({k: new["training"][k] for k in keys})
        atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(stored, sort_keys=False))


def write_run_files(
    cfg: ExperimentConfig, spec: FeatureSpec, out: Path, resume_state: dict[str, Any] | None
) -> None:
    """A new run: write config.yaml, the fitted statistics and kept ids (config.yaml
    last: with the statistics it marks the run). A resumed run: load them into ``spec``
    and record changed run-length keys."""
    stats_file = out / STATS_FILE
    if resume_state is not None:
        spec.load_stats(stats_file)
        load_vocab(out / VOCAB_FILE, spec)
        _update_run_length(cfg, out)
    else:  # fitted before the run directory was touched
        spec.save_stats(stats_file)
        # the ids training saw, for the cold / warm slices of evaluation
        sliced = fit_seen_ids(spec, cfg.dataset.train)
        # id_dropout: auto and the undertrained-unknown-row warning (issue #16)
        deep = [f.name for f in spec.sparse if f.deep] if cfg.model.deep else []
        fit_unknown_ids(spec, cfg.dataset.valid, cfg.dataset.chunk_rows, sliced, deep)
        if spec.kept_ids:
            save_vocab(spec, out / VOCAB_FILE)
        save_seen_ids(sliced, out / SEEN_IDS_FILE)
        atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def remove_unfinished_run(out: Path) -> None:
    """Remove the files a training wrote into ``out`` before it completed an epoch (the
    lock file stays with its holder)."""
    for name in (CONFIG_FILE, STATS_FILE, VOCAB_FILE, SEEN_IDS_FILE, METRICS_FILE):
        (out / name).unlink(missing_ok=True)
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
