"""Numeric features: normalisation inside the model, and AutoInt-style embedding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

__all__ = ["ROBUST_CLIP", "NumericEmbedding", "NumericNormalizer"]

# `transform: robust` clips normalised values to ±ROBUST_CLIP (in std-like units,
# IQR / 1.349): a heavy tail or a stray 1e30 cannot push the net into saturation
ROBUST_CLIP = 5.0
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class _Stats(Protocol):
    transform: str
    mean: float
    std: float


class NumericNormalizer(nn.Module):
    """Raw values → normalised values: ``clip((f(x) - mean) / std)``, missing → ``fill``.

    ``f`` is ``sign(x)·log1p(|x|)`` where ``log1p[i]`` is set, else identity; ``clip[i]``
    bounds feature i's result (``inf``: no clipping). Everything up to the result is
    float64 (a unix timestamp or ``1e8 + N(0, 1)`` needs more than float32's 24 bits); the
    result is float32, the dtype of the rest of the net. A value is missing (→ ``fill``)
    when it is null / NaN / inf, when ``f(x)`` is beyond the float32 range (the encoder's
    overflow rule, ``mtrec.data.numeric.representable``) or when the result overflows.

    The statistics are fitted on the training split and stored as buffers, so a
    scripted model takes raw values and needs no side files.

    Args:
        mean, std, log1p: per-feature statistics (length N).
        fill: value of a missing input after normalisation.
        clip: per-feature bound of the normalised value (None: no clipping).
    """

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        log1p: list[bool],
        fill: float = 0.0,
        clip: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64))
        self.register_buffer("log1p", torch.tensor(log1p, dtype=torch.bool))
        bound = [float("inf")] * len(mean) if clip is None else clip
        # derived from the transforms, not fitted: kept out of checkpoints
        self.register_buffer("clip", torch.tensor(bound, dtype=torch.float64), persistent=False)
        self.fill = fill
        self.limit = _FLOAT32_MAX
        # skip work no feature needs (the normaliser runs on every batch)
        self.any_log = any(log1p)
        self.any_clip = clip is not None and any(c != float("inf") for c in clip)

    @classmethod
    def from_stats(cls, stats: Sequence[_Stats], fill: float = 0.0) -> NumericNormalizer:
        """The normaliser of fitted statistics (``mtrec.data.spec.NumericStats``), in order."""
        return cls(
            mean=[s.mean for s in stats],
            std=[s.std for s in stats],
            log1p=[s.transform.startswith("log1p") for s in stats],
            fill=fill,
            clip=[ROBUST_CLIP if s.transform == "robust" else float("inf") for s in stats],
        )

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        """B x N raw (float64; other float dtypes are upcast) → B x N normalised float32."""
        t = dense.to(torch.float64)
        if self.any_log:
            t = torch.where(self.log1p, torch.sign(t) * torch.log1p(torch.abs(t)), t)
        x = (t - self.mean) / self.std
        if self.any_clip:
            x = torch.maximum(torch.minimum(x, self.clip), -self.clip)
        x = x.to(torch.float32)
        ok = (torch.abs(t) <= self.limit) & torch.isfinite(x)
        return torch.where(ok, x, torch.full_like(x, self.fill))


class NumericEmbedding(nn.Module):
    """AutoInt's numeric field embedding: ``e_m = v_m · x_m``, plus, with ``num_bins`` K > 0,
    a piecewise-linear part ``Σ_k r_mk · W_mk`` over the ramps ``r_m`` of
    :class:`~mtrec.embeddings.piecewise.PiecewiseLinearEncoding`.

    ``W`` starts at zero, so at init the tokens are those of the plain embedding; with K = 0
    the module (parameters, init, output) is exactly the plain one.

    Args:
        num_features: N numeric fields.
        dim: embedding dim d.
        num_bins: K ramps per feature (0: off).

    Example::

        NumericEmbedding(3, 8)(torch.randn(4, 3)).shape  # torch.Size([4, 3, 8])
    """

    def __init__(self, num_features: int, dim: int, num_bins: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_features, dim))
        nn.init.normal_(self.weight, std=0.1)
        # N x K x d; registered only when on, so K = 0 keeps today's state-dict keys
        self.bin_weight: nn.Parameter | None = (
            nn.Parameter(torch.zeros(num_features, num_bins, dim)) if num_bins > 0 else None
        )

    def forward(self, values: torch.Tensor, ramps: torch.Tensor | None = None) -> torch.Tensor:
        """B x N normalised values (and B x N x K ramps when K > 0) → B x N x d."""
        out = values.unsqueeze(-1) * self.weight
        bin_weight = self.bin_weight
        if bin_weight is not None and ramps is not None:
            # Σ_k r_bnk · W_nkd: a batched (B x K) @ (K x d) per feature
            out = out + torch.einsum("bnk,nkd->bnd", ramps, bin_weight)
        return out
