"""The objective table drives the loss: on one rank each objective's loss is the paper's
equation, written here independently with plain cross-entropies (Eqn 1-5)."""

import pytest
import torch
import torch.nn.functional as F

from fgdist.config import validate
from fgdist.head import InstanceHead
from fgdist.objective_table import OBJECTIVE_NAMES, OBJECTIVES
from fgdist.objectives import Objective
from fgdist.partition import make_plan
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
