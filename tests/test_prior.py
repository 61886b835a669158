"""The Gaussian priors on table rows (``model.linear.prior_std``,
``model.embedding.prior_std``): training use counts, 1 / expected uses per row, and a
penalty that adds up to one L2 per epoch."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
from helpers import fitted_spec, small_config, small_data_dir
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.config import ConfigError
from mtrec.data.hashing import hash_value
from mtrec.embeddings.linear import LinearArch
from mtrec.embeddings.per_feature import RARE_ID, UNSEEN_ID, FrequencyFilter
from mtrec.embeddings.prior import inverse_uses
from mtrec.embeddings.unified import UnifiedEmbedding, salted_hash
from mtrec.model import build_model
from mtrec.train.loop import train
from mtrec.train.losses import UsePrior, sparse_penalties


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data_dir(tmp_path_factory)


def test_uses_count_every_training_row_once(data: Path, tmp_path: Path) -> None:
    cfg = small_config(data, tmp_path, overrides=["model.embedding.min_count=5"])
    spec = fitted_spec(cfg)
    train = pl.read_parquet(cfg.dataset.train)
    singles = [f for f in spec.sparse if f.kind == "categorical"]
    assert singles and set(spec.id_uses) == set(spec.kept_ids)
    for f in singles:
        uses, kept = spec.id_uses[f.name], spec.kept_ids[f.name]
        assert len(uses) == len(kept) + 2
        # kept ids, rare ids and missing values: every training row exactly once
        assert int(uses.sum()) == train.height
        assert (uses[:-2] >= 5).all()
        column = train.get_column(f.source)
        value = column.drop_nulls().mode().sort()[0]
        position = list(kept).index(hash_value(value))
        assert uses[position] == (column == value).sum()
        assert uses[-1] == column.null_count()


def _inverse(
    buckets: list[int],
    kept: list[torch.Tensor | None],
    uses: list[torch.Tensor | None],
    unknown: list[int],
    p: list[float],
) -> torch.Tensor:
    """:func:`inverse_uses` of per-feature tables stacked at their base row, with the
    unknown ids and id dropout of a filter over ``kept``."""
    base = [sum(buckets[:f]) for f in range(len(buckets))]
    rows_of = lambda f, ids: base[f] + torch.remainder(ids, buckets[f])  # noqa: E731
    value_filter = FrequencyFilter(len(buckets), kept, None, unknown, p)
    return inverse_uses(sum(buckets), rows_of, kept, uses, value_filter)


def test_inverse_uses_by_hand() -> None:
    # one feature of 10 rows: ids 3 and 13 share row 3; dropout p = 0.5
    kept = torch.tensor([3, 5, 13])
    uses = torch.tensor([4, 2, 6, 5, 3])  # kept counts, then rare rows, then missing rows
    rare = _inverse([10], [kept], [uses], [RARE_ID], [0.5])
    expected = torch.zeros(10)
    expected[3] = 1 / ((4 + 6) * 0.5)
    expected[5] = 1 / (2 * 0.5)
    expected[RARE_ID] = 1 / (5 + 0.5 * 12)  # rare ids and the dropped ones
    expected[0] = 1 / 3  # missing values
    torch.testing.assert_close(rare, expected)
    # unseen: own_row: the dropped ids (kept and rare) read the unseen row, the rest of the
    # rare ids the rare one
    own = _inverse([10], [kept], [uses], [UNSEEN_ID], [0.5])
    expected[RARE_ID], expected[UNSEEN_ID % 10] = 1 / (5 * 0.5), 1 / (0.5 * (12 + 5))
    torch.testing.assert_close(own, expected)
    # a feature without counts (not filtered) gets no prior; the next one keeps its base
    both = _inverse([4, 10], [None, kept], [None, uses], [RARE_ID] * 2, [0.0, 0.5])
    assert torch.equal(both[:4], torch.zeros(4))
    torch.testing.assert_close(both[4:], _inverse([10], [kept], [uses], [RARE_ID], [0.5]))


def _arch(uses: torch.Tensor, kept: torch.Tensor, poolings: list[str]) -> LinearArch:
    arch = LinearArch(["f"], [10], 2, poolings, kept_ids=[kept], id_uses=[uses])
    with torch.no_grad():
        arch.ebc.embedding_bags["t_f"].weight.copy_(torch.randn(10, 4))
    return arch.train()


def test_prior_over_one_epoch_is_one_l2_of_every_used_row() -> None:
    """Two batches of 3 ids [2, 2, 3] and [4, 3, 2] are one epoch; uses 2: 3, 3: 2, 4: 1.
    The penalties add up to Σ_rows |w_row|² / (2σ² B) over the rows read."""
    torch.manual_seed(0)
    kept = torch.tensor([2, 3, 4])
    arch = _arch(torch.tensor([3, 2, 1, 0, 0]), kept, ["sum"])
    prior = UsePrior(arch, prior_std=0.5)
    total = torch.zeros(())
    for ids in ([2, 2, 3], [4, 3, 2]):
        kjt = KeyedJaggedTensor(
            keys=["f"], values=torch.tensor(ids), lengths=torch.ones(3, dtype=torch.int32)
        )
        arch(kjt)
        total = total + prior.take()
    w = arch.ebc.embedding_bags["t_f"].weight.detach()
    expected = w[kept].square().sum() / (2 * 0.5**2 * 3)
    torch.testing.assert_close(total, expected)
    # evaluation forwards record nothing
    arch.eval()
    arch(KeyedJaggedTensor(keys=["f"], values=torch.tensor([2]), lengths=torch.ones(1).int()))
    with pytest.raises(RuntimeError, match="no training forward"):
        prior.take()


def test_unified_prior_over_one_epoch_is_one_l2_of_every_used_row() -> None:
    """The same sum on a Unified Embedding: two features salted into one shared table."""
    torch.manual_seed(0)
    kept = [torch.tensor([2, 3]), torch.tensor([2, 7])]
    uses = [torch.tensor([2, 1, 0, 0]), torch.tensor([1, 2, 0, 0])]
    emb = UnifiedEmbedding(["a", "b"], 64, 4, ["sum", "sum"], kept_ids=kept, id_uses=uses).train()
    prior = UsePrior(emb, prior_std=0.3)
    total = torch.zeros(())
    # one epoch: feature a reads 2, 3, 2 and b reads 7, 2, 7 (the counts above)
    epoch = [([2, 3], [7, 2]), ([2], [7])]
    for a, b in epoch:
        kjt = KeyedJaggedTensor(
            keys=["a", "b"],
            values=torch.tensor(a + b),
            lengths=torch.ones(len(a) + len(b), dtype=torch.int32),
        )
        emb(kjt)
        total = total + prior.take() * len(a)  # undo each batch's 1 / B
    weight = emb.logical_weight()
    rows = torch.cat(
        [salted_hash(k, emb.key_salt[f].expand(len(k)), 64) for f, k in enumerate(kept)]
    ).unique()
    torch.testing.assert_close(total, weight[rows].square().sum() / (2 * 0.3**2))


def test_a_bags_prior_weight_is_the_mean_of_its_rows() -> None:
    """The module's rule for bags (build_model gives multi-hot features no counts)."""
    kept = torch.tensor([2, 3])
    arch = _arch(torch.tensor([4, 1, 0, 0]), kept, ["mean"])
    kjt = KeyedJaggedTensor(
        keys=["f"], values=torch.tensor([2, 3, 2]), lengths=torch.tensor([2, 1, 0])
    )
    out = arch(kjt)
    assert arch.prior_terms is not None
    vectors, weights = arch.prior_terms
    assert vectors is out  # the pooled output, weighted per bag (÷ B = 3)
    torch.testing.assert_close(weights, torch.tensor([[(0.25 + 1.0) / 2], [0.25], [0.0]]) / 3)


