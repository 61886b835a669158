"""Piecewise-linear encoding of numeric features (``model.embedding.numeric_bins``).

The ramps themselves (values, steps for zero-width bins, clamping, eager == fx ==
TorchScript against a numpy reference), the fitted bin edges, their json round trip, and
the model: off builds exactly today's model, on starts as today's model, trains, and
exports with parity.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from helpers import (
    eval_loss,
    fitted_spec,
    one_numeric_config,
    seeded,
    small_config,
    small_data_dir,
)

from mtrec.config import ConfigError
from mtrec.data.batcher import iter_batches, load_encoded
from mtrec.data.fitting import fit_statistics_on_file
from mtrec.data.spec import FeatureSpec
from mtrec.embeddings.numeric import ROBUST_CLIP, NumericNormalizer
from mtrec.embeddings.piecewise import PiecewiseLinearEncoding
from mtrec.export.exporter import PARITY_TOLERANCE, check_parity, script_serving
from mtrec.model import build_model
from mtrec.train.step import TrainStep

# sum of the seeded encoding's ramps (edges and values from seeded(0), see
# test_encoding_eager_fx_script_match_a_numpy_reference); recorded when the module was written
REFERENCE_SUM = 232.8383331298828


def ramps(edges: list[list[float]], x: list[list[float]]) -> torch.Tensor:
    return PiecewiseLinearEncoding(edges)(torch.tensor(x))


def numpy_ramps(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The definition, one feature and bin at a time (float64)."""
    out = np.zeros((*x.shape, edges.shape[1] - 1))
    for b in range(x.shape[0]):
        for j in range(x.shape[1]):
            for k in range(1, edges.shape[1]):
                lo, hi = edges[j, k - 1], edges[j, k]
                if hi > lo:
                    out[b, j, k - 1] = min(max((x[b, j] - lo) / (hi - lo), 0.0), 1.0)
                else:
                    out[b, j, k - 1] = float(x[b, j] >= hi)
    return out


# ------------------------------------------------------------------------------ the ramps


def test_ramps_are_the_clamped_position_inside_each_bin() -> None:
    out = ramps([[0.0, 1.0, 3.0]], [[-1.0], [0.0], [0.5], [1.0], [2.0], [3.0], [7.0]])
    assert out.shape == (7, 1, 2)
    want = [[0, 0], [0, 0], [0.5, 0], [1, 0], [1, 0.5], [1, 1], [1, 1]]
    torch.testing.assert_close(out[:, 0], torch.tensor(want, dtype=torch.float32))


def test_sum_of_ramps_locates_x_between_the_edges() -> None:
    g = np.random.default_rng(0)
    edges = np.sort(g.normal(size=(3, 9)), axis=1)
    x = g.uniform(edges[:, 0], edges[:, -1], size=(200, 3))
    out = PiecewiseLinearEncoding(edges.tolist())(torch.tensor(x, dtype=torch.float32))
    # Σ_k e_k(x) = (index of x's bin) + (its position inside the bin): the edges' index
    # interpolated at x
    for j in range(3):
        where = np.interp(x[:, j], edges[j], np.arange(9))
        np.testing.assert_allclose(out[:, j].sum(-1).numpy(), where, atol=1e-5)
        # at most one ramp is strictly between 0 and 1: the one of x's bin
        inside = ((out[:, j] > 0) & (out[:, j] < 1)).sum(-1)
        assert int(inside.max()) <= 1


def test_zero_width_bins_are_steps() -> None:
    # edges of discrete data: the quantiles repeat at 1
    out = ramps([[0.0, 1.0, 1.0, 1.0, 2.0]], [[0.99], [1.0], [1.5], [0.0]])
    want = [[0.99, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0.5], [0, 0, 0, 0]]
    torch.testing.assert_close(out[:, 0], torch.tensor(want, dtype=torch.float32))
    # all edges equal (a feature with no finite value in training): every bin a step at 0
    out = ramps([[0.0, 0.0, 0.0]], [[-0.5], [0.0], [0.5]])
    torch.testing.assert_close(out[:, 0], torch.tensor([[0.0, 0], [1, 1], [1, 1]]))
    assert torch.isfinite(out).all()


def test_values_beyond_the_outer_edges_clamp() -> None:
    out = ramps([[-1.0, 0.0, 1.0], [5.0, 6.0, 9.0]], [[-1e30, 1e30], [-3.0, 100.0]])
    torch.testing.assert_close(out[:, 0], torch.zeros(2, 2))
    torch.testing.assert_close(out[:, 1], torch.ones(2, 2))


