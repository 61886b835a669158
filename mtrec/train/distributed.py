"""Sharded training step: the model under torchrec ``DistributedModelParallel`` (DMP).

Runs inside each worker of a ``torch.distributed`` process group (gloo on CPU, NCCL on
GPU). Embedding tables are declared on the ``meta`` device, planned by torchrec's
sharding planner (one plan agreed by all ranks) and materialised as FBGEMM
table-batched kernels with row-wise Adagrad fused into backward; dense layers are
replicated (DDP) and trained by Adam, exactly as in :class:`mtrec.train.step.TrainStep`.

Every rank starts from the weights the local loop starts from (the model is built
once under ``cfg.seed`` and each rank copies its shards), so one worker reproduces a
local run step for step.

States:

* :meth:`ShardedTrainStep.sharded_state` / :meth:`load_sharded_state`: this rank's
  shards (model, fused optimizer) and the dense parts; what a Ray checkpoint holds.
  Loading needs the same world size and plan (checked).
* :meth:`full_state` / :meth:`load_full_state`: the unsharded state in the local
  format of ``checkpoints/last.pt`` (``TrainStep.state_dict``), gathered on rank 0;
  a run can resume from it with any number of workers, or locally.

Example (inside an initialised process group)::

    step = ShardedTrainStep(cfg, spec, device=torch.device("cpu"))
    for batch in batches:
        loss = step.step(batch)
    state = step.full_state()  # rank 0: TrainStep.state_dict() layout; others: None
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.config import ExperimentConfig
from mtrec.data.batch import Batch
from mtrec.data.spec import FeatureSpec
from mtrec.model import MultiTaskModel, build_model, remap_legacy_train_state
from mtrec.train.averaging import DenseAverage
from mtrec.train.embedding_reset import deep_tables, fresh_tables
from mtrec.train.losses import WeightedBCELoss, sparse_penalties
from mtrec.train.optim import dense_param_groups, sparse_settings
from mtrec.train.schedule import scheduled_rates
from mtrec.train.step_options import load_options_state, options_state

__all__ = [
    "CPU_SHARDING_TYPES",
    "GPU_SHARDING_TYPES",
    "ShardedTrainStep",
    "ShardingError",
    "check_sharding_types",
    "plan_hints",
]

# Sharding types whose tables run on FBGEMM's fused table-batched kernels. On CPU
# (gloo) row-wise sharding is not available; data_parallel is left out everywhere: it
# keeps tables as dense parameters under the dense optimizer (a dense gradient over
# every row of every table each step, see shared/STACK.md).
CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise")
GPU_SHARDING_TYPES = (*CPU_SHARDING_TYPES, "row_wise", "table_row_wise")

_PREFIX = "model."  # state-dict keys under the _WithAux adapter


class ShardingError(ValueError):
    """Sharding types that cannot work on this device; the message names them and the fix."""


def check_sharding_types(types: Sequence[str] | None, use_gpu: bool) -> tuple[str, ...]:
    """The sharding types to plan with (default: every supported one for the device)."""
    allowed = GPU_SHARDING_TYPES if use_gpu else CPU_SHARDING_TYPES
    if not types:
        return allowed
    bad = [t for t in types if t not in allowed]
    if bad:
        device = "GPU (NCCL)" if use_gpu else "CPU (gloo)"
        raise ShardingError(
            f"sharding types {bad} are not supported on {device}; choose from {list(allowed)}"
        )
    return tuple(types)


class _WithAux(nn.Module):
    """``forward`` = ``MultiTaskModel.forward_with_aux``: DMP and DDP only run ``forward``,
    and the auxiliary losses (e.g. MoH balance) must go through it."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.model.forward_with_aux(sparse, dense)


def _embedding_collections(model: nn.Module) -> dict[str, EmbeddingBagCollection]:
    return {n: m for n, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)}


def _to_meta(model: nn.Module, cfg: ExperimentConfig) -> None:
    """Replace every EmbeddingBagCollection by one on the meta device (DMP allocates
    only each rank's shards) carrying the row-wise Adagrad that FBGEMM fuses."""
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, EmbeddingBagCollection):
                meta = EmbeddingBagCollection(
                    child.embedding_bag_configs(), device=torch.device("meta")
                )
                settings = sparse_settings(f"{path}.{name}" if path else name, cfg)
                apply_optimizer_in_backward(RowWiseAdagrad, meta.parameters(), settings)
                setattr(parent, name, meta)


