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
