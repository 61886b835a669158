"""APEM: Adaptive Pattern Extraction Multi-task (arXiv 2301.02494), on field tokens.

The block reads the last field tokens X = ``tokens[-1]`` (B x F x d: the embeddings, or
the last AutoInt layer's output) and builds one representation per task in two stages:

1. **DeepAuto Group Transformer.** Fields are split into groups; each group runs through
   its own set-attention block with m learnable inducing points::

       ISAB(X)  = MAB(X, MAB(I, X))
       MAB(X,Y) = LN(H + FFN(H)),   H = LN(X + MHA(X, Y, Y))

   then Squeeze-and-Excitation reweights all F fields: ``s = σ(W₂ ReLU(W₁ mean_d X))``,
   ``X' = s ⊙ X`` (s ∈ (0, 1) per field and row).
2. **Pattern selector.** Task t owns an indicator u_t made sample-adaptive,
   ``u_t(x) = u_t + MLP(mean_f X')``, and picks fields by
   ``a_t,f = softmax_f(⟨u_t(x), W X'_f⟩ / √d)``; its representation is
   ``r_t = [Σ_f a_t,f X'_f ⊕ flatten(X')]``.

Choices the paper leaves open (ours):

* ``apem.field_groups`` lists groups by field name; fields listed in no group form one
  extra, last group (so listing only the groups one cares about is enough); an empty
  list is one group of all fields. Each group has its own ISAB; SE runs over all F
  fields after the groups are put back in field order, so it weighs fields across groups.
* MHA uses ``apem.heads`` heads of d / heads each; FFN is Linear(d, d) → ReLU → Linear(d, d).
* r_t (d + F·d wide) goes through a per-task MLP of widths ``expert_hidden`` (activation
  and dropout after each layer, run as batched matmuls over tasks), so ``out_features`` is
  ``expert_hidden[-1]`` and the towers see a representation of the usual size.

ESMM probability chaining (``model.multitask.chain``) is model-level, see
:func:`mtrec.model.chain_logits`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mtrec.config.checks import check_deep_fields
from mtrec.config.errors import ConfigError
from mtrec.config.schema import MultiTaskConfig, num
from mtrec.multitask.base import BlockInputs
from mtrec.multitask.diagnostics import Diagnostics, dead_fraction, gate_summary, shared_usage
from mtrec.multitask.registry import register_block
from mtrec.nn import short_softmax
from mtrec.nn.layers import FastDropout, GroupedLinear, activation

if TYPE_CHECKING:
    from mtrec.config.schema import ExperimentConfig

__all__ = ["APEM", "ISAB", "MAB", "APEMConfig", "MultiHeadAttention", "build", "group_indices"]


@dataclass
class APEMConfig:
    """APEM (arXiv 2301.02494) on the last field tokens: field groups → set attention
    with ``inducing_points`` learnable points (``heads`` heads; must divide the token
    width) → SE over fields → per-task pattern selector; each task's r_t then goes through
    a per-task MLP of ``expert_hidden`` widths. ``field_groups`` lists field names per
    group; fields listed in no group form one extra group (empty: one group of all
    fields)."""

    # field names per group; unlisted fields form one more group
    field_groups: list[list[str]] = field(default_factory=list)
    # m, learnable inducing points of each group's set attention
    inducing_points: int = num(4, gt=0)
    # attention heads of the set attention (divide the token width)
    heads: int = num(2, gt=0)
    # squeeze-and-excitation bottleneck: F / se_reduction
    se_reduction: int = num(4, gt=0)
    # hidden width of the pattern selector's sample-adaptive MLP
    selector_hidden: int = num(32, gt=0)

    def check(self, cfg: ExperimentConfig) -> None:
        """Rules across keys, run when ``type: apem`` is selected."""
        ia = cfg.model.interaction
        width = ia.attention_dim if ia.type == "autoint" else cfg.model.embedding.dim
        if width % self.heads:
            raise ConfigError(
                f"model.multitask.apem.heads: {self.heads} heads must divide the token width "
                f"{width} (model.embedding.dim, or model.interaction.attention_dim with "
                "AutoInt); pick a divisor"
            )
        # the same rules the model applies when it is built (one implementation)
        grouped = [name for group in self.field_groups for name in group]
        check_deep_fields(cfg, "model.multitask.apem.field_groups", grouped)
        group_indices([f.name for f in cfg.features if f.deep], self.field_groups)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention of queries X over keys/values Y, H heads.

    Shapes: X B x Q x d, Y B x K x d → B x Q x d. Head h owns columns
    ``[h·d_h, (h+1)·d_h)`` of the Q / K / V projections (d_h = d / H); heads are
    concatenated and mixed by the output projection.

    Example::

        mha = MultiHeadAttention(8, num_heads=2)
        mha(torch.randn(4, 3, 8), torch.randn(4, 5, 8)).shape  # torch.Size([4, 3, 8])
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, nq, nk = x.shape[0], x.shape[1], y.shape[1]
        q = self.q(x).view(b, nq, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(y).view(b, nk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # fused kernel: faster on CPU than matmul-softmax-matmul at these tiny per-row sizes
        # (measured forward + backward: 1.8-2.9x for m queries over F keys, ~1.2x for F over m)
        heads = nn.functional.scaled_dot_product_attention(q, kv[0], kv[1])  # B x H x Q x d_h
        return self.out(heads.transpose(1, 2).reshape(b, nq, self.num_heads * self.head_dim))


class MAB(nn.Module):
    """Multihead attention block: ``H = LN(X + MHA(X, Y, Y))``, ``out = LN(H + FFN(H))``.

    Shapes: X B x Q x d, Y B x K x d → B x Q x d.

    Example::

        mab = MAB(8, num_heads=2)
        mab(torch.randn(4, 3, 8), torch.randn(4, 5, 8)).shape  # torch.Size([4, 3, 8])
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x + self.attention(x, y))
        return self.norm2(h + self.ffn(h))


