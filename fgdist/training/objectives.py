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
the right gradient. Under by_superclass routing with no split group nothing is exchanged.
docs/DESIGN.md, "How a step runs" and "The gradient-scale rule", has the whole path.

Unlabeled training images (the pool, super id -1) are one more group of columns, B, after the
super-classes: a pool row's instance term is the softmax over the pool's columns (Eqn 3 on
unlabeled data, the same kernel call); it adds no super-class CE. With a pool the parts are means
over the GLOBAL batch (docs/DESIGN.md, "The pool"):
    loss = super_ce + lambda_I * instance_ce + lambda_U * pool_ce
super_ce and instance_ce over the labeled rows of all ranks, pool_ce over the pool rows of all
ranks, so 1 rank and k ranks give the same loss however the rows of each kind fall on the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fgdist.collectives import gather_counts, gather_rows, sum_over_ranks
from fgdist.config import ConfigError, ObjectiveConfig, RunConfig
from fgdist.data.partition import Plan, group_lookup
from fgdist.data.shardset import UNLABELED
from fgdist.kernels import grouped_lse
from fgdist.objective_table import OBJECTIVES
from fgdist.training.head import InstanceHead
from fgdist.training.model import instance_features


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
    """How many columns a labeled row's instance softmax runs over, per group of rows: all of them
    (dense, Eqn 3) or its super-class's (grouped, Eqn 5). The pool's rows are not among them:
    their term is pool_ce, at chance ln(pool size)."""
    return [plan.num_instances] if dense else [end - begin for begin, end in plan.super_ranges]


def check_pool_objective(name: str, plan: Plan) -> None:
    """Unlabeled images train only through a grouped instance term (their own group, the pool):
    another objective would give them a super-class CE they have no label for (base, fine) or fold
    them into a dense softmax that lambda_U could not weigh (indi, base_indi)."""
    if plan.pool_range is None or OBJECTIVES[name].instance == "grouped":
        return
    grouped = [n for n, spec in OBJECTIVES.items() if spec.instance == "grouped"]
    count = plan.pool_range[1] - plan.pool_range[0]
    raise ConfigError(
        f"objective.name={name!r}: the training split holds {count} unlabeled images (a pool), which only "
        f"{' or '.join(map(repr, grouped))} trains on; set objective.name={grouped[0]}, or use data.shards "
        "built without unlabeled images"
    )


