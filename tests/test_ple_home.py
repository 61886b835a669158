"""PLE and HoME blocks (and MMoE / shared-bottom diagnostics): METHODS.md's checks, loop
references, eager vs ``torch.jit.script``, end-to-end models and a short training run."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import eval_loss, first_batch, fitted_spec, make_small_data, seeded, small_config
from torch import nn

from mtrec.config import ConfigError, ExperimentConfig
from mtrec.data.batcher import iter_batches, load_encoded
from mtrec.model import build_model
from mtrec.multitask.diagnostics import DEAD_EPS
from mtrec.multitask.experts import ExpertBank, StackedLevels
from mtrec.multitask.home import HoME, resolve_groups
from mtrec.multitask.mmoe import MMoE, SharedBottom
from mtrec.multitask.ple import PLE
from mtrec.train.step import TrainStep

TASKS = ["click", "like", "share", "follow"]
GROUPS = {"engage_a": ["click", "like"], "engage_b": ["share", "follow"]}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These blocks are tiny: two intra-op threads on a busy 2-core machine spin against
    each other (measured here: 17 ms vs 190-430 ms per training step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def outputs(block: nn.Module, v: torch.Tensor) -> list[torch.Tensor]:
    return block(v, [], {})


def home(**kw: object) -> HoME:
    args: dict = {
        "task_groups": GROUPS,
        "shared_experts": 2,
        "group_experts": 1,
        "task_experts": 1,
        "feature_gate_rank": 3,
    }
    args.update(kw)
    torch.manual_seed(0)
    return HoME(10, TASKS, [8, 6], **args)


def randomize(block: nn.Module, seed: int = 0) -> nn.Module:
    """Give the parameters that start at fixed values (feature-gate B_i = 0, BN affine and
    running statistics) random values, so references test every term."""
    g = seeded(seed)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, ExpertBank) and m.gate_down is not None:
                m.gate_down.copy_(torch.randn(m.gate_down.shape, generator=g) * 0.3)
            if isinstance(m, nn.BatchNorm1d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return block


# ------------------------------------------------------------------ loop references


def expert_ref(bank: ExpertBank, e: int, slot: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of ``bank`` at slot ``slot`` on B x in, one row-block matmul at a time."""
    act = bank.act
    if bank.gate_down is not None:
        x = x * 2 * torch.sigmoid(x @ bank.gate_down[e] @ bank.gate_up[e])
    h = x @ bank.first.weight[e] + bank.first.bias[e, 0]
    for layer in bank.deep:
        h = act(h) @ layer.weight[e] + layer.bias[e, 0]
    bn = bank.norm
    if bn is None:
        return act(h)
    d = h.shape[1]
    cols = slice(slot * d, (slot + 1) * d)
    if bank.training:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean[cols], bn.running_var[cols]
    return F.silu((h - mean) / torch.sqrt(var + bn.eps) * bn.weight[cols] + bn.bias[cols])


def gate_ref(
    proj: nn.Linear, x: torch.Tensor, experts: list[torch.Tensor], own: list[torch.Tensor]
) -> torch.Tensor:
    logits = x @ proj.weight.t() + proj.bias
    main = torch.softmax(logits[:, : len(experts)], 1)
    out = sum(main[:, i : i + 1] * h for i, h in enumerate(experts))
    if own:
        rest = logits[:, len(experts) :]
        w = torch.sigmoid(rest) if len(own) == 1 else torch.softmax(rest, 1)
        out = out + sum(w[:, j : j + 1] * h for j, h in enumerate(own))
    return out


def ple_ref(block: PLE, v: torch.Tensor, ns: int, nt: int) -> list[torch.Tensor]:
    """PLE from the paper, expert by expert (slots [shared, task 0, task 1, ...])."""
    num_tasks = block.num_tasks
    x_task, x_shared = [v] * num_tasks, v
    for k, level in enumerate(block.levels):
        bank = level.bank
        shared = [expert_ref(bank, j, j, x_shared) for j in range(ns)]
        own = [
            [expert_ref(bank, ns + t * nt + j, ns + t * nt + j, x_task[t]) for j in range(nt)]
            for t in range(num_tasks)
        ]
        new = [
            gate_ref(level.gates[t].proj, x_task[t], own[t] + shared, []) for t in range(num_tasks)
        ]
        if k < len(block.levels) - 1 and ns:
            every = shared + [h for hs in own for h in hs]
            x_shared = gate_ref(level.gates[num_tasks].proj, x_shared, every, [])
        x_task = new
    return x_task


