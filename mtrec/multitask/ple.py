"""PLE: Progressive Layered Extraction (Tang et al., RecSys 2020) — CGC stacked L levels.

Each level k has ``shared_experts`` shared experts and ``task_experts`` experts per task::

    task gate t:  f_t^k = Σ_i softmax(W_t^k x_t^k)_i E_i(x_t^k)   over [task-t, shared] experts
    shared gate:  f_s^k = Σ_i softmax(W_s^k x_s^k)_i E_i(·)       over ALL experts of level k

Task-t experts read ``x_t^k`` and shared experts read ``x_s^k``; at level 1 every input is
v, at level k > 1 ``x_t^k = f_t^{k-1}`` and ``x_s^k = f_s^{k-1}``. The shared gate mixes
every expert of its level (task experts included), as in the paper — a frequent bug is a
shared gate over the shared experts only. The last level needs no shared gate; its T task
gates are the task representations.

The generic pieces (expert banks, gates, levels) live in :mod:`mtrec.multitask.experts`,
shared with HoME (:mod:`mtrec.multitask.home`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtrec.config.schema import MultiTaskConfig, num
from mtrec.multitask.base import BlockInputs
from mtrec.multitask.experts import StackedLevels, cgc_level
from mtrec.multitask.registry import register_block

__all__ = ["PLE", "PLEConfig", "build"]


@dataclass
class PLEConfig:
    """PLE (CGC stacked ``levels`` times): per level, ``shared_experts`` shared experts and
    ``task_experts`` experts per task; task gates mix own + shared experts, the shared
    gate mixes all experts (not needed on the last level)."""

    # CGC levels stacked
    levels: int = num(2, gt=0)
    # shared experts per level
    shared_experts: int = num(2, ge=0)
    # experts per task per level
    task_experts: int = num(1, gt=0)


class PLE(StackedLevels):
    """Progressive Layered Extraction: CGC stacked ``levels`` times (see the module doc).

    Args:
        in_features: |v|.
        task_names: the T tasks (gate names ``task:<name>`` in the diagnostics).
        expert_hidden: expert MLP widths; the last is the task representation size.
        levels: L ≥ 1.
        shared_experts: shared experts per level (0: none, and no shared gates).
        task_experts: experts per task per level (≥ 1).
        act: expert activation.
        dropout: dropout after each expert layer.

    Shapes: B x |v| → T tensors of B x expert_hidden[-1].

    Level k's bank holds slots ``[shared..., task 0..., task 1..., ...]``; its gates are
    ``[task 0, ..., task T-1, shared]`` (no shared gate on the last level), task t's gate
    mixing ``[task-t..., shared...]``.

    Example::

        block = PLE(64, ["ctr", "cvr"], [32, 16], levels=2, shared_experts=2, task_experts=1)
        [r.shape for r in block(torch.randn(8, 64), [], {})]  # [torch.Size([8, 16])] * 2
    """

    def __init__(
        self,
        in_features: int,
        task_names: list[str],
        expert_hidden: list[int],
        levels: int = 2,
        shared_experts: int = 2,
        task_experts: int = 1,
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        if levels < 1 or task_experts < 1 or shared_experts < 0:
            raise ValueError(
                "PLE needs levels >= 1, task_experts >= 1 and shared_experts >= 0, got "
                f"{levels}, {task_experts}, {shared_experts}"
            )
        built = [
            cgc_level(
                in_features if k == 0 else expert_hidden[-1],
                task_names,
                expert_hidden,
                shared_experts,
                task_experts,
                first=k == 0,
                last=k == levels - 1,
                prefix=f"L{k + 1}",
                act=act,
                dropout=dropout,
            )
            for k in range(levels)
        ]
        super().__init__(built, task_names, expert_hidden[-1])
        self.usage_experts = [f"L{levels}.shared.{j}" for j in range(shared_experts)]


@register_block("ple", config=PLEConfig)
def build(inputs: BlockInputs, cfg: MultiTaskConfig) -> PLE:
    """``model.multitask.type: ple``; settings under ``model.multitask.ple``."""
    return PLE(
        inputs.in_features,
        list(inputs.task_names),
        list(cfg.expert_hidden),
        levels=cfg.ple.levels,
        shared_experts=cfg.ple.shared_experts,
        task_experts=cfg.ple.task_experts,
        act=cfg.activation,
        dropout=cfg.dropout,
    )
