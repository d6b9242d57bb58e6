"""The per-rank streams on real shard sets: a resume after skipped undecodable samples, seeds,
the evaluation loader's workers, and stuck workers (an error, or a new loader at the same batch)."""

import io
import re
import shutil
import tarfile
import time

import psutil
import pytest
import torch

from fgdist.config import validate
from fgdist.data.loader import LoaderWorkerTimeoutError, data_loader, eval_batches, steps_per_epoch, train_batches
from fgdist.data.partition import make_plan
from fgdist.data.shardset import open_split, sample_key
from shards.build import build_shards
from shards.sources.synthetic import open_synthetic

SMALL = dict(
    num_super=2, fine_per_super=2, train_per_fine=5, test_per_fine=6, image_size=16, big_patch=6, small_patch=3
)


def data_cfg(**data):
    return validate({"data": {"batch_size": 2, "shuffle_buffer": 3, "image_size": 16, **data}}, "test").data


def break_images(split, instance_ids):
    """Overwrite the PNG of each given instance, inside its tar, with a header and no pixels."""
    for shard in split.manifest.shards:
        wanted = {f"{sample_key(i)}.png" for i in instance_ids if shard.instance_begin <= i < shard.instance_end}
        if not wanted:
            continue
        path = split.path / shard.file
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in members:
                if member.name in wanted:
                    data = data[:40]
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("streams") / "syn"
    build_shards(open_synthetic(**SMALL), out, shard_size=3, progress=False)
    return out


def as_lists(batches):
    return [(b["instance"].tolist(), b["images"], b["corrupt_skipped"]) for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_skipped_corrupt_samples_equals_the_uninterrupted_epoch(shard_set, workers, tmp_path):
    """20 training images, 3 of them undecodable; every mid-epoch resume point replays exactly
    the tail of the uninterrupted epoch (ids, pixels, and the skipped counts)."""
    split = open_split(shutil.copytree(shard_set, tmp_path / "syn"), "train")  # the other tests' stays whole
    break_images(split, [1, 7, 14])
    cfg = data_cfg(num_workers=workers, on_corrupt="skip")
    plan = make_plan(split.manifest, 1)
    full = as_lists(train_batches(split, plan, cfg, rank=0, epoch=0, seed=3))
    steps = steps_per_epoch(20, 1, 2)
    assert len(full) == steps and sum(c for _, _, c in full) >= 3
    assert not {1, 7, 14} & {i for ids, _, _ in full for i in ids}
    for start in range(1, steps):
        resumed = as_lists(train_batches(split, plan, cfg, rank=0, epoch=0, seed=3, start_step=start))
        assert [ids for ids, _, _ in resumed] == [ids for ids, _, _ in full[start:]], f"resume at step {start}"
        assert [c for _, _, c in resumed] == [c for _, _, c in full[start:]], f"resume at step {start}"
        assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(resumed, full[start:]))


def test_distinct_seeds_give_distinct_streams(shard_set):
    """Seeds go through sha256, not Python's `hash` (where hash(-1) == hash(-2), so the seeds -1
    and -2 drew the same epoch)."""
    split = open_split(shard_set, "test")
    cfg = data_cfg(num_workers=0)
    plan = make_plan(split.manifest, 1)
    orders = [[b["instance"].tolist() for b in train_batches(split, plan, cfg, 0, epoch=0, seed=s)] for s in (-1, -2)]
    assert orders[0] != orders[1]


@pytest.mark.parametrize("world", [2, 9])  # 8 test shards: 4 per rank; or fewer shards than ranks
def test_eval_workers_embed_every_test_sample_exactly_once(shard_set, world):
    split = open_split(shard_set, "test")
    assert len(split.manifest.shards) == 8
    per_rank = {}
    for workers in (0, 1, 2):
        cfg = data_cfg(num_workers=workers)
        for rank in range(world):
            loader = eval_batches(split, cfg, batch_size=4, rank=rank, world_size=world)
            ids = [i for b in loader for i in b["instance"].tolist()]
            assert len(ids) == len(set(ids)), f"{workers} workers, rank {rank}: a sample twice"
            per_rank.setdefault(rank, []).append(sorted(ids))
    for rank, id_sets in per_rank.items():
        assert id_sets[0] == id_sets[1] == id_sets[2], f"rank {rank}: the workers change the rank's samples"
    assert sorted(i for sets in per_rank.values() for i in sets[0]) == list(range(24))


