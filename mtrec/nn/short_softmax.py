"""Softmax over a short dimension, fast on CPU.

ATen's CPU softmax vectorises along the reduced dimension; when that dimension holds
fewer floats than one SIMD vector it falls back to a scalar loop measured at ~20 ns per
element against ~1.5 ns just above the width (torch 2.13, AVX-512, ``bench/softmax.py``).
Every softmax of this package is that short: AutoInt's attention over F ≈ 14 fields, the
MoH router, and every expert gate (2-8 experts). Below the width (and from
a few hundred elements on; a serving batch of one keeps the single ATen call) it runs
``exp(x - max) / sum`` as whole-tensor ops with a hand-written backward
(``dx = y ⊙ (dy - Σ y ⊙ dy)``); at or above it, and off CPU, it is ``torch.softmax``.

Same maths up to float rounding (≤ 2e-7 on unit-scale inputs); eager, ``torch.fx``
(a leaf call) and TorchScript (the forward as plain ops; no autograd needed there).
"""

from __future__ import annotations

import torch

__all__ = ["SHORT_SOFTMAX_BELOW", "softmax"]


def _vector_floats() -> int:
    """float32 lanes of the widest SIMD unit ATen dispatches to on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return 16
    if capability in ("AVX2", "ZVECTOR") or capability.startswith("SVE"):
        return 8
    return 4  # NEON, or the default (scalar) build


#: reduced dimensions shorter than this take the whole-tensor path (the SIMD width)
SHORT_SOFTMAX_BELOW: int = _vector_floats()


def _short_forward(x: torch.Tensor, dim: int) -> torch.Tensor:
    e = (x - x.amax(dim, keepdim=True)).exp_()
    return e.div_(e.sum(dim, keepdim=True))


class _ShortSoftmax(torch.autograd.Function):
    """Saves only the output: the softmax Jacobian needs nothing else."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:  # type: ignore[override]
        y = _short_forward(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        weighted = grad * y
        return weighted.sub_(y * weighted.sum(ctx.dim, keepdim=True)), None


def softmax(
    x: torch.Tensor, dim: int, short_below: int = SHORT_SOFTMAX_BELOW, min_numel: int = 512
) -> torch.Tensor:
    """``torch.softmax(x, dim)``, fast when ``x.size(dim) < short_below`` (float32 on CPU;
    the default is this CPU's SIMD width, a Python default so TorchScript sees a constant)
    and ``x`` holds at least ``min_numel`` elements: below that (a batch of one at serving)
    one ATen call beats five whole-tensor ops (measured crossover 400-800 elements)."""
    short = (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.size(dim) < short_below
        and x.numel() >= min_numel
    )
    if not short:
        return torch.softmax(x, dim=dim)
    if not torch.jit.is_scripting():
        if torch.is_grad_enabled() and x.requires_grad:
            return _ShortSoftmax.apply(x, dim)
    return _short_forward(x, dim)


# a leaf of torch.fx traces (its branches read tensor sizes and the autograd state). fx
# patches this module's global, so callers call it as ``short_softmax.softmax(...)``.
torch.fx.wrap("softmax")
