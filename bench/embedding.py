"""Embedding benchmark: UnifiedEmbedding on FBGEMM's fused TBE vs per-feature baselines.

One training step of the sparse embedding alone — forward, a fixed random linear
loss over the B x F x d tokens, backward, and the sparse update — per batch of
``--batch`` rows (default 4096) and ``--features`` single-id categorical features
(default 26), every variant holding the same table parameters (``--rows`` M = 2M
rows × d = 16 in all):

* ``unified`` — :class:`mtrec.embeddings.unified.UnifiedEmbedding`, one logical
  table of M × d_c (d_c = d) split over ``num_tables`` physical tables (default
  ``--tables 1,4``), fused by ``mtrec.train.optim.fuse_sparse_optimizer``
  (row-wise Adagrad inside backward), Adam on the per-field projections. Feature
  i has ``k_i = min(3, 1 + floor(log10(vocab_i) / 2))`` chunks (the documented
  rule; 1–3 chunks).
* ``unified_k1`` — the same with one chunk per feature (26 lookups, no projection):
  the cost of multiplexing alone, without multi-probe.
* ``nn_embeddingbag`` — a loop of per-feature ``torch.nn.EmbeddingBag`` with dense
  gradients and ``torch.optim.Adam`` (what DeepCTR-Torch / torch-rechub do).
* ``sparse_loop`` — the same loop with ``sparse=True`` and ``torch.optim.SGD``.
* ``fused_per_feature`` — :class:`mtrec.embeddings.per_feature.PerFeatureEmbedding`
  fused the same way (one torchrec table per feature, FBGEMM TBE).

Per-feature tables are sized in proportion to the vocabularies (log-spaced from
10 to 2M values) and sum to M rows. Ids are drawn from each vocabulary
(``--ids zipf``, power law, default; or ``uniform``) and mixed to 63-bit
stable-id-like values; ``--batches`` distinct batches are cycled. ``--chunk-dim``
sets d_c (M then grows to keep M·d_c equal).

What to expect (2 cores, 2 threads, load ~1): unified ~18–20 ms per step vs
nn_embeddingbag ~110 ms (5.5–6x), but slower than the sparse loop (~8 ms) and the
fused per-feature tables (~5–6 ms): with the rule above it does 58 lookups per row
instead of 26, all random rows of one 128 MB table, plus the per-field projections
of the 21 fields whose k_i·d_c ≠ d (~330 MFLOP per step forward + backward).
``unified_k1`` (the multiplexing alone: 26 lookups, no projection) is ~6.5 ms,
faster than the sparse loop, ~1.2x the time of the fused per-feature tables.
``num_tables`` > 1 is slower on CPU (see ``mtrec.embeddings.unified``, "Physical
layout").

Output, one JSON line per variant then a summary::

    {"bench": "embedding", "variant": ..., "step_ms": median, "step_ms_min": ..., ...}
    {"bench": "embedding_summary", "speedup_vs_nn_embeddingbag": ..., (target >= 3)
     "speedup_vs_sparse_loop": ..., (target >= 1.5) "speedup_vs_fused_per_feature": ...,
     "unified_k1_speedup_vs_sparse_loop": ..., "unified_k1_speedup_vs_fused_per_feature": ...}

Speedups are of the ``unified`` variant with ``num_tables`` 1 (median step times)
and, for the ``unified_k1_*`` keys, of ``unified_k1``.
The machine is shared: read the figures against ``loadavg`` and compare with
``--threads 1`` when the load is near the core count.

Usage: ``.venv/bin/python bench/embedding.py [--threads 2] [--steps 20] [--tables 1,4]``.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import _common as C
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.config import DatasetConfig, ExperimentConfig
from mtrec.embeddings.per_feature import PerFeatureEmbedding
from mtrec.embeddings.unified import UnifiedEmbedding
from mtrec.train.optim import fuse_sparse_optimizer, make_dense_optimizer, sparse_optimizers

SPARSE_LR = 0.05


def chunks_for(vocab: int) -> int:
    """The documented starting rule: ``min(3, 1 + floor(log10(vocab) / 2))``."""
    return min(3, 1 + math.floor(math.log10(max(vocab, 1)) / 2))


def vocabularies(features: int, largest: int) -> list[int]:
    """Log-spaced vocabulary sizes from 10 to ``largest``."""
    lo, hi = math.log10(10), math.log10(largest)
    return [round(10 ** (lo + (hi - lo) * i / max(features - 1, 1))) for i in range(features)]


def table_rows(vocab: list[int], total: int) -> list[int]:
    """Per-feature rows in proportion to the vocabularies, at least 1 each, summing to ``total``."""
    s = sum(vocab)
    rows = [max(1, int(total * v / s)) for v in vocab]
    rows[rows.index(max(rows))] += total - sum(rows)
    return rows


def make_batches(
    vocab: list[int], batch: int, count: int, seed: int, ids: str = "zipf"
) -> list[torch.Tensor]:
    """``count`` batches of F x B int64 ids drawn from each vocabulary (power-law ``zipf``,
    ~ Zipf(1), or ``uniform``), mixed to 63-bit values like ``mtrec.data.hashing`` ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        cols = []
        for f, v in enumerate(vocab):
            if ids == "zipf":
                u = torch.rand(batch, generator=g, dtype=torch.float64)
                idx = torch.floor(torch.pow(float(v), u)).to(torch.int64) - 1
            else:
                idx = torch.randint(0, v, (batch,), generator=g)
            cols.append((idx + f * (1 << 40)) * 0x9E3779B97F4A7C15 % (1 << 62) + 2)
        out.append(torch.stack(cols))
    return out


