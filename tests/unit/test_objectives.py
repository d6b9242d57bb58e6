"""The objective table drives the loss: on one rank each objective's loss is the paper's
equation, written here independently with plain cross-entropies (Eqn 1-5), and so is the pool
term of unlabeled images (Eqn 3 over the pool's columns, weighed by lambda_U)."""

import pytest
import torch
import torch.nn.functional as F

from fgdist.config import ConfigError, validate
from fgdist.data.partition import make_plan
from fgdist.objective_table import OBJECTIVE_NAMES, OBJECTIVES
from fgdist.training.head import InstanceHead
from fgdist.training.objectives import Objective
from tests.helpers import manifest_with_sizes

SIZES = [3, 5, 4]  # 12 instances in 3 super-classes
DIM, LAMBDA = 6, 0.7


def paper_loss(name, outputs, w, super_ids, fine_ids, instance_ids):
    x = outputs["features"]
    base = F.cross_entropy(outputs["super_logits"], super_ids)
    fine = F.cross_entropy(outputs["fine_logits"], fine_ids)
    indi = F.cross_entropy(x @ w.T, instance_ids)  # over all n instances
    # over the instances of the row's own super-class only
    bounds = torch.tensor([0, *torch.tensor(SIZES).cumsum(0).tolist()])
    col = torch.arange(w.shape[0])
    own = (col >= bounds[super_ids, None]) & (col < bounds[super_ids + 1, None])
    indi_eff = F.cross_entropy((x @ w.T).masked_fill(~own, float("-inf")), instance_ids)
    return {
        "base": base,
        "fine": fine,
        "indi": indi,
        "base_indi": base + LAMBDA * indi,
        "base_indi_eff": base + LAMBDA * indi_eff,
    }[name]


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_each_objective_is_its_equation(name):
    spec = OBJECTIVES[name]
    cfg = validate({"objective": {"name": name, "lambda_I": LAMBDA}, "head": {"kernel": "torch"}}, "test")
    plan = make_plan(manifest_with_sizes(SIZES, num_fine=4), world_size=1)
    head = InstanceHead(plan, 0, DIM, seed=1) if spec.instance else None
    gen = torch.Generator().manual_seed(0)
    instance_ids = torch.tensor([0, 2, 3, 7, 8, 11, 9])
    super_ids = torch.bucketize(instance_ids, torch.tensor(SIZES).cumsum(0), right=True)
    fine_ids = instance_ids % 4
    outputs = {
        "features": torch.randn(7, DIM, generator=gen),
        "super_logits": torch.randn(7, 3, generator=gen),
        "fine_logits": torch.randn(7, 4, generator=gen),
    }
    parts = Objective(cfg, plan, 0, head)(outputs, super_ids, fine_ids, instance_ids)
    w = head.weight.detach() if head is not None else torch.zeros(12, DIM)
    want = paper_loss(name, outputs, w, super_ids, fine_ids, instance_ids)
    assert float(parts["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    trained = {"super_ce": spec.super_head, "fine_ce": spec.fine_head, "instance_ce": spec.instance is not None}
    assert set(parts) - {"loss"} == {part for part, on in trained.items() if on}


def test_an_instance_objective_without_its_head_is_an_error():
    cfg = validate({"objective": {"name": "base_indi_eff"}}, "test")
    plan = make_plan(manifest_with_sizes(SIZES), world_size=1)
    with pytest.raises(ValueError, match="'base_indi_eff' has an instance term and needs the instance head"):
        Objective(cfg, plan, 0, None)


@pytest.mark.parametrize(
    "name, schedule, progress, weight",
    [
        ("base_indi_eff", "constant", 0.5, LAMBDA),
        ("base_indi_eff", "cosine", 0.0, LAMBDA),
        ("base_indi_eff", "cosine", 0.5, LAMBDA / 2),
        ("base_indi_eff", "cosine", 1.0, 0.0),
        ("base_indi", "cosine", 0.25, LAMBDA * (1 + 2**-0.5) / 2),
        ("indi", "cosine", 0.5, 1.0),  # indi alone is not lambda-weighted (Eqn 3): no schedule
    ],
)
def test_lambda_schedule_weighs_the_instance_term(name, schedule, progress, weight):
    cfg = validate(
        {"objective": {"name": name, "lambda_I": LAMBDA, "lambda_I_schedule": schedule}, "head": {"kernel": "torch"}},
        "test",
    )
    plan = make_plan(manifest_with_sizes(SIZES), world_size=1)
    objective = Objective(cfg, plan, 0, InstanceHead(plan, 0, DIM, seed=1))
    objective.set_progress(progress)
    instance_ids = torch.tensor([0, 4, 9])
    super_ids = torch.bucketize(instance_ids, torch.tensor(SIZES).cumsum(0), right=True)
    gen = torch.Generator().manual_seed(0)
    outputs = {"features": torch.randn(3, DIM, generator=gen), "super_logits": torch.randn(3, 3, generator=gen)}
    parts = objective(outputs, super_ids, instance_ids % 4, instance_ids)
    want = parts.get("super_ce", 0.0) + weight * parts["instance_ce"]
    assert float(parts["loss"].detach()) == pytest.approx(float(want.detach()), rel=1e-6)


POOL = 7  # unlabeled images after the 12 labeled ones: columns 12..18
LAMBDA_U = 0.4
POOL_ROWS = {
    "mixed": [0, 13, 3, 18, 7, 12, 11, 15],
    "pool_only": [12, 16, 14],
    "labeled_only": [1, 4, 10],
}


def pool_oracle(x, super_logits, w, instance_ids, sizes=SIZES, pool=POOL, lambda_I=LAMBDA, lambda_U=LAMBDA_U):
    """The loss with a pool from its definition, with dense logits: a labeled row's softmax over
    its super-class's columns, an unlabeled row's (instance id >= sum(sizes)) over the pool's;
    super CE over labeled rows only; each part a mean over its rows (0 where there are none)."""
    bounds = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist(), sum(sizes) + pool])
    group = torch.bucketize(instance_ids, bounds[1:], right=True)
    labeled = group < len(sizes)
    col = torch.arange(w.shape[0])
    own = (col >= bounds[group, None]) & (col < bounds[group + 1, None])
    ce = F.cross_entropy((x @ w.T).masked_fill(~own, float("-inf")), instance_ids, reduction="none")
    zero = x.new_zeros(())
    super_ce = F.cross_entropy(super_logits[labeled], group[labeled], reduction="sum") / max(int(labeled.sum()), 1)
    instance = ce[labeled].mean() if labeled.any() else zero
    pool_term = ce[~labeled].mean() if (~labeled).any() else zero
    return super_ce + lambda_I * instance + lambda_U * pool_term


