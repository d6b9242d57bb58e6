"""The five objectives in one table: which heads each trains, how its instance term is cut, and
how the loss parts are weighted. Everything that depends on the objective reads this table: the
config's allowed names (fgdist.config), the loss (fgdist.training.objectives), the model's heads and the
evaluation (fgdist.training.trainer), the comparison table's order and lambda_I column
(fgdist.report.comparison), `launcher/train.py --objective`, and the tests that run every objective
(tests/unit/test_objectives.py, test_config.py, tests/integration/test_loss_equivalence.py).

This module imports nothing heavy (no torch), so that the config can import it. docs/DESIGN.md,
"The objectives", has the equations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Columns the instance term of a row runs its softmax over: every column of W_I ("dense",
# Eqn 3, cost O(d n)) or only the columns of the row's own super-class ("grouped", Eqn 5,
# cost O(d n_b)).
InstanceColumns = Literal["dense", "grouped"]


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    paper: str  # where the paper defines it
    super_head: bool  # trains the super-class head (super-class CE, weight 1)
    fine_head: bool  # trains the fine head (fine-class CE, weight 1; needs fine labels)
    instance: InstanceColumns | None  # the instance term, if any, and over which columns
    lambda_weighted: bool  # the instance term is added as lambda_I x term (Eqn 4, 5), else weight 1

    @property
    def dense(self) -> bool:
        return self.instance == "dense"

    def loss_weights(self, lambda_I: float) -> dict[str, float]:
        """Weight of each loss part this objective has, by the part's name."""
        weights = {}
        if self.super_head:
            weights["super_ce"] = 1.0
        if self.fine_head:
            weights["fine_ce"] = 1.0
        if self.instance is not None:
            weights["instance_ce"] = lambda_I if self.lambda_weighted else 1.0
        return weights


# In the paper's order (Section 3); the comparison table lists runs in this order.
OBJECTIVES: dict[str, ObjectiveSpec] = {
    spec.name: spec
    for spec in (
        ObjectiveSpec("base", "Eqn 1", super_head=True, fine_head=False, instance=None, lambda_weighted=False),
        ObjectiveSpec("fine", "Eqn 2", super_head=False, fine_head=True, instance=None, lambda_weighted=False),
        ObjectiveSpec("indi", "Eqn 3", super_head=False, fine_head=False, instance="dense", lambda_weighted=False),
        ObjectiveSpec("base_indi", "Eqn 4", super_head=True, fine_head=False, instance="dense", lambda_weighted=True),
        ObjectiveSpec(
            "base_indi_eff", "Eqn 5", super_head=True, fine_head=False, instance="grouped", lambda_weighted=True
        ),
    )
}
OBJECTIVE_NAMES: tuple[str, ...] = tuple(OBJECTIVES)