def to_kjt(names: list[str], ids: torch.Tensor) -> KeyedJaggedTensor:
    f, b = ids.shape
    return KeyedJaggedTensor(
        keys=names,
        values=ids.reshape(-1),
        lengths=torch.ones(f * b, dtype=torch.int32),
        stride=b,
    )


class _Holder(nn.Module):
    def __init__(self, emb: nn.Module) -> None:
        super().__init__()
        self.emb = emb


def _fuse_cfg() -> ExperimentConfig:
    cfg = ExperimentConfig(dataset=DatasetConfig(train="-"), features=[], tasks=[])
    cfg.model.embedding.learning_rate = SPARSE_LR
    return cfg


def torchrec_step(emb: nn.Module, names: list[str]) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """A step of a torchrec-backed embedding, fused in place exactly as the training loop
    does it (row-wise Adagrad inside backward); Adam on any dense parameters (projections)."""
    cfg = _fuse_cfg()
    holder = fuse_sparse_optimizer(_Holder(emb), cfg)
    fused = tuple(f"{name}." for name in sparse_optimizers(holder))
    has_dense = any(not n.startswith(fused) for n, _ in holder.named_parameters())
    # (Adam refuses an empty parameter list: the per-feature embedding has no dense part)
    opt = make_dense_optimizer(holder, cfg) if has_dense else None

    def step(ids: torch.Tensor, w: torch.Tensor) -> Any:
        loss = (holder.emb(to_kjt(names, ids)) * w).sum()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss.backward()  # fused row-wise Adagrad updates the rows here
        if opt is not None:
            opt.step()
        return loss

    return step


