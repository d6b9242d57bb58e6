"""Resume: a run stopped after epoch 1 and resumed (real DeepSpeed, 2 CPU ranks) ends with the
same metrics as an uninterrupted run, and continues the same MLflow run without resetting steps."""

import mlflow
import pytest

from tests.integration.conftest import assert_same_metrics


def test_resumed_run_matches_uninterrupted_run(tiny_runs, straight_run):
    tiny_runs.train("stopped", "--set", "optim.epochs=1")  # stops after epoch 1 (checkpoint written)
    stopped_run = tiny_runs.results("stopped")["mlflow_run_id"]
    proc = tiny_runs.train("stopped", "--set", "optim.epochs=3", "--resume")
    assert "resumed from" in proc.stdout and "epoch0001-step000000" in proc.stdout
    resumed = tiny_runs.results("stopped")
    assert resumed["mlflow_run_id"] == stopped_run  # the same MLflow run goes on
    assert_same_metrics(straight_run, resumed)
    client = mlflow.MlflowClient(f"sqlite:///{tiny_runs.root}/mlflow.db")
    straight_loss = [(m.step, m.value) for m in client.get_metric_history(straight_run["mlflow_run_id"], "loss")]
    resumed_loss = [(m.step, m.value) for m in client.get_metric_history(stopped_run, "loss")]
    # No step reset, same curve: the same steps, and the same loss at each.
    assert [step for step, _ in sorted(resumed_loss)] == [step for step, _ in sorted(straight_loss)]
    assert [v for _, v in sorted(resumed_loss)] == pytest.approx([v for _, v in sorted(straight_loss)], abs=1e-6)


def test_resume_without_checkpoint_is_an_error(tiny_runs):
    proc = tiny_runs.train("never_ran", "--set", "optim.epochs=1", "--resume", check=False)
    assert proc.returncode != 0 and "no checkpoint in" in proc.stdout + proc.stderr
