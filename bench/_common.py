"""Shared pieces of the benchmarks in ``bench/``: output, data cache, memory, training timing.

Every benchmark prints one JSON object per line to stdout (each with a ``"bench"``
key and the 1/5/15-minute ``"loadavg"`` of the machine at the time) and its
progress to stderr. Nothing here is asserted by tests.

Pieces:

* On import: the OpenMP wait policy ``mtrec train`` uses (``training.omp_wait_policy``,
  or ``$MTREC_BENCH_OMP_WAIT_POLICY``), so import this before torch.
* :func:`emit` / :func:`log` — the JSON line and progress messages.
* :func:`ensure_synthetic` — planted data under the cache directory
  (``bench/.cache/`` by default, git-ignored), regenerated only when missing or
  made with other arguments.
* :func:`peak_rss_mb`, :func:`run_child`, :func:`stream_split` — peak resident
  memory of the streaming batcher, measured in a fresh process.
* :class:`Trainer` and the ``time_*`` functions — one training step exactly as
  ``mtrec.train.loop.train`` does it (fused sparse optimizer, Adam, weighted BCE),
  timed over pre-built batches, over full epochs, or phase by phase.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# the OpenMP wait policy of every bench, as `mtrec train` sets it (training.omp_wait_policy,
# default auto: libgomp's own); applied here, before the bench scripts import torch
POLICY_ENV = "MTREC_BENCH_OMP_WAIT_POLICY"
DEFAULT_CACHE = REPO / "bench" / ".cache"
SPLIT_FILES = ("train.parquet", "valid.parquet", "test.parquet", "config.yaml")
_META = "bench-meta.json"


def _apply_wait_policy() -> None:
    from mtrec.config import TrainingConfig
    from mtrec.threads import set_wait_policy

    set_wait_policy(os.environ.get(POLICY_ENV, TrainingConfig.omp_wait_policy))


_apply_wait_policy()


# ----------------------------------------------------------------------------- output


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (the machine is shared: read figures against it)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def paired_speedup(one: list[float], two: list[float]) -> dict[str, Any]:
    """Alternating rounds of a 1- and a 2-way run (rates in the order they ran): the ratio
    of the medians, each round's ratio, and the two medians."""
    median_one, median_two = statistics.median(one), statistics.median(two)
    return {
        "speedup": round(median_two / median_one, 3),
        "round_speedups": [round(b / a, 3) for a, b in zip(one, two, strict=True)],
        "median_1": round(median_one, 1),
        "median_2": round(median_two, 1),
    }


def emit(bench: str, **fields: Any) -> dict[str, Any]:
    """Print one JSON line ``{"bench": bench, **fields, "loadavg": [...], "cpus": n}``."""
    record = {"bench": bench, **fields, "loadavg": loadavg(), "cpus": os.cpu_count()}
    print(json.dumps(record), flush=True)
    return record


def warn_if_contended(threads: int) -> None:
    """Say on stderr when other work competes for the cores.

    With more runnable processes than cores, an OpenMP parallel region of ``threads``
    > 1 waits for its slowest (descheduled) thread at every op: small ops then take a
    scheduler slice (~ms) each and a 2-thread step can be several times slower than a
    1-thread one. Compare with ``--threads 1`` before reading much into such figures.
    """
    load = loadavg()
    cpus = os.cpu_count() or 1
    if load and load[0] > cpus - 0.5 and threads > 1:
        log(
            f"WARNING: load average {load[0]} on {cpus} cores: other processes compete; "
            f"{threads}-thread figures will be dominated by OpenMP waits (try --threads 1)"
        )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("MTREC_BENCH_CACHE", DEFAULT_CACHE)),
        help="where generated data is kept and reused (default bench/.cache, git-ignored)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")


# ------------------------------------------------------------------------- data cache


def ensure_synthetic(
    cache_dir: Path,
    rows: int,
    preset: str = "default",
    vocab_scale: float = 1.0,
    seed: int = 0,
) -> Path:
    """Directory with planted data of exactly these arguments, generated if needed.

    A ``bench-meta.json`` beside the splits records the arguments; a directory whose
    record differs (or that lacks a file) is regenerated in place.
    """
    from mtrec.data.synthetic import synthesize

    name = f"{preset}-{rows}" + (f"-vocab{vocab_scale:g}" if vocab_scale != 1.0 else "")
    out = Path(cache_dir) / name
    import hashlib

    import mtrec.data.synthetic as generator

    # the generator's source is part of the key: a changed teacher means new data
    code = hashlib.sha256(Path(generator.__file__).read_bytes()).hexdigest()[:12]
    want = {"rows": rows, "preset": preset, "vocab_scale": vocab_scale, "seed": seed, "code": code}
    meta = out / _META
    if meta.exists() and all((out / f).exists() for f in SPLIT_FILES):
        try:
            if json.loads(meta.read_text()) == want:
                log(f"reusing {out}")
                return out
        except json.JSONDecodeError:
            pass
    log(f"generating {rows:,} rows ({preset}, vocab_scale={vocab_scale:g}) into {out}")
    meta.unlink(missing_ok=True)
    summary = synthesize(out, rows=rows, seed=seed, preset=preset, vocab_scale=vocab_scale)  # type: ignore[arg-type]
    meta.write_text(json.dumps(want) + "\n")
    log(f"generated in {summary['wall_s']:.1f}s")
    return out