def home_ref(block: HoME, v: torch.Tensor, ns: int, ng: int, nt: int) -> list[torch.Tensor]:
    """HoME with the hierarchy, expert by expert, from the documented slot layout."""
    groups = resolve_groups(TASKS, GROUPS)
    g_count = len(groups)
    l1, l2 = block.levels
    shared = [expert_ref(l1.bank, j, j, v) for j in range(ns)]
    grp = [
        [expert_ref(l1.bank, ns + c * ng + j, ns + c * ng + j, v) for j in range(ng)]
        for c in range(g_count)
    ]
    g_rep = [gate_ref(l1.gates[c].proj, v, grp[c] + shared, grp[c]) for c in range(g_count)]
    every = shared + [h for hs in grp for h in hs]
    s_rep = gate_ref(l1.gates[g_count].proj, v, every, shared)
    x = [torch.cat([s_rep, g], 1) for g in g_rep]
    b2 = l2.bank
    shared2 = [[expert_ref(b2, j, c * ns + j, x[c]) for j in range(ns)] for c in range(g_count)]
    base = g_count * ns
    grp2 = [
        [expert_ref(b2, ns + c * ng + j, base + c * ng + j, x[c]) for j in range(ng)]
        for c in range(g_count)
    ]
    base += g_count * ng
    out = []
    for t, task in enumerate(TASKS):
        c = next(i for i, (_, members) in enumerate(groups) if t in members)
        p0 = ns + g_count * ng + t * nt
        own = [expert_ref(b2, p0 + j, base + t * nt + j, x[c]) for j in range(nt)]
        gate = l2.gates[t]
        assert gate.name == f"task:{task}"
        out.append(gate_ref(gate.proj, x[c], own + shared2[c] + grp2[c], own))
    return out


# ------------------------------------------------------------------------------- PLE


