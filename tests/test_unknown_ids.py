"""Unknown ids trained on purpose (issue #16): id dropout, a row of their own for unseen ids,
``auto`` fitted from the valid split and stored in the run, the warning, export parity."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fitted_spec, kjt, small_config, small_data_dir

from mtrec.data.errors import DataWarning
from mtrec.data.hashing import RARE_ID, UNSEEN_ID
from mtrec.data.unknown_ids import (
    AUTO_CAP,
    WARN_MIN_ROWS,
    fit_id_dropout,
    unknown_row_warnings,
    valid_unseen_shares,
)
from mtrec.data.vocab import IdCensus
from mtrec.embeddings.per_feature import FrequencyFilter, PerFeatureEmbedding
from mtrec.embeddings.unified import UnifiedEmbedding, salted_row

KEPT = [torch.tensor([10, 20, 30]), torch.tensor([10, 20, 30])]


def one_hot(keys: list[str], ids: list[list[int]]):
    return kjt(keys, [[[i] for i in col] for col in ids])


def unified(**kw) -> UnifiedEmbedding:
    torch.manual_seed(0)
    return UnifiedEmbedding(["a", "b"], rows=64, dim=4, poolings=["sum", "sum"], **kw)


# ----------------------------------------------------------------------------- the filter


def test_own_row_separates_unseen_from_rare_ids() -> None:
    f = FrequencyFilter(
        2,
        kept_ids=[torch.tensor([10]), torch.tensor([10])],
        seen_ids=[torch.tensor([10, 11]), None],  # "b": kept = seen
        unknown_ids=[UNSEEN_ID, UNSEEN_ID],
    )
    values = torch.tensor([10, 11, 12, 0, 10, 11, 12, 0])
    feature_of = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # a: kept, seen-but-rare, never seen, missing; b has no seen set: outside kept = unseen
    expect = [10, RARE_ID, UNSEEN_ID, 0, 10, UNSEEN_ID, UNSEEN_ID, 0]
    assert f(values, feature_of).tolist() == expect
    rare = FrequencyFilter(2, kept_ids=[torch.tensor([10]), None])
    assert rare(values, feature_of).tolist() == [10, RARE_ID, RARE_ID, 0, 10, 11, 12, 0]


def test_bucket_table_membership_equals_the_binary_search() -> None:
    """The filter tests membership with one gather from a bucket table; it must answer
    exactly as the binary search over the sorted keys, for any int64 (negative ids, the
    padding values, ids sharing a bucket), and a set too large for a table falls back."""
    g = torch.Generator().manual_seed(0)
    kept = [torch.randint(0, 2**62, (n,), generator=g).unique() for n in (3000, 1)]
    kept[0][:10] = (kept[0][:10] >> 14) << 14  # ten ids with the same low bits
    kept = [t.unique() for t in kept]
    table = FrequencyFilter(2, kept, seen_ids=kept)
    assert table.key_table.shape[1] >= 10  # the ten share a row
    crowded = torch.arange(1, 41) << 20  # 40 ids in one row: the binary search instead
    assert FrequencyFilter(1, [crowded]).key_table.numel() == 0
    big = FrequencyFilter(2, kept)
    big.key_table = torch.zeros(0, 0, dtype=torch.int64)  # as for > _TABLE_MAX_KEYS keys
    feature = torch.randint(0, 2, (6000,), generator=g)
    values = torch.randint(-(2**62), 2**62, (6000,), generator=g)
    pick = torch.randint(0, kept[0].numel(), (3000,), generator=g)
    values[:3000] = kept[0][pick]  # members (of feature 0's set)
    values[3000:3100] = torch.arange(100)  # padding values of the first rows
    values[3100:3200] = table.key_table[:100, 0] ^ 1
    for f in (feature, torch.zeros_like(feature)):
        out, want = table(values, f), big(values, f)
        assert torch.equal(out, want)
        key = values ^ table.salts[f]
        member = FrequencyFilter._member(table.keys, table.key_table, key)
        assert torch.equal(member, FrequencyFilter._member(big.keys, big.key_table, key))
    assert 2000 < int((out == values).sum()) < 6000  # both kept and filtered ids occur


def test_dropout_replaces_ids_at_rate_p_only_in_training() -> None:
    emb = PerFeatureEmbedding(
        ["a", "b"], [50, 50], 4, ["sum", "sum"], kept_ids=KEPT, id_dropout=[0.3, 0.0]
    )
    n = 20000
    values = torch.tensor([10, 0] * (n // 2) + [20] * n)
    lengths = torch.ones(2 * n, dtype=torch.int64)
    torch.manual_seed(1)
    emb.train()
    rows, _ = emb.local_rows(values, lengths)
    a = rows[:n]
    dropped = (a == RARE_ID).float()
    assert abs(dropped[0::2].mean().item() - 0.3) < 0.02  # ids of "a" at rate p
    assert (a[1::2] == 0).all()  # missing ids are never dropped
    assert (rows[n:] == 20).all()  # p = 0 for "b"
    torch.manual_seed(1)  # the same seed, the same mask
    assert torch.equal(emb.local_rows(values, lengths)[0], rows)
    emb.eval()
    assert (emb.local_rows(values, lengths)[0][0::2][: n // 2] == 10).all()


def _unknown_row_grad(ids: list[list[int]], p: float, seed: int) -> torch.Tensor:
    """Gradient of feature a's UNSEEN_ID row after one training forward of a sum loss over
    features a, b with id dropout p (every id of ``ids`` is kept: only dropout reaches it)."""
    emb = unified(kept_ids=KEPT, unknown_ids=[UNSEEN_ID, UNSEEN_ID], id_dropout=[p, p]).train()
    torch.manual_seed(seed)
    emb(one_hot(["a", "b"], ids)).sum().backward()
    return emb.ebc.embedding_bags["unified"].weight.grad[salted_row(UNSEEN_ID, "a", 0, 64)]


def test_unknown_row_receives_gradient_from_dropped_ids() -> None:
    """Every id of the batch is kept (seen in training): only dropout reaches UNSEEN_ID's row."""
    ids = [[10, 20, 30, 10] * 8, [10, 20, 30, 20] * 8]
    grads = {p: _unknown_row_grad(ids, p, seed=3) for p in (0.0, 0.5)}
    assert torch.count_nonzero(grads[0.0]) == 0
    assert torch.count_nonzero(grads[0.5]) > 0


