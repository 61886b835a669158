"""Validation inside epochs (``training.validate_every_steps``) and the embedding L2
penalty (``model.embedding.weight_decay``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_same_weights,
    fitted_spec,
    read_metrics,
    small_config,
    small_data_dir,
    snapshot,
)
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.data.batcher import load_encoded
from mtrec.evaluate.predict import evaluate_split
from mtrec.model import SparseArch
from mtrec.train.loop import load_trained_model, train
from mtrec.train.losses import EmbeddingPenalty

STEPS = 6  # steps per epoch (max_steps_per_epoch)
EVERY = 2  # validate_every_steps


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 2-epoch run validated at epoch ends only and every 2 steps."""
    root = tmp_path_factory.mktemp("stepval")
    out = {}
    for name, every in (("epochs", None), ("steps", EVERY)):
        training = {
            "epochs": 2,
            "max_steps_per_epoch": STEPS,
            "early_stopping_patience": 0,
            "validate_every_steps": every,
        }
        cfg = small_config(data, root / name, training=training)
        train(cfg, root / name / "run")
        out[name] = root / name / "run"
    return out


def test_a_line_per_validation_point_with_its_step(runs: dict[str, Path]) -> None:
    records = read_metrics(runs["steps"])
    # points after steps 2 and 4 of each epoch, then the epoch end (step 6: no duplicate)
    assert [(r["epoch"], r["step"]) for r in records] == [
        (1, 2),
        (1, 4),
        (1, 6),
        (2, 8),
        (2, 10),
        (2, 12),
    ]
    mid = [r for r in records if "train_rows" not in r]
    assert [r["epoch_step"] for r in mid] == [2, 4, 2, 4]
    assert all(set(r["valid"]) == {"click", "like"} for r in records)
    # the validation moves between points: the lines are not copies
    assert len({r["valid_mean_auc"] for r in records}) > 3


def test_mid_epoch_validation_leaves_training_unchanged(runs: dict[str, Path]) -> None:
    """Epoch-end lines and last.pt equal those of the run validated at epoch ends only: the
    finer grain adds points, it does not perturb training."""
    by_epoch = read_metrics(runs["epochs"])
    ends = [r for r in read_metrics(runs["steps"]) if "train_rows" in r]
    assert [r["step"] for r in by_epoch] == [STEPS, 2 * STEPS]
    for a, b in zip(by_epoch, ends, strict=True):
        assert a["valid"] == b["valid"] and a["loss"] == b["loss"], a["epoch"]
    assert_same_weights(
        load(runs["epochs"] / "checkpoints" / "last.pt")["model"],
        load(runs["steps"] / "checkpoints" / "last.pt")["model"],
    )


def test_best_checkpoint_is_the_best_validation_point(runs: dict[str, Path]) -> None:
    run = runs["steps"]
    records = read_metrics(run)
    best_line = max(records, key=lambda r: r["valid_mean_auc"])
    best, last = load(run / "checkpoints" / "best.pt"), load(run / "checkpoints" / "last.pt")
    assert (best["epoch"], best["step"]) == (best_line["epoch"], best_line["step"])
    assert (last["loop"]["best_epoch"], last["loop"]["best_step"]) == (
        best["epoch"],
        best["step"],
    )
    assert last["loop"]["step"] == 2 * STEPS
    # best.pt holds the weights that scored that line
    cfg, spec, model = load_trained_model(run)
    valid = load_encoded(spec, cfg.dataset.valid, cfg.dataset.chunk_rows)
    metrics = evaluate_split(model, spec, valid, cfg.training.eval_batch_size)
    for task, m in best_line["valid"].items():
        assert metrics[task]["auc"] == pytest.approx(m["auc"], abs=2e-6)


