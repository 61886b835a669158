"""UnifiedEmbedding: salted hash, feature multiplexing, pooling, projection, fusing, config."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from helpers import first_batch, fitted_spec, kjt, seeded, small_config, small_data_dir
from torch import nn
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mtrec.config import ConfigError, ExperimentConfig, parse_config
from mtrec.data.hashing import RARE_ID
from mtrec.embeddings.per_feature import PerFeatureEmbedding
from mtrec.embeddings.unified import UnifiedEmbedding, chunk_salt, salted_hash, salted_row
from mtrec.model import build_model
from mtrec.train.optim import fuse_sparse_optimizer, make_dense_optimizer

MASK64 = (1 << 64) - 1
BIG = 6_917_529_027_641_081_856  # a stable-hash sized id (< 2**63)


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def one_hot(keys: list[str], ids: list[list[int]]) -> KeyedJaggedTensor:
    return kjt(keys, [[[i] for i in col] for col in ids])


def unified(
    names: list[str] = ("a", "b", "c"),  # type: ignore[assignment]
    rows: int = 60,
    dim: int = 8,
    poolings: list[str] | None = None,
    chunks: list[int] | None = None,
    chunk_dim: int = 4,
    num_tables: int = 1,
    seed: int = 0,
    **kw: object,
) -> UnifiedEmbedding:
    names = list(names)
    torch.manual_seed(seed)
    return UnifiedEmbedding(
        names,
        rows,
        dim,
        poolings or ["sum"] * len(names),
        chunks=chunks if chunks is not None else [1, 2, 3][: len(names)],
        chunk_dim=chunk_dim,
        num_tables=num_tables,
        **kw,  # type: ignore[arg-type]
    )


# (chunks, chunk_dim) of features a, b, c at dim 8, covering both bag orders
LAYOUTS = {
    # key-major: k=1 and k=3 projected, k=2 passed through (two chunks concatenated)
    "mixed": ([1, 2, 3], 4),
    # batch-major: every feature two chunks of 4 = 8 wide, no projection
    "uniform": ([2, 2, 2], 4),
    # batch-major: one chunk of 8 each (the default k=1, d_c=d)
    "single": ([1, 1, 1], 8),
    # key-major: one projected group, no reordering
    "projected": ([1, 1, 1], 4),
}


def layout(name: str, **kw: object) -> UnifiedEmbedding:
    chunks, chunk_dim = LAYOUTS[name]
    return unified(chunks=chunks, chunk_dim=chunk_dim, **kw)  # type: ignore[arg-type]


def logical_table(emb: UnifiedEmbedding) -> torch.Tensor:
    """M x d_c logical table: row r is row r // n of physical table r % n."""
    n = emb.num_tables
    if n == 1:
        return emb.ebc.embedding_bags["unified"].weight.detach().clone()
    parts = [emb.ebc.embedding_bags[f"unified_{t}"].weight.detach() for t in range(n)]
    out = torch.empty(emb.rows, emb.chunk_dim)
    for t, w in enumerate(parts):
        out[t::n] = w
    return out


def chunk_vector(
    emb: UnifiedEmbedding, table: torch.Tensor, f: int, ids: list[int]
) -> torch.Tensor:
    """Expected k_i·d_c vector of feature ``f`` for one bag of ``ids`` (sum pooled)."""
    name = emb.feature_names[f]
    parts = []
    for j in range(emb.chunks[f]):
        if ids:
            parts.append(table[[salted_row(v, name, j, emb.rows) for v in ids]].sum(0))
        else:
            parts.append(torch.zeros(emb.chunk_dim))
    return torch.cat(parts)


def project(emb: UnifiedEmbedding, f: int, vec: torch.Tensor) -> torch.Tensor:
    """Apply feature ``f``'s projection (identity when k_i·d_c == dim)."""
    k = emb.chunks[f]
    if k * emb.chunk_dim == emb.dim:
        return vec
    group = emb.groups[sorted(set(emb.chunks)).index(k)]
    pos = [g for g in range(emb.num_features) if emb.chunks[g] == k].index(f)
    return vec @ group.linear.weight[pos].detach() + group.linear.bias[pos, 0].detach()


