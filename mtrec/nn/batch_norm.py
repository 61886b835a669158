"""BatchNorm over B x C whose training statistics do not depend on the thread count.

ATen's CPU batch norm gathers a training batch's per-channel sums in one buffer per
thread and adds the buffers afterwards, so the statistics (and everything trained after
them) round differently at 1 and 2 threads. That breaks the promise that a run gives the
same metrics whatever thread count it ran at, which ``training.threads: adaptive``
relies on (the count follows the machine's load mid-run). :class:`BatchNorm1d` computes
the same normalisation from sums over the batch dimension (the mean, then the mean
square of the centred values) and one affine pass, ``y = x · a + (β − mean · a)`` with
``a = γ / √(var + ε)`` (ATen's own form): ATen parallelises a reduction with several
outputs over the outputs, so each channel's sum runs in one fixed order
(``tests/test_batch_norm.py`` checks 1, 2 and 3 threads).
Its gradients come from autograd over the same ops: sums over the batch dimension again.

Same parameters, buffers and state-dict keys as ``torch.nn.BatchNorm1d`` (checkpoints load
either way); evaluation mode (running statistics, an element-wise map) runs ATen's kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchNorm1d", "batch_norm_training"]


@torch.fx.wrap  # one call in an fx graph: its shape checks would not trace
def batch_norm_training(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    momentum: float | None,
    eps: float,
) -> torch.Tensor:
    """B x C → B x C normalised with the batch's statistics; updates the running ones as
    ATen does: ``(1 - m) · running + m · batch value`` with ``momentum`` m (a cumulative
    average when it is None), of the mean and of the unbiased variance."""
    if x.dim() != 2:
        raise ValueError(f"BatchNorm1d expects B x C inputs, got shape {list(x.shape)}")
    batch = x.shape[0]
    if batch < 2:
        raise ValueError(
            f"BatchNorm1d needs at least 2 rows per training batch to estimate a "
            f"variance, got {batch}"
        )
    # statistics in float32 (under bf16 autocast too), the output in the input's dtype,
    # as ATen's batch norm does
    xf = x.to(torch.float32)
    # two passes of sums over the batch dimension (vectorised across the channels):
    # forward + backward 1.7x faster than torch.var_mean's per-channel Welford at B x C =
    # 2048 x 128, and as stable (the squares are of centred values)
    mean = xf.mean(0)
    centred = xf - mean
    var = (centred * centred).mean(0)
    scale = torch.rsqrt(var + eps) * weight
    shift = torch.addcmul(bias, mean, scale, value=-1.0)
    with torch.no_grad():
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked.item()) if momentum is None else momentum
        running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
        running_var.mul_(1.0 - factor).add_(var, alpha=factor * batch / (batch - 1))
    return torch.addcmul(shift, xf, scale).to(x.dtype)


class BatchNorm1d(nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` for B x C inputs whose training step does not depend on
    the thread count (see the module docstring).

    Always affine and tracking running statistics (the only form the expert banks use).

    Shapes: B x C → B x C (training needs B ≥ 2, as ``torch.nn.BatchNorm1d``).

    Example::

        norm = BatchNorm1d(4)
        norm(torch.randn(8, 4)).shape  # torch.Size([8, 4]); running stats updated
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        running_mean, running_var = self.running_mean, self.running_var
        tracked = self.num_batches_tracked
        if running_mean is None or running_var is None or tracked is None:
            raise RuntimeError("BatchNorm1d tracks running statistics")
        if self.training:
            return batch_norm_training(
                x, self.weight, self.bias, running_mean, running_var, tracked,
                self.momentum, self.eps,
            )  # fmt: skip
        # element-wise with the running statistics
        return F.batch_norm(
            x, running_mean, running_var, self.weight, self.bias, False, 0.0, self.eps
        )