def test_patience_counts_validation_points_and_stops_mid_epoch(data: Path, tmp_path: Path) -> None:
    # every task weight 0 and no prior: the model never changes, so only the first point
    # is the best
    tasks = [
        {"name": t, "label": t, "true_prob": f"p_{t}", "weight": 0.0} for t in ("click", "like")
    ]
    training = {
        "epochs": 4,
        "max_steps_per_epoch": STEPS,
        "early_stopping_patience": 1,
        "validate_every_steps": EVERY,
    }
    priors_off = ["model.embedding.prior_std=null", "model.linear.prior_std=null"]
    cfg = small_config(data, tmp_path, priors_off, tasks=tasks, training=training)
    summary = train(cfg, tmp_path / "run")
    assert summary["stopped_early"] is True and summary["epochs_run"] == 1
    assert (summary["best_epoch"], summary["best_step"]) == (1, EVERY)
    records = read_metrics(tmp_path / "run")
    # the point after step 4 ran out of patience: the epoch ended there, as its line
    assert [r["step"] for r in records] == [EVERY, 2 * EVERY]
    assert records[-1]["train_rows"] > 0 and records[-1]["valid"] == records[0]["valid"]
    last = load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["loop"]["step"] == 2 * EVERY and last["loop"]["epoch"] == 1
    assert load(tmp_path / "run" / "checkpoints" / "best.pt")["step"] == EVERY
    # the finished run resumes to nothing
    before = snapshot(tmp_path / "run")
    again = train(cfg, tmp_path / "run", resume=True)
    assert again["stopped_early"] is True and again["best_step"] == EVERY
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("reset", [True, False])
def test_after_an_embedding_reset_patience_waits_for_the_epochs_end(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reset: bool
) -> None:
    """With ``training.reset_embeddings_each_epoch`` a point early in the second epoch
    judges freshly drawn tables: patience may run out there, but the run goes on to the
    epoch's end (and stops there); without the reset it stops at that point."""
    from mtrec.train.ledger import EpochLedger

    judged = EpochLedger.judge

    def only_the_first_point_improves(self: EpochLedger, record: dict, metrics: dict) -> bool:
        bad = self.state.bad_epochs
        improved = judged(self, record, metrics)
        if record["step"] == EVERY:
            return improved
        self.state.bad_epochs = bad + 1
        return False

    monkeypatch.setattr(EpochLedger, "judge", only_the_first_point_improves)
    training = {
        "epochs": 3,
        "max_steps_per_epoch": STEPS,
        "early_stopping_patience": 4,  # runs out at the second point of epoch 2 (step 10)
        "validate_every_steps": EVERY,
        "reset_embeddings_each_epoch": reset,
    }
    cfg = small_config(data, tmp_path, training=training)
    summary = train(cfg, tmp_path / "run")
    assert summary["stopped_early"] is True and summary["epochs_run"] == 2
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    assert steps == ([2, 4, 6, 8, 10, 12] if reset else [2, 4, 6, 8, 10])
    assert load(tmp_path / "run" / "checkpoints" / "best.pt")["step"] == EVERY


def test_resume_redoes_an_interrupted_epoch(runs: dict[str, Path], tmp_path: Path) -> None:
    """last.pt stays at epoch ends: a run cut inside epoch 2 (its mid-epoch lines written)
    resumes from epoch 1's end and writes exactly the uninterrupted run."""
    straight = runs["steps"]
    cfg = load_trained_model(straight)[0]
    cut = tmp_path / "run"
    train(cfg, cut, stop_after_epochs=1)
    mid_epoch_2 = [r for r in read_metrics(straight) if r["epoch"] == 2 and "train_rows" not in r]
    with open(cut / "metrics.jsonl", "a") as fh:  # what the crash left behind
        fh.writelines(json.dumps(r) + "\n" for r in mid_epoch_2)
    summary = train(cfg, cut, resume=True)
    timing = ("train_seconds", "samples_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(cut)] == [
        {k: v for k, v in r.items() if k not in timing} for r in read_metrics(straight)
    ]
    assert summary["best_step"] == load(straight / "checkpoints" / "best.pt")["step"]
    for name in ("best.pt", "last.pt"):
        assert_same_weights(
            load(straight / "checkpoints" / name)["model"],
            load(cut / "checkpoints" / name)["model"],
        )


# ------------------------------------------------------------------ embedding weight decay


