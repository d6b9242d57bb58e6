"""One meaning of the loss everywhere: a fixed global batch gives the same loss and the same
gradients (backbone, super/fine heads, every head slice) on 1 rank and on 2 gloo ranks, for every
objective, both routings, and a plan with a super-class split across the two ranks.

The instance options (issue 11) keep it: two views per image, a projection MLP, cosine logits
and the ema memory bank (the columns after the update equal too), and head.init=features on a
real shard set with a split super-class (each rank writes its own columns from its own images).

Real backbones keep it too (issue 20): a torchvision ResNet-18 (BatchNorm2d made cross-rank,
ImageNet stem), timm's MobileNetV3 (its BatchNormAct2d layers made cross-rank, a 1024-wide f(x)
and instance head) and timm's ViT-Tiny (LayerNorm, per image), each in the product's case only
(base_indi_eff, by_superclass routing, a split super-class), to keep this test's time.

Unlabeled images (issue 21) keep it: a pool of 10 after two super-classes, split over the two
ranks (rank 1 holds only pool rows under by_superclass routing), both routings; the 1-rank loss
is also the dense oracle's (tests/unit/test_objectives.py pool_oracle)."""

import io
import itertools
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fgdist.config import DataConfig, ModelConfig, validate
from fgdist.data.loader import EvalStream, collate, deal, own_column_batches, shard_urls
from fgdist.data.partition import make_plan
from fgdist.data.shardset import open_split
from fgdist.objective_table import OBJECTIVE_NAMES, OBJECTIVES
from fgdist.training.head import InstanceHead
from fgdist.training.model import (
    CrossRankBatchNorm2d,
    EmbeddingNet,
    convert_batchnorm,
    instance_features,
    projection_mlp,
)
from fgdist.training.objectives import Objective
from tests.helpers import free_port, init_gloo, manifest_with_sizes, tiny_synthetic
from tests.unit.test_objectives import pool_oracle

LABELED = {"no_split": [5, 4, 9], "split": [5, 7, 6]}  # n=18, two ranks own 9 columns each
POOL = {"pool_split": 10}  # unlabeled images after the super-classes: columns 8..17, on both ranks
SIZES = {**LABELED, "pool_split": [5, 3]}
ROUTINGS = ["by_superclass", "shuffled"]
DIM, BATCH = 16, 12
PROJECTION_DIM = 8
# paper: today's recipe; combined: views=2, projection mlp, cosine logits, ema head
CASES = (
    [(*c, "paper") for c in itertools.product(LABELED, OBJECTIVE_NAMES, ROUTINGS)]
    + [(*c, "combined") for c in itertools.product(LABELED, ["base", "base_indi", "base_indi_eff"], ROUTINGS)]
    + [("split", "base_indi_eff", "by_superclass", backbone) for backbone in ("resnet18", "timm_cnn", "timm_vit")]
    + [("pool_split", "base_indi_eff", routing, "paper") for routing in ROUTINGS]
)
BACKBONES = {  # real networks at 32x32, built as the trainer builds them
    "resnet18": ModelConfig(arch="resnet18", width=64, stem="imagenet"),  # torchvision's own
    "timm_cnn": ModelConfig(arch="timm:mobilenetv3_small_050"),
    "timm_vit": ModelConfig(arch="timm:vit_tiny_patch16_224", kwargs={"img_size": 32}),
}
# head.init=features: 3 super-classes of 6 training images; on 2 ranks super-class 1 is split
INIT_SHARDS = {"num_super": 3, "fine_per_super": 2, "train_per_fine": 3, "test_per_fine": 1}


class TinyNet(nn.Module):
    """A small backbone with cross-rank BatchNorm and the engine heads."""

    def __init__(self, num_super, num_fine, projection=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = CrossRankBatchNorm2d(8)
        self.proj = nn.Linear(8, DIM)
        self.super_head = nn.Linear(DIM, num_super)
        self.fine_head = nn.Linear(DIM, num_fine)
        self.projection = projection_mlp(DIM, PROJECTION_DIM) if projection else None

    def forward(self, x):
        f = self.proj(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))
        out = {"features": f, "super_logits": self.super_head(f), "fine_logits": self.fine_head(f)}
        if self.projection is not None:
            out["projection"] = self.projection(f)
        return out


