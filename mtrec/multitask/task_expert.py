"""TaskExpert (Ye & Xu, ICCV 2023, arXiv 2307.15324), adapted to field tokens.

At each layer l, n experts decompose the field tokens X^l (B x F x d_l) into task-generic
features, and every task gathers them per token together with its own feature memory::

    E_i(X)  = GELU(LN(X W_i + b_i))                      (n experts, own LN affine each)
    g_t     = softmax(X W_g,t + b_g,t)                    (per token, over n + 1 slots)
    F_t^l   = Σ_i g_t,i E_i(X^l) + g_t,n+1 M_t^{l-1}      (slot n + 1: the task's memory)
    M_t^l   = F_t^l                   (memory: replace)
    M_t^l   = M_t^{l-1} + F_t^l       (memory: residual)
    M_t^0   = X⁰ P_t + c_t            (a per-task linear projection of the field tokens)

Task t's head reads ``flatten(M_t^L)`` (F · h wide, h the expert width).

Choices the paper leaves open (ours):

* **Which tokens each layer reads.** In the paper the experts decompose the *backbone's*
  features at several depths and never write back into the backbone. Here the backbone
  is AutoInt: with ``model.interaction.type: autoint`` there is one TaskExpert layer per
  interacting layer, layer l reading X^l (``task_expert.layers`` is then ignored).
  Without an interaction there is no deeper backbone feature, so each of the
  ``task_expert.layers`` layers reads X⁰ again with its own experts and gates; depth
  then comes from the memory recursion alone.
* **Expert width** h = ``task_expert.expert_dim`` (0: the width of the tokens the last
  layer reads), the same at every layer so the memory can be mixed in.
* **Head.** ``flatten(M_t^L)`` goes through a per-task MLP of widths ``expert_hidden``
  (activation and dropout after each layer, batched over tasks), so ``out_features`` is
  ``expert_hidden[-1]`` rather than F · h.
* The per-token mixing is one batched matmul over (B, F) tokens. Experts and gates are
  two GEMMs rather than one split GEMM, and the gate softmax is written out: both keep
  tensors contiguous and made a layer's training step 1.4x faster on CPU (measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import torch
from torch import nn

from mtrec.config.schema import MultiTaskConfig, num
from mtrec.multitask.base import BlockInputs
from mtrec.multitask.diagnostics import Diagnostics, dead_fraction, gate_summary, shared_usage
from mtrec.multitask.registry import register_block
from mtrec.nn.layers import FastDropout, GroupedLinear, activation

__all__ = ["TaskExpert", "TaskExpertConfig", "TaskExpertLayer", "build"]


@dataclass
class TaskExpertConfig:
    """TaskExpert (Ye & Xu 2023) over field tokens: ``num_experts`` experts per layer,
    per-task per-token gates over experts + the task's feature memory. With AutoInt there
    is one layer per interacting layer (reading its output) and ``layers`` is ignored;
    without, ``layers`` layers each read the field tokens. Each task's head is a per-task
    MLP of ``expert_hidden`` widths on its flattened final memory."""

    # expert layers without AutoInt (with it: one per AutoInt layer)
    layers: int = num(2, gt=0)
    # n, experts per layer
    num_experts: int = num(4, gt=0)
    # width of every expert and of the memory (0: the width of the last tokens read)
    expert_dim: int = num(0, ge=0)
    # memory write: replace (M_t^l = F_t^l) or residual (M_t^l = M_t^{l-1} + F_t^l)
    memory: Literal["replace", "residual"] = "replace"


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, written out: over a handful of slots ``torch.softmax`` is
    3.5x slower on CPU (measured, forward + backward, B·F·T rows of 5). The max is a
    constant shift (softmax ignores it), so it needs no gradient."""
    e = torch.exp(logits - logits.amax(-1, keepdim=True).detach())
    return e / e.sum(-1, keepdim=True)


