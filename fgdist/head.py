"""The partitioned instance head: rank r holds columns [begin, end) of W_I as an nn.Module
outside the DeepSpeed engine (the engine would broadcast it from rank 0 and all-reduce its
gradient). It has its own SGD that mirrors the backbone's schedule, keeps fp32 master weights,
and is saved per rank with its column range, so a resume on another world size re-cuts it."""

from __future__ import annotations

import math

import torch
from torch import nn

from fgdist.config import OptimConfig
from fgdist.partition import Plan

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
    def __init__(self, plan: Plan, rank: int, dim: int, seed: int):
        super().__init__()
        self.column_begin, self.column_end = plan.column_range(rank)
        self.weight = nn.Parameter(init_columns(self.column_begin, self.column_end, dim, seed))
        self.optimizer = None
        self.scheduler = None

    @property
    def num_columns(self) -> int:
        return self.column_end - self.column_begin

    def build_optimizer(self, optim: OptimConfig, lr_mult: float, steps_per_epoch: int) -> None:
        """SGD with the backbone's momentum, weight decay and milestones; lr x lr_mult. Weight
        decay is added to the gradient in place in `step` (torch's SGD would allocate a second
        slice-sized tensor for grad + wd * w every step)."""
        self.weight_decay = optim.weight_decay
        self.optimizer = torch.optim.SGD(
            [self.weight], lr=optim.lr * lr_mult, momentum=optim.momentum, weight_decay=0.0
        )
        milestones = [m * steps_per_epoch for m in optim.milestones]
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=milestones, gamma=optim.gamma)

    def step(self, world_size: int) -> None:
        """Every rank backpropagated its own mean loss, so this slice's gradient is the sum of
        world_size per-rank means; dividing gives the gradient of the global-batch mean, the
        scale DeepSpeed gives the engine's averaged gradients."""
        if self.weight.grad is not None:
            self.weight.grad.div_(world_size).add_(self.weight.detach(), alpha=self.weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

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
