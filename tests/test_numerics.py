"""The numeric path (issue #15): float64 until normalisation, overflow under nan_policy,
the outlier warning of standardize, and ``transform: robust``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from helpers import SMALL_MODEL, SMALL_TRAINING, one_numeric_config

from mtrec.config import ExperimentConfig, parse_config
from mtrec.data.batcher import load_encoded
from mtrec.data.errors import DataError, DataWarning
from mtrec.data.fitting import fit_statistics_on_file
from mtrec.data.numeric import QuantileSample, RunningMoments
from mtrec.data.spec import FeatureSpec, NumericStats
from mtrec.embeddings.numeric import ROBUST_CLIP, NumericNormalizer
from mtrec.export.exporter import script_serving
from mtrec.model import build_model
from mtrec.serving import encode


def config(
    path: Path, transform: str = "standardize", nan_policy: str = "fail"
) -> ExperimentConfig:
    return one_numeric_config(path, transform, nan_policy)


def write(tmp_path: Path, x: np.ndarray | list[float]) -> Path:
    path = tmp_path / "d.parquet"
    n = len(x)
    pl.DataFrame({"a": ["u"] * n, "x": x, "y": [i % 2 for i in range(n)]}).write_parquet(path)
    return path


def fitted(path: Path, transform: str = "standardize", nan_policy: str = "fail") -> FeatureSpec:
    spec = FeatureSpec.from_config(config(path, transform, nan_policy))
    fit_statistics_on_file(spec, path, chunk_rows=700)
    return spec


def normalised(spec: FeatureSpec, path: Path) -> torch.Tensor:
    """The model's view of column x: the normaliser applied to the encoded raw values."""
    norm = NumericNormalizer.from_stats(list(spec.numeric_stats.values()), spec.fill_value)
    out = norm(load_encoded(spec, path, 700).dense)
    assert out.dtype == torch.float32  # the rest of the net stays float32
    return out[:, 0]


# ------------------------------------------------------------------------------- overflow


def test_overflow_fails_under_nan_policy_fail(tmp_path: Path) -> None:
    # float32 turned 1e300 into inf before any check, and `fill` replaced it silently
    path = write(tmp_path, [1.0, 2.0, 1e300, 4.0])
    with pytest.raises(DataError) as err:
        load_encoded(FeatureSpec.from_config(config(path)), path, 10)
    msg = str(err.value)
    assert str(path) in msg and "column 'x' (numeric feature 'x')" in msg
    assert "1e+300 at row 2" in msg and "float32 range" in msg and "nan_policy: fill" in msg
    # log1p brings it into range: a legitimate value there
    spec = fitted(path, "log1p_standardize")
    assert np.isfinite(normalised(spec, path).numpy()).all()


def test_overflow_is_missing_under_nan_policy_fill(tmp_path: Path) -> None:
    path = write(tmp_path, [1.0, 3.0, 1e300, -1e39])
    spec = fitted(path, nan_policy="fill")
    st = spec.numeric_stats["x"]
    assert (st.mean, st.std) == pytest.approx((2.0, 1.0))  # overflow stays out of the fit
    assert normalised(spec, path).tolist() == [-1.0, 1.0, 0.0, 0.0]  # filled (fill_value 0)


# ------------------------------------------------------------------- large offsets (1e8)


