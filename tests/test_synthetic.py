"""Planted synthetic data: determinism, calibration of the true probabilities, the
written config, the criteo-like preset and atomic writes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml

import mtrec.data.synthetic as synthetic
from mtrec.config import load_config
from mtrec.data.synthetic import (
    CRITEO_LIKE_NOMINAL_VOCABS,
    LARGE_BATCH_ROWS,
    batch_size_for,
    criteo_like_vocab_sizes,
    default_vocab_sizes,
    oracle_auc,
    synthesize,
)

SPLIT_FILES = ("train.parquet", "valid.parquet", "test.parquet")
ROWS = 20_000


def _read(out: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(out / name) for name in SPLIT_FILES}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synth_default")
    return out, synthesize(out, rows=ROWS, seed=7)


@pytest.fixture(scope="module")
def criteo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synth_criteo")
    return out, synthesize(out, rows=ROWS, seed=7, preset="criteo-like", vocab_scale=0.01)


# ------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_data(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", rows=5_000, seed=3)
    b = synthesize(tmp_path / "b", rows=5_000, seed=3)
    fa, fb = _read(tmp_path / "a"), _read(tmp_path / "b")
    for name in SPLIT_FILES:
        assert fa[name].equals(fb[name]), name
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "config.yaml").read_text() == (
        tmp_path / "b" / "config.yaml"
    ).read_text()
    assert a["oracle_auc"] == b["oracle_auc"]


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", rows=5_000, seed=3)
    synthesize(tmp_path / "b", rows=5_000, seed=4)
    fa, fb = _read(tmp_path / "a"), _read(tmp_path / "b")
    for name in SPLIT_FILES:
        assert fa[name].columns == fb[name].columns
        assert not fa[name].equals(fb[name]), name
        assert not np.array_equal(fa[name]["p_click"].to_numpy(), fb[name]["p_click"].to_numpy())


def test_splits_are_independent_draws(default_run: tuple[Path, dict[str, Any]]) -> None:
    frames = _read(default_run[0])
    heads = [f["p_click"].head(50).to_numpy() for f in frames.values()]
    assert not np.array_equal(heads[0], heads[1])
    assert not np.array_equal(heads[1], heads[2])


# --------------------------------------------------------------- labels and probabilities


@pytest.mark.parametrize("run", ["default_run", "criteo_run"])
def test_true_probabilities_reproduce_label_rates(run: str, request: pytest.FixtureRequest) -> None:
    out, summary = request.getfixturevalue(run)
    for name, frame in _read(out).items():
        for task in summary["tasks"]:
            y = frame[task].to_numpy()
            p = frame[f"p_{task}"].to_numpy()
            assert set(np.unique(y)) <= {0, 1}
            assert np.all((p > 0) & (p < 1))
            se = math.sqrt(float(np.sum(p * (1 - p)))) / len(p)
            assert abs(y.mean() - p.mean()) < 4 * se + 1e-9, (name, task, y.mean(), p.mean())


def test_default_positive_rates_are_varied(default_run: tuple[Path, dict[str, Any]]) -> None:
    _, summary = default_run
    rates = summary["positive_rate"]
    assert list(rates) == ["click", "like", "share", "follow"]
    assert all(0.03 < r < 0.45 for r in rates.values()), rates
    assert max(rates.values()) > 3 * min(rates.values())


def test_summary(default_run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = default_run
    assert summary["out"] == str(out)
    assert summary["config"] == str(out / "config.yaml")
    assert summary["rows"] == ROWS
    assert summary["preset"] == "default"
    assert summary["tasks"] == ["click", "like", "share", "follow"]
    assert summary["splits"] == {"train": 16_000, "valid": 2_000, "test": 2_000}
    frames = _read(out)
    for split, n in summary["splits"].items():
        assert frames[f"{split}.parquet"].height == n
    test = frames["test.parquet"]
    for task, auc in summary["oracle_auc"].items():
        assert 0.6 < auc < 0.99, (task, auc)
        recomputed = oracle_auc(test[task].to_numpy(), test[f"p_{task}"].to_numpy())
        assert recomputed == pytest.approx(auc)


def test_tasks_share_structure(default_run: tuple[Path, dict[str, Any]]) -> None:
    """Tasks of one group are more alike than tasks of different groups (shared + group)."""
    train = _read(default_run[0])["train.parquet"]
    logit = {t: np.log(train[f"p_{t}"].to_numpy() / (1 - train[f"p_{t}"].to_numpy())) for t in
             ("click", "like", "share", "follow")}  # fmt: skip
    same = np.corrcoef(logit["click"], logit["like"])[0, 1]
    other = np.corrcoef(logit["click"], logit["share"])[0, 1]
    assert 0.15 < other < same < 0.95, (same, other)


# --------------------------------------------------------------------------- the config


@pytest.mark.parametrize("run", ["default_run", "criteo_run"])
def test_config_loads_and_names_existing_columns(run: str, request: pytest.FixtureRequest) -> None:
    out, summary = request.getfixturevalue(run)
    text = (out / "config.yaml").read_text()
    assert text.startswith("# Generated by mtrec")
    raw = yaml.safe_load(text)
    assert raw["dataset"]["train"] == "train.parquet"  # relative to the yaml file
    cfg = load_config(out / "config.yaml")
    assert cfg.seed == 7
    assert Path(cfg.dataset.train) == (out / "train.parquet").resolve()
    assert Path(cfg.dataset.valid or "") == (out / "valid.parquet").resolve()
    assert Path(cfg.dataset.test or "") == (out / "test.parquet").resolve()
    assert cfg.task_names == summary["tasks"]
    expected = {"categorical": pl.Int64, "multi_hot": pl.List(pl.Int64), "numeric": pl.Float64}
    for name in SPLIT_FILES:
        schema = pl.read_parquet_schema(out / name)
        for f in cfg.features:
            assert schema[f.source] == expected[f.kind], (f.name, schema[f.source])
            if f.kind != "numeric":
                assert f.buckets is not None and f.buckets >= 2
        for t in cfg.tasks:
            assert schema[t.source] == pl.Int64
            assert t.true_prob == f"p_{t.name}"
            assert schema[t.true_prob] == pl.Float64
        if cfg.group_key is not None:
            assert schema[cfg.group_key] == pl.Int64
    assert cfg.model.embedding.dim == 16 and cfg.model.embedding.type == "unified"
    if run == "default_run":
        # the design's full stack: unified embedding → AutoInt → HoME over the planted groups
        assert cfg.model.interaction.type == "autoint"
        assert cfg.model.multitask.type == "home"
        assert cfg.model.multitask.home.task_groups == {
            "engage_a": ["click", "like"],
            "engage_b": ["share", "follow"],
        }
    else:
        assert cfg.model.interaction.type == "none"
        assert cfg.model.multitask.type == "mmoe"
    assert cfg.model.multitask.num_experts == 4
    # HoME (the grouped presets) at a quarter of the experts' width, behind a narrower
    # AutoInt+ (docs/generalisation.md, "The default experiment's widths")
    assert cfg.model.multitask.expert_hidden == ([32, 16] if run == "default_run" else [128, 64])
    if run == "default_run":
        assert cfg.model.interaction.attention_dim == 8
        assert cfg.model.interaction.dnn == [128, 64]
    assert cfg.model.multitask.tower_hidden == [64]
    assert cfg.training.early_stopping_patience == 1


def test_batch_size_grows_with_the_full_stacks_data() -> None:
    """The default preset's config trains on 2048-row batches from LARGE_BATCH_ROWS rows
    (the demo's 1M), 1024 below (60k rows keep 47 steps an epoch); the other presets keep
    theirs whatever the rows."""
    assert batch_size_for("default", 60_000) == 1024
    assert batch_size_for("default", LARGE_BATCH_ROWS - 1) == 1024
    assert batch_size_for("default", LARGE_BATCH_ROWS) == 2048
    assert batch_size_for("default", 1_000_000) == 2048
    assert batch_size_for("cold-start", 1_000_000) == 1024
    assert batch_size_for("criteo-like", 1_000) == batch_size_for("criteo-like", 10**6) == 4096


def test_default_config_features(default_run: tuple[Path, dict[str, Any]]) -> None:
    cfg = load_config(default_run[0] / "config.yaml")
    assert cfg.group_key == "user_id"
    assert cfg.training.batch_size == batch_size_for("default", ROWS) == 1024
    kinds = {f.name: f.kind for f in cfg.features}
    assert [n for n, k in kinds.items() if k == "categorical"] == ["user_id"] + [
        f"c{i}" for i in range(8)
    ]
    assert [n for n, k in kinds.items() if k == "numeric"] == ["n0", "n1", "n2", "n3"]
    (tags,) = cfg.features_of("multi_hot")
    assert tags.name == "tags" and tags.pooling == "mean"
    vocab = default_vocab_sizes()
    assert max(vocab.values()) == 1_000_000
    for f in cfg.features_of("categorical", "multi_hot"):
        assert f.buckets == min(2 * vocab[f.name], 2_000_000)
    transforms = {f.name: f.transform for f in cfg.features_of("numeric")}
    assert transforms["n1"] == "log1p_standardize"


def test_default_feature_values(default_run: tuple[Path, dict[str, Any]]) -> None:
    train = _read(default_run[0])["train.parquet"]
    vocab = default_vocab_sizes()
    for name in ["user_id", *(f"c{i}" for i in range(8))]:
        col = train[name]
        assert col.null_count() == 0
        assert col.min() >= 0 and col.max() < vocab[name]  # type: ignore[operator]
        counts = col.value_counts()["count"].sort(descending=True).to_numpy()
        # Zipf: the most frequent value is much more common than the median one
        assert counts[0] > 4 * np.median(counts), name
    lengths = train["tags"].list.len()
    assert lengths.min() == 0 and lengths.max() == 5
    tokens = train["tags"].explode().drop_nulls()
    assert tokens.min() >= 0 and tokens.max() < vocab["tags"]  # type: ignore[operator]
    assert train["n1"].min() > 0 and train["n1"].skew() > 2  # type: ignore[operator]


def test_num_tasks(tmp_path: Path) -> None:
    one = synthesize(tmp_path / "one", rows=2_000, num_tasks=1)
    assert one["tasks"] == ["click"]
    six = synthesize(tmp_path / "six", rows=2_000, num_tasks=6, vocab_scale=0.1)
    assert six["tasks"] == ["click", "like", "share", "follow", "task4", "task5"]
    assert load_config(tmp_path / "six" / "config.yaml").task_names == six["tasks"]
    text = (tmp_path / "six" / "config.yaml").read_text()
    assert "engage_a = [click, like, share]; engage_b = [follow, task4, task5]" in text
    crit = synthesize(tmp_path / "c1", rows=2_000, preset="criteo-like", num_tasks=1)
    assert crit["tasks"] == ["click"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rows": 5},
        {"preset": "criteo"},
        {"vocab_scale": 0.0},
        {"vocab_scale": float("nan")},
        {"num_tasks": 0},
        {"preset": "criteo-like", "num_tasks": 3},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        synthesize(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ criteo-like


def test_criteo_like_vocab_sizes() -> None:
    sizes = criteo_like_vocab_sizes(1.0)
    assert len(sizes) == 26
    assert min(sizes) == 10 and max(sizes) == 1_000_000
    assert sum(sizes) == pytest.approx(3.7e6, rel=0.01)
    for scale in (0.5, 0.1, 0.01):
        assert sum(criteo_like_vocab_sizes(scale)) == pytest.approx(3.7e6 * scale, rel=0.01)
    assert min(criteo_like_vocab_sizes(1e-4)) == 2
    assert tuple(criteo_like_vocab_sizes()) == CRITEO_LIKE_NOMINAL_VOCABS
    with pytest.raises(ValueError):
        criteo_like_vocab_sizes(-1.0)


def test_criteo_like_shape(criteo_run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = criteo_run
    assert summary["preset"] == "criteo-like"
    assert summary["tasks"] == ["click", "conversion"]
    rates = summary["positive_rate"]
    assert 0.18 < rates["click"] < 0.27
    assert 0.02 < rates["conversion"] < 0.06
    for auc in summary["oracle_auc"].values():
        assert 0.6 < auc < 0.99
    cfg = load_config(out / "config.yaml")
    assert cfg.dataset.nan_policy == "fill"
    assert cfg.training.batch_size == 4096
    numeric = cfg.features_of("numeric")
    categorical = cfg.features_of("categorical")
    assert [f.name for f in numeric] == [f"I{i}" for i in range(1, 14)]
    assert [f.name for f in categorical] == [f"C{i}" for i in range(1, 27)]
    assert all(f.transform == "log1p_standardize" for f in numeric)
    assert not cfg.features_of("multi_hot")
    sizes = criteo_like_vocab_sizes(0.01)
    train = _read(out)["train.parquet"]
    for f in numeric:
        col = train[f.name]
        assert 0.03 < col.null_count() / train.height < 0.12, f.name
        values = col.drop_nulls().to_numpy()
        assert values.min() >= 0 and np.all(values == np.floor(values))
    null_rates = [train[f.name].null_count() / train.height for f in categorical]
    assert max(null_rates) < 0.06 and sum(r > 0 for r in null_rates) >= 5
    for f, size in zip(categorical, sizes, strict=True):
        col = train[f.name].drop_nulls()
        assert col.min() >= 0 and col.max() < size  # type: ignore[operator]
    both = train.select((pl.col("conversion") <= pl.col("click")).all()).item()
    assert both  # a conversion needs a click
    assert (train["p_conversion"] <= train["p_click"]).all()


# --------------------------------------------------------------------------- atomic writes


def _fail_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Chunks of 1000 rows; building the arrow table of chunk ``calls + 1`` raises."""
    real = synthetic._Schema.feature_arrays
    seen = {"n": 0}

    def flaky(self: Any, chunk: Any) -> Any:
        seen["n"] += 1
        if seen["n"] > calls:
            raise RuntimeError("boom")
        return real(self, chunk)

    monkeypatch.setattr(synthetic, "CHUNK_ROWS", 1_000)
    monkeypatch.setattr(synthetic._Schema, "feature_arrays", flaky)


# 5000 rows: train has 4 chunks; fail mid-way through train, or once train is complete
@pytest.mark.parametrize("calls", [2, 4])
def test_failure_leaves_no_partial_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: int
) -> None:
    _fail_after(monkeypatch, calls)
    with pytest.raises(RuntimeError, match="boom"):
        synthesize(tmp_path, rows=5_000)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_good_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synthesize(tmp_path, rows=2_000, seed=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {*SPLIT_FILES, "config.yaml"}

    def broken(path: Path, text: str) -> None:
        path.write_text(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "_write_config", broken)
    with pytest.raises(OSError, match="disk full"):
        synthesize(tmp_path, rows=3_000, seed=2)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before


# ------------------------------------------------------------------------------ oracle AUC


def test_oracle_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 20, 300).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert oracle_auc(y, s) == pytest.approx(expected)
    assert oracle_auc(np.zeros(5), np.arange(5.0)) is None
    assert oracle_auc(np.array([0, 1]), np.array([0.1, 0.9])) == 1.0


