"""Thread settings of training (``mtrec.threads``) and ``training.compile`` (TrainStep)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import first_batch, fitted_spec, small_config, small_data_dir

from mtrec.config import ConfigError
from mtrec.threads import (
    affinity_cores,
    apply_threads,
    resolve_threads,
    set_wait_policy,
    wait_policy_env,
)
from mtrec.train.step import TrainStep

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_threads_are_the_affinity_cores() -> None:
    cores = sorted(os.sched_getaffinity(0))
    assert resolve_threads("auto") == len(cores) == affinity_cores()
    assert resolve_threads(3) == 3
    try:  # narrowed to one core (as taskset or a cpuset would), auto follows
        os.sched_setaffinity(0, {cores[0]})
        assert resolve_threads("auto") == 1
    finally:
        os.sched_setaffinity(0, set(cores))
    for bad in (0, -1, "many", True):
        with pytest.raises(ValueError, match="training.threads"):
            resolve_threads(bad)


def test_apply_threads_sets_torch_and_splits_for_workers(tmp_path_factory) -> None:
    cfg = small_config(small_data_dir(tmp_path_factory), tmp_path_factory.mktemp("thr"))
    cfg.training.threads = "auto"
    assert apply_threads(cfg.training) == affinity_cores() == torch.get_num_threads()
    cfg.training.threads = 1
    assert apply_threads(cfg.training) == 1 == torch.get_num_threads()
    cfg.training.threads = 64  # two workers on this node share its cores
    assert apply_threads(cfg.training, share=2) == max(1, affinity_cores() // 2)


def test_threads_key_accepts_auto_and_int(tmp_path_factory) -> None:
    data = small_data_dir(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("thr_cfg")
    assert small_config(data, tmp, ["training.threads=auto"]).training.threads == "auto"
    assert small_config(data, tmp, ["training.threads=3"]).training.threads == 3
    with pytest.raises(ConfigError, match="training.threads"):
        small_config(data, tmp, ["training.threads=0"])
    with pytest.raises(ConfigError, match="training.omp_wait_policy"):
        small_config(data, tmp, ["training.omp_wait_policy=spin"])


def test_wait_policy_env() -> None:
    assert wait_policy_env("passive") == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert wait_policy_env("active") == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert wait_policy_env("auto") == {}
    assert wait_policy_env("short") == {"GOMP_SPINCOUNT": "3000"}
    with pytest.raises(ValueError, match="omp_wait_policy"):
        wait_policy_env("spin")


def test_wait_policy_after_torch_is_reported(monkeypatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    # this process imported torch: libgomp is loaded, the policy cannot change any more
    with pytest.warns(RuntimeWarning, match="already imported"):
        assert set_wait_policy("active") is False
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # still passed on to child processes
    assert set_wait_policy("auto") is False  # nothing asked: no warning
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")  # registers the variable for restoring
    monkeypatch.delenv("GOMP_SPINCOUNT")
    with pytest.warns(RuntimeWarning, match="already imported"):
        assert set_wait_policy("short") is False
    assert os.environ["GOMP_SPINCOUNT"] == "3000"  # passed on to child processes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the policy already in effect: no warning
        assert set_wait_policy("active") is False


# records the environment at the moment torch is first imported, then runs the CLI
_PROBE = """
import importlib.abc, json, os, sys
seen = {}
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            from mtrec.threads import openmp_started
            seen.update(policy=os.environ.get("OMP_WAIT_POLICY"), gomp=openmp_started())
        return None
sys.meta_path.insert(0, Probe())
from mtrec.cli import main
code = main(sys.argv[1:])
print(json.dumps({"seen": seen, "code": code}))
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("policy", "expected"), [("passive", "PASSIVE"), ("auto", None), ("short", None)]
)
def test_cli_sets_wait_policy_before_torch_loads(
    tmp_path_factory, policy: str, expected: str | None
) -> None:
    data = small_data_dir(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("probe")
    config = small_config(data, tmp)  # writes tmp/small.yaml
    del config
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    argv = [
        *("train", "--config", str(tmp / "small.yaml"), "--out", str(tmp / "run")),
        *("--set", f"training.omp_wait_policy={policy}", "--set", "training.epochs=1"),
        *("--set", "training.max_steps_per_epoch=1", "--set", "training.progress=false"),
        *("--set", "training.threads=1"),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert report["seen"] == {"policy": expected, "gomp": False}
    assert "already imported" not in proc.stderr


def _losses(cfg, spec, batches, steps: int) -> tuple[TrainStep, list[float]]:
    step = TrainStep(cfg, spec)
    return step, [float(step.step(batches[i % len(batches)]).detach()) for i in range(steps)]


@pytest.mark.integration
def test_compiled_training_matches_eager(tmp_path_factory) -> None:
    torch.set_num_threads(1)
    data = small_data_dir(tmp_path_factory)
    cfg = small_config(
        data,
        tmp_path_factory.mktemp("compile"),
        ["model.interaction.type=autoint", "model.interaction.layers=1"],
    )
    spec = fitted_spec(cfg)
    batch = first_batch(cfg, spec, split="train", rows=128)
    plain, eager = _losses(cfg, spec, [batch], 4)
    on = copy.deepcopy(cfg)
    on.training.compile = True
    step, compiled = _losses(on, spec, [batch], 4)
    assert eager[-1] < eager[0]  # it trains
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    # the model itself stays the eager module: checkpoints and export are unchanged
    assert list(step.state_dict()["model"]) == list(plain.state_dict()["model"])
    assert all("_orig_mod" not in k for k in step.state_dict()["model"])
    # the task arch the serving module exports still scripts, and agrees with eager
    step.model.eval()
    with torch.no_grad():
        tokens = step.model.sparse_tokens(batch.sparse)
        scripted = torch.jit.script(step.model.task_arch)(tokens, batch.dense)
        torch.testing.assert_close(scripted, step.model.task_arch(tokens, batch.dense))