def test_edges_must_be_a_non_decreasing_table() -> None:
    with pytest.raises(ValueError, match="non-decreasing"):
        PiecewiseLinearEncoding([[0.0, 2.0, 1.0]])
    with pytest.raises(ValueError, match="K >= 1"):
        PiecewiseLinearEncoding([[0.0]])


def test_encoding_eager_fx_script_match_a_numpy_reference() -> None:
    g = seeded(0)
    edges = torch.randn(4, 7, generator=g).sort(dim=1).values
    edges[2, 3] = edges[2, 2]  # one zero-width bin
    x = torch.randn(16, 4, generator=g) * 1.5
    module = PiecewiseLinearEncoding(edges)
    eager = module(x)
    torch.testing.assert_close(eager, torch.jit.script(module)(x), rtol=0, atol=0)
    torch.testing.assert_close(eager, torch.fx.symbolic_trace(module)(x), rtol=0, atol=0)
    want = numpy_ramps(edges.double().numpy(), x.double().numpy())
    np.testing.assert_allclose(eager.numpy(), want, atol=1e-6)
    assert eager.sum().item() == pytest.approx(REFERENCE_SUM, abs=1e-4)
    # the edges are state (checkpoints and exports carry them)
    assert list(module.state_dict()) == ["edges"]


# ------------------------------------------------------------------------- fitted edges


def _config(path: Path, transform: str, bins: int, nan_policy: str = "fail"):
    return one_numeric_config(path, transform, nan_policy, numeric_bins=bins)


def _fitted(tmp_path: Path, x: list, transform: str = "standardize", bins: int = 4, **kw):
    path = tmp_path / "d.parquet"
    n = len(x)
    frame = pl.DataFrame(
        {"a": ["u"] * n, "x": pl.Series(x, dtype=pl.Float64), "y": [i % 2 for i in range(n)]}
    )
    frame.write_parquet(path)
    cfg = _config(path, transform, bins, **kw)
    spec = FeatureSpec.from_config(cfg)
    assert spec.numeric_bins == bins
    fit_statistics_on_file(spec, path, chunk_rows=30)
    return cfg, spec, path


def test_edges_are_the_normalised_quantiles_of_the_column(tmp_path: Path) -> None:
    _, spec, _ = _fitted(tmp_path, list(range(100)))
    stats = spec.numeric_stats["x"]
    assert stats.mean == pytest.approx(49.5)
    assert stats.std == pytest.approx(np.sqrt((100**2 - 1) / 12))
    quantiles = np.array([0.0, 24.75, 49.5, 74.25, 99.0])  # of 0..99, linear interpolation
    np.testing.assert_allclose(stats.edges, (quantiles - 49.5) / stats.std, rtol=1e-6)
    # the normaliser maps the raw quantiles onto the edges: same units as the ramps' input
    norm = NumericNormalizer.from_stats([stats])
    raw = torch.tensor(quantiles, dtype=torch.float64).unsqueeze(1)
    np.testing.assert_allclose(norm(raw)[:, 0].numpy(), stats.edges, rtol=1e-6)


def test_robust_edges_are_clipped_like_the_normalised_values(tmp_path: Path) -> None:
    _, spec, _ = _fitted(tmp_path, [*range(99), 1e9], transform="robust", bins=2)
    edges = spec.numeric_stats["x"].edges
    assert edges is not None and edges[-1] == ROBUST_CLIP
    assert edges[0] < edges[1] < ROBUST_CLIP


def test_discrete_and_empty_columns_fit_edges_the_model_encodes(tmp_path: Path) -> None:
    cfg, spec, path = _fitted(tmp_path, [0.0] * 10 + [1.0] * 70, bins=4)
    edges = spec.numeric_stats["x"].edges
    assert edges is not None and len(edges) == 5 and edges == sorted(edges)
    assert len(set(edges)) == 2  # the repeated quantile: zero-width bins
    arch = build_model(cfg, spec).task_arch
    r = arch.piecewise(arch.normalizer(torch.tensor([[0.0], [1.0]], dtype=torch.float64)))
    # 0 is the lowest edge (its first bin's ramp starts there); 1 is past every edge
    torch.testing.assert_close(r[:, 0], torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1]]))
    # no finite value at all: zeros, and the model still builds and scores finitely
    cfg, spec, path = _fitted(tmp_path, [None] * 40, bins=3, nan_policy="fill")
    assert spec.numeric_stats["x"].edges == [0.0] * 4
    model = build_model(cfg, spec).eval()
    chunk = load_encoded(spec, path, 40)
    batch = next(iter_batches(chunk, spec, 40))
    with torch.no_grad():
        assert torch.isfinite(model(batch.sparse, batch.dense)).all()


