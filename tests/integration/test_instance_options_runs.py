"""The instance options (issue 11) on real DeepSpeed CPU ranks, all at once (the combined
recipe: strong augmentation, two views, projection MLP, cosine logits, feature init, ema head,
cosine lambda_I schedule, projection features evaluated): a run killed mid-epoch and resumed
equals the uninterrupted run, and the ema columns are re-cut like weights when a checkpoint is
resumed on another world size."""

import json
import os

import mlflow
import pytest

from tests.integration.conftest import assert_same_metrics
from tests.integration.test_faults import probe

COMBINED = [
    f"--set={flag}"
    for flag in (
        "data.augment=strong",
        "data.crop_scale=[0.3, 1.0]",
        "data.views=2",
        "model.projection=mlp",
        "model.projection_dim=16",
        "head.logit=cosine",
        "head.temperature=0.2",
        "head.init=features",
        "head.update=ema",
        "head.ema_momentum=0.5",
        "objective.lambda_I_schedule=cosine",
        "eval.features=projection",
        "optim.epochs=2",
        "checkpoint.every_steps=1",  # 2 steps per epoch: a checkpoint in the middle of each epoch
    )
]


@pytest.fixture(scope="module")
def combined_straight(tiny_runs):
    proc = tiny_runs.train("combined_straight", *COMBINED)
    assert "columns set to their images' features" in proc.stdout
    return tiny_runs.results("combined_straight")


def loss_history(tiny_runs, run_id):
    client = mlflow.MlflowClient(f"sqlite:///{tiny_runs.root}/mlflow.db")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


def test_combined_options_resume_mid_epoch_to_the_same_run(tiny_runs, combined_straight):
    os.environ["FGDIST_KILL_AT"] = "step:1:4"  # global step 4: after the checkpoint at step 1 of epoch 2
    try:
        proc = tiny_runs.train("combined_killed", *COMBINED, check=False)
    finally:
        del os.environ["FGDIST_KILL_AT"]
    assert proc.returncode != 0
    ckpt = tiny_runs.run_dir("combined_killed") / "checkpoints"
    assert (ckpt / "latest").read_text() == "epoch0001-step000001"
    proc = tiny_runs.train("combined_killed", *COMBINED, "--resume")
    assert "epoch0001-step000001" in proc.stdout
    assert "columns set to their images' features" not in proc.stdout  # a resume keeps the trained columns
    resumed = tiny_runs.results("combined_killed")
    assert_same_metrics(combined_straight, resumed)
    straight_loss = loss_history(tiny_runs, combined_straight["mlflow_run_id"])
    resumed_loss = loss_history(tiny_runs, resumed["mlflow_run_id"])
    assert [s for s, _ in resumed_loss] == [s for s, _ in straight_loss] == [1, 2, 3, 4]
    assert [v for _, v in resumed_loss] == pytest.approx([v for _, v in straight_loss], abs=1e-6)


def test_ema_columns_are_recut_on_another_world_size(tiny_runs, combined_straight):
    two_rank_ckpt = tiny_runs.run_dir("combined_straight") / "checkpoints" / "epoch0002-step000000"
    assert json.loads((two_rank_ckpt / "meta.json").read_text())["world_size"] == 2
    # epochs=2: nothing left to train; each probe evaluates the fixed batch and the test split.
    on_2 = probe(tiny_runs, "combined_elastic_2", two_rank_ckpt, 2, 2, *COMBINED)
    on_1 = probe(tiny_runs, "combined_elastic_1", two_rank_ckpt, 2, 1, *COMBINED)
    assert on_1 == pytest.approx(on_2, abs=1e-6)
    assert_same_metrics(tiny_runs.results("combined_elastic_2"), tiny_runs.results("combined_elastic_1"))
