"""The five objectives as one loss module (what each one trains: fgdist/objective_table.py).
The instance term owns its collectives.

Instance loss of row i (Eqn 3 dense, Eqn 5 grouped):
    loss_i = logsumexp_{j in cols(i)} x_i . w_j  -  x_i . w_{y_I(i)}
where cols(i) is every column (a "dense" instance term: indi, base_indi) or the columns of row
i's super-class ("grouped": base_indi_eff). The columns are cut over ranks, so each rank
computes a partial logsumexp over its own columns and the partials are combined with a
logsumexp over ranks.

One mechanism crosses ranks: rows whose columns are not all local (rows of split super-classes,
every row under `shuffled` routing or in dense mode) are gathered to every rank, each rank
computes their partial statistics on its columns in the same kernel call as its local rows, and
the partials are gathered back and combined. Autograd through that combination gives each rank
the right gradient. Under by_superclass routing with no split super-class nothing is exchanged.
docs/DESIGN.md, "How a step runs" and "The gradient-scale rule", has the whole path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fgdist.collectives import gather_counts, gather_rows
from fgdist.config import ObjectiveConfig, RunConfig
from fgdist.head import InstanceHead
from fgdist.kernels import grouped_lse
from fgdist.model import instance_features
from fgdist.objective_table import OBJECTIVES
from fgdist.partition import Plan, group_lookup


def instance_ce_chance(counts: Sequence[int]) -> float:
    """The mean instance CE of a head that has learnt nothing (a uniform softmax), over the
    training images: a row whose softmax runs over n columns has CE ln n there, and a softmax
    group of n images gives n such rows an epoch, so the mean is sum(n ln n) / sum(n). `counts`:
    the group sizes, every training image in exactly one (softmax_group_sizes). With data.views=2
    every image's views count alike, so the mean is the same."""
    counts = list(counts)
    if any(n < 0 for n in counts) or sum(counts) == 0:
        raise ValueError(f"instance softmax group sizes must be >= 0 with at least one image, got {counts}")
    return sum(n * math.log(n) for n in counts if n) / sum(counts)


def softmax_group_sizes(plan: Plan, dense: bool) -> list[int]:
    """How many columns each row's instance softmax runs over, per group of rows: all of them
    (dense, Eqn 3) or its super-class's (grouped, Eqn 5)."""
    return [plan.num_instances] if dense else [end - begin for begin, end in plan.super_ranges]