class TaskExpertLayer(nn.Module):
    """One layer: n experts over the tokens and T per-token gates over experts + memory.

    Shapes: X B x F x in_dim and memory B x F x T x h → (every task's F_t: B x F x T x h,
    expert outputs B x F x n x h, gates B x F x T x (n + 1)).

    ``experts`` is ``Linear(in_dim, n·h)``: output columns ``[i·h, (i+1)·h)`` are expert
    i's W_i; ``gate`` is ``Linear(in_dim, T·(n+1))``: task t's n + 1 logits are columns
    ``[t·(n+1), (t+1)·(n+1))``, the last of them the memory slot.

    Example::

        layer = TaskExpertLayer(8, width=6, num_experts=3, num_tasks=2)
        f, e, g = layer(torch.randn(4, 5, 8), torch.randn(4, 5, 2, 6))
        f.shape, e.shape, g.shape  # (4, 5, 2, 6), (4, 5, 3, 6), (4, 5, 2, 4)
    """

    def __init__(
        self, in_dim: int, width: int, num_experts: int, num_tasks: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.width = width
        self.num_experts = num_experts
        self.num_tasks = num_tasks
        self.experts = nn.Linear(in_dim, num_experts * width)
        self.gate = nn.Linear(in_dim, num_tasks * (num_experts + 1))
        # per-expert LayerNorm affine (LN statistics are taken over each expert's h outputs)
        self.norm_weight = nn.Parameter(torch.ones(num_experts, width))
        self.norm_bias = nn.Parameter(torch.zeros(num_experts, width))
        self.act = nn.GELU()
        self.dropout = FastDropout(dropout)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, f = x.shape[0], x.shape[1]
        n, t, h = self.num_experts, self.num_tasks, self.width
        e = nn.functional.layer_norm(self.experts(x).view(b, f, n, h), [h])
        # per-expert LN affine in one pass (addcmul: bias + e · weight)
        e = self.dropout(self.act(torch.addcmul(self.norm_bias, e, self.norm_weight)))
        gates = _softmax(self.gate(x).view(b, f, t, n + 1))
        # per token: (T x n) @ (n x h) mixes the experts for every task at once
        mixed = torch.matmul(gates[..., :n], e) + gates[..., n:] * memory
        return mixed, e, gates


class TaskExpert(nn.Module):
    """Per-layer experts over field tokens with a per-task feature memory across layers.

    Shapes: ``tokens`` [X⁰ B x F x d, X¹..X^L] → T tensors of B x ``hidden[-1]``
    (``v`` and ``aux`` unused). See the module docstring for the formulas.

    Args:
        field_names: the F fields in token order.
        task_names: the T tasks.
        token_dims: widths of X⁰..X^L as the block will receive them.
        num_layers: layers when there is no interaction (``len(token_dims) == 1``), each
            reading X⁰; with interaction layers, one layer per X^l and this is ignored.
        num_experts: n experts per layer.
        width: h, expert and memory width (0: ``token_dims[-1]``).
        memory: "replace" (M^l = F^l) or "residual" (M^l = M^{l-1} + F^l).
        hidden: per-task head MLP widths on flatten(M_t^L); the last is ``out_features``.
        act: activation of the head MLP.
        dropout: dropout on expert outputs and after each head layer.

    Example::

        block = TaskExpert(["a", "b", "c"], ["click", "buy"], token_dims=[8],
                           num_layers=2, num_experts=3, width=6, hidden=[16])
        [r.shape for r in block(torch.empty(0), [torch.randn(4, 3, 8)], {})]
        # [torch.Size([4, 16])] * 2
    """

    def __init__(
        self,
        field_names: list[str],
        task_names: list[str],
        token_dims: list[int],
        num_layers: int,
        num_experts: int,
        width: int = 0,
        memory: str = "replace",
        hidden: list[int] | None = None,
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if memory not in ("replace", "residual"):
            raise ValueError(f"memory must be 'replace' or 'residual', got {memory!r}")
        if not hidden:
            raise ValueError("hidden needs at least one width")
        num_fields, num_tasks = len(field_names), len(task_names)
        # with interaction outputs, layer l reads X^l; without, every layer reads X⁰
        self.reads_interaction = len(token_dims) > 1
        in_dims = token_dims[1:] if self.reads_interaction else [token_dims[0]] * num_layers
        width = width or in_dims[-1]
        self.field_names = list(field_names)
        self.task_names = list(task_names)
        self.num_fields = num_fields
        self.num_tasks = num_tasks
        self.num_token_inputs = len(token_dims)
        self.width = width
        self.residual_memory = memory == "residual"
        self.out_features = hidden[-1]
        self.memory_init = nn.Linear(token_dims[0], num_tasks * width)
        self.layers = nn.ModuleList(
            [TaskExpertLayer(d, width, num_experts, num_tasks, dropout) for d in in_dims]
        )
        widths = [num_fields * width, *hidden]
        self.head = nn.ModuleList([GroupedLinear(num_tasks, a, b) for a, b in pairwise(widths)])
        self.act = activation(act)
        self.dropout = FastDropout(dropout)

    @torch.jit.export
    def run_layers(
        self, tokens: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """→ (final memory M^L: B x F x T x h, each layer's expert outputs B x F x n x h,
        each layer's gates B x F x T x (n + 1))."""
        if len(tokens) != self.num_token_inputs:
            raise ValueError(
                "TaskExpert was built for "
                + str(self.num_token_inputs)
                + " token tensors (X⁰ and one per interaction layer) but got "
                + str(len(tokens))
            )
        x0 = tokens[0]
        b, f = x0.shape[0], x0.shape[1]
        memory = self.memory_init(x0).view(b, f, self.num_tasks, self.width)
        experts: list[torch.Tensor] = []
        gates: list[torch.Tensor] = []
        for depth, layer in enumerate(self.layers):
            x = tokens[depth + 1] if self.reads_interaction else x0
            mixed, e, g = layer(x, memory)
            memory = memory + mixed if self.residual_memory else mixed
            experts.append(e)
            gates.append(g)
        return memory, experts, gates

    def forward(
        self, v: torch.Tensor, tokens: list[torch.Tensor], aux: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        memory = self.run_layers(tokens)[0]
        b = memory.shape[0]
        # B x F x T x h → T x B x (F·h): task t's flatten(M_t^L), all tasks batched
        h = memory.permute(2, 0, 1, 3).reshape(self.num_tasks, b, self.num_fields * self.width)
        for layer in self.head:
            h = self.dropout(self.act(layer(h)))
        return [h[t] for t in range(self.num_tasks)]

    @torch.jit.ignore
    def diagnostics(self, v: torch.Tensor, tokens: list[torch.Tensor]) -> Diagnostics:
        """Experts ``l<layer>.e<i>`` (layers from 1); gate ``task:<name>`` is the last
        layer's (mean over tokens and batch, slots: its experts then ``memory``), earlier
        layers' are ``l<layer>.task:<name>``. Every expert is shared by all tasks; the
        memory slot is task-specific and not in ``shared_usage``."""
        with torch.no_grad():
            _, experts, gates = self.run_layers(tokens)
        report: dict[str, dict[str, float]] = {}
        gate_report: dict[str, dict[str, Any]] = {}
        last = len(experts)
        for depth, (e, g) in enumerate(zip(experts, gates), start=1):
            names = [f"l{depth}.e{i}" for i in range(e.shape[2])]
            for i, name in enumerate(names):
                report[name] = {"dead_fraction": dead_fraction(e[:, :, i])}
            prefix = "" if depth == last else f"l{depth}."
            for t, task in enumerate(self.task_names):
                gate_report[f"{prefix}task:{task}"] = gate_summary(g[:, :, t], [*names, "memory"])
        shared = [f"l{last}.e{i}" for i in range(experts[-1].shape[2])]
        return {
            "experts": report,
            "gates": gate_report,
            "shared_usage": shared_usage(gate_report, shared),
        }


@register_block("task_expert", config=TaskExpertConfig)
def build(inputs: BlockInputs, cfg: MultiTaskConfig) -> TaskExpert:
    """TaskExpert for the fields, tasks and token widths of ``inputs``
    (``model.multitask.task_expert``)."""
    te = cfg.task_expert
    return TaskExpert(
        inputs.field_names,
        inputs.task_names,
        inputs.token_dims,
        te.layers,
        te.num_experts,
        te.expert_dim,
        te.memory,
        cfg.expert_hidden,
        cfg.activation,
        cfg.dropout,
    )
