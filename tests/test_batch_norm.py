"""``mtrec.nn.batch_norm.BatchNorm1d``: torch's BatchNorm1d up to rounding, with training
statistics and gradients that do not depend on the thread count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from mtrec.nn.batch_norm import BatchNorm1d


@contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pair(channels: int, momentum: float | None = 0.1) -> tuple[BatchNorm1d, nn.BatchNorm1d]:
    """Ours and torch's, with the same random affine parameters."""
    torch.manual_seed(0)
    ours = BatchNorm1d(channels, momentum=momentum)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    ref = nn.BatchNorm1d(channels, momentum=momentum)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def step(norm: nn.Module, x: torch.Tensor, probe: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients of ``sum((norm(x) · probe)²)``."""
    x = x.clone().requires_grad_()
    y = norm(x)
    grads = torch.autograd.grad((y * probe).square().sum(), [x, norm.weight, norm.bias])
    return [y.detach(), *grads]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_torch_batch_norm(momentum: float | None) -> None:
    ours, ref = pair(24, momentum)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # running statistics over several batches
        x = torch.randn(300, 24, generator=gen) * 3 + 2
        probe = torch.randn(300, 24, generator=gen)
        # the parameter gradients are sums over 300 rows, in another order than ATen's
        for a, b in zip(step(ours, x, probe), step(ref, x, probe), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-6, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_eval_is_torch_batch_norm_bit_for_bit() -> None:
    ours, ref = pair(8)
    x = torch.randn(64, 8) * 2
    ours(x)  # one training batch: non-trivial running statistics
    ref.load_state_dict(ours.state_dict())
    ours.eval(), ref.eval()
    y = torch.randn(16, 8)
    assert torch.equal(ours(y), ref(y))


def test_values_and_gradients_do_not_depend_on_the_thread_count() -> None:
    gen = torch.Generator().manual_seed(2)
    # sizes where ATen's batch norm sums per-thread partials (and rounds differently)
    x = torch.randn(4096, 96, generator=gen) * 4 + 1
    probe = torch.randn(4096, 96, generator=gen)
    results = []
    for count in (1, 2, 3):
        ours, _ = pair(96)
        with threads(count):
            results.append([*step(ours, x, probe), ours.running_mean, ours.running_var])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_state_dicts_interchange_with_torch() -> None:
    ours, ref = pair(5)
    assert list(ours.state_dict()) == list(ref.state_dict())
    fresh = BatchNorm1d(5)
    fresh.load_state_dict(ref.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ref.state_dict().values())
    )


@pytest.mark.parametrize("mode", ["fx", "script"])
def test_fx_traced_and_scripted_match_eager(mode: str) -> None:
    ours, _ = pair(6)
    twin = BatchNorm1d(6)
    twin.load_state_dict(ours.state_dict())
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
    for training in (True, False):
        ours.train(training), twin.train(training)
        # an fx graph holds the mode it was traced in
        compiled = torch.fx.symbolic_trace(twin) if mode == "fx" else torch.jit.script(twin)
        assert torch.equal(ours(x), compiled(x))
        assert torch.equal(ours.running_var, twin.running_var)  # updated alike in training
    assert int(twin.num_batches_tracked) == 1


def test_bad_input_is_named() -> None:
    norm = BatchNorm1d(4)
    with pytest.raises(ValueError, match="B x C"):
        norm(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="at least 2 rows"):
        norm(torch.randn(1, 4))
    norm.eval()
    assert norm(torch.randn(1, 4)).shape == (1, 4)  # running statistics: one row is fine


def test_bf16_input_keeps_float32_statistics() -> None:
    # under bf16 autocast the expert outputs reach the norm in bf16
    ours, ref = pair(64)
    x = (torch.randn(512, 64, generator=torch.Generator().manual_seed(4)) * 3 + 60).bfloat16()
    y, y_ref = ours(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0.02, atol=0.02)
    for name in ("running_mean", "running_var"):  # from the float32 values of x
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
