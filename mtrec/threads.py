"""CPU threads of a training process: how many, and how OpenMP's threads wait.

Torch's intra-op parallelism here is GNU OpenMP (libgomp). A parallel region ends at a
barrier; a thread that reaches it first *waits* for the others, by spinning for a while
and then sleeping in the kernel. libgomp reads how long to spin from the environment
(``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) once, when the library is loaded — that is,
when ``torch`` is first imported. So :func:`set_wait_policy` only takes effect before
that: the ``mtrec`` command line calls it right after reading the config, before
anything imports torch. In a process that already imported torch (a notebook, a test
session) it changes nothing and says so; set the variable in the shell instead
(``OMP_WAIT_POLICY=PASSIVE jupyter lab``).

Nothing here imports torch at module level: importing this module must not start
libgomp.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Literal

__all__ = [
    "WAIT_POLICIES",
    "WaitPolicy",
    "affinity_cores",
    "apply_threads",
    "openmp_started",
    "resolve_threads",
    "set_wait_policy",
    "wait_policy_env",
    "wait_policy_in_effect",
]

WaitPolicy = Literal["auto", "passive", "active", "short"]
WAIT_POLICIES: tuple[str, ...] = ("auto", "passive", "active", "short")
#: spins of the ``short`` policy before a waiting thread sleeps (libgomp's default: 300k)
SHORT_SPINCOUNT = 3_000
_ENV_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def affinity_cores() -> int:
    """The cores this process may run on (its CPU affinity; ``taskset``, cgroups cpusets
    and Ray's placement narrow it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(setting: int | str) -> int:
    """``training.threads`` as a count: ``"auto"`` is :func:`affinity_cores`, an int
    is itself. ``"adaptive"`` starts at (and never exceeds) :func:`affinity_cores`; the
    local training loop then moves it with the load
    (:class:`~mtrec.train.adaptive_threads.AdaptiveThreads`). The other settings are never
    chosen from timings, so the same setting on the same machine gives the same thread
    count (and, with the same seed, the same metrics)."""
    if setting in ("auto", "adaptive"):
        return affinity_cores()
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(
            f"training.threads: {setting!r}: expected 'auto', 'adaptive' or an integer >= 1"
        )
    return setting


def wait_policy_env(policy: str) -> dict[str, str]:
    """The environment variables that give libgomp ``policy``:

    * ``passive`` — a waiting thread sleeps at once (``OMP_WAIT_POLICY=PASSIVE``): it
      gives its core to whoever is runnable, e.g. the thread it waits for.
    * ``active`` — it spins until the others arrive (``OMP_WAIT_POLICY=ACTIVE``).
    * ``auto`` — libgomp's default (spin ~300k iterations, then sleep): nothing is set.
    * ``short`` — spin :data:`SHORT_SPINCOUNT` iterations, then sleep
      (``GOMP_SPINCOUNT``): a barrier of the same process is still met spinning, a
      descheduled thread no longer has its core taken by the waiters for long.
    """
    if policy == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    if policy == "active":
        return {"OMP_WAIT_POLICY": "ACTIVE"}
    if policy == "short":
        return {"GOMP_SPINCOUNT": str(SHORT_SPINCOUNT)}
    if policy == "auto":
        return {}
    raise ValueError(
        f"training.omp_wait_policy: {policy!r}: expected one of {', '.join(WAIT_POLICIES)}"
    )


def openmp_started() -> bool:
    """Whether libgomp is already loaded in this process (then its wait policy is fixed)."""
    try:
        with open("/proc/self/maps") as fh:
            return any("libgomp" in line for line in fh)
    except OSError:  # pragma: no cover - not on Linux: torch loaded means libgomp loaded
        return "torch" in sys.modules


def set_wait_policy(policy: str) -> bool:
    """Put ``policy``'s variables into ``os.environ`` for libgomp (and for child
    processes, e.g. an embedded Ray's workers). Returns whether it takes effect in this
    process: False once libgomp is loaded, with a warning when the policy is not
    ``auto``. A variable the user already exported wins over the config."""
    env = wait_policy_env(policy)
    before = wait_policy_in_effect()
    # the running policy is already the one asked for: nothing to warn about
    already = all(os.environ.get(k, "").upper() == v.upper() for k, v in env.items())
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if openmp_started():
        if env and not already:
            warnings.warn(
                f"training.omp_wait_policy: {policy}: torch is already imported, so OpenMP "
                f"keeps its wait policy ({before}); set OMP_WAIT_POLICY in "
                "the environment before starting Python to change it",
                RuntimeWarning,
                stacklevel=2,
            )
        return False
    return True


def wait_policy_in_effect() -> str:
    """The wait-policy variables of this process's environment, e.g.
    ``"OMP_WAIT_POLICY=PASSIVE"``, or ``"default"``."""
    parts = [f"{k}={os.environ[k]}" for k in _ENV_KEYS if k in os.environ]
    return " ".join(parts) or "default"


def apply_threads(training: Any, share: int = 1) -> int:
    """Set torch's intra-op threads from ``training.threads`` (a ``TrainingConfig``);
    ``share`` processes split the cores (Ray workers on one node). Returns the count."""
    import torch

    threads = resolve_threads(training.threads)
    if share > 1:
        threads = max(1, min(threads, affinity_cores() // share))
    torch.set_num_threads(threads)
    return threads
