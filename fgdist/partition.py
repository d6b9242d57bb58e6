"""The column line (docs/DESIGN.md, "The column line"): instance columns laid out in instance-id order, so
super-classes are contiguous, and cut into `world_size` equal pieces. Rank r owns columns
[r*C, min((r+1)*C, n)), C = ceil(n / world_size). A pure function of the manifest and the world
size: a resume on another world size simply re-cuts the line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property

import torch

from fgdist.shardset import Manifest, ShardInfo


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Plan:
    world_size: int
    num_instances: int
    super_ranges: tuple[tuple[int, int], ...]  # per super id: [begin, end) instance ids

    @property
    def columns_per_rank(self) -> int:
        return math.ceil(self.num_instances / self.world_size)

    def column_range(self, rank: int) -> tuple[int, int]:
        c = self.columns_per_rank
        return min(rank * c, self.num_instances), min((rank + 1) * c, self.num_instances)

    def owners(self, super_id: int) -> list[int]:
        """Ranks holding at least one column of this super-class."""
        begin, end = self.super_ranges[super_id]
        if begin == end:
            return []
        c = self.columns_per_rank
        return list(range(begin // c, (end - 1) // c + 1))

    @cached_property
    def split_supers(self) -> list[int]:
        """Super-classes whose columns lie on more than one rank."""
        return [s for s in range(len(self.super_ranges)) if len(self.owners(s)) > 1]

    def local_groups(self, rank: int) -> tuple[list[int], list[int]]:
        """The super-classes with columns on `rank`, and their local column offsets
        (group g owns local columns [offsets[g], offsets[g+1]))."""
        lo, hi = self.column_range(rank)
        supers, offsets = [], [0]
        for s, (begin, end) in enumerate(self.super_ranges):
            a, b = max(begin, lo), min(end, hi)
            if a < b:
                supers.append(s)
                offsets.append(b - lo)
        return supers, offsets

    def shards_for_rank(self, manifest: Manifest, rank: int) -> list[ShardInfo]:
        """The shards overlapping the rank's columns (by_superclass routing)."""
        lo, hi = self.column_range(rank)
        return [s for s in manifest.shards if s.instance_begin < hi and s.instance_end > lo]

    def describe(self) -> dict:
        ranks = []
        for r in range(self.world_size):
            lo, hi = self.column_range(r)
            supers, _ = self.local_groups(r)
            ranks.append({"rank": r, "columns": [lo, hi], "super_classes": supers})
        return {
            "world_size": self.world_size,
            "num_instances": self.num_instances,
            "columns_per_rank": self.columns_per_rank,
            "split_super_classes": self.split_supers,
            "ranks": ranks,
        }

    def to_json(self) -> str:
        return json.dumps(self.describe(), indent=1)


def make_plan(manifest: Manifest, world_size: int, where: str = "shard set") -> Plan:
    if world_size < 1:
        raise PlanError(f"world size must be >= 1, got {world_size}")
    if world_size > manifest.num_instances:
        raise PlanError(
            f"world size {world_size} is larger than the number of instances ({manifest.num_instances}) in {where}: "
            f"rank {manifest.num_instances} and above would own no instance column"
        )
    plan = Plan(
        world_size, manifest.num_instances, tuple((s.instance_begin, s.instance_end) for s in manifest.super_classes)
    )
    empty = [r for r in range(world_size) if plan.column_range(r)[0] >= plan.column_range(r)[1]]
    if empty:
        raise PlanError(
            f"world size {world_size} leaves rank {empty[0]} without instance columns ({manifest.num_instances} "
            f"instances in {where}); use at most {math.ceil(manifest.num_instances / plan.columns_per_rank)} ranks"
        )
    return plan


def group_lookup(plan: Plan, rank: int, dense: bool, device=None):
    """Tensors the loss needs on `rank`: super id -> local group (-1 if none here) and the local
    column offsets. Dense mode (indi, base_indi) is one group holding every local column."""
    lo, hi = plan.column_range(rank)
    num_super = len(plan.super_ranges)
    if dense:
        return torch.zeros(num_super, dtype=torch.long, device=device), torch.tensor([0, hi - lo], device=device)
    supers, offsets = plan.local_groups(rank)
    lookup = torch.full((num_super,), -1, dtype=torch.long, device=device)
    lookup[torch.tensor(supers, dtype=torch.long)] = torch.arange(len(supers))
    return lookup, torch.tensor(offsets, dtype=torch.long, device=device)
