"""Export, load_model, embeddings files, the faiss index, and the named errors of bad input.
The trained-run round trip is tests/integration/test_visual_search.py."""

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from fgdist.config import RunConfig
from fgdist.embeddings_io import read_embeddings
from fgdist.output_folder import atomic_folder, partial_path
from fgdist.retrieval.embed import main as embed_main
from fgdist.retrieval.export import embedder_from, export_model, load_model
from fgdist.retrieval.search import build, index_main, open_index, search_main
from fgdist.search_errors import (
    CheckpointError,
    DimensionMismatchError,
    ImageDecodeError,
    OutputExistsError,
    UnknownRunError,
)
from fgdist.training.model import EmbeddingNet
from tests.helpers import write_run_folder

faiss = pytest.importorskip("faiss")


def tiny_config(tmp_path, projection="none", features="backbone") -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"width": 4, "projection": projection, "projection_dim": 8},
            "eval": {"features": features},
            "data": {"image_size": 16, "shards": str(tmp_path)},
            "output_dir": str(tmp_path),
        }
    )


# (model.projection, eval.features, the EmbeddingNet output the run evaluates, its width)
FEATURES = [
    ("none", "backbone", "features", 32),
    ("mlp", "backbone", "features", 32),
    ("mlp", "projection", "projection", 8),
]


def fake_run(tmp_path, cfg: RunConfig, seed=0) -> tuple:
    """A run folder laid out as the trainer writes it, holding a random EmbeddingNet."""
    torch.manual_seed(seed)
    model = EmbeddingNet(cfg.model, 4, None).eval()
    run = tmp_path / "run"
    write_run_folder(run, cfg, model)
    return run, model


def image_folder(path, count, size=20):
    path.mkdir(parents=True)
    gen = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(gen.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path / f"img{i:02d}.png")
    return path


@pytest.mark.parametrize("projection,features,output,dim", FEATURES)
def test_export_and_checkpoint_give_the_model_s_embeddings(tmp_path, projection, features, output, dim):
    """load_model embeds what the run's evaluation embeds (eval.features): f(x) or its projection."""
    cfg = tiny_config(tmp_path, projection, features)
    run, model = fake_run(tmp_path, cfg)
    images = torch.randn(5, 3, 16, 16)
    want = F.normalize(model(images)[output], dim=1)
    assert want.shape == (5, dim)
    checkpoint_folder = next(run.glob("checkpoints/epoch*"))
    for source in (run, checkpoint_folder):
        from_checkpoint = load_model(source)
        assert from_checkpoint.dim == dim and torch.equal(from_checkpoint(images), want)
    export_model(from_checkpoint, tmp_path / "exported")
    exported = load_model(tmp_path / "exported")
    assert exported.dim == dim and torch.equal(exported(images), want)
    meta = json.loads((tmp_path / "exported" / "fgdist_model.json").read_text())
    assert meta["embedding_dim"] == dim and meta["features"] == features and meta["preprocessing"]["image_size"] == 16
    # the backbone's keys are those of exports written before the projection existed
    keys = set(safe_open(str(tmp_path / "exported" / "model.safetensors"), "pt").keys())
    backbone_keys = {k.removeprefix("backbone.") for k in model.state_dict() if k.startswith("backbone.")}
    projection_keys = (
        {k for k in model.state_dict() if k.startswith("projection.")} if features == "projection" else set()
    )
    assert keys == backbone_keys | projection_keys
    with pytest.raises(OutputExistsError, match="exported"):
        export_model(from_checkpoint, tmp_path / "exported")


def test_export_without_the_features_key_embeds_the_backbone(tmp_path):
    """An export written before `features` was recorded still loads, as f(x)."""
    cfg = tiny_config(tmp_path, "mlp", "backbone")
    run, model = fake_run(tmp_path, cfg)
    export_model(load_model(run), tmp_path / "exported")
    config = tmp_path / "exported" / "fgdist_model.json"
    meta = json.loads(config.read_text())
    del meta["features"]
    config.write_text(json.dumps(meta))
    images = torch.randn(3, 3, 16, 16)
    assert torch.equal(load_model(tmp_path / "exported")(images), F.normalize(model(images)["features"], dim=1))


