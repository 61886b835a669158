"""The first-order (linear) term (``model.linear``) and the logistic-regression floor
(``mtrec baseline``): hand-computed steps and optimum, on/off, export parity, old
checkpoints, the CLI end to end and the floor section of the evaluation report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from helpers import first_batch, fitted_spec, small_config, small_data_dir, small_features

from mtrec.cli import main as cli_main
from mtrec.config import ConfigError, load_config
from mtrec.data.batch import Batch
from mtrec.embeddings.linear import LinearArch, linear_width
from mtrec.export.exporter import PARITY_TOLERANCE, check_parity, script_serving
from mtrec.export.serving import ServingModule
from mtrec.model import build_model, chain_logits
from mtrec.train.baseline import FLOOR_MIN_EPOCHS, floor_config
from mtrec.train.step import TrainStep

BUCKETS = 64

# ------------------------------------------------------------------ a hand-made tiny set


def _tiny_set(dir: Path, rows: int = 600, seed: int = 0) -> Path:
    """Two categorical features, one numeric, two tasks drawn from a true logistic model;
    every (value, label) cell occurs, so the logistic regression has a finite optimum."""
    rng = np.random.default_rng(seed)
    a = rng.choice(["x", "y", "z"], rows)
    b = rng.choice(["p", "q", "r", "s"], rows)
    n = rng.normal(2.0, 3.0, rows)
    eff_a = {"x": -0.8, "y": 0.1, "z": 0.9}
    eff_b = {"p": 0.5, "q": -0.5, "r": 0.0, "s": 1.0}
    z = np.array([eff_a[v] for v in a]) + np.array([eff_b[v] for v in b]) + 0.3 * (n - 2.0) / 3
    click = (rng.random(rows) < 1 / (1 + np.exp(-z))).astype(np.int64)
    like = (rng.random(rows) < 1 / (1 + np.exp(-(0.5 * z - 1)))).astype(np.int64)
    frame = pl.DataFrame({"a": a, "b": b, "n": n, "click": click, "like": like})
    dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        frame.write_parquet(dir / f"{split}.parquet")
    doc = {
        "name": "tiny",
        "dataset": {"train": "train.parquet", "valid": "valid.parquet", "test": "test.parquet"},
        "features": [
            {"name": "a", "kind": "categorical"},
            {"name": "b", "kind": "categorical"},
            {"name": "n", "kind": "numeric", "transform": "standardize"},
        ],
        "tasks": [{"name": "click", "label": "click"}, {"name": "like", "label": "like"}],
        "model": {
            "embedding": {"type": "per_feature", "buckets": BUCKETS, "dim": 4},
            "interaction": {"type": "none"},
            "multitask": {"type": "mmoe", "num_experts": 1, "expert_hidden": [4]},
            "linear": {"learning_rate": 0.3, "prior_std": None},
        },
        "training": {"batch_size": rows, "epochs": 1, "threads": 1, "progress": False},
    }
    (dir / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return dir / "config.yaml"


def _design(batch: Batch, normed: torch.Tensor) -> torch.Tensor:
    """The one-hot design matrix by hand: per feature ``id mod BUCKETS`` one-hot columns
    (one id per row here), then the normalised numerics, then 1 (the bias)."""
    ids = batch.sparse.values().view(2, -1)  # feature-major, one id per row
    onehot = [torch.nn.functional.one_hot(ids[f] % BUCKETS, BUCKETS).double() for f in range(2)]
    ones = torch.ones(normed.size(0), 1, dtype=torch.float64)
    return torch.cat([*onehot, normed.double(), ones], dim=1)


def _weights(step: TrainStep) -> torch.Tensor:
    """The floor model's weights as one (2·BUCKETS + 1 + 1) x T matrix, the design's order."""
    model = step.model
    assert model.linear_arch is not None and model.task_arch.linear is not None
    pooling = model.linear_arch.torch_pooling()
    head = model.task_arch.linear
    t = len(model.task_names)
    return torch.cat(
        [pooling.weight[:, :t], head.weight.t(), head.bias.unsqueeze(0)], dim=0
    ).double()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = _tiny_set(tmp_path_factory.mktemp("tiny"))
    cfg = floor_config(load_config(path))
    spec = fitted_spec(cfg)
    batch = first_batch(cfg, spec, "train", rows=600)
    return cfg, spec, batch


def test_floor_first_step_is_the_hand_computed_adagrad_and_adam_step(tiny) -> None:
    cfg, spec, batch = tiny
    step = TrainStep(cfg, spec)
    normed = step.model.task_arch.normalizer(batch.dense)
    x = _design(batch, normed)
    y = batch.labels.double()
    assert torch.equal(_weights(step), torch.zeros_like(_weights(step)))  # zero start
    step.step(batch)
    # mean BCE per task at logit 0: d loss / d w = X^T (σ(0) - y) / B (task weights 1)
    grad = x.t() @ (0.5 - y) / y.size(0)
    n_ids = 2 * BUCKETS
    g_ids = grad[:n_ids]
    # row-wise Adagrad: one accumulator per row, the mean squared gradient over the
    # row's W columns (padding columns have zero gradient)
    acc = (g_ids**2).sum(1, keepdim=True) / linear_width(2)
    want_ids = -cfg.model.linear.learning_rate * g_ids / (acc.sqrt() + cfg.model.linear.eps)
    # Adam's first step: lr · g / (|g| + eps), at the linear term's own dense rate
    g_dense = grad[n_ids:]
    want_dense = -cfg.model.linear.dense_learning_rate * g_dense / (g_dense.abs() + 1e-8)
    got = _weights(step)
    torch.testing.assert_close(got[:n_ids], want_ids, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[n_ids:], want_dense, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prior_std", [None, 0.4])
def test_floor_converges_to_the_hand_fitted_logistic_regression(
    tiny, prior_std: float | None
) -> None:
    """The floor's optimum: the logistic regression, or with the prior
    (``model.linear.prior_std``) the regression with L2 ``Σ_rows w² / (2σ²)`` on the id
    weights (one batch here is one epoch: each row's uses are its count in it)."""
    cfg, spec, batch = tiny
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model, linear=dataclasses.replace(cfg.model.linear, prior_std=prior_std)
        ),
    )
    step = TrainStep(cfg, spec)
    for _ in range(1500):
        step.step(batch)
    step.model.eval()
    with torch.no_grad():
        got = step.model.predict(batch.sparse, batch.dense).double()
        x = _design(batch, step.model.task_arch.normalizer(batch.dense))
    y = batch.labels.double()
    # the optimum fitted by hand: Newton's method on the same design, per task
    used = x.abs().sum(0) > 0
    xu = x[:, used]
    # the prior's precision on the id columns (not on the numeric weight and the bias)
    is_id = (torch.arange(x.size(1)) < 2 * BUCKETS)[used]
    precision = torch.diag(is_id.double() / (prior_std**2 if prior_std else float("inf")))
    want = torch.empty_like(y)
    for t in range(y.size(1)):
        w = torch.zeros(xu.size(1), dtype=torch.float64)
        for _ in range(50):
            p = torch.sigmoid(xu @ w)
            hess = xu.t() @ (xu * (p * (1 - p)).unsqueeze(1)) + precision
            hess = hess + 1e-9 * torch.eye(xu.size(1))
            grad = xu.t() @ (p - y[:, t]) + precision @ w
            w = w - torch.linalg.lstsq(hess, grad).solution
        want[:, t] = torch.sigmoid(xu @ w)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    bce = torch.nn.functional.binary_cross_entropy
    assert abs(float(bce(got, y)) - float(bce(want, y))) < 1e-5


