"""Every collective of fgdist, on the communication device (docs/DESIGN.md, "Collectives, launchers,
precision and ZeRO").

The communication device is the backend's: this process's GPU under NCCL (which takes only CUDA
tensors), the CPU under gloo. `comm_device()` is the one place that decides it, and every helper
below moves its input there and its result back to the caller's device, so a caller may hand in a
tensor from anywhere (features on the GPU, a CPU counter) and no code outside this module calls a
`torch.distributed` collective (tests/comm_check/sitecustomize.py enforces both in a real run).

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


def comm_device() -> torch.device:
    """Where a tensor handed to a collective must live: the current GPU when the default group's
    backend is NCCL, else the CPU (gloo, or no process group)."""
    if world()[1] > 1 and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_comm(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of x on the communication device (a collective may write into it)."""
    return x.detach().to(comm_device(), copy=True).contiguous()


def _checked(x: torch.Tensor) -> torch.Tensor:
    """x, after checking it is on the communication device: the error NCCL would give is cryptic."""
    if x.device != comm_device():
        raise RuntimeError(f"rank {world()[0]}: collective on a {x.device} tensor; the backend needs {comm_device()}")
    return x


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of x (not differentiable), on x's device."""
    y = _checked(_to_comm(x))
    dist.all_reduce(y)
    return y.to(x.device)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def leave() -> None:
    """End this process's part in the process group, after every rank has reached this point.

    Destroying the groups joins gloo's threads while the process is whole. Left to the interpreter's
    exit, a rank that finished before another (rank 0 still publishing the model) sometimes died of
    SIGABRT ("terminate called without an active exception"; bench/RESULTS.md, the stress loop)."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def gather_counts(count: int | torch.Tensor) -> list[int]:
    """Every rank's `count` (an int, or a 0-d tensor on any device). One small collective and one
    read to the host: the row counts decide tensor shapes, so the host needs them."""
    rank, size = world()
    if size == 1:
        return [int(count)]
    t = _checked(torch.as_tensor(count).reshape(1).to(comm_device(), torch.long))
    out = [torch.zeros_like(t) for _ in range(size)]
    dist.all_gather(out, t)
    return torch.cat(out).tolist()


def _padded_gather(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; ranks may hold different row counts."""
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]), device=comm_device())
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, _checked(padded))
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts):
        ctx.counts = counts
        return _padded_gather(x, counts)

    @staticmethod
    def backward(ctx, grad):
        rank, _ = world()
        grad = _all_reduce(grad)  # every rank's gradient for every gathered row, summed
        start = sum(ctx.counts[:rank])
        return grad[start : start + ctx.counts[rank]], None


def gather_rows(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's rows (differentiable). `counts` from gather_counts, if known."""
    _, size = world()
    if size == 1:
        return x
    counts = counts if counts is not None else gather_counts(x.shape[0])
    if x.requires_grad:
        return _GatherRows.apply(x, counts)
    return _padded_gather(x, counts)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (differentiable)."""
    return x if world()[1] == 1 else _AllReduceSum.apply(x)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum of a detached value over ranks, on x's device (counters, flags, metric sums)."""
    return x.detach() if world()[1] == 1 else _all_reduce(x)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average of a detached value over ranks, on x's device (for logging)."""
    return sum_over_ranks(x) / world()[1]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any rank (ranks that must fail together)."""
    return bool(sum_over_ranks(torch.tensor([float(flag)])).item())
