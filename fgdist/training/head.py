"""The partitioned instance head: rank r holds columns [begin, end) of W_I as an nn.Module
outside the DeepSpeed engine (the engine would broadcast it from rank 0 and all-reduce its
gradient). It has its own SGD that mirrors the backbone's schedule, keeps fp32 master weights,
and is saved per rank with its column range, so a resume on another world size re-cuts it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fgdist.config import HeadConfig, OptimConfig
from fgdist.data.partition import Plan
from fgdist.training.model import unit_features

# Columns per initialization block: each block has its own seed, so a column's initial weights
# do not depend on how the line is cut (1 rank and 2 ranks start from the same W_I).
INIT_BLOCK = 65536


def init_columns(begin: int, end: int, dim: int, seed: int) -> torch.Tensor:
    """Columns [begin, end) of the initial W_I: U(-1/sqrt(d), 1/sqrt(d)), as nn.Linear."""
    out = torch.empty(end - begin, dim)
    bound = 1.0 / math.sqrt(dim)
    for block in range(begin // INIT_BLOCK, math.ceil(end / INIT_BLOCK) if end > begin else 0):
        b0, b1 = block * INIT_BLOCK, (block + 1) * INIT_BLOCK
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.rand(INIT_BLOCK, dim, generator=gen) * 2 * bound - bound
        lo, hi = max(b0, begin), min(b1, end)
        out[lo - begin : hi - begin] = values[lo - b0 : hi - b0]
    return out


class InstanceHead(nn.Module):
    def __init__(self, plan: Plan, rank: int, dim: int, seed: int, update: str = "sgd", ema_momentum: float = 0.5):
        """update: `sgd` (the paper: W is trained by its optimizer) or `ema` (head.update: a memory
        bank, see apply_ema)."""
        super().__init__()
        self.column_begin, self.column_end = plan.column_range(rank)
        self.weight = nn.Parameter(init_columns(self.column_begin, self.column_end, dim, seed))
        self.optimizer = None
        self.scheduler = None
        self.update, self.ema_momentum = update, ema_momentum
        self.visits = None  # ema: (local column or -1, feature) of the rows of the last forward

    @classmethod
    def for_run(
        cls,
        plan: Plan,
        rank: int,
        dim: int,
        seed: int,
        head: HeadConfig,
        optim: OptimConfig,
        steps_per_epoch: int,
        device: torch.device,
    ) -> InstanceHead:
        """The slice a run trains, on `device`, with its optimizer: from the run's head section
        (update, ema_momentum, lr_mult, lr_schedule, weight_decay) and optimizer section."""
        out = cls(plan, rank, dim, seed, head.update, head.ema_momentum).to(device)
        out.build_optimizer(optim, head.lr_mult, steps_per_epoch, head.lr_schedule, head.weight_decay)
        return out

    @property
    def num_columns(self) -> int:
        return self.column_end - self.column_begin

    def build_optimizer(
        self,
        optim: OptimConfig,
        lr_mult: float,
        steps_per_epoch: int,
        schedule: str = "same",
        weight_decay: float | None = None,
    ) -> None:
        """SGD with the backbone's momentum, weight decay and milestones; lr x lr_mult. Weight
        decay is added to the gradient in place in `step` (torch's SGD would allocate a second
        slice-sized tensor for grad + wd * w every step). schedule `constant` drops the
        milestones (head.lr_schedule); weight_decay None follows optim.weight_decay."""
        self.weight_decay = optim.weight_decay if weight_decay is None else weight_decay
        self.optimizer = torch.optim.SGD(
            [self.weight], lr=optim.lr * lr_mult, momentum=optim.momentum, weight_decay=0.0
        )
        milestones = [m * steps_per_epoch for m in optim.milestones] if schedule == "same" else []
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=milestones, gamma=optim.gamma)

    def step(self, world_size: int) -> None:
        """Every rank backpropagated its own mean loss, so this slice's gradient is the sum of
        world_size per-rank means; dividing gives the gradient of the global-batch mean, the
        scale DeepSpeed gives the engine's averaged gradients. With head.update=ema there is no
        gradient: the step applies the memory-bank update instead."""
        self.apply_ema()
        if self.weight.grad is not None:
            self.weight.grad.div_(world_size).add_(self.weight.detach(), alpha=self.weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # -- head.update=ema and head.init=features: columns that are features ---------------------
    def weight_for_loss(self) -> torch.Tensor:
        """W as the loss sees it: fixed under ema (x still gets the loss's gradient through it)."""
        return self.weight.detach() if self.update == "ema" else self.weight

    def record_visits(self, target_col: torch.Tensor, features: torch.Tensor) -> None:
        """ema: remember the rows the loss computed on this rank (target_col: local column or -1;
        every row whose column is here, from any rank, is among them once). Applied by
        apply_ema after the backward pass, which still needs W unchanged."""
        if self.update == "ema":
            self.visits = (target_col.detach(), features.detach())

    @torch.no_grad()
    def apply_ema(self) -> None:
        """Each visited column c := normalize(m * c + (1 - m) * v), v = normalize(mean of the
        normalized features of the step's rows with that column): the two views of an image (or
        an image drawn twice) make one update, the same whatever the row order or rank count."""
        if self.visits is None:
            return
        target, features = self.visits
        self.visits = None
        here = target >= 0
        if not here.any():
            return
        columns, rows = torch.unique(target[here], return_inverse=True)
        feature_sum = torch.zeros(len(columns), features.shape[1], device=features.device, dtype=torch.float32)
        feature_sum.index_add_(0, rows, F.normalize(features[here].float(), dim=1))
        m = self.ema_momentum
        old = self.weight[columns].float()
        new = F.normalize(m * old + (1 - m) * F.normalize(feature_sum, dim=1), dim=1)
        self.weight[columns] = new.to(self.weight.dtype)

    @torch.no_grad()
    def init_from_features(self, batches, features_of) -> None:
        """head.init=features: every local column := the L2-normalized feature of its image.
        `batches` must hold each image of this rank's columns (data.own_column_batches);
        features_of(images) gives the instance term's input (projection output if any)."""
        written = torch.zeros(self.num_columns, dtype=torch.bool)
        for batch in batches:
            cols = batch["instance"] - self.column_begin
            if ((cols < 0) | (cols >= self.num_columns)).any():
                raise ValueError(
                    f"head.init=features: got instance {int(batch['instance'][0])}, not among this rank's columns "
                    f"[{self.column_begin}, {self.column_end})"
                )
            feature = unit_features(features_of(batch["images"]))
            self.weight[cols.to(self.weight.device)] = feature.to(self.weight.device, self.weight.dtype)
            written[cols] = True
        if not written.all():
            first = self.column_begin + int((~written).nonzero()[0])
            raise ValueError(
                f"head.init=features: {int((~written).sum())} of columns [{self.column_begin}, {self.column_end}) "
                f"got no image (first: column {first})"
            )

    # -- checkpoint: a slice with its column range; loading re-cuts the line -------------------
    def slice_state(self) -> dict:
        state = self.optimizer.state.get(self.weight, {}) if self.optimizer else {}
        return {
            "column_begin": self.column_begin,
            "column_end": self.column_end,
            "weight": self.weight.detach().cpu(),
            "momentum": state.get("momentum_buffer"),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
        }

    def load_slices(self, slices: list[dict], where: str) -> None:
        """Assemble this rank's columns from saved slices of any cut of the same line."""
        weight = torch.empty_like(self.weight.data)
        momentum = torch.zeros_like(weight)
        has_momentum = False
        covered = torch.zeros(self.num_columns, dtype=torch.bool)
        for s in sorted(slices, key=lambda s: s["column_begin"]):
            lo, hi = max(s["column_begin"], self.column_begin), min(s["column_end"], self.column_end)
            if lo >= hi:
                continue
            src = slice(lo - s["column_begin"], hi - s["column_begin"])
            dst = slice(lo - self.column_begin, hi - self.column_begin)
            weight[dst] = s["weight"][src]
            if s["momentum"] is not None:
                momentum[dst] = s["momentum"][src]
                has_momentum = True
            covered[dst] = True
        if not covered.all():
            first = int((~covered).nonzero()[0])
            end = first + int(covered[first:].int().argmax()) if covered[first:].any() else self.num_columns
            raise ValueError(
                f"{where}: saved head slices cover {int(covered.sum())} of columns [{self.column_begin}, "
                f"{self.column_end}); "
                f"columns [{self.column_begin + first}, {self.column_begin + end}) are missing"
            )
        self.weight.data.copy_(weight)
        if has_momentum and self.optimizer is not None:
            self.optimizer.state[self.weight]["momentum_buffer"] = momentum.to(self.weight.device)
        if self.scheduler is not None and slices and slices[0]["scheduler"] is not None:
            self.scheduler.load_state_dict(slices[0]["scheduler"])
            # MultiStepLR scales the optimizer's lr only when it passes a milestone; the fresh
            # optimizer holds the base lr, so a resume after a milestone would train at it.
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
