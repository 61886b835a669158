"""mtrec.nn.residual_norm: relu(LN(a + r)) on the fused CPU kernel against the ATen ops in
float64 (values and every gradient), independence from the thread count, NaN as in
ATen, and bad input named."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_kernels_built, needs_compiler, seeded

from mtrec.nn import field_attention
from mtrec.nn.residual_norm import residual_norm_relu

pytestmark = needs_compiler


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert_kernels_built()


def reference(a: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.nn.functional.layer_norm(a + r, (a.shape[-1],), w, b, 1e-5))


def run(fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def case(shape: tuple[int, ...], seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = seeded(seed)
    width = shape[-1]
    a, r = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w = torch.rand(width, generator=g) + 0.5
    b = 0.5 * torch.randn(width, generator=g)  # some normalised values below -b: ReLU zeros
    return [a, r, w, b], torch.randn(shape, generator=g)


# 8-32: the vector paths; 12 and 5: the scalar one; 300 x 41 rows: several blocks
@pytest.mark.parametrize(
    "shape", [(7, 5, 16), (300, 41, 16), (3, 8), (40, 24), (9, 41, 32), (11, 12), (4, 3, 5)]
)
def test_values_and_gradients_equal_the_aten_definition(shape: tuple[int, ...]) -> None:
    inputs, grad = case(shape, 1)
    fused = run(lambda a, r, w, b: residual_norm_relu(a, r, w, b, 1e-5), inputs, grad)
    exact = run(reference, [t.double() for t in inputs], grad)
    assert fused[0].dtype == torch.float32 and fused[0].shape == shape
    assert (fused[0] == 0).any() and (fused[0] > 0).any()  # both sides of the ReLU
    for got, want in zip(fused, exact, strict=True):
        # weight / bias gradients sum B·F float32 terms: tolerance grows with the rows
        tol = 1e-5 * max(1.0, got.numel() ** 0.5) if got.dim() == 1 else 2e-6
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=tol)


def test_same_result_at_any_thread_count() -> None:
    inputs, grad = case((97, 42, 16), 2)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(run(lambda a, r, w, b: residual_norm_relu(a, r, w, b, 1e-5), inputs, grad))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for got, want in zip(other, runs[0], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_nan_propagates_like_aten() -> None:
    inputs, grad = case((6, 4, 16), 3)
    inputs[0][1, 2, 3] = float("nan")
    fused = run(lambda a, r, w, b: residual_norm_relu(a, r, w, b, 1e-5), inputs, grad)
    aten = run(reference, inputs, grad)
    torch.testing.assert_close(fused[0].isnan(), aten[0].isnan(), rtol=0, atol=0)
    assert fused[0][1, 2].isnan().all() and not fused[0][0].isnan().any()
    torch.testing.assert_close(fused[1].isnan(), aten[1].isnan(), rtol=0, atol=0)


def test_double_backward_raises() -> None:
    inputs, _ = case((3, 4, 8), 4)
    a = inputs[0].requires_grad_()
    (g,) = torch.autograd.grad(
        residual_norm_relu(a, *inputs[1:], 1e-5).square().sum(), a, create_graph=True
    )
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|twice"):
        g.sum().backward()


def test_kernel_rejects_bad_input_by_name() -> None:
    ops = field_attention.kernel()
    x, w = torch.zeros(2, 3, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="a must be a float32"):
        ops.norm_relu_forward(x.double(), x, w, w, 1e-5)
    with pytest.raises(RuntimeError, match="a and r differ in shape"):
        ops.norm_relu_forward(x, torch.zeros(2, 3, 4), w, w, 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias must have the last dim's 8"):
        ops.norm_relu_forward(x, x, torch.ones(4), w, 1e-5)
    with pytest.raises(RuntimeError, match="rstd must have 6 values"):
        ops.norm_relu_backward(x, x, torch.ones(5), w, w)