def test_unknown_row_gradient_grows_in_proportion_to_p() -> None:
    """METHODS.md: the unknown row receives gradient in proportion to p_f (each dropped id
    adds one use of the row to a sum loss)."""
    n = 4000
    ids = [[10, 20, 30, 10] * (n // 4), [10, 20, 30, 20] * (n // 4)]
    uses = {}
    for p in (0.2, 0.4):
        grad = _unknown_row_grad(ids, p, seed=5)
        assert torch.all(grad == grad[0])  # one use adds 1 to every column
        uses[p] = float(grad[0])
        assert abs(uses[p] / n - p) < 0.03
    assert uses[0.4] / uses[0.2] == pytest.approx(2.0, rel=0.1)


def test_dropout_of_one_is_the_model_without_the_feature() -> None:
    """METHODS.md: with p_f = 1 every id of f reads the unknown row, so f's token is one
    constant vector whatever the id: the model no longer sees feature f."""
    emb = PerFeatureEmbedding(
        ["a", "b"], [50, 50], 4, ["sum", "sum"], kept_ids=KEPT, id_dropout=[1.0, 0.0]
    ).train()
    tokens = emb(one_hot(["a", "b"], [[10, 20, 30, 10], [10, 20, 30, 20]])).detach()
    assert torch.equal(tokens[:, 0], tokens[:1, 0].expand(4, -1))  # a: the same row
    assert not torch.equal(tokens[0, 1], tokens[1, 1])  # b still reads its ids


@pytest.mark.parametrize("kind", ["unified", "per_feature"])
def test_zero_dropout_is_todays_module_exactly(kind: str) -> None:
    """p = 0 builds the filter of before: same outputs, same gradients, no RNG drawn."""

    def build(**kw):
        torch.manual_seed(0)
        if kind == "unified":
            return UnifiedEmbedding(["a", "b"], 64, 4, ["sum", "mean"], kept_ids=KEPT, **kw)
        return PerFeatureEmbedding(["a", "b"], [40, 30], 4, ["sum", "mean"], kept_ids=KEPT, **kw)

    old, new = build(), build(unknown_ids=[RARE_ID, RARE_ID], id_dropout=[0.0, 0.0])
    sparse = kjt(["a", "b"], [[[10], [7, 20], [], [99]], [[30], [5], [10, 11], []]])
    torch.manual_seed(5)
    out_old = old.train()(sparse)
    state = torch.get_rng_state()
    out_new = new.train()(sparse)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out_old, out_new)
    out_old.square().sum().backward()
    out_new.square().sum().backward()
    for (_, p_old), (_, p_new) in zip(old.named_parameters(), new.named_parameters()):
        assert torch.equal(p_old.grad, p_new.grad)


# ------------------------------------------------------------------------- auto, the warning


def census(rows: int, rare: int, singletons: int = 0) -> IdCensus:
    return IdCensus(np.array([10, 20], dtype=np.int64), rows, rare, singletons)


def small_spec(factory: pytest.TempPathFactory, tmp_path: Path, overrides: list[str]):
    cfg = small_config(small_data_dir(factory), tmp_path, overrides)
    return cfg, fitted_spec(cfg)


def test_auto_fits_the_valid_unseen_share_capped(tmp_path_factory, tmp_path: Path) -> None:
    cfg, spec = small_spec(tmp_path_factory, tmp_path, ["model.embedding.id_dropout=auto"])
    names = list(spec.kept_ids)
    assert names == spec.sparse_names and spec.id_dropout == {}  # auto: not fitted yet
    seen = {n: spec.id_census[n].seen for n in names}
    shares = valid_unseen_shares(spec, seen, cfg.dataset.valid, 1000)
    # a hand count of one feature
    import polars as pl

    from mtrec.data.hashing import hash_series

    f = spec.sparse[0]
    if f.kind == "categorical":
        train = hash_series(pl.read_parquet(cfg.dataset.train).get_column(f.source))
        valid = hash_series(pl.read_parquet(cfg.dataset.valid).get_column(f.source))
        valid = valid[valid != 0]
        assert shares[f.name] == pytest.approx(np.mean(~np.isin(valid, train)))
    shares[names[0]] = 0.9  # capped
    shares[names[1]] = float("nan")  # no valid id: Good-Turing on the training ids
    fit_id_dropout(spec, shares)
    assert spec.id_dropout[names[0]] == AUTO_CAP
    c = spec.id_census[names[1]]
    assert spec.id_dropout[names[1]] == pytest.approx(c.singletons / c.rows, abs=1e-4)


def test_warning_names_the_feature_and_the_fix(tmp_path_factory, tmp_path: Path) -> None:
    _, spec = small_spec(tmp_path_factory, tmp_path, ["model.embedding.min_count=10"])
    name = spec.sparse_names[0]
    spec.id_census = {name: census(rows=100_000, rare=9)}
    spec.id_dropout = {name: 0.0}
    msgs = unknown_row_warnings(spec, {name: 0.86, "other": 0.5})
    assert len(msgs) == 2
    assert name in msgs[0] and "~9 ids" in msgs[0] and "id_dropout" in msgs[0]
    assert "'other'" in msgs[1] and "hash onto rows trained for other ids" in msgs[1]
    spec.id_dropout = {name: 0.05}  # 5000 expected dropped ids: trained enough
    assert unknown_row_warnings(spec, {name: 0.86}) == []
    spec.id_dropout = {name: 0.0}
    assert unknown_row_warnings(spec, {name: 0.1}) == []  # few unseen ids in valid
    assert WARN_MIN_ROWS > 9
    # only the deep embedding's unknown rows: the linear term alone (mtrec baseline, or a
    # wide-only feature) reads an unseen id's weight at the prior mean by design; a
    # feature without a filter still hashes unseen ids onto other ids' weights there
    only_linear = unknown_row_warnings(spec, {name: 0.86, "other": 0.5}, deep_features=[])
    assert len(only_linear) == 1 and "'other'" in only_linear[0]


# ------------------------------------------------------------- a run: stored, resumed, exported


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mtrec.train.loop import train

    data = small_data_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("iddrop")
    cfg = small_config(
        data,
        root,
        [
            "model.embedding.id_dropout=auto",
            "model.embedding.unseen=own_row",
            "model.embedding.min_count=3",
            "training.epochs=1",
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        train(cfg, root / "run")
    return root / "run"


def test_run_records_fitted_dropout_and_rebuilds_it(dropout_run: Path) -> None:
    from mtrec.train.loop import load_trained_model

    raw = torch.load(dropout_run / "feature_vocab.pt", weights_only=True)
    _, spec, model = load_trained_model(dropout_run)
    filt = model.sparse_arch.embedding.value_filter
    for i, name in enumerate(spec.sparse_names):
        p = float(raw[f"id_dropout@{name}"])
        assert 0.0 <= p <= AUTO_CAP and spec.id_dropout[name] == p
        assert filt.drop_p[i].item() == pytest.approx(p)
        assert filt.unknown[i].item() == UNSEEN_ID
        assert f"seen@{name}" in raw and len(raw[f"seen@{name}"]) >= len(raw[name])


def test_export_scores_unseen_ids_with_the_trained_unknown_row(
    dropout_run: Path, tmp_path: Path
) -> None:
    from mtrec.export.exporter import PARITY_TOLERANCE, export_run, load_exported
    from mtrec.train.loop import load_trained_model

    summary = export_run(dropout_run, out=tmp_path / "m.pt", parity_rows=128)
    assert summary["parity_max_abs_diff"] <= PARITY_TOLERANCE
    served, _ = load_exported(tmp_path / "m.pt")
    _, spec, model = load_trained_model(dropout_run)
    f = len(spec.sparse_names)
    dense = torch.zeros(1, len(spec.numeric), dtype=torch.float64)
    lengths = torch.ones(f, dtype=torch.int64)

    def score(value: int, at: int = 0) -> torch.Tensor:
        values = torch.zeros(f, dtype=torch.int64)
        values[at] = value
        return served(values, lengths, dense)

    never_seen = [2**62 + 12345, 2**62 + 999]  # no training id (the ids are hashes)
    # both unseen ids read the one unseen row; a seen-but-rare id reads the rare row
    raw = torch.load(dropout_run / "feature_vocab.pt", weights_only=True)
    at, name = next(
        (i, n)
        for i, n in enumerate(spec.sparse_names)
        if len(raw[f"seen@{n}"]) > len(raw[n]) and spec.sparse[i].kind == "categorical"
    )
    rare = int(np.setdiff1d(raw[f"seen@{name}"].numpy(), raw[name].numpy())[0])
    assert torch.equal(score(never_seen[0], at), score(never_seen[1], at))
    assert not torch.equal(score(never_seen[0], at), score(rare, at))
    # the eager model's score of UNSEEN_ID itself (clients cannot send it: ids are >= 0)
    ids = [[[UNSEEN_ID]] if i == at else [[0]] for i in range(f)]  # 0: missing, as served
    with torch.no_grad():
        eager = model.predict(kjt(spec.sparse_names, ids), dense)
    torch.testing.assert_close(score(never_seen[0], at), eager, rtol=0, atol=PARITY_TOLERANCE)


@pytest.mark.parametrize(
    ("value", "message"),
    [("1.5", "must be in \\[0, 1\\)"), ("often", "expected float or one of 'auto'")],
)
def test_bad_id_dropout_names_the_key(tmp_path_factory, tmp_path: Path, value, message) -> None:
    from mtrec.config import ConfigError

    with pytest.raises(ConfigError, match=f"model.embedding.id_dropout: {message}"):
        small_config(
            small_data_dir(tmp_path_factory), tmp_path, [f"model.embedding.id_dropout={value}"]
        )


@pytest.mark.parametrize("linear_drops", [False, True])
@pytest.mark.parametrize("embedding", ["unified", "per_feature"])
def test_embedding_and_linear_term_filter_ids_once(
    tmp_path_factory, tmp_path: Path, embedding: str, linear_drops: bool
) -> None:
    """The deep embedding and the linear term filter a training batch's ids once. With
    ``model.linear.id_dropout: true`` both read the same dropped ids (a dropped id is cold
    for both); off (the default) only the embedding's ids are dropped and the linear term
    reads every kept id. In eval mode the logits equal those of filtering separately."""
    from mtrec.data.batcher import iter_batches
    from mtrec.model import build_model

    cfg, spec = small_spec(
        tmp_path_factory,
        tmp_path,
        [
            f"model.embedding.type={embedding}",
            "model.embedding.min_count=3",
            "model.linear.enabled=true",
            f"model.linear.id_dropout={str(linear_drops).lower()}",
        ],
    )
    spec.id_dropout = {name: 0.5 for name in spec.kept_ids}  # drop half of the ids
    torch.manual_seed(0)
    model = build_model(cfg, spec)
    assert model.shared_filter and model.linear_arch is not None and model.sparse_arch is not None
    assert model.linear_drops is linear_drops
    shared = model.sparse_arch.embedding.value_filter
    assert shared.dropping
    assert (model.linear_arch.value_filter is shared) is linear_drops
    assert model.linear_arch.value_filter.dropping is linear_drops
    batch = next(iter(iter_batches(cfg.dataset.valid, spec, 64, shuffle=False)))

    calls: list[torch.Tensor] = []
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    original = shared.filter_bags
    shared.filter_bags = lambda v, *rest: calls.append(v) or original(v, *rest)  # type: ignore[method-assign]
    hooks = [
        part.register_forward_pre_hook(lambda m, a, key=key: seen.__setitem__(key, a[1]))
        for key, part in (("deep", model.sparse_arch), ("linear", model.linear_arch))
    ]
    model.train()
    model.forward_with_aux(batch.sparse, batch.dense)
    for hook in hooks:
        hook.remove()
    assert len(calls) == 1  # filtered once for both
    deep_ids, linear_ids = seen["deep"][0], seen["linear"][0]
    with torch.no_grad():
        model.eval()
        filtered = shared.filter_bags(batch.sparse.values(), batch.sparse.lengths())[0]
    raw = batch.sparse.values()
    dropped = (deep_ids != filtered) & (raw != 0)
    assert 0.2 < float(dropped.double().mean()) < 0.8  # id dropout did run on the embedding
    if linear_drops:
        assert linear_ids is deep_ids
    else:
        assert torch.equal(linear_ids, filtered)  # every kept id, none dropped
    # the embedding's mask is the one draw the old shared filter made: same seed, same ids
    model.train()
    torch.manual_seed(7)
    model.forward_with_aux(batch.sparse, batch.dense)
    after_forward = torch.rand(1)
    torch.manual_seed(7)
    expected = original(batch.sparse.values(), batch.sparse.lengths())[0]
    assert torch.equal(torch.rand(1), after_forward)  # no other draw in the forward
    hook = model.sparse_arch.register_forward_pre_hook(lambda m, a: seen.__setitem__("again", a[1]))
    torch.manual_seed(7)
    model.forward_with_aux(batch.sparse, batch.dense)
    hook.remove()
    assert torch.equal(seen["again"][0], expected)
    # the linear term's prior counts every use of a kept id when it keeps them: its
    # 1 / uses per row are those of a model without id dropout
    spec.id_dropout = {name: 0.0 for name in spec.kept_ids}
    undropped = build_model(cfg, spec).linear_arch
    assert undropped is not None and undropped.inverse_uses is not None
    same = torch.equal(model.linear_arch.inverse_uses, undropped.inverse_uses)
    assert same is not linear_drops

    model.eval()
    with torch.no_grad():
        shared_logits = model(batch.sparse, batch.dense)
        apart = model.task_arch.forward_with_aux(
            model.sparse_tokens(batch.sparse), batch.dense, model.linear_ids(batch.sparse)
        )[0]
    torch.testing.assert_close(shared_logits, apart, rtol=0, atol=0)
