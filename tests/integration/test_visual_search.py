"""From a trained run to visual search, on one tiny real DeepSpeed run (2 ranks, 2 epochs):
embed (1 rank and 2 ranks), export, MLflow model, Flat index, search against the evaluation's
exact top-k and its Recall@k."""

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from fgdist.embeddings_io import read_embeddings
from fgdist.retrieval.export import load_model
from fgdist.retrieval.search import open_index
from tests.helpers import REPO, free_port

pytest.importorskip("faiss")
K = 5


def cli(root, *args, ranks=1):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    launch = (
        [sys.executable, "-m"]
        if ranks == 1
        else ["torchrun", f"--nproc_per_node={ranks}", f"--master_port={free_port()}", "-m"]
    )
    proc = subprocess.run([*launch, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def searched(tiny_runs):
    """The run, its test embeddings on 1 and 2 ranks, an export and a Flat index."""
    tiny_runs.train("search", "--set", "optim.epochs=2")
    root, run = tiny_runs.root, tiny_runs.run_dir("search")
    out = root / "search"
    common = ["--shards", str(tiny_runs.shards), "--split", "test", "--batch-size", "5", "--quiet"]
    cli(root, "fgdist.retrieval.embed", "--model", str(run), "--out", str(out / "emb1"), *common)
    cli(root, "fgdist.retrieval.embed", "--model", str(run), "--out", str(out / "emb2"), *common, ranks=2)
    cli(root, "fgdist.retrieval.export", "--model", str(run), "--out", str(out / "exported"))
    cli(root, "fgdist.retrieval.search", "--help")
    from fgdist.retrieval.search import index_main

    assert index_main(["--embeddings", str(out / "emb1"), "--out", str(out / "index")]) == 0
    return tiny_runs, run, out


def test_embeddings_from_one_and_two_ranks_are_identical(searched):
    _, _, out = searched
    one, two = read_embeddings(out / "emb1"), read_embeddings(out / "emb2")
    assert two.meta["world_size"] == 2 and len(list((out / "emb2").glob("part-*.parquet"))) == 2
    assert one.keys == two.keys and torch.equal(one.labels["fine"], two.labels["fine"])
    assert torch.equal(one.vectors, two.vectors)


def test_index_neighbours_are_the_evaluation_s_exact_top_k(searched):
    tiny_runs, run, out = searched
    from fgdist.data.shardset import open_split
    from fgdist.report.pictures import embed_split
    from fgdist.training.checkpoint import load_checkpoint_model

    # The evaluation's computation: the checkpoint's model, the eval pipeline, exact top-k without itself.
    model, cfg, _ = load_checkpoint_model(run)
    feats, ids = embed_split(model, open_split(tiny_runs.shards, "test"), cfg.data)
    order = ids.argsort()
    feats, ids = feats[order], ids[order]
    sims = feats @ feats.T
    sims.fill_diagonal_(float("-inf"))
    exact = sims.topk(K, dim=1)

    emb, idx = read_embeddings(out / "emb1"), open_index(out / "index")
    assert torch.equal(emb.instance, ids)
    scores, rows = idx.search(emb.vectors.numpy(), K + 1)
    instance = np.asarray(idx.rows.column("instance").to_numpy())
    for q in range(len(ids)):
        keep = instance[rows[q]] != int(ids[q])  # the query itself
        found, found_scores = instance[rows[q]][keep][:K], scores[q][keep][:K]
        assert np.allclose(found_scores, exact.values[q].numpy(), atol=1e-5), q
        differ = found != ids[exact.indices[q]].numpy()
        # ties aside: a different id at a rank only where the exact scores there are equal
        assert np.all(np.abs(found_scores[differ] - exact.values[q].numpy()[differ]) < 1e-5), q

    # Recall@k and MAP@R of the index's neighbours are the training run's evaluation numbers.
    metrics = tiny_runs.results("search")["metrics"]
    fine = emb.labels["fine"].numpy()
    neighbours = [instance[rows[q]][instance[rows[q]] != int(ids[q])][:K] for q in range(len(ids))]
    for k in cfg.eval.recall_ks:
        if k <= K:
            hits = sum(np.any(fine[n[:k]] == fine[q]) for q, n in enumerate(neighbours))
            assert 100.0 * hits / len(ids) == pytest.approx(metrics[f"fine_recall_at_{k}"]), k
    assert 0 <= metrics["fine_map_at_r"] <= metrics["fine_r_precision"] <= 100


def test_load_model_export_mlflow_and_checkpoint_agree(searched, monkeypatch):
    tiny_runs, run, out = searched
    run_id = tiny_runs.results("search")["mlflow_run_id"]
    images = torch.randn(6, 3, 32, 32)
    from_checkpoint = load_model(run)(images)
    assert torch.equal(load_model(out / "exported")(images), from_checkpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tiny_runs.root}/mlflow.db")  # the trainer's store
    assert torch.equal(load_model(run_id)(images), from_checkpoint)  # logged by the trainer at the end
    assert torch.equal(load_model(f"runs:/{run_id}/model")(images), from_checkpoint)


def test_search_command_prints_the_neighbours(searched):
    tiny_runs, _, out = searched
    shard = sorted((tiny_runs.shards / "test").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".png"))
        (out / "query.png").write_bytes(tar.extractfile(member).read())
        instance = int(member.name.split(".")[0])
    printed = cli(
        tiny_runs.root,
        "fgdist.retrieval.search",
        "--index",
        str(out / "index"),
        "--image",
        str(out / "query.png"),
        "--k",
        str(K),
        "--grid",
        str(out / "grid.png"),
    )
    header, *lines = [line.split("\t") for line in printed.splitlines()[: K + 1]]
    found = [dict(zip(header, line)) for line in lines]
    assert int(found[0]["key"]) == instance and float(found[0]["score"]) == pytest.approx(1.0, abs=1e-5)
    emb = read_embeddings(out / "emb1")
    row = emb.instance.tolist().index(instance)
    expected = (emb.vectors @ emb.vectors[row]).topk(K).indices
    assert [int(n["key"]) for n in found] == emb.instance[expected].tolist()  # shard keys are the instance ids
    # names from the shard manifest, paths from its index (the synthetic source's origins)
    manifest = json.loads((tiny_runs.shards / "test" / "manifest.json").read_text())
    assert found[0]["super_name"] == manifest["super_classes"][int(found[0]["super"])]["name"]
    assert (out / "grid.png").stat().st_size > 0
    assert json.loads((out / "index" / "index.json").read_text())["model"].startswith("../")  # relative
    assert open_index(out / "index").model_source == str(tiny_runs.run_dir("search").resolve())
