"""Optimizers: FBGEMM-fused row-wise Adagrad for embeddings, Adam for dense parameters.

Embedding rows are updated inside the backward pass by FBGEMM's table-batched
kernel (only the rows a batch touched); an unfused ``EmbeddingBagCollection``
with a dense optimizer would rewrite every row of every table each step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad

from mtrec.config import ExperimentConfig

__all__ = [
    "LINEAR_HEAD",
    "LINEAR_PREFIX",
    "dense_param_groups",
    "dense_parameters",
    "fuse_sparse_optimizer",
    "make_dense_optimizer",
    "sparse_optimizers",
    "sparse_settings",
]


# module path prefix of the linear term's per-id weights (``MultiTaskModel.linear_arch``)
LINEAR_PREFIX = "linear_arch."


def sparse_settings(path: str, cfg: ExperimentConfig) -> dict[str, float]:
    """Row-wise Adagrad settings of the collection at module ``path``: ``model.linear``'s
    for the linear term's per-id weights, ``model.embedding``'s for every other table."""
    opt = cfg.model.linear if path.startswith(LINEAR_PREFIX) else cfg.model.embedding
    return {"lr": opt.learning_rate, "eps": opt.eps}


def fuse_sparse_optimizer(model: nn.Module, cfg: ExperimentConfig) -> nn.Module:
    """Swap every ``EmbeddingBagCollection`` in ``model`` for a fused one, keeping its weights."""
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, EmbeddingBagCollection):
                fused = FusedEmbeddingBagCollection(
                    child.embedding_bag_configs(),
                    optimizer_type=RowWiseAdagrad,
                    optimizer_kwargs=sparse_settings(f"{path}.{name}" if path else name, cfg),
                    device=torch.device("cpu"),
                )
                fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused)
    return model


def sparse_optimizers(model: nn.Module) -> dict[str, FusedEmbeddingBagCollection]:
    """The fused embedding modules of ``model`` by their module path."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, FusedEmbeddingBagCollection)
    }


# module path of the linear term's numeric weights and bias (``TaskArch.linear``)
LINEAR_HEAD = "task_arch.linear."


def dense_param_groups(
    named: Iterable[tuple[str, nn.Parameter]], cfg: ExperimentConfig
) -> list[dict[str, Any]]:
    """Adam parameter groups of the dense parameters ``named`` (in the model's order): the
    linear term's numeric weights and bias at ``model.linear.dense_learning_rate`` (a
    logistic regression's bias must reach the base-rate logit, far from 0 for rare labels,
    within a few hundred steps), everything else at ``training.learning_rate``. One group
    when the linear term is off (the layout of runs made before it)."""
    rest: list[nn.Parameter] = []
    head: list[nn.Parameter] = []
    for name, p in named:
        (head if LINEAR_HEAD in name else rest).append(p)
    groups: list[dict[str, Any]] = [{"params": rest}] if rest or not head else []
    if head:
        groups.append({"params": head, "lr": cfg.model.linear.dense_learning_rate})
    return groups


def dense_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters Adam trains, by name: every trainable one outside the fused tables."""
    fused_prefixes = tuple(f"{name}." for name in sparse_optimizers(model))
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and not name.startswith(fused_prefixes)
    ]


def make_dense_optimizer(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    tr = cfg.training
    return torch.optim.Adam(
        dense_param_groups(dense_parameters(model), cfg),
        lr=tr.learning_rate,
        weight_decay=tr.weight_decay,
        fused=True,
    )