def test_prior_config_builds_the_penalty_and_old_runs_say_what_to_do(
    data: Path, tmp_path: Path
) -> None:
    cfg = small_config(data, tmp_path, overrides=["model.linear.prior_std=0.3"])
    spec = fitted_spec(cfg)
    model = build_model(cfg, spec)
    penalties = sparse_penalties(model, cfg)
    assert isinstance(penalties["linear_prior"], UsePrior)
    # one prior weight per row; none on the multi-hot feature (a bag's pooled vector is not
    # its rows: no epoch total to hold), some on every single-id one
    arch = model.linear_arch
    assert arch is not None and arch.inverse_uses is not None
    for f, feature in enumerate(spec.sparse):
        start = int(arch.row_base[f])
        rows = arch.inverse_uses[start : start + int(arch.buckets[f])]
        assert bool((rows > 0).any()) == (feature.kind == "categorical"), feature.name
    assert penalties["linear_prior"].scale == pytest.approx(0.5 / 0.09)
    off = small_config(data, tmp_path / "off", overrides=["model.linear.prior_std=null"])
    assert "linear_prior" not in sparse_penalties(build_model(off, fitted_spec(off)), off)
    spec.id_uses = {}  # a run directory written before use counts
    with pytest.raises(ConfigError, match=r"prior_std.*train a new run"):
        build_model(cfg, spec)


def test_prior_trains_to_smaller_linear_rows(data: Path, tmp_path: Path) -> None:
    norms = {}
    for std in ("null", "0.01"):
        cfg = small_config(
            data,
            tmp_path / std,
            overrides=[f"model.linear.prior_std={std}"],
            training={"epochs": 1, "max_steps_per_epoch": 6},
        )
        train(cfg, tmp_path / std / "run")
        state = torch.load(tmp_path / std / "run" / "checkpoints" / "last.pt", weights_only=False)
        rows = [
            v
            for k, v in state["model"].items()
            if k.startswith("linear_arch.") and "embedding_bags" in k
        ]
        norms[std] = sum(float(v.norm()) for v in rows)
    assert norms["null"] > 0
    assert norms["0.01"] < 0.5 * norms["null"]