# The columns of an exchanged row's partials: its logsumexp over a rank's columns, its target logit
PARTIAL_LSE, PARTIAL_TARGET = 0, 1


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
            (dense and plan.world_size > 1) or plan.owners(g) != [rank] for g in range(len(plan.group_ranges))
        ]
        self.register_buffer("group_needs_remote", torch.tensor(needs_remote, dtype=torch.bool), persistent=False)
        # Known in advance on every rank: no row ever leaves its rank.
        self.never_exchange = plan.world_size == 1 or (
            not dense and routing == "by_superclass" and not plan.split_groups
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

    def _partials(self, x, w, groups, instance_ids):
        """One kernel call: partial logsumexp and target logit of these rows on local columns."""
        target = instance_ids - self.head.column_begin
        target = torch.where((target >= 0) & (target < self.head.num_columns), target, torch.full_like(target, -1))
        self.head.record_visits(target, x)  # head.update=ema: these rows update their columns after the step
        return grouped_lse(x, w, self.group_of_super[groups], self.col_offsets, target, self.kernel)

    def forward(self, features: torch.Tensor, groups: torch.Tensor, instance_ids: torch.Tensor) -> torch.Tensor:
        """Per-row instance loss of this rank's rows, in their order. `groups`: each row's group
        (its super id, or the plan's pool_group for an unlabeled row)."""
        x, w = self._logit_inputs(features)
        remote = self.group_needs_remote[groups]
        if self.never_exchange:
            self.misrouted += remote.sum()
            lse, target = self._partials(x, w, groups, instance_ids)
            return lse - target
        counts = gather_counts(remote.sum())  # a host read: the exchanged rows' shapes depend on it
        if sum(counts) == 0:
            lse, target = self._partials(x, w, groups, instance_ids)
            return lse - target
        local = (~remote).nonzero(as_tuple=True)[0]
        sent = remote.nonzero(as_tuple=True)[0]
        # Rows of all ranks that need columns beyond their own rank, in rank order.
        x_ex = gather_rows(x[sent], counts)
        group_ex = gather_rows(groups[sent], counts)
        inst_ex = gather_rows(instance_ids[sent], counts)
        lse, target = self._partials(
            torch.cat([x[local], x_ex]),
            w,
            torch.cat([groups[local], group_ex]),
            torch.cat([instance_ids[local], inst_ex]),
        )
        n_local = local.numel()
        loss = torch.empty(features.shape[0], dtype=lse.dtype, device=lse.device)
        loss = loss.index_put((local,), lse[:n_local] - target[:n_local])
        # Combine the exchanged rows' partials from every rank: logsumexp of the partial lse,
        # sum of the target logits (exactly one rank holds each target column).
        partial = torch.stack([lse[n_local:], target[n_local:]], dim=1)  # columns PARTIAL_LSE, PARTIAL_TARGET
        every_rank = gather_rows(partial, [partial.shape[0]] * self.plan.world_size).view(self.plan.world_size, -1, 2)
        combined = torch.logsumexp(every_rank[..., PARTIAL_LSE], dim=0) - every_rank[..., PARTIAL_TARGET].sum(dim=0)
        start = sum(counts[: self.rank])
        return loss.index_put((sent,), combined[start : start + counts[self.rank]])

    def check_routing(self, misrouted: int) -> None:
        """Raise when rows reached a rank that does not own their columns (`misrouted`: the
        count summed over ranks since the start, read by the trainer on a logging step)."""
        if misrouted:
            raise RuntimeError(
                f"rank {self.rank}: {misrouted} row(s) reached a rank that does not own their group's "
                "columns; by_superclass routing must only send a rank its own super-classes (and pool rows)"
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
        check_pool_objective(cfg.objective.name, plan)
        self.spec = OBJECTIVES[cfg.objective.name]
        self.objective_cfg = cfg.objective
        self.pool_group, self.world_size = plan.pool_group, plan.world_size
        self.weights = self.loss_weights(cfg.objective.lambda_I)
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
        self.weights = self.loss_weights(lambda_I_at(self.objective_cfg, progress))

    def loss_weights(self, lambda_I: float) -> dict[str, float]:
        """The objective's weights, and lambda_U for the pool term where there is a pool."""
        weights = self.spec.loss_weights(lambda_I)
        if self.pool_group is not None:
            weights["pool_ce"] = self.objective_cfg.lambda_U
        return weights

    def forward(self, outputs: dict, super_ids, fine_ids, instance_ids) -> dict[str, torch.Tensor]:
        if self.pool_group is None:
            parts = self._parts(outputs, super_ids, fine_ids, instance_ids)
        else:
            parts = self._pool_parts(outputs, super_ids, instance_ids)
        parts["loss"] = sum(self.weights[k] * v for k, v in parts.items())
        return parts

    def _parts(self, outputs: dict, super_ids, fine_ids, instance_ids) -> dict[str, torch.Tensor]:
        """Each part the mean over this rank's rows (every rank has batch_size rows)."""
        parts = {}
        if self.spec.super_head:
            parts["super_ce"] = F.cross_entropy(outputs["super_logits"].float(), super_ids)
        if self.spec.fine_head:
            parts["fine_ce"] = F.cross_entropy(outputs["fine_logits"].float(), fine_ids)
        if self.instance is not None:
            parts["instance_ce"] = self.instance(instance_features(outputs), super_ids, instance_ids).mean()
        return parts

    def _pool_parts(self, outputs: dict, super_ids, instance_ids) -> dict[str, torch.Tensor]:
        """base_indi_eff with a pool: each part a sum over this rank's rows of its kind divided by
        the count of such rows over all ranks, times the world size. DeepSpeed (and
        InstanceHead.step) average the ranks' gradients, so the gradient is that of the global
        batch's means, and the parts averaged over ranks (the logged values) are those means."""
        labeled = super_ids != UNLABELED
        # Rows of each kind in the global batch: one small all-reduce, no host read.
        counts = sum_over_ranks(torch.stack([labeled.sum(), (~labeled).sum()]))
        scale = self.world_size / counts.clamp(min=1).float()
        groups = torch.where(labeled, super_ids, self.pool_group)
        per_row = self.instance(instance_features(outputs), groups, instance_ids)
        zero = per_row.new_zeros(())
        super_ce = F.cross_entropy(outputs["super_logits"].float(), super_ids, ignore_index=UNLABELED, reduction="sum")
        return {
            "super_ce": super_ce * scale[0],
            "instance_ce": torch.where(labeled, per_row, zero).sum() * scale[0],
            "pool_ce": torch.where(labeled, zero, per_row).sum() * scale[1],
        }