class ISAB(nn.Module):
    """Induced set attention: ``ISAB(X) = MAB(X, MAB(I, X))`` with m learnable points I.

    The m inducing points summarise the set first, so the cost is O(m·F) instead of the
    O(F²) of full self-attention, and the output is permutation-equivariant in the fields.
    Shapes: B x F x d → B x F x d.

    Example::

        isab = ISAB(8, num_heads=2, num_points=3)
        isab(torch.randn(4, 5, 8)).shape  # torch.Size([4, 5, 8])
    """

    def __init__(self, dim: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        self.inducing = nn.Parameter(torch.empty(num_points, dim))
        nn.init.xavier_uniform_(self.inducing)
        self.summarise = MAB(dim, num_heads)
        self.broadcast = MAB(dim, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        points = self.inducing.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.broadcast(x, self.summarise(points, x))


def group_indices(field_names: list[str], field_groups: list[list[str]]) -> list[list[int]]:
    """Field positions per group: the listed groups in order, then one group of the fields
    listed nowhere (if any). An empty ``field_groups`` is one group of all fields."""
    position = {name: i for i, name in enumerate(field_names)}
    groups: list[list[int]] = []
    seen: set[int] = set()
    for g, members in enumerate(field_groups):
        key = f"model.multitask.apem.field_groups[{g}]"
        if not members:
            raise ConfigError(f"{key}: a group needs at least one field")
        idx = []
        for name in members:
            if name not in position:
                close = difflib.get_close_matches(name, field_names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"{key}: unknown field {name!r}{hint} (fields: {', '.join(field_names)})"
                )
            if position[name] in seen:
                raise ConfigError(f"{key}: field {name!r} is already in another group")
            seen.add(position[name])
            idx.append(position[name])
        groups.append(idx)
    rest = [i for i in range(len(field_names)) if i not in seen]
    if rest:
        groups.append(rest)
    return groups


class APEM(nn.Module):
    """Group set-attention + SE over fields, then a per-task adaptive field selector.

    Shapes: ``tokens[-1]`` B x F x d → T tensors of B x ``expert_hidden[-1]`` (``v`` and
    ``aux`` unused). See the module docstring for the formulas.

    Args:
        field_names: the F fields in token order (names the diagnostics' "experts").
        task_names: the T tasks.
        dim: d, the width of ``tokens[-1]``.
        groups: field positions per group (:func:`group_indices`); together a partition
            of ``range(F)``.
        num_heads: heads of every MHA (divides d).
        num_points: m inducing points per group.
        se_reduction: SE bottleneck is ``max(1, F // se_reduction)``.
        selector_hidden: hidden width of the MLP that adapts u_t to the sample.
        hidden: widths of the per-task MLP on r_t; the last is ``out_features``.
        act: activation of that MLP.
        dropout: dropout after each layer of that MLP.

    Example::

        block = APEM(["a", "b", "c"], ["click", "buy"], dim=8, groups=[[0, 2], [1]],
                     num_heads=2, num_points=2, se_reduction=2, selector_hidden=8,
                     hidden=[16])
        [r.shape for r in block(torch.empty(0), [torch.randn(4, 3, 8)], {})]
        # [torch.Size([4, 16])] * 2
    """

    def __init__(
        self,
        field_names: list[str],
        task_names: list[str],
        dim: int,
        groups: list[list[int]],
        num_heads: int,
        num_points: int,
        se_reduction: int,
        selector_hidden: int,
        hidden: list[int],
        act: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        num_fields, num_tasks = len(field_names), len(task_names)
        order = [i for g in groups for i in g]
        if sorted(order) != list(range(num_fields)):
            raise ValueError(f"groups {groups} must partition the {num_fields} field positions")
        if not hidden:
            raise ValueError("hidden needs at least one width")
        self.field_names = list(field_names)
        self.task_names = list(task_names)
        self.num_fields = num_fields
        self.num_tasks = num_tasks
        self.dim = dim
        self.group_sizes = [len(g) for g in groups]
        self.out_features = hidden[-1]
        # tokens are gathered group by group (order) and scattered back (inverse), so the
        # groups need not be contiguous runs of fields
        self.register_buffer("order", torch.tensor(order, dtype=torch.long), persistent=False)
        inverse = torch.empty(num_fields, dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(num_fields)
        self.register_buffer("inverse", inverse, persistent=False)
        self.identity_order = order == list(range(num_fields))
        self.group_blocks = nn.ModuleList([ISAB(dim, num_heads, num_points) for _ in groups])
        squeeze = max(1, num_fields // se_reduction)
        self.excite = nn.Sequential(
            nn.Linear(num_fields, squeeze), nn.ReLU(), nn.Linear(squeeze, num_fields)
        )
        # task indicators u_t; random so tasks start from different field preferences
        self.indicators = nn.Parameter(torch.randn(num_tasks, dim))
        self.adapt = nn.Sequential(
            nn.Linear(dim, selector_hidden), nn.ReLU(), nn.Linear(selector_hidden, num_tasks * dim)
        )
        self.key = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)
        widths = [dim + num_fields * dim, *hidden]
        self.mlp = nn.ModuleList([GroupedLinear(num_tasks, a, b) for a, b in pairwise(widths)])
        self.act = activation(act)
        self.dropout = FastDropout(dropout)

    @torch.jit.export
    def se_scales(self, x: torch.Tensor) -> torch.Tensor:
        """B x F x d group-attention output → B x F SE scales in (0, 1)."""
        return torch.sigmoid(self.excite(x.mean(-1)))

    @torch.jit.export
    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        """B x F x d tokens → X' (B x F x d): group set attention, then SE over fields."""
        grouped = x if self.identity_order else x.index_select(1, self.order)
        parts = grouped.split(self.group_sizes, dim=1)
        outs: list[torch.Tensor] = []
        for g, block in enumerate(self.group_blocks):
            outs.append(block(parts[g]))
        h = torch.cat(outs, dim=1)
        if not self.identity_order:
            h = h.index_select(1, self.inverse)
        return self.se_scales(h).unsqueeze(-1) * h

    @torch.jit.export
    def field_weights(self, xp: torch.Tensor) -> torch.Tensor:
        """X' (B x F x d) → B x T x F field weights a_t,f (each task's row sums to 1)."""
        b = xp.shape[0]
        u = self.indicators + self.adapt(xp.mean(1)).view(b, self.num_tasks, self.dim)
        scores = torch.matmul(u, self.key(xp).transpose(1, 2)) * self.scale
        return short_softmax.softmax(scores, dim=-1)

    def forward(
        self, v: torch.Tensor, tokens: list[torch.Tensor], aux: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        xp = self.patterns(tokens[-1])
        b = xp.shape[0]
        pooled = torch.matmul(self.field_weights(xp), xp)  # B x T x d
        flat = xp.reshape(b, self.num_fields * self.dim)
        # r_t = [Σ_f a_t,f X'_f ⊕ flatten(X')], all tasks at once: T x B x (d + F·d)
        h = torch.cat(
            [pooled.transpose(0, 1), flat.unsqueeze(0).expand(self.num_tasks, -1, -1)], dim=2
        )
        for layer in self.mlp:
            h = self.dropout(self.act(layer(h)))
        return [h[t] for t in range(self.num_tasks)]

    @torch.jit.ignore
    def diagnostics(self, v: torch.Tensor, tokens: list[torch.Tensor]) -> Diagnostics:
        """Fields act as the experts: each field's dead fraction in X', each task's mean
        field weight as its gate (``task:<name>``), and every field's usage share per task
        (all fields are shared by all tasks)."""
        with torch.no_grad():
            xp = self.patterns(tokens[-1])
            weights = self.field_weights(xp)
        experts = {
            name: {"dead_fraction": dead_fraction(xp[:, f])}
            for f, name in enumerate(self.field_names)
        }
        gates: dict[str, dict[str, Any]] = {
            f"task:{name}": gate_summary(weights[:, t], self.field_names)
            for t, name in enumerate(self.task_names)
        }
        return {
            "experts": experts,
            "gates": gates,
            "shared_usage": shared_usage(gates, self.field_names),
        }


@register_block("apem", config=APEMConfig)
def build(inputs: BlockInputs, cfg: MultiTaskConfig) -> APEM:
    """APEM on ``tokens[-1]`` for the fields and tasks of ``inputs`` (``model.multitask.apem``)."""
    a = cfg.apem
    dim = inputs.token_dims[-1]
    return APEM(
        inputs.field_names,
        inputs.task_names,
        dim,
        group_indices(inputs.field_names, a.field_groups),
        a.heads,
        a.inducing_points,
        a.se_reduction,
        a.selector_hidden,
        cfg.expert_hidden,
        cfg.activation,
        cfg.dropout,
    )