# ------------------------------------------------------------------ on / off in the deep model


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data_dir(tmp_path_factory)


def _randomise_linear(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "linear" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_linear_on_adds_the_first_order_logits_before_the_chain(data: Path, tmp_path) -> None:
    # the hand-written first-order term below reads the numerics as one slope each
    chain = {"multitask": {"chain": ["click", "like"]}, "embedding": {"numeric_bins": 0}}
    off_cfg = small_config(data, tmp_path, ["model.linear.enabled=false"], model=chain)
    on_cfg = small_config(data, tmp_path, ["model.linear.enabled=true"], model=chain)
    spec = fitted_spec(off_cfg)
    torch.manual_seed(0)
    off = build_model(off_cfg, spec).eval()
    torch.manual_seed(0)
    on = build_model(on_cfg, spec).eval()
    assert not any("linear" in k for k in off.state_dict())
    # built after the deep part: switching it on leaves the deep part's init unchanged
    deep_on = {k: v for k, v in on.state_dict().items() if "linear" not in k}
    assert deep_on.keys() == off.state_dict().keys()
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in deep_on.items())
    batch = first_batch(on_cfg, spec)
    with torch.no_grad():
        torch.testing.assert_close(on(batch.sparse, batch.dense), off(batch.sparse, batch.dense))
        _randomise_linear(on)
        arch = on.task_arch
        deep = arch.towers(
            arch.block(
                *arch.block_inputs(
                    arch.field_tokens(on.sparse_tokens(batch.sparse), batch.dense), {}
                ),
                {},
            )
        )
        # the first-order term by hand: Σ_f weight rows (mean for mean-pooled) + u·x̃ + b
        assert isinstance(on.linear_arch, LinearArch)
        pooled = on.linear_arch(batch.sparse)[:, :, :2].sum(1)
        head = arch.linear
        first = pooled + arch.normalizer(batch.dense) @ head.weight.t() + head.bias
        want = chain_logits(deep + first, torch.tensor([0, 1]))
        torch.testing.assert_close(on(batch.sparse, batch.dense), want)


