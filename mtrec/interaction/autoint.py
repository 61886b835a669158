"""AutoInt (Song et al., CIKM 2019) and AutoInt+: multi-head self-attention over fields.

Each field token e_m (sparse embedding, or a learned vector scaled by the
normalised value for numeric fields) attends over all fields of its row::

    α^h_mk = softmax_k(⟨W_Q^h e_m, W_K^h e_k⟩ / √d_h)
    ẽ^h_m  = Σ_k α^h_mk W_V^h e_k                      (heads concatenated → ẽ_m)
    e'_m   = ReLU(LN(ẽ_m + W_res e_m))                  (LN and W_res optional)

The flattened output of the last layer feeds the multi-task block. AutoInt+
adds a parallel MLP on ``flatten(E⁰)`` whose output is concatenated to it.
The paper's linear logit term is not built: here the task towers make the logits.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

from mtrec.multitask.layers import FastDropout

__all__ = ["AutoInt", "InteractingLayer"]


class InteractingLayer(nn.Module):
    """One multi-head self-attention layer over fields.

    Shapes: B x F x in_dim → B x F x attention_dim.

    Q, K and V of all heads are one bias-free ``Linear(in_dim, 3 · attention_dim)``
    (``qkv``): output rows ``[0, A)`` are W_Q, ``[A, 2A)`` W_K, ``[2A, 3A)`` W_V,
    head h owning rows ``[h·d_h, (h+1)·d_h)`` of each, with d_h = A / H.
    The residual ``W_res`` is a bias-free ``Linear(in_dim, attention_dim)``; with
    ``use_residual=False`` it does not exist (``self.residual is None``).
    LayerNorm, when enabled, normalises the residual sum *before* the ReLU (as in
    FuxiCTR/BARS, whose AutoInt settings METHODS.md cites), so outputs stay >= 0.
    ``dropout`` drops attention weights (training only).

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

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B x F x in → Q, K, V, each B x H x F x d_h."""
        b, f = x.shape[0], x.shape[1]
        qkv = self.qkv(x).view(b, f, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)

    @torch.jit.export
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """B x F x in → B x H x F x F attention probabilities α (rows sum to 1; no dropout)."""
        q, k, _ = self._heads(x)
        return self._probs(q, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f = x.shape[0], x.shape[1]
        q, k, v = self._heads(x)
        probs = self.dropout(self._probs(q, k))
        # B x H x F x d_h → B x F x H·d_h (heads concatenated per field)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, f, self.attention_dim)
        if self.residual is not None:
            out = out + self.residual(x)
        if self.norm is not None:
            out = self.norm(out)
        return torch.relu(out)


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
    ) -> None:
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        widths = [in_dim] + [attention_dim] * num_layers
        self.layers = nn.ModuleList(
            [
                InteractingLayer(a, b, num_heads, use_residual, layer_norm, dropout)
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
                mlp += [nn.Linear(a, b), nn.ReLU()]
            self.dnn = nn.Sequential(*mlp)

    def flat_features(self, num_fields: int) -> int:
        """Width of ``forward_flat`` for F fields."""
        return num_fields * self.out_features_per_field + self.dnn_out

    def forward_layers(
        self, tokens: torch.Tensor, aux: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """B x F x d → each layer's B x F x A output (aux: where routed layers add losses)."""
        outs: list[torch.Tensor] = []
        for layer in self.layers:
            tokens = layer(tokens)
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