@pytest.mark.parametrize(("levels", "ns", "nt"), [(1, 1, 1), (2, 2, 1), (3, 2, 2), (2, 0, 2)])
def test_ple_matches_loop_reference_and_script(levels: int, ns: int, nt: int) -> None:
    torch.manual_seed(1)
    block = PLE(10, TASKS[:3], [8, 6], levels=levels, shared_experts=ns, task_experts=nt).eval()
    v = torch.randn(7, 10, generator=seeded(2))
    out = outputs(block, v)
    assert len(out) == 3 and all(r.shape == (7, 6) for r in out)
    for got, want in zip(out, ple_ref(block, v, ns, nt)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(out, outputs(torch.jit.script(block), v)):
        exact(a, b)


def test_ple_hand_computed_tiny_case() -> None:
    # one level, experts E_e(v) = relu((e + 1) v), all gate logits 0 (uniform weights):
    # slots [shared (x1), click (x2), like (x3)]; click mixes [x2, x1], like [x3, x1]
    block = PLE(2, ["click", "like"], [2], levels=1, shared_experts=1, task_experts=1).eval()
    with torch.no_grad():
        for e in range(3):
            block.levels[0].bank.first.weight[e] = (e + 1) * torch.eye(2)
        block.levels[0].bank.first.bias.zero_()
        for gate in block.levels[0].gates:
            gate.proj.weight.zero_()
            gate.proj.bias.zero_()
    v = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    click, like = outputs(block, v)
    exact(click, torch.tensor([[1.5, 0.0], [4.5, 0.75]]))
    exact(like, torch.tensor([[2.0, 0.0], [6.0, 1.0]]))


def test_ple_shared_gate_sees_every_expert() -> None:
    torch.manual_seed(0)
    block = PLE(10, TASKS[:3], [8, 6], levels=2, shared_experts=2, task_experts=1).eval()
    first, last = block.levels
    # level 1: three task gates + the shared gate over all 2 + 3 experts; last: no shared gate
    assert [g.name for g in first.gates][-1] == "L1:shared"
    assert first.gates[-1].member_list == list(range(5))
    assert len(last.gates) == 3 and all(g.name.startswith("task:") for g in last.gates)
    v = torch.randn(6, 10, generator=seeded(3))
    base = first(v.unsqueeze(0))  # 4 x B x 6: [click, like, share, shared]
    for e in range(5):  # slots: shared 0, 1; click 2; like 3; share 4
        moved = copy.deepcopy(first)
        with torch.no_grad():
            moved.bank.first.weight[e] += 1.0
        out = moved(v.unsqueeze(0))
        assert not torch.equal(out[3], base[3]), f"shared gate ignores expert {e}"
        for t in range(3):  # task t's gate reads only its own expert and the shared ones
            reads = e < 2 or e == 2 + t
            assert torch.equal(out[t], base[t]) != reads, (t, e)


# ------------------------------------------------------------------------------ HoME


@pytest.mark.parametrize("train", [False, True])
def test_home_matches_loop_reference(train: bool) -> None:
    block = randomize(home(shared_experts=2, group_experts=2, task_experts=1))
    block.train(train)
    v = torch.randn(16, 10, generator=seeded(4)) * 2 + 0.5
    out = outputs(block, v)
    for got, want in zip(out, home_ref(block, v, 2, 2, 1)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "flags",
    [
        {"shared_experts": 2, "group_experts": 2, "task_experts": 1},
        {"expert_norm": False, "act": "gelu"},
        {"act": "silu", "self_gate": False, "group_experts": 0},
        {"hierarchy": False, "task_experts": 2},
    ],
)
def test_home_inference_path_matches_the_autograd_path(flags: dict) -> None:
    """Eval without autograd (serving, evaluation) takes the banks' and gates' in-place
    inference path (BN as an affine map, slot-by-slot mixing): the same outputs as the
    autograd path up to float rounding, eager and scripted, and the loop reference."""
    block = randomize(home(**flags)).eval()
    scripted_block = torch.jit.script(block)
    for rows in (33, 80):  # the gates mix small and large batches differently
        v = torch.randn(rows, 10, generator=seeded(6)) * 2 + 0.5
        want = [t.detach() for t in outputs(block, v)]  # autograd on: the training code path
        with torch.no_grad():
            got = outputs(block, v)
            scripted = outputs(scripted_block, v)
        for g, w, s in zip(got, want, scripted):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
            exact(s, g)
        if flags.get("group_experts") == 2:
            for g, ref in zip(got, home_ref(block, v, 2, 2, 1)):
                torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"expert_norm": False},
        {"feature_gate": False},
        {"self_gate": False, "group_experts": 0},
        {"hierarchy": False},
        {"hierarchy": False, "task_experts": 2, "shared_experts": 0},
        {"dropout": 0.2, "act": "gelu"},
    ],
)
def test_home_eager_equals_script(flags: dict) -> None:
    block = randomize(home(**flags)).eval()
    v = torch.randn(9, 10, generator=seeded(5))
    scripted = torch.jit.script(block)
    for a, b in zip(outputs(block, v), outputs(scripted, v)):
        assert a.shape == (9, 6)
        exact(a, b)
    # inference reads running statistics: a row's output does not depend on its batch
    torch.testing.assert_close(outputs(block, v[:1])[2], outputs(block, v)[2][:1])


