"""The sparse / task split: one model path for training and serving.

Every block × interaction's :class:`~mtrec.model.TaskArch` (and the AutoInt interaction
alone) runs eager, ``torch.fx.symbolic_trace`` (where tracing applies) and
``torch.jit.script`` with the same output, against seeded numeric references; the
embeddings' torch-only poolings equal the torchrec lookups they are built from; state
dicts written before the split load and score identically.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import first_batch, fitted_spec, kjt, seeded, small_config, small_data_dir

from mtrec.embeddings.per_feature import PerFeatureEmbedding, PerFeaturePooling
from mtrec.embeddings.unified import UnifiedEmbedding, UnifiedPooling
from mtrec.export.serving import ServingModule
from mtrec.model import (
    MultiTaskModel,
    SparseArch,
    TaskArch,
    build_model,
    remap_legacy_key,
    remap_legacy_state_dict,
    remap_legacy_train_state,
)

BLOCKS = ["apem", "home", "mmoe", "ple", "shared_bottom", "task_expert"]

INTERACTIONS = {
    "none": None,
    # AutoInt+ as the references were computed: the DNN and LayerNorm pinned here, not
    # inherited from the planted preset's config (which narrows its DNN for speed)
    "autoint": {
        "type": "autoint",
        "layers": 2,
        "attention_dim": 8,
        "heads": 2,
        "dnn": [256, 128],
        "layer_norm": True,
    },
    "autoint_moh": {
        "type": "autoint",
        "layers": 2,
        "attention_dim": 8,
        "heads": 4,
        "dnn": [8],
        "heads_routing": {"shared": 1, "top_k": 1},
    },
}

# blocks whose forward branches on a tensor's shape, which fx cannot trace symbolically
FX_UNTRACEABLE = {
    "ple": "ExpertBank.pre_activation branches on x.shape[0] (one input shared by every slot)",
    "home": "its expert banks are PLE's ExpertBank (x.shape[0] branch)",
}

# sum of the B x T logits of the seeded task arch on the seeded inputs (torch.manual_seed(0)
# before build_model; tokens and dense from seeded(1)); recorded when the split was made,
# compared to 1e-5 (the float64 normalisation may move the last float32 bits)
REFERENCE_SUM = {
    ("apem", "none"): 0.999720573425293,
    ("home", "none"): -2.8854482173919678,
    ("mmoe", "none"): 0.6535542011260986,
    ("ple", "none"): -1.3406949043273926,
    ("shared_bottom", "none"): 0.5055660009384155,
    ("task_expert", "none"): 1.5276843309402466,
    ("apem", "autoint"): -2.1410434246063232,
    ("home", "autoint"): 0.9470207691192627,
    ("mmoe", "autoint"): -2.264893054962158,
    ("ple", "autoint"): -2.6478731632232666,
    ("shared_bottom", "autoint"): 0.2888023257255554,
    ("task_expert", "autoint"): 1.273455023765564,
    ("apem", "autoint_moh"): 0.9376710057258606,
    ("home", "autoint_moh"): -0.9741787910461426,
    ("mmoe", "autoint_moh"): 2.2986955642700195,
    ("ple", "autoint_moh"): -2.929226875305176,
    ("shared_bottom", "autoint_moh"): -0.7711251974105835,
    ("task_expert", "autoint_moh"): -1.447946310043335,
}


def exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def seeded_model(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, **model: object
) -> tuple[MultiTaskModel, object, object]:
    data = small_data_dir(tmp_path_factory)
    # the deep part alone unless a test asks for more: the references predate the linear
    # term (tests/test_linear.py), the id dropout default (tests/test_unknown_ids.py) and
    # the piecewise numerics (tests/test_piecewise.py)
    model = {"linear": {"enabled": False}, **model}
    model["embedding"] = {
        "id_dropout": 0.0,
        "numeric_bins": 0,
        **dict(model.get("embedding") or {}),  # type: ignore[dict-item]
    }
    cfg = small_config(data, tmp_path, model=model)
    spec = fitted_spec(cfg)
    torch.manual_seed(0)
    return build_model(cfg, spec).eval(), cfg, spec


@pytest.mark.parametrize("interaction", list(INTERACTIONS))
@pytest.mark.parametrize("block", BLOCKS)
def test_task_arch_eager_fx_script(
    block: str, interaction: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    model_cfg: dict[str, object] = {"multitask": {"type": block}}
    if INTERACTIONS[interaction] is not None:
        model_cfg["interaction"] = INTERACTIONS[interaction]
    model, _, spec = seeded_model(tmp_path_factory, tmp_path, **model_cfg)
    arch = model.task_arch
    assert isinstance(arch, TaskArch) and isinstance(model.sparse_arch, SparseArch)
    g = seeded(1)
    tokens = torch.randn(5, len(spec.sparse), 8, generator=g)
    dense = torch.randn(5, len(spec.numeric), generator=g)
    with torch.no_grad():
        eager = arch(tokens, dense)
        exact(torch.jit.script(arch)(tokens, dense), eager)
        if block in FX_UNTRACEABLE:
            with pytest.raises(torch.fx.proxy.TraceError):
                torch.fx.symbolic_trace(arch)
        else:
            exact(torch.fx.symbolic_trace(arch)(tokens, dense), eager)
        if arch.interaction is not None:  # the interaction alone, too
            x0 = arch.field_tokens(tokens, dense)
            flat = arch.interaction(x0)
            exact(torch.jit.script(arch.interaction)(x0), flat)
            exact(torch.fx.symbolic_trace(arch.interaction)(x0), flat)
    assert eager.shape == (5, len(spec.tasks)) and torch.isfinite(eager).all()
    assert eager.sum().item() == pytest.approx(REFERENCE_SUM[block, interaction], abs=1e-5)


def test_task_arch_without_sparse_features_traces_with_none(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    model, _, spec = seeded_model(tmp_path_factory, tmp_path)
    arch = model.task_arch
    # a task arch over numeric fields only: the sparse tokens argument is None
    numeric_only = TaskArch(
        arch.normalizer,
        arch.numeric_embedding,
        _Flat(),
        torch.nn.Identity(),  # type: ignore[arg-type]
        arch.task_names,
    )
    dense = torch.randn(3, len(spec.numeric), generator=seeded(2))
    eager = numeric_only(None, dense)
    assert eager.shape == (3, len(spec.numeric) * 8)
    traced = torch.fx.symbolic_trace(numeric_only, concrete_args={"sparse": None})
    exact(traced(None, dense), eager)


class _Flat(torch.nn.Module):
    """A stand-in block: the flat input itself."""

    def forward(
        self, v: torch.Tensor, tokens: list[torch.Tensor], aux: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return v


def test_chained_task_arch_traces(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    model, _, spec = seeded_model(
        tmp_path_factory, tmp_path, multitask={"chain": ["click", "like"]}
    )
    arch = model.task_arch
    assert arch.chain_tasks == [0, 1] and arch.chain.tolist() == [0, 1]
    g = seeded(1)
    tokens = torch.randn(4, len(spec.sparse), 8, generator=g)
    dense = torch.randn(4, len(spec.numeric), generator=g)
    with torch.no_grad():
        eager = arch(tokens, dense)
        exact(torch.fx.symbolic_trace(arch)(tokens, dense), eager)
        exact(torch.jit.script(arch)(tokens, dense), eager)
    assert (torch.sigmoid(eager[:, 1]) <= torch.sigmoid(eager[:, 0])).all()


def one_hot_ids(num_features: int, rows: int) -> object:
    """A KJT with multi-hot, empty and large ids."""
    g = seeded(5)
    per_key = [
        [
            [int(v) for v in torch.randint(0, 2**62, (int(n),), generator=g)]
            for n in torch.randint(0, 4, (rows,), generator=g)
        ]
        for _ in range(num_features)
    ]
    return kjt([f"f{i}" for i in range(num_features)], per_key)


@pytest.mark.parametrize("num_tables", [1, 3])
@pytest.mark.parametrize("chunks", [[1, 1, 1], [1, 2, 3], [2, 2, 2]])
def test_unified_torch_pooling_equals_the_lookup(chunks: list[int], num_tables: int) -> None:
    torch.manual_seed(0)
    sparse = one_hot_ids(3, 6)
    kept = [None, sparse.values()[:2].sort().values, None]  # a frequency filter on f1
    emb = UnifiedEmbedding(
        ["f0", "f1", "f2"],
        rows=60,
        dim=8,
        poolings=["sum", "mean", "mean"],
        chunks=chunks,
        chunk_dim=4,
        num_tables=num_tables,
        kept_ids=kept,
    ).eval()
    pool = emb.torch_pooling()
    assert isinstance(pool, UnifiedPooling)
    # the layout modules are the embedding's own, not re-derived copies
    assert pool.groups is emb.groups and pool.value_filter is emb.value_filter
    args = (sparse.values(), sparse.lengths().long(), sparse.stride())
    with torch.no_grad():
        out = emb(sparse)
        torch.testing.assert_close(pool(*args), out, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.jit.script(pool)(*args), out, rtol=0, atol=1e-6)


def test_per_feature_torch_pooling_equals_the_lookup() -> None:
    torch.manual_seed(0)
    sparse = one_hot_ids(3, 6)
    kept = [sparse.values()[:3].sort().values, None, None]
    emb = PerFeatureEmbedding(
        ["f0", "f1", "f2"], [7, 50, 13], 8, ["mean", "sum", "mean"], kept_ids=kept
    )
    pool = emb.torch_pooling()
    assert isinstance(pool, PerFeaturePooling) and pool.value_filter is emb.value_filter
    args = (sparse.values(), sparse.lengths().long(), sparse.stride())
    with torch.no_grad():
        out = emb(sparse)
        torch.testing.assert_close(pool(*args), out, rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.jit.script(pool)(*args), out, rtol=0, atol=1e-6)


def test_serving_module_runs_the_trained_task_arch(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    model, _, spec = seeded_model(tmp_path_factory, tmp_path, embedding={"type": "unified"})
    serving = ServingModule(model, spec.sparse_names, len(spec.numeric))
    assert serving.task_arch is model.task_arch  # the same object, not a restatement
    assert serving.sparse is not None and serving.sparse.groups is model.sparse_embedding.groups


def legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict renamed to the keys of the model before the split."""
    out = {}
    for key, value in state.items():
        if key.startswith("sparse_arch.embedding."):
            key = "sparse_embedding." + key[len("sparse_arch.embedding.") :]
        elif key.startswith("task_arch."):
            key = key[len("task_arch.") :]
        out[key] = value
    return out