# --------------------------------------------------------------------------- cold-start

COLD_ROWS = 100_000
SIDE_CATS = ("gender", "region", "device", "item_category")
SIDE_NUMS = ("user_age", "item_price", "hour")


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synth_cold")
    return out, synthesize(out, rows=COLD_ROWS, seed=3, preset="cold-start")


def test_cold_start_same_seed_same_data(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", rows=5_000, seed=1, preset="cold-start")
    b = synthesize(tmp_path / "b", rows=5_000, seed=1, preset="cold-start")
    c = synthesize(tmp_path / "c", rows=5_000, seed=2, preset="cold-start")
    for name in SPLIT_FILES:
        da, db = (pl.read_parquet(tmp_path / d / name) for d in "ab")
        assert da.equals(db), name
    assert (tmp_path / "a" / "config.yaml").read_text() == (
        tmp_path / "b" / "config.yaml"
    ).read_text()
    assert a["oracle_auc"] == b["oracle_auc"] and a["oracle_auc"] != c["oracle_auc"]
    assert not pl.read_parquet(tmp_path / "c" / "test.parquet").equals(
        pl.read_parquet(tmp_path / "a" / "test.parquet")
    )


def test_cold_start_is_split_by_time_with_new_users(cold_run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = cold_run
    frames = _read(out)
    ts = [frames[n].get_column("ts").to_numpy() for n in SPLIT_FILES]
    for t in ts:
        assert np.all(np.diff(t) >= 0)
    assert ts[0].max() <= ts[1].min() and ts[1].max() <= ts[2].min()
    train_users = set(frames["train.parquet"].get_column("user_id").to_list())
    test_users = frames["test.parquet"].get_column("user_id").to_numpy()
    unseen = float(np.mean([u not in train_users for u in test_users]))
    assert unseen >= 0.8
    assert unseen == pytest.approx(summary["unseen_test_fraction"]["user_id"])
    assert summary["splits"] == {"train": 80_000, "valid": 10_000, "test": 10_000}
    # power-law activity: the busiest user has far more rows than the median one
    counts = frames["train.parquet"].get_column("user_id").value_counts().get_column("count")
    assert counts.max() >= 20 * counts.median()


def test_cold_start_labels_and_oracle(cold_run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = cold_run
    assert summary["tasks"] == ["click", "conversion"]
    test = _read(out)["test.parquet"]
    click, conv = test.get_column("click").to_numpy(), test.get_column("conversion").to_numpy()
    assert np.all(conv <= click)  # a conversion needs a click
    assert 0.12 < summary["positive_rate"]["click"] < 0.18
    assert 0.02 < summary["positive_rate"]["conversion"] < 0.04
    for task in ("click", "conversion"):
        assert summary["oracle_auc"][task] > 0.75
        p = test.get_column(f"p_{task}").to_numpy()
        assert oracle_auc(test.get_column(task).to_numpy(), p) == summary["oracle_auc"][task]
        # without the user's own effect the best AUC on new users is lower, still far above 0.5
        cold = summary["cold_user_oracle_auc"][task]
        assert 0.7 < cold < summary["oracle_auc"][task]
        p_cold = test.get_column(f"p_{task}_cold").to_numpy()
        assert abs(p_cold.mean() - p.mean()) < 0.1 * p.mean()  # the same rate on average
        # the attainable oracle hides the effects of every id absent from training: below
        # the full oracle, and on train rows (every id seen) exactly the truth
        best = summary["attainable_oracle_auc"][task]
        assert 0.7 < best < summary["oracle_auc"][task]
        assert summary["attainable_oracle_auc_unseen"][task] < summary["oracle_auc"][task]
        p_best = test.get_column(f"p_{task}_attainable").to_numpy()
        assert oracle_auc(test.get_column(task).to_numpy(), p_best) == best
        train = _read(out)["train.parquet"]
        np.testing.assert_allclose(
            train.get_column(f"p_{task}_attainable").to_numpy(),
            train.get_column(f"p_{task}").to_numpy(),
            rtol=1e-6,
        )


def test_cold_start_partial_oracles(cold_run: tuple[Path, dict[str, Any]]) -> None:
    """oracle_knowing: knowing every seen id is p_<task>_attainable on the written test
    rows; knowing fewer ids loses AUC, knowing none loses the most."""
    from mtrec.data.synth_cold_start import oracle_knowing

    out, _ = cold_run
    test = _read(out)["test.parquet"]
    never = COLD_ROWS + 1
    labels, (every, items, none) = oracle_knowing(
        COLD_ROWS, 3, [(1, 1), (never, 1), (never, never)]
    )
    for j, task in enumerate(("click", "conversion")):
        np.testing.assert_array_equal(labels[:, j], test.get_column(task).to_numpy())
        np.testing.assert_allclose(
            every[:, j], test.get_column(f"p_{task}_attainable").to_numpy(), rtol=1e-12
        )
        y = labels[:, j]
        assert oracle_auc(y, every[:, j]) > oracle_auc(y, items[:, j]) > oracle_auc(y, none[:, j])


def test_cold_start_config_uses_package_defaults(cold_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = cold_run
    cfg = load_config(out / "config.yaml")
    assert cfg.model.embedding.type == "unified"
    assert cfg.group_key == "user_id"
    names = {f.name for f in cfg.features}
    assert {"user_id", "item_id", *SIDE_CATS, *SIDE_NUMS} == names
    assert [t.true_prob for t in cfg.tasks] == ["p_click", "p_conversion"]
    header = (out / "config.yaml").read_text()
    assert "unseen in training" in header


def test_cold_start_side_features_generalise_to_new_users(
    cold_run: tuple[Path, dict[str, Any]],
) -> None:
    """A one-hot logistic regression on side features alone (no ids), fitted on the training
    split, ranks the test rows of users never seen in training well above chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    out, _ = cold_run
    frames = _read(out)
    train, test = frames["train.parquet"], frames["test.parquet"]
    users = train.get_column("user_id").to_numpy()
    test = test.filter(~np.isin(test.get_column("user_id").to_numpy(), users))
    onehot = OneHotEncoder(handle_unknown="ignore").fit(train.select(SIDE_CATS).to_numpy())
    scale = StandardScaler().fit(np.log1p(train.select(SIDE_NUMS).to_numpy()))

    def x(df: pl.DataFrame) -> np.ndarray:
        cats = onehot.transform(df.select(SIDE_CATS).to_numpy()).toarray()
        return np.hstack([cats, scale.transform(np.log1p(df.select(SIDE_NUMS).to_numpy()))])

    lr = LogisticRegression(max_iter=300).fit(x(train), train.get_column("click").to_numpy())
    auc = oracle_auc(test.get_column("click").to_numpy(), lr.predict_proba(x(test))[:, 1])
    assert auc is not None and auc > 0.65
