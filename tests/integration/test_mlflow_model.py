"""The model a training run logs to MLflow, against the run folder's final checkpoint, through
`mlflow.pyfunc` and a real `mlflow models serve`: one tiny run in a plain python process (1 rank,
one step per epoch), 30 epochs with checkpoint.every_epochs 20, shared by the tests."""

import json
import os
import sys
import urllib.request

import mlflow
import numpy as np
import pytest
import torch

from fgdist.retrieval.export import load_model
from fgdist.training import checkpoint
from tests.helpers import LAUNCHER_ENV, REPO, TINY_TRAINING, free_port, launch_training, serving, tiny_synthetic

EPOCHS, EVERY, SIZE = 30, 20, 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, run folder, MLflow model URI) of the 30-epoch run: 8 training images of 16 x 16
    in one batch, a width-4 ResNet-18."""
    root = tmp_path_factory.mktemp("mlflow_model")
    shards = tiny_synthetic(root / "shards", num_super=2, train_per_fine=2, image_size=SIZE, big_patch=6, small_patch=3)
    overrides = {
        "data.shards": shards,
        "data.image_size": SIZE,
        "data.padding": 2,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "model.width": 4,
        "optim.epochs": EPOCHS,
        "optim.milestones": "[20]",
        "checkpoint.every_epochs": EVERY,
        "eval.recall_ks": "[1]",
        "eval.pictures": "false",
        "output_dir": root / "runs",
        "name": "tiny",
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    launch_training(root, [], None, *TINY_TRAINING, *sets, unset=LAUNCHER_ENV)
    run = root / "runs" / "tiny"
    run_id = json.loads((run / "results.json").read_text())["mlflow_run_id"]
    return root, run, f"runs:/{run_id}/model"


@pytest.fixture
def store(trained, monkeypatch):
    """The run's MLflow store as this process's tracking URI."""
    uri = f"sqlite:///{trained[0]}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


def images(count=4) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def test_the_run_folder_s_final_checkpoint_is_the_mlflow_model(trained, store, caplog):
    _, run, uri = trained
    newest = checkpoint.latest(run / "checkpoints")
    assert checkpoint.read_position(newest).epoch == EPOCHS
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch*")) == [
        f"epoch{EVERY:04d}-step000000",
        f"epoch{EPOCHS:04d}-step000000",
    ]
    x = images()
    with caplog.at_level("WARNING", logger="fgdist"):
        from_run = load_model(run)(x)
    assert not caplog.records  # the end of training: nothing to warn about
    assert torch.equal(from_run, load_model(uri)(x))
    # the comparison tells weights apart: epoch 20's are not the final ones
    assert not torch.allclose(load_model(run / "checkpoints" / f"epoch{EVERY:04d}-step000000")(x), from_run)


def test_pyfunc_predict_gives_load_model_s_embeddings(trained, store):
    _, run, uri = trained
    x = images()
    predicted = mlflow.pyfunc.load_model(uri).predict(x.numpy())
    assert isinstance(predicted, np.ndarray) and predicted.dtype == np.float32
    np.testing.assert_allclose(predicted, load_model(run)(x).detach().numpy(), atol=1e-6)


def test_mlflow_models_serve_answers_with_load_model_s_embeddings(trained, store):
    root, run, uri = trained
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    # the served process unpickles fgdist's ImageEmbedder: this checkout must be importable there
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(REPO)}
    url = f"http://127.0.0.1:{port}"
    x = images()
    with serving(cmd, root, env, f"{url}/ping", root / "serve.log", timeout=120):
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            predictions = np.asarray(json.load(answer)["predictions"], dtype=np.float32)
    np.testing.assert_allclose(predictions, load_model(run)(x).detach().numpy(), atol=1e-5)
