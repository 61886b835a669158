"""AutoInt / AutoInt+: attention maths against a hand-written reference, equivariance,
the residual switch, eager vs ``torch.jit.script``, config, and a train → export run."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import first_batch, fitted_spec, seeded, small_config, small_data_dir

from mtrec.config import (
    ConfigError,
    ExperimentConfig,
    HeadsRoutingConfig,
    InteractionConfig,
    parse_config,
)
from mtrec.data.batch import Batch
from mtrec.data.spec import FeatureSpec
from mtrec.interaction import AutoInt, InteractingLayer, build_interaction
from mtrec.model import MultiTaskModel, build_model
from mtrec.train.losses import WeightedBCELoss

AUTOINT = {"type": "autoint", "layers": 2, "attention_dim": 8, "heads": 2}


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def tokens(b: int = 6, f: int = 5, d: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, f, d, generator=seeded(seed))


def randomise_norms(module: torch.nn.Module, seed: int = 9) -> None:
    """LayerNorm starts as the identity affine; give it a non-trivial one."""
    g = seeded(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))


# ------------------------------------------------------------------- hand-written reference


def reference_layer(layer: InteractingLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and B x H x F x F attention of ``layer``, in float64, one head, row and
    field at a time with explicit matrix-vector products."""
    x = x.double()
    a, h_count, dh = layer.attention_dim, layer.num_heads, layer.head_dim
    w = layer.qkv.weight.detach().double()
    b_count, f_count, _ = x.shape
    alpha = torch.zeros(b_count, h_count, f_count, f_count, dtype=torch.float64)
    out = torch.zeros(b_count, f_count, a, dtype=torch.float64)
    for h in range(h_count):
        wq = w[h * dh : (h + 1) * dh]
        wk = w[a + h * dh : a + (h + 1) * dh]
        wv = w[2 * a + h * dh : 2 * a + (h + 1) * dh]
        for b in range(b_count):
            for m in range(f_count):
                q = wq @ x[b, m]
                scores = torch.stack([q @ (wk @ x[b, k]) for k in range(f_count)]) / math.sqrt(dh)
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                alpha[b, h, m] = weights
                mixed = sum(weights[k] * (wv @ x[b, k]) for k in range(f_count))
                out[b, m, h * dh : (h + 1) * dh] = mixed
    if layer.residual is not None:
        w_res = layer.residual.weight.detach().double()
        out = out + torch.einsum("ad,bfd->bfa", w_res, x)
    if layer.norm is not None:
        mean = out.mean(-1, keepdim=True)
        var = out.var(-1, unbiased=False, keepdim=True)
        out = (out - mean) / torch.sqrt(var + layer.norm.eps)
        out = out * layer.norm.weight.detach().double() + layer.norm.bias.detach().double()
    return torch.relu(out), alpha