def test_projection_features_without_a_projection_are_named(tmp_path):
    cfg = tiny_config(tmp_path)
    model = EmbeddingNet(cfg.model, 4, None).eval()
    with pytest.raises(ValueError, match="needs model.projection='mlp'"):
        embedder_from(model, cfg.model, cfg.data, "projection")
    export_model(embedder_from(model, cfg.model, cfg.data, "backbone"), tmp_path / "exported")
    config = tmp_path / "exported" / "fgdist_model.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "features": "projection"}))
    with pytest.raises(CheckpointError, match="features 'projection' needs model.projection='mlp'"):
        load_model(tmp_path / "exported")


def test_mlflow_logged_model_embeds_the_projection(tmp_path, monkeypatch):
    """The model the trainer logs at the end (log_trained_model) embeds what evaluation embedded,
    and its signature's output width is the projection's."""
    import mlflow

    from fgdist.retrieval.export import log_trained_model
    from fgdist.training.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = tiny_config(tmp_path, "mlp", "projection")
    torch.manual_seed(2)
    model = EmbeddingNet(cfg.model, 4, None).eval()
    tracker = Tracker(True, uri, "export", "projection", system_metrics=False)
    try:
        log_trained_model(model, cfg, tracker)
    finally:
        tracker.finish("FINISHED")
    images = torch.randn(3, 3, 16, 16)
    logged = load_model(tracker.run_id)
    assert logged.dim == 8 and torch.equal(logged(images), F.normalize(model(images)["projection"], dim=1))
    outputs = mlflow.models.get_model_info(f"runs:/{tracker.run_id}/model").signature.outputs
    assert outputs.inputs[0].shape == (-1, 8)


def test_embedder_pickled_before_the_projection_embeds_the_backbone(tmp_path):
    """An MLflow model pickled by the code before the projection existed has no `projection`
    submodule; unpickled now it embeds f(x) as it did."""
    cfg = tiny_config(tmp_path)
    model = EmbeddingNet(cfg.model, 4, None).eval()
    embedder = embedder_from(model, cfg.model, cfg.data, "backbone")
    del embedder._modules["projection"]  # the old class registered no such slot
    old = pickle.loads(pickle.dumps(embedder))
    images = torch.randn(3, 3, 16, 16)
    assert old.dim == 32 and torch.equal(old(images), F.normalize(model(images)["features"], dim=1))


