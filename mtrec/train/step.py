"""One training step: the model, its optimizers and the loss of an experiment.

Shared by the training loop and the benchmarks, so what is measured is what trains.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from mtrec.config import ExperimentConfig
from mtrec.data.batch import Batch
from mtrec.data.spec import FeatureSpec
from mtrec.model import MultiTaskModel, build_model, remap_legacy_train_state
from mtrec.train.averaging import DenseAverage
from mtrec.train.embedding_reset import clear_sparse_state, deep_tables, fresh_tables
from mtrec.train.losses import WeightedBCELoss, sparse_penalties
from mtrec.train.optim import (
    dense_parameters,
    fuse_sparse_optimizer,
    make_dense_optimizer,
    sparse_optimizers,
)
from mtrec.train.schedule import scheduled_rates
from mtrec.train.step_options import load_options_state, options_state

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

    With ``training.lr_schedule`` other than constant the learning rates decay over
    ``planned_steps`` steps (:mod:`mtrec.train.schedule`; the loop passes the plan);
    with ``training.ema_decay`` the dense parameters' moving average
    (:mod:`mtrec.train.averaging`) is updated after every step: :meth:`averaged` applies
    it for validation and :meth:`eval_model_state` is the state ``best.pt`` holds.

    With ``training.reset_embeddings_each_epoch`` the loop calls :meth:`reset_embeddings`
    at the start of every epoch after the first (MEDA, :mod:`mtrec.train.embedding_reset`).
    """

    def __init__(
        self, cfg: ExperimentConfig, spec: FeatureSpec, planned_steps: int | None = None
    ) -> None:
        torch.manual_seed(cfg.seed)
        tr = cfg.training
        self.seed = cfg.seed
        self.model: MultiTaskModel = build_model(cfg, spec)
        fuse_sparse_optimizer(self.model, cfg)
        self.dense_opt = make_dense_optimizer(self.model, cfg)
        self.fused = sparse_optimizers(self.model)
        self.steps = 0  # optimizer steps taken (the schedule's clock)
        self.rates = scheduled_rates(
            tr, planned_steps, self.dense_opt, [m.fused_optimizer() for m in self.fused.values()]
        )
        self.average = (
            DenseAverage(dense_parameters(self.model), tr.ema_decay)
            if tr.ema_decay is not None
            else None
        )
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
        if self.rates is not None:
            # before the forward: FBGEMM's lookup takes the tables' rate when it runs
            self.rates.apply(self.steps)
        loss, _ = self._loss(batch)
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()  # the fused tables step here, at the rate set before the forward
        self.dense_opt.step()
        if self.average is not None:
            self.average.update()
        self.steps += 1
        return loss

    def reset_embeddings(self, epoch: int) -> None:
        """MEDA before ``epoch`` (0-based): the deep embedding tables drawn afresh and their
        row-wise Adagrad state zeroed; the linear term's tables and the dense parameters
        are left as they are."""
        deep = {path: self.fused[path] for path in deep_tables(self.fused)}
        # the fused modules' state dicts hold views of FBGEMM's weights
        views = {f"{p}.{k}": w for p, m in deep.items() for k, w in m.state_dict().items()}
        configs = {path: m.embedding_bag_configs() for path, m in deep.items()}
        with torch.no_grad():
            for key, weight in fresh_tables(configs, self.seed, epoch):
                views.pop(key).copy_(weight)
            for module in deep.values():
                clear_sparse_state(module.fused_optimizer().state.values())
        if views:  # every table has its config: a table left out would keep training
            raise RuntimeError(f"embedding reset drew no weights for {sorted(views)}")

    def _loss(
        self, batch: Batch, lookups_as_leaves: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The training loss of ``batch`` (task losses, auxiliary losses, penalties) and
        the looked-up tensors it was computed from: the deep tokens and the linear term's
        per-id weights (those present). ``lookups_as_leaves`` cuts them from the tables,
        so the loss's gradient stops at them (:meth:`trial_gradients`)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            # MultiTaskModel.forward_with_aux in its two parts
            tokens, linear_ids = self.model.sparse_parts(batch.sparse)
            if lookups_as_leaves:
                tokens, linear_ids = (
                    None if t is None else t.detach().requires_grad_() for t in (tokens, linear_ids)
                )
            forward = self._task_forward or self.model.task_arch.forward_with_aux
            logits, aux = forward(tokens, batch.dense, linear_ids)
        if self.penalties:  # taking them also clears what they kept
            aux = {**aux, **{name: p.take() for name, p in self.penalties.items()}}
        lookups = [t for t in (tokens, linear_ids) if t is not None]
        return self.loss_fn(logits, batch.labels, aux), lookups

    def trial_gradients(self, batch: Batch) -> list[torch.Tensor]:
        """The loss, its gradients with respect to the looked-up tensors (deep tokens and
        the linear term's per-id weights) and every dense gradient that :meth:`step` would
        compute on ``batch``, without training: no parameter, buffer (BatchNorm's running
        statistics) or random stream changes.

        What :mod:`mtrec.train.adaptive_threads` compares between thread counts; the
        lookups' gradients stand for the fused tables' update, which backward applies in
        place and so cannot be taken without it.
        """
        rng = torch.get_rng_state()
        buffers = [b.clone() for b in self.model.buffers()]
        try:
            loss, lookups = self._loss(batch, lookups_as_leaves=True)
            params = [p for _, p in dense_parameters(self.model)]
            grads = torch.autograd.grad(loss, [*lookups, *params], allow_unused=True)
        finally:
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers, strict=True):
                    b.copy_(saved)
            torch.set_rng_state(rng)
        return [loss.detach(), *(g for g in grads if g is not None)]

    def averaged(self) -> AbstractContextManager[None]:
        """A context in which the model holds the weights it is validated with: the
        dense average when ``training.ema_decay`` is set, else the raw weights."""
        return self.average.applied() if self.average is not None else nullcontext()

    def eval_model_state(self) -> dict[str, Any]:
        """The model state ``best.pt`` holds: the dense average in place of the dense
        parameters when ``training.ema_decay`` is set, else ``model.state_dict()``."""
        if self.average is None:
            return self.model.state_dict()
        return self.average.model_state(self.model)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "dense_optimizer": self.dense_opt.state_dict(),
            "sparse_optimizer": {
                n: m.fused_optimizer().state_dict() for n, m in self.fused.items()
            },
        }
        # only with the options on: a last.pt without them is the layout Ray workers share
        return {**state, **options_state(self.steps, self.rates, self.average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = remap_legacy_train_state(state)  # a last.pt from before the model split
        self.model.load_state_dict(state["model"])
        self.dense_opt.load_state_dict(state["dense_optimizer"])
        for name, module in self.fused.items():
            module.fused_optimizer().load_state_dict(state["sparse_optimizer"][name])
        self.steps = load_options_state(state, self.rates, self.average)

    def embedding_rows(self) -> int:
        """Total rows over every embedding table of the model."""
        total = 0
        for m in self.model.modules():
            configs = getattr(m, "embedding_bag_configs", None)
            if callable(configs):
                total += sum(c.num_embeddings for c in configs())
        return total
