"""APEM and TaskExpert blocks: METHODS.md checks, hand-written references, eager ==
scripted, end to end through ``build_model``, a short training run, diagnostics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import eval_loss, first_batch, fitted_spec, seeded, small_config, small_data_dir
from torch import nn

from mtrec.config import ConfigError, ExperimentConfig, InteractionConfig
from mtrec.data.batch import Batch
from mtrec.data.spec import FeatureSpec
from mtrec.model import build_model
from mtrec.multitask.apem import APEM, group_indices
from mtrec.multitask.task_expert import TaskExpert
from mtrec.train.step import TrainStep

FIELDS = ["f0", "f1", "f2", "f3", "f4"]
TASKS = ["click", "buy", "stay"]
AUTOINT = InteractionConfig(type="autoint", layers=2, attention_dim=8, heads=2)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: two intra-op threads on a busy 2-core machine only spin against each other
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def tokens(b: int, dims: list[int], seed: int) -> list[torch.Tensor]:
    g = seeded(seed)
    return [torch.randn(b, len(FIELDS), d, generator=g) for d in dims]


def run_block(block: nn.Module, toks: list[torch.Tensor]) -> list[torch.Tensor]:
    return block(toks[0].flatten(1), toks, {})


# groups listed out of field order, plus the rest group {f1, f2}
GROUPS = [["f3", "f0"], ["f4"]]


def apem(dropout: float = 0.0, hidden: list[int] | None = None) -> APEM:
    torch.manual_seed(0)
    return APEM(
        FIELDS,
        TASKS,
        dim=4,
        groups=group_indices(FIELDS, GROUPS),
        num_heads=2,
        num_points=2,
        se_reduction=2,
        selector_hidden=6,
        hidden=hidden or [7, 5],
        dropout=dropout,
    ).eval()


def task_expert(
    dims: list[int], memory: str = "replace", layers: int = 2, dropout: float = 0.0
) -> TaskExpert:
    torch.manual_seed(0)
    return TaskExpert(
        FIELDS,
        TASKS,
        dims,
        layers,
        num_experts=3,
        width=4,
        memory=memory,
        hidden=[6, 5],
        dropout=dropout,
    ).eval()


# --------------------------------------------------------------- hand-written references


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def ref_mha(mha: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One row: x Q x d queries, y K x d keys/values; heads one by one."""
    d = x.shape[-1]
    wk, wv = mha.kv.weight[:d], mha.kv.weight[d:]
    bk, bv = mha.kv.bias[:d], mha.kv.bias[d:]
    q, k, v = x @ mha.q.weight.T + mha.q.bias, y @ wk.T + bk, y @ wv.T + bv
    dh = d // mha.num_heads
    heads = []
    for h in range(mha.num_heads):
        s = slice(h * dh, (h + 1) * dh)
        att = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(dh), dim=-1)
        heads.append(att @ v[:, s])
    return torch.cat(heads, -1) @ mha.out.weight.T + mha.out.bias


