"""mtrec beside the fastest open-source peer (DeepCTR-Torch 0.3.0), measured in one run.

Speed is a ratio: both libraries train on the same census-kdd rows, on the same machine,
in the same minutes, with epochs interleaved round by round (peer, mtrec, peer, mtrec, ...)
so both see the same load. Each ratio is ``mtrec samples/s ÷ peer samples/s`` (> 1: mtrec
is faster), from the median epoch of each side.

The peer lives in its own virtual environment, ``bench/.cache/peers-venv`` (git-ignored),
made on first use with the same torch CPU build as ``.venv`` plus ``deepctr-torch==0.3.0``;
it is never installed into ``.venv`` nor imported by mtrec. ``bench/peer_deepctr.py`` runs
there as a child process and trains on an ``.npz`` of the census split (label-encoded
categoricals, numerics normalised as mtrec's config says, labels).

Pairs (mtrec config → peer model):

* ``mmoe`` — ``configs/census_kdd/mmoe.yaml`` (Unified Embedding, 4 experts [128, 64],
  towers [64], dim 16, dropout 0.2, batch 1024) vs DeepCTR ``MMOE`` with the same
  experts, towers, dim, dropout, batch and learning rate (linear gates, as in the paper).
* ``autoint_plus`` — the shipped ``configs/census_kdd/autoint_plus.yaml`` vs DeepCTR
  ``AutoInt`` (3 layers, 2 heads of dim/2, residual, DNN [128, 64]).
* ``autoint_plus_deepctr_shape`` — the same config reshaped like the peer: attention 16
  wide (8 per head), no LayerNorm, DNN [128, 64].

Output: one JSON line per pair::

    {"bench": "peers", "pair": "mmoe", "mtrec_samples_per_s": x, "peer_samples_per_s": y,
     "ratio": x / y, "rounds": r, "threads": t, "loadavg": [...]}

then ``{"bench": "peers_summary", "ratios": {pair: r}}``.

Usage: ``.venv/bin/python bench/peers.py [--threads 2] [--rounds 3] [--pairs mmoe ...]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

CENSUS = C.REPO / "configs" / "census_kdd"
PEER_VERSION = "deepctr-torch==0.3.0"
PEER_SCRIPT = C.REPO / "bench" / "peer_deepctr.py"

# the peer's models have no first-order term and feed each numeric as one scaled vector:
# mtrec's linear term and piecewise-linear numerics (both on by default) are left out of
# the timed model too, so both sides train the same architecture
SAME_ARCHITECTURE = ["model.linear.enabled=false", "model.embedding.numeric_bins=0"]

# mtrec side: (config file, --set overrides); peer side: DeepCTR model and its shapes
PAIRS: dict[str, dict[str, Any]] = {
    "mmoe": {
        "config": ("mmoe.yaml", SAME_ARCHITECTURE),
        "peer": "mmoe",
    },
    "autoint_plus": {
        "config": ("autoint_plus.yaml", SAME_ARCHITECTURE),
        "peer": "autoint_plus",
    },
    "autoint_plus_deepctr_shape": {
        "config": (
            "autoint_plus.yaml",
            [
                *SAME_ARCHITECTURE,
                "model.interaction.attention_dim=16",
                "model.interaction.layer_norm=false",
                "model.interaction.dnn=[128, 64]",
            ],
        ),
        "peer": "autoint_plus",
    },
}


def peer_python(cache_dir: Path) -> Path:
    """The peers' interpreter, creating ``cache_dir/peers-venv`` on first use.

    torch is pinned to ``.venv``'s version, so pip takes the same CPU build (never a
    CUDA one) and both sides run the same kernels.
    """
    import torch

    venv = cache_dir / "peers-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    want = f"torch=={torch.__version__.split('+')[0]} {PEER_VERSION} requests"
    if stamp.exists() and stamp.read_text() == want:
        return python
    C.log(f"creating the peer environment {venv} ({want})")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, want.split()[0]], check=True)
    # deepctr_torch imports requests (its version check) without declaring it
    subprocess.run([*pip, PEER_VERSION, "requests"], check=True)
    stamp.write_text(want)
    return python


def write_peer_data(cfg: Any, spec: Any, out: Path) -> Path:
    """The census train split as the peer reads it (see ``bench/peer_deepctr.py``)."""
    import numpy as np
    import polars as pl

    frame = pl.read_parquet(cfg.dataset.train)
    arrays: dict[str, np.ndarray] = {}
    for f in spec.sparse:
        codes = frame.get_column(f.source).cast(pl.String).fill_null("<null>")
        arrays[f"cat:{f.name}"] = codes.cast(pl.Categorical).to_physical().to_numpy()
        arrays[f"cat:{f.name}"] = arrays[f"cat:{f.name}"].astype(np.int64)
    for f in spec.numeric:
        stats = spec.numeric_stats[f.name]
        x = frame.get_column(f.source).cast(pl.Float64).fill_null(0.0).to_numpy()
        if stats.transform.startswith("log1p"):
            x = np.log1p(np.maximum(x, 0.0))
        arrays[f"num:{f.name}"] = ((x - stats.mean) / stats.std).astype(np.float32)
    for t in spec.tasks:
        arrays[f"label:{t.name}"] = frame.get_column(t.source).to_numpy().astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return out


def peer_spec(cfg: Any, model: str) -> dict[str, Any]:
    """The peer's shapes, read from the mtrec config they are compared with."""
    mt, tr = cfg.model.multitask, cfg.training
    spec = {
        "dim": cfg.model.embedding.dim,
        "batch_size": tr.batch_size,
        "learning_rate": tr.learning_rate,
        "dropout": mt.dropout,
        "seed": cfg.seed,
        "tasks": [t.name for t in cfg.tasks],
    }
    if model == "mmoe":
        spec.update(
            num_experts=mt.num_experts,
            expert_hidden=list(mt.expert_hidden),
            tower_hidden=list(mt.tower_hidden),
        )
    else:
        it = cfg.model.interaction
        spec.update(layers=it.layers, heads=it.heads, dnn=[128, 64])
    return spec