def test_home_hand_computed_tiny_case() -> None:
    # flat HoME, experts E_e(v) = Swish(BN((e + 1) v)) with fresh running statistics
    # (BN = x / sqrt(1 + eps)), feature gates 1 at init, zero gate logits: main weights
    # uniform, the single-expert self-gate σ(0) = 0.5
    torch.manual_seed(0)
    block = HoME(2, ["click", "like"], [2], hierarchy=False, feature_gate_rank=1).eval()
    level = block.levels[0]
    with torch.no_grad():
        for e in range(3):
            level.bank.first.weight[e] = (e + 1) * torch.eye(2)
        level.bank.first.bias.zero_()
        for gate in level.gates:
            gate.proj.weight.zero_()
            gate.proj.bias.zero_()
    v = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    scale = 1 / math.sqrt(1 + 1e-5)

    def expert(e: int) -> torch.Tensor:
        return F.silu((e + 1) * v * scale)

    click, like = outputs(block, v)
    torch.testing.assert_close(click, (expert(1) + expert(0)) / 2 + 0.5 * expert(1))
    torch.testing.assert_close(like, (expert(2) + expert(0)) / 2 + 0.5 * expert(2))


def perturb_experts(block: HoME, level: int, names: list[str]) -> HoME:
    """A copy whose experts (by diagnostics name prefix) at ``level`` got new weights."""
    moved = copy.deepcopy(block)
    bank = moved.levels[level].bank
    lvl = moved.levels[level]
    with torch.no_grad():
        for slot, name in enumerate(lvl.slot_names):
            if any(name.startswith(n) for n in names):
                e = bank.slot_expert_list[slot]
                bank.first.weight[e] += 0.5
                if bank.gate_down is not None:
                    bank.gate_down[e] += 0.5
    return moved


@pytest.mark.parametrize("train", [False, True])
def test_home_other_groups_experts_never_reach_a_task(train: bool) -> None:
    block = randomize(home(task_experts=2)).train(train)
    v = torch.randn(12, 10, generator=seeded(6))
    base = outputs(block, v)
    # level 2: group engage_b's experts and its tasks' experts
    moved = perturb_experts(block, 1, ["L2.group:engage_b", "L2.task:share", "L2.task:follow"])
    out = outputs(moved.train(train), v)
    exact(out[0], base[0])  # click
    exact(out[1], base[1])  # like
    assert not torch.equal(out[2], base[2]) and not torch.equal(out[3], base[3])
    # level 1: engage_b's experts change only engage_b's representation and the shared one
    # (which mixes every level-1 expert by design); engage_a's representation is untouched
    l1 = block.levels[0](v.unsqueeze(0))
    moved = perturb_experts(block, 0, ["L1.group:engage_b"])
    l1_moved = moved.train(train).levels[0](v.unsqueeze(0))
    exact(l1_moved[0], l1[0])
    assert not torch.equal(l1_moved[1], l1[1]) and not torch.equal(l1_moved[2], l1[2])
    # the gate of click lists no engage_b expert at all
    gates = block.eval().diagnostics(v, [])["gates"]
    assert not any("engage_b" in e or "task:share" in e for e in gates["task:click"]["experts"])


def test_home_pre_swish_outputs_are_normalised_in_training() -> None:
    block = home().train()
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        lvl.bank.norm.register_forward_hook(lambda m, i, o: captured.append((i[0], o)))
        for lvl in block.levels
    ]
    v = torch.randn(64, 10, generator=seeded(7)) * 3 + 2  # far from normalised
    outputs(block, v)
    for h in hooks:
        h.remove()
    assert len(captured) == 2
    for raw, pre_swish in captured:  # B x (slots · d): every (expert slot, unit) column
        zeros = torch.zeros(pre_swish.shape[1])
        torch.testing.assert_close(pre_swish.mean(0), zeros, atol=1e-5, rtol=0)
        var = pre_swish.var(0, unbiased=False)
        assert (var - 1).abs().max() < 0.02
        # exactly 1 but for BN's eps: var / (var + eps)
        raw_var = raw.var(0, unbiased=False)
        torch.testing.assert_close(var, raw_var / (raw_var + 1e-5), atol=1e-4, rtol=0)
    # the raw expert outputs were not normalised: BN did the work
    raw = block.levels[0].bank.pre_activation(v.unsqueeze(0))
    assert raw.mean(1).abs().max() > 0.1
    # a single-row batch in training (an epoch's last batch) normalises with running stats
    one = outputs(block, v[:1])
    exact(one[0], outputs(block.eval(), v[:1])[0])


