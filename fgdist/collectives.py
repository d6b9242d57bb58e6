"""Autograd-aware collectives over the default process group (gloo on CPU, NCCL on CUDA).

Gradient convention: every rank backpropagates its own loss; a tensor gathered from all ranks
sends each rank back the SUM over ranks of the gradients of its own rows. So the gradient that
reaches a rank's inputs is that of the sum of all ranks' losses (the same convention as
SyncBatchNorm; docs/DESIGN.md, "The gradient-scale rule"). With one process (or no process group)
every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_counts(count: int, device) -> list[int]:
    """Every rank's `count` (one small integer collective)."""
    rank, size = world()
    if size == 1:
        return [count]
    t = torch.tensor([count], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(size)]
    dist.all_gather(out, t)
    return [int(v) for v in out]


def _padded_gather(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; ranks may hold different row counts."""
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts):
        ctx.counts = counts
        return _padded_gather(x, counts)

    @staticmethod
    def backward(ctx, grad):
        rank, _ = world()
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's gradient for every gathered row, summed
        start = sum(ctx.counts[:rank])
        return grad[start : start + ctx.counts[rank]], None


def gather_rows(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's rows (differentiable). `counts` from gather_counts, if known."""
    _, size = world()
    if size == 1:
        return x
    counts = counts if counts is not None else gather_counts(x.shape[0], x.device)
    if x.requires_grad:
        return _GatherRows.apply(x, counts)
    return _padded_gather(x, counts)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (differentiable)."""
    return x if world()[1] == 1 else _AllReduceSum.apply(x)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average of a detached value over ranks (for logging)."""
    _, size = world()
    if size == 1:
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / size
