"""FastDropout: inverted dropout from 15-bit pieces of 63-bit draws (mtrec.nn.layers)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx

from mtrec.nn.layers import FastDropout


def keep_share(out: torch.Tensor) -> float:
    return float((out != 0).double().mean())


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_keep_rate_and_scale_are_unbiased(p: float) -> None:
    """Each element is kept with probability 1 - p (within 5 binomial standard errors),
    every one of the four 15-bit pieces of a 63-bit draw alike (the mask drops each
    int16's top bit, so the draw's missing 64th bit is never read), and the kept ones are
    scaled so the mean is preserved."""
    torch.manual_seed(0)
    drop = FastDropout(p).train()
    assert abs(drop.threshold / 2**15 - p) <= 2**-16
    assert drop.scale == pytest.approx(1 / (1 - drop.threshold / 2**15), rel=1e-12)
    n = 1 << 22
    out = drop(torch.ones(n))
    kept = out != 0
    assert torch.all(out[kept] == drop.scale)
    se = math.sqrt(p * (1 - p) / (n / 4))
    for piece in range(4):  # element i is piece i % 4 of draw i // 4
        assert abs(float(kept[piece::4].double().mean()) - (1 - p)) < 5 * se
    assert float(out.double().mean()) == pytest.approx(1.0, abs=5 * math.sqrt(p / (1 - p) / n))


def test_identity_when_off_or_evaluating() -> None:
    x = torch.randn(5, 7)
    assert FastDropout(0.0).train()(x) is x
    assert FastDropout(0.3).eval()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)
    for p in (1e-6, 1 - 1e-6):  # would round to 0 (silently off) or 1 (division by zero)
        with pytest.raises(ValueError, match="steps of 2\\^-15"):
            FastDropout(p)
    assert FastDropout(2**-15).threshold == 1 and FastDropout(1 - 2**-15).threshold == 32767


def test_seeded_masks_repeat_and_gradient_is_the_mask() -> None:
    drop = FastDropout(0.25).train()
    x = torch.randn(33, 17, requires_grad=True)  # odd size: the last draw is partly used
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, drop(x))  # a fresh mask on the next call
    a.sum().backward()
    mask = torch.where(a != 0, drop.scale, 0.0)
    assert torch.equal(x.grad, mask)
    assert torch.equal(a, x.detach() * mask)


def test_fx_trace_matches_eager_and_script_keeps_the_rate() -> None:
    """fx records the same ops (same masks from the same seed); a scripted module in
    training mode draws its mask another way (one float per element) with the same p."""
    drop = FastDropout(0.2).train()
    x = torch.ones(4096, 16)
    torch.manual_seed(1)
    eager = drop(x)
    traced = torch.fx.symbolic_trace(drop)
    torch.manual_seed(1)
    assert torch.equal(traced(x), eager)
    scripted = torch.jit.script(drop)
    out = scripted(x)
    assert set(out.unique().tolist()) <= {0.0, float(torch.tensor(drop.scale))}
    assert abs(keep_share(out) - 0.8) < 0.01
    assert torch.equal(torch.jit.script(FastDropout(0.2).eval())(x), x)
