"""The dense weight average (``training.ema_decay``) and the learning-rate schedule
(``training.lr_schedule``): the maths, what best.pt / last.pt hold, resume (also with the
embedding reset, ``training.reset_embeddings_each_epoch``), and that the
defaults reproduce today's training exactly."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same_weights, fitted_spec, read_metrics, small_config, small_data_dir
from torch import nn

from mtrec.run import load_trained_model
from mtrec.train.averaging import DenseAverage
from mtrec.train.loop import train
from mtrec.train.schedule import LrSchedule, planned_steps

SHORT = {"epochs": 2, "max_steps_per_epoch": 5}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data_dir(tmp_path_factory)


def checkpoint(run: Path, name: str) -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------ the maths


def _walk(decay: float, steps: int) -> tuple[DenseAverage, list[torch.Tensor]]:
    p = nn.Parameter(torch.zeros(3))
    avg = DenseAverage([("w", p)], decay)
    seen = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        with torch.no_grad():
            p.add_(torch.randn(3, generator=gen))
        seen.append(p.detach().clone())
        avg.update()
    return avg, seen


def test_decay_zero_is_the_raw_weights() -> None:
    avg, seen = _walk(0.0, 5)
    assert torch.equal(avg.average[0], seen[-1])


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99])
def test_average_is_the_bias_corrected_exponential_mean(decay: float) -> None:
    avg, seen = _walk(decay, 20)
    w = torch.tensor([decay ** (len(seen) - 1 - i) for i in range(len(seen))], dtype=torch.float64)
    expected = (torch.stack(seen).double() * w[:, None]).sum(0) / w.sum()
    torch.testing.assert_close(avg.average[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_applied_swaps_in_the_average_and_restores_the_raw_weights() -> None:
    avg, _ = _walk(0.9, 4)
    p = avg.params[0]
    raw = p.detach().clone()
    with avg.applied():
        assert torch.equal(p.detach(), avg.average[0])
    assert torch.equal(p.detach(), raw)


def test_schedule_factors() -> None:
    assert LrSchedule("constant", 10).factor(7) == 1.0
    lin = LrSchedule("linear", 10, final_ratio=0.1)
    assert lin.factor(0) == 1.0 and math.isclose(lin.factor(5), 0.55)
    assert math.isclose(lin.factor(10), 0.1) and math.isclose(lin.factor(99), 0.1)
    cos = LrSchedule("cosine", 10)
    assert cos.factor(0) == 1.0 and math.isclose(cos.factor(5), 0.5)
    assert math.isclose(cos.factor(10), 0.0, abs_tol=1e-12)
    assert planned_steps(1000, 256, 3) == 12 and planned_steps(1000, 256, 3, 2) == 6


# --------------------------------------------------------------------------- in training


def test_best_checkpoint_holds_the_averaged_dense_weights(data: Path, tmp_path: Path) -> None:
    cfg = small_config(data, tmp_path, training={**SHORT, "epochs": 1, "ema_decay": 0.9})
    out = tmp_path / "run"
    train(cfg, out)
    best, last = checkpoint(out, "best.pt"), checkpoint(out, "last.pt")
    average = last["dense_average"]["average"]
    assert average and last["dense_average"]["updates"] == 5
    for name, value in best["model"].items():
        if name in average:
            assert torch.equal(value, average[name]), name
        else:  # fused tables and buffers: as trained
            assert torch.equal(value, last["model"][name]), name
    # the average is not the raw weights (the check above is not vacuous)
    assert any(not torch.equal(average[n], last["model"][n]) for n in average)
    # evaluation and export load best.pt: the averaged weights
    _, _, model = load_trained_model(out)
    loaded = model.state_dict()
    for name, value in average.items():
        assert torch.equal(loaded[name], value), name


def test_validation_reads_the_averaged_weights(data: Path, tmp_path: Path) -> None:
    from mtrec.data.batcher import load_encoded
    from mtrec.scoring import evaluate_split

    cfg = small_config(data, tmp_path, training={**SHORT, "epochs": 1, "ema_decay": 0.9})
    out = tmp_path / "run"
    train(cfg, out)
    cfg2, spec, model = load_trained_model(out)
    valid = load_encoded(spec, cfg2.dataset.valid, cfg2.dataset.chunk_rows)
    got = evaluate_split(model, spec, valid, cfg2.training.eval_batch_size)
    recorded = read_metrics(out)[-1]["valid"]
    for task, m in recorded.items():
        assert math.isclose(got[task]["auc"], m["auc"], abs_tol=1e-6), task


def assert_trained_alike(
    data: Path, tmp_path: Path, first: dict[str, Any], second: dict[str, Any], ckpt: str
) -> None:
    """Train the small config with the ``training`` overrides ``first`` and ``second``: the
    same metrics lines and the same weights in checkpoint ``ckpt``."""
    runs = []
    for tag, extra in (("first", first), ("second", second)):
        cfg = small_config(data, tmp_path / tag, training={**SHORT, **extra})
        train(cfg, tmp_path / tag / "run")
        runs.append(tmp_path / tag / "run")
    a, b = read_metrics(runs[0]), read_metrics(runs[1])
    assert [r["valid"] for r in a] == [r["valid"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert_same_weights(checkpoint(runs[0], ckpt)["model"], checkpoint(runs[1], ckpt)["model"])


def test_decay_zero_trains_exactly_like_no_average(data: Path, tmp_path: Path) -> None:
    assert_trained_alike(data, tmp_path, {"ema_decay": None}, {"ema_decay": 0.0}, "best.pt")


@pytest.mark.parametrize(
    "extra",
    [
        {"ema_decay": 0.9},
        {"lr_schedule": "cosine", "lr_schedule_embeddings": True, "lr_final_ratio": 0.1},
        {"reset_embeddings_each_epoch": True},
    ],
    ids=["ema", "cosine", "embedding_reset"],
)
def test_resume_restores_the_average_and_the_schedule(
    data: Path, tmp_path: Path, extra: dict
) -> None:
    cfg = small_config(data, tmp_path, training={**SHORT, "epochs": 3, **extra})
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b", stop_after_epochs=1)
    train(cfg, tmp_path / "b", resume=True)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["valid"] for r in a] == [r["valid"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for name in ("best.pt", "last.pt"):
        ca, cb = checkpoint(tmp_path / "a", name), checkpoint(tmp_path / "b", name)
        assert_same_weights(ca["model"], cb["model"])
        if name == "last.pt" and "dense_average" in ca:
            assert_same_weights(ca["dense_average"]["average"], cb["dense_average"]["average"])
            assert ca["dense_average"]["updates"] == cb["dense_average"]["updates"] == 15


def test_a_schedule_held_at_one_reproduces_constant_exactly(data: Path, tmp_path: Path) -> None:
    """The schedule's machinery (rates rewritten every step, the fused tables' included)
    changes nothing when the factor is 1: constant is today's training."""
    flat = {"lr_schedule": "linear", "lr_final_ratio": 1.0, "lr_schedule_embeddings": True}
    assert_trained_alike(data, tmp_path, {}, flat, "last.pt")