def _owner(meta: Any, default: int) -> int:
    """The rank a shard (``ShardMetadata``) lives on."""
    return meta.placement.rank() if meta.placement is not None else default


def _shards(t: ShardedTensor) -> list[tuple[list[int], torch.Tensor]]:
    return [(list(s.metadata.shard_offsets), s.tensor) for s in t.local_shards()]


def _local_parts(value: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
    """This rank's parts of a state tensor with their offsets: a sharded tensor's local
    shards, or a replicated tensor whole."""
    if isinstance(value, ShardedTensor):
        return _shards(value)
    return [([0] * value.dim(), value)]


def _region(offsets: Sequence[int], tensor: torch.Tensor) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))


def _momentum_names(dmp_key: str, state_key: str) -> tuple[str, str, str]:
    """DMP ``a.b.embedding_bags.t_x.weight`` / ``t_x.momentum1`` → the local
    ``FusedEmbeddingBagCollection`` names: module ``a.b``, param ``t_x.weight``, state
    ``t_x.weight.momentum_1``."""
    module, param = dmp_key.split(".embedding_bags.", 1)
    table = param.rsplit(".", 1)[0]
    suffix = state_key[len(table) + 1 :] if state_key.startswith(table + ".") else state_key
    suffix = {"momentum1": "momentum_1", "momentum2": "momentum_2"}.get(suffix, suffix)
    return module, param, f"{param}.{suffix}"


