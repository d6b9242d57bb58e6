"""Faults on real DeepSpeed CPU ranks: a rank SIGKILLed mid-epoch or mid-checkpoint-write, a
stuck loader worker, an elastic resume on another world size, corrupt samples. The mid-epoch kill and the elastic resume
run on the labeled data and on data with a pool of unlabeled images (split over the ranks)."""

import io
import json
import os
import re
import tarfile

import mlflow
import pytest

from tests.helpers import REPO, train_on_ranks
from tests.integration.conftest import assert_same_metrics


def killed(tiny_runs, name, kill_at):
    """Train 3 epochs with FGDIST_KILL_AT set: the launcher must fail."""
    os.environ["FGDIST_KILL_AT"] = kill_at
    try:
        proc = tiny_runs.train(name, "--set", "optim.epochs=3", check=False)
    finally:
        del os.environ["FGDIST_KILL_AT"]
    assert proc.returncode != 0
    return proc


def test_rank_killed_mid_epoch_resumes_to_the_same_result(runs_and_straight):
    runs, straight_run = runs_and_straight  # with and without unlabeled images
    # 2 steps per epoch: global step 3 is the middle of epoch 2.
    killed(runs, "kill_step", "step:1:3")
    ckpt = runs.run_dir("kill_step") / "checkpoints"
    assert (ckpt / "latest").read_text() == "epoch0001-step000000"
    first_run = json.loads((ckpt / "epoch0001-step000000" / "meta.json").read_text())["mlflow_run_id"]
    runs.train("kill_step", "--set", "optim.epochs=3", "--resume")
    resumed = runs.results("kill_step")
    assert_same_metrics(straight_run, resumed)
    assert resumed["mlflow_run_id"] == first_run
    client = mlflow.MlflowClient(f"sqlite:///{runs.root}/mlflow.db")
    found = client.search_runs(
        [client.get_experiment_by_name("synthetic").experiment_id], "attributes.run_name = 'kill_step'"
    )
    assert len(found) == 1  # no duplicate run
    steps = sorted({m.step for m in client.get_metric_history(first_run, "loss")})
    assert steps == list(range(1, 7))  # steps continue, not reset


def test_rank_killed_while_writing_a_checkpoint_never_leaves_it_valid(tiny_runs, straight_run):
    killed(tiny_runs, "kill_ckpt", "checkpoint:1:epoch0002-step000000")
    ckpt = tiny_runs.run_dir("kill_ckpt") / "checkpoints"
    assert (ckpt / "latest").read_text() == "epoch0001-step000000"
    assert not (ckpt / "epoch0002-step000000").exists()  # only the partial folder was written
    assert (ckpt / ".epoch0002-step000000.partial").is_dir()
    proc = tiny_runs.train("kill_ckpt", "--set", "optim.epochs=3", "--resume")
    assert "epoch0001-step000000" in proc.stdout
    assert_same_metrics(straight_run, tiny_runs.results("kill_ckpt"))


def test_a_stuck_loader_worker_costs_its_timeout_not_the_run(tiny_runs, straight_run, tmp_path, monkeypatch):
    """Rank 1's loader worker stops delivering in the middle of epoch 2 (FGDIST_STALL_AT): after
    data.worker_timeout its stacks are printed, a new loader takes over at the same batch, and the
    run ends as the uninterrupted one."""
    monkeypatch.setenv("FGDIST_STALL_AT", "1:1:1")  # rank 1, epoch 2 (0-based 1), its second batch
    monkeypatch.setenv("FGDIST_STALL_ONCE", str(tmp_path / "stalled"))
    proc = tiny_runs.train("stalled", "--set", "optim.epochs=3", "--set", "data.worker_timeout=5")
    assert "[fgdist rank 1] WARNING: rank 1: a loader worker (pids [" in proc.stdout
    assert "rank 1 epoch 2 training goes on with a new loader at batch 1 (restart 1 of 2)" in proc.stdout
    assert "stall_point" in proc.stderr  # where the stuck worker waited (faulthandler's stack)
    assert_same_metrics(straight_run, tiny_runs.results("stalled"))


def probe(tiny_runs, name, checkpoint, epochs, num_gpus, *extra):
    proc = train_on_ranks(
        tiny_runs.root,
        *tiny_runs.args(name, "--set", f"optim.epochs={epochs}", *extra),
        *("--resume", str(checkpoint)),
        num_gpus=num_gpus,
        script=REPO / "tests" / "integration" / "elastic_probe.py",
    )
    return float(re.search(r"FIXED_BATCH_LOSS (\S+) world_size=(\d+)", proc.stdout).group(1))


def test_elastic_resume_recuts_the_head_and_keeps_the_loss(runs):  # with and without unlabeled images
    runs.train("elastic", "--set", "optim.epochs=1")
    ckpt = runs.run_dir("elastic") / "checkpoints"
    two_rank_ckpt = ckpt / "epoch0001-step000000"
    loss_2_on_2 = probe(runs, "elastic", two_rank_ckpt, epochs=1, num_gpus=2)
    loss_2_on_1 = probe(runs, "elastic", two_rank_ckpt, epochs=2, num_gpus=1)  # then trains epoch 2 on 1 rank
    assert loss_2_on_1 == pytest.approx(loss_2_on_2, abs=1e-6)
    one_rank_ckpt = ckpt / "epoch0002-step000000"
    assert json.loads((one_rank_ckpt / "meta.json").read_text())["world_size"] == 1
    loss_1_on_1 = probe(runs, "elastic", one_rank_ckpt, epochs=2, num_gpus=1)
    loss_1_on_2 = probe(runs, "elastic", one_rank_ckpt, epochs=3, num_gpus=2)  # then trains epoch 3 on 2 ranks
    assert loss_1_on_2 == pytest.approx(loss_1_on_1, abs=1e-6)
    assert runs.results("elastic")["world_size"] == 2


def corrupt_copy(src, dst):
    """A copy of the shard set whose first training image cannot be decoded."""
    import shutil

    shutil.copytree(src, dst)
    tar_path = dst / "train" / "train-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == "0000000000.png":
                data = data[:40]  # a PNG header with nothing after it
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_corrupt_samples_fail_or_are_skipped_and_counted(tiny_runs):
    bad = tiny_runs.root / "corrupt_shards"
    corrupt_copy(tiny_runs.shards, bad)
    proc = tiny_runs.train("corrupt_fail", "--set", "optim.epochs=1", "--set", f"data.shards={bad}", check=False)
    assert proc.returncode != 0
    assert re.search(r"train-000000.tar: sample 0000000000: cannot decode image", proc.stdout + proc.stderr)
    tiny_runs.train(
        "corrupt_skip", "--set", "optim.epochs=2", "--set", f"data.shards={bad}", "--set", "data.on_corrupt=skip"
    )
    run_id = tiny_runs.results("corrupt_skip")["mlflow_run_id"]
    history = mlflow.MlflowClient(f"sqlite:///{tiny_runs.root}/mlflow.db").get_metric_history(run_id, "corrupt_skipped")
    assert history and max(m.value for m in history) >= 2  # once per epoch, logged, never silent
