"""Training on shards streamed over HTTP from a real server process on 127.0.0.1, with only an
empty folder local (the manifests and indexes are fetched into it): a server that dies mid-epoch
stops the run with an error naming the shard's URL; resumed from its checkpoint with the server
back, the run ends with the losses and metrics of an uninterrupted run on local shards."""

import json
import os
import re
import sys

import mlflow
import pytest

from tests.helpers import LAUNCHER_ENV, REPO, TINY_TRAINING, free_port, launch_training, serving, tiny_synthetic
from tests.integration.conftest import assert_same_metrics

# Tar responses before the server dies. Without loader workers nothing is read ahead: epoch 1
# reads the 4 training shards (8 images each), epoch 2's step 1 its first 2, and the 7th response,
# which step 2 needs, stops halfway.
DIE_AFTER = 6


def train(root, name, *extra, check=True):
    args = [
        *TINY_TRAINING,
        *("--set", f"output_dir={root / 'runs'}", "--set", f"name={name}", "--set", "optim.epochs=2"),
        *("--set", "optim.milestones=[1]", "--set", "checkpoint.every_epochs=1", "--set", "data.shuffle_buffer=8"),
        *("--set", "eval.bn_batches=2"),
        *("--set", "data.num_workers=0"),
        *extra,
    ]
    return launch_training(root, [], None, *args, unset=LAUNCHER_ENV, check=check)


def loss_history(root, run_id):
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


def test_a_server_dying_mid_epoch_is_named_and_the_resumed_run_matches_local_shards(tmp_path):
    shards = tiny_synthetic(tmp_path / "shards")
    train(tmp_path, "local", "--set", f"data.shards={shards}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    over_http = ("--set", f"data.shards={tmp_path / 'fetched'}", "--set", f"data.shards_url={url}")
    over_http += ("--set", "data.url_retry_seconds=2")
    server = [sys.executable, "-m", "tests.shard_server", shards, str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with serving([*server, "--die-after", str(DIE_AFTER)], REPO, env, f"{url}/collection.json", tmp_path / "s1.log"):
        failed = train(tmp_path, "remote", *over_http, check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "epoch 2/2 step 1/4" in output and "epoch 2/2 step 2/4" not in output
    assert re.search(rf"ShardReadError.*{url}/train/train-\d+\.tar: .*gave up after \d+ tries", output), output[-3000:]
    assert (tmp_path / "runs" / "remote" / "checkpoints" / "latest").read_text() == "epoch0001-step000000"
    assert (tmp_path / "fetched" / "train" / "index.parquet").is_file()  # the small files were fetched

    with serving(server, REPO, env, f"{url}/collection.json", tmp_path / "s2.log"):
        resumed = train(tmp_path, "remote", *over_http, "--resume")
    assert "resumed from" in resumed.stdout
    local, remote = (json.loads((tmp_path / "runs" / n / "results.json").read_text()) for n in ("local", "remote"))
    assert_same_metrics(local, remote)
    local_loss = dict(loss_history(tmp_path, local["mlflow_run_id"]))
    assert sorted(local_loss) == list(range(1, 9))
    # The same MLflow run goes on; step 5 was logged before the server died and again after the resume.
    remote_loss = loss_history(tmp_path, remote["mlflow_run_id"])
    assert sorted({step for step, _ in remote_loss}) == list(range(1, 9))
    assert [v for _, v in remote_loss] == pytest.approx([local_loss[step] for step, _ in remote_loss], abs=1e-6)
