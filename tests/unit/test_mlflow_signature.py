"""The logged MLflow model's signature: unnamed tensors, so `pyfunc.predict` takes a plain array;
models logged with the former named signature still load through `fgdist.load_model`."""

import mlflow
import numpy as np
import pytest
import torch

from fgdist.config import RunConfig
from fgdist.retrieval.export import ImageEmbedder, embedder_from, load_model, log_to_mlflow
from fgdist.training.model import EmbeddingNet

SIZE = 16


@pytest.fixture
def embedder(tmp_path):
    cfg = RunConfig.model_validate(
        {"model": {"width": 4}, "data": {"image_size": SIZE, "shards": str(tmp_path)}, "output_dir": str(tmp_path)}
    )
    torch.manual_seed(0)
    return embedder_from(EmbeddingNet(cfg.model, 4, None).eval(), cfg.model, cfg.data, "backbone")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module: creating its tables takes seconds."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        # an experiment of this store: MLflow keeps the active experiment id of whatever store an
        # earlier test used, and start_run would look for that id here
        mlflow.set_experiment("signature")
        yield uri


def test_pyfunc_predict_takes_an_array_and_gives_the_embeddings(embedder, store):
    with mlflow.start_run() as run:
        log_to_mlflow(embedder)
    uri = f"runs:/{run.info.run_id}/model"
    spec = mlflow.models.get_model_info(uri).signature
    assert [t.name for t in spec.inputs.inputs + spec.outputs.inputs] == [None, None]
    assert spec.inputs.inputs[0].shape == (-1, 3, SIZE, SIZE) and spec.outputs.inputs[0].shape == (-1, 32)
    x = torch.randn(3, 3, SIZE, SIZE)
    predicted = mlflow.pyfunc.load_model(uri).predict(x.numpy())
    np.testing.assert_allclose(predicted, load_model(uri)(x).detach().numpy(), atol=1e-6)


def test_a_model_logged_with_the_former_named_signature_still_loads(embedder, store):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    named = ModelSignature(  # what fgdist logged before: named tensors, which pyfunc cannot serve
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, SIZE, SIZE), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 32), "embeddings")]),
    )
    with mlflow.start_run() as run:
        mlflow.pytorch.log_model(
            embedder, name="model", signature=named, serialization_format="pickle", pip_requirements=["torch"]
        )
    x = torch.randn(3, 3, SIZE, SIZE)
    loaded = load_model(run.info.run_id)
    assert isinstance(loaded, ImageEmbedder) and loaded.preprocessing == embedder.preprocessing
    assert torch.equal(loaded(x), embedder(x))