def test_a_decaying_schedule_lowers_the_rates(data: Path, tmp_path: Path) -> None:
    from mtrec.train.step import TrainStep

    cfg = small_config(
        data,
        tmp_path,
        training={"lr_schedule": "linear", "lr_schedule_embeddings": True, "lr_final_ratio": 0.0},
    )
    step = TrainStep(cfg, fitted_spec(cfg), planned_steps=4)
    assert step.rates is not None
    step.rates.apply(2)  # halfway
    groups = step.rates.groups()
    assert len(groups) > len(step.dense_opt.param_groups)  # the tables' groups too
    for group, base in zip(groups, step.rates.base, strict=True):
        assert math.isclose(group["lr"], base / 2)
    for module in step.fused.values():
        (lr,) = {g["lr"] for g in module.fused_optimizer().param_groups}
        # what FBGEMM's backward applies (torchrec keeps the kernel in each sub-optimizer)
        for _, sub in module.fused_optimizer()._optims:
            assert math.isclose(sub._emb_module.get_learning_rate(), lr, rel_tol=1e-6)


def test_a_resume_under_another_plan_keeps_the_schedules_progress(
    data: Path, tmp_path: Path
) -> None:
    """A Ray run resumed with another worker count plans other steps per epoch: the saved
    step count is rescaled, so the rates continue from the same point of the decay."""
    from mtrec.train.step import TrainStep

    cfg = small_config(data, tmp_path, training={"lr_schedule": "cosine"})
    spec = fitted_spec(cfg)
    first = TrainStep(cfg, spec, planned_steps=10)
    first.steps = 5
    state = first.state_dict()
    assert (state["steps"], state["planned_steps"]) == (5, 10)
    resumed = TrainStep(cfg, spec, planned_steps=30)
    resumed.load_state_dict(state)
    assert resumed.steps == 15
    (group, *_) = resumed.dense_opt.param_groups
    assert math.isclose(group["lr"], cfg.training.learning_rate * 0.5)  # cosine at p = 1/2
    same = TrainStep(cfg, spec, planned_steps=10)
    same.load_state_dict(state)
    assert same.steps == 5
