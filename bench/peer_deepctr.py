"""DeepCTR-Torch side of ``bench/peers.py`` — runs in the peers' own virtual environment.

Never imported by mtrec or by the mtrec environment: ``bench/peers.py`` starts this file
with the interpreter of ``bench/.cache/peers-venv`` (torch + deepctr-torch only) and talks
to it over stdin/stdout, one JSON object per line:

* stdin ``{"model": "mmoe" | "autoint_plus", "epochs": 1}`` → trains that many epochs of
  the model built at start-up and answers ``{"model": ..., "samples_per_s": x,
  "epoch_s": y, "rows": n}``; an empty line or EOF ends the process.

The census data arrives as one ``.npz`` written by ``bench/peers.py``: label-encoded
categorical columns (``cat:<name>``, int64, values 0..vocab-1), normalised numerics
(``num:<name>``, float32) and the labels (``label:<task>``).

Usage (by bench/peers.py): ``peers-venv/bin/python bench/peer_deepctr.py DATA.npz
--threads 2 --spec '{"mmoe": {...}, "autoint_plus": {...}}'``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from deepctr_torch.inputs import DenseFeat, SparseFeat
from deepctr_torch.models import AutoInt
from deepctr_torch.models.multitask import MMOE


def _columns(data: np.lib.npyio.NpzFile, dim: int) -> tuple[list, dict[str, np.ndarray]]:
    features: list = []
    x: dict[str, np.ndarray] = {}
    for key in data.files:
        kind, name = key.split(":", 1)
        if kind == "cat":
            ids = data[key]
            features.append(SparseFeat(name, int(ids.max()) + 1, embedding_dim=dim))
            x[name] = ids
        elif kind == "num":
            features.append(DenseFeat(name, 1))
            x[name] = data[key]
    return features, x


def build(name: str, spec: dict, features: list) -> torch.nn.Module:
    """The peer model with the shapes ``spec`` gives (see bench/peers.py PEER_SHAPES)."""
    if name == "mmoe":
        model = MMOE(
            features,
            num_experts=spec["num_experts"],
            expert_dnn_hidden_units=tuple(spec["expert_hidden"]),
            gate_dnn_hidden_units=(),
            tower_dnn_hidden_units=tuple(spec["tower_hidden"]),
            dnn_dropout=spec["dropout"],
            task_types=("binary",) * len(spec["tasks"]),
            task_names=tuple(spec["tasks"]),
            seed=spec["seed"],
        )
    else:
        model = AutoInt(
            features,
            features,
            att_layer_num=spec["layers"],
            att_head_num=spec["heads"],
            att_res=True,
            dnn_hidden_units=tuple(spec["dnn"]),
            dnn_dropout=spec["dropout"],
            seed=spec["seed"],
        )
    model.compile(
        torch.optim.Adam(model.parameters(), lr=spec["learning_rate"]), "binary_crossentropy"
    )
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("data")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--spec", required=True, help="JSON: model name -> shapes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    specs = json.loads(args.spec)
    data = np.load(args.data)
    labels = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("label:")}
    models: dict[str, tuple[torch.nn.Module, dict, np.ndarray]] = {}
    for name, spec in specs.items():
        features, x = _columns(data, spec["dim"])
        y = np.stack([labels[t] for t in spec["tasks"]], axis=1).astype(np.float32)
        if y.shape[1] == 1:
            y = y[:, 0]
        models[name] = (build(name, spec, features), x, y)
    print(json.dumps({"ready": sorted(models), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        model, x, y = models[req["model"]]
        spec = specs[req["model"]]
        rows = len(y)
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=spec["batch_size"], epochs=req.get("epochs", 1), verbose=0)
        seconds = time.perf_counter() - t0
        epochs = req.get("epochs", 1)
        print(
            json.dumps(
                {
                    "model": req["model"],
                    "samples_per_s": round(rows * epochs / seconds, 1),
                    "epoch_s": round(seconds / epochs, 3),
                    "rows": rows,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
