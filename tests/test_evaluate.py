"""Offline evaluation: reports, plots, model insights, sharded scoring, compare, bad input."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from helpers import copy_run, fitted_spec, small_config, small_data_dir, trained_run
from torch import nn

from mtrec.cli import main
from mtrec.data.batcher import iter_batches, load_encoded
from mtrec.data.errors import DataError
from mtrec.evaluate import plots
from mtrec.evaluate.compare import intervals_disjoint, pool_interval
from mtrec.evaluate.insights import collect_insights
from mtrec.evaluate.parallel import score_ranges_locally, shard_ranges
from mtrec.evaluate.predict import collect_scores
from mtrec.evaluate.report import evaluate_run
from mtrec.metrics import auc, logloss
from mtrec.model import build_model
from mtrec.train.loop import RunError, load_trained_model

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the session's trained run (MMoE, 2 tasks, group key, oracle)."""
    return copy_run(trained_run(tmp_path_factory), tmp_path_factory.mktemp("ev") / "run")


@pytest.fixture(scope="module")
def evaluated(run: Path) -> dict[str, Any]:
    summary = evaluate_run(run, bootstrap_resamples=60, seed=1)
    return {"summary": summary, "report": json.loads(Path(summary["report"]).read_text())}


def cli(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------ report


def test_report_has_every_metric_and_its_definition(run: Path, evaluated: dict) -> None:
    report, summary = evaluated["report"], evaluated["summary"]
    assert summary["report"] == str(run / "eval" / "report.json")
    assert report["gauc_weighting"] == "impressions" and report["group_key"] == "user_id"
    assert report["bootstrap"] == {
        "resamples": 60,
        "method": "poisson",
        "alpha": 0.05,
        "seed": 1,
    }
    for task, m in report["tasks"].items():
        assert {
            "auc",
            "auc_ci",
            "logloss",
            "logloss_ci",
            "gauc",
            "gauc_unweighted",
            "calibration",
            "ece",
            "pos_rate",
            "rows",
            "oracle_auc",
        } <= m.keys()
        assert m["auc_ci"][0] < m["auc"] < m["auc_ci"][1]
        assert m["logloss_ci"][0] < m["logloss"] < m["logloss_ci"][1]
        assert m["rows"] == report["rows"]
        s = summary["tasks"][task]
        assert s["auc"] == pytest.approx(m["auc"], abs=1e-6)
        assert s["auc_ci"] == pytest.approx(m["auc_ci"], abs=1e-6)
    md = (run / "eval" / "report.md").read_text()
    assert "weighted by impressions" in md and "95% percentile bootstrap" in md


def test_report_metrics_equal_a_direct_computation(run: Path, evaluated: dict) -> None:
    cfg, spec, model = load_trained_model(run)
    test = load_encoded(spec, cfg.dataset.test, cfg.dataset.chunk_rows)
    with torch.no_grad():
        probs = torch.cat([model.predict(b.sparse, b.dense) for b in iter_batches(test, spec, 97)])
    labels = test.labels.numpy()
    for j, task in enumerate(spec.task_names):
        m = evaluated["report"]["tasks"][task]
        p = probs[:, j].numpy()
        assert m["auc"] == pytest.approx(auc(labels[:, j], p), abs=1e-6)
        assert m["logloss"] == pytest.approx(logloss(labels[:, j], p), rel=1e-5)
        assert m["oracle_auc"] == auc(labels[:, j], test.true_probs[:, j].numpy())


def test_plots_are_pngs_linked_from_the_markdown(run: Path, evaluated: dict) -> None:
    written = evaluated["report"]["plots"]
    # MMoE has expert gates; this run has no AutoInt, so no attention heatmap
    assert set(written) == {"roc", "reliability", "histograms", "gates"}
    md = (run / "eval" / "report.md").read_text()
    for name in written.values():
        path = run / "eval" / name
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
        assert f"]({name})" in md
    gates = evaluated["report"]["insights"]["gates"]
    weights = np.array(gates["mean_weight"])
    assert weights.shape == (2, 2) and np.allclose(weights.sum(1), 1.0)


def test_bootstrap_is_seeded(run: Path, tmp_path: Path, evaluated: dict) -> None:
    again = evaluate_run(run, out=tmp_path / "a", bootstrap_resamples=60, seed=1, plots=False)
    other = evaluate_run(run, out=tmp_path / "b", bootstrap_resamples=60, seed=2, plots=False)
    task = next(iter(again["tasks"]))
    assert again["tasks"] == evaluated["summary"]["tasks"]
    assert other["tasks"][task]["auc_ci"] != again["tasks"][task]["auc_ci"]
    assert other["tasks"][task]["auc"] == again["tasks"][task]["auc"]
    none = evaluate_run(run, out=tmp_path / "c", bootstrap_resamples=0, plots=False)
    assert "auc_ci" not in none["tasks"][task]
    assert not list((tmp_path / "c").glob("*.png"))


# ------------------------------------------------------------------- sharded scoring


def test_shard_ranges_cover_disjoint_aligned() -> None:
    assert shard_ranges(10, 3, align=2) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(5, 4, align=8) == [(0, 5)]  # fewer rows than one batch: one shard
    for rows, shards, align in [(1000, 3, 64), (4096, 4, 1024), (7, 7, 1), (1, 2, 3)]:
        ranges = shard_ranges(rows, shards, align)
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert all(lo % align == 0 for lo, _ in ranges)
        assert len(ranges) <= shards


def test_sharded_scoring_equals_one_pass(run: Path) -> None:
    cfg, spec, model = load_trained_model(run)
    path = cfg.dataset.test
    # chunks of 150 rows and batches of 64: shard and chunk boundaries cut batches
    one = collect_scores(model, spec, path, 64, chunk_rows=150)
    rows = len(one)
    merged = score_ranges_locally(model, spec, path, shard_ranges(rows, 3, 64), 64, 150)
    np.testing.assert_array_equal(merged.labels, one.labels)
    np.testing.assert_array_equal(merged.probs, one.probs)
    np.testing.assert_array_equal(merged.groups, one.groups)
    np.testing.assert_array_equal(merged.true_probs, one.true_probs)
    assert merged.compute(spec.task_names) == one.compute(spec.task_names)


@pytest.mark.integration
def test_workers_on_ray_give_the_same_report(run: Path, tmp_path: Path, evaluated: dict) -> None:
    par = evaluate_run(run, out=tmp_path, workers=2, bootstrap_resamples=60, seed=1, plots=False)
    assert par["tasks"] == evaluated["summary"]["tasks"]
    report = json.loads(Path(par["report"]).read_text())
    assert report["workers"] == 2
    assert report["tasks"] == evaluated["report"]["tasks"]


# ----------------------------------------------------------------------------- insights


@pytest.fixture(scope="module")
def autoint_setup(tmp_path_factory: pytest.TempPathFactory):
    data = small_data_dir(tmp_path_factory)
    cfg = small_config(
        data,
        tmp_path_factory.mktemp("ai"),
        model={"interaction": {"type": "autoint", "layers": 2, "attention_dim": 8, "heads": 2}},
    )
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, spec).eval()
    return cfg, spec, model