def load_experiment(config: str | Path, overrides: list[str] | None = None, fit: bool = True):
    """``(cfg, spec)`` of a YAML experiment; ``fit`` fits the numeric statistics on train."""
    from mtrec.config import load_config
    from mtrec.data.spec import FeatureSpec

    cfg = load_config(config, overrides=overrides)
    spec = FeatureSpec.from_config(cfg)
    if fit:
        from mtrec.data.fitting import fit_statistics_on_file

        fit_statistics_on_file(spec, cfg.dataset.train, cfg.dataset.chunk_rows)
    return cfg, spec


# ----------------------------------------------------------------------------- memory


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB.

    ``VmHWM`` (per address space, so it starts fresh at ``exec``); ``ru_maxrss`` is the
    fallback, but on Linux it can carry the parent's peak over a ``vfork``+``exec``.
    """
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Current resident set of this process in MiB (0 where /proc is missing)."""
    return _proc_status_mb("VmRSS") or 0.0


def run_child(argv: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process; its last stdout line is a JSON object."""
    cmd = [sys.executable, *argv]
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {' '.join(cmd)} failed with exit code {proc.returncode}")
    return json.loads(lines[-1])


def stream_split(config: str | Path, split: str = "train", threads: int = 2) -> dict[str, Any]:
    """Stream one split through the batcher (shuffled, no in-memory cache) and time it.

    Every batch is fully built (KJT included) and dropped. Returns rows, seconds,
    rows/s, the peak RSS of this process and its RSS before streaming (after imports).
    Meant to run in a fresh process (see :func:`run_child`).
    """
    import torch

    from mtrec.data.batcher import iter_batches

    torch.set_num_threads(threads)
    cfg, spec = load_experiment(config, fit=False)
    path = getattr(cfg.dataset, split)
    baseline = rss_mb()
    rows = batches = 0
    t0 = time.perf_counter()
    for batch in iter_batches(
        path,
        spec,
        cfg.training.batch_size,
        shuffle=True,
        seed=cfg.seed,
        chunk_rows=cfg.dataset.chunk_rows,
    ):
        rows += batch.batch_size
        batches += 1
    seconds = time.perf_counter() - t0
    return {
        "rows": rows,
        "batches": batches,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "baseline_rss_mb": round(baseline, 1),
        "batch_size": cfg.training.batch_size,
        "chunk_rows": cfg.dataset.chunk_rows,
    }


# --------------------------------------------------------------------------- training


class Trainer:
    """``mtrec.train.step.TrainStep`` (exactly what ``mtrec train`` runs) at ``threads``."""

    def __init__(self, cfg: Any, spec: Any, threads: int = 2, seed: int | None = None) -> None:
        import dataclasses

        import torch

        from mtrec.train.step import TrainStep

        torch.set_num_threads(threads)
        if seed is not None:
            cfg = dataclasses.replace(cfg, seed=seed)
        self.cfg, self.spec = cfg, spec
        self._step = TrainStep(cfg, spec)
        # the pieces, for the per-phase timing
        self.model, self.loss_fn, self.dense_opt = (
            self._step.model,
            self._step.loss_fn,
            self._step.dense_opt,
        )

    def step(self, batch: Any) -> Any:
        """One training step; returns the (unread) loss tensor."""
        return self._step.step(batch)

    def reset_embeddings(self, epoch: int) -> None:
        """MEDA's reset before ``epoch`` (``training.reset_embeddings_each_epoch``)."""
        self._step.reset_embeddings(epoch)

    def trial_gradients(self, batch: Any) -> Any:
        """One batch's gradients without training (what ``threads: adaptive`` compares)."""
        return self._step.trial_gradients(batch)

    def embedding_rows(self) -> int:
        return self._step.embedding_rows()

    def batches(self, source: Any, batch_size: int | None = None, seed: int = 0) -> Iterator[Any]:
        """Shuffled batches of an in-memory encoded split (as the loop builds them)."""
        from mtrec.data.batcher import iter_batches

        return iter_batches(
            source,
            self.spec,
            batch_size or self.cfg.training.batch_size,
            shuffle=True,
            seed=seed,
            chunk_rows=self.cfg.dataset.chunk_rows,
        )


def load_train_split(cfg: Any, spec: Any) -> Any:
    """The training split encoded in memory (``training.cache_in_memory``)."""
    from mtrec.data.batcher import load_encoded

    t0 = time.perf_counter()
    enc = load_encoded(spec, cfg.dataset.train, cfg.dataset.chunk_rows)
    log(f"encoded {enc.rows:,} train rows in {time.perf_counter() - t0:.1f}s")
    return enc


def time_steps(trainer: Trainer, batches: list[Any], warmup: int = 5, steps: int = 50) -> dict:
    """Samples/s over ``steps`` steps cycling through pre-built ``batches`` (no batch build)."""
    for batch in itertools.islice(itertools.cycle(batches), warmup):
        trainer.step(batch)
    samples = 0
    t0 = time.perf_counter()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        loss = trainer.step(batch)
        samples += batch.batch_size
    float(loss.detach())
    seconds = time.perf_counter() - t0
    return {
        "samples_per_s": round(samples / seconds, 1),
        "step_ms": round(1000 * seconds / steps, 2),
        "steps": steps,
    }


def time_epochs(
    trainer: Trainer,
    source: Any,
    epochs: int = 1,
    warmup_epochs: int = 0,
    warmup_steps: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict:
    """Samples/s over full epochs of the loop: shuffled batch build + training step.

    ``warmup_epochs`` full epochs and then ``warmup_steps`` steps run untimed first.
    """
    import torch

    for e in range(warmup_epochs):
        t0 = time.perf_counter()
        for batch in trainer.batches(source, batch_size, seed=seed + e):
            trainer.step(batch)
        log(f"warm-up epoch {e + 1}/{warmup_epochs}: {time.perf_counter() - t0:.2f}s")
    if warmup_steps:
        it = trainer.batches(source, batch_size, seed=seed + 999_999)
        for batch in itertools.islice(it, warmup_steps):
            trainer.step(batch)
    epoch_s: list[float] = []
    samples = steps = 0
    for e in range(epochs):
        torch.manual_seed(seed + 1000 + e)
        t0 = time.perf_counter()
        loss = None
        for batch in trainer.batches(source, batch_size, seed=seed + warmup_epochs + e):
            loss = trainer.step(batch)
            samples += batch.batch_size
            steps += 1
        if loss is not None:
            float(loss.detach())
        epoch_s.append(time.perf_counter() - t0)
        log(
            f"epoch {e + 1}/{epochs}: {epoch_s[-1]:.2f}s "
            f"({source.rows / epoch_s[-1]:,.0f} samples/s, load {loadavg()})"
        )
    total = sum(epoch_s)
    return {
        "samples_per_s": round(samples / total, 1),
        "epoch_s": round(total / epochs, 3),
        "epoch_s_each": [round(s, 3) for s in epoch_s],
        "steps_per_epoch": steps // epochs,
        "rows": source.rows,
    }


def phase_breakdown(trainer: Trainer, source: Any, steps: int = 50, seed: int = 7) -> dict:
    """Mean ms per step of each phase: batch build / forward (+loss) / backward / optimizer.

    The fused embedding update runs inside ``backward``; ``optimizer`` is Adam's
    ``zero_grad`` + ``step`` on the dense parameters.
    """
    clock = time.perf_counter
    totals = dict.fromkeys(("batch", "forward", "backward", "optimizer"), 0.0)
    it = _endless(lambda k: trainer.batches(source, seed=seed + k))
    model, loss_fn, opt = trainer.model, trainer.loss_fn, trainer.dense_opt
    for _ in range(steps):
        t0 = clock()
        batch = next(it)
        t1 = clock()
        logits, aux = model.forward_with_aux(batch.sparse, batch.dense)
        loss = loss_fn(logits, batch.labels, aux)
        t2 = clock()
        opt.zero_grad(set_to_none=True)
        t3 = clock()
        loss.backward()
        t4 = clock()
        opt.step()
        t5 = clock()
        totals["batch"] += t1 - t0
        totals["forward"] += t2 - t1
        totals["backward"] += t4 - t3
        totals["optimizer"] += (t3 - t2) + (t5 - t4)
    out = {k: round(1000 * v / steps, 3) for k, v in totals.items()}
    out["total"] = round(sum(out.values()), 3)
    return out


def _endless(make: Any) -> Iterator[Any]:
    for k in itertools.count():
        yield from make(k)


def profile_steps(trainer: Trainer, batches: Iterable[Any], rows: int = 25) -> str:
    """torch.profiler table (self CPU time, grouped by input shape) of the given steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch in batches:
            trainer.step(batch)
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total",
        row_limit=rows,
        max_name_column_width=40,
        max_shapes_column_width=70,
    )