def feature_gates(block: HoME, v: torch.Tensor) -> list[torch.Tensor]:
    """Every level's S x B x in feature gates on the block's inputs for v."""
    gates, xs = [], v.unsqueeze(0)
    for i, level in enumerate(block.levels):
        if i:
            xs = block.connect(xs)
        gates.append(level.bank.feature_gates(level.bank.slot_inputs(xs)))
        xs = level(xs)
    return gates


def test_home_feature_gates_start_at_one_and_stay_in_0_2() -> None:
    block = home().train()
    v = torch.randn(32, 10, generator=seeded(8))
    for g in feature_gates(block, v):
        exact(g, torch.ones_like(g))
    # a few training steps move B_i off zero; gates leave 1 but stay in (0, 2)
    opt = torch.optim.Adam(block.parameters(), lr=0.05)
    target = torch.randn(32, 6, generator=seeded(9))
    for _ in range(5):
        loss = sum(((r - target) ** 2).mean() for r in outputs(block, v))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for g in feature_gates(block, v):
        assert (g > 0).all() and (g < 2).all()
        assert (g - 1).abs().max() > 1e-3
    # random weights: still in (0, 2), spread on both sides of 1
    randomize(block, seed=10)
    for g in feature_gates(block, v):
        assert (g > 0).all() and (g < 2).all()
        assert g.min() < 0.9 and g.max() > 1.1


def test_home_flat_without_fixes_is_one_level_ple() -> None:
    torch.manual_seed(3)
    ple = PLE(10, TASKS, [8, 6], levels=1, shared_experts=2, task_experts=2).eval()
    block = home(
        hierarchy=False, expert_norm=False, feature_gate=False, self_gate=False, task_experts=2
    ).eval()
    block.load_state_dict(ple.state_dict())  # strict: the very same parameters
    v = torch.randn(8, 10, generator=seeded(11))
    for a, b in zip(outputs(block, v), outputs(ple, v)):
        exact(a, b)


def test_home_one_group_without_fixes_is_ple() -> None:
    """With one group, level 1 is a PLE level whose only "task" is the group (plus the
    shared gate) and level 2 a one-level PLE on [s ⊕ g] whose shared experts are HoME's
    shared and group experts."""
    block = home(
        task_groups={}, expert_norm=False, feature_gate=False, self_gate=False, group_experts=2
    ).eval()
    torch.manual_seed(4)
    ple1 = PLE(10, ["all"], [8, 6], levels=2, shared_experts=2, task_experts=2).eval()
    ple2 = PLE(12, TASKS, [8, 6], levels=1, shared_experts=2 + 2, task_experts=1).eval()
    block.levels[0].load_state_dict(ple1.levels[0].state_dict())
    block.levels[1].load_state_dict(ple2.levels[0].state_dict())
    v = torch.randn(8, 10, generator=seeded(12))
    group, shared = ple1.levels[0](v.unsqueeze(0))
    expected = outputs(ple2, torch.cat([shared, group], 1))
    for a, b in zip(outputs(block, v), expected):
        exact(a, b)


def test_home_rejects_bad_groups_and_gates_without_experts() -> None:
    with pytest.raises(ValueError, match="already in group"):
        resolve_groups(TASKS, {"a": ["click", "like"], "b": ["like", "share", "follow"]})
    with pytest.raises(ValueError, match=r"tasks \['follow'\] are in no group"):
        resolve_groups(TASKS, {"a": ["click", "like", "share"]})
    with pytest.raises(ValueError, match="unknown task 'clik'"):
        resolve_groups(TASKS, {"a": ["clik"]})
    with pytest.raises(ValueError, match="shared_experts \\+ group_experts"):
        home(shared_experts=0, group_experts=0)


# ----------------------------------------------------------------------- diagnostics