def test_linear_term_exports_with_parity(data: Path, tmp_path) -> None:
    cfg = small_config(data, tmp_path, ["model.linear.enabled=true"])
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, spec).eval()
    _randomise_linear(model)
    batch = first_batch(cfg, spec, rows=128)
    with torch.no_grad():
        eager = model.predict(batch.sparse, batch.dense)
        serving = ServingModule(model, spec.sparse_names, len(spec.numeric)).eval()
        inputs = (batch.sparse.values(), batch.sparse.lengths(), batch.dense)
        assert float((serving(*inputs) - eager).abs().max()) <= 1e-5
    scripted = script_serving(model, spec)
    assert check_parity(scripted, model, batch) <= PARITY_TOLERANCE <= 1e-5
    path = tmp_path / "m.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))  # the scripted graph, saved and read back
    with torch.no_grad():
        assert float((loaded(*inputs) - eager).abs().max()) <= 1e-5


def test_checkpoint_without_linear_loads_with_linear_off(data: Path, tmp_path) -> None:
    cfg = small_config(data, tmp_path, ["model.linear.enabled=false"])
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    old = build_model(cfg, spec).eval()
    path = tmp_path / "old.pt"
    torch.save(old.state_dict(), path)
    torch.manual_seed(1)
    new = build_model(cfg, spec).eval()
    new.load_state_dict(torch.load(path), strict=True)
    batch = first_batch(cfg, spec)
    with torch.no_grad():
        assert torch.equal(new(batch.sparse, batch.dense), old(batch.sparse, batch.dense))
    on = build_model(small_config(data, tmp_path, ["model.linear.enabled=true"]), spec)
    with pytest.raises(RuntimeError, match="linear"):
        on.load_state_dict(torch.load(path), strict=True)