def test_attention_heatmap_is_the_mean_last_layer_map(autoint_setup) -> None:
    cfg, spec, model = autoint_setup
    ins = collect_insights(model, spec, cfg.dataset.valid, batch_size=128, max_rows=300)
    assert ins.rows == 300 and ins.fields == spec.sparse_names + spec.numeric_names
    chunk = load_encoded(spec, cfg.dataset.valid, cfg.dataset.chunk_rows).slice(0, 300)
    (batch,) = iter_batches(chunk, spec, 300)
    with torch.no_grad():
        maps = model.interaction.attention_maps(model.field_tokens(batch.sparse, batch.dense))
    expected = maps[-1].double().mean(dim=(0, 1)).numpy()
    assert ins.attention.shape == (len(ins.fields),) * 2
    np.testing.assert_allclose(ins.attention, expected, atol=1e-6)
    np.testing.assert_allclose(ins.attention.sum(1), 1.0, atol=1e-6)  # softmax rows
    assert ins.gates is not None  # MMoE behind the interaction still has its gates
    fig = plots.heatmap(ins.attention, ins.fields, ins.fields, "t", "key", "query")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ins.fields
    assert [t.get_text() for t in ax.get_yticklabels()] == ins.fields


class FakeGatedBlock(nn.Module):
    """Wraps a block and reports documented-format diagnostics: one shared expert and
    one specific expert per task, a non-task gate (ignored), gates from v's mean."""

    def __init__(self, inner: nn.Module, tasks: list[str]) -> None:
        super().__init__()
        self.inner, self.tasks = inner, tasks
        self.out_features = inner.out_features

    def forward(self, v: torch.Tensor, tokens: list[torch.Tensor], aux: dict) -> list:
        return self.inner(v, tokens, aux)

    def diagnostics(self, v: torch.Tensor, tokens: list[torch.Tensor]) -> dict[str, Any]:
        share = float(torch.sigmoid(v.mean()))  # differs per batch
        gates = {"level0:shared": {"experts": ["s"], "mean_weight": [1.0], "entropy": 0.0}}
        for i, t in enumerate(self.tasks):
            w = share if i == 0 else 1 - share
            gates[f"task:{t}"] = {
                "experts": ["shared", f"{t}_own"],
                "mean_weight": [w, 1 - w],
                "entropy": float(i),
            }
        return {"experts": {}, "gates": gates, "shared_usage": {}}


