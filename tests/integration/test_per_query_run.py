"""A real run (DeepSpeed, 2 CPU ranks) writes its per-query results to the run folder and MLflow:
one row per test image, gathered from both ranks, whose means are the run's logged metrics."""

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from fgdist.data.shardset import open_split, split_fingerprint
from fgdist.training import per_query


def test_a_run_writes_per_query_results_that_reproduce_its_metrics(tiny_runs, straight_run, tmp_path):
    local = per_query.read(tiny_runs.run_dir("straight") / per_query.FILE)
    metrics = straight_run["metrics"]
    assert len(local.keys) == metrics["eval_images"] == open_split(tiny_runs.shards, "test").manifest.num_instances
    recalls = [k for k in metrics if "_recall_at_" in k]
    assert len(recalls) == 8  # super and fine, k = 1, 2, 4, 8
    for name in recalls:
        assert local.metric_values(name).mean() == metrics[name], name
    for name in ("super_map_at_r", "fine_map_at_r", "super_r_precision", "fine_r_precision"):
        values = local.metric_values(name)
        assert values[~np.isnan(values)].mean() == pytest.approx(metrics[name], rel=1e-12), name
    assert local.test_set == split_fingerprint(open_split(tiny_runs.shards, "test"))

    client = mlflow.MlflowClient(f"sqlite:///{tiny_runs.root}/mlflow.db")
    artifact = client.download_artifacts(straight_run["mlflow_run_id"], per_query.FILE, str(tmp_path))
    # The same table (nulls included) and the same test-set fingerprint.
    assert pq.read_table(artifact).equals(pq.read_table(local.where), check_metadata=True)
