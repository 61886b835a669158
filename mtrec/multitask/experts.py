"""Generic expert machinery shared by PLE (:mod:`mtrec.multitask.ple`) and HoME
(:mod:`mtrec.multitask.home`).

* :class:`ExpertBank` runs all experts of a level as batched matmuls over *slots* (an
  expert applied to one of the level's inputs), optionally with expert normalisation
  (BatchNorm + Swish) and per-expert feature gates;
* :class:`GateNode` mixes a subset of the slots (plus an optional residual self-gate);
* :class:`ExpertLevel` is a bank plus its gates; :class:`StackedLevels` chains levels and
  computes the expert-health diagnostics;
* :func:`cgc_level` lays out one CGC level (task + shared experts, task + shared gates).
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtrec.multitask.diagnostics import Diagnostics, dead_fraction, gate_summary, shared_usage
from mtrec.nn import short_softmax
from mtrec.nn.batch_norm import BatchNorm1d
from mtrec.nn.layers import FastDropout, GroupedLinear, activate_, activation

__all__ = ["ExpertBank", "ExpertLevel", "GateNode", "StackedLevels", "cgc_level"]


def _mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """B x e weights, e x B x d expert outputs → B x d weighted sum.

    e is small: a broadcast multiply-and-sum beats B tiny (1 x e) @ (e x d) matmuls.
    """
    return (weights.t().unsqueeze(-1) * experts).sum(0)


class ExpertBank(nn.Module):
    """P expert MLPs evaluated at S *slots*; slot s runs expert ``slot_expert[s]`` on input
    ``slot_input[s]`` of an N x B x in stack of the level's inputs.

    Shapes: N x B x in → S x B x hidden[-1].

    A slot is usually one expert on its own input (S = P); an expert listed at several
    slots shares its weights across those inputs (HoME's level-2 shared experts, one slot
    per task group). Every layer is one matmul call over all S slots: a batched matmul,
    or, when the slots share one input and have no feature gates, one GEMM against their
    weights side by side (as MMoE's first layer).

    Expert i at slot s computes, on its input x::

        x_i  = x ⊙ 2σ(x B_i A_i)                    (feature_gate_rank l > 0; else x_i = x)
        h    = act(... act(x_i W_1 + b_1) ...) W_L + b_L
        E(x) = Swish(BN(h))   (norm)   or   act(h)

    B_i (in x l) starts at zero, so every feature gate starts at exactly 1 and always lies
    in (0, 2). BatchNorm keeps statistics per slot and channel (batch statistics in
    training, running statistics in eval). Dropout follows every activation.

    Args:
        in_features: width of each input.
        hidden: expert MLP widths; the last is the output width d.
        slot_expert: expert index of each slot (every expert 0..P-1 must appear).
        slot_input: input index of each slot.
        act: activation of the hidden layers (and of the output without ``norm``).
        dropout: dropout after each activation.
        norm: expert normalisation ``Swish(BN(·))`` on the output layer.
        feature_gate_rank: rank l of the per-expert feature gates (0: none).

    Example::

        bank = ExpertBank(6, [8, 4], slot_expert=[0, 1, 0], slot_input=[0, 0, 1])
        bank(torch.randn(2, 5, 6)).shape  # torch.Size([3, 5, 4]): expert 0 runs on both inputs
    """

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        slot_expert: list[int],
        slot_input: list[int],
        act: str = "relu",
        dropout: float = 0.0,
        norm: bool = False,
        feature_gate_rank: int = 0,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("expert_hidden needs at least one width")
        if not slot_expert or len(slot_expert) != len(slot_input):
            raise ValueError("slot_expert and slot_input must be non-empty and of equal length")
        num_experts = max(slot_expert) + 1
        if sorted(set(slot_expert)) != list(range(num_experts)):
            raise ValueError(f"every expert 0..{num_experts - 1} needs a slot: {slot_expert}")
        self.num_experts = num_experts
        self.num_slots = len(slot_expert)
        self.out_features = hidden[-1]
        self.slot_expert_list = list(slot_expert)
        self.slot_input_list = list(slot_input)
        self.register_buffer("slot_expert", torch.tensor(slot_expert), persistent=False)
        self.register_buffer("slot_input", torch.tensor(slot_input), persistent=False)
        # weights are gathered per slot only when some expert serves several slots
        self.shares_weights = list(slot_expert) != list(range(num_experts))
        # every slot reads input 0 (a level on v): broadcast instead of gathering copies
        self.single_input = all(i == 0 for i in slot_input)
        self.first = GroupedLinear(num_experts, in_features, hidden[0])
        self.deep = nn.ModuleList([GroupedLinear(num_experts, a, b) for a, b in pairwise(hidden)])
        if feature_gate_rank > 0:
            # x B_i A_i: B_i = 0 makes the gate exactly 2σ(0) = 1 at init (LoRA-style);
            # A_i is random so B_i gets a gradient from the first step
            bound = 1.0 / math.sqrt(feature_gate_rank)
            self.gate_down = nn.Parameter(torch.zeros(num_experts, in_features, feature_gate_rank))
            self.gate_up = nn.Parameter(
                torch.empty(num_experts, feature_gate_rank, in_features).uniform_(-bound, bound)
            )
        else:
            self.register_parameter("gate_down", None)
            self.register_parameter("gate_up", None)
        self.norm = BatchNorm1d(self.num_slots * hidden[-1]) if norm else None
        self.act = activation(act)
        self.out_act = nn.SiLU() if norm else activation(act)
        # the same activations by name, for the in-place inference path
        self.act_name = act
        self.out_act_name = "silu" if norm else act
        self.dropout = FastDropout(dropout)

    def _per_slot(self, w: torch.Tensor) -> torch.Tensor:
        """P x ... expert parameters → S x ... (a gathered copy only if weights are shared)."""
        if self.shares_weights:
            return w.index_select(0, self.slot_expert)
        return w

    def slot_inputs(self, xs: torch.Tensor) -> torch.Tensor:
        """N x B x in level inputs → S x B x in, each slot's input; 1 x B x in (to be
        broadcast over the slots) when every slot reads input 0."""
        if self.single_input:
            return xs[:1]
        return xs.index_select(0, self.slot_input)

    def _shared_input_matmul(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """B x in @ (S x in x k per-slot weights) → S x B x k as ONE GEMM against the slots'
        weights side by side (measured 1.5x faster forward + backward than a batched
        matmul over a broadcast input; the weight copy is small)."""
        s, k = w.shape[0], w.shape[2]
        wide = w.permute(1, 0, 2).reshape(w.shape[1], s * k)
        return torch.mm(x, wide).view(x.shape[0], s, k).transpose(0, 1)

    def _gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Slot inputs (S x B x in, or 1 x B x in shared) → S x B x in logits x B_i A_i."""
        down, up = self.gate_down, self.gate_up
        if down is None or up is None:
            raise RuntimeError("this expert bank has no feature gates (feature_gate_rank 0)")
        if x.shape[0] == 1:
            low = self._shared_input_matmul(x[0], self._per_slot(down))  # S x B x l
        else:
            low = torch.bmm(x, self._per_slot(down))
        return torch.bmm(low, self._per_slot(up))

    def feature_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Slot inputs (S x B x in, or 1 x B x in shared) → S x B x in gates
        2σ(x B_i A_i) ∈ (0, 2)."""
        return 2.0 * torch.sigmoid(self._gate_logits(x))

    def pre_activation(self, xs: torch.Tensor, fold_norm: bool = False) -> torch.Tensor:
        """N x B x in → S x B x d output-layer values before BN / the last activation.

        ``fold_norm`` (inference): BN with its running statistics is a per-(slot, unit)
        affine map; folded into the output layer's weights and bias, this returns BN(h)
        at no cost per row (once per call on the weights; a frozen export folds it for
        good). Equal to :meth:`normalized` of the unfolded values up to float rounding.
        """
        x = self.slot_inputs(xs)
        alpha = 1.0  # factor of the first layer's matmul
        if self.gate_down is not None:  # S x B x in: every expert its own input view
            # x ⊙ 2σ(z) as σ(z) ⊙ x with the gates' factor 2 moved into the first layer's
            # matmul (one S x B x in product fewer, forward and backward); scaling by a
            # power of two is exact, so the values are the same
            if torch.is_grad_enabled():
                x = torch.sigmoid(self._gate_logits(x)) * x
            else:  # inference: written into the fresh logits (no S x B x in temporaries)
                x = torch.sigmoid_(self._gate_logits(x)).mul_(x)
            alpha = 2.0
        weight, bias = self._per_slot(self.first.weight), self._per_slot(self.first.bias)
        if fold_norm and len(self.deep) == 0:
            weight, bias = self._fold_norm(weight, bias)
        if x.shape[0] == 1:  # one input shared by every slot (as MMoE's first layer)
            if alpha != 1.0:
                x = x * alpha
            h = self._shared_input_matmul(x[0], weight) + bias
        else:
            # the factor on the (small) weight, not as baddbmm's alpha: alpha's backward
            # scales the S x B x in input gradient in an extra pass (2.5% of a demo step)
            h = torch.baddbmm(bias, x, weight * alpha if alpha != 1.0 else weight)
        inference = not self.training and not torch.is_grad_enabled()
        last = len(self.deep) - 1
        for i, layer in enumerate(self.deep):
            h = activate_(h, self.act_name) if inference else self.dropout(self.act(h))
            weight, bias = self._per_slot(layer.weight), self._per_slot(layer.bias)
            if fold_norm and i == last:
                weight, bias = self._fold_norm(weight, bias)
            h = torch.baddbmm(bias, h, weight)
        return h

    def _fold_norm(
        self, weight: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slot output-layer weight (S x k x d) and bias (S x 1 x d) with the eval BN
        ``y · γ / √(var + ε) + (β - mean · γ / √(var + ε))`` folded in (identity without
        ``norm``)."""
        norm = self.norm
        if norm is None:
            return weight, bias
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        scale = scale.view(self.num_slots, 1, self.out_features)
        shift = shift.view(self.num_slots, 1, self.out_features)
        return weight * scale, torch.addcmul(shift, bias, scale)

    def normalized(self, h: torch.Tensor) -> torch.Tensor:
        """S x B x d output-layer values → BN(h) (identity without ``norm``): the
        pre-Swish expert outputs."""
        norm = self.norm
        if norm is None:
            return h
        s, b, d = h.shape
        # BatchNorm1d over S·d channels: every (slot, unit) normalised over the batch
        flat = h.transpose(0, 1).reshape(b, s * d)
        if self.training and b == 1:
            # one row has no batch variance (an epoch's last batch can be a single row):
            # normalise it with the running statistics, as at inference
            flat = F.batch_norm(
                flat,
                norm.running_mean,
                norm.running_var,
                norm.weight,
                norm.bias,
                False,
                0.0,
                norm.eps,
            )
        else:
            flat = norm(flat)
        return flat.view(b, s, d).transpose(0, 1)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        if not self.training and not torch.is_grad_enabled():  # inference: BN folded, in place
            return activate_(self.pre_activation(xs, fold_norm=True), self.out_act_name)
        return self.dropout(self.out_act(self.normalized(self.pre_activation(xs))))


