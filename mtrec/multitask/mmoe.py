"""MMoE (Ma et al., KDD 2018) and the shared-bottom baseline."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from mtrec.config.schema import MultiTaskConfig
from mtrec.multitask.base import BlockInputs
from mtrec.multitask.diagnostics import Diagnostics, dead_fraction, gate_summary, shared_usage
from mtrec.multitask.registry import register_block
from mtrec.nn import short_softmax
from mtrec.nn.layers import FastDropout, GroupedLinear, activation

__all__ = ["MMoE", "SharedBottom", "build_mmoe", "build_shared_bottom"]


class MMoE(nn.Module):
    """Multi-gate mixture of experts: ``f_t = Σ_i softmax(W_t v)_i E_i(v)``.

    The first layer of all E experts and the T gates is one GEMM on v (they
    share the input); deeper expert layers run as one batched matmul.

    Args:
        in_features: |v|.
        num_tasks: T.
        num_experts: E.
        expert_hidden: expert MLP widths; the last is the task representation size.
        act: expert activation.
        dropout: dropout after each expert layer.
        task_names: names of the T tasks for the diagnostics (default ``task0``, ...).

    Example::

        block = MMoE(64, num_tasks=2, num_experts=4, expert_hidden=[32, 16])
        [r.shape for r in block(torch.randn(8, 64), [], {})]  # [torch.Size([8, 16])] * 2
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_experts: int,
        expert_hidden: list[int],
        act: str = "relu",
        dropout: float = 0.0,
        task_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if task_names is not None and len(task_names) != num_tasks:
            raise ValueError(f"{len(task_names)} task names for {num_tasks} tasks")
        self.task_names = list(task_names or [f"task{t}" for t in range(num_tasks)])
        self.num_tasks = num_tasks
        self.num_experts = num_experts
        self.first_width = expert_hidden[0]
        self.out_features = expert_hidden[-1]
        self.input_layer = nn.Linear(
            in_features, num_experts * expert_hidden[0] + num_tasks * num_experts
        )
        self.deep_layers = nn.ModuleList(
            [GroupedLinear(num_experts, a, b) for a, b in pairwise(expert_hidden)]
        )
        self.act = activation(act)
        self.dropout = FastDropout(dropout)

    @torch.jit.export
    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """B x |v| → B x T x E gate weights (rows sum to 1)."""
        split = self.num_experts * self.first_width
        logits = self.input_layer(x)[:, split:]
        return short_softmax.softmax(logits.reshape(-1, self.num_tasks, self.num_experts), dim=-1)

    def forward(
        self, x: torch.Tensor, tokens: list[torch.Tensor], aux: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """B x |v| → T tensors of B x expert_hidden[-1] (tokens and aux unused)."""
        b = x.shape[0]
        # split (not slicing) keeps the backward from zero-filling two B x width buffers
        expert_in, gate_logits = self.input_layer(x).split(
            [self.num_experts * self.first_width, self.num_tasks * self.num_experts], dim=1
        )
        h = expert_in.reshape(b, self.num_experts, self.first_width).transpose(0, 1)
        h = self.dropout(self.act(h))  # E x B x h1
        for layer in self.deep_layers:
            h = self.dropout(self.act(layer(h)))
        gate = short_softmax.softmax(
            gate_logits.reshape(b, self.num_tasks, self.num_experts), dim=-1
        )
        # f_t = Σ_i g_t,i E_i: a weighted sum over E experts per task (T and E are small;
        # cheaper than B tiny T x E @ E x h matmuls)
        return [(gate[:, t].t().unsqueeze(-1) * h).sum(0) for t in range(self.num_tasks)]

    @torch.jit.ignore
    def diagnostics(self, x: torch.Tensor, tokens: list[torch.Tensor]) -> Diagnostics:
        """Expert health on one batch (see :mod:`mtrec.multitask.diagnostics`): experts
        ``expert0..``, gates ``task:<name>``; every expert is shared."""
        names = [f"expert{i}" for i in range(self.num_experts)]
        with torch.no_grad():
            b = x.shape[0]
            expert_in = self.input_layer(x)[:, : self.num_experts * self.first_width]
            h = expert_in.reshape(b, self.num_experts, self.first_width).transpose(0, 1)
            h = self.dropout(self.act(h))
            for layer in self.deep_layers:
                h = self.dropout(self.act(layer(h)))
            gate = self.gates(x)
        gates = {
            f"task:{task}": gate_summary(gate[:, t], names)
            for t, task in enumerate(self.task_names)
        }
        return {
            "experts": {n: {"dead_fraction": dead_fraction(h[i])} for i, n in enumerate(names)},
            "gates": gates,
            "shared_usage": shared_usage(gates, names),
        }


class SharedBottom(nn.Module):
    """One shared MLP whose output every task reads (the classic baseline).

    Shapes: B x |v| → T tensors of B x hidden[-1].
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        hidden: list[int],
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.out_features = hidden[-1]
        layers: list[nn.Module] = []
        for a, b in zip([in_features, *hidden[:-1]], hidden):
            layers += [nn.Linear(a, b), activation(act), FastDropout(dropout)]
        self.mlp = nn.Sequential(*layers)

    def forward(
        self, x: torch.Tensor, tokens: list[torch.Tensor], aux: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        h = self.mlp(x)
        return [h for _ in range(self.num_tasks)]

    @torch.jit.ignore
    def diagnostics(self, x: torch.Tensor, tokens: list[torch.Tensor]) -> Diagnostics:
        """Expert health on one batch: the bottom MLP is one expert (``bottom``, dead
        fraction of its output); there are no gates, so no usage shares."""
        with torch.no_grad():
            h = self.mlp(x)
        return {
            "experts": {"bottom": {"dead_fraction": dead_fraction(h)}},
            "gates": {},
            "shared_usage": {},
        }


@register_block("mmoe")
def build_mmoe(inputs: BlockInputs, cfg: MultiTaskConfig) -> MMoE:
    """``model.multitask.type: mmoe`` (the shared keys only: num_experts, expert_hidden, ...)."""
    return MMoE(
        inputs.in_features,
        inputs.num_tasks,
        cfg.num_experts,
        cfg.expert_hidden,
        cfg.activation,
        cfg.dropout,
        inputs.task_names,
    )


@register_block("shared_bottom")
def build_shared_bottom(inputs: BlockInputs, cfg: MultiTaskConfig) -> SharedBottom:
    """``model.multitask.type: shared_bottom``: one MLP of ``expert_hidden`` for all tasks."""
    return SharedBottom(
        inputs.in_features, inputs.num_tasks, cfg.expert_hidden, cfg.activation, cfg.dropout
    )
