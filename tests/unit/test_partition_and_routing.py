"""The column line, and how shards spread over ranks under both routings."""

import pytest

from fgdist.config import validate
from fgdist.data.loader import fill_slots, steps_per_epoch, train_batches
from fgdist.data.partition import PlanError, group_lookup, make_plan
from fgdist.data.shardset import open_split
from shards.build import build_shards
from shards.sources.synthetic import open_synthetic
from tests.helpers import manifest_with_sizes


def test_column_line_and_split_super_classes():
    plan = make_plan(manifest_with_sizes([5, 7, 6]), 2)
    assert plan.columns_per_rank == 9
    assert [plan.column_range(r) for r in range(2)] == [(0, 9), (9, 18)]
    assert [plan.owners(s) for s in range(3)] == [[0], [0, 1], [1]]
    assert plan.split_supers == [1]
    assert plan.local_groups(0) == ([0, 1], [0, 5, 9]) and plan.local_groups(1) == ([1, 2], [0, 3, 9])
    lookup, offsets = group_lookup(plan, 1, dense=False)
    assert lookup.tolist() == [-1, 0, 1] and offsets.tolist() == [0, 3, 9]
    lookup, offsets = group_lookup(plan, 1, dense=True)
    assert lookup.tolist() == [0, 0, 0] and offsets.tolist() == [0, 9]


def test_the_pool_is_one_more_group_cut_like_any_other():
    """Unlabeled images: group B = 3 after the super-classes, split over ranks 1 and 2 here."""
    plan = make_plan(manifest_with_sizes([5, 7, 6], pool=12), 3)
    assert plan.pool_range == (18, 30) and plan.pool_group == 3 and plan.columns_per_rank == 10
    assert [plan.owners(g) for g in range(4)] == [[0], [0, 1], [1], [1, 2]]
    assert plan.split_groups == [1, 3] and plan.split_supers == [1]
    assert plan.local_groups(1) == ([1, 2, 3], [0, 2, 8, 10]) and plan.local_groups(2) == ([3], [0, 10])
    lookup, offsets = group_lookup(plan, 2, dense=False)
    assert lookup.tolist() == [-1, -1, -1, 0] and offsets.tolist() == [0, 10]
    described = plan.describe()
    assert described["pool"] == {"columns": [18, 30], "split": True}
    assert [r.get("pool_columns") for r in described["ranks"]] == [None, [18, 20], [20, 30]]
    assert [r["super_classes"] for r in described["ranks"]] == [[0, 1], [1, 2], []]
    assert make_plan(manifest_with_sizes([5, 7, 6]), 3).pool_group is None


def test_last_rank_gets_the_remainder_and_recut_is_pure():
    m = manifest_with_sizes([10, 1, 12])
    assert [make_plan(m, 3).column_range(r) for r in range(3)] == [(0, 8), (8, 16), (16, 23)]
    assert make_plan(m, 3) == make_plan(m, 3)


def test_world_size_larger_than_instances_is_an_error():
    with pytest.raises(PlanError, match=r"world size 5 is larger than the number of instances \(3\) in shards/x"):
        make_plan(manifest_with_sizes([1, 2]), 5, where="shards/x")
    with pytest.raises(PlanError, match="leaves rank 3 without instance columns"):
        make_plan(manifest_with_sizes([2, 3]), 4)


@pytest.fixture(scope="module", params=[0, 10], ids=["labeled", "pool"])
def uneven(tmp_path_factory, request):
    """6 super-classes of 6 images (and a pool of 10 unlabeled ones), shards of at most 4:
    boundaries fall inside shards."""
    out = tmp_path_factory.mktemp("routing") / "syn"
    build_shards(
        open_synthetic(
            num_super=6,
            fine_per_super=2,
            train_per_fine=3,
            test_per_fine=1,
            image_size=16,
            big_patch=6,
            small_patch=3,
            unlabeled=request.param,
        ),
        out,
        shard_size=4,
        progress=False,
    )
    return open_split(out, "train")


