"""Training throughput solo and beside one competing 2-thread process, per thread setting.

With more runnable threads than cores, an OpenMP parallel region waits at its barrier
for a thread the kernel has descheduled; how the waiting threads wait (spin, then sleep:
``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``, read once when libgomp starts) decides whether
they also steal the cores that thread needs. This bench measures it.

For each setting (threads x wait policy) and each round (settings interleaved, so drift of
the shared machine's load hits every setting alike) a fresh worker process is started
with the setting's environment (the policy must be in the environment before torch
loads). It builds census MMoE (``configs/census_kdd/mmoe.yaml``; ``--config`` another
experiment) with ``bench/_common.Trainer`` (exactly the loop's training step), warms up,
then times ``--seconds`` of steps over pre-built batches twice: solo, and while a
competitor runs — a second Python doing a 2-thread GEMM loop (libgomp defaults, bounded
in time). One JSON line per setting and round::

    {"bench": "contention", "setting": "t2-passive", "threads": 2, "policy": "passive",
     "solo_samples_per_s": ..., "contended_samples_per_s": ..., "ratio": contended / solo,
     "competitor_gflops": ..., "round": r, "loadavg": [...]}

and a summary line per setting (median over rounds). Target of issue #17: ``ratio`` >= 0.35.

Settings: ``t<threads>-<policy>`` (``training.threads`` fixed) or ``adaptive-<policy>``
(``training.threads: adaptive``: every step is timed into
:class:`~mtrec.train.adaptive_threads.AdaptiveThreads`, as the training loop does).

Usage: ``.venv/bin/python bench/contention.py [--rounds 2] [--seconds 6]
[--settings t1-auto t2-auto t2-short adaptive-auto] [--config C]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

CONFIG = C.REPO / "configs" / "census_kdd" / "mmoe.yaml"
_POLICY_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SETTINGS = ("t1-auto", "t2-auto", "t2-passive", "t2-active", "t2-short", "adaptive-auto")


def parse_setting(name: str) -> tuple[int | str, str]:
    """``t2-passive`` -> (2, "passive"); ``adaptive-auto`` -> ("adaptive", "auto")
    (``training.threads: adaptive``: up to the affinity cores, chosen by timing steps)."""
    head, _, policy = name.partition("-")
    valid_head = head == "adaptive" or (head.startswith("t") and head[1:].isdigit())
    if not valid_head or policy not in ("auto", "passive", "active", "short"):
        raise SystemExit(
            f"--settings {name}: expected t<threads>-<policy> or adaptive-<policy>, "
            "policy one of auto|passive|active|short"
        )
    return (head if head == "adaptive" else int(head[1:])), policy


# ------------------------------------------------------------------ competitor process


def competitor(seconds: float, size: int) -> None:
    """2-thread float32 GEMM loop for at most ``seconds``; prints its GFLOP/s on exit."""
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    print(json.dumps({"ready": True}), flush=True)
    done, t0 = 0, time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            done += 1
    except KeyboardInterrupt:
        pass
    gflops = 2 * size**3 * done / (time.perf_counter() - t0) / 1e9
    print(json.dumps({"gflops": round(gflops, 2)}), flush=True)


class Competitor:
    """The competing process, started and stopped around one timed window."""

    def __init__(self, seconds: float, size: int) -> None:
        env = {
            k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
        }
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--competitor", str(seconds), "--size", str(size)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # torch imported, looping from now on

    def stop(self) -> float:
        self.proc.send_signal(2)  # SIGINT: it prints its rate and exits
        out, _ = self.proc.communicate(timeout=60)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        return float(json.loads(lines[-1])["gflops"]) if lines else 0.0


# ------------------------------------------------------------------ measuring worker


def worker(threads: int | str, seconds: float, warmup: int, config: str) -> None:
    """Build the trainer, then on each stdin line time ``seconds`` of steps; one JSON
    line per measurement on stdout. ``threads="adaptive"`` times every step into
    :class:`~mtrec.train.adaptive_threads.AdaptiveThreads` (as the training loop does),
    one governor for the whole life of the worker: solo, then beside the competitor."""
    import itertools

    import torch

    from mtrec.threads import resolve_threads, wait_policy_in_effect
    from mtrec.train.adaptive_threads import AdaptiveThreads

    cfg, spec = C.load_experiment(config)
    trainer = C.Trainer(cfg, spec, threads=resolve_threads(threads))
    governor = AdaptiveThreads(resolve_threads(threads)) if threads == "adaptive" else None
    enc = C.load_train_split(cfg, spec)
    batches = list(itertools.islice(trainer.batches(enc), 16))
    if governor is not None:  # as the training loop does before its first step
        governor.check_repeatable(lambda: trainer.trial_gradients(batches[0]))

    def step(batch: Any) -> Any:
        if governor is None:
            return trainer.step(batch)
        t = time.perf_counter()
        loss = trainer.step(batch)
        governor.observe(time.perf_counter() - t, batch.batch_size)
        return loss

    for batch in itertools.islice(itertools.cycle(batches), warmup):
        step(batch)
    print(json.dumps({"ready": True, "policy_env": wait_policy_in_effect()}), flush=True)
    for _line in sys.stdin:
        samples, t0 = 0, time.perf_counter()
        for batch in itertools.cycle(batches):
            loss = step(batch)
            samples += batch.batch_size
            if time.perf_counter() - t0 >= seconds:
                break
        float(loss.detach())
        rate = samples / (time.perf_counter() - t0)
        line = {"samples_per_s": round(rate, 1), "threads": torch.get_num_threads()}
        if governor is not None:
            line["adaptive"] = governor.summary()
        print(json.dumps(line))
        sys.stdout.flush()


class Worker:
    def __init__(
        self, threads: int | str, policy: str, seconds: float, warmup: int, config: str
    ) -> None:
        from mtrec.threads import wait_policy_env

        env = {
            k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
        }
        env.update(wait_policy_env(policy))
        env[C.POLICY_ENV] = policy  # what bench/_common applies on import
        env["PYTHONPATH"] = os.pathsep.join([str(C.REPO), env.get("PYTHONPATH", "")])
        argv = ["--worker", str(threads), "--seconds", str(seconds), "--warmup", str(warmup)]
        argv += ["--config", config]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        return json.loads(line)

    def measure(self) -> dict[str, Any]:
        """One timed window: ``samples_per_s``, the thread count at its end and, for
        ``adaptive``, the governor's summary so far."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed window per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps after building")
    ap.add_argument("--size", type=int, default=384, help="competitor's GEMM size")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--config", default=str(CONFIG), help="the experiment to train")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--competitor", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.competitor is not None:
        return competitor(args.competitor, args.size)
    if args.worker is not None:
        threads = args.worker if args.worker == "adaptive" else int(args.worker)
        return worker(threads, args.seconds, args.warmup, args.config)

    settings = [(name, *parse_setting(name)) for name in args.settings]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in settings}
    for r in range(args.rounds):
        for name, threads, policy in settings:
            w = Worker(threads, policy, args.seconds, args.warmup, args.config)
            try:
                solo_line = w.measure()
                comp = Competitor(args.seconds * 4 + 30, args.size)
                contended_line = w.measure()
                gflops = comp.stop()
            finally:
                w.close()
            solo = float(solo_line["samples_per_s"])
            contended = float(contended_line["samples_per_s"])
            extra = {"adaptive": contended_line["adaptive"]} if "adaptive" in contended_line else {}
            rec = C.emit(
                "contention",
                setting=name,
                config=Path(args.config).name,
                threads=threads,
                policy=policy,
                policy_env=w.ready["policy_env"],
                solo_samples_per_s=solo,
                contended_samples_per_s=contended,
                ratio=round(contended / solo, 3),
                competitor_gflops=gflops,
                round=r,
                **extra,
            )
            results[name].append(rec)
    for name, threads, policy in settings:
        recs = results[name]
        C.emit(
            "contention_summary",
            setting=name,
            threads=threads,
            policy=policy,
            solo_samples_per_s=round(statistics.median(x["solo_samples_per_s"] for x in recs), 1),
            contended_samples_per_s=round(
                statistics.median(x["contended_samples_per_s"] for x in recs), 1
            ),
            ratio=round(statistics.median(x["ratio"] for x in recs), 3),
            competitor_gflops=round(statistics.median(x["competitor_gflops"] for x in recs), 2),
            rounds=len(recs),
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
