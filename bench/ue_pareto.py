"""Parameter–quality trade-off: Unified Embedding vs per-feature hashed tables.

For each total row budget R (embedding parameters R x d), trains the dataset's
experiment three ways and reports the test mean AUC over tasks:

* ``per_feature``: one hashed table per feature, R rows water-filled over the
  features (a table never gets more than its configured ``buckets``; the large ones
  share what the small ones leave);
* ``unified_k1``: ONE multiplexed table of R rows x d (one probe per feature);
* ``unified_k2``: ONE table of 2R rows x d/2, two probes per feature (same parameters).

Prints one JSON line per run and a final ``ue_pareto`` line; ``--markdown FILE``
writes the table. Data: the synthetic default preset (planted, cached under
bench/.cache) and census-kdd when ``$MTREC_DATA_DIR`` has it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common as C

CENSUS_CONFIG = C.REPO / "configs" / "census_kdd" / "mmoe.yaml"


def _variant(cfg: Any, method: str, budget: int) -> Any:
    from mtrec.config import EmbeddingConfig

    emb, dim = cfg.model.embedding, cfg.model.embedding.dim
    sparse = [f for f in cfg.features if f.kind != "numeric"]
    if method == "per_feature":
        share = _water_fill({f.name: f.buckets or emb.buckets for f in sparse}, budget)
        features = [
            dataclasses.replace(f, buckets=share[f.name]) if f.name in share else f
            for f in cfg.features
        ]
        new_emb = dataclasses.replace(emb, type="per_feature")
        return dataclasses.replace(
            cfg, features=features, model=dataclasses.replace(cfg.model, embedding=new_emb)
        )
    probes = 1 if method == "unified_k1" else 2
    new_emb: EmbeddingConfig = dataclasses.replace(
        emb,
        type="unified",
        rows=budget * probes,
        chunk_dim=dim // probes,
        chunks={f.name: probes for f in sparse},
    )
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embedding=new_emb))


def _water_fill(wanted: dict[str, int], budget: int) -> dict[str, int]:
    """Split ``budget`` rows over tables: small tables get what they want, the large ones
    share the rest equally (the fair per-feature baseline at a fixed budget)."""
    out: dict[str, int] = {}
    remaining, left = budget, len(wanted)
    for name, want in sorted(wanted.items(), key=lambda kv: kv[1]):
        out[name] = max(1, min(want, remaining // left))
        remaining -= out[name]
        left -= 1
    return out


def _run(cfg: Any, work: Path, name: str) -> dict[str, Any]:
    from mtrec.evaluate.report import evaluate_run
    from mtrec.train.loop import train

    out = work / name
    summary = train(cfg, out)
    report = evaluate_run(out)
    aucs = [m["auc"] for m in report["tasks"].values()]
    return {
        "mean_auc": round(sum(aucs) / len(aucs), 5),
        "tasks": {t: m["auc"] for t, m in report["tasks"].items()},
        "best_epoch": summary["best_epoch"],
        "samples_per_s": summary["samples_per_s"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--synthetic-rows", type=int, default=200_000)
    p.add_argument("--synthetic-budgets", default="2000,8000,32000,128000")
    p.add_argument("--census-budgets", default="64,256,1024,4096")
    p.add_argument("--epochs", type=int, default=4, help="max epochs per run")
    p.add_argument("--markdown", type=Path, help="write the result table here")
    p.add_argument("--skip-census", action="store_true")
    C.add_common_args(p)
    args = p.parse_args(argv)
    C.warn_if_contended(args.threads)

    from mtrec.config import load_config

    experiments: list[tuple[str, Any, list[int]]] = []
    synth = C.ensure_synthetic(args.cache_dir, args.synthetic_rows)
    experiments.append(
        ("synthetic", load_config(synth / "config.yaml"), _ints(args.synthetic_budgets))
    )
    if not args.skip_census:
        census = load_config(CENSUS_CONFIG)
        if Path(census.dataset.train).exists():
            experiments.append(("census-kdd", census, _ints(args.census_budgets)))
        else:
            C.log(f"SKIP census-kdd: {census.dataset.train} not found (set MTREC_DATA_DIR)")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ue-pareto-") as tmp:
        for dataset, base, budgets in experiments:
            overrides = {"epochs": args.epochs, "progress": False, "threads": args.threads}
            base = dataclasses.replace(
                base, training=dataclasses.replace(base.training, **overrides)
            )
            for budget in budgets:
                for method in ("per_feature", "unified_k1", "unified_k2"):
                    name = f"{dataset}-{method}-{budget}"
                    C.log(f"training {name} ...")
                    result = _run(_variant(base, method, budget), Path(tmp), name)
                    line = C.emit(
                        "ue_pareto_run",
                        dataset=dataset,
                        method=method,
                        budget_rows=budget,
                        parameters=budget * base.model.embedding.dim,
                        **result,
                    )
                    rows.append(line)
    C.emit("ue_pareto", runs=len(rows))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(_markdown(rows))
        C.log(f"wrote {args.markdown}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Unified Embedding vs per-feature hashed tables at equal parameters",
        "",
        "Test mean AUC over tasks (one seed). `per_feature`: R rows water-filled over the",
        "features' tables (none above its configured buckets); `unified_k1`: one",
        "shared table of R rows x d; `unified_k2`: 2R rows x d/2 with two probes per",
        "feature. Produced by `.venv/bin/python bench/ue_pareto.py --markdown docs/ue_pareto.md`.",
        "",
        "| dataset | rows R | parameters | per_feature | unified_k1 | unified_k2 |",
        "|---|---|---|---|---|---|",
    ]
    table: dict[tuple[str, int], dict[str, float]] = {}
    params: dict[tuple[str, int], int] = {}
    for r in rows:
        key = (r["dataset"], r["budget_rows"])
        table.setdefault(key, {})[r["method"]] = r["mean_auc"]
        params[key] = r["parameters"]
    for (dataset, budget), by_method in table.items():
        cells = [
            f"{by_method.get(m, float('nan')):.4f}"
            for m in ("per_feature", "unified_k1", "unified_k2")
        ]
        lines.append(
            f"| {dataset} | {budget:,} | {params[(dataset, budget)]:,} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
