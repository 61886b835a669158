"""The block registry: built-in blocks register themselves, and a user's block defined in a
file next to the YAML (``imports:``) trains, evaluates, exports and serves."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from helpers import write_small_config

from mtrec.config import ConfigError, config_to_dict, load_config, parse_config
from mtrec.multitask import register_block, registered_blocks

# a user's block: one shared layer then one layer per task; its settings have a range
MY_BLOCKS = '''
from dataclasses import dataclass

import torch
from torch import nn

from mtrec.config import MultiTaskConfig, num
from mtrec.multitask import BlockInputs, register_block


@dataclass
class TinyConfig:
    """A shared layer of ``hidden`` units, then one ``hidden``-wide layer per task."""

    # width of the shared and of each task's layer
    hidden: int = num(32, gt=0)


@register_block("tiny", config=TinyConfig)
class Tiny(nn.Module):
    def __init__(self, inputs: BlockInputs, cfg: MultiTaskConfig) -> None:
        super().__init__()
        width = cfg.block.hidden
        self.shared = nn.Linear(inputs.in_features, width)
        self.heads = nn.ModuleList([nn.Linear(width, width) for _ in inputs.task_names])
        self.out_features = width

    def forward(
        self, v: torch.Tensor, tokens: list[torch.Tensor], aux: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        h = torch.relu(self.shared(v))
        out: list[torch.Tensor] = []
        for head in self.heads:
            out.append(torch.relu(head(h)))
        return out
'''


def _mtrec(args: list[Any], cwd: Path) -> dict[str, Any]:
    script = Path(sys.executable).with_name("mtrec")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mtrec.cli"]
    proc = subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration  # the mtrec CLI end to end, in subprocesses
def test_user_block_next_to_the_yaml_trains_evaluates_exports_and_serves(
    tmp_path: Path,
) -> None:
    exp, elsewhere, later = tmp_path / "exp", tmp_path / "work", tmp_path / "later"
    for d in (exp, elsewhere, later):
        d.mkdir()
    synth = _mtrec(
        ["data", "synth", "--out", tmp_path / "data", "--rows", 2000, "--vocab-scale", 0.05],
        elsewhere,
    )
    (exp / "my_blocks.py").write_text(MY_BLOCKS)
    config = write_small_config(
        Path(synth["out"]),
        exp / "tiny.yaml",
        model={"multitask": {"type": "tiny", "tiny": {"hidden": 48}}},
        imports=["my_blocks"],
    )
    # the working directory is not the YAML's: my_blocks is found next to the YAML
    run = elsewhere / "run"
    train = _mtrec(
        ["train", "--config", config, "--out", run, "--set", "training.epochs=1"], elsewhere
    )
    assert Path(train["run_dir"]) == run
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["imports"] == [str(exp / "my_blocks.py")]
    assert stored["model"]["multitask"]["type"] == "tiny"
    assert stored["model"]["multitask"]["tiny"] == {"hidden": 48}
    # evaluate / export / predict from yet another directory re-import the stored path
    ev = _mtrec(["evaluate", "--run", run], later)
    assert set(ev["tasks"]) == set(synth["tasks"])
    assert all(0.0 < m["auc"] < 1.0 for m in ev["tasks"].values())
    model = later / "model.pt"
    ex = _mtrec(["export", "--run", run, "--out", model], later)
    assert ex["parity_max_abs_diff"] <= 1e-5
    pred = later / "pred.parquet"
    test_file = Path(synth["out"]) / "test.parquet"
    served = _mtrec(["predict", "--model", model, "--input", test_file, "--out", pred], later)
    frame = pl.read_parquet(pred)
    assert served["rows"] == frame.height == pl.read_parquet(test_file).height
    # the exported graph holds the user's block with its configured width
    import torch

    scripted = torch.jit.load(str(model))
    # a frozen export: the weights are constants of the graph
    shapes = [
        tuple(node.t("value").shape)
        for node in scripted.graph.findAllNodes("prim::Constant")
        if node.hasAttribute("value") and node.kindOf("value") == "t"
    ]
    assert any(len(s) == 2 and s[0] == 48 for s in shapes), shapes


def _base(tmp: Path) -> str:
    return textwrap.dedent(f"""
        dataset: {{train: {tmp / "train.parquet"}}}
        features: [{{name: a, kind: categorical}}, {{name: b, kind: categorical}}]
        tasks: [{{name: click}}, {{name: like}}]
        """)


def test_unknown_block_lists_the_registered_ones_and_imports(tmp_path: Path) -> None:
    p = tmp_path / "x.yaml"
    p.write_text(_base(tmp_path) + "model: {multitask: {type: tinny}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "model.multitask.type" in msg and "imports:" in msg
    for name in ("mmoe", "ple", "home", "apem", "task_expert", "shared_bottom"):
        assert name in msg
    p.write_text(_base(tmp_path) + "model: {multitask: {tinny: {hidden: 3}}}\n")
    with pytest.raises(ConfigError, match=r"model\.multitask\.tinny: unknown key.*imports:"):
        load_config(p)


def test_missing_import_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "x.yaml"
    p.write_text(_base(tmp_path) + "imports: [no_such_blocks_module]\n")
    with pytest.raises(ConfigError, match=r"imports\[0\]: no module 'no_such_blocks_module'"):
        load_config(p)


def test_user_block_settings_are_typed_bounded_and_round_trip(tmp_path: Path) -> None:
    (tmp_path / "blocks_rt.py").write_text(MY_BLOCKS.replace('"tiny"', '"tiny_rt"'))
    p = tmp_path / "x.yaml"
    p.write_text(
        _base(tmp_path)
        + "imports: [blocks_rt]\nmodel: {multitask: {type: tiny_rt, tiny_rt: {hidden: 5}}}\n"
    )
    cfg = load_config(p)
    assert cfg.imports == [str(tmp_path / "blocks_rt.py")]
    assert cfg.model.multitask.block.hidden == 5 == cfg.model.multitask.tiny_rt.hidden
    raw = config_to_dict(cfg)
    assert raw["model"]["multitask"]["tiny_rt"] == {"hidden": 5}
    assert parse_config(raw, "again") == cfg
    with pytest.raises(ConfigError, match=r"model\.multitask\.tiny_rt\.hidden: must be > 0"):
        load_config(p, overrides=["model.multitask.tiny_rt.hidden=0"])
    with pytest.raises(ConfigError, match=r"tiny_rt\.hidden: expected int, got 'x'"):
        load_config(p, overrides=["model.multitask.tiny_rt.hidden=x"])


def test_register_block_refuses_a_second_owner_of_a_name() -> None:
    assert "mmoe" in registered_blocks()
    with pytest.raises(ValueError, match="'mmoe' is already registered"):
        register_block("mmoe")(lambda inputs, cfg: None)
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_block("not_a_dataclass_cfg", config=dict)


@pytest.mark.integration  # a fresh interpreter
def test_a_config_with_a_user_block_unpickles_in_a_fresh_process(tmp_path: Path) -> None:
    """Ray ships the config to worker processes by pickle: they re-import `imports`."""
    import pickle

    (tmp_path / "blocks_pk.py").write_text(MY_BLOCKS.replace('"tiny"', '"tiny_pk"'))
    p = tmp_path / "x.yaml"
    p.write_text(
        _base(tmp_path)
        + "imports: [blocks_pk]\nmodel: {multitask: {type: tiny_pk, tiny_pk: {hidden: 7}}}\n"
    )
    blob = tmp_path / "cfg.pkl"
    blob.write_bytes(pickle.dumps(load_config(p)))
    code = (
        "import pickle, sys; cfg = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "print(cfg.model.multitask.tiny_pk.hidden)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(blob)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "7"


def test_imports_given_with_set_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "cwd"
    here.mkdir()
    (here / "blocks_set.py").write_text(MY_BLOCKS.replace('"tiny"', '"tiny_set"'))
    p = tmp_path / "x.yaml"
    p.write_text(_base(tmp_path))
    monkeypatch.chdir(here)
    cfg = load_config(
        p,
        overrides=[
            "imports=[blocks_set]",
            "model.multitask.type=tiny_set",
            "dataset.valid=!delete",
        ],
    )
    assert cfg.imports == [str(here / "blocks_set.py")]
    assert cfg.model.multitask.block.hidden == 32
    assert cfg.dataset.valid is None
