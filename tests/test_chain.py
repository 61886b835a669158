"""ESMM probability chaining (``model.multitask.chain``, :func:`mtrec.model.chain_logits`):
p(click ∧ buy) = p(click) · p(buy | click)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import first_batch, fitted_spec, seeded, small_config, small_data_dir

from mtrec.config import ConfigError, ExperimentConfig
from mtrec.data.batch import Batch
from mtrec.data.spec import FeatureSpec
from mtrec.model import build_model, chain_logits
from mtrec.train.losses import WeightedBCELoss

EXTREMES = [-1e30, -1e4, -100.0, -30.0, -1e-6, 0.0, 1e-6, 30.0, 100.0, 1e4, 1e30]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: two intra-op threads on a busy 2-core machine only spin against each other
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chain(*tasks: int) -> torch.Tensor:
    return torch.tensor(tasks, dtype=torch.long)


def extreme_grid() -> torch.Tensor:
    """Every combination of three extreme logits: 1331 x 3."""
    v = torch.tensor(EXTREMES)
    return torch.cartesian_prod(v, v, v)


def not_above(later: torch.Tensor, earlier: torch.Tensor) -> bool:
    """Logit ``later`` <= logit ``earlier`` exactly (so its probability too, σ being
    monotone): ``chain_logits`` clamps the log-space round trip, which alone can land an
    ulp above the earlier step when the later steps are near-certain."""
    return bool((later <= earlier).all())


def test_chained_probability_is_the_product_of_sigmoids() -> None:
    logits = torch.randn(512, 4, generator=seeded(0)) * 3
    out = chain_logits(logits, chain(2, 0, 3))
    p = torch.sigmoid(logits.double())
    joint = torch.sigmoid(out.double())
    torch.testing.assert_close(joint[:, 0], p[:, 2] * p[:, 0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(joint[:, 3], p[:, 2] * p[:, 0] * p[:, 3], rtol=1e-5, atol=1e-7)
    # the first step and tasks outside the chain keep their logits exactly
    torch.testing.assert_close(out[:, 2], logits[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1], logits[:, 1], rtol=0, atol=0)


def test_hand_computed_values() -> None:
    # σ(0) = 1/2, σ(log 3) = 3/4: joint 3/8, logit log(3/5); three steps: 9/32, logit log(9/23)
    l3 = torch.log(torch.tensor(3.0))
    logits = torch.tensor([[0.0, float(l3), float(l3)]])
    out = chain_logits(logits, chain(0, 1, 2))
    expected = torch.log(torch.tensor([[1.0, 3.0 / 5.0, 9.0 / 23.0]]))
    expected[0, 0] = 0.0
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_chained_probabilities_never_exceed_the_previous_step(scale: float) -> None:
    logits = torch.randn(4096, 3, generator=seeded(1)) * scale
    out = chain_logits(logits, chain(0, 1, 2))
    assert not_above(out[:, 1], out[:, 0])
    assert not_above(out[:, 2], out[:, 1])
    # an unlikely later step pulls the joint probability far below the first step's
    low = torch.sigmoid(chain_logits(torch.tensor([[5.0, -5.0]]), chain(0, 1)))
    assert float(low[0, 1]) < 0.01 < 0.99 < float(low[0, 0])


def test_extreme_logits_stay_finite_with_finite_gradients() -> None:
    logits = extreme_grid().requires_grad_()
    out = chain_logits(logits, chain(0, 1, 2))
    assert torch.isfinite(out).all()
    assert not_above(out[:, 1], out[:, 0])
    assert not_above(out[:, 2], out[:, 1])
    p = torch.sigmoid(out)
    # BCE on the joint label, as training does
    labels = (torch.arange(out.numel()).view_as(out) % 2).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out, labels)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # a certain "no" at any step makes the joint a certain "no"
    row = EXTREMES.index(1e30) * len(EXTREMES) ** 2 + EXTREMES.index(-1e30) * len(EXTREMES)
    assert float(p[row, 1]) == 0.0 and float(p[row, 2]) == 0.0


def test_no_chain_leaves_logits_untouched() -> None:
    logits = torch.randn(8, 3, generator=seeded(2))
    for c in (torch.zeros(0, dtype=torch.long), chain(1)):
        torch.testing.assert_close(chain_logits(logits, c), logits, rtol=0, atol=0)


def test_scripted_chain_equals_eager() -> None:
    scripted = torch.jit.script(chain_logits)
    logits = torch.cat([torch.randn(256, 3, generator=seeded(3)) * 5, extreme_grid()])
    for c in (chain(0, 1), chain(2, 0, 1), torch.zeros(0, dtype=torch.long)):
        torch.testing.assert_close(scripted(logits, c), chain_logits(logits, c), rtol=0, atol=0)


# ------------------------------------------------------------------ in the built model


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExperimentConfig, FeatureSpec, Batch]:
    data = small_data_dir(tmp_path_factory)
    cfg = small_config(
        data,
        tmp_path_factory.mktemp("chain_cfg"),
        model={"multitask": {"chain": ["like", "click"]}},
    )
    spec = fitted_spec(cfg)
    return cfg, spec, first_batch(cfg, spec, rows=128)


def test_config_chain_maps_names_to_task_columns(setup) -> None:
    cfg, spec, batch = setup
    assert cfg.task_names == ["click", "like"]
    torch.manual_seed(0)
    model = build_model(cfg, spec).eval()
    assert model.chain.tolist() == [1, 0]  # like first, then click
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.model.multitask.chain = []
    torch.manual_seed(0)
    plain = build_model(plain_cfg, spec).eval()
    with torch.no_grad():
        conditional = plain(batch.sparse, batch.dense)
        joint = model(batch.sparse, batch.dense)
        scripted = torch.jit.script(model)
        script_joint = scripted(batch.sparse, batch.dense)
        probs = scripted.predict(batch.sparse, batch.dense)
    torch.testing.assert_close(joint, chain_logits(conditional, chain(1, 0)), rtol=0, atol=0)
    torch.testing.assert_close(script_joint, joint, rtol=0, atol=0)
    torch.testing.assert_close(probs, torch.sigmoid(joint), rtol=0, atol=0)
    p = torch.sigmoid(conditional.double())
    torch.testing.assert_close(probs[:, 0].double(), p[:, 1] * p[:, 0], rtol=1e-5, atol=1e-7)
    assert not_above(joint[:, 0], joint[:, 1])


def test_joint_loss_trains_both_towers(setup) -> None:
    cfg, spec, batch = setup
    torch.manual_seed(0)
    model = build_model(cfg, spec).train()
    loss = WeightedBCELoss([1.0, 0.0])(model(batch.sparse, batch.dense), batch.labels)
    loss.backward()  # only the joint (click) task has weight: its gradient reaches both towers
    out = model.towers.out
    assert out.weight.grad is not None and torch.isfinite(out.weight.grad).all()
    assert out.weight.grad[0].abs().sum() > 0 and out.weight.grad[1].abs().sum() > 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["click", "clik"], r"chain\[1\]: unknown task 'clik'; did you mean 'click'"),
        (["click", "purchase"], r"chain\[1\]: unknown task 'purchase'.*known: click, like"),
        (["click", "click"], r"chain: expected two or more distinct task names"),
        (["click"], r"chain: expected two or more distinct task names"),
    ],
)
def test_bad_chain_is_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, value: list[str], message: str
) -> None:
    data = small_data_dir(tmp_path_factory)
    with pytest.raises(ConfigError, match=r"model\.multitask\." + message):
        small_config(
            data, tmp_path_factory.mktemp("chain_bad"), model={"multitask": {"chain": value}}
        )