def test_stats_json_keeps_edges_and_reads_files_without_them(tmp_path: Path) -> None:
    _, spec, _ = _fitted(tmp_path, list(range(100)))
    spec.save_stats(tmp_path / "stats.json")
    again = FeatureSpec.from_config(_config(tmp_path / "d.parquet", "standardize", 4))
    again.load_stats(tmp_path / "stats.json")
    assert again.numeric_stats == spec.numeric_stats
    assert again.numeric_stats["x"].edges is not None
    # off: no edges key at all (the file is as before the encoding existed), and such a
    # file loads with edges None
    _, off, _ = _fitted(tmp_path, list(range(100)), bins=0)
    assert off.numeric_stats["x"].edges is None
    off.save_stats(tmp_path / "old.json")
    raw = json.loads((tmp_path / "old.json").read_text())
    assert set(raw["x"]) == {"transform", "mean", "std"}
    again.load_stats(tmp_path / "old.json")
    assert again.numeric_stats["x"].edges is None


def test_bins_without_fitted_edges_name_the_feature_and_the_fix(tmp_path: Path) -> None:
    cfg, _, _ = _fitted(tmp_path, list(range(100)), bins=4)
    _, off, _ = _fitted(tmp_path, list(range(100)), bins=0)
    with pytest.raises(ConfigError, match=r"'x'.*numeric_bins is 4.*no bin edges.*train a new"):
        build_model(cfg, off)
    _, three, _ = _fitted(tmp_path, list(range(100)), bins=3)
    with pytest.raises(ConfigError, match="3 bins"):
        build_model(cfg, three)


# ------------------------------------------------------------------------------ the model


def _models(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, bins: int, **model):
    data = small_data_dir(tmp_path_factory)
    model = {"linear": {"enabled": True}, **model}
    model["embedding"] = {"numeric_bins": bins, "id_dropout": 0.0}
    cfg = small_config(data, tmp_path / f"k{bins}", model=model)
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    return build_model(cfg, spec).eval(), cfg, spec