def test_linear_table_trains_with_its_own_adagrad_settings(data: Path, tmp_path) -> None:
    cfg = small_config(
        data, tmp_path, ["model.linear.enabled=true", "model.linear.learning_rate=0.5"]
    )
    step = TrainStep(cfg, fitted_spec(cfg))
    lrs = {
        name: {g["lr"] for g in m.fused_optimizer().param_groups} for name, m in step.fused.items()
    }
    assert lrs["linear_arch.ebc"] == {0.5}
    (emb_lr,) = lrs["sparse_arch.embedding.ebc"]
    assert emb_lr == pytest.approx(cfg.model.embedding.learning_rate) != 0.5
    # the linear head (numeric weights, bias) has its own Adam group; the rest as before
    head = {id(p) for p in step.model.task_arch.linear.parameters()}
    groups = step.dense_opt.param_groups
    assert [g["lr"] for g in groups] == [
        cfg.training.learning_rate,
        cfg.model.linear.dense_learning_rate,
    ]
    assert {id(p) for p in groups[1]["params"]} == head
    assert not head & {id(p) for p in groups[0]["params"]}


def test_deep_off_needs_the_linear_term(data: Path, tmp_path) -> None:
    with pytest.raises(ConfigError, match="model.deep"):
        small_config(data, tmp_path, ["model.deep=false", "model.linear.enabled=false"])


# ------------------------------------------------------------------ the CLI end to end


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_baseline_cli_then_evaluate_export_and_floor_report(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers import write_small_config

    config = write_small_config(data, tmp_path / "c.yaml", training={"epochs": 1})
    floor, model = tmp_path / "floor", tmp_path / "model"
    assert cli_main(["baseline", "--config", str(config), "--out", str(floor)]) == 0
    summary = _last_json(capsys)
    # the floor trains past the experiment's 1 epoch, until valid stops improving
    assert summary["run_dir"] == str(floor) and 1 < summary["epochs_run"] <= FLOOR_MIN_EPOCHS
    stored = yaml.safe_load((floor / "config.yaml").read_text())
    assert stored["model"]["deep"] is False and stored["model"]["linear"]["enabled"] is True
    assert stored["name"].endswith("-floor")
    assert cli_main(["train", "--config", str(config), "--out", str(model)]) == 0
    capsys.readouterr()
    args = ["evaluate", "--run", str(model), "--floor", str(floor), "--bootstrap", "0"]
    assert cli_main([*args, "--no-plots"]) == 0
    result = _last_json(capsys)
    assert (floor / "eval" / "report.json").exists()  # the floor was evaluated first
    report = json.loads((model / "eval" / "report.json").read_text())
    floor_report = json.loads((floor / "eval" / "report.json").read_text())
    section = report["floor"]
    for task, m in section["tasks"].items():
        assert m["floor_auc"] == floor_report["tasks"][task]["auc"]
        assert m["below_floor"] == (m["auc"] < m["floor_auc"])
    assert result["below_floor"] == section["below_floor"]
    markdown = (model / "eval" / "report.md").read_text()
    assert "## Floor: logistic regression" in markdown
    sentence = "below its floor" if section["below_floor"] else "above its floor"
    assert sentence in markdown
    assert cli_main(["export", "--run", str(floor)]) == 0
    assert _last_json(capsys)["parity_max_abs_diff"] <= 1e-5
    assert cli_main(["compare", str(model), str(floor)]) == 0
    assert "-floor" in _last_json(capsys)["markdown"]


# ------------------------------------------------------------------ sharded (torchrec DMP)


def _sharded_worker(rank: int, cfgs: list, store: str, out: str) -> None:
    """One gloo rank: the sharded step and the local step from the same seed, 3 batches."""
    import torch.distributed as dist

    from mtrec.train.distributed import ShardedTrainStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=1)
    result = []
    for cfg in cfgs:
        spec = fitted_spec(cfg)
        batch = first_batch(cfg, spec, "train", rows=256)
        sharded = ShardedTrainStep(cfg, spec, device=torch.device("cpu"))
        local = TrainStep(cfg, spec)
        losses = [(float(sharded.step(batch)), float(local.step(batch))) for _ in range(3)]
        local.model.eval()
        with torch.no_grad():
            want = local.model(batch.sparse, batch.dense)
        gap = float((sharded.logits(batch) - want).abs().max())
        result.append({"losses": losses, "gap": gap})
    torch.save(result, out)
    dist.destroy_process_group()