def check_diagnostics(diag: dict, tasks: list[str], shared: list[str]) -> None:
    assert set(diag) == {"experts", "gates", "shared_usage"}
    for name, e in diag["experts"].items():
        assert 0.0 <= e["dead_fraction"] <= 1.0, name
    for task in tasks:
        assert f"task:{task}" in diag["gates"]
    for name, g in diag["gates"].items():
        assert set(g) == {"experts", "mean_weight", "entropy"}
        assert len(g["experts"]) == len(g["mean_weight"]) >= 1
        assert set(g["experts"]) <= set(diag["experts"]), name
        if not name.startswith("self:") or len(g["experts"]) > 1:  # softmax gates
            assert sum(g["mean_weight"]) == pytest.approx(1.0, abs=1e-6), name
            assert -1e-9 <= g["entropy"] <= math.log(len(g["experts"])) + 1e-9, name
        else:  # a single σ self-gate
            assert 0 < g["mean_weight"][0] < 1 and 0 <= g["entropy"] <= math.log(2) + 1e-9
    assert set(diag["shared_usage"]) == set(shared)
    for expert, usage in diag["shared_usage"].items():
        assert set(usage) == set(tasks), expert
        assert sum(usage.values()) == pytest.approx(1.0), expert


def test_ple_and_home_diagnostics_format() -> None:
    torch.manual_seed(0)
    v = torch.randn(40, 10, generator=seeded(13))
    ple = PLE(10, TASKS, [8, 6], levels=2, shared_experts=2, task_experts=1)
    diag = ple.eval().diagnostics(v, [])
    check_diagnostics(diag, TASKS, ["L2.shared.0", "L2.shared.1"])
    assert diag["gates"]["L1:shared"]["experts"] == [
        "L1.shared.0",
        "L1.shared.1",
        *[f"L1.task:{t}.0" for t in TASKS],
    ]
    assert len(diag["experts"]) == 2 * (2 + 4)
    block = home(task_experts=2).train()
    before = {k: val.clone() for k, val in block.state_dict().items()}
    diag = block.diagnostics(v, [])
    check_diagnostics(diag, TASKS, ["L2.shared.0", "L2.shared.1"])
    assert block.training  # runs in the block's mode and leaves it there
    assert diag["gates"]["task:click"]["experts"] == [
        "L2.task:click.0",
        "L2.task:click.1",
        "L2.shared.0",
        "L2.shared.1",
        "L2.group:engage_a.0",
    ]
    assert diag["gates"]["self:task:click"]["experts"] == ["L2.task:click.0", "L2.task:click.1"]
    assert "self:L1:group:engage_a" in diag["gates"] and "L1:shared" in diag["gates"]
    # the level-2 shared expert is one expert over both groups' slots
    assert sum(n.startswith("L2.shared") for n in diag["experts"]) == 2
    # Swish has no exact zeros: nothing is dead at init (ReLU experts would be ~half dead)
    assert max(e["dead_fraction"] for e in diag["experts"].values()) < 0.05
    # no gradients, and BatchNorm's running statistics are left as they were
    assert all(p.grad is None for p in block.parameters())
    after = block.state_dict()
    assert set(before) == set(after) and any("running_mean" in k for k in after)
    for k in before:
        exact(after[k], before[k])
    flat = home(hierarchy=False).eval().diagnostics(v, [])
    check_diagnostics(flat, TASKS, ["L1.shared.0", "L1.shared.1"])


def test_mmoe_and_shared_bottom_diagnostics() -> None:
    torch.manual_seed(0)
    v = torch.randn(50, 10, generator=seeded(14))
    mmoe = MMoE(10, 2, 3, [8, 6], task_names=["ctr", "cvr"]).eval()
    diag = mmoe.diagnostics(v, [])
    names = ["expert0", "expert1", "expert2"]
    check_diagnostics(diag, ["ctr", "cvr"], names)
    gates = mmoe.gates(v)
    assert diag["gates"]["task:cvr"]["mean_weight"] == pytest.approx(gates[:, 1].mean(0).tolist())
    # dead fraction of expert 0 from an explicit forward of its layers
    w, b = mmoe.input_layer.weight[:8], mmoe.input_layer.bias[:8]
    deep = mmoe.deep_layers[0]
    h = torch.relu(torch.relu(v @ w.t() + b) @ deep.weight[0] + deep.bias[0])
    dead = float((h.abs() <= DEAD_EPS).float().mean())
    assert diag["experts"]["expert0"]["dead_fraction"] == pytest.approx(dead)
    assert MMoE(10, 2, 3, [8, 6]).task_names == ["task0", "task1"]
    with pytest.raises(ValueError, match="3 task names for 2 tasks"):
        MMoE(10, 2, 3, [8, 6], task_names=["a", "b", "c"])
    bottom = SharedBottom(10, 2, [8, 6]).eval().diagnostics(v, [])
    assert set(bottom["experts"]) == {"bottom"} and bottom["gates"] == {}