@pytest.mark.parametrize("deep", [True, False])
def test_bins_off_is_todays_model_and_on_starts_as_it(
    deep: bool, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    data = small_data_dir(tmp_path_factory)
    plain_cfg = small_config(
        data,
        tmp_path / "plain",
        model={
            "deep": deep,
            "linear": {"enabled": True},
            "embedding": {"id_dropout": 0.0, "numeric_bins": 0},  # today's model: bins off
        },
    )
    plain_spec = fitted_spec(plain_cfg)
    torch.manual_seed(0)
    plain = build_model(plain_cfg, plain_spec).eval()
    off, _, spec = _models(tmp_path_factory, tmp_path, 0, deep=deep)
    on, _, on_spec = _models(tmp_path_factory, tmp_path, 6, deep=deep)
    assert spec.stats_dict() == plain_spec.stats_dict()
    # bins only add the edges to the fitted statistics
    for name, stats in on_spec.numeric_stats.items():
        assert stats.edges is not None and len(stats.edges) == 7
        assert (stats.mean, stats.std) == (
            spec.numeric_stats[name].mean,
            spec.numeric_stats[name].std,
        )
    assert off.task_arch.piecewise is None
    base = plain.state_dict()
    assert list(off.state_dict()) == list(base)
    for key, value in off.state_dict().items():
        assert torch.equal(value, base[key]), key
    # on: three more tensors, everything else drawn identically (zero-init bin weights)
    extra = {"task_arch.piecewise.edges", "task_arch.linear.bin_weight"}
    if deep:
        extra.add("task_arch.numeric_embedding.bin_weight")
    assert set(on.state_dict()) - set(base) == extra
    for key, value in base.items():
        assert torch.equal(on.state_dict()[key], value), key
    assert on.task_arch.piecewise.edges.shape == (len(spec.numeric), 7)
    g = seeded(3)
    dense = torch.randn(32, len(spec.numeric), generator=g, dtype=torch.float64) * 2
    tokens = torch.randn(32, len(spec.sparse), 8, generator=g) if deep else None
    ids = torch.randn(32, len(spec.sparse), 4, generator=g)
    with torch.no_grad():
        want = plain.task_arch(tokens, dense, ids)
        torch.testing.assert_close(off.task_arch(tokens, dense, ids), want, rtol=0, atol=0)
        torch.testing.assert_close(on.task_arch(tokens, dense, ids), want, rtol=0, atol=0)
        # the bin weights are read: moving them moves the logits
        on.task_arch.linear.bin_weight.normal_(generator=g)
        assert not torch.allclose(on.task_arch(tokens, dense, ids), want)


def _randomise_bins(model: torch.nn.Module) -> None:
    g = seeded(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bin_weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_task_arch_with_bins_is_eager_fx_script_identical(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    model, _, spec = _models(tmp_path_factory, tmp_path, 5)
    _randomise_bins(model)
    arch = model.task_arch
    g = seeded(1)
    tokens = torch.randn(6, len(spec.sparse), 8, generator=g)
    dense = torch.randn(6, len(spec.numeric), generator=g)
    ids = torch.randn(6, len(spec.sparse), 4, generator=g)
    with torch.no_grad():
        eager = arch(tokens, dense, ids)
        exact = {"rtol": 0, "atol": 0}
        torch.testing.assert_close(torch.jit.script(arch)(tokens, dense, ids), eager, **exact)
        traced = torch.fx.symbolic_trace(arch)
        torch.testing.assert_close(traced(tokens, dense, ids), eager, **exact)
        # the numeric tokens are x̃·v + Σ_k r_k·W_k, computed by hand
        normed = arch.normalizer(dense)
        r = arch.piecewise(normed)
        emb = arch.numeric_embedding
        hand = normed.unsqueeze(-1) * emb.weight + (r.unsqueeze(-1) * emb.bin_weight).sum(2)
        torch.testing.assert_close(arch.field_tokens(tokens, dense)[:, len(spec.sparse) :], hand)
        head = arch.linear
        first = head.bias + normed @ head.weight.t() + ids.sum(1)[:, : len(spec.tasks)]
        first = first + (r.unsqueeze(-1) * head.bin_weight).sum((1, 2))
        torch.testing.assert_close(arch.first_order(ids, dense, normed, r), first)


def test_model_with_bins_trains_and_exports_with_parity(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    _, cfg, spec = _models(tmp_path_factory, tmp_path, 8)
    chunk = load_encoded(spec, cfg.dataset.train, cfg.dataset.chunk_rows)
    probe = next(iter_batches(chunk, spec, 1024))
    torch.manual_seed(0)
    step = TrainStep(cfg, spec)
    weights = [1.0] * len(spec.tasks)
    before = eval_loss(step.model, probe, weights)
    for epoch in range(2):
        for batch in iter_batches(chunk, spec, 256, shuffle=True, seed=epoch):
            assert torch.isfinite(step.step(batch))
    after = eval_loss(step.model, probe, weights)
    assert after < 0.95 * before, (before, after)
    arch = step.model.task_arch
    assert arch.numeric_embedding.bin_weight.abs().max() > 0
    assert arch.linear.bin_weight.abs().max() > 0
    # the serving module reuses the trained task arch: same scores, saved and reloaded
    model = step.model.eval()
    batch = next(iter_batches(load_encoded(spec, cfg.dataset.valid, 4096), spec, 128))
    scripted = script_serving(model, spec)
    assert check_parity(scripted, model, batch) <= PARITY_TOLERANCE
    path = tmp_path / "m.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    kjt = batch.sparse
    with torch.no_grad():
        probs = loaded(kjt.values(), kjt.lengths(), batch.dense)
        torch.testing.assert_close(
            probs, model.predict(kjt, batch.dense), rtol=0, atol=PARITY_TOLERANCE
        )


def test_a_run_with_bins_stores_its_edges_and_exports(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    from mtrec.export.exporter import export_run
    from mtrec.run import STATS_FILE
    from mtrec.train.loop import load_trained_model, train

    data = small_data_dir(tmp_path_factory)
    cfg = small_config(
        data, tmp_path, training={"epochs": 1}, model={"embedding": {"numeric_bins": 4}}
    )
    train(cfg, tmp_path / "run")
    stats = json.loads((tmp_path / "run" / STATS_FILE).read_text())
    assert stats and all(len(s["edges"]) == 5 for s in stats.values())
    _, spec, model = load_trained_model(tmp_path / "run")
    edges = model.task_arch.piecewise.edges
    want = torch.tensor([stats[name]["edges"] for name in spec.numeric_names])
    torch.testing.assert_close(edges, want, rtol=0, atol=0)
    summary = export_run(tmp_path / "run")
    assert (tmp_path / "run" / "export" / "model.pt").is_file(), summary