def ref_mab(mab: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = layer_norm(x + ref_mha(mab.attention, x, y), mab.norm1.weight, mab.norm1.bias)
    l1, l2 = mab.ffn[0], mab.ffn[2]
    ffn = torch.relu(h @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    return layer_norm(h + ffn, mab.norm2.weight, mab.norm2.bias)


def ref_apem(block: APEM, x: torch.Tensor) -> list[torch.Tensor]:
    """APEM row by row, straight from the formulas; x: B x F x d."""
    groups = group_indices(FIELDS, GROUPS)
    t_count, d = len(TASKS), x.shape[-1]
    out: list[list[torch.Tensor]] = [[] for _ in TASKS]
    for row in x:
        h = torch.empty_like(row)
        for g, idx in enumerate(groups):
            isab = block.group_blocks[g]
            summary = ref_mab(isab.summarise, isab.inducing, row[idx])
            h[idx] = ref_mab(isab.broadcast, row[idx], summary)
        w1, w2 = block.excite[0], block.excite[2]
        s = torch.sigmoid(torch.relu(h.mean(-1) @ w1.weight.T + w1.bias) @ w2.weight.T + w2.bias)
        xp = s[:, None] * h
        a1, a2 = block.adapt[0], block.adapt[2]
        shift = torch.relu(xp.mean(0) @ a1.weight.T + a1.bias) @ a2.weight.T + a2.bias
        u = block.indicators + shift.view(t_count, d)
        keys = xp @ block.key.weight.T
        for t in range(t_count):
            a = torch.softmax(torch.stack([u[t] @ keys[f] for f in range(len(FIELDS))]) / d**0.5, 0)
            r = torch.cat([(a[:, None] * xp).sum(0), xp.flatten()])
            for layer in block.mlp:
                r = torch.relu(r @ layer.weight[t] + layer.bias[t, 0])
            out[t].append(r)
    return [torch.stack(rows) for rows in out]


def ref_experts(layer: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Expert outputs E_i(x) (each B x F x h) and the gate logits B x F x T x (n + 1)."""
    n, h = layer.num_experts, layer.width
    w, b = layer.experts.weight, layer.experts.bias
    experts = []
    for i in range(n):
        pre = x @ w[i * h : (i + 1) * h].T + b[i * h : (i + 1) * h]
        experts.append(
            nn.functional.gelu(layer_norm(pre, layer.norm_weight[i], layer.norm_bias[i]))
        )
    logits = x @ layer.gate.weight.T + layer.gate.bias
    return experts, logits.view(*x.shape[:2], len(TASKS), n + 1)


def ref_heads(block: TaskExpert, memory: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = []
    for t, m in enumerate(memory):
        r = m.flatten(1)
        for layer in block.head:
            r = torch.relu(r @ layer.weight[t] + layer.bias[t, 0])
        outs.append(r)
    return outs


def ref_task_expert(block: TaskExpert, toks: list[torch.Tensor]) -> list[torch.Tensor]:
    """TaskExpert task by task from the formulas: per-task memories B x F x h."""
    x0 = toks[0]
    init = (x0 @ block.memory_init.weight.T + block.memory_init.bias).view(
        *x0.shape[:2], len(TASKS), block.width
    )
    memory = [init[:, :, t] for t in range(len(TASKS))]
    for depth, layer in enumerate(block.layers):
        x = toks[depth + 1] if len(toks) > 1 else x0
        experts, logits = ref_experts(layer, x)
        n = len(experts)
        new = []
        for t, m in enumerate(memory):
            g = torch.softmax(logits[:, :, t], -1)
            f = sum(g[..., i : i + 1] * experts[i] for i in range(n)) + g[..., n:] * m
            new.append(m + f if block.residual_memory else f)
        memory = new
    return ref_heads(block, memory)


# ------------------------------------------------------------------------------- APEM


def test_apem_groups_keep_listed_order_and_collect_the_rest() -> None:
    assert group_indices(FIELDS, GROUPS) == [[3, 0], [4], [1, 2]]
    assert group_indices(FIELDS, []) == [[0, 1, 2, 3, 4]]
    assert group_indices(FIELDS, [FIELDS]) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ConfigError, match=r"field_groups\[1\].*unknown field 'f9'"):
        group_indices(FIELDS, [["f0"], ["f9"]])
    with pytest.raises(ConfigError, match=r"field_groups\[1\].*'f0' is already"):
        group_indices(FIELDS, [["f0"], ["f0"]])


def test_apem_matches_reference_and_script() -> None:
    block = apem()
    x = tokens(3, [4], seed=1)
    with torch.no_grad():
        out = run_block(block, x)
        expected = ref_apem(block, x[-1])
        scripted = run_block(torch.jit.script(block), x)
    assert block.out_features == 5 and len(out) == len(TASKS)
    for t in range(len(TASKS)):
        assert out[t].shape == (3, 5)
        close(out[t], expected[t])
        exact(out[t], scripted[t])


def test_apem_reads_the_last_tokens() -> None:
    block = apem()
    x = tokens(3, [4, 4], seed=2)
    with torch.no_grad():
        out = run_block(block, x)
        other_first = run_block(block, [torch.zeros_like(x[0]), x[1]])
    for a, b in zip(out, other_first):
        exact(a, b)
    close(out[0], ref_apem(block, x[1])[0])


def test_apem_se_scales_in_open_unit_interval() -> None:
    block = apem()
    h = torch.randn(64, len(FIELDS), 4, generator=seeded(3)) * 3
    s = block.se_scales(h)
    assert s.shape == (64, len(FIELDS))
    assert (s > 0).all() and (s < 1).all()
    assert s.std(0).min() > 0  # sample-adaptive, not one constant per field
    # X' = s ⊙ H, H the group attention output put back in field order
    groups = group_indices(FIELDS, GROUPS)
    with torch.no_grad():
        attended = torch.empty_like(h)
        for g, idx in enumerate(groups):
            attended[:, idx] = block.group_blocks[g](h[:, idx])
        close(block.patterns(h), block.se_scales(attended).unsqueeze(-1) * attended)


def test_apem_field_weights_sum_to_one_and_differ_between_tasks() -> None:
    block = apem()
    x = tokens(16, [4], seed=4)[-1]
    with torch.no_grad():
        a = block.field_weights(block.patterns(x))
        out = run_block(block, [x])
    assert a.shape == (16, len(TASKS), len(FIELDS))
    assert (a > 0).all()
    close(a.sum(-1), torch.ones(16, len(TASKS)))
    # same input, different field patterns and representations per task
    for s in range(len(TASKS)):
        for t in range(s + 1, len(TASKS)):
            assert (a[:, s] - a[:, t]).abs().max() > 1e-3
            assert (out[s] - out[t]).abs().max() > 1e-3
    # and the pattern is sample-adaptive: rows differ
    assert a.std(0).max() > 1e-3


def test_apem_selector_pools_by_field_weights() -> None:
    # r_t's first d entries are Σ_f a_t,f X'_f: with equal scores the weights are uniform,
    # so a one-layer MLP that copies only those entries returns ReLU(mean_f X'_f)
    block = apem(hidden=[4 + 5 * 4])
    x = tokens(2, [4], seed=5)[-1]
    layer = block.mlp[0]
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.weight[:, :4, :4] = torch.eye(4)  # pooled part only, then ReLU
        block.indicators.zero_()
        block.adapt[2].weight.zero_()
        block.adapt[2].bias.zero_()
        block.key.weight.zero_()  # equal scores → uniform weights
        xp = block.patterns(x)
        out = run_block(block, [x])
    for t in range(len(TASKS)):
        close(out[t][:, :4], torch.relu(xp.mean(1)))


def test_apem_dropout_only_in_training() -> None:
    block = apem(dropout=0.5)
    x = tokens(8, [4], seed=6)
    with torch.no_grad():
        a, b = run_block(block, x), run_block(block, x)
        block.train()
        torch.manual_seed(1)
        c = run_block(block, x)
    exact(a[0], b[0])
    assert not torch.equal(a[0], c[0])


# ------------------------------------------------------------------------- TaskExpert


@pytest.mark.parametrize("memory", ["replace", "residual"])
@pytest.mark.parametrize("dims", [[4], [4, 6, 6, 6]], ids=["x0", "autoint"])
def test_task_expert_matches_reference_and_script(memory: str, dims: list[int]) -> None:
    block = task_expert(dims, memory)
    assert len(block.layers) == (2 if len(dims) == 1 else 3)
    x = tokens(3, dims, seed=7)
    with torch.no_grad():
        out = run_block(block, x)
        expected = ref_task_expert(block, x)
        scripted = run_block(torch.jit.script(block), x)
    assert block.out_features == 5 and len(out) == len(TASKS)
    for t in range(len(TASKS)):
        assert out[t].shape == (3, 5)
        close(out[t], expected[t])
        exact(out[t], scripted[t])


def test_task_expert_gates_sum_to_one_over_experts_and_memory() -> None:
    block = task_expert([4, 6, 6])
    memory, experts, gates = block.run_layers(tokens(8, [4, 6, 6], seed=8))
    assert memory.shape == (8, len(FIELDS), len(TASKS), 4)
    assert len(gates) == len(experts) == 2
    for e, g in zip(experts, gates):
        assert e.shape == (8, len(FIELDS), 3, 4)
        assert g.shape == (8, len(FIELDS), len(TASKS), 3 + 1)
        assert (g > 0).all()
        close(g.sum(-1), torch.ones(8, len(FIELDS), len(TASKS)))
        # per-token gates: tokens of one row get different mixtures
        assert (g[:, 0] - g[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("dims", [[4], [4, 6, 6]], ids=["x0", "autoint"])
def test_task_expert_without_memory_is_per_layer_mmoe(dims: list[int]) -> None:
    block = task_expert(dims, "replace")
    n, h = 3, 4
    with torch.no_grad():  # memory slot logits → -inf: its gate is exactly 0
        for layer in block.layers:
            for t in range(len(TASKS)):
                layer.gate.bias[t * (n + 1) + n] = -math.inf
    x = tokens(4, dims, seed=9)

    def mmoe(layer: nn.Module, inp: torch.Tensor) -> list[torch.Tensor]:
        """Classic MMoE per token: f_t = Σ_i softmax(W_t x)_i E_i(x) over the n experts."""
        experts, logits = ref_experts(layer, inp)
        outs = []
        for t in range(len(TASKS)):
            g = torch.softmax(logits[:, :, t, :n], -1)
            outs.append(sum(g[..., i : i + 1] * experts[i] for i in range(n)))
        return torch.stack(outs, 2)

    with torch.no_grad():
        for depth, layer in enumerate(block.layers):
            inp = x[depth + 1] if len(dims) > 1 else x[0]
            junk = torch.randn(4, len(FIELDS), len(TASKS), h, generator=seeded(depth)) * 100
            mixed, _, gates = layer(inp, junk)  # any memory: it is never read
            assert (gates[..., n] == 0).all()
            close(mixed, mmoe(layer, inp))
        memory = block.run_layers(x)[0]
        last = mmoe(block.layers[-1], x[-1])
        close(memory, last)
        out = run_block(block, x)
        expected = ref_heads(block, [last[:, :, t] for t in range(len(TASKS))])
    for t in range(len(TASKS)):
        close(out[t], expected[t])


@pytest.mark.parametrize("memory", ["replace", "residual"])
@pytest.mark.parametrize("dims", [[4], [4, 6, 6]], ids=["x0", "autoint"])
def test_task_expert_final_memory_depends_on_every_layer(memory: str, dims: list[int]) -> None:
    block = task_expert(dims, memory, layers=3)
    x = [t.requires_grad_() for t in tokens(4, dims, seed=10)]
    final = block.run_layers(x)[0]
    probe = torch.randn(final.shape, generator=seeded(11))
    named = [(f"tokens[{i}]", t) for i, t in enumerate(x)]
    named.append(("memory_init", block.memory_init.weight))
    for depth, layer in enumerate(block.layers):
        named += [
            (f"layers[{depth}].experts", layer.experts.weight),
            (f"layers[{depth}].gate", layer.gate.weight),
            (f"layers[{depth}].norm", layer.norm_weight),
        ]
    # every task's final memory M_t^L, separately, depends on every layer and its input
    for t, task in enumerate(TASKS):
        grads = torch.autograd.grad(
            (final[:, :, t] * probe[:, :, t]).sum(), [p for _, p in named], retain_graph=True
        )
        for (name, _), grad in zip(named, grads):
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, (task, name)
    # perturbing the first layer's experts changes the final memory (not only its grad)
    with torch.no_grad():
        before = block.run_layers(x)[0]
        # (random, not a constant shift: LN would remove a shift common to the h outputs)
        block.layers[0].experts.weight[:4] += torch.randn(
            4, block.layers[0].experts.in_features, generator=seeded(12)
        )
        assert (block.run_layers(x)[0] - before).abs().max() > 1e-4


def test_task_expert_rejects_a_different_number_of_token_inputs() -> None:
    block = task_expert([4, 6, 6])
    with pytest.raises(ValueError, match="built for 3 token tensors"):
        run_block(block, tokens(2, [4, 6], seed=12))
    scripted = torch.jit.script(block)
    with pytest.raises(torch.jit.Error, match="built for 3 token tensors"):
        run_block(scripted, tokens(2, [4], seed=12))


# ----------------------------------------------------------------------- diagnostics


def check_diagnostics_format(diag: dict, task_names: list[str]) -> None:
    assert set(diag) == {"experts", "gates", "shared_usage"}
    for stats in diag["experts"].values():
        assert set(stats) == {"dead_fraction"} and 0.0 <= stats["dead_fraction"] <= 1.0
    for name in task_names:
        assert f"task:{name}" in diag["gates"]
    for gate in diag["gates"].values():
        assert set(gate) == {"experts", "mean_weight", "entropy"}
        assert len(gate["experts"]) == len(gate["mean_weight"])
        assert sum(gate["mean_weight"]) == pytest.approx(1.0, abs=1e-6)
        assert 0.0 <= gate["entropy"] <= math.log(len(gate["experts"])) + 1e-9
    for expert, shares in diag["shared_usage"].items():
        assert expert in diag["experts"]
        assert set(shares) == set(task_names)
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)


def test_apem_diagnostics() -> None:
    block = apem()
    x = tokens(32, [4], seed=13)
    with torch.no_grad():  # SE scale of f2 → 0: its token in X' is dead
        block.excite[2].bias[2] = -1e4
    diag = block.diagnostics(x[0].flatten(1), x)
    check_diagnostics_format(diag, TASKS)
    assert list(diag["experts"]) == FIELDS
    assert diag["experts"]["f2"]["dead_fraction"] == 1.0
    assert diag["experts"]["f0"]["dead_fraction"] < 0.1
    assert set(diag["shared_usage"]) == set(FIELDS)
    a = block.field_weights(block.patterns(x[0])).detach().double()
    gate = diag["gates"]["task:buy"]
    assert gate["experts"] == FIELDS
    assert gate["mean_weight"] == pytest.approx(a[:, 1].mean(0).tolist(), abs=1e-9)
    assert block.training is False


def test_task_expert_diagnostics() -> None:
    block = task_expert([4], layers=2).train()
    x = tokens(32, [4], seed=14)
    with torch.no_grad():  # LN affine of layer 2's expert 1 → 0: GELU(0) = 0, dead
        block.layers[1].norm_weight[1] = 0.0
        block.layers[1].norm_bias[1] = 0.0
    diag = block.diagnostics(x[0].flatten(1), x)
    assert block.training  # runs in the mode it is in
    check_diagnostics_format(diag, TASKS)
    assert list(diag["experts"]) == [f"l{k}.e{i}" for k in (1, 2) for i in range(3)]
    assert diag["experts"]["l2.e1"]["dead_fraction"] == 1.0
    assert diag["experts"]["l2.e0"]["dead_fraction"] < 0.1
    assert diag["gates"]["task:click"]["experts"] == ["l2.e0", "l2.e1", "l2.e2", "memory"]
    assert diag["gates"]["l1.task:click"]["experts"] == ["l1.e0", "l1.e1", "l1.e2", "memory"]
    assert set(diag["shared_usage"]) == {"l2.e0", "l2.e1", "l2.e2"}
    gates = block.run_layers(x)[2][-1].detach().double()
    mean = gates[:, :, 2].reshape(-1, 4).mean(0)  # over batch and tokens
    assert diag["gates"]["task:stay"]["mean_weight"] == pytest.approx(mean.tolist(), abs=1e-9)


# ---------------------------------------------------------------- through build_model


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExperimentConfig, FeatureSpec, Batch]:
    data = small_data_dir(tmp_path_factory)
    cfg = small_config(data, tmp_path_factory.mktemp("apem_te_cfg"))
    spec = fitted_spec(cfg)
    return cfg, spec, first_batch(cfg, spec, split="train", rows=256)


def variant(cfg: ExperimentConfig, block: str, interaction: bool) -> ExperimentConfig:
    out = copy.deepcopy(cfg)
    out.model.multitask.type = block
    out.model.multitask.expert_hidden = [16, 8]
    out.model.multitask.task_expert.expert_dim = 4
    if interaction:
        out.model.interaction = copy.deepcopy(AUTOINT)
    return out


CASES = [(b, i) for b in ("apem", "task_expert") for i in (False, True)]
IDS = [f"{b}-{'autoint' if i else 'none'}" for b, i in CASES]


@pytest.mark.parametrize(("block", "interaction"), CASES, ids=IDS)
def test_build_model_end_to_end(setup, block: str, interaction: bool) -> None:
    cfg, spec, batch = setup
    cfg = variant(cfg, block, interaction)
    torch.manual_seed(0)
    model = build_model(cfg, spec).eval()
    torch.manual_seed(0)
    twin = build_model(cfg, spec).eval()
    assert type(model.block).__name__ == {"apem": "APEM", "task_expert": "TaskExpert"}[block]
    assert model.block.out_features == 8
    if block == "task_expert":  # one layer per AutoInt layer; else task_expert.layers
        assert len(model.block.layers) == (
            2 if interaction else cfg.model.multitask.task_expert.layers
        )
    with torch.no_grad():
        eager = model(batch.sparse, batch.dense)
        scripted = torch.jit.script(model)(batch.sparse, batch.dense)
        again = twin(batch.sparse, batch.dense)
        v, toks = model.block_inputs(batch.sparse, batch.dense, {})
    assert eager.shape == (batch.batch_size, len(cfg.tasks))
    assert torch.isfinite(eager).all() and eager.std(0).min() > 0
    exact(eager, scripted)
    exact(eager, again)  # same seed, same model
    assert len(toks) == (3 if interaction else 1)
    check_diagnostics_format(model.block.diagnostics(v, toks), cfg.task_names)


@pytest.mark.parametrize(("block", "interaction"), CASES, ids=IDS)
def test_short_training_lowers_the_loss(setup, block: str, interaction: bool) -> None:
    cfg, spec, batch = setup
    cfg = variant(cfg, block, interaction)
    step = TrainStep(cfg, spec)
    weights = [t.weight for t in cfg.tasks]
    before = eval_loss(step.model, batch, weights)
    for _ in range(25):
        assert torch.isfinite(step.step(batch))
    after = eval_loss(step.model, batch, weights)
    assert after < 0.9 * before, (before, after)


# ------------------------------------------------------------------------------ config


def test_config_checks(tmp_path_factory: pytest.TempPathFactory) -> None:
    data = small_data_dir(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("apem_te_bad")
    with pytest.raises(ConfigError, match=r"apem\.heads: 3 heads must divide the token width 8"):
        small_config(data, tmp, model={"multitask": {"type": "apem", "apem": {"heads": 3}}})
    with pytest.raises(ConfigError, match=r"apem\.heads: 4 heads must divide the token width 6"):
        small_config(
            data,
            tmp,
            model={
                "multitask": {"type": "apem", "apem": {"heads": 4}},
                "interaction": {"type": "autoint", "attention_dim": 6, "heads": 2},
            },
        )
    with pytest.raises(ConfigError, match=r"task_expert\.expert_dim: must be >= 0"):
        small_config(data, tmp, model={"multitask": {"task_expert": {"expert_dim": -1}}})
    with pytest.raises(ConfigError, match=r"apem\.field_groups\[0\].*unknown field 'c9'"):
        small_config(
            data, tmp, model={"multitask": {"type": "apem", "apem": {"field_groups": [["c9"]]}}}
        )
    # another block's settings are not checked (a config may switch type by override)
    small_config(data, tmp, model={"multitask": {"apem": {"field_groups": [["c9"]]}}})
    ok = small_config(
        data,
        tmp,
        model={"multitask": {"type": "apem", "apem": {"heads": 4, "field_groups": [["c0"]]}}},
    )
    assert ok.model.multitask.apem.field_groups == [["c0"]]
