"""Feature interaction layers (AutoInt) between field tokens and the multi-task block."""

from __future__ import annotations

from mtrec.config import InteractionConfig
from mtrec.interaction.autoint import AutoInt, InteractingLayer

__all__ = ["AutoInt", "InteractingLayer", "build_interaction"]


def build_interaction(cfg: InteractionConfig, num_fields: int, dim: int) -> AutoInt | None:
    """The ``model.interaction`` module over F = ``num_fields`` tokens of width ``dim``
    (None for ``type: none``: the block reads the flattened tokens directly)."""
    if cfg.type == "none":
        return None
    return AutoInt(
        dim,
        cfg.layers,
        cfg.attention_dim,
        cfg.heads,
        use_residual=cfg.residual,
        layer_norm=cfg.layer_norm,
        dropout=cfg.dropout,
        dnn=cfg.dnn,
        num_fields=num_fields,
        routing=(
            None
            if cfg.heads_routing is None
            else (
                cfg.heads_routing.shared,
                cfg.heads_routing.top_k,
                cfg.heads_routing.balance_weight,
            )
        ),
    )
