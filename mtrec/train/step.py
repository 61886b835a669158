"""One training step: the model, its optimizers and the loss of an experiment.

Shared by the training loop and the benchmarks, so what is measured is what trains.
"""

from __future__ import annotations

from typing import Any

import torch

from mtrec.config import ExperimentConfig
from mtrec.data.batch import Batch
from mtrec.data.spec import FeatureSpec
from mtrec.model import MultiTaskModel, build_model, remap_legacy_train_state
from mtrec.train.losses import WeightedBCELoss, sparse_penalties
from mtrec.train.optim import fuse_sparse_optimizer, make_dense_optimizer, sparse_optimizers

__all__ = ["TrainStep"]


class TrainStep:
    """Model with FBGEMM-fused embeddings (row-wise Adagrad applied inside backward),
    Adam on dense parameters, weighted BCE over tasks; ``step(batch)`` trains on one batch.

    With ``training.precision: bf16`` the forward runs under CPU bf16 autocast (dense
    matmuls in bf16); the loss, gradients' accumulation and optimizer state stay fp32.

    With ``training.compile`` the dense task arch's forward (and so its backward) runs
    through ``torch.compile`` (Inductor: generated C++ kernels on CPU); the sparse
    lookup stays eager (FBGEMM's fused backward is not traceable). Only the training
    step is compiled: ``self.model`` stays the eager module, so checkpoints, evaluation
    and TorchScript export see the same weights and code as without it.
    """

    def __init__(self, cfg: ExperimentConfig, spec: FeatureSpec) -> None:
        torch.manual_seed(cfg.seed)
        self.model: MultiTaskModel = build_model(cfg, spec)
        fuse_sparse_optimizer(self.model, cfg)
        self.dense_opt = make_dense_optimizer(self.model, cfg)
        self.fused = sparse_optimizers(self.model)
        self.loss_fn = WeightedBCELoss([t.weight for t in cfg.tasks])
        self.bf16 = cfg.training.precision == "bf16"
        self.penalties = sparse_penalties(self.model, cfg)
        self.model.train()
        # B x F_s x d tokens, B x F_n float64 -> (B x T logits, aux losses); the compiled
        # graph is built on the first step (tens of seconds) and reused; a new batch size
        # (an epoch's last batch) compiles once more with a dynamic batch dimension
        self._task_forward = (
            torch.compile(self.model.task_arch.forward_with_aux) if cfg.training.compile else None
        )

    def step(self, batch: Batch) -> torch.Tensor:
        """Forward, backward (updates looked-up embedding rows), Adam step; returns the loss."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if self._task_forward is None:
                logits, aux = self.model.forward_with_aux(batch.sparse, batch.dense)
            else:  # the same computation as MultiTaskModel.forward_with_aux
                tokens, linear_ids = self.model.sparse_parts(batch.sparse)
                logits, aux = self._task_forward(tokens, batch.dense, linear_ids)
        if self.penalties:
            aux = {**aux, **{name: p.take() for name, p in self.penalties.items()}}
        loss = self.loss_fn(logits, batch.labels, aux)
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.dense_opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "dense_optimizer": self.dense_opt.state_dict(),
            "sparse_optimizer": {
                n: m.fused_optimizer().state_dict() for n, m in self.fused.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = remap_legacy_train_state(state)  # a last.pt from before the model split
        self.model.load_state_dict(state["model"])
        self.dense_opt.load_state_dict(state["dense_optimizer"])
        for name, module in self.fused.items():
            module.fused_optimizer().load_state_dict(state["sparse_optimizer"][name])

    def embedding_rows(self) -> int:
        """Total rows over every embedding table of the model."""
        total = 0
        for m in self.model.modules():
            configs = getattr(m, "embedding_bag_configs", None)
            if callable(configs):
                total += sum(c.num_embeddings for c in configs())
        return total
