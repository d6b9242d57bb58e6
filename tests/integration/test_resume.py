"""Resume: a run stopped after epoch 1 and resumed (real DeepSpeed, 2 CPU ranks) ends with the
same metrics as an uninterrupted run, and continues the same MLflow run."""

import json

import mlflow
import pytest

from tests.helpers import TINY_TRAINING, deepspeed_train, tiny_synthetic


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tiny_synthetic(root / "shards")
    return root


def train(workdir, name, *extra, check=True):
    args = [*TINY_TRAINING, "--set", f"data.shards={workdir / 'shards'}", "--set", f"output_dir={workdir / 'runs'}",
            "--set", f"name={name}", "--set", "optim.milestones=[2]", "--set", "checkpoint.every_epochs=1", *extra]
    return deepspeed_train(workdir, *args, check=check)


def results(workdir, name):
    return json.loads((workdir / "runs" / name / "results.json").read_text())


def test_resumed_run_matches_uninterrupted_run(workdir):
    train(workdir, "straight", "--set", "optim.epochs=3")
    train(workdir, "stopped", "--set", "optim.epochs=1")  # stops after epoch 1 (checkpoint written)
    stopped_run = results(workdir, "stopped")["mlflow_run_id"]
    proc = train(workdir, "stopped", "--set", "optim.epochs=3", "--resume")
    assert "resumed from" in proc.stdout and "epoch0001-step000000" in proc.stdout
    a, b = results(workdir, "straight"), results(workdir, "stopped")
    assert b["mlflow_run_id"] == stopped_run  # the same MLflow run goes on
    for key, value in a["metrics"].items():
        if key != "eval_seconds":
            assert b["metrics"][key] == pytest.approx(value, abs=1e-6), key
    client = mlflow.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    straight_loss = [(m.step, m.value) for m in client.get_metric_history(a["mlflow_run_id"], "loss")]
    resumed_loss = [(m.step, m.value) for m in client.get_metric_history(stopped_run, "loss")]
    assert sorted(resumed_loss) == pytest.approx(sorted(straight_loss), abs=1e-6)  # no step reset, same curve


def test_resume_without_checkpoint_is_an_error(workdir):
    proc = train(workdir, "never_ran", "--set", "optim.epochs=1", "--resume", check=False)
    assert proc.returncode != 0 and "no checkpoint in" in proc.stdout + proc.stderr