def loop_step(
    rows: list[int], dim: int, sparse: bool
) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """A loop of per-feature ``nn.EmbeddingBag``: dense grads + Adam, or sparse grads + SGD."""
    bags = nn.ModuleList(nn.EmbeddingBag(r, dim, mode="sum", sparse=sparse) for r in rows)
    sizes = torch.tensor(rows, dtype=torch.int64)
    if sparse:
        opt: torch.optim.Optimizer = torch.optim.SGD(bags.parameters(), lr=SPARSE_LR)
    else:
        opt = torch.optim.Adam(bags.parameters(), lr=1e-3)

    def step(ids: torch.Tensor, w: torch.Tensor) -> Any:
        b = ids.shape[1]
        idx = torch.remainder(ids, sizes[:, None])
        offsets = torch.arange(b, dtype=torch.int64)
        out = torch.stack([bag(idx[i], offsets) for i, bag in enumerate(bags)], 1)
        loss = (out * w).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def time_variant(
    step: Callable[[torch.Tensor, torch.Tensor], Any],
    batches: list[torch.Tensor],
    w: torch.Tensor,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    for i in range(warmup):
        step(batches[i % len(batches)], w)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(batches[i % len(batches)], w)
        float(loss.detach())
        times.append(1000 * (time.perf_counter() - t0))
    return {
        "step_ms": round(statistics.median(times), 2),
        "step_ms_mean": round(statistics.fmean(times), 2),
        "step_ms_min": round(min(times), 2),
        "steps": steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--rows", type=int, default=2_000_000, help="M: table rows of every variant")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument(
        "--chunk-dim",
        type=int,
        default=0,
        help="d_c of unified (0: dim); M = rows * dim / d_c keeps the table parameters equal",
    )
    p.add_argument("--tables", default="1,4", help="num_tables values of the unified variant")
    p.add_argument("--ids", choices=("zipf", "uniform"), default="zipf", help="id distribution")
    p.add_argument("--batches", type=int, default=8, help="distinct batches cycled")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skip",
        default="",
        help="comma list of variants to skip: unified_k1, nn_embeddingbag, sparse_loop, "
        "fused_per_feature",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    C.warn_if_contended(args.threads)
    torch.manual_seed(args.seed)
    names = [f"f{i}" for i in range(args.features)]
    vocab = vocabularies(args.features, args.rows)
    chunks = [chunks_for(v) for v in vocab]
    rows = table_rows(vocab, args.rows)
    batches = make_batches(vocab, args.batch, args.batches, args.seed, args.ids)
    g = torch.Generator().manual_seed(args.seed + 1)
    w = torch.randn(args.batch, args.features, args.dim, generator=g)
    d_c = args.chunk_dim or args.dim
    unified_rows = args.rows * args.dim // d_c
    common = {
        "ids": args.ids,
        "batch": args.batch,
        "features": args.features,
        "rows": args.rows,
        "dim": args.dim,
        "threads": args.threads,
        "table_parameters": args.rows * args.dim,
    }
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results: dict[str, float] = {}

    def run(variant: str, make: Callable[[], Callable], **extra: Any) -> None:
        C.log(f"{variant} {extra or ''}: building")
        step = make()
        r = time_variant(step, batches, w, args.warmup, args.steps)
        key = variant + (f"_t{extra['num_tables']}" if variant == "unified" else "")
        results[key] = r["step_ms"]
        C.emit("embedding", variant=variant, **extra, **r, **common)
        del step
        gc.collect()

    for n in [int(t) for t in args.tables.split(",") if t.strip()]:
        m = unified_rows - unified_rows % n
        run(
            "unified",
            lambda n=n, m=m: torchrec_step(
                UnifiedEmbedding(
                    names,
                    m,
                    args.dim,
                    ["sum"] * args.features,
                    chunks=chunks,
                    chunk_dim=d_c,
                    num_tables=n,
                ),
                names,
            ),
            num_tables=n,
            unified_rows=m,
            chunk_dim=d_c,
            chunks=chunks,
            projected_fields=sum(1 for k in chunks if k * d_c != args.dim),
            lookups_per_row=sum(chunks),
        )
    if "unified_k1" not in skip:
        # the multiplexing alone: one chunk per feature (26 lookups, no projection)
        run(
            "unified_k1",
            lambda: torchrec_step(
                UnifiedEmbedding(names, args.rows, args.dim, ["sum"] * args.features), names
            ),
            num_tables=1,
            unified_rows=args.rows,
            chunk_dim=args.dim,
            lookups_per_row=args.features,
        )
    if "nn_embeddingbag" not in skip:
        run("nn_embeddingbag", lambda: loop_step(rows, args.dim, sparse=False))
    if "sparse_loop" not in skip:
        run("sparse_loop", lambda: loop_step(rows, args.dim, sparse=True))
    if "fused_per_feature" not in skip:
        run(
            "fused_per_feature",
            lambda: torchrec_step(
                PerFeatureEmbedding(names, rows, args.dim, ["sum"] * args.features), names
            ),
        )
    base = results.get("unified_t1")
    summary: dict[str, Any] = {"step_ms": results, **common}
    if base:
        for key, other in (
            ("speedup_vs_nn_embeddingbag", "nn_embeddingbag"),
            ("speedup_vs_sparse_loop", "sparse_loop"),
            ("speedup_vs_fused_per_feature", "fused_per_feature"),
        ):
            if other in results:
                summary[key] = round(results[other] / base, 2)
    k1 = results.get("unified_k1")
    if k1:
        for other in ("sparse_loop", "fused_per_feature"):
            if other in results:
                summary[f"unified_k1_speedup_vs_{other}"] = round(results[other] / k1, 2)
    C.emit("embedding_summary", **summary)


if __name__ == "__main__":
    main()
