"""AutoInt cost: training samples/s with the interaction on vs off, same data and head.

Variants (census-kdd income, ``configs/census_kdd/``; or the planted demo data with
``--synthetic``), each one training step of ``mtrec.train.step.TrainStep`` on the same
pre-built batches:

* ``dnn`` — embeddings → DNN (no interaction);
* ``autoint`` — 3 interacting layers, then the same head;
* ``autoint_plus`` — AutoInt + the parallel DNN;
* ``autoint_moh`` — AutoInt+ with Mixture-of-Head routing (4 heads: 1 shared + top-2 of 3).

Steps of the variants are interleaved round by round, so they see the same machine
load; the figures are the median round. Output, one JSON line per variant, then::

    {"bench": "autoint_summary", "samples_per_s": {variant: x}, "cost_vs_dnn": {variant: r}}

where ``cost_vs_dnn`` = dnn samples/s ÷ variant samples/s (how many times slower).

Usage: ``.venv/bin/python bench/autoint.py [--threads 1] [--rounds 5] [--steps 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
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
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    C.add_common_args(p)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    p.add_argument("--batches", type=int, default=20, help="distinct pre-built batches")
    args = p.parse_args()
    C.warn_if_contended(args.threads)

    import itertools

    trainers: dict[str, C.Trainer] = {}
    batches: list[Any] | None = None
    for name, (file, overrides) in VARIANTS.items():
        cfg, spec = C.load_experiment(CENSUS / file, overrides)
        trainers[name] = C.Trainer(cfg, spec, threads=args.threads)
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
            t0 = time.perf_counter()
            samples = 0
            for b in itertools.islice(itertools.cycle(batches), args.steps):
                loss = t.step(b)
                samples += b.batch_size
            float(loss.detach())
            rates[name].append(samples / (time.perf_counter() - t0))
        C.log(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items())
        )
    median = {n: round(statistics.median(v), 1) for n, v in rates.items()}
    for name, v in rates.items():
        params = sum(p.numel() for p in trainers[name].model.parameters())
        C.emit("autoint", variant=name, samples_per_s=median[name], rounds=[round(x) for x in v],
               params=params, threads=args.threads)  # fmt: skip
    C.emit(
        "autoint_summary",
        samples_per_s=median,
        cost_vs_dnn={n: round(median["dnn"] / x, 2) for n, x in median.items()},
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
