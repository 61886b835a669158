"""Model blocks: seeded numeric checks, each run eager and through ``torch.jit.script``."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import first_batch, fitted_spec, kjt, seeded, small_config, small_data_dir
from torch import nn

from mtrec.config import ExperimentConfig
from mtrec.data.batch import Batch
from mtrec.data.spec import FeatureSpec
from mtrec.embeddings.numeric import NumericEmbedding, NumericNormalizer
from mtrec.embeddings.per_feature import PerFeatureEmbedding
from mtrec.model import MultiTaskModel, build_model
from mtrec.multitask.mmoe import MMoE, SharedBottom
from mtrec.multitask.towers import TaskTowers
from mtrec.nn.layers import GroupedLinear
from mtrec.train.losses import WeightedBCELoss
from mtrec.train.optim import fuse_sparse_optimizer, make_dense_optimizer


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExperimentConfig, FeatureSpec, Batch]:
    data = small_data_dir(tmp_path_factory)
    # the per-feature baseline's layout (UnifiedEmbedding has tests/test_unified.py)
    cfg = small_config(
        data, tmp_path_factory.mktemp("model_cfg"), model={"embedding": {"type": "per_feature"}}
    )
    spec = fitted_spec(cfg)
    return cfg, spec, first_batch(cfg, spec, rows=64)


def build(cfg: ExperimentConfig, spec: FeatureSpec, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_model(cfg, spec)


def with_multitask(cfg: ExperimentConfig, **kw: object) -> ExperimentConfig:
    import copy

    out = copy.deepcopy(cfg)
    for k, v in kw.items():
        setattr(out.model.multitask, k, v)
    return out


# ----------------------------------------------------------------------------- full model


@pytest.mark.parametrize(
    ("block", "act", "dropout"),
    [("mmoe", "relu", 0.0), ("mmoe", "silu", 0.2), ("shared_bottom", "gelu", 0.1)],
)
def test_model_eager_equals_script(setup, block: str, act: str, dropout: float) -> None:
    cfg, spec, batch = setup
    cfg = with_multitask(cfg, type=block, activation=act, dropout=dropout)
    model = build(cfg, spec).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        eager = model(batch.sparse, batch.dense)
        script = scripted(batch.sparse, batch.dense)
        probs = scripted.predict(batch.sparse, batch.dense)
    assert eager.shape == (batch.batch_size, len(cfg.tasks))
    assert torch.isfinite(eager).all()
    exact(eager, script)
    exact(probs, torch.sigmoid(eager))
    # different rows give different logits (the model actually reads its inputs)
    assert eager.std(0).min() > 0


def test_model_layout_matches_config(setup) -> None:
    cfg, spec, _ = setup
    model = build(cfg, spec)
    assert model.task_names == cfg.task_names
    emb = model.sparse_embedding
    assert emb is not None and emb.feature_names == spec.sparse_names
    rows = {n: emb.ebc.embedding_bags[f"t_{n}"].weight.shape for n in spec.sparse_names}
    for f in spec.sparse:
        assert rows[f.name] == (f.buckets or cfg.model.embedding.buckets, 8)
    assert model.numeric_embedding is not None
    assert model.numeric_embedding.weight.shape == (len(spec.numeric), 8)
    fields = len(spec.sparse) + len(spec.numeric)
    assert model.block.input_layer.in_features == fields * 8


def test_seeded_build_is_deterministic(setup) -> None:
    cfg, spec, batch = setup
    a, b, c = build(cfg, spec, 7).eval(), build(cfg, spec, 7).eval(), build(cfg, spec, 8).eval()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    for k in sa:
        exact(sa[k], sb[k])
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    with torch.no_grad():
        exact(a(batch.sparse, batch.dense), b(batch.sparse, batch.dense))
        assert not torch.equal(a(batch.sparse, batch.dense), c(batch.sparse, batch.dense))


def test_fused_embedding_keeps_weights_and_updates_only_touched_rows(setup) -> None:
    cfg, spec, batch = setup
    plain = build(cfg, spec).eval()
    fused = fuse_sparse_optimizer(build(cfg, spec), cfg).eval()
    with torch.no_grad():
        # FBGEMM's kernel pools in another order: equal up to float32 rounding
        torch.testing.assert_close(
            plain(batch.sparse, batch.dense), fused(batch.sparse, batch.dense), rtol=0, atol=1e-6
        )
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    fused.train()
    opt = make_dense_optimizer(fused, cfg)
    loss = WeightedBCELoss([1.0] * len(cfg.tasks))(fused(batch.sparse, batch.dense), batch.labels)
    opt.zero_grad()
    loss.backward()  # row-wise Adagrad updates the embedding rows here
    opt.step()
    after = fused.state_dict()
    by_key = batch.sparse.to_dict()
    for f in spec.sparse:
        key = next(k for k in after if k.endswith(f"t_{f.name}.weight"))
        buckets = f.buckets or cfg.model.embedding.buckets
        ids = by_key[f.name].values()
        if f.name in spec.kept_ids:  # the frequency filter maps rare ids to RARE_ID first
            kept = torch.from_numpy(spec.kept_ids[f.name])
            ids = torch.where(torch.isin(ids, kept) | (ids == 0), ids, torch.ones_like(ids))
        looked_up = set(torch.remainder(ids, buckets).tolist())
        changed = (after[key] != before[key]).any(1).nonzero().flatten().tolist()
        assert set(changed) <= looked_up, f.name
        assert changed, f"no row of {f.name} was updated"


# ------------------------------------------------------------------------------- MMoE


def test_mmoe_gates_and_forward_match_explicit_mixture() -> None:
    torch.manual_seed(0)
    b, d, t, e = 16, 12, 3, 4
    block = MMoE(d, t, e, [10, 6], act="relu").eval()
    x = torch.randn(b, d, generator=seeded(1))
    gates = block.gates(x)
    assert gates.shape == (b, t, e)
    assert (gates >= 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(b, t))
    # expert i: first layer is a column block of the fused input layer, then its deep layer
    w, bias = block.input_layer.weight, block.input_layer.bias
    experts = []
    for i in range(e):
        rows = slice(i * 10, (i + 1) * 10)
        h = torch.relu(x @ w[rows].t() + bias[rows])
        deep = block.deep_layers[0]
        h = torch.relu(h @ deep.weight[i] + deep.bias[i])
        experts.append(h)
    stacked = torch.stack(experts, 1)  # B x E x 6
    gate_logits = x @ w[e * 10 :].t() + bias[e * 10 :]
    manual_gates = torch.softmax(gate_logits.view(b, t, e), -1)
    torch.testing.assert_close(gates, manual_gates)
    with torch.no_grad():
        out = block(x, [], {})
        scripted = torch.jit.script(block)(x, [], {})
    assert len(out) == t
    for k in range(t):
        expected = (manual_gates[:, k, :, None] * stacked).sum(1)
        torch.testing.assert_close(out[k], expected, rtol=1e-5, atol=1e-6)
        exact(out[k], scripted[k])


def test_shared_bottom_gives_every_task_the_same_representation() -> None:
    torch.manual_seed(0)
    block = SharedBottom(12, 3, [10, 6], act="relu").eval()
    x = torch.randn(5, 12, generator=seeded(2))
    out = block(x, [], {})
    assert len(out) == 3 and block.out_features == 6
    manual = block.mlp[3](block.mlp[1](block.mlp[0](x)))
    manual = torch.relu(manual)
    for r in out:
        torch.testing.assert_close(r, manual)
    for a, b in zip(out, torch.jit.script(block)(x, [], {})):
        exact(a, b)


# ------------------------------------------------------------------ towers, grouped linear


def test_grouped_linear_equals_per_group_linear() -> None:
    torch.manual_seed(0)
    g, b, i, o = 3, 7, 5, 4
    layer = GroupedLinear(g, i, o)
    x = torch.randn(g, b, i, generator=seeded(3))
    out = layer(x)
    assert out.shape == (g, b, o)
    bound = 1 / math.sqrt(i)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    for k in range(g):
        lin = nn.Linear(i, o)
        with torch.no_grad():
            lin.weight.copy_(layer.weight[k].t())
            lin.bias.copy_(layer.bias[k, 0])
        torch.testing.assert_close(out[k], lin(x[k]), rtol=1e-5, atol=1e-6)
    exact(torch.jit.script(layer)(x), out)


def test_task_towers_equal_per_task_mlps() -> None:
    torch.manual_seed(0)
    t, b, d = 3, 6, 8
    towers = TaskTowers(t, d, [5, 4], act="silu").eval()
    reprs = [torch.randn(b, d, generator=seeded(10 + k)) for k in range(t)]
    logits = towers(reprs)
    assert logits.shape == (b, t)
    for k in range(t):
        h = reprs[k]
        for layer in towers.hidden:
            lin = nn.Linear(layer.weight.shape[1], layer.weight.shape[2])
            with torch.no_grad():
                lin.weight.copy_(layer.weight[k].t())
                lin.bias.copy_(layer.bias[k, 0])
            h = nn.functional.silu(lin(h))
        out = h @ towers.out.weight[k] + towers.out.bias[k]
        torch.testing.assert_close(logits[:, k], out.squeeze(-1), rtol=1e-5, atol=1e-6)
    exact(torch.jit.script(towers)(reprs), logits)


# ------------------------------------------------------------------------ sparse embedding


def embedding(poolings: list[str], buckets: list[int] | None = None) -> PerFeatureEmbedding:
    torch.manual_seed(0)
    return PerFeatureEmbedding(["a", "b"], buckets or [11, 7], 4, poolings).eval()


def table(emb: PerFeatureEmbedding, name: str) -> torch.Tensor:
    return emb.ebc.embedding_bags[f"t_{name}"].weight.detach()


def test_ids_are_reduced_modulo_buckets_inside() -> None:
    emb = embedding(["sum", "sum"])
    big = 6_917_529_027_641_081_856  # a stable-hash sized id (< 2**63)
    ids_a = [3, 3 + 11, 3 + 5 * 11, big, -1]
    ids_b = [2, 2 + 7, 2 + 70, big, -1]
    out = emb(kjt(["a", "b"], [[[i] for i in ids_a], [[i] for i in ids_b]]))
    assert out.shape == (5, 2, 4)
    wa, wb = table(emb, "a"), table(emb, "b")
    for r, (ia, ib) in enumerate(zip(ids_a, ids_b)):
        exact(out[r, 0], wa[ia % 11])
        exact(out[r, 1], wb[ib % 7])
    exact(out[0], out[1])
    exact(out[0], out[2])
    # -1 lands on the last row (Python-style non-negative remainder)
    exact(out[4, 0], wa[10])
    exact(torch.jit.script(emb)(kjt(["a", "b"], [[[i] for i in ids_a], [[i] for i in ids_b]])), out)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_multi_hot_pooling(pooling: str) -> None:
    emb = embedding(["sum", pooling])
    rows_b = [[1, 4, 4], [], [5], [0, 6]]
    sparse = kjt(["a", "b"], [[[1], [2], [3], [4]], rows_b])
    out = emb(sparse)
    w = table(emb, "b")
    for r, ids in enumerate(rows_b):
        if not ids:
            exact(out[r, 1], torch.zeros(4))
            continue
        pooled = w[ids].sum(0)
        if pooling == "mean":
            pooled = pooled / len(ids)
        torch.testing.assert_close(out[r, 1], pooled, rtol=1e-6, atol=1e-6)
    exact(torch.jit.script(emb)(sparse), out)


def test_embedding_gradient_touches_only_looked_up_rows() -> None:
    emb = embedding(["sum", "mean"], buckets=[50, 40])
    emb.train()
    ids_a = [[3], [53], [17]]  # 53 -> row 3
    ids_b = [[1, 41], [], [7, 8, 1]]  # 41 -> row 1
    out = emb(kjt(["a", "b"], [ids_a, ids_b]))
    weights = torch.randn(out.shape, generator=seeded(4))
    (out * weights).sum().backward()
    for name, expected in (("a", {3, 17}), ("b", {1, 7, 8})):
        grad = emb.ebc.embedding_bags[f"t_{name}"].weight.grad
        assert grad is not None
        grad = grad.to_dense() if grad.is_sparse else grad
        touched = set((grad != 0).any(1).nonzero().flatten().tolist())
        assert touched == expected, name
    # row 3 of "a" is read twice (ids 3 and 53): its gradient is the sum of both rows' weights
    grad_a = emb.ebc.embedding_bags["t_a"].weight.grad
    grad_a = grad_a.to_dense() if grad_a.is_sparse else grad_a
    torch.testing.assert_close(grad_a[3], weights[0, 0] + weights[1, 0])


# ------------------------------------------------------------------------------- numeric


def test_numeric_normalizer_math_and_non_finite_fill() -> None:
    mean, std = [1.0, -2.0, 0.5], [2.0, 4.0, 0.25]
    norm = NumericNormalizer(mean, std, log1p=[False, True, True], fill=-3.0)
    raw = torch.tensor(
        [
            [3.0, 0.0, -4.0],
            [-1.0, math.e - 1, 10.0],
            [float("nan"), float("inf"), float("-inf")],
        ]
    )
    out = norm(raw)
    expected = torch.empty_like(raw)
    for i in range(2):
        for j in range(3):
            x = float(raw[i, j])
            if j > 0:
                x = math.copysign(math.log1p(abs(x)), x)
            expected[i, j] = (x - mean[j]) / std[j]
    expected[2] = -3.0
    torch.testing.assert_close(out, expected)
    assert float(out[1, 1]) == pytest.approx((1.0 + 2.0) / 4.0)
    exact(torch.jit.script(norm)(raw), out)


def test_numeric_embedding_scales_a_vector_per_field() -> None:
    torch.manual_seed(0)
    emb = NumericEmbedding(3, 5)
    x = torch.randn(4, 3, generator=seeded(5))
    out = emb(x)
    assert out.shape == (4, 3, 5)
    for b in range(4):
        for f in range(3):
            torch.testing.assert_close(out[b, f], x[b, f] * emb.weight[f])
    exact(torch.jit.script(emb)(x), out)


# ---------------------------------------------------------------------------------- loss


def test_weighted_bce_matches_manual_formula() -> None:
    g = seeded(6)
    logits = torch.randn(32, 3, generator=g) * 3
    labels = (torch.rand(32, 3, generator=g) < 0.4).float()
    weights = [1.0, 0.5, 0.0]
    loss = WeightedBCELoss(weights)(logits, labels)
    total = 0.0
    for t, w in enumerate(weights):
        p = torch.sigmoid(logits[:, t].double())
        y = labels[:, t].double()
        bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
        total += w * float(bce)
    assert float(loss) == pytest.approx(total, rel=1e-5)
    # a zero-weight task does not move the loss
    moved = labels.clone()
    moved[:, 2] = 1 - moved[:, 2]
    assert float(WeightedBCELoss(weights)(logits, moved)) == pytest.approx(float(loss), rel=1e-6)
    exact(torch.jit.script(WeightedBCELoss(weights))(logits, labels), loss)


def test_model_backward_reaches_every_parameter(setup) -> None:
    cfg, spec, batch = setup
    model = build(cfg, spec).train()
    loss = WeightedBCELoss([1.0] * len(cfg.tasks))(model(batch.sparse, batch.dense), batch.labels)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
        assert grad.abs().sum() > 0, name


def test_fast_dropout_matches_inverted_dropout_statistics() -> None:
    from mtrec.nn.layers import FastDropout

    torch.manual_seed(0)
    drop = FastDropout(0.25)
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()  # gradient flows through kept elements only, with the same scale
    assert torch.equal(x.grad, y.detach())
    drop.eval()
    assert torch.equal(drop(x), x)
    scripted = torch.jit.script(FastDropout(0.25)).eval()
    assert torch.equal(scripted(x), x)
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_fused_and_plain_keep_field_order_with_mixed_pooling() -> None:
    """A mean-pooled feature between sum-pooled ones: torchrec's fused collection groups
    tables by pooling type, so the module must not rely on per-table pooling."""
    from types import SimpleNamespace

    from mtrec.train.optim import fuse_sparse_optimizer

    torch.manual_seed(0)
    emb = PerFeatureEmbedding(["a", "tags", "b"], [11, 13, 7], 4, ["sum", "mean", "sum"])
    plain_state = {k: v.clone() for k, v in emb.state_dict().items()}
    batch = kjt(["a", "tags", "b"], [[[1], [2]], [[3, 4, 5], []], [[6], [8]]])
    plain = emb(batch)
    # mean pooling: row 0 of 'tags' is the mean of its three rows, row 1 (empty) is zero
    table = plain_state["ebc.embedding_bags.t_tags.weight"]
    exact(plain[0, 1], table[[3, 4, 5]].mean(0))
    exact(plain[1, 1], torch.zeros(4))
    holder = torch.nn.Module()
    holder.emb = emb
    emb_cfg = SimpleNamespace(learning_rate=0.1, eps=1e-8)  # all fuse_sparse_optimizer reads
    fuse_sparse_optimizer(holder, SimpleNamespace(model=SimpleNamespace(embedding=emb_cfg)))  # type: ignore[arg-type]
    torch.testing.assert_close(holder.emb(batch), plain, rtol=0, atol=1e-6)


def test_fused_dense_adam_resumes_a_foreach_checkpoint(setup) -> None:
    """Runs written before the fused dense Adam saved a foreach Adam's state: it loads into
    the fused optimizer and continues the same trajectory (to float rounding)."""
    cfg, spec, batch = setup
    loss_fn = WeightedBCELoss([1.0] * len(cfg.tasks))

    def steps(model: MultiTaskModel, opt: torch.optim.Optimizer, n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            loss_fn(model(batch.sparse, batch.dense), batch.labels).backward()
            opt.step()

    def foreach_adam(model: MultiTaskModel) -> torch.optim.Optimizer:
        # the package's parameter groups, stepped as before: foreach Adam
        groups = make_dense_optimizer(model, cfg).param_groups
        groups = [{"params": g["params"], "lr": g["lr"]} for g in groups]
        return torch.optim.Adam(groups, weight_decay=cfg.training.weight_decay, foreach=True)

    # two identical models in lockstep (their id-dropout generators advance alike)
    straight, resumed = build(cfg, spec).train(), build(cfg, spec).train()
    straight_opt, old_opt = foreach_adam(straight), foreach_adam(resumed)
    torch.manual_seed(1)
    steps(straight, straight_opt, 3)
    torch.manual_seed(1)
    steps(resumed, old_opt, 3)
    new_opt = make_dense_optimizer(resumed, cfg)
    assert new_opt.defaults["fused"]
    new_opt.load_state_dict(old_opt.state_dict())
    torch.manual_seed(2)
    steps(straight, straight_opt, 3)
    torch.manual_seed(2)
    steps(resumed, new_opt, 3)
    initial, moved = build(cfg, spec).state_dict(), False
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        if not name.startswith("sparse_arch."):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            moved |= not torch.equal(a, initial[name])
    assert moved
