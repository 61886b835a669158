"""Config loading and validation: every error names file, key path and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtrec.config import ConfigError, config_to_dict, load_config, parse_config

BASE = """
name: base
dataset:
  train: train.parquet
  valid: valid.parquet
features:
  - {name: a, kind: categorical}
  - {name: x, kind: numeric, transform: log1p_standardize}
tasks:
  - {name: click, weight: 1.0}
"""


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def test_loads_and_resolves_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "base.yaml", BASE))
    assert cfg.name == "base"
    assert cfg.dataset.train == str(tmp_path / "train.parquet")
    assert [f.name for f in cfg.features] == ["a", "x"]
    assert cfg.model.multitask.expert_hidden == [128, 64]  # default
    assert cfg.training.batch_size == 1024


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.yaml", BASE + "training:\n  batch_szie: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "training.batch_szie" in msg and "did you mean 'batch_size'" in msg


def test_wrong_type_names_key_and_type(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.yaml", BASE + "training:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"training\.epochs: expected int, got 'three'"):
        load_config(p)


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.yaml", BASE + "training:\n  epochs: true\n")
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(p)


def test_bad_literal_suggests(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.yaml", BASE.replace("kind: categorical", "kind: categorcal"))
    with pytest.raises(ConfigError, match=r"features\[0\]\.kind.*did you mean 'categorical'"):
        load_config(p)


def test_missing_required_key(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.yaml", BASE.replace("tasks:\n  - {name: click, weight: 1.0}\n", ""))
    with pytest.raises(ConfigError, match=r"tasks: required key is missing"):
        load_config(p)


def test_missing_feature_name(tmp_path: Path) -> None:
    p = write(
        tmp_path, "bad.yaml", BASE.replace("{name: a, kind: categorical}", "{kind: categorical}")
    )
    with pytest.raises(ConfigError, match=r"features\[0\]\.name: required key is missing"):
        load_config(p)


def test_extends_merges_and_overrides(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path, "child.yaml", "extends: base.yaml\nname: child\ntraining:\n  epochs: 3\n"
    )
    cfg = load_config(child, overrides=["training.batch_size=256", "model.multitask.dropout=0.1"])
    assert cfg.name == "child"
    assert cfg.training.epochs == 3 and cfg.training.batch_size == 256
    assert cfg.model.multitask.dropout == pytest.approx(0.1)
    assert cfg.dataset.train == str(tmp_path / "train.parquet")


def test_bad_extends(tmp_path: Path) -> None:
    p = write(tmp_path, "child.yaml", "extends: nowhere.yaml\nname: x\n")
    with pytest.raises(ConfigError, match=r"extends: base file .*nowhere\.yaml does not exist"):
        load_config(p)
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")
    p = write(tmp_path, "c.yaml", "extends: [1, 2]\n")
    with pytest.raises(ConfigError, match="extends: expected a file path"):
        load_config(p)


def test_override_errors(tmp_path: Path) -> None:
    p = write(tmp_path, "base.yaml", BASE)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(p, overrides=["training.epochs"])
    with pytest.raises(ConfigError, match="training.epochs: expected int"):
        load_config(p, overrides=["training.epochs=abc"])
    with pytest.raises(ConfigError, match="training.nope: unknown key"):
        load_config(p, overrides=["training.nope=1"])


def test_override_a_named_feature_or_task(tmp_path: Path) -> None:
    p = write(tmp_path, "base.yaml", BASE)
    cfg = load_config(
        p, overrides=["features.a.min_count=5", "tasks.click.weight=2", "model.linear.enabled=true"]
    )
    assert cfg.features[0].min_count == 5 and cfg.features[1].min_count is None
    assert cfg.tasks[0].weight == 2.0
    cfg = load_config(p, overrides=["features.a.deep=false"])
    assert [f.deep for f in cfg.features] == [False, True]
    with pytest.raises(ConfigError, match="features has no item named 'aa'; did you mean 'a'"):
        load_config(p, overrides=["features.aa.min_count=5"])
    with pytest.raises(ConfigError, match=r"no item named 'min_count'.*features.NAME.KEY"):
        load_config(p, overrides=["features.min_count=5"])
    with pytest.raises(ConfigError, match="set one key at a time"):
        load_config(p, overrides=["features.a={name: a, kind: numeric}"])
    # a name with dots: the longest name that leaves a key after it
    dotted = write(tmp_path, "dotted.yaml", BASE.replace("{name: a, kind", "{name: a.b, kind"))
    cfg = load_config(dotted, overrides=["features.a.b.min_count=3"])
    assert cfg.features[0].name == "a.b" and cfg.features[0].min_count == 3
    # a list of plain values is not addressed by name
    with pytest.raises(ConfigError, match="is not a mapping"):
        load_config(p, overrides=["model.multitask.chain=[click]", "model.multitask.chain.x=1"])


def test_malformed_and_empty_yaml(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.yaml", "name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line"):
        load_config(p)
    p = write(tmp_path, "empty.yaml", "")
    with pytest.raises(ConfigError, match="empty"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_semantic_checks(tmp_path: Path) -> None:
    p = write(tmp_path, "base.yaml", BASE)
    with pytest.raises(ConfigError, match="training.batch_size: must be > 0"):
        load_config(p, overrides=["training.batch_size=0"])
    dup = BASE.replace("{name: x, kind: numeric", "{name: a, kind: numeric")
    with pytest.raises(ConfigError, match="duplicate feature name 'a'"):
        load_config(write(tmp_path, "dup.yaml", dup))
    with pytest.raises(ConfigError, match="only multi_hot features take a delimiter"):
        load_config(
            write(
                tmp_path,
                "d.yaml",
                BASE.replace("kind: categorical", "kind: categorical, delimiter: '|'"),
            )
        )


def test_env_var_in_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTREC_DATA_DIR", "/data/here")
    p = write(
        tmp_path,
        "env.yaml",
        BASE.replace("train: train.parquet", 'train: "${MTREC_DATA_DIR}/t.parquet"'),
    )
    assert load_config(p).dataset.train == "/data/here/t.parquet"


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "base.yaml", BASE))
    assert parse_config(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parent.parent.joinpath("configs").rglob("*.yaml"))
)
def test_shipped_configs_load(path: Path, synth_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # configs/synthetic/* extend the demo's data config: point them at a tiny planted set
    # (a fresh clone has no demo_out/)
    monkeypatch.setenv("MTREC_SYNTH_DIR", str(synth_dir))
    cfg = load_config(path)
    assert cfg.features and cfg.tasks


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mtrec.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, rows=200)
    return out


def test_override_paths_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = write(tmp_path, "base.yaml", BASE)
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MTREC_DATA_DIR", "/data/here")
    cfg = load_config(
        p, overrides=["dataset.valid=rel/v.parquet", "dataset.test=${MTREC_DATA_DIR}/t.parquet"]
    )
    assert cfg.dataset.valid == str(work / "rel" / "v.parquet")
    assert cfg.dataset.test == "/data/here/t.parquet"


def test_extends_expands_environment_variables(tmp_path: Path, monkeypatch) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.yaml").write_text(
        "dataset: {train: train.parquet}\n"
        "features: [{name: a, kind: categorical}]\n"
        "tasks: [{name: click}]\n"
    )
    child = tmp_path / "child.yaml"
    child.write_text("extends: ${MTREC_SYNTH_DIR}/config.yaml\nname: child\n")
    monkeypatch.setenv("MTREC_SYNTH_DIR", str(base))
    cfg = load_config(child)
    # the parent's relative dataset path resolves against the parent's own directory
    assert cfg.name == "child" and cfg.dataset.train == str(base / "train.parquet")
    monkeypatch.setenv("MTREC_SYNTH_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="run `make demo`"):
        load_config(child)
    child.write_text("extends: ${MTREC_NO_SUCH_VAR}/config.yaml\n")
    with pytest.raises(ConfigError, match="MTREC_NO_SUCH_VAR is not set"):
        load_config(child)


# ------------------------------------------------- numbers: YAML 1.2 floats and ranges


@pytest.mark.parametrize(
    ("text", "value"), [("1e-3", 1e-3), ("1.0e6", 1.0e6), ("2E-4", 2e-4), (".5", 0.5)]
)
def test_exponent_floats_in_file_and_set(tmp_path: Path, text: str, value: float) -> None:
    p = write(tmp_path, "lr.yaml", BASE + f"training:\n  learning_rate: {text}\n")
    assert load_config(p).training.learning_rate == value
    base = write(tmp_path, "base.yaml", BASE)
    cfg = load_config(base, overrides=[f"training.learning_rate={text}"])
    assert cfg.training.learning_rate == value


def test_integers_and_strings_still_resolve_as_before(tmp_path: Path) -> None:
    p = write(tmp_path, "base.yaml", BASE)
    cfg = load_config(p, overrides=["training.epochs=12", "name=1e3x"])
    assert cfg.training.epochs == 12 and isinstance(cfg.training.epochs, int)
    assert cfg.name == "1e3x"
    # an exponent is a float, so it is not an int setting
    with pytest.raises(ConfigError, match=r"training\.epochs: expected int, got 1000\.0"):
        load_config(p, overrides=["training.epochs=1e3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "training.learning_rate=.nan",
            r"training\.learning_rate: must be a finite number \(> 0\), got nan",
        ),
        (
            "training.learning_rate=.inf",
            r"training\.learning_rate: must be a finite number \(> 0\), got inf",
        ),
        ("training.learning_rate=-1e-3", r"training\.learning_rate: must be > 0, got -0\.001"),
        ("training.weight_decay=-0.1", r"training\.weight_decay: must be >= 0, got -0\.1"),
        (
            "training.early_stopping_patience=-1",
            r"training\.early_stopping_patience: must be >= 0, got -1",
        ),
        (
            "model.multitask.dropout=1.0",
            r"model\.multitask\.dropout: must be in \[0, 1\), got 1\.0",
        ),
        ("model.embedding.eps=0", r"model\.embedding\.eps: must be > 0, got 0"),
        (
            "dataset.fill_value=.inf",
            r"dataset\.fill_value: must be a finite number \(any finite number\), got inf",
        ),
        (
            "model.multitask.expert_hidden=[8,0]",
            r"model\.multitask\.expert_hidden\[1\]: must be > 0, got 0",
        ),
        ("model.multitask.ple.levels=0", r"model\.multitask\.ple\.levels: must be > 0, got 0"),
        (
            "model.multitask.home.shared_experts=-1",
            r"model\.multitask\.home\.shared_experts: must be >= 0",
        ),
    ],
)
def test_numbers_out_of_range_name_key_and_range(
    tmp_path: Path, override: str, message: str
) -> None:
    p = write(tmp_path, "base.yaml", BASE)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(p, overrides=[override])
    assert str(p) in str(err.value)


def test_nan_in_a_file_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.yaml", BASE + "training:\n  learning_rate: .nan\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: training\.learning_rate: must be a finite"):
        load_config(p)


# --------------------------------------------------- extends: replace / delete inherited keys

CHUNKED = (
    BASE.replace("features:\n", "features:\n  - {name: b, kind: categorical}\n")
    + "model:\n  embedding:\n    chunks: {a: 2, b: 3}\n"
)


def test_extends_merges_mappings_by_default(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", CHUNKED)
    child = write(
        tmp_path, "child.yaml", "extends: base.yaml\nmodel:\n  embedding:\n    chunks: {a: 1}\n"
    )
    assert load_config(child).model.embedding.chunks == {"a": 1, "b": 3}


def test_extends_replace_tag_replaces_an_inherited_mapping(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", CHUNKED)
    # the child drops feature b; the base's chunks entry for b must go with it
    child = write(
        tmp_path,
        "child.yaml",
        "extends: base.yaml\n"
        "features: [{name: a, kind: categorical}, {name: x, kind: numeric}]\n"
        "model:\n  embedding:\n    chunks: !replace {a: 2}\n",
    )
    cfg = load_config(child)
    assert cfg.model.embedding.chunks == {"a": 2}
    # the same as --set on the key, which replaces the mapping whole
    via_set = load_config(
        write(
            tmp_path, "plain.yaml", "extends: base.yaml\nfeatures: [{name: a, kind: categorical}]\n"
        ),
        overrides=["model.embedding.chunks={a: 2}"],
    )
    assert via_set.model.embedding.chunks == {"a": 2}
    # without the tag the inherited entry for b stays and names a feature that is gone
    merged = write(
        tmp_path,
        "merged.yaml",
        "extends: base.yaml\nfeatures: [{name: a, kind: categorical}]\n"
        "model:\n  embedding:\n    chunks: {a: 2}\n",
    )
    with pytest.raises(ConfigError, match=r"model\.embedding\.chunks\.b: unknown feature"):
        load_config(merged)


def test_extends_delete_tag_removes_an_inherited_key(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", CHUNKED)
    child = write(
        tmp_path,
        "child.yaml",
        "extends: base.yaml\nfeatures: [{name: a, kind: categorical}]\n"
        "dataset:\n  valid: !delete\n"
        "model:\n  embedding:\n    chunks:\n      b: !delete\n",
    )
    cfg = load_config(child)
    assert cfg.model.embedding.chunks == {"a": 2}
    assert cfg.dataset.valid is None
    # a tag with nothing to merge into (no extends) is the plain value / no key
    plain = write(
        tmp_path, "plain.yaml", BASE + "model:\n  embedding:\n    chunks: !replace {a: 2}\n"
    )
    assert load_config(plain).model.embedding.chunks == {"a": 2}


def test_diff_configs_names_changed_key_paths(tmp_path: Path) -> None:
    from mtrec.config import diff_configs

    p = write(tmp_path, "base.yaml", BASE)
    a = config_to_dict(load_config(p))
    b = config_to_dict(load_config(p, overrides=["training.epochs=3", "model.multitask.type=ple"]))
    assert diff_configs(a, a) == []
    assert diff_configs(a, b) == ["model.multitask.type", "model.multitask.ple", "training.epochs"]
    assert diff_configs({"x": [1, {"y": 2}]}, {"x": [1, {"y": 3}]}) == ["x[1].y"]
    assert diff_configs({"x": 1.0}, {"x": 1}) == []
