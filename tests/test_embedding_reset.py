"""MEDA (``training.reset_embeddings_each_epoch``): what a reset changes and what it
leaves, the draw, and when the loop resets. The Ray worker's reset (the sharded tables)
is covered by ``tests/test_ray.py``, whose runs train with the default (on): one worker
reproduces the local loop's weights, a resumed run the uninterrupted one; a resumed local
run resetting as the uninterrupted one is ``tests/test_averaging.py``'s resume test."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import first_batch, fitted_spec, read_metrics, small_config, small_data_dir

from mtrec.data.batch import Batch
from mtrec.train.distributed import uvm_cached_deep_tables
from mtrec.train.embedding_reset import deep_tables, fresh_tables
from mtrec.train.loop import train
from mtrec.train.optim import LINEAR_PREFIX
from mtrec.train.step import TrainStep

SHORT = {"epochs": 3, "max_steps_per_epoch": 5, "early_stopping_patience": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data_dir(tmp_path_factory)


def sparse_state(step: TrainStep, path: str) -> list[torch.Tensor]:
    """Copies of every tensor in the fused optimizer state of collection ``path``, read
    afresh from FBGEMM."""
    state = step.fused[path].fused_optimizer().state_dict()["state"]
    return [v.clone() for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def test_only_the_linear_terms_collections_are_not_deep() -> None:
    paths = ["sparse_arch.embedding.ebc", LINEAR_PREFIX + "ebc", "other.ebc"]
    assert deep_tables(paths) == ["sparse_arch.embedding.ebc", "other.ebc"]


@pytest.mark.parametrize("embedding", ["unified", "per_feature"])
def test_a_reset_draws_the_deep_tables_afresh_and_leaves_the_rest(
    data: Path, tmp_path: Path, embedding: str
) -> None:
    cfg = small_config(data, tmp_path, model={"embedding": {"type": embedding}})
    spec = fitted_spec(cfg)
    step = TrainStep(cfg, spec)
    batch = first_batch(cfg, spec, "train", rows=256)
    for _ in range(3):
        step.step(batch)
    (deep,) = deep_tables(step.fused)
    (linear,) = [p for p in step.fused if p != deep]
    assert any(bool(t.abs().sum() > 0) for t in sparse_state(step, deep))  # trained
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    linear_state = sparse_state(step, linear)
    rng = torch.get_rng_state()

    step.reset_embeddings(1)

    configs = {deep: step.fused[deep].embedding_bag_configs()}
    fresh = dict(fresh_tables(configs, cfg.seed, 1))
    after = step.model.state_dict()
    assert sorted(fresh) == sorted(k for k in after if k.startswith(deep + "."))
    for key, value in after.items():
        if key in fresh:
            assert torch.equal(value, fresh[key]), key
            assert not torch.equal(value, before[key]), key
        else:  # dense parameters, buffers and the linear term's per-id weights
            assert torch.equal(value, before[key]), key
    assert all(bool(t.abs().sum() == 0) for t in sparse_state(step, deep))
    for got, kept in zip(sparse_state(step, linear), linear_state, strict=True):
        assert torch.equal(got, kept)
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's stream is not touched


def _row_steps(step: TrainStep, batch: Batch, path: str) -> torch.Tensor:
    """RMS over its columns of each deep-table row's change in one step (rows the step
    moved)."""
    (key,) = step.fused[path].state_dict()
    before = step.fused[path].state_dict()[key].clone()
    step.step(batch)
    change = step.fused[path].state_dict()[key] - before
    moved = change.abs().sum(1) > 0
    return change[moved].pow(2).mean(1).sqrt()


def test_after_a_reset_the_tables_step_as_new_ones(data: Path, tmp_path: Path) -> None:
    """Row-wise Adagrad's first step moves a row by exactly its learning rate (RMS over
    the row: lr · g / sqrt(mean g²)); once its accumulator holds earlier steps, by less.
    So FBGEMM's own accumulators, not a copy, are what the reset zeroes. (An epsilon far
    below every row's gradient keeps the first step exact.)"""
    cfg = small_config(data, tmp_path, ["model.embedding.eps=1e-30"])
    spec = fitted_spec(cfg)
    step = TrainStep(cfg, spec)
    batch = first_batch(cfg, spec, "train", rows=256)
    (deep,) = deep_tables(step.fused)
    lr = cfg.model.embedding.learning_rate
    first = _row_steps(step, batch, deep)
    torch.testing.assert_close(first, torch.full_like(first, lr), rtol=1e-3, atol=0)
    for _ in range(2):
        step.step(batch)
    assert float(_row_steps(step, batch, deep).median()) < 0.5 * lr  # accumulated
    step.reset_embeddings(1)
    again = _row_steps(step, batch, deep)
    torch.testing.assert_close(again, torch.full_like(again, lr), rtol=1e-3, atol=0)


def test_the_draw_depends_on_the_seed_and_epoch_and_keeps_the_initial_range(
    data: Path, tmp_path: Path
) -> None:
    cfg = small_config(data, tmp_path)
    step = TrainStep(cfg, fitted_spec(cfg))
    configs = {p: m.embedding_bag_configs() for p, m in step.fused.items()}
    a = dict(fresh_tables(configs, 7, 1))
    assert all(
        torch.equal(v, w) for v, w in zip(a.values(), dict(fresh_tables(configs, 7, 1)).values())
    )
    for other in (fresh_tables(configs, 7, 2), fresh_tables(configs, 8, 1)):
        assert not torch.equal(next(iter(a.values())), next(other)[1])
    # no linear table; each drawn in its table's initial range, not as the tables started
    assert not any(k.startswith(LINEAR_PREFIX) for k in a)
    for path in deep_tables(configs):
        for table in configs[path]:
            weight = a[f"{path}.embedding_bags.{table.name}.weight"]
            assert weight.shape == (table.num_embeddings, table.embedding_dim)
            low, high = table.get_weight_init_min(), table.get_weight_init_max()
            assert low <= float(weight.min()) and float(weight.max()) <= high
            assert float(weight.std()) == pytest.approx((high - low) / 12**0.5, rel=0.05)


def test_the_loop_resets_before_every_epoch_but_the_first(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = TrainStep.reset_embeddings

    def spy(self: TrainStep, epoch: int) -> None:
        calls.append(epoch)
        original(self, epoch)

    monkeypatch.setattr(TrainStep, "reset_embeddings", spy)
    runs = {}
    for on in (True, False):
        cfg = small_config(
            data, tmp_path / str(on), training={**SHORT, "reset_embeddings_each_epoch": on}
        )
        train(cfg, tmp_path / str(on) / "run")
        runs[on] = read_metrics(tmp_path / str(on) / "run")
    assert calls == [1, 2]  # the run with it on only
    # the first epoch trains alike; from the second on the tables differ
    assert runs[True][0]["valid"] == runs[False][0]["valid"]
    assert runs[True][1]["loss"] != runs[False][1]["loss"]


def test_tables_on_the_uvm_cache_are_named() -> None:
    """A GPU plan with a deep table on FBGEMM's UVM cache (whose cached rows a reset
    cannot reach) is refused by ``ShardedTrainStep``: the tables it names."""
    plan = {
        "model.sparse_arch.embedding.ebc": {
            "unified": SimpleNamespace(compute_kernel="fused_uvm_caching"),
            "other": SimpleNamespace(compute_kernel="fused"),
        },
        "model.linear_arch.ebc": {"user_id": SimpleNamespace(compute_kernel="fused_uvm_caching")},
    }
    assert uvm_cached_deep_tables(plan) == ["sparse_arch.embedding.ebc.unified"]
