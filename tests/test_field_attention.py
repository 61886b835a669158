"""mtrec.nn.field_attention: the fused CPU kernel's values and gradients against the ATen
definition (float64), independence from the thread count, and how InteractingLayer uses
it (training only; eval, torch.fx and TorchScript keep the ATen path)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_kernels_built, needs_compiler, seeded

from mtrec.interaction import AutoInt, InteractingLayer
from mtrec.nn import field_attention
from mtrec.nn.field_attention import HEAD_DIMS, attend


def attend_reference(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """The definition the kernel is tested against, in ATen ops (any dtype):
    B x F x 3A → B x F x A, softmax(Q Kᵀ · scale) V per head, heads concatenated."""
    b, f, a = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = (t.reshape(b, f, heads, a // heads).transpose(1, 2) for t in qkv.split(a, -1))
    probs = torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)), dim=-1)
    return torch.matmul(probs, v).transpose(1, 2).reshape(b, f, a)


pytestmark = needs_compiler


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert_kernels_built()


def grads(fn, qkv: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = qkv.detach().clone().requires_grad_()
    out = fn(leaf)
    out.backward(grad.to(out.dtype))
    return out.detach(), leaf.grad


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize(
    ("rows", "fields", "heads"), [(1, 1, 1), (7, 5, 2), (8, 42, 2), (33, 14, 3)]
)
def test_values_and_gradients_equal_the_aten_definition(
    rows: int, fields: int, heads: int, head_dim: int
) -> None:
    g = seeded(rows * 100 + fields)
    qkv = torch.randn(rows, fields, 3 * heads * head_dim, generator=g) * 1.5
    grad = torch.randn(rows, fields, heads * head_dim, generator=g)
    scale = head_dim**-0.5
    out, dqkv = grads(lambda t: attend(t, heads, scale), qkv, grad)
    ref, dref = grads(lambda t: attend_reference(t, heads, scale), qkv.double(), grad.double())
    aten, daten = grads(lambda t: attend_reference(t, heads, scale), qkv, grad)
    # within a few times the rounding error of ATen's own float32 path
    for ours, theirs, exact in ((out, aten, ref), (dqkv, daten, dref)):
        err, aten_err = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
        assert err <= 4 * aten_err + 2e-6, (float(err), float(aten_err))


def test_extreme_scores_stay_finite_and_exact() -> None:
    """Scores far apart (one key takes all the weight, others underflow) and equal."""
    qkv = torch.zeros(9, 6, 3 * 8)
    qkv[:, :, :8] = 30.0  # queries
    qkv[:, 0, 8:16] = 30.0  # key 0 dominates every query
    qkv[:, :, 16:] = torch.arange(6.0).view(1, 6, 1)  # value of key j: j
    qkv[8] = 0.0  # row 8: all scores equal
    qkv[8, :, 16:] = torch.arange(6.0).view(6, 1)
    out, dqkv = grads(lambda t: attend(t, 1, 8**-0.5), qkv, torch.ones(9, 6, 8))
    assert torch.isfinite(dqkv).all()
    torch.testing.assert_close(out[:8], torch.zeros(8, 6, 8), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[8], torch.full((6, 8), 2.5), rtol=0, atol=1e-6)


def test_same_result_at_any_thread_count() -> None:
    g = seeded(3)
    qkv, grad = torch.randn(61, 42, 96, generator=g), torch.randn(61, 42, 32, generator=g)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(grads(lambda t: attend(t, 2, 0.25), qkv, grad))
    finally:
        torch.set_num_threads(before)
    for out, dqkv in runs[1:]:
        torch.testing.assert_close(out, runs[0][0], rtol=0, atol=0)
        torch.testing.assert_close(dqkv, runs[0][1], rtol=0, atol=0)


def test_kernel_rejects_bad_input_by_name() -> None:
    ops = field_attention.kernel()
    with pytest.raises(RuntimeError, match="qkv must be a float32"):
        ops.forward(torch.zeros(2, 3, 24, dtype=torch.float64), 2, 0.5)
    with pytest.raises(RuntimeError, match="divisible by heads"):
        ops.forward(torch.zeros(2, 3, 25), 2, 0.5)
    with pytest.raises(RuntimeError, match="head dim 6"):
        ops.forward(torch.zeros(2, 3, 36), 2, 0.5)


def layer_grads(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_()
    out = layer(leaf)
    out.backward(grad)
    return [out.detach(), leaf.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize(
    ("heads", "routing", "layer_norm"), [(2, None, True), (2, None, False), (4, (1, 2, 0.01), True)]
)
def test_layer_trains_on_the_kernel_like_the_aten_path(
    heads: int, routing: tuple[int, int, float] | None, layer_norm: bool
) -> None:
    torch.manual_seed(0)
    layer = InteractingLayer(16, 32, heads, True, layer_norm, routing=routing).train()
    g = seeded(5)
    x, grad = torch.randn(19, 11, 16, generator=g), torch.randn(19, 11, 32, generator=g)
    assert field_attention.usable(x, layer.head_dim)
    on_kernel = layer_grads(layer, x, grad)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(field_attention.ENV_SWITCH, "aten")
        mp.setattr(field_attention, "_state", {"tried": False, "ops": None})
        assert not field_attention.usable(x, layer.head_dim)
        on_aten = layer_grads(layer, x, grad)
    for i, (a, b) in enumerate(zip(on_kernel, on_aten, strict=True)):
        # output and input gradient: per element; parameter gradients sum B·F rows, where
        # each path is ~1e-5 from the float64 result (the other rounding order)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 if i < 2 else 3e-5)


def test_only_training_forwards_use_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = field_attention.attend
    monkeypatch.setattr(field_attention, "attend", lambda *a: calls.append(1) or real(*a))
    net = AutoInt(16, num_layers=2, attention_dim=32, num_heads=2, dnn=[8], num_fields=9)
    x = torch.randn(10, 9, 16, generator=seeded(2))
    net.train()(x).sum().backward()
    assert len(calls) == 2  # both layers
    with torch.no_grad():
        net.train()(x)
    net.eval()(x)
    assert len(calls) == 2  # no gradients, or eval mode: the ATen path
    odd = InteractingLayer(12, 12, 2).train()  # d_h = 6 is not compiled
    odd(torch.randn(4, 3, 12)).sum().backward()
    dropped = InteractingLayer(16, 16, 2, dropout=0.1).train()  # attention dropout: ATen
    dropped(torch.randn(4, 3, 16)).sum().backward()
    assert len(calls) == 2
    # fx tracing (in train mode too) and scripting record the ATen path; they match eager
    traced = torch.fx.symbolic_trace(net.train())
    assert "attend" not in traced.code and "bmm" in traced.code
    scripted = torch.jit.script(net.eval())
    traced.eval()
    torch.testing.assert_close(scripted(x), net(x), rtol=0, atol=0)
    torch.testing.assert_close(traced(x), net(x), rtol=0, atol=0)
    # autocast (training.precision: bf16) and torch.compile (training.compile) take ATen
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum().backward()
    assert len(calls) == 2
    compiled = torch.compile(net.layers[0].forward_with_balance, backend="eager")
    compiled(x)[0].sum().backward()
    assert len(calls) == 2


def test_non_finite_scores_propagate_like_aten() -> None:
    """A NaN or inf in a query or key gives NaN outputs exactly where ATen's softmax does,
    instead of being clamped away."""
    g = seeded(4)
    qkv = torch.randn(9, 6, 3 * 16, generator=g)
    qkv[0, 2, 3] = float("nan")  # query 2 of row 0
    qkv[1, 4, 16 + 5] = float("inf")  # key 4 of row 1: +-inf scores, NaN where +inf
    out = attend(qkv, 2, 0.25)
    ref = attend_reference(qkv, 2, 0.25)
    torch.testing.assert_close(out.isnan(), ref.isnan(), rtol=0, atol=0)
    assert out[0, 2, :8].isnan().all() and out[1, :, :8].isnan().any()
    assert torch.isfinite(out[2:]).all()


def test_double_backward_raises() -> None:
    qkv = torch.randn(3, 4, 24, requires_grad=True)
    (grad,) = torch.autograd.grad(attend(qkv, 1, 0.5).square().sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|twice"):
        grad.sum().backward()


def test_switch_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(field_attention.ENV_SWITCH, "aten")
    monkeypatch.setattr(field_attention, "_state", {"tried": False, "ops": None})
    assert field_attention.kernel() is None
    monkeypatch.setenv(field_attention.ENV_SWITCH, "fast")
    monkeypatch.setattr(field_attention, "_state", {"tried": False, "ops": None})
    with pytest.raises(ValueError, match="MTREC_FIELD_ATTENTION='fast'"):
        field_attention.kernel()