def epoch_ids(split, world, routing, workers, batch=4, seed=0):
    cfg = validate(
        {
            "data": {
                "routing": routing,
                "batch_size": batch,
                "num_workers": workers,
                "shuffle_buffer": 5,
                "image_size": 16,
            }
        },
        "test",
    ).data
    plan = make_plan(split.manifest, world)
    per_rank = [
        [i for b in train_batches(split, plan, cfg, r, epoch=0, seed=seed) for i in b["instance"].tolist()]
        for r in range(world)
    ]
    return plan, per_rank


@pytest.mark.parametrize("world, workers", [(2, 0), (3, 2), (5, 1)])
def test_by_superclass_rank_streams_exactly_its_columns(uneven, world, workers):
    plan, per_rank = epoch_ids(uneven, world, "by_superclass", workers)
    steps = steps_per_epoch(uneven.manifest.num_instances, world, 4)  # the pool's rows count too
    for r, ids in enumerate(per_rank):
        lo, hi = plan.column_range(r)
        assert len(ids) == steps * 4  # every rank takes the same number of steps
        assert set(ids) == set(range(lo, hi))  # all of its instances, none of another rank's


def test_slots_filled_up_to_what_their_streams_deliver():
    """Shards of 4 and 2 samples: each stream gets what it delivers in an epoch, so no sample is
    left unread while another stream repeats its own."""
    sizes = {"a": 4, "b": 2, "c": 4, "d": 2, "e": 4, "f": 2}
    specs = fill_slots(list(sizes.items()), [12, 6])
    assert sorted(url for spec in specs for url in spec.urls) == sorted(sizes)
    assert [sum(sizes[url] for url in spec.urls) for spec in specs] == [12, 6]
    specs = fill_slots([("a", 4), ("b", 4), ("c", 2), ("d", 2)], [6, 6], instance_range=(0, 12))
    assert sorted(spec.urls for spec in specs) == [("a", "c"), ("b", "d")] and specs[0].instance_range == (0, 12)
    specs = fill_slots([("a", 4)], [4, 4])  # fewer shards than slots: both read it, ids split by parity
    assert [(spec.urls, spec.modulo) for spec in specs] == [(("a",), (2, 0)), (("a",), (2, 1))]


@pytest.mark.parametrize("world, workers, seed", [(2, 2, 0), (3, 0, 0), (3, 0, 1), (3, 0, 2), (2, 2, 3)])
def test_shuffled_routing_covers_every_instance_once_per_rank_set(uneven, world, workers, seed):
    _, per_rank = epoch_ids(uneven, world, "shuffled", workers, seed=seed)
    n = uneven.manifest.num_instances
    steps = steps_per_epoch(n, world, 4)
    assert all(len(ids) == steps * 4 for ids in per_rank)
    assert set().union(*map(set, per_rank)) == set(range(n))
    supers_per_rank = [{i // 6 for i in ids} for ids in per_rank]
    assert all(len(s) > 1 for s in supers_per_rank)  # not grouped by super-class


def test_tars_read_through_a_pipe_url_give_the_same_stream(uneven):
    """data.shards_url: tars come from any URL WebDataset opens (here `pipe:cat`), manifests
    from the local copy."""
    cfg = validate({"data": {"batch_size": 4, "num_workers": 0, "image_size": 16}}, "t").data
    piped = open_split(uneven.path.parent, "train", f"pipe:cat {uneven.path.parent}")
    assert piped.shard_path(piped.manifest.shards[0]).startswith("pipe:cat ")
    plan = make_plan(uneven.manifest, 2)
    a = [b["instance"].tolist() for b in train_batches(uneven, plan, cfg, 1, epoch=0, seed=0)]
    b = [b["instance"].tolist() for b in train_batches(piped, plan, cfg, 1, epoch=0, seed=0)]
    assert a == b and len(a) == steps_per_epoch(uneven.manifest.num_instances, 2, 4)
