"""Readers, schema checks, bad-data errors, KJT layout and the streaming batcher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mtrec.config import DatasetConfig, ExperimentConfig, FeatureConfig, TaskConfig
from mtrec.data.batcher import encoded_chunks, iter_batches, load_encoded, to_batch
from mtrec.data.encode import encode_chunk
from mtrec.data.errors import DataError
from mtrec.data.fitting import fit_statistics_on_file
from mtrec.data.hashing import MISSING_ID, hash_value
from mtrec.data.readers import CRITEO_COLUMNS
from mtrec.data.spec import FeatureSpec


def make_spec(
    path: Path, fmt: str = "parquet", nan_policy: str = "fail", **kw: object
) -> FeatureSpec:
    features = kw.pop("features", None) or [
        FeatureConfig(name="a", kind="categorical"),
        FeatureConfig(name="tags", kind="multi_hot"),
        FeatureConfig(name="x", kind="numeric"),
    ]
    cfg = ExperimentConfig(
        dataset=DatasetConfig(format=fmt, train=str(path), nan_policy=nan_policy),  # type: ignore[arg-type]
        features=features,  # type: ignore[arg-type]
        tasks=kw.pop("tasks", None) or [TaskConfig(name="y")],  # type: ignore[arg-type]
    )
    return FeatureSpec.from_config(cfg)


def small_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "a": ["u", "v", None, "u"],
            "tags": [["t1", "t2"], [], None, ["t3"]],
            "x": [1.0, 2.0, 3.0, 4.0],
            "y": [0, 1, 1, 0],
        }
    )


def test_kjt_layout_of_multi_hot(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    small_frame().write_parquet(path)
    spec = make_spec(path)
    batch = next(iter_batches(path, spec, batch_size=4))
    kjt = batch.sparse
    assert kjt.keys() == ["a", "tags"]
    # feature-major: 4 lengths of 'a' (one id each, null = reserved id), then 4 of 'tags'
    assert kjt.lengths().tolist() == [1, 1, 1, 1, 2, 0, 0, 1]
    expected = [
        hash_value("u"),
        hash_value("v"),
        MISSING_ID,
        hash_value("u"),
        hash_value("t1"),
        hash_value("t2"),
        hash_value("t3"),
    ]
    assert kjt.values().tolist() == expected
    assert batch.dense[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert batch.labels[:, 0].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_delimited_multi_hot_strings(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    pl.DataFrame({"tags": ["p|q", "", "r"], "y": [0, 1, 0]}).write_csv(path)
    spec = make_spec(
        path, fmt="csv", features=[FeatureConfig(name="tags", kind="multi_hot", delimiter="|")]
    )
    kjt = next(iter_batches(path, spec, batch_size=3)).sparse
    assert kjt.lengths().tolist() == [2, 0, 1]
    assert kjt.values().tolist() == [hash_value("p"), hash_value("q"), hash_value("r")]


def tags_csv(tmp_path: Path, tags: list[str]) -> Path:
    path = tmp_path / "t.csv"
    pl.DataFrame({"tags": tags, "y": [i % 2 for i in range(len(tags))]}).write_csv(path)
    return path


def tags_spec(path: Path, delimiter: str | None) -> FeatureSpec:
    tags = FeatureConfig(name="tags", kind="multi_hot", delimiter=delimiter)
    return make_spec(path, fmt="csv", features=[tags])


def test_text_multi_hot_without_delimiter_is_refused(tmp_path: Path) -> None:
    # issue #16.7: text without `delimiter` was split on "," silently
    path = tags_csv(tmp_path, ["a b", "c d e", "f"])
    with pytest.raises(DataError) as err:
        load_encoded(tags_spec(path, None), path, 10)  # the schema check
    msg = str(err.value)
    assert str(path) in msg and "column 'tags' (multi_hot feature 'tags')" in msg
    assert "no `delimiter`" in msg and "never split on ','" in msg
    # the encoder itself (callers that skip the schema check) refuses too, and names the
    # separator the values use
    frame = pl.DataFrame({"tags": ["a|b", "c", None], "y": [0, 1, 0]})
    with pytest.raises(DataError, match=r"column 'tags'.*no `delimiter`.*contain '\|'.*'a\|b'"):
        encode_chunk(frame, tags_spec(path, None), "frame")


@pytest.mark.parametrize(("sep", "wrong"), [(" ", ","), ("|", ","), (",", "|")])
def test_text_multi_hot_with_a_wrong_delimiter_is_refused(
    tmp_path: Path, sep: str, wrong: str
) -> None:
    """Space- or |-separated tokens read with delimiter "," became one token per combination."""
    rng = np.random.default_rng(0)
    tags = [sep.join(rng.choice(list("pqrstu"), 3, replace=False)) for _ in range(40)]
    path = tags_csv(tmp_path, tags)
    with pytest.raises(DataError) as err:
        load_encoded(tags_spec(path, wrong), path, 16)
    msg = str(err.value)
    assert "column 'tags'" in msg and f"no value contains the delimiter {wrong!r}" in msg
    assert f"set `delimiter: {sep!r}`" in msg and "at row 0" in msg
    enc = load_encoded(tags_spec(path, sep), path, 16)  # the fix the message names
    assert enc.multi_offsets[0].diff().tolist() == [3] * 40


def test_single_token_text_with_spaces_is_not_a_wrong_delimiter(tmp_path: Path) -> None:
    # a few one-token rows with spaces prove nothing; the delimiter appears in other rows
    tags = ["new york", "paris", "new york|paris", "rome"] * 10 + ["los angeles"] * 5
    path = tags_csv(tmp_path, tags)
    enc = load_encoded(tags_spec(path, "|"), path, 8)  # a chunk of 5 rows: no "|" at all
    assert enc.multi_offsets[0].diff().tolist() == [1, 1, 2, 1] * 10 + [1] * 5


def test_streaming_equals_in_memory_and_shuffle_is_seeded(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 1000
    frame = pl.DataFrame(
        {
            "a": rng.integers(0, 50, n),
            "tags": [list(map(int, rng.integers(0, 9, rng.integers(0, 4)))) for _ in range(n)],
            "x": rng.normal(size=n),
            "y": rng.integers(0, 2, n),
        }
    )
    path = tmp_path / "d.parquet"
    frame.write_parquet(path, row_group_size=100)
    spec = make_spec(path)
    enc = load_encoded(spec, path, chunk_rows=128)
    assert enc.rows == n
    streamed = list(iter_batches(path, spec, 64, chunk_rows=128))
    memory = list(iter_batches(enc, spec, 64))
    assert [b.batch_size for b in streamed] == [b.batch_size for b in memory]
    for s, m in zip(streamed, memory):
        assert torch.equal(s.sparse.values(), m.sparse.values())
        assert torch.equal(s.sparse.lengths(), m.sparse.lengths())
        assert torch.equal(s.dense, m.dense)
    # shuffled: every row once, same seed same order, other seed other order
    a = torch.cat([b.dense[:, 0] for b in iter_batches(enc, spec, 64, shuffle=True, seed=1)])
    b = torch.cat([b.dense[:, 0] for b in iter_batches(enc, spec, 64, shuffle=True, seed=1)])
    c = torch.cat([b.dense[:, 0] for b in iter_batches(enc, spec, 64, shuffle=True, seed=2)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort().values, enc.dense[:, 0].sort().values)
    s = torch.cat(
        [b.dense[:, 0] for b in iter_batches(path, spec, 64, shuffle=True, seed=1, chunk_rows=128)]
    )
    assert torch.equal(s.sort().values, enc.dense[:, 0].sort().values)
    # the jagged gather keeps each row's tokens with its row
    idx = torch.tensor([5, 0, 999, 5])
    taken = to_batch(enc.take(idx), spec).sparse["tags"]
    want = [frame["tags"][int(i)].to_list() for i in idx]
    assert taken.lengths().tolist() == [len(w) for w in want]
    assert taken.values().tolist() == [hash_value(t) for w in want for t in w]


def test_criteo_reader_on_sample(samples_dir: Path, tmp_path: Path) -> None:
    path = samples_dir / "criteo_sample.txt"
    features = [
        FeatureConfig(name=f"I{i}", kind="numeric", transform="log1p") for i in range(1, 14)
    ]
    features += [FeatureConfig(name=f"C{i}", kind="categorical") for i in range(1, 27)]
    spec = make_spec(
        path,
        fmt="criteo",
        nan_policy="fill",
        features=features,
        tasks=[TaskConfig(name="click", label="label")],
    )
    enc = load_encoded(spec, path, chunk_rows=64)
    assert enc.rows == 200
    assert enc.cat_ids.shape == (200, 26) and enc.dense.shape == (200, 13)
    assert set(enc.labels[:, 0].tolist()) <= {0.0, 1.0}
    assert torch.isnan(enc.dense).any()  # Criteo has empty integer fields
    raw = pl.read_csv(path, schema_overrides={f"C{i}": pl.String for i in range(1, 27)})
    assert raw.columns == CRITEO_COLUMNS
    assert enc.cat_ids[0, 0].item() == hash_value(raw["C1"][0])
    assert enc.labels[:, 0].tolist() == raw["label"].cast(pl.Float32).to_list()
    # the raw layout (tab-separated, no header) reads to the same encoded rows
    tsv = tmp_path / "raw.txt"
    raw.write_csv(tsv, separator="\t", include_header=False, null_value="")
    enc_tsv = load_encoded(spec, tsv, chunk_rows=64)
    assert torch.equal(enc_tsv.cat_ids, enc.cat_ids)
    assert torch.equal(enc_tsv.labels, enc.labels)
    assert torch.allclose(enc_tsv.dense, enc.dense, equal_nan=True)
    with pytest.raises(
        DataError, match=r"column 'I\d+' .* non-finite .* row \d+.*nan_policy: fill"
    ):
        load_encoded(
            make_spec(
                path,
                fmt="criteo",
                features=features,
                tasks=[TaskConfig(name="click", label="label")],
            ),
            path,
            64,
        )


def test_census_splits(census_dir: Path) -> None:
    rows = {"train": 79810, "valid": 9976, "test": 9976}
    income = {"train": 0.0618, "valid": 0.0663, "test": 0.0595}
    for split, n in rows.items():
        path = census_dir / f"{split}.parquet"
        spec = make_spec(
            path,
            features=[
                FeatureConfig(name="education", kind="categorical"),
                FeatureConfig(name="age", kind="numeric"),
            ],
            tasks=[TaskConfig(name="income"), TaskConfig(name="never_married")],
        )
        enc = load_encoded(spec, path, chunk_rows=32768)
        assert enc.rows == n
        assert enc.labels[:, 0].mean().item() == pytest.approx(income[split], abs=5e-4)


def test_numeric_stats_fitted_on_train(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pl.DataFrame({"x": [1.0, 3.0, None, float("nan")], "y": [0, 1, 0, 1]}).write_parquet(path)
    spec = make_spec(path, nan_policy="fill", features=[FeatureConfig(name="x", kind="numeric")])
    fit_statistics_on_file(spec, path)  # non-finite values do not enter the statistics
    st = spec.numeric_stats["x"]
    assert st.mean == pytest.approx(2.0) and st.std == pytest.approx(1.0)
    spec.save_stats(tmp_path / "s.json")
    other = make_spec(path, features=[FeatureConfig(name="x", kind="numeric")])
    other.load_stats(tmp_path / "s.json")
    assert other.numeric_stats == spec.numeric_stats


# ----------------------------------------------------------------------------- bad data


def write(tmp_path: Path, frame: pl.DataFrame) -> Path:
    path = tmp_path / "bad.parquet"
    frame.write_parquet(path)
    return path


def test_missing_column_names_file_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, small_frame().rename({"tags": "tag"}))
    with pytest.raises(DataError) as err:
        load_encoded(make_spec(path), path, 10)
    msg = str(err.value)
    assert str(path) in msg and "column 'tags'" in msg and "Did you mean 'tag'" in msg


def test_wrong_dtype(tmp_path: Path) -> None:
    path = write(tmp_path, small_frame().with_columns(pl.col("x").cast(pl.String)))
    with pytest.raises(DataError, match=r"column 'x' \(numeric feature 'x'\) has dtype String"):
        load_encoded(make_spec(path), path, 10)
    path = write(tmp_path, small_frame().with_columns(pl.Series("a", [True, False, True, True])))
    with pytest.raises(DataError, match="column 'a'.*dtype Boolean"):
        load_encoded(make_spec(path), path, 10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_non_finite_numeric_fail_or_fill(tmp_path: Path, bad: float | None) -> None:
    frame = small_frame().with_columns(pl.Series("x", [1.0, 2.0, bad, 4.0]))
    path = write(tmp_path, frame)
    with pytest.raises(DataError, match=r"column 'x'.*non-finite.*at row 2.*nan_policy: fill"):
        load_encoded(make_spec(path), path, 10)
    enc = load_encoded(make_spec(path, nan_policy="fill"), path, 10)
    assert not np.isfinite(enc.dense[2, 0].item())  # kept raw; the model's normaliser fills it


def test_row_numbers_count_across_chunks(tmp_path: Path) -> None:
    n = 50
    x = [1.0] * n
    x[37] = float("nan")
    frame = pl.DataFrame({"a": ["u"] * n, "tags": [["t"]] * n, "x": x, "y": [0] * n})
    path = write(tmp_path, frame)
    with pytest.raises(DataError, match="at row 37"):
        load_encoded(make_spec(path), path, 8)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([0, 2, 1, 0], "value 2.0 at row 1"),
        ([0, None, 1, 0], "null at row 1"),
        ([0.0, 0.5, 1.0, 0.0], "value 0.5 at row 1"),
    ],
)
def test_labels_outside_0_1(tmp_path: Path, labels: list, match: str) -> None:
    path = write(tmp_path, small_frame().with_columns(pl.Series("y", labels)))
    with pytest.raises(DataError, match=f"label column 'y'.*{match}"):
        load_encoded(make_spec(path), path, 10)


def test_empty_and_corrupt_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_encoded(make_spec(empty), empty, 10)
    no_rows = write(tmp_path, small_frame().head(0))
    with pytest.raises(DataError, match="no rows"):
        load_encoded(make_spec(no_rows), no_rows, 10)
    good = tmp_path / "good.parquet"
    small_frame().write_parquet(good)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"corrupt\.parquet.*corrupt"):
        load_encoded(make_spec(corrupt), corrupt, 10)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(DataError, match="garbage.parquet"):
        list(encoded_chunks(make_spec(garbage), garbage, 10))
    with pytest.raises(DataError, match="does not exist"):
        load_encoded(make_spec(tmp_path / "nope.parquet"), tmp_path / "nope.parquet", 10)


def test_csv_categorical_codes_keep_leading_zeros(tmp_path: Path) -> None:
    path = tmp_path / "codes.csv"
    path.write_text("a,x,y\n00123,1.0,0\n7,2.0,1\n")
    spec = make_spec(
        path,
        fmt="csv",
        features=[
            FeatureConfig(name="a", kind="categorical"),
            FeatureConfig(name="x", kind="numeric"),
        ],
    )
    enc = load_encoded(spec, path, 10)
    assert enc.cat_ids[:, 0].tolist() == [hash_value("00123"), hash_value("7")]


def test_true_probabilities_and_group_key_are_checked(tmp_path: Path) -> None:
    frame = small_frame().with_columns(
        pl.Series("p", [0.1, 1.5, 0.2, 0.3]), pl.Series("g", [[1], [2], [3], [4]])
    )
    path = write(tmp_path, frame)
    tasks = [TaskConfig(name="y", true_prob="p")]
    with pytest.raises(
        DataError, match=r"column 'p' \(true probability of task 'y'\) has value 1.5 at row 1"
    ):
        load_encoded(make_spec(path, tasks=tasks), path, 10)
    spec = make_spec(path)
    spec.group_key = "g"
    with pytest.raises(DataError, match="group key column 'g' has dtype List"):
        load_encoded(spec, path, 10)


def test_sharded_datasets_directory_and_glob(tmp_path: Path) -> None:
    shards = tmp_path / "train"
    shards.mkdir()
    frame = small_frame()
    frame.head(2).write_parquet(shards / "part-000.parquet")
    frame.tail(2).write_parquet(shards / "part-001.parquet")
    (shards / "_SUCCESS").write_text("")  # other files in the folder are ignored
    whole = tmp_path / "whole.parquet"
    frame.write_parquet(whole)
    expected = load_encoded(make_spec(whole), whole, 10)
    for path in (shards, shards / "part-*.parquet"):
        enc = load_encoded(make_spec(path), path, 10)  # shards in name order, as one table
        assert torch.equal(enc.cat_ids, expected.cat_ids)
        assert torch.equal(enc.labels, expected.labels)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="directory holds no parquet files"):
        load_encoded(make_spec(empty), empty, 10)
    with pytest.raises(DataError, match="pattern matches no file"):
        load_encoded(make_spec(tmp_path / "nope-*.parquet"), tmp_path / "nope-*.parquet", 10)
    frame.rename({"x": "z"}).head(1).write_parquet(shards / "part-002.parquet")
    with pytest.raises(DataError, match="train"):
        load_encoded(make_spec(shards), shards, 10)


def test_one_pass_statistics_match_the_formula_streaming_or_in_memory(tmp_path: Path) -> None:
    from mtrec.data.fitting import fit_statistics

    rng = np.random.default_rng(1)
    x = rng.lognormal(1.0, 1.0, 5000) * rng.choice([-1.0, 1.0], 5000)
    path = tmp_path / "d.parquet"
    pl.DataFrame(
        {"x": x, "a": rng.integers(0, 40, 5000), "y": rng.integers(0, 2, 5000)}
    ).write_parquet(path, row_group_size=700)
    features = [
        FeatureConfig(name="x", kind="numeric", transform="log1p_standardize"),
        FeatureConfig(name="a", kind="categorical", min_count=150),
    ]
    streamed = make_spec(path, features=features)
    fit_statistics_on_file(streamed, path, chunk_rows=512)
    in_memory = make_spec(path, features=features)
    fit_statistics(in_memory, [load_encoded(in_memory, path, 4096)])
    logged = np.sign(x.astype(np.float32)) * np.log1p(np.abs(x.astype(np.float32)))
    st = streamed.numeric_stats["x"]
    assert st.mean == pytest.approx(logged.mean(), rel=1e-5)
    assert st.std == pytest.approx(logged.std(), rel=1e-5)
    other = in_memory.numeric_stats["x"]  # chunked sums differ only in the last ulp
    assert (other.mean, other.std) == pytest.approx((st.mean, st.std), rel=1e-12)
    assert streamed.kept_ids["a"].tolist() == in_memory.kept_ids["a"].tolist()
    frequent = pl.read_parquet(path).group_by("a").len().filter(pl.col("len") >= 150)["a"]
    assert sorted(streamed.kept_ids["a"].tolist()) == sorted(hash_value(int(v)) for v in frequent)
