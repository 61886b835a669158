"""AutoInt (Song et al., CIKM 2019) and AutoInt+: multi-head self-attention over fields.

Each field token e_m (sparse embedding, or a learned vector scaled by the
normalised value for numeric fields) attends over all fields of its row::

    α^h_mk = softmax_k(⟨W_Q^h e_m, W_K^h e_k⟩ / √d_h)
    ẽ^h_m  = Σ_k α^h_mk W_V^h e_k                      (heads concatenated → ẽ_m)
    e'_m   = ReLU(LN(ẽ_m + W_res e_m))                  (LN and W_res optional)

The flattened output of the last layer feeds the multi-task block. AutoInt+
adds a parallel MLP on ``flatten(E⁰)`` whose output is concatenated to it.
The paper's linear logit term is not built: here the task towers make the logits.

Mixture-of-Head routing (MoH, Jin et al. 2024, arXiv 2410.11842), per field token x:
the first h_s heads are shared (always on) with gates ``α₁ · softmax(W_s x)``; a router
scores the other R = H − h_s heads, keeps the top k of ``softmax(W_r x)`` and renormalises
them to sum to 1, times ``α₂``; ``[α₁, α₂] = softmax(W_h x)``. Each head's output is
scaled by its gate before concatenation, so H − h_s − k heads contribute nothing to that
token. The load-balance loss ``β · Σ_i f_i P_i`` (f_i: share of tokens that picked routed
head i, P_i: mean router probability of i) enters the training loss through the model's
auxiliary-loss channel.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

from mtrec.nn import field_attention, short_softmax
from mtrec.nn.layers import FastDropout
from mtrec.nn.residual_norm import residual_norm_relu

__all__ = ["AutoInt", "InteractingLayer"]


class InteractingLayer(nn.Module):
    """One multi-head self-attention layer over fields.

    Shapes: B x F x in_dim → B x F x attention_dim.

    Q, K and V of all heads are one bias-free ``Linear(in_dim, 3 · attention_dim)``
    (``qkv``): output rows ``[0, A)`` are W_Q, ``[A, 2A)`` W_K, ``[2A, 3A)`` W_V,
    head h owning rows ``[h·d_h, (h+1)·d_h)`` of each, with d_h = A / H.
    The residual ``W_res`` is a bias-free ``Linear(in_dim, attention_dim)``; with
    ``use_residual=False`` it does not exist (``self.residual is None``).
    Training steps on CPU (train mode, gradients on, no attention dropout) compute the
    attention of all heads in one call of the fused kernel ``mtrec.nn.field_attention``
    on ``qkv(x)`` (and the residual sum, LN and ReLU in one, ``mtrec.nn.residual_norm``);
    every other forward (eval, no_grad, torch.fx, TorchScript) takes the
    per-head ATen path below. The two agree to float rounding.
    LayerNorm, when enabled, normalises the residual sum *before* the ReLU (as in
    FuxiCTR/BARS, whose AutoInt settings METHODS.md cites), so outputs stay >= 0.
    ``dropout`` drops attention weights (training only). ``routing = (h_s, k, β)`` turns
    on MoH head routing (see the module docstring); ``self.router`` is then one
    ``Linear(in_dim, h_s + R + 2)`` giving shared-head, routed-head and shared/routed
    logits in one GEMM.

    Example::

        layer = InteractingLayer(8, attention_dim=16, num_heads=2)
        layer(torch.randn(4, 5, 8)).shape            # torch.Size([4, 5, 16])
        layer.attention(torch.randn(4, 5, 8)).shape  # torch.Size([4, 2, 5, 5])
    """

    def __init__(
        self,
        in_dim: int,
        attention_dim: int,
        num_heads: int,
        use_residual: bool = True,
        layer_norm: bool = False,
        dropout: float = 0.0,
        routing: tuple[int, int, float] | None = None,
    ) -> None:
        super().__init__()
        if min(in_dim, attention_dim, num_heads) <= 0:
            raise ValueError(
                f"in_dim, attention_dim and num_heads must be > 0, got "
                f"{in_dim}, {attention_dim}, {num_heads}"
            )
        if attention_dim % num_heads:
            raise ValueError(
                f"attention_dim ({attention_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.in_dim = in_dim
        self.attention_dim = attention_dim
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(in_dim, 3 * attention_dim, bias=False)
        self.residual = nn.Linear(in_dim, attention_dim, bias=False) if use_residual else None
        self.norm = nn.LayerNorm(attention_dim) if layer_norm else None
        self.dropout = FastDropout(dropout)
        self.shared_heads, self.top_k, self.balance_weight = 0, 0, 0.0
        self.router: nn.Linear | None = None
        if routing is not None:
            shared, top_k, beta = routing
            routed = num_heads - shared
            if shared < 0 or not 0 < top_k < routed:
                raise ValueError(
                    f"MoH needs 0 <= shared and 0 < top_k < heads - shared, got "
                    f"shared={shared}, top_k={top_k}, heads={num_heads}"
                )
            self.shared_heads, self.top_k, self.balance_weight = shared, top_k, float(beta)
            self.router = nn.Linear(in_dim, shared + routed + 2)

    def _head(self, x: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B x F x in → head h's Q / √d_h, K and V, each a contiguous B x F x d_h."""
        a, lo, hi = self.attention_dim, h * self.head_dim, (h + 1) * self.head_dim
        w = self.qkv.weight
        # the scale rides on W_Q (d_h x in, a few hundred numbers) instead of the B x F x F
        # scores; exact when √d_h is a power of two (d_h = 4, 16, 64), else one rounding
        q = nn.functional.linear(x, w[lo:hi] * self.scale)
        k = nn.functional.linear(x, w[a + lo : a + hi])
        v = nn.functional.linear(x, w[2 * a + lo : 2 * a + hi])
        return q, k, v

    def _batch_innermost(self, b: int, f: int) -> bool:
        """Use :meth:`_forward_batch_innermost` (inference only): a large batch of few
        fields and narrow heads, where the per-head path spends its time on B·H tiny
        problems. Measured (inference, one thread, whole layer) at B = 512, F = 14, H = 2,
        d_h = 8: per-head path 5.9 ms, this path 2.9 ms; at B = 1024, F = 42, d_h = 8 the
        per-head path wins (27 vs 49 ms). (It was chosen the same way against the fused
        kernel the layer used before: 2.3 vs 1.2 ms for the attention alone.)"""
        if self.training or torch.is_grad_enabled() or not isinstance(b, int):
            return False  # (a torch.fx trace's sizes are proxies: it records the per-head path)
        return b >= 128 and f <= 16 and self.head_dim <= 8

    def _forward_batch_innermost(self, x: torch.Tensor) -> torch.Tensor:
        """The layer up to the norm with the batch as the innermost (vectorised) dimension,
        for inference: softmax(Q Kᵀ / √d_h) V as d_h + F multiply-adds over whole
        H x F x F x B / H x d_h x F x B slabs instead of B·H tiny matrix products, the
        projections as plain matmuls on x transposed to in x (F·B), so Q, K, V come out
        in that layout and the residual adds inside its matmul. The same values as the
        per-head path up to float rounding (~1e-7); no autograd (in-place accumulation).

        Shapes: B x F x in → A x (F·B) (heads concatenated [gated] + residual)."""
        b, f, width = x.shape[0], x.shape[1], x.shape[2]
        h, dh = self.num_heads, self.head_dim
        xt = x.permute(2, 1, 0).reshape(width, f * b)  # in x (F·B)
        qkv = torch.mm(self.qkv.weight, xt).view(3, h, dh, f, b)
        q, k, v = qkv.unbind(0)  # H x d_h x F x B each
        q = q * self.scale
        scores = q[:, 0].unsqueeze(2) * k[:, 0].unsqueeze(1)  # H x F (query) x F (key) x B
        for d in range(1, dh):
            scores.addcmul_(q[:, d].unsqueeze(2), k[:, d].unsqueeze(1))
        # the softmax over keys, normalised after the weighted sum: exp(s - max) weights
        # V, then the H x d_h x F x B sum is divided by Σ exp (a smaller slab than the
        # H x F x F x B weights; torch's softmax over a middle dim is slow here)
        weights = scores.sub_(scores.amax(2, keepdim=True)).exp_()
        total = weights.sum(2)  # H x F (query) x B
        out = weights[:, :, 0].unsqueeze(1) * v[:, :, 0].unsqueeze(2)  # H x d_h x F x B
        for j in range(1, f):
            out.addcmul_(weights[:, :, j].unsqueeze(1), v[:, :, j].unsqueeze(2))
        out.mul_(total.reciprocal_().unsqueeze(1))
        router = self.router
        if router is not None:  # B x F x H gates → H x 1 x F x B
            out.mul_(self._route(router(x), False)[0].permute(2, 1, 0).unsqueeze(1))
        flat = out.view(self.attention_dim, f * b)
        if self.residual is not None:
            flat = torch.addmm(flat, self.residual.weight, xt)
        return flat

    def _norm_columns_(self, flat: torch.Tensor) -> torch.Tensor:
        """The LayerNorm over A of A x (F·B) columns, written into ``flat`` (inference): the
        tokens stay in this layout, so the next layer's transpose is free. The same maths
        as ``nn.LayerNorm`` (biased variance) up to float rounding."""
        norm = self.norm
        if norm is None:
            return flat
        centred = flat.sub_(flat.mean(0, keepdim=True))
        var = (centred * centred).mean(0, keepdim=True)
        centred.mul_(torch.rsqrt(var.add_(norm.eps)))
        if norm.weight is not None:
            centred.mul_(norm.weight.unsqueeze(1))
        if norm.bias is not None:
            centred.add_(norm.bias.unsqueeze(1))
        return centred

    @torch.jit.export
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """B x F x in → B x H x F x F attention probabilities α (rows sum to 1; no dropout)."""
        maps: list[torch.Tensor] = []
        for h in range(self.num_heads):
            q, k, _ = self._head(x, h)
            maps.append(short_softmax.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1))
        return torch.stack(maps, dim=1)

    def _route(
        self, logits: torch.Tensor, with_balance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """B x F x (h_s + R + 2) router logits → (B x F x H head gates, scalar unweighted
        balance loss Σ f_i P_i, or None when ``with_balance`` is off)."""
        hs = self.shared_heads
        routed_probs = short_softmax.softmax(logits[..., hs:-2], dim=-1)  # B x F x R
        top_vals, top_idx = routed_probs.topk(self.top_k, dim=-1)
        top_vals = top_vals / top_vals.sum(-1, keepdim=True)
        routed = torch.zeros_like(routed_probs).scatter(-1, top_idx, top_vals)
        if hs > 0:
            mix = short_softmax.softmax(logits[..., -2:], dim=-1)  # α₁, α₂
            shared = short_softmax.softmax(logits[..., :hs], dim=-1) * mix[..., :1]
            gates = torch.cat([shared, routed * mix[..., 1:]], dim=-1)
        else:
            gates = routed
        if not with_balance:  # inference (serving): the loss is not needed
            return gates, None
        picked = torch.zeros_like(routed_probs).scatter(-1, top_idx, 1.0)
        tokens = routed_probs.shape[0] * routed_probs.shape[1]
        f_share = picked.reshape(tokens, -1).mean(0)  # no gradient: a count
        p_mean = routed_probs.reshape(tokens, -1).mean(0)
        return gates, (f_share * p_mean).sum()

    @torch.jit.export
    def head_gates(self, x: torch.Tensor) -> torch.Tensor:
        """B x F x in → B x F x H gate per head and token (all ones without routing)."""
        router = self.router
        if router is None:
            return torch.ones(x.shape[0], x.shape[1], self.num_heads, dtype=x.dtype)
        return self._route(router(x), False)[0]

    def forward_with_balance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """B x F x in → (B x F x A output, β-weighted MoH balance loss or None)."""
        b, f = x.shape[0], x.shape[1]
        gates: torch.Tensor | None = None
        balance: torch.Tensor | None = None
        if self._batch_innermost(b, f):
            flat = self._norm_columns_(self._forward_batch_innermost(x)).relu_()
            # B x F x A view of the A x F x B tokens (a following layer reads them as is)
            return flat.view(self.attention_dim, f, b).permute(2, 1, 0), balance
        router = self.router
        if router is not None:
            gates, raw = self._route(router(x), self.training)
            if raw is not None:
                balance = raw * self.balance_weight
        if not torch.jit.is_scripting():
            # training steps only: every score (validation, export, serving) keeps one path
            if self.training and self.dropout.p == 0.0:
                if field_attention.usable(x, self.head_dim):
                    return self._forward_fused(x, gates), balance
        # head by head, each a contiguous B x F x d_h: batched GEMMs over B need no head
        # transposes (forward or backward). Measured on CPU against one 3A-wide projection
        # cut into B x H x F x d_h views and the fused scaled_dot_product_attention, whose
        # per-(row, head) kernel is dominated by call overheads at F ~ 40, d_h ~ 16.
        heads: list[torch.Tensor] = []
        for h in range(self.num_heads):
            q, k, v = self._head(x, h)
            probs = self.dropout(short_softmax.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1))
            head = torch.bmm(probs, v)  # B x F x d_h
            if gates is not None:
                head = head * gates[:, :, h : h + 1]
            heads.append(head)
        out = torch.cat(heads, dim=-1)  # B x F x H·d_h (heads concatenated per field)
        return self._finish(out, x), balance

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """B x F x A attention output → ReLU(LN(out + W_res x)), ``out`` reused in place."""
        if self.residual is not None:
            out = out.add_(self.residual(x))  # a fresh buffer: no third B x F x A tensor
        if self.norm is not None:
            out = self.norm(out)
        # in place: neither the sum's nor LayerNorm's backward reads its output (saves a
        # B x F x A buffer per layer, ~3% of a layer's fwd + bwd on CPU)
        return torch.relu_(out)

    def _forward_fused(self, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """The layer on the fused kernel (training, eager): one B x F x 3A projection, the
        attention of all heads in one call (``mtrec.nn.field_attention``), then the gates,
        residual, norm and ReLU as on the per-head path, the last three in one pass when
        the layer has both a residual and a norm (``mtrec.nn.residual_norm``). The scale is
        applied inside the kernel, to the queries."""
        out = field_attention.attend(self.qkv(x), self.num_heads, self.scale)  # B x F x A
        if gates is not None:  # B x F x H → each head's d_h columns
            b, f = out.shape[0], out.shape[1]
            heads = out.view(b, f, self.num_heads, self.head_dim) * gates.unsqueeze(-1)
            out = heads.view(b, f, self.attention_dim)
        if self.residual is not None and self.norm is not None:  # the sum, LN and ReLU fused
            norm = self.norm
            return residual_norm_relu(out, self.residual(x), norm.weight, norm.bias, norm.eps)
        return self._finish(out, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_balance(x)[0]


class AutoInt(nn.Module):
    """A stack of interacting layers (in_dim → A, then A → A), optionally AutoInt+.

    Shapes: ``forward``: B x F x in_dim → B x F x attention_dim;
    ``forward_flat``: B x F x in_dim → B x ``flat_features(F)`` =
    B x (F · attention_dim [+ dnn[-1]]).

    Args:
        in_dim: d, the width of a field token.
        num_layers: interacting layers (>= 1).
        attention_dim: A, output width per field of every layer.
        num_heads: H (divides A).
        use_residual: add ``W_res e_m`` in every layer.
        layer_norm: LayerNorm in every layer (before the ReLU).
        dropout: dropout on attention weights.
        dnn: AutoInt+ hidden widths of a ReLU MLP on ``flatten(E⁰)`` (empty: AutoInt).
        num_fields: F; required when ``dnn`` is set (the MLP's input is F · in_dim).
        routing: ``(shared heads, top k, β)`` for MoH head routing in every layer (None: off).

    Example::

        net = AutoInt(8, num_layers=2, attention_dim=16, num_heads=2, dnn=[32], num_fields=5)
        net.forward_flat(torch.randn(4, 5, 8)).shape  # torch.Size([4, 5 * 16 + 32])
    """

    def __init__(
        self,
        in_dim: int,
        num_layers: int,
        attention_dim: int,
        num_heads: int,
        use_residual: bool = True,
        layer_norm: bool = False,
        dropout: float = 0.0,
        dnn: list[int] | None = None,
        num_fields: int | None = None,
        routing: tuple[int, int, float] | None = None,
    ) -> None:
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        widths = [in_dim] + [attention_dim] * num_layers
        self.layers = nn.ModuleList(
            [
                InteractingLayer(a, b, num_heads, use_residual, layer_norm, dropout, routing)
                for a, b in pairwise(widths)
            ]
        )
        self.out_features_per_field = attention_dim
        dnn = list(dnn or [])
        self.dnn_out = dnn[-1] if dnn else 0
        self.dnn: nn.Sequential | None = None
        if dnn:
            if num_fields is None or num_fields <= 0:
                raise ValueError("AutoInt+ (dnn) needs num_fields > 0 (its input is F · in_dim)")
            mlp: list[nn.Module] = []
            for a, b in pairwise([num_fields * in_dim, *dnn]):
                mlp += [nn.Linear(a, b), nn.ReLU(inplace=True)]  # on the Linear's fresh output
            self.dnn = nn.Sequential(*mlp)

    def flat_features(self, num_fields: int) -> int:
        """Width of ``forward_flat`` for F fields."""
        return num_fields * self.out_features_per_field + self.dnn_out

    def forward_layers(
        self, tokens: torch.Tensor, aux: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """B x F x d → each layer's B x F x A output (aux: where routed layers add losses)."""
        outs: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            tokens, balance = layer.forward_with_balance(tokens)
            if balance is not None and self.training:
                aux["moh_balance_" + str(i)] = balance
            outs.append(tokens)
        return outs

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        aux: dict[str, torch.Tensor] = {}
        return self.forward_layers(tokens, aux)[-1]

    @torch.jit.export
    def flatten_output(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Flattened last layer ``last`` [⊕ DNN(flatten(tokens = E⁰))]."""
        out = last.flatten(1)
        if self.dnn is not None:
            out = torch.cat([out, self.dnn(tokens.flatten(1))], dim=1)
        return out

    @torch.jit.export
    def forward_flat(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x F x d → B x (F · A [+ dnn[-1]]): flattened AutoInt output [⊕ DNN(flatten(E⁰))]."""
        return self.flatten_output(tokens, self.forward(tokens))

    @torch.jit.export
    def attention_maps(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """B x F x d → one B x H x F x F attention map per layer (each on that layer's input)."""
        maps: list[torch.Tensor] = []
        for layer in self.layers:
            maps.append(layer.attention(tokens))
            tokens = layer(tokens)
        return maps
