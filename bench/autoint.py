"""AutoInt cost: training samples/s with the interaction on vs off, same data and head.

Variants (census-kdd income, ``configs/census_kdd/``; or the planted demo data with
``--synthetic``), each one training step of ``mtrec.train.step.TrainStep`` on the same
pre-built batches:

* ``dnn`` — embeddings → DNN (no interaction);
* ``autoint`` — 3 interacting layers, then the same head;
* ``autoint_plus`` — AutoInt + the parallel DNN;
* ``autoint_moh`` — AutoInt+ with Mixture-of-Head routing (4 heads: 1 shared + top-2 of 3);
* ``autoint_plus_deepctr_shape`` — AutoInt+ shaped like DeepCTR-Torch's (``bench/peers.py``):
  attention 16 wide, no LayerNorm, DNN [128, 64].

``--ref REV`` adds, for every AutoInt variant, a twin ``<variant>@REV`` whose interacting
layers run ``mtrec/interaction/autoint.py`` as of git revision REV (same weights, same
batches; the layer's attributes must match), so a change to the layer is timed against
its predecessor in one process; ``speedup_vs_ref`` = variant samples/s ÷ twin samples/s.
``--clock process`` times CPU seconds of this process instead of wall seconds: on a
loaded machine, with ``--threads 1``, it leaves out the time the process waited for a core.

Steps of the variants are interleaved round by round, so they see the same machine
load; the figures are the median round. Output, one JSON line per variant, then::

    {"bench": "autoint_summary", "samples_per_s": {variant: x}, "cost_vs_dnn": {variant: r}}

where ``cost_vs_dnn`` = dnn samples/s ÷ variant samples/s (how many times slower).

Usage: ``.venv/bin/python bench/autoint.py [--threads 1] [--rounds 5] [--steps 10]
[--variants autoint_plus ...] [--ref main] [--clock process]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import _common as C

CENSUS = C.REPO / "configs" / "census_kdd"
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "dnn": ("dnn.yaml", []),
    "autoint": ("autoint.yaml", []),
    "autoint_plus": ("autoint_plus.yaml", []),
    "autoint_moh": (
        "autoint_plus.yaml",
        [
            "model.interaction.heads=4",
            "model.interaction.heads_routing={shared: 1, top_k: 2}",
        ],
    ),
    "autoint_plus_deepctr_shape": (
        "autoint_plus.yaml",
        [
            "model.interaction.attention_dim=16",
            "model.interaction.layer_norm=false",
            "model.interaction.dnn=[128, 64]",
        ],
    ),
}


def layer_class_at(rev: str) -> type:
    """``InteractingLayer`` of ``mtrec/interaction/autoint.py`` as of git revision ``rev``."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(
        ["git", "-C", str(C.REPO), "show", f"{rev}:mtrec/interaction/autoint.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "autoint_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("autoint_ref", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.InteractingLayer


def use_layer_class(model: Any, cls: type) -> None:
    """Run every interacting layer of ``model`` with ``cls``'s code (weights unchanged)."""
    from mtrec.interaction.autoint import InteractingLayer

    for m in model.modules():
        if isinstance(m, InteractingLayer):
            m.__class__ = cls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(p)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--batches", type=int, default=20, help="distinct pre-built batches")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--ref", metavar="REV", help="also time the layer of git revision REV")
    p.add_argument("--clock", choices=["wall", "process"], default="wall")
    args = p.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    C.warn_if_contended(args.threads)

    import itertools

    trainers: dict[str, C.Trainer] = {}
    batches: list[Any] | None = None
    ref_cls = layer_class_at(args.ref) if args.ref else None
    for name in args.variants:
        file, overrides = VARIANTS[name]
        cfg, spec = C.load_experiment(CENSUS / file, overrides)
        trainers[name] = C.Trainer(cfg, spec, threads=args.threads)
        if ref_cls is not None and name != "dnn":
            trainers[f"{name}@{args.ref}"] = twin = C.Trainer(cfg, spec, threads=args.threads)
            use_layer_class(twin.model, ref_cls)
        if batches is None:  # every variant reads the same features: share the batches
            train = C.load_train_split(cfg, spec)
            batches = list(itertools.islice(trainers[name].batches(train), args.batches))
    assert batches is not None
    for t in trainers.values():  # warm-up
        for b in batches[:3]:
            t.step(b)
    rates: dict[str, list[float]] = {n: [] for n in trainers}
    for r in range(args.rounds):
        for name, t in trainers.items():
            t0 = clock()
            samples = 0
            for b in itertools.islice(itertools.cycle(batches), args.steps):
                loss = t.step(b)
                samples += b.batch_size
            float(loss.detach())
            rates[name].append(samples / (clock() - t0))
        C.log(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items())
        )
    median = {n: round(statistics.median(v), 1) for n, v in rates.items()}
    for name, v in rates.items():
        params = sum(p.numel() for p in trainers[name].model.parameters())
        C.emit("autoint", variant=name, samples_per_s=median[name], rounds=[round(x) for x in v],
               params=params, threads=args.threads, clock=args.clock)  # fmt: skip
    summary: dict[str, Any] = {"samples_per_s": median}
    if "dnn" in median:
        summary["cost_vs_dnn"] = {n: round(median["dnn"] / x, 2) for n, x in median.items()}
    if args.ref:  # per round, variant vs its twin (same load), then the median
        summary["speedup_vs_ref"] = {
            n: round(statistics.median(a / b for a, b in zip(v, rates[f"{n}@{args.ref}"])), 3)
            for n, v in rates.items()
            if f"{n}@{args.ref}" in rates
        }
    C.emit("autoint_summary", **summary, threads=args.threads, clock=args.clock)


if __name__ == "__main__":
    main()