class Peer:
    """The DeepCTR-Torch child process: one request line in, one JSON result line out."""

    def __init__(self, python: Path, data: Path, specs: dict[str, Any], threads: int) -> None:
        self.proc = subprocess.Popen(
            [
                *(str(python), str(PEER_SCRIPT), str(data)),
                *("--threads", str(threads), "--spec", json.dumps(specs)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the peer process exited ({self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def epoch(self, model: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"model": model, "epochs": 1}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(p)
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per side and pair")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    args = p.parse_args()
    C.warn_if_contended(args.threads)
    python = peer_python(args.cache_dir)

    trainers: dict[str, tuple[C.Trainer, Any]] = {}
    specs: dict[str, Any] = {}
    data: Path | None = None
    for pair in args.pairs:
        file, overrides = PAIRS[pair]["config"]
        cfg, spec = C.load_experiment(CENSUS / file, overrides)
        source = C.load_train_split(cfg, spec)
        trainers[pair] = (C.Trainer(cfg, spec, threads=args.threads), source)
        specs.setdefault(PAIRS[pair]["peer"], peer_spec(cfg, PAIRS[pair]["peer"]))
        if data is None:
            data = write_peer_data(cfg, spec, args.cache_dir / "peers" / "census_train.npz")
    assert data is not None
    peer = Peer(python, data, specs, args.threads)
    C.log(f"peer ready: {peer.ready}")
    ratios: dict[str, float] = {}
    try:
        for pair in args.pairs:
            trainer, source = trainers[pair]
            ours: list[float] = []
            theirs: list[float] = []
            # one untimed epoch each (allocator, caches), then interleaved timed rounds
            peer.epoch(PAIRS[pair]["peer"])
            C.time_epochs(trainer, source, epochs=1)
            for r in range(args.rounds):
                theirs.append(peer.epoch(PAIRS[pair]["peer"])["samples_per_s"])
                ours.append(C.time_epochs(trainer, source, epochs=1, seed=r)["samples_per_s"])
                C.log(f"{pair} round {r + 1}: mtrec {ours[-1]:,.0f} vs peer {theirs[-1]:,.0f}")
            mine, peer_sps = statistics.median(ours), statistics.median(theirs)
            ratios[pair] = round(mine / peer_sps, 3)
            C.emit(
                "peers",
                pair=pair,
                peer=PEER_VERSION,
                mtrec_samples_per_s=round(mine, 1),
                peer_samples_per_s=round(peer_sps, 1),
                ratio=ratios[pair],
                mtrec_each=ours,
                peer_each=theirs,
                rounds=args.rounds,
                threads=args.threads,
                rows=source.rows,
            )
    finally:
        peer.close()
    C.emit("peers_summary", ratios=ratios, time=time.strftime("%Y-%m-%dT%H:%M:%S"))


if __name__ == "__main__":
    main()