@pytest.mark.parametrize(("residual", "layer_norm"), [(True, False), (False, False), (True, True)])
def test_layer_matches_hand_written_reference(residual: bool, layer_norm: bool) -> None:
    torch.manual_seed(0)
    layer = InteractingLayer(3, 4, 2, use_residual=residual, layer_norm=layer_norm).eval()
    randomise_norms(layer)
    x = tokens(b=3, f=4, d=3, seed=2)
    expected, alpha = reference_layer(layer, x)
    with torch.no_grad():
        out, att = layer(x), layer.attention(x)
    assert out.shape == (3, 4, 4) and att.shape == (3, 2, 4, 4)
    torch.testing.assert_close(att.double(), alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert (out >= 0).all() and (out == 0).any() and (out > 0).any()


def test_large_batch_inference_attention_matches_the_reference_and_the_per_head_path() -> None:
    """A large eval batch without autograd takes the batch-innermost kernel (serving at
    batch 512); it matches the float64 reference and the per-head path that autograd and
    small batches use, eager and scripted, with and without MoH routing."""
    torch.manual_seed(0)
    x = tokens(b=160, f=6, d=5, seed=3)
    for routing in (None, (1, 1, 0.01)):
        layer = InteractingLayer(5, 8, 4, layer_norm=True, routing=routing).eval()
        randomise_norms(layer)
        assert not layer._batch_innermost(127, 6) and not layer._batch_innermost(160, 17)
        with torch.no_grad():
            assert layer._batch_innermost(160, 6)
            fast = layer(x)
            scripted = torch.jit.script(layer)(x)
        with torch.enable_grad():  # autograd: the per-head path
            assert not layer._batch_innermost(160, 6)
            per_head = layer(x).detach()
        torch.testing.assert_close(fast, per_head, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(scripted, fast, rtol=1e-6, atol=1e-6)
        if routing is None:
            expected, _ = reference_layer(layer, x[:40])
            torch.testing.assert_close(fast[:40].double(), expected, rtol=1e-5, atol=1e-6)
    # stacked: each layer hands the next its tokens in the batch-innermost layout
    net = AutoInt(5, 3, 8, 2, layer_norm=True, dnn=[6], num_fields=6).eval()
    randomise_norms(net)
    with torch.no_grad():
        fast = net.forward_flat(x)
    torch.testing.assert_close(fast, net.forward_flat(x).detach(), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- checks


def test_attention_rows_sum_to_one() -> None:
    torch.manual_seed(0)
    net = AutoInt(8, num_layers=3, attention_dim=12, num_heads=3, layer_norm=True).eval()
    x = tokens(b=7, f=6) * 4  # large scores: softmax must still normalise
    maps = net.attention_maps(x)
    assert len(maps) == 3
    for att in maps:
        assert att.shape == (7, 3, 6, 6)
        assert (att >= 0).all()
        torch.testing.assert_close(att.sum(-1), torch.ones(7, 3, 6))
    # the first map is the first layer's attention on the input tokens
    exact(maps[0], net.layers[0].attention(x))
    exact(maps[1], net.layers[1].attention(net.layers[0](x)))


@pytest.mark.parametrize("layer_norm", [False, True])
def test_permuting_fields_permutes_outputs(layer_norm: bool) -> None:
    torch.manual_seed(0)
    net = AutoInt(8, num_layers=3, attention_dim=8, num_heads=2, layer_norm=layer_norm).eval()
    randomise_norms(net)
    x = tokens(b=4, f=7)
    perm = torch.randperm(7, generator=seeded(3))
    with torch.no_grad():
        out, out_p = net(x), net(x[:, perm])
        maps, maps_p = net.attention_maps(x), net.attention_maps(x[:, perm])
    torch.testing.assert_close(out_p, out[:, perm], rtol=1e-5, atol=1e-6)
    for att, att_p in zip(maps, maps_p):
        torch.testing.assert_close(att_p, att[:, :, perm][:, :, :, perm], rtol=1e-5, atol=1e-6)
    # and the output is not permutation-invariant (fields keep their identity)
    assert not torch.allclose(out_p, out, atol=1e-3)


def test_no_residual_means_no_parameter_and_pure_attention() -> None:
    torch.manual_seed(0)
    plain = InteractingLayer(8, attention_dim=8, num_heads=2, use_residual=False).eval()
    assert plain.residual is None
    assert [n for n, _ in plain.named_parameters()] == ["qkv.weight"]
    assert not any("residual" in k for k in plain.state_dict())
    x = tokens(b=5, f=4)
    with torch.no_grad():
        out = plain(x)
        # ReLU(Σ_k α_mk W_V e_k), heads concatenated, from the layer's own α and W_V
        v = plain.qkv(x)[..., 16:].view(5, 4, 2, 4).transpose(1, 2)
        attn = torch.matmul(plain.attention(x), v).transpose(1, 2).reshape(5, 4, 8)
    # the layer's per-head V (its own GEMM) may round differently from the slice of qkv(x)
    torch.testing.assert_close(out, torch.relu(attn), rtol=1e-6, atol=1e-6)
    # a residual twin with W_res = 0 gives the very same output; a non-zero W_res changes it
    twin = InteractingLayer(8, attention_dim=8, num_heads=2, use_residual=True).eval()
    with torch.no_grad():
        twin.qkv.weight.copy_(plain.qkv.weight)
        assert twin.residual is not None
        twin.residual.weight.zero_()
        exact(twin(x), out)
        twin.residual.weight.normal_(generator=seeded(4))
        assert not torch.allclose(twin(x), out)
    # every AutoInt layer honours the switch
    net = AutoInt(8, num_layers=3, attention_dim=8, num_heads=2, use_residual=False)
    assert not any("residual" in n for n, _ in net.named_parameters())


def test_autoint_plus_flat_width_and_parts() -> None:
    torch.manual_seed(0)
    f, d, a = 5, 8, 12
    x = tokens(b=4, f=f, d=d)
    plain = AutoInt(d, num_layers=2, attention_dim=a, num_heads=3).eval()
    assert plain.dnn is None and plain.flat_features(f) == f * a
    exact(plain.forward_flat(x), plain(x).flatten(1))
    plus = AutoInt(d, 2, a, 3, dnn=[32, 7], num_fields=f).eval()
    assert plus.out_features_per_field == a
    assert plus.flat_features(f) == f * a + 7
    with torch.no_grad():
        flat = plus.forward_flat(x)
        assert flat.shape == (4, f * a + 7)
        exact(flat[:, : f * a], plus(x).flatten(1))
        # DNN on flatten(E⁰): Linear(F·d, 32) → ReLU → Linear(32, 7) → ReLU
        l1, l2 = plus.dnn[0], plus.dnn[2]
        hidden = torch.relu(x.flatten(1) @ l1.weight.t() + l1.bias)
        dnn = torch.relu(hidden @ l2.weight.t() + l2.bias)
        torch.testing.assert_close(flat[:, f * a :], dnn, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_fields"):
        AutoInt(d, 2, a, 3, dnn=[8])
    with pytest.raises(ValueError, match="divisible"):
        InteractingLayer(d, 10, 3)
    with pytest.raises(ValueError, match="num_layers"):
        AutoInt(d, 0, a, 3)


def test_attention_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    layer = InteractingLayer(8, attention_dim=8, num_heads=2, dropout=0.5)
    x = tokens()
    layer.eval()
    with torch.no_grad():
        ref = layer(x)
        exact(layer(x), ref)
        layer.train()
        assert not torch.equal(layer(x), ref)
        # the reported attention never has dropout applied
        torch.testing.assert_close(layer.attention(x).sum(-1), torch.ones(6, 2, 5))


# ------------------------------------------------------------------------ TorchScript


@pytest.mark.parametrize(
    ("residual", "layer_norm", "dropout"),
    [(True, False, 0.0), (False, True, 0.2), (True, True, 0.1)],
)
def test_layer_eager_equals_script(residual: bool, layer_norm: bool, dropout: float) -> None:
    torch.manual_seed(0)
    layer = InteractingLayer(8, 16, 4, residual, layer_norm, dropout).eval()
    randomise_norms(layer)
    scripted = torch.jit.script(layer)
    x = tokens()
    with torch.no_grad():
        exact(scripted(x), layer(x))
        exact(scripted.attention(x), layer.attention(x))


@pytest.mark.parametrize("dnn", [[], [16, 8]])
def test_autoint_eager_equals_script(dnn: list[int]) -> None:
    torch.manual_seed(0)
    net = AutoInt(8, 3, 16, 2, layer_norm=True, dropout=0.1, dnn=dnn, num_fields=5).eval()
    randomise_norms(net)
    scripted = torch.jit.script(net)
    x = tokens()
    with torch.no_grad():
        exact(scripted(x), net(x))
        exact(scripted.forward_flat(x), net.forward_flat(x))
        for a, b in zip(scripted.attention_maps(x), net.attention_maps(x), strict=True):
            exact(a, b)


# -------------------------------------------------------------------------- whole model


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def setup(
    data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExperimentConfig, FeatureSpec, Batch]:
    cfg = small_config(data, tmp_path_factory.mktemp("autoint_cfg"))
    spec = fitted_spec(cfg)
    return cfg, spec, first_batch(cfg, spec, rows=64)


def with_interaction(cfg: ExperimentConfig, **kw: Any) -> ExperimentConfig:
    out = copy.deepcopy(cfg)
    out.model.interaction = InteractionConfig(**kw)
    return out


def build(cfg: ExperimentConfig, spec: FeatureSpec, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_model(cfg, spec)


def test_default_config_builds_no_interaction(setup) -> None:
    cfg, spec, _ = setup
    assert InteractionConfig().type == "none" and cfg.model.interaction.type == "none"
    assert build_interaction(cfg.model.interaction, 5, 8) is None
    model = build(cfg, spec)
    assert model.interaction is None
    assert not any(".interaction." in k for k in model.state_dict())


@pytest.mark.parametrize(
    ("block", "extra"),
    [("mmoe", {}), ("shared_bottom", {"layer_norm": True, "dropout": 0.1, "dnn": [16, 12]})],
)
def test_model_with_autoint_eager_equals_script(setup, block: str, extra: dict) -> None:
    cfg, spec, batch = setup
    cfg = with_interaction(cfg, **AUTOINT, **extra)
    cfg.model.multitask.type = block
    model = build(cfg, spec).eval()
    assert isinstance(model.interaction, AutoInt)
    fields = len(spec.sparse) + len(spec.numeric)
    width = fields * 8 + (extra["dnn"][-1] if "dnn" in extra else 0)
    first = model.block.input_layer if block == "mmoe" else model.block.mlp[0]
    assert first.in_features == width == model.interaction.flat_features(fields)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        eager = model(batch.sparse, batch.dense)
        script = scripted(batch.sparse, batch.dense)
        probs = scripted.predict(batch.sparse, batch.dense)
        tokens_ = model.field_tokens(batch.sparse, batch.dense)
        maps = scripted.task_arch.interaction.attention_maps(tokens_)
    assert eager.shape == (batch.batch_size, len(cfg.tasks))
    assert torch.isfinite(eager).all() and eager.std(0).min() > 0
    exact(eager, script)
    exact(probs, torch.sigmoid(eager))
    assert [m.shape for m in maps] == [(batch.batch_size, 2, fields, fields)] * 2


def test_model_with_autoint_backward_reaches_every_parameter(setup) -> None:
    cfg, spec, batch = setup
    cfg = with_interaction(cfg, **AUTOINT, dnn=[8])
    model = build(cfg, spec).train()
    loss = WeightedBCELoss([1.0] * len(cfg.tasks))(model(batch.sparse, batch.dense), batch.labels)
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("task_arch.interaction.layers.1.residual") for n in names)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
        assert grad.abs().sum() > 0, name


def test_train_and_export_with_autoint(data: Path, tmp_path: Path) -> None:
    from mtrec.export.exporter import PARITY_TOLERANCE, export_run
    from mtrec.train.loop import load_trained_model, train

    interaction = {**AUTOINT, "layer_norm": True, "dropout": 0.1, "dnn": [16]}
    cfg = small_config(
        data,
        tmp_path,
        model={"interaction": interaction},
        training={"epochs": 1, "max_steps_per_epoch": 6},
    )
    assert cfg.model.interaction.type == "autoint"
    summary = train(cfg, tmp_path / "run")
    assert summary["best_epoch"] >= 0
    _, _, model = load_trained_model(tmp_path / "run")
    assert isinstance(model.interaction, AutoInt) and model.interaction.dnn is not None
    out = export_run(tmp_path / "run", out=tmp_path / "model.pt", parity_rows=256)
    assert out["parity_max_abs_diff"] <= PARITY_TOLERANCE <= 1e-5
    assert out["parity_rows"] > 0


# ------------------------------------------------------------------------------ config

BASE: dict[str, Any] = {
    "dataset": {"train": "train.parquet"},
    "features": [{"name": "a", "kind": "categorical"}, {"name": "x", "kind": "numeric"}],
    "tasks": [{"name": "click"}],
}


def parse_interaction(**kw: Any) -> ExperimentConfig:
    return parse_config({**BASE, "model": {"interaction": kw}}, source="exp.yaml")


def test_interaction_config_parses_and_validates() -> None:
    cfg = parse_interaction(type="autoint", layers=2, attention_dim=12, heads=3, dnn=[8, 4])
    ia = cfg.model.interaction
    assert (ia.type, ia.layers, ia.attention_dim, ia.heads, ia.dnn) == ("autoint", 2, 12, 3, [8, 4])
    assert ia.residual and not ia.layer_norm and ia.dropout == 0.0
    with pytest.raises(
        ConfigError,
        match=r"exp\.yaml: model\.interaction\.attention_dim: must be divisible by "
        r"model\.interaction\.heads \(3\), got 32",
    ):
        parse_interaction(type="autoint", heads=3)
    with pytest.raises(ConfigError) as err:
        parse_interaction(type="autoint", haeds=2)
    assert "model.interaction.haeds: unknown key; did you mean 'heads'?" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'autoint'"):
        parse_interaction(type="autoin")
    with pytest.raises(ConfigError, match=r"model\.interaction\.heads: must be > 0"):
        parse_interaction(heads=0)
    with pytest.raises(ConfigError, match=r"model\.interaction\.layers: must be > 0"):
        parse_interaction(type="autoint", layers=0)
    with pytest.raises(ConfigError, match=r"model\.interaction\.dnn\[1\]: must be > 0"):
        parse_interaction(type="autoint", dnn=[8, 0])
    with pytest.raises(ConfigError, match=r"model\.interaction\.dropout: must be in \[0, 1\)"):
        parse_interaction(type="autoint", dropout=1.0)
    with pytest.raises(ConfigError, match=r"model\.interaction\.attention_dim: expected int"):
        parse_interaction(attention_dim=8.5)


# ------------------------------------------------------------------- MoH head routing


def routed_layer(
    shared: int = 1, top_k: int = 2, heads: int = 5, seed: int = 0
) -> InteractingLayer:
    torch.manual_seed(seed)
    return InteractingLayer(
        8, attention_dim=heads * 4, num_heads=heads, routing=(shared, top_k, 0.01)
    )


@pytest.mark.parametrize(("shared", "top_k"), [(1, 2), (0, 1), (2, 1)])
def test_moh_exactly_shared_plus_k_heads_are_on_per_token(shared: int, top_k: int) -> None:
    layer = routed_layer(shared, top_k)
    x = tokens(b=16, f=7)
    gates = layer.head_gates(x)  # B x F x H
    assert gates.shape == (16, 7, 5)
    on = (gates > 0).sum(-1)
    assert (on == shared + top_k).all()
    # shared heads always on; α₁ + α₂ = 1 and renormalised top-k: each token's gates sum to 1
    assert (gates[..., :shared] > 0).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(16, 7))
    # routing differs between tokens (a router, not a fixed head choice)
    picked = (gates[..., shared:] > 0).reshape(-1, 5 - shared)
    assert len({tuple(r.tolist()) for r in picked}) > 1
    # a head with a zero gate contributes nothing: zeroing its V rows changes no output there
    out = layer(x)
    h_off = int((gates[0, 0] == 0).nonzero()[0])
    with torch.no_grad():
        a, dh = layer.attention_dim, layer.head_dim
        layer.qkv.weight[2 * a + h_off * dh : 2 * a + (h_off + 1) * dh] += 1.0
    exact(layer(x)[0, 0], out[0, 0])


def test_moh_output_matches_gated_reference() -> None:
    layer = routed_layer(seed=3)
    x = tokens(b=4, f=5, seed=4)
    b, f = 4, 5
    # Q, K, V of every head from the documented row layout of ``qkv``: B x H x F x d_h each
    qkv = layer.qkv(x).view(b, f, 3, layer.num_heads, layer.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    heads = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(layer.head_dim), -1) @ v
    gates = layer.head_gates(x)
    gated = heads * gates.transpose(1, 2).unsqueeze(-1)
    expected = gated.transpose(1, 2).reshape(b, f, -1) + layer.residual(x)
    torch.testing.assert_close(layer(x), torch.relu(expected))


def test_moh_balance_loss_is_positive_differentiable_and_reaches_aux() -> None:
    torch.manual_seed(0)
    net = AutoInt(8, num_layers=2, attention_dim=20, num_heads=5, routing=(1, 2, 0.01)).train()
    x = tokens(b=8, f=6)
    aux: dict[str, torch.Tensor] = {}
    net.forward_layers(x, aux)
    assert sorted(aux) == ["moh_balance_0", "moh_balance_1"]
    total = sum(aux.values())
    assert float(total) > 0
    total.backward()
    router_grad = net.layers[0].router.weight.grad
    assert router_grad is not None and router_grad.abs().sum() > 0
    # evaluation adds no auxiliary loss
    aux_eval: dict[str, torch.Tensor] = {}
    net.eval().forward_layers(x, aux_eval)
    assert aux_eval == {}


def test_moh_eager_equals_script_and_rejects_bad_routing() -> None:
    net = AutoInt(8, num_layers=2, attention_dim=20, num_heads=5, routing=(1, 2, 0.01)).eval()
    x = tokens()
    scripted = torch.jit.script(net)
    exact(net.forward_flat(x), scripted.forward_flat(x))
    exact(net.layers[0].head_gates(x), scripted.layers[0].head_gates(x))
    with pytest.raises(ValueError, match="top_k"):
        InteractingLayer(8, 8, 2, routing=(1, 1, 0.01))


def test_moh_model_trains_with_the_auxiliary_loss(setup) -> None:
    cfg, spec, batch = setup
    routing = HeadsRoutingConfig(shared=1, top_k=2)
    cfg = with_interaction(cfg, **{**AUTOINT, "heads": 4}, heads_routing=routing)
    model = build(cfg, spec).train()
    logits, aux = model.forward_with_aux(batch.sparse, batch.dense)
    assert sorted(aux) == ["moh_balance_0", "moh_balance_1"]
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if "sparse" not in n], lr=1e-2)
    loss_fn = WeightedBCELoss([1.0] * len(cfg.tasks))
    first = None
    for _ in range(30):
        logits, aux = model.forward_with_aux(batch.sparse, batch.dense)
        loss = loss_fn(logits, batch.labels, aux)  # the training loss: BCE + aux losses
        torch.testing.assert_close(loss, loss_fn(logits, batch.labels) + sum(aux.values()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
    assert float(loss) < first
    scripted = torch.jit.script(model.eval())
    with torch.no_grad():
        exact(model(batch.sparse, batch.dense), scripted(batch.sparse, batch.dense))


def test_moh_config_errors() -> None:
    base = {"type": "autoint", "layers": 1, "attention_dim": 8, "heads": 4}
    for routing, match in (
        ({"shared": 1, "top_k": 3}, "routes nothing"),
        ({"shared": 3, "top_k": 2}, "shared \\+ top_k <="),
        ({"shared": 1, "top_k": 0}, "top_k: must be >= 1"),
        ({"shared": 1, "top_kk": 1}, "did you mean 'top_k'"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_interaction(**base, heads_routing=routing)
    cfg = parse_interaction(**base, heads_routing={"shared": 1, "top_k": 2})
    assert cfg.model.interaction.heads_routing == HeadsRoutingConfig(1, 2, 0.01)