def rows_by_key(emb: UnifiedEmbedding, sparse: KeyedJaggedTensor) -> dict[str, list[int]]:
    """Logical rows each (feature, chunk) key looks up, in batch order."""
    by_name = sparse.to_dict()
    out = {}
    for f, name in enumerate(emb.feature_names):
        ids = by_name[name].values().tolist()
        for j in range(emb.chunks[f]):
            out[f"{name}@{j}"] = [salted_row(v, name, j, emb.rows) for v in ids]
    return out


# ------------------------------------------------------------------------------ hash


def test_salted_hash_matches_reference_and_golden_values() -> None:
    rows = 1_000_003
    # pinned: serving clients and old checkpoints depend on these exact rows
    assert chunk_salt("user_id", 0) & MASK64 == 0xF1646B009B5A4895
    assert chunk_salt("user_id", 1) & MASK64 == 0x2E9D20D91B15E2E3
    golden = {
        0: (310360, 645865, 181443),
        2: (71515, 236262, 391256),
        12345: (914495, 167532, 318359),
        2**63 - 1: (471959, 135274, 623195),
        -1: (341831, 366602, 412028),
    }
    for v, (u0, u1, c0) in golden.items():
        assert (salted_row(v, "user_id", 0, rows), salted_row(v, "user_id", 1, rows)) == (u0, u1)
        assert salted_row(v, "c7", 0, rows) == c0
    # the vectorised int64 torch version equals the reference, including the sign edge cases
    g = seeded(0)
    values = torch.cat(
        [
            torch.tensor([0, 1, 2, -1, 2**63 - 1, -(2**63), BIG, 12345], dtype=torch.int64),
            torch.randint(-(2**63), 2**63 - 1, (2000,), generator=g, dtype=torch.int64),
        ]
    )
    for name, chunk, m in (("user_id", 0, rows), ("c7", 2, 97), ("x", 1, 1)):
        salts = torch.full_like(values, chunk_salt(name, chunk))
        got = salted_hash(values, salts, m)
        assert got.min() >= 0 and got.max() < m
        assert got.tolist() == [salted_row(v, name, chunk, m) for v in values.tolist()]
    scripted = torch.jit.script(salted_hash)
    exact(scripted(values, salts, 97), salted_hash(values, salts, 97))


def test_hash_spreads_ids_uniformly_over_rows() -> None:
    m = 128
    emb = unified(["a"], rows=m, dim=4, chunks=[1], chunk_dim=4)
    g = seeded(1)
    n = m * 200
    # sequential small ids (structured) and random stable-id sized ones
    for ids in (torch.arange(n), torch.randint(2, 2**62, (n,), generator=g)):
        sparse = KeyedJaggedTensor(
            keys=["a"], values=ids, lengths=torch.ones(n, dtype=torch.int32), stride=n
        )
        rows, _ = emb.lookup(sparse)
        counts = torch.bincount(rows, minlength=m).double()
        expected = n / m
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        # chi-square with m - 1 = 127 degrees of freedom: mean 127, sd ~16
        assert chi2 < 127 + 6 * 16, chi2
        assert counts.min() > 0


def test_salts_separate_features_and_chunks() -> None:
    m = 10_007
    emb = unified(["a", "b"], rows=m, dim=8, chunks=[2, 1], chunk_dim=4)
    ids = list(range(2, 2002))
    sparse = one_hot(["a", "b"], [ids, ids])
    by_key = rows_by_key(emb, sparse)
    rows, _ = emb.lookup(sparse)
    # the module's rows are the reference's, bags in (feature, row, chunk) order,
    # features sorted by chunk count (b: 1 chunk, then a: 2 chunks)
    assert not emb.batch_major
    order = [("b", 0, r) for r in range(len(ids))]
    order += [("a", j, r) for r in range(len(ids)) for j in range(2)]
    expected = [by_key[f"{f}@{j}"][r] for f, j, r in order]
    assert rows.tolist() == expected
    for k1, k2 in (("a@0", "a@1"), ("a@0", "b@0"), ("a@1", "b@0")):
        same = sum(x == y for x, y in zip(by_key[k1], by_key[k2]))
        assert same <= 5, (k1, k2, same)  # ~ len(ids) / m = 0.2 expected
    out = emb(sparse)
    # the same raw id embeds differently in two features
    assert (out[:, 0] != out[:, 1]).any(1).all()