def test_gate_heatmap_weights_batches_by_rows(autoint_setup) -> None:
    cfg, spec, model = autoint_setup
    tasks = spec.task_names
    fake = FakeGatedBlock(model.block, tasks)
    model.block, original = fake, model.block
    try:
        ins = collect_insights(model, spec, cfg.dataset.valid, batch_size=128, max_rows=300)
        chunk = load_encoded(spec, cfg.dataset.valid, cfg.dataset.chunk_rows).slice(0, 300)
        shares, sizes = [], []
        with torch.no_grad():
            for b in iter_batches(chunk, spec, 128):  # 128, 128, 44 rows
                v, tokens = model.block_inputs(b.sparse, b.dense, {})
                shares.append(fake.diagnostics(v, tokens)["gates"][f"task:{tasks[0]}"])
                sizes.append(b.batch_size)
    finally:
        model.block = original
    w0 = sum(s["mean_weight"][0] * n for s, n in zip(shares, sizes)) / sum(sizes)
    assert sizes == [128, 128, 44]
    assert ins.gate_tasks == tasks
    assert ins.gate_experts == ["shared", f"{tasks[0]}_own", f"{tasks[1]}_own"]
    g = ins.gates
    assert g[0, 0] == pytest.approx(w0) and g[0, 1] == pytest.approx(1 - w0)
    assert g[1, 0] == pytest.approx(1 - w0) and g[1, 2] == pytest.approx(w0)
    assert math.isnan(g[0, 2]) and math.isnan(g[1, 1])  # a gate that does not mix it
    assert ins.gate_entropy == {tasks[0]: 0.0, tasks[1]: pytest.approx(1.0)}
    fig = plots.heatmap(g, ins.gate_tasks, ins.gate_experts, "gates", "expert", "task")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == tasks


def test_blocks_without_gates_get_no_gate_heatmap(autoint_setup) -> None:
    cfg, spec, model = autoint_setup

    class Plain(nn.Module):  # no diagnostics method at all
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.out_features = inner, inner.out_features

        def forward(self, v, tokens, aux):  # type: ignore[no-untyped-def]
            return self.inner(v, tokens, aux)

    model.block, original = Plain(model.block), model.block
    try:
        ins = collect_insights(model, spec, cfg.dataset.valid, batch_size=128, max_rows=64)
    finally:
        model.block = original
    assert ins.gates is None and ins.attention is not None
    assert "gates" not in ins.to_dict() and "attention" in ins.to_dict()


# ----------------------------------------------------------------------------- bad input


