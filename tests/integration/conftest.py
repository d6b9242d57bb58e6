import json

import pytest

from tests.helpers import TINY_TRAINING, deepspeed_train, tiny_synthetic


class TinyRuns:
    """Tiny real training runs (DeepSpeed, CPU ranks) sharing one shard set and MLflow store."""

    def __init__(self, root):
        self.root = root
        self.shards = root / "shards"
        tiny_synthetic(self.shards)

    def args(self, name, *extra):
        return [
            *TINY_TRAINING,
            "--set",
            f"data.shards={self.shards}",
            "--set",
            f"output_dir={self.root / 'runs'}",
            "--set",
            f"name={name}",
            "--set",
            "optim.milestones=[2]",
            "--set",
            "checkpoint.every_epochs=1",
            *extra,
        ]

    def train(self, name, *extra, num_gpus=2, check=True):
        return deepspeed_train(self.root, *self.args(name, *extra), num_gpus=num_gpus, check=check)

    def results(self, name):
        return json.loads((self.root / "runs" / name / "results.json").read_text())

    def run_dir(self, name):
        return self.root / "runs" / name


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    return TinyRuns(tmp_path_factory.mktemp("tiny_runs"))


@pytest.fixture(scope="session")
def straight_run(tiny_runs):
    """The uninterrupted 3-epoch reference run on 2 ranks."""
    tiny_runs.train("straight", "--set", "optim.epochs=3")
    return tiny_runs.results("straight")


def assert_same_metrics(a: dict, b: dict) -> None:
    for key, value in a["metrics"].items():
        if key != "eval_seconds":
            assert b["metrics"][key] == pytest.approx(value, abs=1e-6), key