def global_batch(sizes, image_size=6, pool=0):
    gen = torch.Generator().manual_seed(1)
    n = sum(sizes) + pool
    # Pick rows so that each of the two ranks owns exactly half of them (by instance id).
    inst = torch.cat(
        [torch.randperm(9, generator=gen)[: BATCH // 2], 9 + torch.randperm(n - 9, generator=gen)[: BATCH // 2]]
    )
    bounds = torch.tensor(sizes).cumsum(0)
    unlabeled = inst >= sum(sizes)  # the pool's rows carry no labels (super and fine id -1)
    sup = torch.bucketize(inst, bounds, right=True).masked_fill(unlabeled, -1)
    fine = ((inst * 7) % 6).masked_fill(unlabeled, -1)
    images = torch.randn(BATCH, 3, image_size, image_size, generator=gen)
    return images, sup, fine, inst


def two_views(images, sup, fine, inst):
    """Rows as data.views=2 makes them: each image's two views consecutive, labels repeated."""
    gen = torch.Generator().manual_seed(2)
    second = images.flip(-1) + 0.1 * torch.randn(images.shape, generator=gen)
    images = torch.stack([images, second], dim=1).flatten(0, 1)
    return (images, *(t.repeat_interleave(2) for t in (sup, fine, inst)))


def run_case(sizes, objective, routing, options, rank, world, pool=0):
    combined = options == "combined"
    head_cfg = {"kernel": "torch"}
    if combined:
        head_cfg.update(logit="cosine", temperature=0.2, update="ema", ema_momentum=0.6)
    cfg = validate(
        {"objective": {"name": objective, "lambda_I": 0.7}, "data": {"routing": routing}, "head": head_cfg}, "test"
    )
    manifest = manifest_with_sizes(sizes, num_fine=6, pool=pool)
    plan = make_plan(manifest, world)
    real = options in BACKBONES
    if real:
        torch.manual_seed(0)
        net = convert_batchnorm(EmbeddingNet(BACKBONES[options], len(sizes), 6)).train()
        dim = net.instance_dim
    else:
        net, dim = TinyNet(len(sizes), 6, projection=combined), PROJECTION_DIM if combined else DIM
    head = InstanceHead(plan, rank, dim, seed=3, update=cfg.head.update, ema_momentum=0.6)
    loss_fn = Objective(cfg, plan, rank, head if OBJECTIVES[objective].instance else None)
    images, sup, fine, inst = global_batch(sizes, image_size=32 if real else 6, pool=pool)
    image_of_row = torch.arange(BATCH)
    if combined:
        images, sup, fine, inst = two_views(images, sup, fine, inst)
        image_of_row = image_of_row.repeat_interleave(2)
    if world == 2:
        # by_superclass: rows go to the rank owning their instance column; shuffled: any split
        # (both views of an image on the same rank, as the data streams make them).
        rows = (inst // 9 == rank) if routing == "by_superclass" else (image_of_row % 2 == rank)
        images, sup, fine, inst = images[rows], sup[rows], fine[rows], inst[rows]
    parts = loss_fn(net(images), sup, fine, inst)
    parts["loss"].backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    head_grad = head.weight.grad / world if head.weight.grad is not None else None
    head.apply_ema()  # what InstanceHead.step does first; a no-op without ema
    return parts["loss"].detach(), grads, head_grad, head.column_begin, head.weight.detach().clone()


def init_case(shards, rank, world):
    """head.init=features on this rank's own images (projection output, eval mode)."""
    split = open_split(shards, "train")
    plan = make_plan(split.manifest, world)
    net = TinyNet(3, 6, projection=True).eval()
    head = InstanceHead(plan, rank, PROJECTION_DIM, seed=3)
    batches = own_column_batches(split, plan, DataConfig(shards=shards, num_workers=0), 4, rank)
    head.init_from_features(batches, lambda images: instance_features(net(images)))
    return head.column_begin, head.weight.detach().clone(), plan.split_supers


def worker(rank, world, port, queue, shards):
    try:
        compute_all_cases(rank, world, port, queue, shards)
    except BaseException:
        queue.put((rank, traceback.format_exc()))
        raise


def compute_all_cases(rank, world, port, queue, shards):
    init_gloo(rank, world, port)
    results = {"init": init_case(shards, rank, world)}
    for case in CASES:
        sizes = SIZES[case[0]]
        loss, grads, head_grad, begin, head_after = run_case(sizes, *case[1:], rank, world, POOL.get(case[0], 0))
        # What DeepSpeed does to engine gradients: average over ranks.
        loss_mean = loss.clone()
        torch.distributed.all_reduce(loss_mean)
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g /= world
        results[case] = (float(loss_mean / world), grads, head_grad, begin, head_after)
    buf = io.BytesIO()  # plain bytes: tensors shared through the queue die with this process
    torch.save(results, buf)
    queue.put((rank, buf.getvalue()))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def init_shards(tmp_path_factory):
    return tiny_synthetic(tmp_path_factory.mktemp("init_shards") / "shards", **INIT_SHARDS)


@pytest.fixture(scope="module")
def two_rank_results(init_shards):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, queue, init_shards)) for r in range(2)]
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
    sizes, pool = SIZES[case[0]], POOL.get(case[0], 0)
    loss1, grads1, head1, _, after1 = run_case(sizes, *case[1:], rank=0, world=1, pool=pool)
    if pool:
        assert abs(float(loss1) - pool_oracle_loss(sizes, pool)) < 1e-5
    ema = case[3] == "combined" and OBJECTIVES[case[1]].instance is not None
    if ema:
        assert head1 is None  # the memory bank gets no gradient
        assert "proj.weight" in grads1 and "projection.0.weight" in grads1  # x still does
    # A deep network's features carry float32 rounding through its cross-rank BatchNorm layers
    # (ResNet-18: 1.9e-6 measured in its head gradient), the tiny one's only through one.
    head_atol = 1e-5 if case[3] in BACKBONES else 1e-6
    for rank in (0, 1):
        loss2, grads2, head2, begin, after2 = two_rank_results[rank][case]
        assert abs(loss2 - float(loss1)) < 1e-5, (rank, loss2, float(loss1))
        assert grads1.keys() == grads2.keys()
        for name in grads1:
            # to float32 rounding at the gradient's own scale: a first convolution's gradient sums
            # 12 x 16 x 16 positions (ResNet-18 at 32x32), in another order on 2 ranks
            scale = max(1.0, float(grads1[name].abs().max()))
            assert torch.allclose(grads1[name], grads2[name], atol=1e-5 * scale), name
        if head1 is not None:
            assert torch.allclose(head1[begin : begin + head2.shape[0]], head2, atol=head_atol)
            assert head2.abs().sum() > 0
        # The columns after the step (the ema update, made on the rank owning each column).
        assert torch.allclose(after1[begin : begin + after2.shape[0]], after2, atol=1e-6)
    if ema:
        visited = torch.zeros(after1.shape[0], dtype=torch.bool)
        visited[global_batch(sizes)[3]] = True
        before = InstanceHead(make_plan(manifest_with_sizes(sizes), 1), 0, PROJECTION_DIM, seed=3).weight.detach()
        assert not torch.allclose(after1[visited], before[visited])  # every visited column moved
        assert torch.equal(after1[~visited], before[~visited])  # the others kept
        assert torch.allclose(after1[visited].norm(dim=1), torch.ones(int(visited.sum())))