@pytest.mark.parametrize("rows", POOL_ROWS)
def test_the_pool_term_is_its_equation_in_loss_and_gradients(rows):
    """Backbone-free: features, super logits and head weights are leaves; loss and gradients
    against the dense oracle to 1e-6."""
    cfg = validate(
        {"objective": {"lambda_I": LAMBDA, "lambda_U": LAMBDA_U}, "head": {"kernel": "torch"}},
        "test",
    )
    plan = make_plan(manifest_with_sizes(SIZES, pool=POOL), world_size=1)
    head = InstanceHead(plan, 0, DIM, seed=1)
    instance_ids = torch.tensor(POOL_ROWS[rows])
    super_ids = torch.bucketize(instance_ids, torch.tensor(SIZES).cumsum(0), right=True)
    super_ids[instance_ids >= sum(SIZES)] = -1  # unlabeled: as the shards carry them
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(instance_ids), DIM, generator=gen, requires_grad=True)
    logits = torch.randn(len(instance_ids), len(SIZES), generator=gen, requires_grad=True)
    parts = Objective(cfg, plan, 0, head)({"features": x, "super_logits": logits}, super_ids, -1, instance_ids)
    assert set(parts) == {"super_ce", "instance_ce", "pool_ce", "loss"}
    parts["loss"].backward()
    x64, logits64 = x.detach().double().requires_grad_(), logits.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    want = pool_oracle(x64, logits64, w64, instance_ids)
    want.backward()
    assert abs(float(parts["loss"].detach()) - float(want.detach())) < 1e-6
    for got, oracle in ((x.grad, x64.grad), (logits.grad, logits64.grad), (head.weight.grad, w64.grad)):
        assert torch.allclose(got.double(), oracle, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in OBJECTIVE_NAMES if n != "base_indi_eff"])
def test_a_pool_trains_with_base_indi_eff_only(name):
    cfg = validate({"objective": {"name": name}}, "test")
    plan = make_plan(manifest_with_sizes(SIZES, num_fine=4, pool=POOL), world_size=1)
    head = InstanceHead(plan, 0, DIM, seed=1) if OBJECTIVES[name].instance else None
    with pytest.raises(ConfigError, match=rf"objective.name='{name}': the training split holds 7 unlabeled images"):
        Objective(cfg, plan, 0, head)


def test_lambda_U_is_a_weight():
    with pytest.raises(ConfigError, match=r"key 'objective.lambda_U': Input should be greater than or equal to 0"):
        validate({"objective": {"lambda_U": -0.1}}, "test")
    assert validate({}, "test").objective.lambda_U == 1.0
