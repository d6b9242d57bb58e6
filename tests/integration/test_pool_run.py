"""A run with unlabeled training images (the pool, issue 21) on real DeepSpeed CPU ranks: what it
records (the pool's size and chance level as params, the pool term as a metric, the pool in
plan.json), and the one error an objective that cannot train the pool gives. Its resume and
elastic re-cut are parametrisations of tests/integration/test_faults.py."""

import json
import math

import mlflow

from tests.helpers import deepspeed_train
from tests.integration.conftest import POOL_SHARDS


def test_a_pool_run_logs_its_size_and_its_term(pool_runs, pool_straight_run):
    run_id = pool_straight_run["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{pool_runs.root}/mlflow.db")
    params = client.get_run(run_id).data.params
    count = POOL_SHARDS["unlabeled"]
    assert params["num_unlabeled"] == str(count) and params["objective.lambda_U"] == "1.0"
    assert float(params["pool_ce_chance"]) == math.log(count)
    pool_ce = [m.value for m in client.get_metric_history(run_id, "pool_ce")]
    assert len(pool_ce) == 6 and all(0 < v < 10 for v in pool_ce)  # every step of 3 epochs
    plan = json.loads((pool_runs.run_dir("straight") / "plan.json").read_text())
    assert plan["pool"] == {"columns": [12, 32], "split": True}
    assert plan["ranks"][1] == {"rank": 1, "columns": [16, 32], "super_classes": [], "pool_columns": [16, 32]}
    # Evaluation's queries are the 12 labeled test images; no unlabeled image is one.
    assert pool_straight_run["metrics"]["eval_images"] == 12 and "fine_recall_at_1" in pool_straight_run["metrics"]


def test_an_objective_without_a_grouped_instance_term_refuses_the_pool(pool_runs):
    # under the deepspeed launcher, which passes the rank's exit status on (torchrun's is 1)
    proc = deepspeed_train(
        pool_runs.root, *pool_runs.args("base_on_pool", "--set", "objective.name=base"), num_gpus=1, check=False
    )
    assert proc.returncode == 2
    assert "ConfigError: objective.name='base': the training split holds 20 unlabeled images" in proc.stderr