class ShardedTrainStep:
    """The model of ``cfg`` sharded over the process group, its optimizers and loss.

    Args:
        cfg: the experiment.
        spec: fitted feature spec (numeric statistics, kept ids).
        device: this rank's device (CPU, or its CUDA device).
        sharding_types: allowed sharding types (see :func:`check_sharding_types`).
        batch_size: per-rank batch size the planner costs the plan with.
        local_world_size: ranks per machine (default: all of them on one).
        planned_steps: the steps each rank will take (``training.lr_schedule`` decays the
            rates over them, as :class:`~mtrec.train.step.TrainStep` does; every rank steps
            in lockstep, so all hold the same rates).

    ``step(batch)`` trains on this rank's batch (every rank must call it the same number
    of times); ``logits(batch)`` runs the forward only (also collective).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        spec: FeatureSpec,
        *,
        device: torch.device,
        sharding_types: Sequence[str] | None = None,
        batch_size: int | None = None,
        local_world_size: int | None = None,
        planned_steps: int | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ShardedTrainStep needs an initialised torch.distributed group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        types = check_sharding_types(sharding_types, device.type == "cuda")
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, spec)
        # the local loop's initial weights; each rank copies its shards after planning
        init = {_PREFIX + k: v for k, v in model.state_dict().items()}
        # every collection's table configs (MEDA draws whole tables from them)
        self.tables = {
            path: ebc.embedding_bag_configs() for path, ebc in _embedding_collections(model).items()
        }
        self.seed = cfg.seed
        _to_meta(model, cfg)
        wrapped = _WithAux(model)
        # torchrec's floor for column shards (128 wide) keeps usual tables whole: on CPU
        # a lookup costs per row more than per column, so narrower shards do not pay
        constraints = {
            c.name: ParameterConstraints(sharding_types=list(types))
            for ebc in _embedding_collections(model).values()
            for c in ebc.embedding_bag_configs()
        }
        topology = TopologyFactory.create_topology(
            TrainerConfig(
                world_size=self.world_size, local_world_size=local_world_size or self.world_size
            ),
            kernel_config=KernelConfig(compute_device=device.type),
        )
        planner = EmbeddingShardingPlanner(
            topology=topology,
            batch_size=batch_size or cfg.training.batch_size,
            constraints=constraints,
            debug=False,
        )
        self.plan = planner.collective_plan(wrapped, get_default_sharders(), dist.GroupMember.WORLD)
        cached = uvm_cached_deep_tables(self.plan.plan)
        if cfg.training.reset_embeddings_each_epoch and cached:
            raise ValueError(
                f"training.reset_embeddings_each_epoch: the sharding planner put {cached} on "
                "FBGEMM's UVM cache (fused_uvm_caching), whose cached rows a reset cannot "
                "reach; set training.reset_embeddings_each_epoch=false, or give the tables "
                "device memory (fewer rows, more workers)"
            )
        self.model = DistributedModelParallel(wrapped, device=device, plan=self.plan)
        self._load_tensors(init)
        # dense parameters in the order of the plain model, so the optimizer state has the
        # layout of TrainStep's (a local run can resume from it and back)
        dense = list(in_backward_optimizer_filter(self.model.named_parameters()))
        tr = cfg.training
        self.dense_opt = torch.optim.Adam(
            dense_param_groups(dense, cfg),
            lr=tr.learning_rate,
            weight_decay=tr.weight_decay,
            fused=True,
        )
        self.steps = 0  # optimizer steps taken (the schedule's clock, as TrainStep's)
        self.rates = scheduled_rates(
            tr, planned_steps, self.dense_opt, [self.model.fused_optimizer]
        )
        # training.ema_decay: the dense parameters are replicated (DDP keeps them equal on
        # every rank), so each rank averages its own copy and all hold the same average;
        # named by their key in the plain model's state dict, as TrainStep's
        self.average: DenseAverage | None = None
        if tr.ema_decay is not None:
            key_of = {
                v.data_ptr(): _strip(k)
                for k, v in self.model.state_dict().items()
                if not isinstance(v, ShardedTensor)
            }
            named = [(key_of[p.data_ptr()], p) for _, p in dense]
            self.average = DenseAverage(named, tr.ema_decay)
        self.loss_fn = WeightedBCELoss([t.weight for t in cfg.tasks])
        self.bf16 = tr.precision == "bf16"
        # the sparse and linear arches stay one module each inside DMP / DDP: the same hooks
        # as TrainStep's
        self.penalties = sparse_penalties(self.model, cfg)
        self.model.train()

    # ------------------------------------------------------------------ compute

    def _inputs(self, batch: Batch) -> tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            return batch.sparse, batch.dense, batch.labels
        return (
            batch.sparse.to(self.device, non_blocking=True),
            batch.dense.to(self.device, non_blocking=True),
            batch.labels.to(self.device, non_blocking=True),
        )

    def step(self, batch: Batch) -> torch.Tensor:
        """Forward, backward (FBGEMM updates the looked-up rows), Adam step; the loss."""
        sparse, dense, labels = self._inputs(batch)
        if self.rates is not None:  # before the forward, as TrainStep.step
            self.rates.apply(self.steps)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits, aux = self.model(sparse, dense)
        if self.penalties:
            aux = {**aux, **{name: p.take() for name, p in self.penalties.items()}}
        loss = self.loss_fn(logits, labels, aux)
        self.dense_opt.zero_grad(set_to_none=True)
        # DDP averages dense gradients over ranks; each embedding row sums the gradients
        # of every rank's batch. Row-wise Adagrad divides by the gradient's running RMS,
        # so that constant factor does not change its updates.
        loss.backward()
        self.dense_opt.step()
        if self.average is not None:
            self.average.update()
        self.steps += 1
        return loss

    def averaged(self) -> AbstractContextManager[None]:
        """A context in which the model holds the weights it is validated with: the
        dense average with ``training.ema_decay``, else the raw weights (as
        ``TrainStep.averaged``)."""
        return self.average.applied() if self.average is not None else nullcontext()

    def best_model_state(self, full: dict[str, Any]) -> dict[str, Any]:
        """The model state ``best.pt`` holds, from :meth:`full_state` ``full`` (rank
        ``dst``): its model with the dense average in place of the dense parameters when
        ``training.ema_decay`` is set (as ``TrainStep.eval_model_state``)."""
        if self.average is None:
            return full["model"]
        return {**full["model"], **self.average.values()}

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """B x T logits in eval mode (dropout off), on CPU."""
        sparse, dense, _ = self._inputs(batch)
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(sparse, dense)[0].float().cpu()
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ sharded state

    def sharded_state(self) -> dict[str, Any]:
        """This rank's shards and the dense parts (CPU copies), for a Ray checkpoint."""
        model: dict[str, Any] = {}
        for key, value in self.model.state_dict().items():
            if isinstance(value, ShardedTensor):
                model[key] = [(o, t.detach().cpu().clone()) for o, t in _shards(value)]
            else:
                model[key] = value.detach().cpu().clone()
        sparse: dict[str, dict[str, Any]] = {}
        for key, states in self.model.fused_optimizer.state_dict()["state"].items():
            sparse[key] = {
                name: [(o, t.detach().cpu().clone()) for o, t in _shards(v)]
                if isinstance(v, ShardedTensor)
                else v.detach().cpu().clone()
                for name, v in states.items()
            }
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "model": model,
            "sparse_optimizer": sparse,
            "dense_optimizer": copy.deepcopy(self.dense_opt.state_dict()),
            **options_state(self.steps, self.rates, self.average),
        }

    def layout_matches(self, state: dict[str, Any]) -> bool:
        """Whether :meth:`sharded_state` ``state`` has this rank's shards (same world size,
        rank and plan), so :meth:`load_sharded_state` can restore it."""
        if state.get("world_size") != self.world_size or state.get("rank") != self.rank:
            return False
        for key, value in self.model.state_dict().items():
            saved = state["model"].get(key)
            if saved is None:
                return False
            if isinstance(value, ShardedTensor):
                mine = [(o, tuple(t.shape)) for o, t in _shards(value)]
                if mine != [(list(o), tuple(t.shape)) for o, t in saved]:
                    return False
        return True

    def load_sharded_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`sharded_state` of this rank (see :meth:`layout_matches`)."""
        if not self.layout_matches(state):
            raise ValueError(
                f"the checkpoint of rank {state.get('rank')}/{state.get('world_size')} does not "
                f"have the shards of rank {self.rank}/{self.world_size} under this plan"
            )
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                saved = state["model"][key]
                if isinstance(value, ShardedTensor):
                    _copy_shards(key, _shards(value), saved)
                else:
                    value.copy_(saved)
            fused = self.model.fused_optimizer.state_dict()
            for key, states in fused["state"].items():
                for name, v in states.items():
                    saved = state["sparse_optimizer"][key][name]
                    if isinstance(v, ShardedTensor):
                        _copy_shards(f"{key}/{name}", _shards(v), saved)
                    else:
                        v.copy_(saved)
            self.model.fused_optimizer.load_state_dict(fused)
        self.dense_opt.load_state_dict(state["dense_optimizer"])
        self.steps = load_options_state(state, self.rates, self.average)

    # ------------------------------------------------------------------ full state

    def full_state(self, dst: int = 0) -> dict[str, Any] | None:
        """The unsharded state in ``TrainStep.state_dict()`` layout, on rank ``dst``.

        Collective: every rank must call it. Each shard goes to ``dst`` as a tensor
        (point-to-point, in an order every rank derives alike), and ``dst`` writes it into
        the whole table: one shard in flight at a time, never the pickled state of every
        rank (``gather_object`` of a few-GB state took several times its size in memory
        and could exhaust a machine). Column-wise shards keep one row-wise Adagrad
        accumulator per shard; the whole table's accumulator is their mean weighted by
        shard width (exact: it is a mean of squared gradients over the row's columns).
        """
        sd = self.model.state_dict()
        model: dict[str, torch.Tensor] = {}
        widths: dict[str, list[int]] = {}
        for key, value in sd.items():
            name = _strip(key)
            if not isinstance(value, ShardedTensor):
                if self.rank == dst:
                    model[name] = value.detach().cpu().clone()
                continue
            # every rank holds the global shard metadata of the model's tables
            layout = [
                (_owner(m, dst), m.shard_offsets, m.shard_sizes)
                for m in value.metadata().shards_metadata
            ]
            full = self._gather_shards(value, layout, list(value.size()), value.dtype, dst)
            if full is not None:
                model[name] = full
            # column widths of the shards, in column order (for the accumulators below)
            meta = sorted(value.metadata().shards_metadata, key=lambda m: m.shard_offsets[1])
            widths[key] = [m.shard_sizes[1] for m in meta]
        # the fused optimizer's state holds only the tables this rank has shards of: the
        # ranks first share which accumulators (and shards) each holds (metadata only)
        fused = self.model.fused_optimizer.state_dict()["state"]
        mine = {
            (key, state_name): (
                list(v.size()),
                str(v.dtype).removeprefix("torch."),
                [
                    (list(s.metadata.shard_offsets), list(s.metadata.shard_sizes))
                    for s in v.local_shards()
                ],
            )
            for key, states in fused.items()
            for state_name, v in states.items()
            if isinstance(v, ShardedTensor)
        }
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine)
        sparse: dict[str, dict[str, Any]] = {}
        for key, state_name in sorted({k for part in every for k in part}):
            held = [
                (r, part[(key, state_name)])
                for r, part in enumerate(every)
                if (key, state_name) in part
            ]
            size, dtype = held[0][1][0], getattr(torch, held[0][1][1])
            layout = [(r, offsets, sizes) for r, info in held for offsets, sizes in info[2]]
            value = fused[key][state_name] if (key, state_name) in mine else None
            flat = self._gather_shards(value, layout, size, dtype, dst)
            if flat is None:
                continue
            rows = int(sd[key].size()[0])
            if flat.numel() != rows:  # one accumulator per column shard
                w = torch.tensor(widths[key], dtype=flat.dtype)
                flat = (flat.view(len(w), rows) * w[:, None]).sum(0) / w.sum()
            module, param, local_name = _momentum_names(_strip(key), state_name)
            sparse.setdefault(module, {"state": {}})["state"].setdefault(param, {})[local_name] = (
                flat
            )
        if self.rank != dst:
            return None
        return {
            "model": model,
            "dense_optimizer": copy.deepcopy(self.dense_opt.state_dict()),
            "sparse_optimizer": sparse,
            **options_state(self.steps, self.rates, self.average),
        }

    def _gather_shards(
        self,
        value: ShardedTensor | None,
        layout: list[tuple[int, Sequence[int], Sequence[int]]],
        size: list[int],
        dtype: torch.dtype,
        dst: int,
    ) -> torch.Tensor | None:
        """The whole CPU tensor of ``size`` on rank ``dst`` (None elsewhere) from its
        shards, ``layout`` = [(owner rank, offsets, sizes)] in the same order on every rank;
        ``value``: this rank's ShardedTensor (None when it holds no shard). Collective:
        other ranks' shards come by ``send`` / ``recv`` in that order."""
        local = {tuple(o): t for o, t in (_shards(value) if value is not None else [])}
        full = torch.empty(tuple(size), dtype=dtype) if self.rank == dst else None
        for owner, offsets, sizes in layout:
            if math.prod(sizes) == 0:  # an empty shard (row-wise plans): nothing to move
                continue
            at = tuple(offsets)
            if full is not None:
                if owner == dst:
                    piece = local[at]
                else:
                    piece = torch.empty(list(sizes), dtype=dtype, device=self.device)
                    dist.recv(piece, src=owner)
                full[_region(at, piece)] = piece.detach().cpu()
            elif owner == self.rank:
                dist.send(local[at].detach().contiguous(), dst=dst)
        return full

    def load_full_state(self, state: dict[str, Any]) -> None:
        """Load a ``TrainStep.state_dict()``-layout state (``last.pt``): each rank copies
        its shards. A column-wise shard's accumulator starts from the whole row's."""
        state = remap_legacy_train_state(state)  # a last.pt from before the model split
        self._load_tensors({_PREFIX + k: v for k, v in state["model"].items()})
        with torch.no_grad():
            fused = self.model.fused_optimizer.state_dict()
            for key, states in fused["state"].items():
                rows = int(self.model.state_dict()[key].size()[0])
                for state_name, v in states.items():
                    module, param, local_name = _momentum_names(_strip(key), state_name)
                    try:
                        full = state["sparse_optimizer"][module]["state"][param][local_name]
                    except KeyError:
                        raise KeyError(
                            f"sparse optimizer state {module}/{param}/{local_name} missing"
                        ) from None
                    if isinstance(v, ShardedTensor):
                        for (offset, *_), tensor in _shards(v):
                            start = offset % rows  # column shards stack [n·rows]
                            tensor.copy_(full[start : start + tensor.shape[0]])
                    else:
                        v.copy_(full)
            self.model.fused_optimizer.load_state_dict(fused)
        self.dense_opt.load_state_dict(state["dense_optimizer"])
        self.steps = load_options_state(state, self.rates, self.average)

    def reset_embeddings(self, epoch: int) -> None:
        """MEDA before ``epoch`` (0-based), as :meth:`TrainStep.reset_embeddings`: every
        rank draws the whole deep tables alike, one at a time, and copies its shards, and
        zeroes the row-wise Adagrad state of its shards. Not collective."""
        model = self.model.state_dict()
        reset: set[str] = set()
        with torch.no_grad():
            for key, weight in fresh_tables(self.tables, self.seed, epoch):
                key = _PREFIX + key
                if key not in model:  # a silent no-op would train on the old tables
                    raise KeyError(f"embedding reset: the sharded model has no '{_strip(key)}'")
                for offsets, tensor in _local_parts(model[key]):
                    tensor.copy_(weight[_region(offsets, tensor)])
                reset.add(key)
            # a rank holds the state of the tables it has shards of only
            fused = self.model.fused_optimizer.state_dict()
            for key, states in fused["state"].items():
                if key not in reset:  # the linear term's tables keep their state
                    continue
                for v in states.values():
                    for _, tensor in _local_parts(v):
                        tensor.zero_()
            self.model.fused_optimizer.load_state_dict(fused)

    def _load_tensors(self, full: dict[str, torch.Tensor]) -> None:
        """Copy whole tensors (keys as in the DMP state dict) into this rank's parameters
        and shards."""
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                if key not in full:
                    raise KeyError(f"model state has no '{_strip(key)}'")
                src = full[key]
                if isinstance(value, ShardedTensor):
                    for offsets, tensor in _shards(value):
                        tensor.copy_(src[_region(offsets, tensor)])
                else:
                    value.copy_(src)

    def plan_summary(self) -> str:
        """One line per table: sharding type and ranks."""
        return "; ".join(
            f"{table}: {kind} on ranks {ranks}" for table, kind, ranks in self._placements()
        )

    def plan_hints(self) -> list[str]:
        """Advice on this plan (see :func:`plan_hints`)."""
        return plan_hints(self._placements(), self.world_size)

    def _placements(self) -> list[tuple[str, str, list[int]]]:
        """(module.table, sharding type, sorted ranks) of every table in the plan."""
        out = []
        for module, params in self.plan.plan.items():
            for name, p in params.items():  # type: ignore[union-attr]
                out.append((f"{module}.{name}", str(p.sharding_type), sorted(set(p.ranks or []))))
        return out


# compute kernels that keep hot rows in a device cache (GPU plans only)
_CACHING_KERNELS = {
    EmbeddingComputeKernel.FUSED_UVM_CACHING.value,
    EmbeddingComputeKernel.QUANT_UVM_CACHING.value,
}


def uvm_cached_deep_tables(plan: Mapping[str, Any]) -> list[str]:
    """``module.table`` of the deep embedding's tables that a plan (module path →
    table → ``ParameterSharding``) puts on FBGEMM's UVM cache: a GPU kernel that keeps
    hot rows in a device cache, which writing the tables (MEDA's reset) does not update."""
    deep = set(deep_tables(_strip(m) for m in plan))
    return [
        f"{_strip(module)}.{name}"
        for module, params in plan.items()
        if _strip(module) in deep
        for name, p in params.items()
        if p.compute_kernel in _CACHING_KERNELS
    ]


def plan_hints(placements: Sequence[tuple[str, str, list[int]]], world_size: int) -> list[str]:
    """What to change when a plan leaves workers idle: a single Unified Embedding table
    (``model.embedding.num_tables: 1``, 16-wide: below torchrec's 128-wide floor for column
    shards) lands whole on one rank, which then does every rank's lookups and their
    backward. One physical table per worker balances them (``bench/scaling.py``, 2
    workers on 2 cores: speedup 1.08 → 1.21)."""
    unified = [p for p in placements if p[0].rsplit(".", 1)[-1].startswith("unified")]
    if world_size < 2 or len(unified) != 1 or len(unified[0][2]) != 1:
        return []
    table, _, ranks = unified[0]
    return [
        f"{table}: the whole Unified Embedding table is on rank {ranks[0]}, which does the "
        f"lookups of all {world_size} workers; set model.embedding.num_tables={world_size} "
        "(one table per worker) to spread them"
    ]


def _copy_shards(key: str, shards: list[tuple[list[int], torch.Tensor]], saved: Any) -> None:
    if len(saved) != len(shards):
        raise ValueError(f"{key}: checkpoint has {len(saved)} shards here, the plan {len(shards)}")
    for (offsets, tensor), (saved_offsets, saved_tensor) in zip(shards, saved):
        if list(saved_offsets) != list(offsets) or saved_tensor.shape != tensor.shape:
            raise ValueError(f"{key}: checkpoint shard layout differs from this plan")
        tensor.copy_(saved_tensor)


def _strip(key: str) -> str:
    return key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
