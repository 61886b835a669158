"""mtrec.nn.short_softmax: torch.softmax's values and gradients, eager, fx-traced and
TorchScript-scripted, on both sides of the SIMD-width switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtrec.nn import short_softmax
from mtrec.nn.short_softmax import SHORT_SOFTMAX_BELOW, softmax


class _Attention(nn.Module):
    """A tiny caller, as the blocks call it: scores → softmax over ``dim`` (``min_numel``
    0: the short path even on a tiny input)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return short_softmax.softmax(torch.tanh(x) * 3.0, self.dim, min_numel=0)


@pytest.mark.parametrize(
    ("shape", "dim"),
    [((64, 14, 14), -1), ((64, 3, 5), 1), ((32, 4), 1), ((5, 64), 0), ((8, 41, 41), -1)],
)
def test_values_and_gradients_equal_torch_softmax(shape: tuple[int, ...], dim: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen) * 4.0
    grad = torch.randn(*shape, generator=gen)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = softmax(ours, dim)
    y_ref = torch.softmax(ref, dim)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-6)
    # rows are distributions
    torch.testing.assert_close(y.sum(dim), torch.ones_like(y.sum(dim)))


def test_short_path_is_taken_below_the_width_and_its_gradient_is_exact() -> None:
    # float64 gradcheck of the hand-written backward (forced on with short_below)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: short_softmax._ShortSoftmax.apply(a, 1), (x,), eps=1e-6, atol=1e-8
    )
    # below the width the result comes from the short path: it saves only its output
    short = torch.randn(256, 3, requires_grad=True)
    assert type(softmax(short, 1).grad_fn).__name__ == "_ShortSoftmaxBackward"
    wide = torch.randn(256, SHORT_SOFTMAX_BELOW, requires_grad=True)
    assert type(softmax(wide, 1).grad_fn).__name__ == "SoftmaxBackward0"
    # other dtypes keep torch's own kernel (autocast, float64 checks)
    assert type(softmax(short.double(), 1).grad_fn).__name__ == "SoftmaxBackward0"
    # so do small tensors (a batch of one at serving: one call beats five)
    assert type(softmax(short[:8], 1).grad_fn).__name__ == "SoftmaxBackward0"


def test_large_logits_stay_finite() -> None:
    x = torch.tensor([[1000.0, 0.0, -1000.0], [88.0, 89.0, 90.0]])
    y = softmax(x, 1)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.softmax(x, 1))


@pytest.mark.parametrize("dim", [-1, 1])
def test_eager_fx_and_script_agree_with_a_seeded_reference(dim: int) -> None:
    module = _Attention(dim)
    x = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(7))
    traced = torch.fx.symbolic_trace(module)
    # fx keeps the function as one leaf call (its branches read sizes and autograd state)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"][-1] is softmax
    scripted = torch.jit.script(module)
    eager = module(x)
    torch.testing.assert_close(traced(x), eager, rtol=0, atol=0)
    torch.testing.assert_close(scripted(x), eager, rtol=0, atol=1e-7)
    # the reference: torch.softmax of the same scores, first row of the first sample
    ref = torch.softmax(torch.tanh(x) * 3.0, dim)
    torch.testing.assert_close(eager, ref, rtol=0, atol=1e-6)
    expected = {-1: [0.0063, 0.1475, 0.8462], 1: [0.0122, 0.6125, 0.7101]}[dim]
    torch.testing.assert_close(eager[0, 0], torch.tensor(expected), rtol=0, atol=1e-4)
