"""Instance options (issue 11) on one process: strong augmentation and views replay exactly per
(seed, epoch, sample); the ema memory-bank update against a hand computation; the head's own
schedule and weight decay; the projection; feature init's coverage check. (1 and 2 ranks:
tests/integration/test_loss_equivalence.py.)"""

import itertools
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fgdist.config import validate
from fgdist.data.augment import random_resized_crop, strong_augment
from fgdist.data.loader import TrainStream, collate, rank_specs
from fgdist.data.partition import make_plan
from fgdist.data.shardset import open_split
from fgdist.training.head import InstanceHead
from fgdist.training.model import EmbeddingNet, model_for_eval
from fgdist.training.objectives import Objective
from fgdist.training.trainer import built_model_config
from shards.build import build_shards
from shards.sources.synthetic import open_synthetic
from tests.helpers import manifest_with_sizes


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("augment") / "syn"
    collection = open_synthetic(
        num_super=2, fine_per_super=2, train_per_fine=3, test_per_fine=1, image_size=16, big_patch=6, small_patch=3
    )
    build_shards(collection, out, shard_size=4, progress=False)
    return open_split(out, "train")


def stream_items(split, epoch, skip_batches=0, count=8, views=2):
    cfg = validate(
        {"data": {"augment": "strong", "views": views, "image_size": 16, "batch_size": 4, "num_workers": 0}}, "t"
    ).data
    plan = make_plan(split.manifest, 1)
    specs = rank_specs(split, plan, cfg, rank=0, epoch=epoch, seed=7, workers=1)
    stream = TrainStream(specs, cfg, seed=7, epoch=epoch, rank=0, skip_batches=skip_batches)
    return [(int(item[3]), item[0]) for item in itertools.islice(stream, count)]


def test_strong_views_replay_per_seed_epoch_and_sample(split):
    first = stream_items(split, epoch=0)
    again = stream_items(split, epoch=0)
    assert [i for i, _ in first] == [i for i, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again))
    # A resume skipping one batch of 4 replays the same pixels for the samples after it.
    resumed = stream_items(split, epoch=0, skip_batches=1, count=4)
    assert [i for i, _ in resumed] == [i for i, _ in first[4:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, first[4:]))
    # Two views of one image differ; another epoch augments the same image differently.
    assert first[0][1].shape == (2, 3, 16, 16)
    assert all(not torch.equal(img[0], img[1]) for _, img in first)
    later = dict(stream_items(split, epoch=1, count=12))
    assert all(not torch.equal(img, later[i]) for i, img in first)


def test_strong_single_channel_path_adds_no_colour():
    gen = np.random.default_rng(0)
    img = Image.fromarray(gen.integers(0, 256, (20, 20), dtype=np.uint8), "L").convert("RGB")
    fill = (124, 116, 104)
    erased = 0
    for seed in range(20):
        out = np.asarray(strong_augment(img, random.Random(seed), 16, (0.3, 1.0), True, fill))
        gray = (out[..., 0] == out[..., 1]) & (out[..., 1] == out[..., 2])
        filled = (out == fill).all(axis=-1)
        assert (gray | filled).all()  # only the erased rectangle carries the (mean) colour
        erased += bool(filled.any())
        again = np.asarray(strong_augment(img, random.Random(seed), 16, (0.3, 1.0), True, fill))
        assert np.array_equal(out, again)
    assert 0 < erased < 20  # random erasing happens with probability 1/2
    # The colour path turns some colour images gray (random grayscale, p = 0.2), not all.
    img = Image.fromarray(gen.integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB")
    colour = [np.asarray(strong_augment(img, random.Random(s), 16, (0.3, 1.0), False, fill)) for s in range(20)]
    turned_gray = [bool((c[..., 0] == c[..., 1]).all() and (c[..., 1] == c[..., 2]).all()) for c in colour]
    assert 0 < sum(turned_gray) < 20
    # colour=False (data.colour: false): the crop and flip alone, the same draws, no colour change.
    for seed in range(20):
        rng = random.Random(seed)
        expected = random_resized_crop(img, rng, 16, (0.3, 1.0))
        if rng.random() < 0.5:
            expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = strong_augment(img, random.Random(seed), 16, (0.3, 1.0), False, fill, colour=False)
        assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_collate_puts_views_of_an_image_on_consecutive_rows():
    items = [
        (torch.full((2, 3, 4, 4), float(i)) + torch.arange(2.0)[:, None, None, None], i, 10 + i, 20 + i, 0)
        for i in range(3)
    ]
    batch = collate(items)
    assert batch["images"].shape == (6, 3, 4, 4) and batch["num_images"] == 3
    assert batch["images"][:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 3.0]
    assert batch["instance"].tolist() == [20, 20, 21, 21, 22, 22]
    assert batch["super"].tolist() == [0, 0, 1, 1, 2, 2] and batch["fine"].tolist() == [10, 10, 11, 11, 12, 12]


def test_ema_update_matches_a_hand_computation():
    head = InstanceHead(make_plan(manifest_with_sizes([4]), 1), 0, dim=3, seed=0, update="ema", ema_momentum=0.5)
    old = head.weight.detach().clone()
    with torch.no_grad():
        head.weight[0] = torch.tensor([0.0, 1.0, 0.0])
        head.weight[2] = torch.tensor([1.0, 0.0, 0.0])
    # rows: a view of image 2, image 0, a second view of image 2, a row whose column is elsewhere
    target = torch.tensor([2, 0, 2, -1])
    features = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 3.0], [5.0, 5.0, 5.0]])
    head.record_visits(target, features)
    head.apply_ema()
    r = 1 / math.sqrt(2)
    # column 0: normalize(0.5 (0,1,0) + 0.5 (1,0,0)) = (r, r, 0)
    assert head.weight[0].tolist() == pytest.approx([r, r, 0.0])
    # column 2: the views' mean direction (0, r, r); normalize(0.5 (1,0,0) + 0.5 (0,r,r)) = (r, 1/2, 1/2)
    assert head.weight[2].tolist() == pytest.approx([r, 0.5, 0.5])
    assert torch.equal(head.weight[1], old[1]) and torch.equal(head.weight[3], old[3])
    assert head.visits is None  # applied once
    head.apply_ema()
    assert head.weight[2].tolist() == pytest.approx([r, 0.5, 0.5])


