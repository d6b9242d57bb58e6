"""One meaning of the loss everywhere: a fixed global batch gives the same loss and the same
gradients (backbone, super/fine heads, every head slice) on 1 rank and on 2 gloo ranks, for every
objective, both routings, and a plan with a super-class split across the two ranks."""

import io
import itertools
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fgdist.config import validate
from fgdist.head import InstanceHead
from fgdist.model import CrossRankBatchNorm2d
from fgdist.objective_table import OBJECTIVE_NAMES, OBJECTIVES
from fgdist.objectives import Objective
from fgdist.partition import make_plan
from tests.helpers import free_port, init_gloo, manifest_with_sizes

SIZES = {"no_split": [5, 4, 9], "split": [5, 7, 6]}  # n=18, two ranks own 9 columns each
ROUTINGS = ["by_superclass", "shuffled"]
DIM, BATCH = 16, 12
CASES = list(itertools.product(SIZES, OBJECTIVE_NAMES, ROUTINGS))


class TinyNet(nn.Module):
    """A small backbone with cross-rank BatchNorm and the engine heads."""

    def __init__(self, num_super, num_fine):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = CrossRankBatchNorm2d(8)
        self.proj = nn.Linear(8, DIM)
        self.super_head = nn.Linear(DIM, num_super)
        self.fine_head = nn.Linear(DIM, num_fine)

    def forward(self, x):
        f = self.proj(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))
        return {"features": f, "super_logits": self.super_head(f), "fine_logits": self.fine_head(f)}


def global_batch(sizes):
    gen = torch.Generator().manual_seed(1)
    n = sum(sizes)
    # Pick rows so that each of the two ranks owns exactly half of them (by instance id).
    inst = torch.cat(
        [torch.randperm(9, generator=gen)[: BATCH // 2], 9 + torch.randperm(n - 9, generator=gen)[: BATCH // 2]]
    )
    bounds = torch.tensor(sizes).cumsum(0)
    sup = torch.bucketize(inst, bounds, right=True)
    fine = (inst * 7) % 6
    images = torch.randn(BATCH, 3, 6, 6, generator=gen)
    return images, sup, fine, inst


def run_case(sizes, objective, routing, rank, world):
    cfg = validate(
        {"objective": {"name": objective, "lambda_I": 0.7}, "data": {"routing": routing}, "head": {"kernel": "torch"}},
        "test",
    )
    manifest = manifest_with_sizes(sizes, num_fine=6)
    plan = make_plan(manifest, world)
    net = TinyNet(len(sizes), 6)
    head = InstanceHead(plan, rank, DIM, seed=3)
    loss_fn = Objective(cfg, plan, rank, head if OBJECTIVES[objective].instance else None)
    images, sup, fine, inst = global_batch(sizes)
    if world == 2:
        # by_superclass: rows go to the rank owning their instance column; shuffled: any split.
        rows = (inst // 9 == rank) if routing == "by_superclass" else (torch.arange(BATCH) % 2 == rank)
        images, sup, fine, inst = images[rows], sup[rows], fine[rows], inst[rows]
    parts = loss_fn(net(images), sup, fine, inst)
    parts["loss"].backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    head_grad = head.weight.grad / world if head.weight.grad is not None else None
    return parts["loss"].detach(), grads, head_grad, head.column_begin


def worker(rank, world, port, queue):
    try:
        compute_all_cases(rank, world, port, queue)
    except BaseException:
        queue.put((rank, traceback.format_exc()))
        raise


def compute_all_cases(rank, world, port, queue):
    init_gloo(rank, world, port)
    results = {}
    for case in CASES:
        sizes = SIZES[case[0]]
        loss, grads, head_grad, begin = run_case(sizes, case[1], case[2], rank, world)
        # What DeepSpeed does to engine gradients: average over ranks.
        loss_mean = loss.clone()
        torch.distributed.all_reduce(loss_mean)
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g /= world
        results[case] = (float(loss_mean / world), grads, head_grad, begin)
    buf = io.BytesIO()  # plain bytes: tensors shared through the queue die with this process
    torch.save(results, buf)
    queue.put((rank, buf.getvalue()))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, data = queue.get(timeout=300)
            assert not isinstance(data, str), f"rank {rank} failed:\n{data}"
            results[rank] = torch.load(io.BytesIO(data))
    finally:
        for p in procs:
            p.join(timeout=30)
            p.kill()
    return results


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_same_loss_and_gradients_on_one_and_two_ranks(case, two_rank_results):
    sizes = SIZES[case[0]]
    loss1, grads1, head1, _ = run_case(sizes, case[1], case[2], rank=0, world=1)
    for rank in (0, 1):
        loss2, grads2, head2, begin = two_rank_results[rank][case]
        assert abs(loss2 - float(loss1)) < 1e-5, (rank, loss2, float(loss1))
        assert grads1.keys() == grads2.keys()
        for name in grads1:
            assert torch.allclose(grads1[name], grads2[name], atol=1e-5), name
        if head1 is not None:
            assert torch.allclose(head1[begin : begin + head2.shape[0]], head2, atol=1e-6)
            assert head2.abs().sum() > 0