def test_run_without_checkpoint_names_what_is_missing(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = copy_run(run, tmp_path / "run")
    (broken / "checkpoints" / "best.pt").unlink()
    (broken / "feature_stats.json").unlink()
    with pytest.raises(RunError) as err:
        evaluate_run(broken)
    msg = str(err.value)
    assert "best.pt" in msg and "feature_stats.json" in msg and "mtrec train" in msg
    code, out, err_text = cli(["evaluate", "--run", broken], capsys)
    assert code == 2 and out == "" and "best.pt" in err_text
    assert len(err_text.strip().splitlines()) == 1


def test_data_missing_a_feature_column(run: Path, tmp_path: Path) -> None:
    cfg, _, _ = load_trained_model(run)
    bad = tmp_path / "no_c3.parquet"
    pl.read_parquet(cfg.dataset.test).drop("c3").write_parquet(bad)
    with pytest.raises(DataError) as err:
        evaluate_run(run, data=bad, plots=False)
    msg = str(err.value)
    assert str(bad) in msg and "'c3' (feature 'c3')" in msg and str(run) in msg
    assert not (run / "eval" / "report_no_c3.json").exists()


def test_data_with_different_tasks(run: Path, tmp_path: Path) -> None:
    cfg, spec, _ = load_trained_model(run)
    bad = tmp_path / "other_tasks.parquet"
    frame = pl.read_parquet(cfg.dataset.test)
    frame.rename({"like": "follow"}).write_parquet(bad)
    with pytest.raises(DataError) as err:
        evaluate_run(run, data=bad, plots=False)
    msg = str(err.value)
    assert "'like' (label of task 'like')" in msg
    assert f"trained on tasks {spec.task_names}" in msg and "no label for ['like']" in msg


def test_cli_evaluate_flags(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["evaluate", "--run", run, "--out", tmp_path, "--bootstrap", 30, "--seed", 4]
    code, out, _ = cli([*argv, "--bootstrap-method", "multinomial", "--no-plots"], capsys)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    for m in summary["tasks"].values():
        assert m["auc_ci"][0] < m["auc"] < m["auc_ci"][1]
    assert json.loads(Path(summary["report"]).read_text())["bootstrap"]["method"] == "multinomial"
    for flag, value in (("--bootstrap", -1), ("--workers", 0), ("--seed", -2)):
        code, out, err = cli(["evaluate", "--run", run, flag, value], capsys)
        assert code == 2 and out == "" and flag in err


# ----------------------------------------------------------------------------- compare


def test_interval_rules() -> None:
    assert pool_interval([[0.70, 0.72], [0.71, 0.74]]) == (0.70, 0.74)
    assert pool_interval([[0.70, 0.72], None]) is None
    assert intervals_disjoint((0.70, 0.72), (0.73, 0.75)) is True
    assert intervals_disjoint((0.70, 0.73), (0.73, 0.75)) is False  # touching overlaps
    assert intervals_disjoint(None, (0.7, 0.8)) is None


def _fake_run(src: Path, dest: Path, seed: int, lr: float | None, aucs: dict) -> Path:
    """A copy of ``src`` with another seed / learning rate and a hand-written report."""
    out = copy_run(src, dest)
    raw = yaml.safe_load((out / "config.yaml").read_text())
    raw["seed"] = seed
    if lr is not None:
        raw["training"]["learning_rate"] = lr
    (out / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    tasks = {t: {"auc": a, "auc_ci": [a - w, a + w]} for t, (a, w) in aucs.items()}
    (out / "eval").mkdir(exist_ok=True)
    (out / "eval" / "report.json").write_text(json.dumps({"tasks": tasks}))
    return out


def test_compare_pools_seeds_and_marks_unsupported_differences(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a1 = _fake_run(run, tmp_path / "a1", 1, None, {"click": (0.80, 0.01), "like": (0.70, 0.01)})
    a2 = _fake_run(run, tmp_path / "a2", 2, None, {"click": (0.82, 0.01), "like": (0.71, 0.01)})
    b = _fake_run(run, tmp_path / "b", 1, 0.5, {"click": (0.75, 0.01), "like": (0.715, 0.01)})
    md = tmp_path / "cmp.md"
    code, out, err = cli(["compare", a1, a2, b, "--out", md], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["out"] == str(md) and md.read_text().strip() == summary["markdown"]
    exps = summary["experiments"]
    assert sorted(e["runs"] for e in exps.values()) == [1, 2]
    pooled = next(e for e in exps.values() if e["runs"] == 2)
    other = next(e for e in exps.values() if e["runs"] == 1)
    click = pooled["auc"]["click"]
    assert click["mean"] == pytest.approx(0.81) and click["std"] == pytest.approx(0.02**0.5 / 10)
    assert click["interval"] == pytest.approx([0.79, 0.83])
    # click: A (best) [0.79, 0.83] vs B [0.74, 0.76] disjoint -> supported
    assert click["vs_best"] == "best" and other["auc"]["click"]["vs_best"] == "supported"
    # like: B has the best mean, but A's pooled interval [0.69, 0.72] overlaps B's
    assert other["auc"]["like"]["vs_best"] == "best"
    assert pooled["auc"]["like"]["vs_best"] == "not_supported"
    assert "≈" in summary["markdown"] and "(best)" in summary["markdown"]
    assert {d["task"]: d["supported"] for d in summary["differences"]} == {
        "click": True,
        "like": False,
    }


def test_expert_health_is_row_weighted_and_reported(autoint_setup) -> None:
    """Dead fractions and shared-expert usage of MMoE's diagnostics, averaged over batches
    by rows, reach the insights and the Markdown report."""
    from mtrec.evaluate.report import _health_markdown

    cfg, spec, model = autoint_setup
    ins = collect_insights(model, spec, cfg.dataset.valid, batch_size=128, max_rows=300)
    chunk = load_encoded(spec, cfg.dataset.valid, cfg.dataset.chunk_rows).slice(0, 300)
    per_batch, sizes = [], []
    model.eval()
    with torch.no_grad():
        for b in iter_batches(chunk, spec, 128):
            v, tokens = model.block_inputs(b.sparse, b.dense, {})
            per_batch.append(model.block.diagnostics(v, tokens))
            sizes.append(b.batch_size)
    experts = list(per_batch[0]["experts"])
    assert list(ins.expert_dead_fraction) == experts
    for e in experts:
        expected = sum(d["experts"][e]["dead_fraction"] * n for d, n in zip(per_batch, sizes))
        assert ins.expert_dead_fraction[e] == pytest.approx(expected / sum(sizes))
        assert 0.0 <= ins.expert_dead_fraction[e] <= 1.0
    # every MMoE expert is shared: its task shares sum to 1
    assert set(ins.shared_usage) == set(experts)
    for shares in ins.shared_usage.values():
        assert set(shares) == set(spec.task_names)
        assert sum(shares.values()) == pytest.approx(1.0)
    text = "\n".join(_health_markdown(ins.to_dict()))
    assert "## Expert health" in text and experts[0] in text
    assert "| shared expert | " + " | ".join(sorted(spec.task_names)) + " |" in text


# ------------------------------------------------------------------------------ slices


def test_slice_metrics_hand_checked() -> None:
    from mtrec.evaluate.slices import slice_metrics

    # ids 5, 7 were seen in training; 9 and 11 were not; 0 (MISSING_ID, a null) counts as seen
    ids = {"user": np.array([5, 9, 7, 11, 9, 0])}
    seen = {"user": np.array([5, 7])}
    labels = np.array([[1], [0], [0], [1], [1], [0]])
    probs = np.array([[0.9], [0.2], [0.3], [0.1], [0.6], [0.1]])
    true = np.array([[0.8], [0.1], [0.2], [0.3], [0.9], [0.2]])
    out = slice_metrics(labels, probs, true, ids, seen, ["click"])["user"]
    assert out["seen"]["rows"] == 3 and out["unseen"]["rows"] == 3
    s, u = out["seen"]["tasks"]["click"], out["unseen"]["tasks"]["click"]
    assert s["auc"] == 1.0  # seen rows: positive 0.9 above negatives 0.3, 0.1
    assert u["auc"] == 0.5  # unseen: negative 0.2 between positives 0.1 and 0.6
    assert u["mean_pred"] == pytest.approx(0.3) and u["observed"] == pytest.approx(2 / 3)
    assert u["calibration"] == pytest.approx(0.3 / (2 / 3))
    assert s["logloss"] == pytest.approx(-(math.log(0.9) + math.log(0.7) + math.log(0.9)) / 3)
    assert u["oracle_auc"] == 1.0


def test_report_slices_partition_the_rows(run: Path, evaluated: dict) -> None:
    """The run stored its training ids; the report's seen / unseen slices cover every row
    once and their metrics equal a direct computation on the rows of each slice."""
    from mtrec.data.hashing import hash_series
    from mtrec.evaluate.slices import SEEN_IDS_FILE, load_seen_ids

    report = evaluated["report"]
    seen = load_seen_ids(run / SEEN_IDS_FILE)
    assert seen and set(report["slices"]) == set(seen)
    cfg, spec, model = load_trained_model(run)
    collector = collect_scores(model, spec, cfg.dataset.test, 512)
    train = pl.read_parquet(cfg.dataset.train)
    test = pl.read_parquet(cfg.dataset.test)
    for feature, parts in report["slices"].items():
        assert parts["seen"]["rows"] + parts["unseen"]["rows"] == report["rows"]
        stored = set(seen[feature].tolist())
        assert stored == set(hash_series(train.get_column(feature)).tolist()) - {0}
        known = np.isin(hash_series(test.get_column(feature)), seen[feature])
        for j, task in enumerate(spec.task_names):
            got = parts["seen"]["tasks"][task]
            y, p = collector.labels[known, j], collector.probs[known, j]
            assert got["auc"] == pytest.approx(auc(y, p))
            assert got["logloss"] == pytest.approx(logloss(y, p))
            assert got["mean_pred"] == pytest.approx(float(p.mean()))
            # the CLI summary line carries the same slice numbers
            short = evaluated["summary"]["slices"][feature]["seen"]
            assert short["rows"] == parts["seen"]["rows"]
            assert short["tasks"][task]["auc"] == pytest.approx(got["auc"], abs=1e-6)
    assert (
        "## Seen / unseen ids"
        in Path(evaluated["summary"]["report"]).with_suffix(".md").read_text()
    )


def test_sliced_features_default_to_highest_cardinality(tmp_path: Path) -> None:
    from mtrec.config import FeatureConfig
    from mtrec.data.hashing import hash_series
    from mtrec.data.spec import FeatureSpec
    from mtrec.evaluate.slices import fit_seen_ids, load_seen_ids, save_seen_ids

    path = tmp_path / "train.parquet"
    pl.DataFrame(
        {
            "a": [1, 2, 3, 4, None],  # 4 distinct (+ a null, not an id)
            "b": [1, 1, 2, 2, 2],  # 2 distinct
            "c": [1, 2, 3, 3, 3],  # 3 distinct
            "tags": [[1], [2], [3], [4], [5]],
        }
    ).write_parquet(path)

    def spec(**slice_of: bool) -> FeatureSpec:
        feats = [FeatureConfig(n, "categorical", slice=slice_of.get(n)) for n in "abc"]
        return FeatureSpec(
            sparse=[*feats, FeatureConfig("tags", "multi_hot")], numeric=[], tasks=[]
        )

    seen = fit_seen_ids(spec(), path)
    assert list(seen) == ["a", "c"]  # the two with most distinct values; multi-hot never
    want = np.sort(hash_series(pl.Series([1, 2, 3, 4])))
    assert np.array_equal(seen["a"], want)
    assert list(fit_seen_ids(spec(a=False), path)) == ["b", "c"]
    assert list(fit_seen_ids(spec(b=True), path)) == ["b"]
    save_seen_ids(seen, tmp_path / "ids.npz")
    back = load_seen_ids(tmp_path / "ids.npz")
    assert back.keys() == seen.keys() and all(np.array_equal(back[k], seen[k]) for k in seen)
    assert load_seen_ids(tmp_path / "absent.npz") == {}


def test_slice_flag_only_on_categorical_features() -> None:
    from mtrec.config import ConfigError, parse_config

    raw = {
        "dataset": {"train": "t.parquet"},
        "features": [{"name": "x", "kind": "numeric", "slice": True}],
        "tasks": [{"name": "click"}],
    }
    with pytest.raises(ConfigError, match=r"features\[0\]\.slice: only categorical"):
        parse_config(raw)
    raw["features"] = [{"name": "x", "kind": "categorical", "slice": True}]
    assert parse_config(raw).features[0].slice is True
