"""The column line (docs/DESIGN.md, "The column line"): instance columns laid out in instance-id order, so
super-classes are contiguous, and cut into `world_size` equal pieces. Rank r owns columns
[r*C, min((r+1)*C, n)), C = ceil(n / world_size). A pure function of the manifest and the world
size: a resume on another world size simply re-cuts the line.

Groups: the instance softmax of a grouped objective runs over one group's columns. Group b < B is
super-class b; with unlabeled training images, group B (`Plan.pool_group`) is the pool, whose
columns follow every super-class's. The pool is cut like any group and may be split too."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property

import torch

from fgdist.data.shardset import Manifest, ShardInfo


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Plan:
    world_size: int
    num_instances: int
    super_ranges: tuple[tuple[int, int], ...]  # per super id: [begin, end) instance ids
    pool_range: tuple[int, int] | None = None  # the unlabeled images' [begin, end), after the super-classes

    @property
    def group_ranges(self) -> tuple[tuple[int, int], ...]:
        """[begin, end) per group: the super-classes, then the pool if there is one."""
        return self.super_ranges + ((self.pool_range,) if self.pool_range else ())

    @property
    def pool_group(self) -> int | None:
        """The pool's group id (B, the number of super-classes), or None without a pool."""
        return len(self.super_ranges) if self.pool_range else None

    @property
    def columns_per_rank(self) -> int:
        return math.ceil(self.num_instances / self.world_size)

    def column_range(self, rank: int) -> tuple[int, int]:
        c = self.columns_per_rank
        return min(rank * c, self.num_instances), min((rank + 1) * c, self.num_instances)

    def owners(self, group: int) -> list[int]:
        """Ranks holding at least one column of this group (a super-class, or the pool)."""
        begin, end = self.group_ranges[group]
        if begin == end:
            return []
        c = self.columns_per_rank
        return list(range(begin // c, (end - 1) // c + 1))

    @cached_property
    def split_groups(self) -> list[int]:
        """Groups (super-classes, the pool) whose columns lie on more than one rank."""
        return [g for g in range(len(self.group_ranges)) if len(self.owners(g)) > 1]

    @property
    def split_supers(self) -> list[int]:
        """Super-classes whose columns lie on more than one rank."""
        return [g for g in self.split_groups if g != self.pool_group]

    def local_groups(self, rank: int) -> tuple[list[int], list[int]]:
        """The groups with columns on `rank` (super ids, and the pool's B), and their local column
        offsets (local group g owns local columns [offsets[g], offsets[g+1]))."""
        lo, hi = self.column_range(rank)
        groups, offsets = [], [0]
        for g, (begin, end) in enumerate(self.group_ranges):
            a, b = max(begin, lo), min(end, hi)
            if a < b:
                groups.append(g)
                offsets.append(b - lo)
        return groups, offsets

    def shards_for_rank(self, manifest: Manifest, rank: int) -> list[ShardInfo]:
        """The shards overlapping the rank's columns (by_superclass routing)."""
        lo, hi = self.column_range(rank)
        return [s for s in manifest.shards if s.instance_begin < hi and s.instance_end > lo]

    def describe(self) -> dict:
        ranks = []
        for r in range(self.world_size):
            lo, hi = self.column_range(r)
            groups, _ = self.local_groups(r)
            rank = {"rank": r, "columns": [lo, hi], "super_classes": [g for g in groups if g != self.pool_group]}
            if self.pool_group in groups:
                rank["pool_columns"] = [max(lo, self.pool_range[0]), min(hi, self.pool_range[1])]
            ranks.append(rank)
        described = {
            "world_size": self.world_size,
            "num_instances": self.num_instances,
            "columns_per_rank": self.columns_per_rank,
            "split_super_classes": self.split_supers,
            "ranks": ranks,
        }
        if self.pool_range:
            described["pool"] = {"columns": list(self.pool_range), "split": self.pool_group in self.split_groups}
        return described

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
    pool = (manifest.pool.instance_begin, manifest.pool.instance_end) if manifest.pool else None
    plan = Plan(
        world_size,
        manifest.num_instances,
        tuple((s.instance_begin, s.instance_end) for s in manifest.super_classes),
        pool,
    )
    empty = [r for r in range(world_size) if plan.column_range(r)[0] >= plan.column_range(r)[1]]
    if empty:
        raise PlanError(
            f"world size {world_size} leaves rank {empty[0]} without instance columns ({manifest.num_instances} "
            f"instances in {where}); use at most {math.ceil(manifest.num_instances / plan.columns_per_rank)} ranks"
        )
    return plan


def group_lookup(plan: Plan, rank: int, dense: bool, device=None):
    """Tensors the loss needs on `rank`: group id (super id, or B for the pool) -> local group (-1
    if none here) and the local column offsets. Dense mode (indi, base_indi) is one group holding
    every local column."""
    lo, hi = plan.column_range(rank)
    num_groups = len(plan.group_ranges)
    if dense:
        return torch.zeros(num_groups, dtype=torch.long, device=device), torch.tensor([0, hi - lo], device=device)
    groups, offsets = plan.local_groups(rank)
    lookup = torch.full((num_groups,), -1, dtype=torch.long, device=device)
    lookup[torch.tensor(groups, dtype=torch.long)] = torch.arange(len(groups))
    return lookup, torch.tensor(offsets, dtype=torch.long, device=device)