class GateNode(nn.Module):
    """A softmax gate over some of a level's expert slots, with an optional residual
    self-gate over the node's own slots (HoME)::

        f = Σ_i softmax(W x)_i h[members[i]] + Σ_j s_j h[own[j]]
        s = σ(W' x) (one own slot) or softmax(W' x) (several); no term when ``own`` is empty

    W and W' are one ``Linear(in, |members| + |own|)``. The gate reads the level input
    ``input_index``. Experts not in ``members`` / ``own`` are never read.

    Shapes: x B x in, h S x B x d → B x d.

    Example::

        gate = GateNode(6, members=[0, 2], own=[2], input_index=0)
        gate(torch.randn(5, 6), torch.randn(3, 5, 4)).shape  # torch.Size([5, 4])
    """

    def __init__(
        self,
        in_features: int,
        members: list[int],
        own: list[int] | None = None,
        input_index: int = 0,
        name: str = "gate",
    ) -> None:
        super().__init__()
        own = list(own or [])
        if not members:
            raise ValueError(f"gate {name!r} mixes no expert")
        self.name = name
        self.member_list = list(members)
        self.own_list = own
        self.num_members = len(members)
        self.num_own = len(own)
        self.input_index = input_index
        self.proj = nn.Linear(in_features, len(members) + len(own))
        self.register_buffer("members", torch.tensor(members), persistent=False)
        self.register_buffer("own", torch.tensor(own, dtype=torch.long), persistent=False)
        self.register_buffer("slots", torch.tensor(members + own), persistent=False)

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x in → (B x |members| softmax weights, B x |own| self-gate weights)."""
        main, own = self.proj(x).split([self.num_members, self.num_own], dim=1)
        if self.num_own == 1:
            own = torch.sigmoid(own)
        elif self.num_own > 1:
            own = short_softmax.softmax(own, dim=1)
        return short_softmax.softmax(main, dim=1), own

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if not self.training and not torch.is_grad_enabled():
            return self.mix_inference(self.logits_t(x), h)
        main, own = self.weights(x)
        out = _mix(main, h.index_select(0, self.members))
        if self.num_own > 0:
            out = out + _mix(own, h.index_select(0, self.own))
        return out

    def logits_t(self, x: torch.Tensor) -> torch.Tensor:
        """B x in → (|members| + |own|) x B gate logits, transposed (inference)."""
        return torch.addmm(self.proj.bias.unsqueeze(1), self.proj.weight, x.t())

    def mix_inference(self, logits_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` from transposed logits (inference): the softmaxes run over the
        outer dim, vectorised along B (10x faster than over a last dim of 2-4 at batch
        512); at large batches the weighted sums accumulate slot by slot into one fresh
        B x d tensor (no gathered e x B x d copy). Equal up to float rounding."""
        main = torch.softmax(logits_t[: self.num_members], dim=0)
        own = logits_t[self.num_members :]
        if self.num_own == 1:
            own = torch.sigmoid(own)
        elif self.num_own > 1:
            own = torch.softmax(own, dim=0)
        if h.shape[1] < 64:  # small batches: fewest ops (one gather, one weighted sum)
            weights = main if self.num_own == 0 else torch.cat([main, own], dim=0)
            return (weights.unsqueeze(-1) * h.index_select(0, self.slots)).sum(0)
        # large batches: accumulate slot by slot, no e x B x d temporaries
        out = h[self.member_list[0]] * main[0].unsqueeze(1)
        for i in range(1, self.num_members):
            out.addcmul_(h[self.member_list[i]], main[i].unsqueeze(1))
        for j in range(self.num_own):
            out.addcmul_(h[self.own_list[j]], own[j].unsqueeze(1))
        return out