class _OneTable(nn.Module):
    """A fused 3 x 4 table behind one single-id feature ``f``: B x 1 x 4 tokens."""

    def __init__(self, lr: float, eps: float) -> None:
        super().__init__()
        table = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=3, feature_names=["f"])
        self.ebc = FusedEmbeddingBagCollection(
            [table],
            optimizer_type=RowWiseAdagrad,
            optimizer_kwargs={"lr": lr, "eps": eps},
            device=torch.device("cpu"),
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(kjt)["f"].unsqueeze(1)


@pytest.mark.parametrize("weight_decay", [0.0, 0.7])
def test_weight_decay_adds_decay_times_row_to_the_adagrad_gradient(weight_decay: float) -> None:
    """Two rows, ids 1 and 2, loss = mean_b <token_b, G_b> + penalty: FBGEMM's row-wise
    Adagrad must see g_r = (G_b + wd * w_r) / B, so
    w_r' = w_r - lr * g_r / (sqrt(mean g_r²) + eps)."""
    torch.manual_seed(0)
    lr, eps, batch = 0.1, 1e-8, 2
    arch = SparseArch(_OneTable(lr, eps))  # type: ignore[arg-type]
    penalty = EmbeddingPenalty(arch, weight_decay)
    arch.train()
    w0 = arch.state_dict()["embedding.ebc.embedding_bags.t.weight"].clone()
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    grads = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.2, 0.4, -0.1, 1.0]])
    tokens = arch(kjt).squeeze(1)
    loss = (tokens * grads).sum(1).mean() + penalty.take()
    loss.backward()
    w1 = arch.state_dict()["embedding.ebc.embedding_bags.t.weight"]
    for b, row in enumerate((1, 2)):
        g = (grads[b] + weight_decay * w0[row]) / batch
        expected = w0[row] - lr * g / (g.square().mean().sqrt() + eps)
        torch.testing.assert_close(w1[row], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1[0], w0[0], rtol=0, atol=0)  # untouched row: no decay
    if weight_decay:
        plain = w0[1] - lr * grads[0] / grads[0].square().mean().sqrt()
        assert (w1[1] - plain).abs().max() > 1e-3  # the decay changed the update


@pytest.mark.parametrize(
    ("key", "module"),
    [
        ("model.embedding.weight_decay", "sparse_arch."),
        ("model.linear.weight_decay", "linear_arch."),
    ],
)
def test_weight_decay_trains_to_smaller_rows(
    key: str, module: str, data: Path, tmp_path: Path
) -> None:
    norms = {}
    for wd in (0.0, 1.0):
        cfg = small_config(
            data,
            tmp_path / str(wd),
            overrides=["model.linear.enabled=true", f"{key}={wd}"],
            training={"epochs": 1, "max_steps_per_epoch": STEPS},
        )
        train(cfg, tmp_path / str(wd) / "run")
        model = load(tmp_path / str(wd) / "run" / "checkpoints" / "last.pt")["model"]
        rows = [v for k, v in model.items() if k.startswith(module) and "embedding_bags" in k]
        norms[wd] = sum(float(v.norm()) for v in rows)
    assert norms[0.0] > 0
    assert norms[1.0] < norms[0.0]


def test_penalty_needs_a_training_forward() -> None:
    arch = SparseArch(_OneTable(0.1, 1e-8))  # type: ignore[arg-type]
    penalty = EmbeddingPenalty(arch, 0.5)
    with pytest.raises(RuntimeError, match="no training forward"):
        penalty.take()


def test_sparse_penalties_follow_the_config(data: Path, tmp_path: Path) -> None:
    from mtrec.model import build_model
    from mtrec.train.losses import sparse_penalties

    both = [
        "model.linear.enabled=true",
        "model.embedding.weight_decay=0.1",
        "model.linear.weight_decay=0.2",
        "model.linear.prior_std=null",
        "model.embedding.prior_std=null",
    ]
    cfg = small_config(data, tmp_path / "both", overrides=both)
    penalties = sparse_penalties(build_model(cfg, fitted_spec(cfg)), cfg)
    assert {k: p.weight_decay for k, p in penalties.items()} == {
        "embedding_l2": 0.1,
        "linear_l2": 0.2,
    }
    # a linear-only model has no sparse tokens to penalise: only the linear term's weights
    floor = small_config(data, tmp_path / "floor", overrides=[*both, "model.deep=false"])
    assert list(sparse_penalties(build_model(floor, fitted_spec(floor)), floor)) == ["linear_l2"]
    # the defaults: the linear term's prior; the embedding's only when asked for
    default = small_config(data, tmp_path / "default")
    assert list(sparse_penalties(build_model(default, fitted_spec(default)), default)) == [
        "linear_prior"
    ]
    both_priors = small_config(
        data, tmp_path / "priors", overrides=["model.embedding.prior_std=0.1"]
    )
    penalties = sparse_penalties(build_model(both_priors, fitted_spec(both_priors)), both_priors)
    assert list(penalties) == ["linear_prior", "embedding_prior"]
    priors_off = ["model.linear.prior_std=null", "model.embedding.prior_std=null"]
    off = small_config(data, tmp_path / "off", overrides=priors_off)
    assert sparse_penalties(build_model(off, fitted_spec(off)), off) == {}