# ------------------------------------------------------------------- end-to-end models


@pytest.fixture(scope="module")
def data4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Planted data with the default preset's 4 tasks in 2 groups (small)."""
    return make_small_data(tmp_path_factory.mktemp("ple_home") / "data", rows=2000, num_tasks=4)


MODELS = {
    "ple": {"multitask": {"type": "ple", "ple": {"levels": 2, "shared_experts": 1}}},
    "home": {
        "multitask": {"type": "home", "home": {"task_groups": GROUPS, "feature_gate_rank": 2}}
    },
}
AUTOINT = {"interaction": {"type": "autoint", "layers": 2, "attention_dim": 8, "heads": 2}}


def config(data: Path, tmp: Path, block: str, autoint: bool = False) -> ExperimentConfig:
    model = copy.deepcopy(MODELS[block])
    if autoint:
        model.update(AUTOINT)
    return small_config(data, tmp, model=model)


@pytest.mark.parametrize("autoint", [False, True])
@pytest.mark.parametrize("block", ["ple", "home"])
def test_model_builds_and_scripts(data4: Path, tmp_path: Path, block: str, autoint: bool) -> None:
    cfg = config(data4, tmp_path, block, autoint)
    assert cfg.task_names == TASKS
    spec = fitted_spec(cfg)
    batch = first_batch(cfg, spec, rows=32)
    torch.manual_seed(0)
    model = build_model(cfg, spec)
    assert isinstance(model.block, StackedLevels)
    assert model.block.task_names == TASKS
    torch.manual_seed(0)
    twin = build_model(cfg, spec).state_dict()  # same seed, same weights
    for k, value in model.state_dict().items():
        exact(twin[k], value)
    model.train()
    _, aux = model.forward_with_aux(batch.sparse, batch.dense)  # BN batch statistics
    assert aux == {}  # no auxiliary loss
    model.eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        eager = model(batch.sparse, batch.dense)
        exact(scripted(batch.sparse, batch.dense), eager)
    assert eager.shape == (32, 4) and torch.isfinite(eager).all()
    assert eager.std(0).min() > 0
    v, tokens = model.block_inputs(batch.sparse, batch.dense, {})
    check_diagnostics(model.block.diagnostics(v, tokens), TASKS, model.block.usage_experts)


def test_mmoe_registry_passes_task_names(data4: Path, tmp_path: Path) -> None:
    cfg = small_config(data4, tmp_path)
    model = build_model(cfg, fitted_spec(cfg))
    assert isinstance(model.block, MMoE) and model.block.task_names == TASKS


def test_home_config_needs_an_expert_per_gate(data4: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shared_experts \\+ group_experts must be >= 1"):
        small_config(
            data4,
            tmp_path,
            model=MODELS["home"],
            overrides=[
                "model.multitask.home.shared_experts=0",
                "model.multitask.home.group_experts=0",
            ],
        )


@pytest.mark.parametrize("block", ["ple", "home"])
def test_short_training_lowers_the_loss(data4: Path, tmp_path: Path, block: str) -> None:
    cfg = config(data4, tmp_path, block)
    spec = fitted_spec(cfg)
    chunk = load_encoded(spec, cfg.dataset.train, cfg.dataset.chunk_rows)
    probe = next(iter_batches(chunk, spec, 512))
    step = TrainStep(cfg, spec)
    before = eval_loss(step.model, probe, [1.0] * 4)
    for epoch in range(3):
        for batch in iter_batches(chunk, spec, 128, shuffle=True, seed=epoch):
            assert torch.isfinite(step.step(batch))
    after = eval_loss(step.model, probe, [1.0] * 4)
    print(f"{block}: probe loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)