# TorchScript cannot type an empty list attribute (a gate without a self-gate) and reads
# class annotations unevaluated (strings here): declare the types themselves
GateNode.__annotations__["member_list"] = list[int]
GateNode.__annotations__["own_list"] = list[int]


class ExpertLevel(nn.Module):
    """One level: an :class:`ExpertBank` and K :class:`GateNode` s reading its inputs.

    Shapes: N x B x in → K x B x d (gate outputs, in gate order).
    ``slot_names[s]`` names the expert at slot s (one name for all slots of a shared
    expert), for the diagnostics.
    """

    def __init__(self, bank: ExpertBank, gates: list[GateNode], slot_names: list[str]) -> None:
        super().__init__()
        if len(slot_names) != bank.num_slots:
            raise ValueError(f"{bank.num_slots} slots but {len(slot_names)} slot names")
        self.bank = bank
        self.gates = nn.ModuleList(gates)
        self.slot_names = list(slot_names)
        # every gate reads the same input (a first level): inference computes all their
        # logits in one matmul (at batch 512 one GEMM of width 10 costs what one of 3 does)
        self.one_gate_input = len({g.input_index for g in gates}) == 1

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        h = self.bank(xs)
        outs: list[torch.Tensor] = []
        if self.one_gate_input and not self.training and not torch.is_grad_enabled():
            weights: list[torch.Tensor] = []
            biases: list[torch.Tensor] = []
            for gate in self.gates:  # (a frozen export folds the concatenation)
                weights.append(gate.proj.weight)
                biases.append(gate.proj.bias)
            x = xs[self.gates[0].input_index]
            logits = torch.addmm(torch.cat(biases).unsqueeze(1), torch.cat(weights), x.t())
            start = 0
            for gate in self.gates:
                width = gate.num_members + gate.num_own
                outs.append(gate.mix_inference(logits[start : start + width], h))
                start += width
            return torch.stack(outs, dim=0)
        for gate in self.gates:
            outs.append(gate(xs[gate.input_index], h))
        return torch.stack(outs, dim=0)

    @torch.jit.ignore
    def diagnose(
        self,
        xs: torch.Tensor,
        activations: dict[str, list[torch.Tensor]],
        gates: dict[str, dict[str, Any]],
    ) -> torch.Tensor:
        """Like ``forward``; also appends each slot's activations to ``activations`` (by
        expert name) and each gate's summary to ``gates``."""
        h = self.bank(xs)
        for s, name in enumerate(self.slot_names):
            activations.setdefault(name, []).append(h[s])
        outs = []
        for gate in self.gates:
            x = xs[gate.input_index]
            main, own = gate.weights(x)
            gates[gate.name] = gate_summary(main, [self.slot_names[i] for i in gate.member_list])
            if gate.num_own > 0:
                names = [self.slot_names[i] for i in gate.own_list]
                gates[f"self:{gate.name}"] = _self_gate_summary(own, names)
            outs.append(gate(x, h))
        return torch.stack(outs, dim=0)


