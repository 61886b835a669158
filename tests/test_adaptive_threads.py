"""``training.threads: adaptive`` (``mtrec.train.adaptive_threads``): decisions from
simulated step times, and the training loop's use of it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import first_batch, fitted_spec, small_config, small_data_dir

from mtrec.checkpoint import best_path, load_checkpoint
from mtrec.threads import affinity_cores, resolve_threads
from mtrec.train.adaptive_threads import (
    AdaptiveThreads,
    AdaptiveThreadsSettings,
    reachable_counts,
    repeatable_counts,
)
from mtrec.train.loop import train
from mtrec.train.step import TrainStep

ROWS = 1024


class Machine:
    """Seconds per step at each thread count, solo and with the cores shared (numbers
    in the proportions ``bench/contention.py`` measured for census MMoE on 2 cores)."""

    def __init__(self, solo: dict[int, float], shared: dict[int, float]) -> None:
        self.solo, self.shared = solo, shared
        self.contended = False
        self.applied: list[int] = []

    def set_threads(self, threads: int) -> None:
        self.applied.append(threads)

    def run(self, governor: AdaptiveThreads, steps: int) -> list[int]:
        """``steps`` steps; the count each step ran at."""
        counts = []
        for _ in range(steps):
            counts.append(governor.threads)
            table = self.shared if self.contended else self.solo
            governor.observe(table[governor.threads], ROWS)
        return counts


def two_cores() -> Machine:
    # solo: 2 threads 1.6x one; shared with a 2-thread process: 2 threads collapse
    return Machine(solo={1: 0.040, 2: 0.025}, shared={1: 0.050, 2: 0.200})


def governor_on(machine: Machine, max_threads: int = 2, **settings: float) -> AdaptiveThreads:
    lines: list[str] = []
    gov = AdaptiveThreads(
        max_threads,
        AdaptiveThreadsSettings(**settings),
        set_threads=machine.set_threads,
        log=lines.append,
    )
    gov.lines = lines  # type: ignore[attr-defined]
    return gov


def test_solo_stays_at_the_most_threads_and_probes_rarely() -> None:
    machine = two_cores()
    gov = governor_on(machine)
    counts = machine.run(gov, 6000)  # 150 s of step time
    assert gov.threads == 2 and gov.switches == 0 and gov.lines == []  # type: ignore[attr-defined]
    # probes back off (10, 20, 40, 80 s ...): under 2% of the steps at the slower count
    assert counts.count(1) / len(counts) < 0.02
    share = gov.summary()["rows_share"]
    assert isinstance(share, dict) and share["2"] > 0.98
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-3)


def test_contention_moves_to_one_thread_and_back_when_it_ends() -> None:
    machine = two_cores()
    gov = governor_on(machine)
    machine.run(gov, 500)  # 12.5 s solo, a periodic probe at 10 s included
    assert gov.threads == 2 and gov.switches == 0
    machine.contended = True
    counts = machine.run(gov, 200)  # 10 s at 1 thread
    # the slowdown is seen within one window (0.5 s = 3 slow steps) and a probe follows
    assert counts.index(1) <= 4
    assert gov.threads == 1 and gov.switches == 1
    assert "2 -> 1 threads" in gov.lines[0]  # type: ignore[attr-defined]
    later = machine.run(gov, 200)
    assert later.count(2) / len(later) < 0.1  # stays, apart from a brief periodic probe
    machine.contended = False
    machine.run(gov, 400)  # the next periodic probe (<= 10 s after the change) finds 2 faster
    assert gov.threads == 2 and gov.switches == 2
    assert machine.applied[0] == 2  # the first count set is the maximum


def test_a_small_gain_does_not_switch() -> None:
    machine = Machine(solo={1: 0.0238, 2: 0.025}, shared={})  # 1 thread only 5% faster
    gov = governor_on(machine)
    machine.run(gov, 3000)
    assert gov.threads == 2 and gov.switches == 0


def test_halves_and_doubles_up_to_the_maximum() -> None:
    # four cores, shared: 2 threads is the fastest count
    machine = Machine(
        solo={1: 0.08, 2: 0.045, 4: 0.025},
        shared={1: 0.09, 2: 0.06, 4: 0.30},
    )
    gov = governor_on(machine, max_threads=4)
    machine.run(gov, 400)
    machine.contended = True
    machine.run(gov, 2000)
    assert gov.threads == 2
    assert set(machine.applied) <= {1, 2, 4}  # never beyond the maximum


def test_one_core_never_changes() -> None:
    machine = Machine(solo={1: 0.04}, shared={1: 0.2})
    gov = governor_on(machine, max_threads=1)
    machine.run(gov, 500)
    machine.contended = True
    machine.run(gov, 500)
    assert machine.applied == [1] and gov.switches == 0


def test_same_observations_give_same_decisions() -> None:
    def trace() -> list[int]:
        machine = two_cores()
        gov = governor_on(machine)
        counts = machine.run(gov, 300)
        machine.contended = True
        return counts + machine.run(gov, 300)

    assert trace() == trace()


def test_reachable_counts_halve_and_double_within_the_cores() -> None:
    assert reachable_counts(16) == [16, 8, 4, 2, 1]
    assert reachable_counts(6) == [6, 4, 3, 2, 1]
    assert reachable_counts(1) == [1]


def test_repeatable_counts_keep_those_equal_to_the_reference() -> None:
    current = [4]
    # 2 threads sum in the reference's order, 1 thread rounds differently
    results = {
        4: torch.tensor([1.0, 2.0]),
        2: torch.tensor([1.0, 2.0]),
        1: torch.tensor([1.0, 2.5]),
    }

    def trial() -> list[torch.Tensor]:
        return [torch.tensor(0.5), results[current[0]]]

    def set_count(count: int) -> None:
        current[0] = count

    assert repeatable_counts(trial, [4, 2, 1], set_count) == [4, 2]
    assert current == [4]  # left at the reference count


def test_a_count_that_rounds_differently_is_never_used() -> None:
    machine = two_cores()
    gov = governor_on(machine)
    # the model's gradients at 1 thread differ from those at 2
    gov.check_repeatable(lambda: [torch.tensor(float(machine.applied[-1]))])
    assert gov.checked and gov.frozen and gov.summary()["allowed"] == [2]
    lines: list[str] = gov.lines  # type: ignore[attr-defined]
    assert "round differently at [1] thread(s) than at 2; it stays at 2" in lines[0]
    machine.run(gov, 300)
    machine.contended = True
    machine.run(gov, 600)  # a fixed count would collapse here: it still does not move
    assert gov.threads == 2 and gov.switches == 0
    assert machine.applied[-1] == 2 and set(machine.applied) == {1, 2}  # 1: the check only


def test_a_disallowed_middle_count_is_skipped_both_ways() -> None:
    # three cores; 2 threads round differently from 3, 1 thread agrees
    machine = Machine(
        solo={1: 0.08, 2: 0.045, 3: 0.03},
        shared={1: 0.09, 2: 0.2, 3: 0.3},
    )
    gov = governor_on(machine, max_threads=3)
    gov.check_repeatable(lambda: [torch.tensor(float(machine.applied[-1] == 2))])
    assert gov.summary()["allowed"] == [1, 3] and not gov.frozen
    checked = len(machine.applied)  # the check itself visited 2
    counts = machine.run(gov, 2000)  # 60 s idle: periodic probes of 1 thread, back to 3
    assert gov.threads == 3 and counts.count(1) / len(counts) < 0.05
    machine.contended = True
    machine.run(gov, 300)
    assert gov.threads == 1
    machine.contended = False
    machine.run(gov, 1000)  # from 1 the next count up is 3 (2 is never used)
    assert gov.threads == 3 and 2 not in machine.applied[checked:]


def test_keep_stays_for_good() -> None:
    machine = two_cores()
    gov = governor_on(machine)
    gov.keep("training.compile builds its kernels for one thread count")
    assert gov.frozen and gov.checked
    machine.contended = True
    machine.run(gov, 500)
    assert machine.applied == [2]
    assert "stays at 2 thread(s): training.compile" in gov.lines[0]  # type: ignore[attr-defined]


def test_scoring_runs_at_the_starting_count() -> None:
    machine = two_cores()
    gov = governor_on(machine)
    machine.run(gov, 500)
    machine.contended = True
    machine.run(gov, 200)
    assert gov.threads == 1
    with gov.starting_count():  # validation: the same count whatever the load
        assert machine.applied[-1] == 2
    assert machine.applied[-1] == 1 and gov.threads == 1


def test_an_agreeing_count_stays_allowed() -> None:
    machine = two_cores()
    gov = governor_on(machine)
    gov.check_repeatable(lambda: [torch.tensor(1.0)])
    assert not gov.frozen and gov.lines == []  # type: ignore[attr-defined]
    machine.run(gov, 500)
    machine.contended = True
    machine.run(gov, 200)
    assert gov.threads == 1


def full_stack_step(data, tmp, threads: int) -> tuple[TrainStep, object]:
    # the data's own stack: Unified Embedding → AutoInt+ → HoME with BatchNorm experts
    cfg = small_config(
        data,
        tmp,
        model={
            "interaction": {
                "type": "autoint",
                "layers": 2,
                "attention_dim": 8,
                "heads": 2,
                "dnn": [16],
            },
            "multitask": {"type": "home", "expert_hidden": [16, 8]},
        },
    )
    torch.set_num_threads(threads)
    spec = fitted_spec(cfg)
    return TrainStep(cfg, spec), first_batch(cfg, spec, "train", rows=512)


def test_trial_gradients_change_nothing_and_steps_repeat_at_1_and_2_threads(
    tmp_path_factory,
) -> None:
    before = torch.get_num_threads()
    try:
        data = small_data_dir(tmp_path_factory)
        step, batch = full_stack_step(data, tmp_path_factory.mktemp("trial"), 2)
        state = {k: v.clone() for k, v in step.model.state_dict().items()}
        rng = torch.get_rng_state()
        grads = step.trial_gradients(batch)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(v, state[k]) for k, v in step.model.state_dict().items())
        assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)
        torch.set_num_threads(1)
        assert all(
            torch.equal(a, b) for a, b in zip(step.trial_gradients(batch), grads, strict=True)
        )
        # the loss, then the gradients of the deep tokens and of the linear term's weights
        # (read after the comparison: this forward draws from the random stream)
        tokens, linear_ids = step.model.sparse_parts(batch.sparse)
        assert grads[1].shape == tokens.shape and grads[2].shape == linear_ids.shape
        # and training itself: steps alternating 1 and 2 threads = steps at 2 threads
        states = []
        for plan in ((2, 2, 2, 2), (1, 2, 1, 2)):
            step, batch = full_stack_step(data, tmp_path_factory.mktemp("plan"), 2)
            torch.manual_seed(7)
            for count in plan:
                torch.set_num_threads(count)
                step.step(batch)
            states.append(step.state_dict())
        flat = [torch.cat([t.flatten().float() for t in _tensors(s)]) for s in states]
        assert torch.equal(flat[0], flat[1])
    finally:
        torch.set_num_threads(before)


def _tensors(state: object) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _tensors(state[k])]
    if isinstance(state, list | tuple):
        return [t for v in state for t in _tensors(v)]
    return []


def test_settings_and_setting_values() -> None:
    assert resolve_threads("adaptive") == affinity_cores()
    with pytest.raises(ValueError, match="max_threads"):
        AdaptiveThreads(0, set_threads=lambda n: None)
    with pytest.raises(ValueError, match="'adaptive'"):
        resolve_threads("fast")


def test_training_loop_records_the_threads(tmp_path_factory) -> None:
    before = torch.get_num_threads()
    try:
        data = small_data_dir(tmp_path_factory)
        tmp = tmp_path_factory.mktemp("adaptive")
        cfg = small_config(
            data,
            tmp,
            ["training.threads=adaptive", "training.epochs=1", "training.progress=false"],
        )
        assert cfg.training.threads == "adaptive"
        train(cfg, tmp / "run")
        lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        record = lines[0]["threads"]
        assert record["now"] in range(1, affinity_cores() + 1)
        assert sum(record["rows_share"].values()) == pytest.approx(1.0, abs=1e-3)
        assert affinity_cores() in record["allowed"]  # the check ran; the start count stays
    finally:
        torch.set_num_threads(before)


def test_adaptive_is_the_default_and_trains_what_a_fixed_count_trains(tmp_path_factory) -> None:
    """The check's trial forward and backward leave no trace: an adaptive run (whatever
    counts it moves through) ends with the weights and metrics of a run at a fixed count."""
    before = torch.get_num_threads()
    try:
        data = small_data_dir(tmp_path_factory)
        tmp = tmp_path_factory.mktemp("adaptive_vs_fixed")
        runs = {}
        for setting in ("adaptive", str(affinity_cores())):
            cfg = small_config(
                data,
                tmp / setting,
                [f"training.threads={setting}"],
                model={"multitask": {"type": "home", "expert_hidden": [16, 8]}},
            )
            runs[setting] = tmp / setting / "run"
            train(cfg, runs[setting])
        adaptive, fixed = (load_checkpoint(best_path(r))["model"] for r in runs.values())
        assert adaptive.keys() == fixed.keys()
        assert all(torch.equal(adaptive[k], fixed[k]) for k in adaptive)
        valid = [
            [json.loads(x)["valid"] for x in (r / "metrics.jsonl").read_text().splitlines()]
            for r in runs.values()
        ]
        assert valid[0] == valid[1]
    finally:
        torch.set_num_threads(before)
    from mtrec.config.schema import TrainingConfig

    assert TrainingConfig().threads == "adaptive"