@pytest.mark.parametrize("embedding", ["per_feature", "unified"])
def test_a_state_dict_from_before_the_split_loads_and_scores_the_same(
    embedding: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    model, cfg, spec = seeded_model(
        tmp_path_factory,
        tmp_path,
        embedding={"type": embedding, "chunks": {"c1": 2}} if embedding == "unified" else {},
        interaction=INTERACTIONS["autoint"],
    )
    old = legacy(model.state_dict())
    assert any(k.startswith("sparse_embedding.ebc.") for k in old)
    assert any(k.startswith("block.") for k in old) and not any("task_arch" in k for k in old)
    assert remap_legacy_state_dict(old).keys() == model.state_dict().keys()
    torch.manual_seed(1)  # different initial weights
    fresh = build_model(cfg, spec).eval()
    batch = first_batch(cfg, spec)
    with torch.no_grad():
        assert not torch.equal(fresh(batch.sparse, batch.dense), model(batch.sparse, batch.dense))
        fresh.load_state_dict(copy.deepcopy(old))  # strict: every legacy key maps
        exact(fresh(batch.sparse, batch.dense), model(batch.sparse, batch.dense))


def test_legacy_names_of_a_train_state() -> None:
    assert remap_legacy_key("sparse_embedding.ebc") == "sparse_arch.embedding.ebc"
    assert remap_legacy_key("sparse_embedding") == "sparse_arch.embedding"
    assert remap_legacy_key("towers.out.weight") == "task_arch.towers.out.weight"
    assert remap_legacy_key("task_arch.block.x") == "task_arch.block.x"  # current: unchanged
    assert remap_legacy_key("blocks.x") == "blocks.x"  # a prefix match needs the dot
    state = {"model": {"block.w": 1}, "sparse_optimizer": {"sparse_embedding.ebc": 2}, "x": 3}
    assert remap_legacy_train_state(state) == {
        "model": {"task_arch.block.w": 1},
        "sparse_optimizer": {"sparse_arch.embedding.ebc": 2},
        "x": 3,
    }


def test_model_parts_stay_reachable_and_replaceable(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    model, _, _ = seeded_model(tmp_path_factory, tmp_path)
    assert model.block is model.task_arch.block and model.towers is model.task_arch.towers
    assert model.sparse_embedding is model.sparse_arch.embedding  # type: ignore[union-attr]
    other = copy.deepcopy(model.block)
    model.block = other  # swaps the task arch's block; no stray top-level module
    assert model.task_arch.block is other
    assert not any(k.startswith("block.") for k in model.state_dict())
