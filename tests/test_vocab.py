"""Frequency filter (min_count): fitting on training data and applying it inside the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.config import (
    DatasetConfig,
    EmbeddingConfig,
    ExperimentConfig,
    FeatureConfig,
    ModelConfig,
    TaskConfig,
)
from mtrec.data.batcher import encoded_chunks, load_encoded
from mtrec.data.hashing import MISSING_ID, RARE_ID, hash_value
from mtrec.data.spec import FeatureSpec
from mtrec.data.vocab import fit_kept_ids, load_kept_ids, save_kept_ids
from mtrec.embeddings.per_feature import FrequencyFilter, PerFeatureEmbedding


def spec_for(path: Path, min_count: int = 3) -> FeatureSpec:
    cfg = ExperimentConfig(
        dataset=DatasetConfig(train=str(path)),
        features=[
            FeatureConfig(name="a", kind="categorical"),
            FeatureConfig(name="tags", kind="multi_hot"),
            FeatureConfig(name="b", kind="categorical", min_count=0),  # opted out
        ],
        tasks=[TaskConfig(name="y")],
        # id dropout off: with it every feature is filtered (unseen ids leave the table)
        model=ModelConfig(embedding=EmbeddingConfig(min_count=min_count, id_dropout=0.0)),
    )
    return FeatureSpec.from_config(cfg)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.parquet"
    pl.DataFrame(
        {
            "a": ["x"] * 5 + ["y"] * 2 + [None] * 3,
            "tags": [["t"], ["t"], ["t"], ["u"], [], [], [], [], [], []],
            "b": ["k"] * 10,
            "y": [0, 1] * 5,
        }
    ).write_parquet(path)
    return path


def test_fit_keeps_values_seen_min_count_times(data: Path, tmp_path: Path) -> None:
    spec = spec_for(data)
    assert spec.min_count_of("a") == 3 and spec.min_count_of("b") == 0
    kept = fit_kept_ids(spec, encoded_chunks(spec, data, chunk_rows=4))  # counts span chunks
    assert set(kept) == {"a", "tags"}
    assert kept["a"].tolist() == [hash_value("x")]  # "y" seen twice, nulls never kept
    assert kept["tags"].tolist() == [hash_value("t")]
    assert np.all(np.diff(kept["a"]) > 0) or kept["a"].size <= 1
    save_kept_ids(kept, tmp_path / "v.pt")
    again = load_kept_ids(tmp_path / "v.pt", spec)
    assert {k: v.tolist() for k, v in again.items()} == {k: v.tolist() for k, v in kept.items()}


def test_filter_maps_rare_ids_and_keeps_missing() -> None:
    kept = [torch.tensor([10, 20, 30]), None, torch.tensor([7])]
    filt = FrequencyFilter(3, kept)
    values = torch.tensor([10, 11, MISSING_ID, 11, 7, 8, 20])
    feature = torch.tensor([0, 0, 0, 1, 2, 2, 2])  # feature 1 is not filtered
    out = filt(values, feature).tolist()
    assert out == [10, RARE_ID, MISSING_ID, 11, 7, RARE_ID, RARE_ID]
    scripted = torch.jit.script(filt)
    assert scripted(values, feature).tolist() == out


def test_rare_values_share_one_row_eager_and_scripted(data: Path) -> None:
    spec = spec_for(data)
    enc = load_encoded(spec, data, 64)
    kept = fit_kept_ids(spec, [enc])
    torch.manual_seed(0)
    emb = PerFeatureEmbedding(
        ["a", "tags", "b"],
        [97, 97, 97],
        4,
        ["sum", "sum", "sum"],
        kept_ids=[torch.from_numpy(kept["a"]), torch.from_numpy(kept["tags"]), None],
    ).eval()
    ids = [hash_value("y"), hash_value("never-seen"), hash_value("x")]
    kjt = KeyedJaggedTensor(
        keys=["a", "tags", "b"],
        values=torch.tensor([*ids, hash_value("t"), *ids]),
        lengths=torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.int32),
    )
    out = emb(kjt)
    assert out.shape == (3, 3, 4)
    # in the filtered feature 'a', the two rare values share the RARE row; 'x' does not
    assert torch.equal(out[0, 0], out[1, 0]) and not torch.equal(out[0, 0], out[2, 0])
    # feature 'b' opted out: its rows stay distinct
    assert not torch.equal(out[0, 2], out[1, 2])
    assert torch.allclose(torch.jit.script(emb)(kjt), out)


def test_reserved_ids_never_produced_by_the_hash() -> None:
    assert MISSING_ID == 0 and RARE_ID == 1
    assert all(hash_value(v) > RARE_ID for v in ["", "a", 0, 1, "rare"])