def test_missing_partial_and_truncated_checkpoints_are_named(tmp_path):
    cfg = tiny_config(tmp_path)
    run, _ = fake_run(tmp_path, cfg)
    with pytest.raises(CheckpointError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    partial = run / "checkpoints" / ".epoch0002-step000000.partial"  # a save that died midway
    partial.mkdir()
    with pytest.raises(CheckpointError, match="partial"):
        load_model(partial)
    state = next(run.glob("checkpoints/epoch*/engine/state/*.pt"))
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(run)
    state.unlink()
    with pytest.raises(CheckpointError, match="no DeepSpeed model state"):
        load_model(run)


def test_unknown_mlflow_run_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(UnknownRunError, match="0123456789abcdef0123456789abcdef"):
        load_model("0123456789abcdef0123456789abcdef")


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(out, overwrite=False) as partial:
            (partial / "half.parquet").write_text("x")
            raise RuntimeError("crash")
    assert not out.exists() and not partial_path(out).exists()


def test_embed_an_image_folder_index_and_search(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    run, model = fake_run(tmp_path, cfg)
    photos = image_folder(tmp_path / "photos", 12)
    assert embed_main(["--model", str(run), "--images", str(photos), "--out", str(tmp_path / "emb"), "--quiet"]) == 0
    emb = read_embeddings(tmp_path / "emb")
    assert emb.keys == [f"img{i:02d}.png" for i in range(12)]
    assert torch.allclose(emb.vectors.norm(dim=1), torch.ones(12), atol=1e-6)
    embedder = load_model(run)
    want = embedder(embedder.preprocess([Image.open(photos / "img03.png")]))
    assert torch.allclose(emb.vectors[3], want[0], atol=1e-6)  # batch of 12 vs 1: float rounding only
    # fp16 storage: half precision of the same vectors
    half = tmp_path / "emb16"
    assert embed_main(["--model", str(run), "--images", str(photos), "--out", str(half), "--fp16", "--quiet"]) == 0
    assert read_embeddings(half).meta["dtype"] == "float16"
    assert torch.allclose(read_embeddings(half).vectors, emb.vectors, atol=2e-3)
    # an existing output is refused, and left as it was
    assert embed_main(["--model", str(run), "--images", str(photos), "--out", str(half), "--quiet"]) == 2
    assert "OutputExistsError" in capsys.readouterr().err and read_embeddings(half).meta["dtype"] == "float16"

    assert index_main(["--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "index")]) == 0
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    code = search_main(
        ["--index", str(tmp_path / "index"), "--image", str(photos / "img03.png"), "--k", "3", "--grid", str(grid)]
    )
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[1].split("\t")[:3] == ["1", "1.0000", "img03.png"]  # itself first
    assert Image.open(grid).size[0] > 0


def test_undecodable_image_fails_with_its_name_and_no_output(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    run, _ = fake_run(tmp_path, cfg)
    photos = image_folder(tmp_path / "photos", 3)
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "emb"
    assert embed_main(["--model", str(run), "--images", str(photos), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "ImageDecodeError" in err and "broken.png" in err
    assert not out.exists() and not partial_path(out).exists()
    from fgdist.retrieval.embed import decode
    from fgdist.retrieval.export import eval_transform

    with pytest.raises(ImageDecodeError, match="broken.png"):
        decode(photos / "broken.png", eval_transform(load_model(run).preprocessing))


def test_flat_index_is_exact_and_checks_the_dimension(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(500, 32, generator=gen), dim=1)
    q = F.normalize(torch.randn(20, 32, generator=gen), dim=1)
    index = build(x.numpy(), "flat")
    scores, rows = index.search(q.numpy(), 10)
    exact = (q @ x.T).topk(10, dim=1)
    assert np.array_equal(rows, exact.indices.numpy())
    assert np.allclose(scores, exact.values.numpy(), atol=1e-5)
    ivf = build(x.numpy(), "ivfpq", nlist=8, m=8, nbits=4)
    assert ivf.ntotal == 500 and not np.array_equal(faiss.serialize_index(ivf), faiss.serialize_index(index))


def test_query_of_another_dimension_is_named(tmp_path):
    cfg = tiny_config(tmp_path)
    run, _ = fake_run(tmp_path, cfg)
    photos = image_folder(tmp_path / "photos", 4)
    assert embed_main(["--model", str(run), "--images", str(photos), "--out", str(tmp_path / "emb"), "--quiet"]) == 0
    assert index_main(["--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "index")]) == 0
    idx = open_index(tmp_path / "index")
    with pytest.raises(DimensionMismatchError, match="dimension 64 against an index of dimension 32"):
        idx.search(np.zeros((1, 64), np.float32), 3)
    wider = tiny_config(tmp_path).model_copy(update={"model": cfg.model.model_copy(update={"width": 8})})
    other = tmp_path / "other"
    other.mkdir()
    run8, _ = fake_run(other, wider)
    args = ["--index", str(tmp_path / "index"), "--image", str(photos / "img00.png"), "--model", str(run8)]
    assert search_main(args) == 2


def test_model_from_training_state_is_plain_and_equal(tmp_path):
    """embedder_from copies the weights of an EmbeddingNet with cross-rank BatchNorm into plain modules."""
    from fgdist.training.model import CrossRankBatchNorm2d, convert_batchnorm

    cfg = tiny_config(tmp_path)
    torch.manual_seed(1)
    model = convert_batchnorm(EmbeddingNet(cfg.model, 4, None)).eval()
    embedder = embedder_from(model, cfg.model, cfg.data, cfg.eval.features)
    assert not any(isinstance(m, CrossRankBatchNorm2d) for m in embedder.modules())
    images = torch.randn(3, 3, 16, 16)
    assert torch.equal(embedder(images), F.normalize(model(images)["features"], dim=1))