def test_large_offset_keeps_its_resolution(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(5000)
    x = 1e8 + noise
    assert len(np.unique(x.astype(np.float32))) < 20  # the old float32 cast: a dead feature
    path = write(tmp_path, x)
    spec = fitted(path)
    st = spec.numeric_stats["x"]
    assert st.std == pytest.approx(noise.std(), rel=1e-6)  # no E[x²] - E[x]² cancellation
    z = normalised(spec, path).numpy().astype(np.float64)
    assert z.std() == pytest.approx(1.0, rel=0.01)
    assert np.corrcoef(z, noise)[0, 1] > 0.999999
    assert len(np.unique(z)) > 0.99 * len(x)  # float32 keeps ~7 digits of N(0, 1)


def test_large_offset_end_to_end_through_the_export(tmp_path: Path) -> None:
    """Rows that differ only in x = 1e8 + noise get distinct predictions from the scripted
    serving module fed by the client encoder."""
    rng = np.random.default_rng(1)
    x = 1e8 + rng.standard_normal(400)
    path = write(tmp_path, x)
    cfg = config(path)
    spec = fitted(path)
    torch.manual_seed(0)
    scripted = script_serving(build_model(cfg, spec), spec)
    rows = [{"a": "u", "x": float(v)} for v in x[:50]]
    inputs = encode(rows, spec)
    assert inputs.dense.dtype == torch.float64
    with torch.no_grad():
        probs = scripted(*inputs)[:, 0]
    assert torch.isfinite(probs).all()
    assert len(set(probs.tolist())) == 50


# ---------------------------------------------------------------- outliers / robust


def outlier_data(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(2)
    x = rng.standard_normal(2000)
    x[[100, 900, 1500]] = 1e30
    return write(tmp_path, x), x


def test_extreme_outliers_warn_for_standardize(tmp_path: Path) -> None:
    path, x = outlier_data(tmp_path)
    with pytest.warns(DataWarning, match=r"feature 'x' \(column 'x'\).*1e\+30.*robust"):
        spec = fitted(path)
    z = normalised(spec, path).numpy()
    normal = np.abs(x) < 1e3
    assert len(np.unique(z[normal])) == 1  # what the warning is about: a dead feature


@pytest.mark.parametrize("kind", ["normal", "lognormal", "sparse_counts"])
def test_ordinary_data_does_not_warn(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(3)
    x = {
        "normal": rng.standard_normal(3000),
        "lognormal": rng.lognormal(0.0, 2.0, 3000),
        "sparse_counts": np.where(rng.random(3000) < 0.9, 0.0, rng.poisson(3.0, 3000)),
    }[kind]
    path = write(tmp_path, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        fitted(path)


def test_robust_transform_is_not_swamped(tmp_path: Path) -> None:
    path, x = outlier_data(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        spec = fitted(path, "robust")
    normal = np.abs(x) < 1e3
    st = spec.numeric_stats["x"]
    q25, median, q75 = np.quantile(x, [0.25, 0.5, 0.75])
    assert st.mean == pytest.approx(median) and st.std == pytest.approx((q75 - q25) / 1.3489795)
    z = normalised(spec, path).numpy()
    assert z[~normal].tolist() == [ROBUST_CLIP] * 3  # clipped
    assert len(np.unique(z[normal])) == normal.sum()  # normal rows stay distinct
    assert z[normal].std() == pytest.approx(1.0, abs=0.1)
    assert np.abs(z).max() == ROBUST_CLIP


def test_robust_predictions_on_the_outlier_are_finite_and_bounded(tmp_path: Path) -> None:
    """The outlier's prediction is that of a row at the clip (+5 scales), not of a value
    1e29 stds out: finite, strictly inside (0, 1), among the predictions of normal rows."""
    path, _ = outlier_data(tmp_path)
    cfg = config(path, "robust")
    spec = fitted(path, "robust")
    torch.manual_seed(0)
    scripted = script_serving(build_model(cfg, spec), spec)
    st = spec.numeric_stats["x"]
    values = [1e30, 1e20, st.mean + ROBUST_CLIP * st.std * 1.01, st.mean, st.mean - 1.0]
    with torch.no_grad():
        p = scripted(*encode([{"a": "u", "x": v} for v in values], spec))[:, 0].tolist()
    assert p[0] == p[1] == p[2]  # beyond the clip every value reads as the clip
    assert 0.0 < p[0] < 1.0 and np.isfinite(p[0])
    assert p[3] != p[0] and p[4] != p[3]  # the normal range is not flattened


# ------------------------------------------------------------------ streaming statistics


def test_quantile_sample_is_exact_when_small_and_independent_of_chunking() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1001, 2))
    ok = np.ones_like(x, dtype=bool)
    ok[::7, 1] = False
    small = QuantileSample(2)
    small.add(x[:301], ok[:301])
    small.add(x[301:], ok[301:])
    assert sorted(small.column(0)) == sorted(x[:, 0])
    assert sorted(small.column(1)) == sorted(x[ok[:, 1], 1])
    whole = QuantileSample(2, capacity=100, seed=5)
    whole.add(x, ok)
    chunked = QuantileSample(2, capacity=100, seed=5)
    for i in range(0, 1001, 127):
        chunked.add(x[i : i + 127], ok[i : i + 127])
    for j in range(2):
        assert len(whole.column(j)) == 100
        assert sorted(whole.column(j)) == sorted(chunked.column(j))


def test_running_moments_merge_chunks_exactly() -> None:
    rng = np.random.default_rng(5)
    x = np.stack([1e8 + rng.standard_normal(3000), rng.exponential(2.0, 3000)], axis=1)
    ok = rng.random(x.shape) > 0.1
    moments = RunningMoments(2)
    for i in range(0, 3000, 256):
        moments.add(x[i : i + 256], ok[i : i + 256])
    for j in range(2):
        v = x[ok[:, j], j]
        assert moments.count[j] == len(v)
        assert moments.mean[j] == pytest.approx(v.mean(), rel=1e-15)
        assert moments.std()[j] == pytest.approx(v.std(), rel=1e-9)


@pytest.mark.parametrize("transform", ["standardize", "robust"])
def test_trained_on_outliers(tmp_path: Path, transform: str) -> None:
    """y = [x > 0] among N(0, 1) rows plus three 1e30 rows. ``standardize`` collapses the
    normal rows to one value: the feature is dead (AUC 0.5; the fit warns). ``robust`` learns
    it, and the exported model scores the outlier as a row at the clip: finite, inside (0, 1)."""
    from mtrec.export.exporter import export_run
    from mtrec.serving import Scorer
    from mtrec.train.loop import train

    rng = np.random.default_rng(6)
    x = rng.standard_normal(2000)
    x[[100, 900, 1500]] = 1e30
    path = tmp_path / "d.parquet"
    y = (x > 0).astype(int)
    pl.DataFrame({"a": ["u"] * 2000, "x": x, "y": y}).write_parquet(path)
    doc = {
        "dataset": {"train": str(path), "valid": str(path)},
        "features": [
            {"name": "a", "kind": "categorical", "buckets": 16},
            {"name": "x", "kind": "numeric", "transform": transform},
        ],
        "tasks": [{"name": "y"}],
        "model": SMALL_MODEL,
        "training": {**SMALL_TRAINING, "epochs": 3},
    }
    if transform == "standardize":
        with pytest.warns(DataWarning, match="feature 'x'"):
            summary = train(parse_config(doc), tmp_path / "run")
        assert summary["valid"]["y"]["auc"] == pytest.approx(0.5, abs=0.01)  # a dead feature
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        summary = train(parse_config(doc), tmp_path / "run")
    auc = summary["valid"]["y"]["auc"]
    assert auc > 0.99
    export_run(tmp_path / "run")
    scorer = Scorer(tmp_path / "run" / "export" / "model.pt")
    stats = json.loads((tmp_path / "run" / "feature_stats.json").read_text())["x"]
    at_clip = stats["mean"] + ROBUST_CLIP * stats["std"] * 1.001
    p = scorer([{"a": "u", "x": v} for v in (1e30, at_clip, -1.0)])[:, 0].tolist()
    assert p[0] == p[1]  # the outlier reads as the clip, not as 1e29 scales
    assert 0.0 < p[0] < 1.0 and p[0] > p[2]


def test_normaliser_on_raw_values_sent_to_the_module() -> None:
    """What the exported module does with raw values no encoder checked: missing or beyond
    float32 → fill; a log feature takes 1e300; robust clips; float32 input is accepted."""
    stats = [
        NumericStats("standardize", mean=1.0, std=2.0),
        NumericStats("log1p_standardize", mean=0.0, std=1.0),
        NumericStats("robust", mean=0.0, std=1.0),
    ]
    norm = torch.jit.script(NumericNormalizer.from_stats(stats, fill=-7.0))
    nan, inf = float("nan"), float("inf")
    raw = torch.tensor(
        [[3.0, 1e300, 1e300], [1e300, -inf, -2.0], [nan, nan, 1e39], [1e8 + 0.5, 0.0, -1e30]],
        dtype=torch.float64,
    )
    out = norm(raw)
    assert out.dtype == torch.float32
    expected = [
        [1.0, float(np.log1p(1e300)), -7.0],
        [-7.0, -7.0, -2.0],
        [-7.0, -7.0, -7.0],
        [(1e8 + 0.5 - 1.0) / 2.0, 0.0, -ROBUST_CLIP],
    ]
    assert out.tolist() == torch.tensor(expected, dtype=torch.float32).tolist()
    small = torch.tensor([[3.0, 10.0, 0.5]])
    assert norm(small).tolist() == norm(small.double()).tolist()  # float32 input: upcast