def _self_gate_summary(weights: torch.Tensor, experts: list[str]) -> dict[str, Any]:
    """Self-gate summary: a softmax gate as :func:`gate_summary`; a single σ gate reports
    its mean weight and the mean Bernoulli entropy of (σ, 1 - σ)."""
    if weights.shape[1] > 1:
        return gate_summary(weights, experts)
    p = weights.detach().reshape(-1).double().clamp(1e-12, 1 - 1e-12)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    return {"experts": list(experts), "mean_weight": [float(p.mean())], "entropy": float(entropy)}


class StackedLevels(nn.Module):
    """Levels run one after the other: ``xs = connect(level(xs))``, starting from v.

    Subclasses build ``self.levels`` and may override :meth:`connect` (how one level's
    K x B x d outputs become the next level's N x B x in inputs; identity by default).
    The last level's gate outputs are the T task representations. ``usage_experts`` names
    the shared experts whose per-task usage the diagnostics report.
    """

    def __init__(self, levels: list[ExpertLevel], task_names: list[str], out_features: int):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.task_names = list(task_names)
        self.num_tasks = len(task_names)
        self.out_features = out_features
        self.usage_experts: list[str] = []

    def connect(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def forward(
        self, v: torch.Tensor, tokens: list[torch.Tensor], aux: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """B x |v| → T tensors of B x out_features (tokens and aux unused)."""
        xs = v.unsqueeze(0)
        for i, level in enumerate(self.levels):
            if i > 0:
                xs = self.connect(xs)
            xs = level(xs)
        return list(xs.unbind(0))

    @torch.jit.ignore
    def diagnostics(self, v: torch.Tensor, tokens: list[torch.Tensor]) -> Diagnostics:
        """Expert health on one batch (see :mod:`mtrec.multitask.diagnostics`): dead fraction
        per expert (after its last activation), every gate's mean weights and entropy,
        and each task's share of the last level's shared experts.

        Runs in the block's mode; in training mode BatchNorm's running statistics are
        restored afterwards, so a diagnostic batch never changes the model."""
        activations: dict[str, list[torch.Tensor]] = {}
        gates: dict[str, dict[str, Any]] = {}
        with torch.no_grad():
            saved = [(b, b.clone()) for b in self.buffers()]
            xs = v.unsqueeze(0)
            for i, level in enumerate(self.levels):
                if i > 0:
                    xs = self.connect(xs)
                xs = level.diagnose(xs, activations, gates)
            for buffer, value in saved:
                buffer.copy_(value)
        experts = {
            name: {"dead_fraction": dead_fraction(torch.cat(acts))}
            for name, acts in activations.items()
        }
        return {
            "experts": experts,
            "gates": gates,
            "shared_usage": shared_usage(gates, self.usage_experts),
        }


def cgc_level(
    in_features: int,
    task_names: list[str],
    expert_hidden: list[int],
    shared_experts: int,
    task_experts: int,
    first: bool,
    last: bool,
    prefix: str,
    act: str = "relu",
    dropout: float = 0.0,
    norm: bool = False,
    feature_gate_rank: int = 0,
    self_gate: bool = False,
    shared_gate: bool | None = None,
    kind: str = "task",
) -> ExpertLevel:
    """One CGC level over T nodes (tasks, or HoME's task groups when ``kind="group"``).

    Slots ``[shared..., node 0..., node 1..., ...]``; gates ``[node 0, ..., node T-1]``
    plus a shared gate when ``shared_gate`` (default: not ``last`` and some shared
    experts). Node t's gate mixes ``[node-t..., shared...]`` (self-gate: its own node-t
    experts); the shared gate mixes every slot (self-gate: the shared experts).

    Inputs: the first level reads one input (v); later levels read input t for node t's
    experts and gate and input T for the shared ones. Names: experts
    ``<prefix>.shared.j`` / ``<prefix>.<kind>:<node>.j``; gates ``task:<node>`` on the
    last level, else ``<prefix>:<kind>:<node>``, and ``<prefix>:shared``. HoME's level 1
    and its flat ablation reuse this layout, so they match PLE weight for weight.
    """
    t_count = len(task_names)
    shared = list(range(shared_experts))
    own = [
        list(range(shared_experts + t * task_experts, shared_experts + (t + 1) * task_experts))
        for t in range(t_count)
    ]
    slot_input = [0 if first else t_count] * shared_experts
    names = [f"{prefix}.shared.{j}" for j in range(shared_experts)]
    for t, task in enumerate(task_names):
        slot_input += [0 if first else t] * task_experts
        names += [f"{prefix}.{kind}:{task}.{j}" for j in range(task_experts)]
    bank = ExpertBank(
        in_features,
        expert_hidden,
        list(range(len(slot_input))),
        slot_input,
        act,
        dropout,
        norm,
        feature_gate_rank,
    )
    gate_names = [f"task:{task}" if last else f"{prefix}:{kind}:{task}" for task in task_names]
    if shared_gate is None:
        shared_gate = not last and shared_experts > 0
    gates = [
        GateNode(
            in_features,
            own[t] + shared,
            own[t] if self_gate else [],
            0 if first else t,
            gate_names[t],
        )
        for t in range(t_count)
    ]
    if shared_gate:
        gates.append(
            GateNode(
                in_features,
                list(range(len(slot_input))),
                shared if self_gate else [],
                0 if first else t_count,
                f"{prefix}:shared",
            )
        )
    return ExpertLevel(bank, gates, names)
