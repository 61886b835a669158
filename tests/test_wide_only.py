"""Wide-only features (``features[].deep: false``): the selection module (eager == fx ==
TorchScript against a hand-made reference), the model (the deep embedding over the other
features, the wide feature reaching the logits only through the linear term, training,
export parity) and the config errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    first_batch,
    fitted_spec,
    seeded,
    small_config,
    small_data_dir,
    small_features,
)

from mtrec.config import ConfigError
from mtrec.embeddings.feature_select import FeatureSelect
from mtrec.export.exporter import PARITY_TOLERANCE, check_parity, script_serving
from mtrec.export.serving import ServingModule
from mtrec.model import build_model
from mtrec.train.step import TrainStep

WIDE = ("user_id", "c7")  # the small data's id-like features


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data_dir(tmp_path_factory)


def _features(data: Path, wide: tuple[str, ...] = WIDE) -> list[dict]:
    """The small data's features with ``deep: false`` on ``wide``."""
    return small_features(data, **{name: {"deep": False} for name in wide})


def _config(data: Path, tmp: Path, sets: list[str] | None = None, **kw: Any):
    on = ["model.linear.enabled=true", *(sets or [])]
    return small_config(data, tmp, on, features=_features(data, **kw))


# ------------------------------------------------------------------------ the selection


def _reference(values: list[int], lengths: list[int], batch: int, index: list[int]):
    """The kept features' ids and lengths, one (feature, row) bag at a time."""
    out_values: list[int] = []
    out_lengths: list[int] = []
    start = 0
    for f in range(len(lengths) // batch):
        for b in range(batch):
            n = lengths[f * batch + b]
            if f in index:
                out_values += values[start : start + n]
                out_lengths.append(n)
            start += n
    return torch.tensor(out_values, dtype=torch.long), torch.tensor(out_lengths)


def test_selection_eager_fx_script_match_a_reference() -> None:
    gen = seeded(0)
    features, batch, index = 5, 7, [0, 2, 3]
    lengths = torch.randint(0, 4, (features * batch,), generator=gen)
    values = torch.randint(0, 10**6, (int(lengths.sum()),), generator=gen)
    want = _reference(values.tolist(), lengths.tolist(), batch, index)
    select = FeatureSelect(features, index)
    traced = torch.fx.symbolic_trace(select, concrete_args={"batch": batch})
    for module in (select, traced, torch.jit.script(select)):
        got = module(values, lengths, batch)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # the seeded reference's sum (recorded when the module was written)
    assert int(want[0].sum()) == 16011282


def test_selection_of_empty_bags_and_bad_indices() -> None:
    select = FeatureSelect(3, [1])
    values, lengths = select(torch.tensor([4, 5]), torch.tensor([2, 0, 0, 0, 0, 0]), 2)
    assert values.numel() == 0 and lengths.tolist() == [0, 0]
    for bad in ([], [1, 1], [2, 1], [3], [-1]):
        with pytest.raises(ValueError, match="index"):
            FeatureSelect(3, bad)


# ---------------------------------------------------------------------------- the model


def test_deep_embedding_reads_the_other_features(data: Path, tmp_path: Path) -> None:
    cfg = _config(data, tmp_path)
    spec = fitted_spec(cfg)
    model = build_model(cfg, spec)
    deep = [n for n in spec.sparse_names if n not in WIDE]
    assert model.sparse_arch.embedding.feature_names == deep
    assert model.linear_arch.feature_names == spec.sparse_names
    assert spec.field_names == deep + spec.numeric_names
    assert not model.shared_filter  # the two parts read different features
    # the Unified Embedding is sized by the deep features' buckets only
    buckets = sum(f.buckets or cfg.model.embedding.buckets for f in spec.sparse if f.deep)
    assert model.sparse_arch.embedding.rows == buckets
    batch = first_batch(cfg, spec)
    keys = batch.sparse.keys()
    kept = batch.sparse.permute([keys.index(n) for n in deep])
    with torch.no_grad():
        torch.testing.assert_close(
            model.sparse_tokens(batch.sparse), model.sparse_arch.embedding(kept), rtol=0, atol=0
        )


def test_a_wide_feature_reaches_the_logits_through_the_linear_term_only(
    data: Path, tmp_path: Path
) -> None:
    cfg = _config(data, tmp_path, wide=("user_id",))
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, spec).eval()
    batch = first_batch(cfg, spec, rows=128)
    # user_id is feature 0: move every row's id to another value
    keys = batch.sparse.keys()
    first = keys.index("user_id")
    assert first == 0
    values = batch.sparse.values().clone()
    count = int(batch.sparse.lengths()[: batch.batch_size].sum())
    values[:count] += 1
    moved = type(batch.sparse)(
        keys=keys, values=values, lengths=batch.sparse.lengths(), stride=batch.batch_size
    )
    table = model.linear_arch.ebc.embedding_bags["t_user_id"].weight
    with torch.no_grad():
        table.zero_()  # the user_id weights: zero, so the ids cannot matter
        assert torch.equal(model(batch.sparse, batch.dense), model(moved, batch.dense))
        table.normal_(generator=seeded(1))
        assert not torch.equal(model(batch.sparse, batch.dense), model(moved, batch.dense))