def test_ema_head_gets_no_gradient_and_step_applies_the_update():
    cfg = validate({"objective": {"name": "base_indi_eff"}, "head": {"kernel": "torch", "update": "ema"}}, "t")
    head = InstanceHead(make_plan(manifest_with_sizes([3, 3]), 1), 0, dim=4, seed=0, update="ema", ema_momentum=0.0)
    head.build_optimizer(cfg.optim, 1.0, steps_per_epoch=1)
    objective = Objective(cfg, make_plan(manifest_with_sizes([3, 3]), 1), 0, head)
    features = torch.randn(2, 4, requires_grad=True)
    super_logits = torch.zeros(2, 2, requires_grad=True)
    parts = objective(
        {"features": features, "super_logits": super_logits}, torch.tensor([0, 1]), None, torch.tensor([1, 4])
    )
    parts["loss"].backward()
    assert head.weight.grad is None and features.grad.abs().sum() > 0
    head.step(world_size=1)
    # momentum 0: the visited columns are the rows' normalized features
    expected = torch.nn.functional.normalize(features.detach(), dim=1)
    assert torch.allclose(head.weight[[1, 4]], expected, atol=1e-6)


@pytest.mark.parametrize(
    "schedule, weight_decay, lrs", [("same", None, [1.0, 1.0, 0.5]), ("constant", 0.25, [1.0, 1.0, 1.0])]
)
def test_head_schedule_and_weight_decay(schedule, weight_decay, lrs):
    optim = validate(
        {"optim": {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.1, "milestones": [1], "gamma": 0.5}}, "t"
    ).optim
    head = InstanceHead(make_plan(manifest_with_sizes([2]), 1), 0, dim=2, seed=0)
    head.build_optimizer(optim, lr_mult=1.0, steps_per_epoch=2, schedule=schedule, weight_decay=weight_decay)
    seen = []
    for _ in range(3):
        seen.append(head.optimizer.param_groups[0]["lr"])
        w = head.weight.detach().clone()
        head.weight.grad = torch.zeros_like(w)
        head.step(world_size=1)
        decay = 0.1 if weight_decay is None else weight_decay
        assert torch.allclose(head.weight, w * (1 - seen[-1] * decay))  # only weight decay moved it
    assert seen == lrs


def test_projection_feeds_the_instance_head_and_optionally_the_super_head():
    cfg = validate(
        {
            "objective": {"name": "base_indi_eff"},
            "model": {"width": 4, "projection": "mlp", "projection_dim": 6, "projection_for_super": True},
            "eval": {"features": "projection"},
        },
        "t",
    )
    net = EmbeddingNet(cfg.model, num_super=3, num_fine=None).eval()
    out = net(torch.randn(2, 3, 8, 8))
    assert out["features"].shape == (2, 32) and out["projection"].shape == (2, 6) and net.instance_dim == 6
    assert torch.allclose(out["super_logits"], net.super_head(out["projection"]))
    evaluated = model_for_eval(net, cfg.eval.features)
    assert torch.equal(evaluated(torch.ones(1, 3, 8, 8))["features"], net(torch.ones(1, 3, 8, 8))["projection"])
    assert evaluated.backbone is net.backbone  # attention maps still find the ResNet
    assert model_for_eval(net, "backbone") is net
    # An objective without an instance term and nothing else using it: no projection is built.
    base = cfg.model_copy(update={"objective": cfg.objective.model_copy(update={"name": "base"})})
    base = base.model_copy(
        update={
            "model": cfg.model.model_copy(update={"projection_for_super": False}),
            "eval": cfg.eval.model_copy(update={"features": "backbone"}),
        }
    )
    assert built_model_config(base).projection == "none" and built_model_config(cfg).projection == "mlp"


def test_feature_init_names_columns_left_without_an_image():
    head = InstanceHead(make_plan(manifest_with_sizes([3, 3]), 2), 1, dim=4, seed=0)  # columns [3, 6)
    batch = {"instance": torch.tensor([3, 5]), "images": torch.randn(2, 4)}
    with pytest.raises(ValueError, match=r"1 of columns \[3, 6\) got no image \(first: column 4\)"):
        head.init_from_features([batch], lambda x: x)
    with pytest.raises(ValueError, match=r"instance 0, not among this rank's columns \[3, 6\)"):
        head.init_from_features([{"instance": torch.tensor([0]), "images": torch.randn(1, 4)}], lambda x: x)