@pytest.mark.integration
def test_sharded_training_matches_the_local_step_with_the_linear_term(
    data: Path, tmp_path: Path
) -> None:
    """The DMP path gives the linear table its own Adagrad settings too (same losses)."""
    import torch.multiprocessing as mp

    on = ["model.linear.enabled=true", "model.linear.learning_rate=0.5"]
    cfgs = [
        small_config(data, tmp_path, on),
        small_config(data, tmp_path, [*on, "model.deep=false"]),
        # the piecewise-linear ramps (model.embedding.numeric_bins) read by both parts
        small_config(data, tmp_path, [*on, "model.embedding.numeric_bins=4"]),
        # the priors on the per-id weights and the embedding rows (their use weights come
        # from the sharded forward)
        small_config(data, tmp_path, [*on, "model.linear.prior_std=0.05"]),
        small_config(data, tmp_path, [*on, "model.embedding.prior_std=0.05"]),
        # a wide-only feature: the deep embedding reads the others (features[].deep)
        small_config(data, tmp_path, on, features=small_features(data, user_id={"deep": False})),
    ]
    out = tmp_path / "result.pt"
    mp.spawn(_sharded_worker, args=(cfgs, str(tmp_path / "store"), str(out)), nprocs=1, join=True)
    for r in torch.load(out, weights_only=True):
        for sharded, local in r["losses"]:
            assert sharded == pytest.approx(local, rel=1e-6)
        assert r["gap"] <= 1e-5


def test_serving_filters_ids_once_for_the_embedding_and_the_linear_term(
    data: Path, tmp_path
) -> None:
    """The linear term's frequency filter is the embedding's (same kept sets): serving
    filters once and pools both from that, with the scores of filtering twice."""
    cfg = small_config(data, tmp_path, ["model.linear.enabled=true", "model.embedding.min_count=3"])
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, spec).eval()
    _randomise_linear(model)
    batch = first_batch(cfg, spec, rows=128)
    serving = ServingModule(model, spec.sparse_names, len(spec.numeric)).eval()
    assert serving.shared_filter and serving.sparse.value_filter.active
    inputs = (batch.sparse.values(), batch.sparse.lengths(), batch.dense)
    with torch.no_grad():
        shared = serving(*inputs)
        serving.shared_filter = False
        separate = serving(*inputs)
        eager = model.predict(batch.sparse, batch.dense)
    assert torch.equal(shared, separate)
    assert float((shared - eager).abs().max()) <= 1e-5


def test_frequency_filters_compare_by_their_sets() -> None:
    from mtrec.embeddings.per_feature import FrequencyFilter

    kept = [torch.tensor([3, 5]), None]
    same = FrequencyFilter(2, kept)
    assert same.same_as(FrequencyFilter(2, [torch.tensor([3, 5]), None]))
    assert not same.same_as(FrequencyFilter(2, [torch.tensor([3, 6]), None]))
    assert not same.same_as(FrequencyFilter(2, kept, unknown_ids=[-1, 1]))
    assert not same.same_as(FrequencyFilter(2, None))


def test_floor_trains_to_convergence_not_the_deep_models_budget(tmp_path: Path) -> None:
    cfg = load_config(_tiny_set(tmp_path))
    cfg.training.epochs, cfg.training.early_stopping_patience = 3, 1
    floor = floor_config(cfg)
    assert (floor.training.epochs, floor.training.early_stopping_patience) == (FLOOR_MIN_EPOCHS, 2)
    assert (cfg.training.epochs, cfg.training.early_stopping_patience) == (3, 1)  # a copy
    assert (floor.model.deep, floor.model.linear.enabled, floor.model.embedding.numeric_bins) == (
        False,
        True,
        0,
    )
    cfg.training.epochs, cfg.training.early_stopping_patience = 50, 0
    assert (
        floor_config(cfg).training.epochs,
        floor_config(cfg).training.early_stopping_patience,
    ) == (50, 0)