def test_wide_only_trains_and_exports_with_parity(data: Path, tmp_path: Path) -> None:
    # a frequency filter too: the linear term then filters its ids on its own
    cfg = _config(data, tmp_path, ["model.embedding.min_count=3"])
    spec = fitted_spec(cfg)
    step = TrainStep(cfg, spec)
    batch = first_batch(cfg, spec, "train", rows=256)
    table = step.model.linear_arch.ebc.embedding_bags["t_user_id"].weight
    before = table.detach().clone()
    losses = [float(step.step(batch)) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert not torch.equal(table.detach(), before)  # the wide feature's weights learn
    model = step.model.eval()
    with torch.no_grad():
        eager = model.predict(batch.sparse, batch.dense)
        serving = ServingModule(model, spec.sparse_names, len(spec.numeric)).eval()
        inputs = (batch.sparse.values(), batch.sparse.lengths(), batch.dense)
        assert not serving.shared_filter
        assert float((serving(*inputs) - eager).abs().max()) <= 1e-5
    assert check_parity(script_serving(model, spec), model, batch) <= PARITY_TOLERANCE


def test_every_sparse_feature_wide_leaves_the_numerics_to_the_deep_model(
    data: Path, tmp_path: Path
) -> None:
    every = tuple(f["name"] for f in small_features(data) if f["kind"] != "numeric")
    cfg = _config(data, tmp_path, wide=every)
    spec = fitted_spec(cfg)
    model = build_model(cfg, spec).eval()
    assert model.sparse_arch is None and model.linear_arch is not None
    assert spec.field_names == spec.numeric_names
    batch = first_batch(cfg, spec, rows=64)
    assert check_parity(script_serving(model, spec), model, batch) <= PARITY_TOLERANCE


# ------------------------------------------------------------------------------- errors


def test_wide_only_config_errors_name_the_feature_and_the_fix(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"features\[\d+\]\.deep.*model.linear.enabled"):
        small_config(data, tmp_path, ["model.linear.enabled=false"], features=_features(data))
    with pytest.raises(ConfigError, match=r"features\[\d+\]\.deep: only categorical"):
        _config(data, tmp_path, wide=("n0",))
    sparse = [f for f in _features(data, wide=()) if f["kind"] != "numeric"]
    with pytest.raises(ConfigError, match="every feature has deep: false"):
        small_config(
            data,
            tmp_path,
            ["model.linear.enabled=true"],
            features=[{**f, "deep": False} for f in sparse],
        )
    with pytest.raises(ConfigError, match=r"chunks.user_id.*deep: false"):
        _config(data, tmp_path, ["model.embedding.chunks={user_id: 2}"])
    apem = ["model.multitask.type=apem", "model.multitask.apem.field_groups=[[user_id, c0]]"]
    with pytest.raises(ConfigError, match=r"field_groups: 'user_id' has deep: false"):
        _config(data, tmp_path, apem)
