"""``training.threads: adaptive``: the intra-op thread count chosen by timing the steps.

Why: on cores shared with another CPU-heavy process, a 2-thread training process with
libgomp's default wait policy falls to 0.1-0.2x of its solo speed. Every parallel region
ends at a barrier, and the thread that arrives first spins there for a sibling the kernel
has descheduled, taking the core that sibling needs. One thread has no barrier to wait at
and keeps about 0.6x of the solo 2-thread speed beside the same process
(``bench/contention.py``). The wait policy is fixed once libgomp loads; the thread count
is not (``torch.set_num_threads``). So :class:`AdaptiveThreads` times the training steps
and, when they slow down or every so often, tries its neighbouring counts (half and
double, up to the cores this process may use) for a moment each, and keeps the fastest.

Cost: on idle cores it stays at the maximum; a probe spends a quarter of a second at a
slower count, at first every 10 seconds of training, then every 2 minutes while no
probe changes anything.

The count changes nothing but speed. A thread count can change the floating-point order
of a kernel (ATen's batch norm summed per-thread partial sums until
:class:`mtrec.nn.batch_norm.BatchNorm1d`; a GEMM may split its inner dimension over the
threads), and then a run whose count followed the machine's load would not repeat bit
for bit. So before the first step :func:`repeatable_counts` computes one batch's
gradients (:meth:`mtrec.train.step.TrainStep.trial_gradients`) at every count the
governor could reach and allows only those equal, bit for bit, to the starting count's;
a model none of whose counts agree keeps the starting count, as ``auto`` does. Validation
runs at the starting count (:meth:`AdaptiveThreads.starting_count`): scoring rounds
differently at another count in some models, and the best checkpoint must not depend on
the load. Measured on 2 cores (2026-12-07): the default stack and the census MMoE, PLE,
HoME and AutoInt configs move freely between 1 and 2 threads; the census APEM and
TaskExpert configs stay fixed. With ``training.compile`` the count stays fixed too
(compiled kernels are built for the count they were compiled at).

Everything here is driven by the step times the caller observes (no clock of its own),
so a sequence of observations always gives the same decisions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

__all__ = ["AdaptiveThreads", "AdaptiveThreadsSettings", "reachable_counts", "repeatable_counts"]


def reachable_counts(max_threads: int) -> list[int]:
    """The counts the governor can reach from ``max_threads`` by halving and doubling
    (within ``1..max_threads``), largest first: ``[16, 8, 4, 2, 1]``, ``[6, 4, 3, 2, 1]``."""
    reached, todo = {max_threads}, [max_threads]
    while todo:
        count = todo.pop()
        for step in (max(1, count // 2), min(max_threads, count * 2)):
            if step not in reached:
                reached.add(step)
                todo.append(step)
    return sorted(reached, reverse=True)


def repeatable_counts(
    trial: Callable[[], list[torch.Tensor]],
    counts: list[int],
    set_threads: Callable[[int], None] | None = None,
) -> list[int]:
    """The counts among ``counts`` at which ``trial()`` returns tensors bit-identical to
    its result at ``counts[0]`` (the reference, always kept). ``trial`` must have no side
    effects (:meth:`mtrec.train.step.TrainStep.trial_gradients`); the thread count is left
    at ``counts[0]``."""
    apply = set_threads or _torch_set_threads
    apply(counts[0])
    reference = trial()
    agreeing = [counts[0]]
    for count in counts[1:]:
        apply(count)
        result = trial()
        if len(result) == len(reference) and all(
            torch.equal(a, b) for a, b in zip(result, reference, strict=True)
        ):
            agreeing.append(count)
    apply(counts[0])
    return agreeing


@dataclass(frozen=True)
class AdaptiveThreadsSettings:
    """How :class:`AdaptiveThreads` measures and decides (seconds are step time)."""

    #: step time per rate measurement while running
    window_s: float = 0.5
    #: step time spent on each candidate count during a probe (at least one step)
    probe_s: float = 0.25
    #: a window slower than this fraction of the reference rate starts a probe
    slowdown: float = 0.6
    #: a candidate replaces the current count only when this much faster (hysteresis)
    gain: float = 1.1
    #: step time from the start (and after a change) to the next periodic probe
    first_interval_s: float = 10.0
    #: the periodic probe's interval doubles up to this while nothing changes
    max_interval_s: float = 120.0


@dataclass
class _Measure:
    seconds: float = 0.0
    rows: int = 0
    steps: int = 0

    def add(self, seconds: float, rows: int) -> None:
        self.seconds += seconds
        self.rows += rows
        self.steps += 1

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Probe:
    """One probe: the candidate counts in the order they are timed, and their rates."""

    order: list[int]
    rates: dict[int, float] = field(default_factory=dict)


class AdaptiveThreads:
    """Chooses torch's intra-op thread count from the observed step times.

    Call :meth:`observe` after every training step with that step's wall seconds and
    rows; it sets the count the next step runs at (through ``set_threads``,
    ``torch.set_num_threads`` by default).

    Args:
        max_threads: the most threads to use (the cores this process may use).
        settings: the measuring and deciding constants.
        set_threads: applies a count (injected by tests).
        log: receives one line per change of count (stderr by default).
        allowed: the counts it may move to (default: all of ``1..max_threads``); see
            :func:`repeatable_counts` and :meth:`allow`.
    """

    def __init__(
        self,
        max_threads: int,
        settings: AdaptiveThreadsSettings | None = None,
        set_threads: Callable[[int], None] | None = None,
        log: Callable[[str], None] | None = None,
        allowed: list[int] | None = None,
    ) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.max_threads = max_threads
        self.settings = settings or AdaptiveThreadsSettings()
        self._set = set_threads or _torch_set_threads
        self._log = log or _stderr
        self.threads = max_threads
        self.allowed: set[int] = set(range(1, max_threads + 1))
        #: whether :meth:`check_repeatable` ran
        self.checked = False
        if allowed is not None:
            self.allow(allowed)
        self.switches = 0
        #: rows trained at each count (for the run's metrics)
        self.rows_at: dict[int, int] = {}
        self._reference: float | None = None  # the current count's rate when running well
        self._window = _Measure()
        self._since_probe = 0.0
        self._interval = self.settings.first_interval_s
        self._probe: _Probe | None = None
        self._probe_measure = _Measure()
        self._set(self.threads)

    # ------------------------------------------------------------------ observing

    def observe(self, seconds: float, rows: int) -> int:
        """Record one step of ``rows`` rows that took ``seconds``; returns the count the
        next step runs at."""
        self.rows_at[self.threads] = self.rows_at.get(self.threads, 0) + rows
        if self.max_threads == 1 or self.frozen:
            return self.threads
        if self._probe is not None:
            self._observe_probe(seconds, rows)
            return self.threads
        self._since_probe += seconds
        self._window.add(seconds, rows)
        if self._window.seconds < self.settings.window_s:
            return self.threads
        rate = self._window.rate
        self._window = _Measure()
        if self._reference is None:
            self._reference = rate
        elif rate < self.settings.slowdown * self._reference:
            # slowed down: the cores may have become shared. This window is the current
            # count's rate now; timing it again would cost the slow steps twice
            self._start_probe(current_rate=rate)
            return self.threads
        else:  # follow slow drift, e.g. the first steps' warm-up
            self._reference = 0.8 * self._reference + 0.2 * rate
        if self._since_probe >= self._interval:
            self._start_probe()
        return self.threads

    def check_repeatable(self, trial: Callable[[], list[torch.Tensor]]) -> None:
        """Allow only the reachable counts at which ``trial`` (one batch's gradients, no
        side effects) agrees bit for bit with the current count (:func:`repeatable_counts`);
        one line says which counts were left out, and why."""
        self.checked = True
        counts = [c for c in reachable_counts(self.max_threads) if c in self.allowed]
        counts.remove(self.threads)
        if not counts:  # one core: nothing to compare
            return
        agreeing = repeatable_counts(trial, [self.threads, *counts], self._set)
        self.allow(agreeing)
        left_out = sorted(set(counts) - set(agreeing))
        if left_out:
            stays = "stays at" if self.frozen else "keeps to"
            kept = self.threads if self.frozen else sorted(self.allowed)
            self._log(
                f"training.threads adaptive: this model's gradients round differently at "
                f"{left_out} thread(s) than at {self.threads}; it {stays} {kept} so that "
                "the run repeats bit for bit"
            )

    def keep(self, reason: str) -> None:
        """Stay at the current count for good (one log line gives ``reason``)."""
        self.allow([self.threads])
        self.checked = True
        self._log(f"training.threads adaptive: stays at {self.threads} thread(s): {reason}")

    @contextmanager
    def starting_count(self) -> Iterator[None]:
        """Run the block at the starting count (``max_threads``), then return to the
        current one. Validation runs in it: scoring is not bit-identical across counts
        in every model (the demo's validation AUCs move in the ninth digit between 1 and
        2 threads), and the best checkpoint must not depend on the load."""
        self._set(self.max_threads)
        try:
            yield
        finally:
            self._set(self.threads)

    def allow(self, counts: list[int]) -> None:
        """Restrict the counts the governor may move to (the current one always stays)."""
        self.allowed = {c for c in counts if 1 <= c <= self.max_threads} | {self.threads}

    @property
    def frozen(self) -> bool:
        """True when no other count is allowed: the count stays where it is."""
        return len(self.allowed) == 1

    def summary(self) -> dict[str, object]:
        """The count now, the number of changes, and the share of rows at each count."""
        total = max(1, sum(self.rows_at.values()))
        return {
            "now": self.threads,
            "switches": self.switches,
            "allowed": sorted(self.allowed),
            "rows_share": {str(k): round(v / total, 4) for k, v in sorted(self.rows_at.items())},
        }

    # ------------------------------------------------------------------ probing

    def _candidates(self) -> list[int]:
        """The allowed neighbours of the current count, then the current count itself (it
        is timed last, in the same conditions as its neighbours). Below: the largest
        allowed count up to half the current one (else the largest allowed below it);
        above: the smallest allowed from double (else the largest allowed above it, as
        doubling caps at the maximum)."""
        current = self.threads
        lower = sorted(c for c in self.allowed if c < current)
        upper = sorted(c for c in self.allowed if c > current)
        others = []
        if lower:
            others.append(max([c for c in lower if c <= current // 2] or [lower[-1]]))
        if upper:
            others.append(min([c for c in upper if c >= 2 * current] or [upper[-1]]))
        return [*others, current]

    def _start_probe(self, current_rate: float | None = None) -> None:
        """Time the candidates in turn; ``current_rate``, when given, stands for the
        current count (then it is not timed again)."""
        self._probe = _Probe(order=self._candidates())
        if current_rate is not None:
            self._probe.rates[self.threads] = current_rate
        self._probe_measure = _Measure()
        self._apply(self._next_candidate(self._probe))

    @staticmethod
    def _next_candidate(probe: _Probe) -> int:
        return next(k for k in probe.order if k not in probe.rates)

    def _observe_probe(self, seconds: float, rows: int) -> None:
        probe = self._probe
        assert probe is not None
        measure = self._probe_measure
        measure.add(seconds, rows)
        if measure.seconds < self.settings.probe_s:
            return
        probe.rates[self.threads] = measure.rate
        self._probe_measure = _Measure()
        if len(probe.rates) < len(probe.order):
            self._apply(self._next_candidate(probe))
            return
        self._finish_probe(probe)

    def _finish_probe(self, probe: _Probe) -> None:
        current = probe.order[-1]  # the count before the probe
        best = max(probe.rates, key=lambda k: probe.rates[k])
        chosen = current
        if best != current and probe.rates[best] > self.settings.gain * probe.rates[current]:
            chosen = best
        self._probe = None
        self._since_probe = 0.0
        self._window = _Measure()
        self._reference = probe.rates[chosen]
        if chosen != current:
            self.switches += 1
            self._interval = self.settings.first_interval_s
            rates = ", ".join(f"{k}: {probe.rates[k]:,.0f}" for k in sorted(probe.rates))
            self._log(
                f"training.threads adaptive: {current} -> {chosen} threads "
                f"(rows/s at each count: {rates})"
            )
        else:
            self._interval = min(2 * self._interval, self.settings.max_interval_s)
        self._apply(chosen)

    def _apply(self, threads: int) -> None:
        if threads != self.threads:
            self.threads = threads
            self._set(threads)


def _torch_set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