def pool_oracle_loss(sizes, pool) -> float:
    """The global batch's loss by the dense oracle, from the same network and initial head."""
    images, _, _, inst = global_batch(sizes, pool=pool)
    with torch.no_grad():
        out = TinyNet(len(sizes), 6)(images)
    w = InstanceHead(make_plan(manifest_with_sizes(sizes, pool=pool), 1), 0, DIM, seed=3).weight.detach()
    return float(pool_oracle(out["features"], out["super_logits"], w, inst, sizes, pool, 0.7, 1.0))


def test_feature_init_writes_each_column_from_its_image_on_one_and_two_ranks(init_shards, two_rank_results):
    begin1, columns, _ = init_case(init_shards, rank=0, world=1)
    assert begin1 == 0
    # The oracle: every training image embedded on its own, in eval mode, by instance id.
    split = open_split(init_shards, "train")
    cfg = DataConfig(shards=init_shards, num_workers=0)
    batch = collate(list(EvalStream(deal(shard_urls(split, split.manifest.shards), 0, 1), cfg)))
    with torch.no_grad():
        features = F.normalize(TinyNet(3, 6, projection=True).eval()(batch["images"])["projection"], dim=1)
    expected = torch.empty_like(columns)
    expected[batch["instance"]] = features
    assert torch.allclose(columns, expected, atol=1e-6)
    for rank in (0, 1):
        begin, slice_, split_supers = two_rank_results[rank]["init"]
        assert split_supers == [1]  # a super-class split across the two ranks
        assert torch.allclose(slice_, columns[begin : begin + slice_.shape[0]], atol=1e-6)
