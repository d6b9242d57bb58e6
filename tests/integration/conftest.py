import json

import pytest

from tests.helpers import TINY_TRAINING, tiny_synthetic, train_on_ranks

# The pool's data (issue 21): 12 labeled training images in 3 super-classes and 20 unlabeled
# ones; 32 columns, so 2 ranks take 2 steps an epoch as on tiny_runs' data, and the pool is split
# over them (rank 1 owns only pool columns).
POOL_SHARDS = {"num_super": 3, "fine_per_super": 2, "train_per_fine": 2, "unlabeled": 20}


class TinyRuns:
    """Tiny real training runs (DeepSpeed engines on CPU ranks, started by torchrun: see
    tests.helpers.train_on_ranks) sharing one shard set and MLflow store."""

    def __init__(self, root, **shard_options):
        self.root = root
        self.shards = root / "shards"
        tiny_synthetic(self.shards, **shard_options)

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
        return train_on_ranks(self.root, *self.args(name, *extra), num_gpus=num_gpus, check=check)

    def results(self, name):
        return json.loads((self.root / "runs" / name / "results.json").read_text())

    def run_dir(self, name):
        return self.root / "runs" / name


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    return TinyRuns(tmp_path_factory.mktemp("tiny_runs"))


def train_straight(runs: TinyRuns) -> dict:
    runs.train("straight", "--set", "optim.epochs=3")
    return runs.results("straight")


@pytest.fixture(scope="session")
def straight_run(tiny_runs):
    """The uninterrupted 3-epoch reference run on 2 ranks."""
    return train_straight(tiny_runs)


@pytest.fixture(scope="session")
def pool_runs(tmp_path_factory):
    """tiny_runs with unlabeled training images (POOL_SHARDS)."""
    return TinyRuns(tmp_path_factory.mktemp("pool_runs"), **POOL_SHARDS)


@pytest.fixture(scope="session")
def pool_straight_run(pool_runs):
    """The uninterrupted 3-epoch reference run on 2 ranks, with the pool."""
    return train_straight(pool_runs)


@pytest.fixture(params=["labeled", "pool"])
def runs_and_straight(request):
    """(runs, their uninterrupted run): tiny_runs' labeled data, and the data with a pool."""
    names = ("tiny_runs", "straight_run") if request.param == "labeled" else ("pool_runs", "pool_straight_run")
    return tuple(request.getfixturevalue(name) for name in names)


@pytest.fixture(params=["labeled", "pool"])
def runs(request):
    """tiny_runs, and pool_runs: for the tests that must hold on both."""
    return request.getfixturevalue("tiny_runs" if request.param == "labeled" else "pool_runs")


def assert_same_metrics(a: dict, b: dict) -> None:
    for key, value in a["metrics"].items():
        if key != "eval_seconds":
            assert b["metrics"][key] == pytest.approx(value, abs=1e-6), key