def test_lookup_is_deterministic_and_independent_of_the_seed() -> None:
    sparse = one_hot(["a", "b", "c"], [[5, BIG, -3], [5, 7, 0], [1, 2, 3]])
    a, b, c = unified(seed=1), unified(seed=1), unified(seed=2)
    ra, rb, rc = a.lookup(sparse), b.lookup(sparse), c.lookup(sparse)
    for x, y in zip(ra, rb):
        exact(x, y)
    for x, y in zip(ra, rc):
        exact(x, y)  # rows depend on ids and names only, never on the RNG
    exact(a(sparse), b(sparse))
    assert not torch.equal(a(sparse), c(sparse))


# ------------------------------------------------------------------- layout and values


@pytest.mark.parametrize("num_tables", [1, 3])
def test_parameter_count_is_rows_times_chunk_dim(num_tables: int) -> None:
    for names, chunks in ((["a"], [1]), (["a", "b", "c"], [1, 2, 3]), (list("abcdefgh"), [3] * 8)):
        emb = unified(names, rows=300, chunks=chunks, chunk_dim=4, num_tables=num_tables)
        table_params = sum(p.numel() for p in emb.ebc.parameters())
        assert table_params == emb.num_table_parameters() == 300 * 4
        configs = emb.ebc.embedding_bag_configs()
        assert len(configs) == num_tables
        assert {c.num_embeddings for c in configs} == {300 // num_tables}
        # one KJT key per physical table, one bag per (feature, chunk) key and row
        assert [k for c in configs for k in c.feature_names] == emb.kjt_keys
        assert len(emb.kjt_keys) == num_tables and emb.num_keys == sum(chunks)
        assert emb.feature_widths == [4 * k for k in chunks]


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("num_tables", [1, 3])
def test_tokens_are_projected_concatenations_of_salted_rows(num_tables: int, name: str) -> None:
    emb = layout(name, rows=60, num_tables=num_tables).eval()
    assert emb.batch_major == (name in ("uniform", "single"))
    ids = [[3, BIG, -7, 3], [3, 11, 0, 2**62], [3, 12, 13, 5]]
    sparse = one_hot(["a", "b", "c"], ids)
    table = logical_table(emb)
    pooled = emb.pooled_chunks(sparse)
    assert pooled.shape == (4, sum(emb.feature_widths))
    out = emb(sparse)
    assert out.shape == (4, 3, 8)
    # pooled columns follow key_names: features sorted by chunk count
    starts, col = {}, 0
    for key in emb.key_names:
        starts.setdefault(key.split("@")[0], col)
        col += emb.chunk_dim
    for f, name in enumerate(emb.feature_names):
        width = emb.feature_widths[f]
        for r in range(4):
            vec = chunk_vector(emb, table, f, [ids[f][r]])
            assert vec.numel() == emb.chunks[f] * emb.chunk_dim
            torch.testing.assert_close(pooled[r, starts[name] : starts[name] + width], vec)
            torch.testing.assert_close(out[r, f], project(emb, f, vec), rtol=1e-5, atol=1e-6)
        if width == emb.dim:  # passed through unchanged
            exact(out[:, f], pooled[:, starts[name] : starts[name] + width])
    # the same logical rows whatever the physical split (a projected field goes through a
    # batched GEMM in the model and a single-row one here: equal up to GEMM rounding)
    torch.testing.assert_close(
        out[0, 0], project(emb, 0, chunk_vector(emb, table, 0, [3])), rtol=1e-6, atol=1e-7
    )


def test_num_tables_split_is_the_same_logical_table() -> None:
    one = unified(rows=60, num_tables=1)
    split = unified(rows=60, num_tables=4)
    split.load_state_dict(
        {k: v for k, v in one.state_dict().items() if not k.startswith("ebc.")}, strict=False
    )
    table = logical_table(one)
    with torch.no_grad():
        for t in range(4):
            split.ebc.embedding_bags[f"unified_{t}"].weight.copy_(table[t::4])
    sparse = kjt(["a", "b", "c"], [[[1, 2], [], [3]], [[4], [5, 6, 7], [8]], [[9], [9], []]])
    torch.testing.assert_close(split(sparse), one(sparse), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("num_tables", [1, 2])
@pytest.mark.parametrize("chunks", [[1, 2], [2, 2]])
def test_multi_hot_pools_per_chunk(pooling: str, num_tables: int, chunks: list[int]) -> None:
    emb = unified(
        ["a", "b"], rows=40, dim=8, poolings=["sum", pooling], chunks=chunks, num_tables=num_tables
    )
    assert emb.batch_major == (chunks == [2, 2])
    rows_b = [[1, 4, 4], [], [5], [0, 6, BIG]]
    sparse = kjt(["a", "b"], [[[1], [2], [3], [4]], rows_b])
    out = emb(sparse)
    table = logical_table(emb)
    for r, ids in enumerate(rows_b):
        vec = chunk_vector(emb, table, 1, ids)
        if pooling == "mean" and ids:
            vec = vec / len(ids)
        torch.testing.assert_close(out[r, 1], vec, rtol=1e-6, atol=1e-6)
    exact(out[1, 1], torch.zeros(8))  # empty bag
    exact(torch.jit.script(emb)(sparse), out)


def test_unseen_and_extreme_ids_embed_without_error() -> None:
    emb = unified(rows=7, num_tables=1)
    extreme = [0, 1, -1, 2**63 - 1, -(2**63), BIG]
    sparse = one_hot(["a", "b", "c"], [extreme, extreme[::-1], extreme])
    for module in (emb, torch.jit.script(emb)):
        out = module(sparse)
        assert out.shape == (6, 3, 8) and torch.isfinite(out).all()
    rows, _ = emb.lookup(sparse)
    assert rows.min() >= 0 and rows.max() < 7


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("num_tables", [1, 3])
def test_eager_equals_script(num_tables: int, name: str) -> None:
    kept = [torch.tensor([3, 10, 11]), None, torch.tensor([5])]
    emb = layout(
        name,
        rows=90,
        poolings=["sum", "mean", "mean"],
        num_tables=num_tables,
        kept_ids=kept,
    ).eval()
    scripted = torch.jit.script(emb)
    g = seeded(2)
    lengths = torch.randint(0, 4, (3 * 16,), generator=g, dtype=torch.int32)
    values = torch.randint(0, 20, (int(lengths.sum()),), generator=g)
    sparse = KeyedJaggedTensor(keys=["a", "b", "c"], values=values, lengths=lengths, stride=16)
    exact(scripted(sparse), emb(sparse))
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    exact(torch.jit.load(buf)(sparse), emb(sparse))


def test_frequency_filter_applies_before_salting() -> None:
    emb = unified(["a", "b"], rows=50, chunks=[2, 1], kept_ids=[torch.tensor([10, 20]), None])
    table = logical_table(emb)
    sparse = one_hot(["a", "b"], [[10, 30, 0, RARE_ID], [30, 30, 30, 30]])
    out = emb(sparse)
    # unkept id 30 of "a" shares the RARE_ID embedding; missing (0) and kept ids pass
    exact(out[1, 0], out[3, 0])
    torch.testing.assert_close(out[0, 0], chunk_vector(emb, table, 0, [10]))
    torch.testing.assert_close(out[1, 0], chunk_vector(emb, table, 0, [RARE_ID]))
    torch.testing.assert_close(out[2, 0], chunk_vector(emb, table, 0, [0]))
    # "b" is not filtered: 30 keeps its own rows
    ref = project(emb, 1, chunk_vector(emb, table, 1, [30]))
    torch.testing.assert_close(out[1, 1], ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- gradients, fusing


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("num_tables", [1, 2])
def test_gradient_reaches_only_looked_up_rows(num_tables: int, name: str) -> None:
    emb = layout(name, rows=1000, num_tables=num_tables)
    sparse = kjt(["a", "b", "c"], [[[3], [53], []], [[1, 41], [], [7]], [[BIG], [9], [9]]])
    out = emb(sparse)
    (out * torch.randn(out.shape, generator=seeded(4))).sum().backward()
    expected = {r for rows in rows_by_key(emb, sparse).values() for r in rows}
    touched = set()
    for t in range(num_tables):
        name = "unified" if num_tables == 1 else f"unified_{t}"
        grad = emb.ebc.embedding_bags[name].weight.grad
        assert grad is not None
        grad = grad.to_dense() if grad.is_sparse else grad
        local = (grad != 0).any(1).nonzero().flatten().tolist()
        touched |= {r * num_tables + t for r in local}
    assert touched == expected
    for group in emb.groups:
        for p in group.parameters():
            assert p.grad is not None and (p.grad != 0).any()


class Holder(nn.Module):
    def __init__(self, emb: nn.Module) -> None:
        super().__init__()
        self.emb = emb


def fuse(module: nn.Module, lr: float = 0.05) -> nn.Module:
    cfg = parse_config(
        {
            "dataset": {"train": "x"},
            "features": [{"name": "a", "kind": "categorical"}],
            "tasks": [{"name": "t"}],
            "model": {"embedding": {"learning_rate": lr}},
        }
    )
    return fuse_sparse_optimizer(module, cfg)


@pytest.mark.parametrize("name", ["mixed", "uniform"])
@pytest.mark.parametrize("num_tables", [1, 2])
def test_fused_adagrad_updates_only_looked_up_rows_and_round_trips(
    num_tables: int, name: str
) -> None:
    pools = ["sum", "mean", "sum"]
    plain = layout(name, rows=1000, poolings=pools, num_tables=num_tables)
    fused = fuse(Holder(copy.deepcopy(plain)))
    femb = fused.emb
    assert isinstance(femb.ebc, FusedEmbeddingBagCollection)
    sparse = kjt(["a", "b", "c"], [[[3], [53], []], [[1, 41], [], [7]], [[BIG], [9], [9]]])
    with torch.no_grad():
        # fast path (direct TBE call) == the fused collection's own forward == plain
        rows, lengths = femb.lookup(sparse)
        fast = femb._fused_pool(rows, lengths)
        assert fast is not None
        exact(fast, femb.ebc(femb.lookup_kjt(sparse)).values())
        torch.testing.assert_close(femb(sparse), plain(sparse), rtol=0, atol=1e-6)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    dense = [p for n, p in fused.named_parameters() if not n.startswith("emb.ebc.")]
    assert bool(dense) == (name == "mixed")  # projections are the only dense parameters
    out = femb(sparse)
    (out * torch.randn(out.shape, generator=seeded(5))).sum().backward()  # Adagrad runs here
    with torch.no_grad():
        for p in dense:
            p -= 0.01 * p.grad
    after = fused.state_dict()
    assert after.keys() == before.keys()
    expected = {r for rs in rows_by_key(plain, sparse).values() for r in rs}
    changed = set()
    for t in range(num_tables):
        key = "emb.ebc.embedding_bags." + ("unified" if num_tables == 1 else f"unified_{t}")
        diff = (after[key + ".weight"] != before[key + ".weight"]).any(1)
        changed |= {r * num_tables + t for r in diff.nonzero().flatten().tolist()}
    assert changed and changed <= expected
    # checkpoint round trip: fused -> plain -> fused
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    restored = layout(name, rows=1000, poolings=pools, num_tables=num_tables, seed=9)
    restored.load_state_dict({k.removeprefix("emb."): v for k, v in state.items()})
    other = layout(name, rows=1000, poolings=pools, num_tables=num_tables, seed=8)
    refused = fuse(Holder(other))
    refused.load_state_dict(state)
    with torch.no_grad():
        ref = femb(sparse)
        torch.testing.assert_close(restored(sparse), ref, rtol=0, atol=1e-6)
        exact(refused.emb(sparse), ref)


def test_state_dict_round_trip() -> None:
    a = unified(rows=64, num_tables=2, seed=1)
    b = unified(rows=64, num_tables=2, seed=2)
    sparse = one_hot(["a", "b", "c"], [[1, 2], [3, 4], [5, 6]])
    assert not torch.equal(a(sparse), b(sparse))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    exact(a(sparse), b(sparse))
    assert set(a.state_dict()) == {
        "ebc.embedding_bags.unified_0.weight",
        "ebc.embedding_bags.unified_1.weight",
        "groups.0.linear.weight",
        "groups.0.linear.bias",
        "groups.2.linear.weight",
        "groups.2.linear.bias",
    }


# ------------------------------------------------------------------------ config, model

BASE = {
    "dataset": {"train": "x"},
    "features": [
        {"name": "user_id", "kind": "categorical"},
        {"name": "tags", "kind": "multi_hot", "pooling": "mean"},
        {"name": "age", "kind": "numeric"},
    ],
    "tasks": [{"name": "click"}],
}


def with_embedding(**emb: object) -> dict:
    raw = copy.deepcopy(BASE)
    raw["model"] = {"embedding": emb}
    return raw


def test_config_accepts_unified_options() -> None:
    cfg = parse_config(with_embedding(type="unified", rows=1000, chunk_dim=8, chunks={"tags": 2}))
    emb = cfg.model.embedding
    assert (emb.type, emb.rows, emb.chunk_dim, emb.chunks, emb.num_tables) == (
        "unified",
        1000,
        8,
        {"tags": 2},
        1,
    )
    # unified is the default; per_feature stays selectable
    assert parse_config(copy.deepcopy(BASE)).model.embedding.type == "unified"


UNKNOWN = "model.embedding.chunks.user_i: unknown feature; did you mean 'user_id'?"


@pytest.mark.parametrize(
    ("emb", "message"),
    [
        ({"chunks": {"user_i": 2}}, UNKNOWN),
        ({"chunks": {"age": 2}}, "model.embedding.chunks.age: 'age' is numeric"),
        ({"chunks": {"tags": 0}}, "model.embedding.chunks.tags: must be > 0, got 0"),
        ({"rows": 0}, "model.embedding.rows: must be > 0, got 0"),
        ({"rows": -5}, "model.embedding.rows: must be > 0"),
        ({"chunk_dim": 0}, "model.embedding.chunk_dim: must be > 0, got 0"),
        ({"num_tables": 0}, "model.embedding.num_tables: must be > 0, got 0"),
        ({"rows": 10, "num_tables": 3}, "must be a multiple of model.embedding.num_tables (3)"),
        ({"type": "unifed"}, "did you mean 'unified'?"),
        ({"chunks": {"tags": "two"}}, "model.embedding.chunks.tags: expected int"),
    ],
)
def test_config_validation_errors(emb: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(with_embedding(**{"type": "unified", **emb}), source="exp.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("exp.yaml: ")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data_dir(tmp_path_factory)


UNIFIED_MODEL = {"embedding": {"type": "unified", "rows": 600, "chunk_dim": 4, "num_tables": 1}}


def test_build_model_selects_the_embedding_by_type(data: Path, tmp_path: Path) -> None:
    chunks = "model.embedding.chunks={c7: 3, user_id: 2}"  # a YAML flow mapping on --set
    cfg = small_config(data, tmp_path, model=UNIFIED_MODEL, overrides=[chunks])
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, spec).eval()
    emb = model.sparse_embedding
    assert isinstance(emb, UnifiedEmbedding)
    assert emb.feature_names == spec.sparse_names
    assert emb.num_table_parameters() == 600 * 4
    assert emb.chunks == [3 if f == "c7" else 2 if f == "user_id" else 1 for f in spec.sparse_names]
    batch = first_batch(cfg, spec, rows=64)
    with torch.no_grad():
        eager = model(batch.sparse, batch.dense)
        exact(torch.jit.script(model)(batch.sparse, batch.dense), eager)
    assert eager.shape == (64, len(cfg.tasks)) and torch.isfinite(eager).all()
    # rows default: the per-feature budget, rounded up to a multiple of num_tables
    cfg2 = small_config(data, tmp_path, model={"embedding": {"type": "unified", "num_tables": 7}})
    emb2 = build_model(cfg2, spec).sparse_embedding
    total = sum(f.buckets or cfg2.model.embedding.buckets for f in spec.sparse)
    assert isinstance(emb2, UnifiedEmbedding) and emb2.rows % 7 == 0
    assert total <= emb2.rows < total + 7
    assert isinstance(
        build_model(small_config(data, tmp_path), spec).sparse_embedding, UnifiedEmbedding
    )
    baseline = small_config(data, tmp_path, model={"embedding": {"type": "per_feature"}})
    assert isinstance(build_model(baseline, spec).sparse_embedding, PerFeatureEmbedding)


def test_train_and_export_a_unified_model(data: Path, tmp_path: Path) -> None:
    from mtrec.export.exporter import PARITY_TOLERANCE, export_run, load_exported
    from mtrec.train.checkpoint import best_path, load_checkpoint
    from mtrec.train.loop import load_trained_model, train

    model_cfg = {"embedding": {**UNIFIED_MODEL["embedding"], "num_tables": 2, "chunks": {"c7": 3}}}
    cfg = small_config(
        data, tmp_path, model=model_cfg, training={"epochs": 1, "max_steps_per_epoch": 8}
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["epochs_run"] == 1
    # the fused checkpoint loads into the plain (scriptable) model
    state = load_checkpoint(best_path(tmp_path / "run"))["model"]
    _, spec, model = load_trained_model(tmp_path / "run")
    emb = model.sparse_embedding
    assert isinstance(emb, UnifiedEmbedding) and emb.num_tables == 2
    assert emb.value_filter.active  # the synthetic config's min_count: kept ids were fitted
    for t in range(2):
        weight = emb.ebc.embedding_bags[f"unified_{t}"].weight.detach()
        assert weight.shape == (300, 4)
        exact(state[f"sparse_arch.embedding.ebc.embedding_bags.unified_{t}.weight"], weight)
    # training moved the shared table away from its initialisation
    torch.manual_seed(cfg.seed)
    fresh = build_model(cfg, spec).sparse_embedding
    assert isinstance(fresh, UnifiedEmbedding)
    assert not torch.equal(logical_table(fresh), logical_table(emb))
    out = export_run(tmp_path / "run")
    assert out["parity_max_abs_diff"] <= PARITY_TOLERANCE
    scripted, signature = load_exported(out["model"])
    batch = first_batch(cfg, spec, rows=32)
    with torch.no_grad():
        eager = torch.sigmoid(model(batch.sparse, batch.dense))
        served = scripted(batch.sparse.values(), batch.sparse.lengths(), batch.dense)
    torch.testing.assert_close(served, eager, rtol=0, atol=PARITY_TOLERANCE)
    assert [f["name"] for f in signature["sparse_features"]] == spec.sparse_names


def test_make_dense_optimizer_covers_projections_not_the_table() -> None:
    holder = fuse(Holder(unified(rows=60)))
    cfg: ExperimentConfig = parse_config(copy.deepcopy(BASE))
    opt = make_dense_optimizer(holder, cfg)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    names = {n for n, p in holder.named_parameters() if id(p) in in_opt}
    assert names == {f"emb.groups.{g}.linear.{w}" for g in (0, 2) for w in ("weight", "bias")}


def test_resume_of_a_unified_run_reproduces_it(data: Path, tmp_path: Path) -> None:
    """The fused row-wise Adagrad state of the shared table survives a checkpoint."""
    from mtrec.train.checkpoint import load_checkpoint
    from mtrec.train.loop import train

    model_cfg = {"embedding": {**UNIFIED_MODEL["embedding"], "chunks": {"c7": 2}}}
    training = {"epochs": 2, "max_steps_per_epoch": 4}
    cfg = small_config(data, tmp_path, model=model_cfg, training=training)
    straight = train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b", stop_after_epochs=1)
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert straight["valid"] == resumed["valid"]
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        exact(a["model"][k], b["model"][k])
    # the shared table's and the linear term's fused optimizers
    assert len(a["sparse_optimizer"]) == 2
    for sparse_state in a["sparse_optimizer"].values():
        assert sparse_state["state"], "no row-wise Adagrad state was checkpointed"


def test_every_shipped_config_uses_unified_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtrec.config import load_config
    from mtrec.data.synthetic import synthesize

    # the configs `mtrec data synth` writes (the demo's and the criteo-like bench's)
    synthesize(tmp_path / "synth", rows=200)
    synthesize(tmp_path / "criteo", rows=200, preset="criteo-like")
    for written in ("synth", "criteo"):
        assert load_config(tmp_path / written / "config.yaml").model.embedding.type == "unified"
    # configs/census_kdd/* read ${MTREC_DATA_DIR}; configs/synthetic/* extend the demo data
    monkeypatch.setenv("MTREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MTREC_SYNTH_DIR", str(tmp_path / "synth"))
    shipped = sorted(Path(__file__).parent.parent.glob("configs/**/*.yaml"))
    assert len(shipped) >= 9
    for path in shipped:
        assert load_config(path).model.embedding.type == "unified", path