class _StuckStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        _wait_here_for_ever()
        yield torch.zeros(1), 0, 0, 0, 0


def _wait_here_for_ever():
    time.sleep(30)


def test_a_stuck_loader_worker_is_an_error_not_a_hang(capfd):
    # Without the timeout the worker would deliver after its sleep and nothing would be raised.
    with pytest.raises(
        LoaderWorkerTimeoutError, match=r"rank 0: a loader worker \(pids \[\d+\]\) delivered no batch for 1 s"
    ):
        next(iter(data_loader(_StuckStream(), data_cfg(worker_timeout=1.0), batch_size=1, workers=1)))
    # The worker printed where it waited (its stderr is the rank's).
    assert "_wait_here_for_ever" in capfd.readouterr().err


def test_a_stuck_training_worker_is_replaced_and_the_epoch_is_unchanged(shard_set, tmp_path, monkeypatch, caplog):
    """FGDIST_STALL_AT stops the worker reading batch 3 (of 10, 2 workers); after
    data.worker_timeout a new loader takes over at batch 3 and the epoch's batches are the
    uninterrupted ones, pixel for pixel. The stuck worker is killed, not left behind."""
    split = open_split(shard_set, "train")
    cfg = data_cfg(num_workers=2, worker_timeout=2.0)
    plan = make_plan(split.manifest, 1)
    full = as_lists(train_batches(split, plan, cfg, rank=0, epoch=0, seed=3))
    monkeypatch.setenv("FGDIST_STALL_AT", "0:0:3")
    monkeypatch.setenv("FGDIST_STALL_ONCE", str(tmp_path / "stalled"))
    with caplog.at_level("WARNING", logger="fgdist.data.loader"):
        restarted = as_lists(train_batches(split, plan, cfg, rank=0, epoch=0, seed=3))
    assert (tmp_path / "stalled").exists()  # the fault did fire
    [warning] = [r.getMessage() for r in caplog.records]
    assert "goes on with a new loader at batch 3 (restart 1 of 2)" in warning
    assert [ids for ids, _, _ in restarted] == [ids for ids, _, _ in full]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(restarted, full))
    for pid in map(int, re.search(r"pids \[([\d, ]+)\]", warning).group(1).split(", ")):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_stuck_evaluation_worker_is_replaced_and_every_test_image_comes_once(shard_set, tmp_path, monkeypatch):
    """The evaluation loader's new loader passes the batches already delivered: the same batches."""
    split = open_split(shard_set, "test")
    cfg = data_cfg(num_workers=2, worker_timeout=2.0)
    full = as_lists(eval_batches(split, cfg, batch_size=4, rank=0, world_size=1))
    monkeypatch.setenv("FGDIST_STALL_AT", "0:eval:3")
    monkeypatch.setenv("FGDIST_STALL_ONCE", str(tmp_path / "stalled"))
    restarted = as_lists(eval_batches(split, cfg, batch_size=4, rank=0, world_size=1))
    assert (tmp_path / "stalled").exists()
    assert [ids for ids, _, _ in restarted] == [ids for ids, _, _ in full] and len(full) == 6
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(restarted, full))


def test_a_worker_stuck_more_often_than_worker_restarts_fails_its_rank(shard_set, tmp_path, monkeypatch):
    split = open_split(shard_set, "train")
    cfg = data_cfg(num_workers=1, worker_timeout=1.0, worker_restarts=0)
    monkeypatch.setenv("FGDIST_STALL_AT", "0:0:2")
    monkeypatch.setenv("FGDIST_STALL_ONCE", str(tmp_path / "stalled"))
    batches = train_batches(split, make_plan(split.manifest, 1), cfg, rank=0, epoch=0, seed=3)
    with pytest.raises(LoaderWorkerTimeoutError, match="delivered no batch for 1 s"):
        list(batches)