class InstanceLoss(nn.Module):
    def __init__(
        self,
        plan: Plan,
        rank: int,
        head: InstanceHead,
        dense: bool,
        routing: str,
        logit: str,
        temperature: float,
        kernel: str,
    ):
        super().__init__()
        self.plan, self.rank, self.head = plan, rank, head
        self.dense, self.logit, self.temperature, self.kernel = dense, logit, temperature, kernel
        lookup, offsets = group_lookup(plan, rank, dense)
        self.register_buffer("group_of_super", lookup, persistent=False)
        self.register_buffer("col_offsets", offsets, persistent=False)
        # A row can be finished locally only if every column it needs is on this rank.
        needs_remote = [
            (dense and plan.world_size > 1) or plan.owners(s) != [rank] for s in range(len(plan.super_ranges))
        ]
        self.register_buffer("super_needs_remote", torch.tensor(needs_remote, dtype=torch.bool), persistent=False)
        # Known in advance on every rank: no row ever leaves its rank.
        self.never_exchange = plan.world_size == 1 or (
            not dense and routing == "by_superclass" and not plan.split_supers
        )
        # Rows this rank got whose columns are elsewhere although no row is ever exchanged (a
        # routing bug): counted on the device, read on logging steps (check_routing), so the
        # check costs no host sync per step.
        self.register_buffer("misrouted", torch.zeros((), dtype=torch.long), persistent=False)

    def _logit_inputs(self, x: torch.Tensor):
        w = self.head.weight_for_loss()
        if self.logit == "cosine":
            x = F.normalize(x, dim=1) / self.temperature
            w = F.normalize(w, dim=1)
        return x, w.to(x.dtype)

    def _partials(self, x, w, super_ids, instance_ids):
        """One kernel call: partial logsumexp and target logit of these rows on local columns."""
        target = instance_ids - self.head.column_begin
        target = torch.where((target >= 0) & (target < self.head.num_columns), target, torch.full_like(target, -1))
        self.head.record_visits(target, x)  # head.update=ema: these rows update their columns after the step
        return grouped_lse(x, w, self.group_of_super[super_ids], self.col_offsets, target, self.kernel)

    def forward(self, features: torch.Tensor, super_ids: torch.Tensor, instance_ids: torch.Tensor) -> torch.Tensor:
        """Per-row instance loss of this rank's rows, in their order."""
        x, w = self._logit_inputs(features)
        remote = self.super_needs_remote[super_ids]
        if self.never_exchange:
            self.misrouted += remote.sum()
            lse, target = self._partials(x, w, super_ids, instance_ids)
            return lse - target
        counts = gather_counts(remote.sum())  # a host read: the exchanged rows' shapes depend on it
        if sum(counts) == 0:
            lse, target = self._partials(x, w, super_ids, instance_ids)
            return lse - target
        local = (~remote).nonzero(as_tuple=True)[0]
        sent = remote.nonzero(as_tuple=True)[0]
        # Rows of all ranks that need columns beyond their own rank, in rank order.
        x_ex = gather_rows(x[sent], counts)
        super_ex = gather_rows(super_ids[sent], counts)
        inst_ex = gather_rows(instance_ids[sent], counts)
        lse, target = self._partials(
            torch.cat([x[local], x_ex]),
            w,
            torch.cat([super_ids[local], super_ex]),
            torch.cat([instance_ids[local], inst_ex]),
        )
        n_local = local.numel()
        loss = torch.empty(features.shape[0], dtype=lse.dtype, device=lse.device)
        loss = loss.index_put((local,), lse[:n_local] - target[:n_local])
        # Combine the exchanged rows' partials from every rank: logsumexp of the partial lse,
        # sum of the target logits (exactly one rank holds each target column).
        partial = torch.stack([lse[n_local:], target[n_local:]], dim=1)
        every_rank = gather_rows(partial, [partial.shape[0]] * self.plan.world_size).view(self.plan.world_size, -1, 2)
        combined = torch.logsumexp(every_rank[..., 0], dim=0) - every_rank[..., 1].sum(dim=0)
        start = sum(counts[: self.rank])
        return loss.index_put((sent,), combined[start : start + counts[self.rank]])

    def check_routing(self, misrouted: int) -> None:
        """Raise when rows reached a rank that does not own their columns (`misrouted`: the
        count summed over ranks since the start, read by the trainer on a logging step)."""
        if misrouted:
            raise RuntimeError(
                f"rank {self.rank}: {misrouted} row(s) reached a rank that does not own their super-class's "
                "columns; by_superclass routing must only send a rank its own super-classes"
            )


def lambda_I_at(objective: ObjectiveConfig, progress: float) -> float:
    """lambda_I after the fraction `progress` (0 to 1) of training, by objective.lambda_I_schedule."""
    if objective.lambda_I_schedule == "cosine":
        return objective.lambda_I * (1.0 + math.cos(math.pi * progress)) / 2.0
    return objective.lambda_I


class Objective(nn.Module):
    """Loss parts of one step. `outputs` come from the engine's model (features and head
    logits), labels from the batch; `head` is this rank's instance-head slice, or None for an
    objective without an instance term."""

    def __init__(self, cfg: RunConfig, plan: Plan, rank: int, head: InstanceHead | None):
        super().__init__()
        self.spec = OBJECTIVES[cfg.objective.name]
        self.objective_cfg = cfg.objective
        self.weights = self.spec.loss_weights(cfg.objective.lambda_I)
        self.instance = None
        if self.spec.instance is not None:
            if head is None:
                raise ValueError(f"objective {self.spec.name!r} has an instance term and needs the instance head")
            self.instance = InstanceLoss(
                plan,
                rank,
                head,
                self.spec.dense,
                cfg.data.routing,
                cfg.head.logit,
                cfg.head.temperature,
                cfg.head.kernel,
            )

    def set_progress(self, progress: float) -> None:
        """Where training stands (the fraction done, 0 to 1): the weights follow
        objective.lambda_I_schedule. A function of the position alone, so a resumed run, on any
        world size, weighs each step as the uninterrupted run did."""
        self.weights = self.spec.loss_weights(lambda_I_at(self.objective_cfg, progress))

    def forward(self, outputs: dict, super_ids, fine_ids, instance_ids) -> dict[str, torch.Tensor]:
        parts = {}
        if self.spec.super_head:
            parts["super_ce"] = F.cross_entropy(outputs["super_logits"].float(), super_ids)
        if self.spec.fine_head:
            parts["fine_ce"] = F.cross_entropy(outputs["fine_logits"].float(), fine_ids)
        if self.instance is not None:
            parts["instance_ce"] = self.instance(instance_features(outputs), super_ids, instance_ids).mean()
        parts["loss"] = sum(self.weights[k] * v for k, v in parts.items())
        return parts
