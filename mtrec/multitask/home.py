"""HoME: Hierarchy of Multi-Gate Experts (Wang et al., Kuaishou 2024, arXiv 2408.05430).

HoME is a two-level PLE-like block with three fixes for what goes wrong with MMoE / PLE
at scale, each of which can be switched off (``model.multitask.home``):

1. **Expert normalisation** (expert collapse): ``E_i(x) = Swish(BN(MLP_i(x)))`` — every
   expert's output has the same batch statistics, so gates compare like with like
   (batch statistics in training, running statistics at inference).
2. **Hierarchy mask** (expert degradation): tasks are grouped a priori
   (``task_groups``, e.g. watch-time vs interaction tasks; empty: one group)::

       level 1 (on v):   g_c = Σ softmax(W_c v)  · [shared, group-c experts]   per group c
                         s   = Σ softmax(W_s v)  · [all level-1 experts]
       level 2 (on x_c = [s ⊕ g_c], per task t of group c):
                         f_t = Σ softmax(W_t x_c) · [task-t, shared, group-c experts]

   Level-2 shared experts share their weights across groups but run on each group's own
   input x_c. Experts of another group never enter task t's gate (another group's
   level-1 experts reach task t only through s, which mixes all level-1 experts by
   design). Off: one flat CGC level over all tasks (shared + task experts on v).
3. **Feature-gate and self-gate** (expert underfitting):

   * each expert reads its own view of its input, ``x_i = x ⊙ 2σ(x B_i A_i)`` (rank-l
     LoRA-style factors, B_i = 0 at init: the gate starts at exactly 1, range (0, 2));
   * a node's own experts (group-c experts for g_c, shared experts for s, task-t experts
     for f_t) get a second, residual gate added to the main mix: σ(w·x) for one own
     expert, softmax over several.

There is no auxiliary loss. With every fix off, HoME is PLE: the flat ablation is exactly a
one-level PLE, and with one group level 1 is a PLE level whose only "task" is the group,
level 2 a one-level PLE on [s ⊕ g] whose shared experts are the shared and group experts
(same layouts, so the weights load across; ``tests/test_ple_home.py`` checks both).

Choices the paper leaves open (ours): BN + Swish on each expert's output layer only
(hidden layers use ``activation``); BatchNorm statistics per (slot, unit), so a shared
level-2 expert keeps separate statistics per group input; feature gates on every expert
of both levels (gates themselves read the ungated input); gates at level 2 read x_c.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mtrec.config.errors import ConfigError
from mtrec.config.schema import MultiTaskConfig, num
from mtrec.multitask.base import BlockInputs
from mtrec.multitask.experts import ExpertBank, ExpertLevel, GateNode, StackedLevels, cgc_level
from mtrec.multitask.registry import register_block

if TYPE_CHECKING:
    from mtrec.config.schema import ExperimentConfig

__all__ = ["HoME", "HoMEConfig", "build", "hierarchy_level2", "resolve_groups"]


@dataclass
class HoMEConfig:
    """HoME (Wang et al. 2024). ``task_groups`` maps a group (meta-category) name to its
    tasks; every task in exactly one group (empty: one group of all tasks). Each fix can
    be switched off for ablation."""

    # group (meta-category) name -> its tasks; empty: one group
    task_groups: dict[str, list[str]] = field(default_factory=dict)
    # shared experts per level
    shared_experts: int = num(1, ge=0)
    # experts per group (level 1 and 2)
    group_experts: int = num(1, ge=0)
    # experts per task (level 2)
    task_experts: int = num(1, ge=0)
    # expert normalisation: Swish(BatchNorm(MLP(v)))
    expert_norm: bool = True
    # two-level hierarchy mask (off: one flat CGC level over all tasks)
    hierarchy: bool = True
    # per-expert LoRA-style feature gate v * 2σ(v B A), rank feature_gate_rank
    feature_gate: bool = True
    # rank l of the feature gates' B A
    feature_gate_rank: int = num(8, gt=0)
    # residual self-gate over a node's own experts
    self_gate: bool = True

    def check(self, cfg: ExperimentConfig) -> None:
        """Rules across keys, run when ``type: home`` is selected."""
        # every gate needs an expert (level-1 group gates with the hierarchy, task gates
        # without it)
        own_key = "group_experts" if self.hierarchy else "task_experts"
        if self.shared_experts + getattr(self, own_key) < 1:
            raise ConfigError(
                f"model.multitask.home: shared_experts + {own_key} must be >= 1 "
                f"(hierarchy: {str(self.hierarchy).lower()}); raise one of them"
            )
        try:
            resolve_groups(cfg.task_names, self.task_groups)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def resolve_groups(
    task_names: list[str], task_groups: dict[str, list[str]] | None
) -> list[tuple[str, list[int]]]:
    """``{group: [task, ...]}`` → ``[(group, [task index, ...]), ...]`` in config order;
    empty or None: one group ``all`` of every task. Every task must be in exactly one
    group."""
    if not task_groups:
        return [("all", list(range(len(task_names))))]
    key = "model.multitask.home.task_groups"
    owner: dict[str, str] = {}
    groups: list[tuple[str, list[int]]] = []
    for group, members in task_groups.items():
        if not members:
            raise ValueError(f"{key}.{group}: a group needs at least one task")
        for name in members:
            if name not in task_names:
                raise ValueError(f"{key}.{group}: unknown task {name!r} (tasks: {task_names})")
            if name in owner:
                raise ValueError(
                    f"{key}.{group}: task {name!r} is already in group {owner[name]!r}"
                )
            owner[name] = group
        groups.append((group, [task_names.index(n) for n in members]))
    left = [t for t in task_names if t not in owner]
    if left:
        raise ValueError(f"{key}: tasks {left} are in no group; add them to a group")
    return groups


def hierarchy_level2(
    in_features: int,
    task_names: list[str],
    groups: list[tuple[str, list[int]]],
    expert_hidden: list[int],
    shared_experts: int,
    group_experts: int,
    task_experts: int,
    act: str = "relu",
    dropout: float = 0.0,
    norm: bool = False,
    feature_gate_rank: int = 0,
    self_gate: bool = False,
) -> ExpertLevel:
    """HoME's level 2 on G group inputs x_c (G x B x in).

    Experts ``[shared..., group 0..., group 1..., task 0..., task 1..., ...]``; slots
    ``[shared on x_0..., shared on x_1..., ..., group c on x_c..., task t on x_c(t)...]``;
    one gate per task (task order) mixing ``[task-t..., shared on x_c..., group-c...]``.
    With one group the layout is exactly :func:`cgc_level`'s last level with
    ``shared + group`` shared experts.
    """
    g_count = len(groups)
    group_of = [0] * len(task_names)
    for c, (_, members) in enumerate(groups):
        for t in members:
            group_of[t] = c
    slot_expert: list[int] = []
    slot_input: list[int] = []
    names: list[str] = []
    shared_slots: list[list[int]] = []
    for c in range(g_count):
        shared_slots.append(list(range(len(slot_expert), len(slot_expert) + shared_experts)))
        slot_expert += list(range(shared_experts))
        slot_input += [c] * shared_experts
        names += [f"L2.shared.{j}" for j in range(shared_experts)]
    group_slots: list[list[int]] = []
    for c, (group, _) in enumerate(groups):
        group_slots.append(list(range(len(slot_expert), len(slot_expert) + group_experts)))
        first = shared_experts + c * group_experts
        slot_expert += list(range(first, first + group_experts))
        slot_input += [c] * group_experts
        names += [f"L2.group:{group}.{j}" for j in range(group_experts)]
    task_slots: list[list[int]] = []
    for t, task in enumerate(task_names):
        task_slots.append(list(range(len(slot_expert), len(slot_expert) + task_experts)))
        first = shared_experts + g_count * group_experts + t * task_experts
        slot_expert += list(range(first, first + task_experts))
        slot_input += [group_of[t]] * task_experts
        names += [f"L2.task:{task}.{j}" for j in range(task_experts)]
    bank = ExpertBank(
        in_features,
        expert_hidden,
        slot_expert,
        slot_input,
        act,
        dropout,
        norm,
        feature_gate_rank,
    )
    gates = [
        GateNode(
            in_features,
            task_slots[t] + shared_slots[group_of[t]] + group_slots[group_of[t]],
            task_slots[t] if self_gate else [],
            group_of[t],
            f"task:{task}",
        )
        for t, task in enumerate(task_names)
    ]
    return ExpertLevel(bank, gates, names)


class HoME(StackedLevels):
    """Hierarchy of multi-gate experts (see the module docstring for the computation).

    Args:
        in_features: |v|.
        task_names: the T tasks.
        expert_hidden: expert MLP widths; the last (d) is the task representation size.
        task_groups: ``{group: [task, ...]}``, every task in exactly one group (empty: one).
        shared_experts / group_experts / task_experts: experts per level of each kind.
        expert_norm: ``Swish(BN(·))`` on expert outputs.
        hierarchy: two levels with the group mask (off: one flat CGC level; group experts
            are then unused).
        feature_gate: per-expert feature gates of rank ``feature_gate_rank``.
        self_gate: residual self-gates over each node's own experts.
        act: activation of expert hidden layers (and outputs without ``expert_norm``).
        dropout: dropout after each expert layer.

    Shapes: B x |v| → T tensors of B x d. Level 1 outputs ``[g_0, ..., g_{G-1}, s]``;
    level 2 reads G x B x 2d, ``x_c = [s ⊕ g_c]``.

    Example::

        block = HoME(64, ["click", "like", "share"], [32, 16],
                     task_groups={"a": ["click", "like"], "b": ["share"]})
        [r.shape for r in block(torch.randn(8, 64), [], {})]  # [torch.Size([8, 16])] * 3
    """

    def __init__(
        self,
        in_features: int,
        task_names: list[str],
        expert_hidden: list[int],
        task_groups: dict[str, list[str]] | None = None,
        shared_experts: int = 1,
        group_experts: int = 1,
        task_experts: int = 1,
        expert_norm: bool = True,
        hierarchy: bool = True,
        feature_gate: bool = True,
        feature_gate_rank: int = 8,
        self_gate: bool = True,
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        if min(shared_experts, group_experts, task_experts) < 0:
            raise ValueError("HoME expert counts must be >= 0")
        if hierarchy and shared_experts + group_experts == 0:
            raise ValueError(
                "model.multitask.home: with hierarchy on, a group's level-1 gate needs "
                "shared_experts + group_experts >= 1"
            )
        if not hierarchy and shared_experts + task_experts == 0:
            raise ValueError(
                "model.multitask.home: with hierarchy off, a task's gate needs "
                "shared_experts + task_experts >= 1"
            )
        if feature_gate and feature_gate_rank < 1:
            raise ValueError(f"feature_gate_rank must be >= 1, got {feature_gate_rank}")
        groups = resolve_groups(list(task_names), task_groups)
        common = {
            "act": act,
            "dropout": dropout,
            "norm": expert_norm,
            "feature_gate_rank": feature_gate_rank if feature_gate else 0,
            "self_gate": self_gate,
        }
        d = expert_hidden[-1]
        if hierarchy:
            levels = [
                cgc_level(
                    in_features,
                    [name for name, _ in groups],
                    expert_hidden,
                    shared_experts,
                    group_experts,
                    first=True,
                    last=False,
                    prefix="L1",
                    shared_gate=True,
                    kind="group",
                    **common,
                ),
                hierarchy_level2(
                    2 * d,
                    list(task_names),
                    groups,
                    expert_hidden,
                    shared_experts,
                    group_experts,
                    task_experts,
                    **common,
                ),
            ]
        else:
            levels = [
                cgc_level(
                    in_features,
                    list(task_names),
                    expert_hidden,
                    shared_experts,
                    task_experts,
                    first=True,
                    last=True,
                    prefix="L1",
                    **common,
                )
            ]
        super().__init__(levels, task_names, d)
        self.num_groups = len(groups)
        self.group_names = [name for name, _ in groups]
        self.usage_experts = [
            f"{'L2' if hierarchy else 'L1'}.shared.{j}" for j in range(shared_experts)
        ]

    def connect(self, out: torch.Tensor) -> torch.Tensor:
        """Level-1 outputs ``[g_0..g_{G-1}, s]`` ((G+1) x B x d) → G x B x 2d, x_c = [s ⊕ g_c]."""
        g = self.num_groups
        shared = out[g].expand(g, out.shape[1], out.shape[2])
        return torch.cat([shared, out[:g]], dim=2)


@register_block("home", config=HoMEConfig)
def build(inputs: BlockInputs, cfg: MultiTaskConfig) -> HoME:
    """``model.multitask.type: home``; settings under ``model.multitask.home``."""
    h = cfg.home
    return HoME(
        inputs.in_features,
        list(inputs.task_names),
        list(cfg.expert_hidden),
        task_groups={k: list(v) for k, v in h.task_groups.items()},
        shared_experts=h.shared_experts,
        group_experts=h.group_experts,
        task_experts=h.task_experts,
        expert_norm=h.expert_norm,
        hierarchy=h.hierarchy,
        feature_gate=h.feature_gate,
        feature_gate_rank=h.feature_gate_rank,
        self_gate=h.self_gate,
        act=cfg.activation,
        dropout=cfg.dropout,
    )
