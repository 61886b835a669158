"""Residual sum, LayerNorm and ReLU in one pass for training on CPU
(``csrc/residual_norm.cpp``, built with the fused field attention).

An interacting layer with a residual and LayerNorm ends in ``relu(LN(attention + W_res
x))``: ATen runs three passes over the B x F x A tensor forward (add, layer_norm, relu)
and two backward, each in rows of A = 8-32 floats, where its per-row set-up costs about
as much as the arithmetic. The kernel reads each row once forward and once backward and
saves the normalised values and 1/std (B x F x A + B x F) instead of the sum, its mean
and std, and the output. Weight and bias gradients are summed in fixed blocks of rows,
in order: the result does not depend on the thread count. Same maths as the ATen ops up
to float rounding.

Used where the fused attention is (``InteractingLayer``'s training forwards, through
:func:`mtrec.nn.field_attention.usable`); every score comes from the ATen path.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mtrec.nn import field_attention

__all__ = ["residual_norm_relu"]


class _ResidualNormRelu(torch.autograd.Function):
    """Saves the normalised values, 1/std, weight and bias."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, a: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> torch.Tensor:
        y, xhat, rstd = field_attention.kernel().norm_relu_forward(a, r, weight, bias, eps)
        ctx.save_for_backward(xhat, rstd, weight, bias)
        return y

    @staticmethod
    @once_differentiable  # no second-order terms: a double backward raises
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xhat, rstd, weight, bias = ctx.saved_tensors
        gs, gw, gb = field_attention.kernel().norm_relu_backward(grad, xhat, rstd, weight, bias)
        return gs, gs, gw, gb, None


def residual_norm_relu(
    a: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``relu(layer_norm(a + r, weight, bias, eps))`` over the last dim on the fused kernel:
    ... x A, ... x A → ... x A (float32 CPU). Callers check
    :func:`mtrec.nn.field_attention.usable` first."""
    return _ResidualNormRelu.apply(a, r, weight, bias, eps)
