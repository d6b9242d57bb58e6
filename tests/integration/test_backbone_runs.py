"""Backbones users bring (issue 20) on real DeepSpeed CPU ranks: a torchvision ResNet-18
fine-tuned from a pretrained file with its own backbone learning rate, timm's MobileNetV3
(BatchNormAct2d layers, cross-rank) and timm's ViT-Tiny at 32x32 (LayerNorm, no attention maps).
Each trains 2 epochs on 2 ranks; its checkpoint, export, `load_model`, MLflow model and
`fgdist-embed` give the same embeddings. The MobileNetV3 run's epoch-1 checkpoint also resumes to
the same result and re-cuts onto 1 rank with the same loss (the loss and gradients on 1 and 2
ranks: tests/integration/test_loss_equivalence.py)."""

import json

import mlflow
import pytest
import torch
import torchvision

from fgdist.config import DataConfig
from fgdist.data.loader import EvalStream, collate, deal, shard_urls
from fgdist.data.shardset import open_split
from fgdist.embeddings_io import read_embeddings
from fgdist.retrieval.embed import main as embed_main
from fgdist.retrieval.export import export_model, load_model
from fgdist.training.checkpoint import load_checkpoint_model
from fgdist.training.model import model_for_eval, unit_features
from tests.integration.conftest import assert_same_metrics
from tests.integration.test_faults import probe

FEW_BN_BATCHES = ["--set", "eval.bn_batches=2"]  # the re-estimation runs, at a tenth of its cost
NOT_RESNET18 = [*FEW_BN_BATCHES, "--set", "model.width=null", "--set", "model.stem=null"]  # TINY_TRAINING's keys
ARCHS = {
    "torchvision_resnet18_pretrained": [
        *FEW_BN_BATCHES,
        *("--set", "model.width=64", "--set", "model.stem=imagenet"),
        *("--set", "optim.backbone_lr_mult=0.1"),  # model.pretrained: the file the fixture writes
    ],
    "timm_mobilenetv3": [*NOT_RESNET18, "--set", "model.arch=timm:mobilenetv3_small_050"],
    "timm_vit": [
        *NOT_RESNET18,
        *("--set", "model.arch=timm:vit_tiny_patch16_224", "--set", 'model.kwargs={"img_size": 32}'),
    ],
}


def arch_args(tiny_runs, arch):
    if arch != "torchvision_resnet18_pretrained":
        return ARCHS[arch]
    weights = tiny_runs.root / "resnet18-imagenet.pth"  # as torchvision writes it (its fc included)
    if not weights.exists():
        torch.manual_seed(5)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return [*ARCHS[arch], "--set", f"model.pretrained={weights}"]


@pytest.fixture(scope="module", params=list(ARCHS))
def trained(request, tiny_runs):
    """(arch, its 2-epoch run on 2 ranks, that run's output)."""
    arch = request.param
    name = f"backbone_{arch}"
    proc = tiny_runs.train(name, *arch_args(tiny_runs, arch), "--set", "optim.epochs=2")
    return arch, name, proc.stdout + proc.stderr


def test_two_rank_run_finishes_and_every_way_to_load_it_embeds_the_same(trained, tiny_runs, tmp_path, monkeypatch):
    arch, name, output = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tiny_runs.root}/mlflow.db")  # the runs' store
    run = tiny_runs.run_dir(name)
    results = tiny_runs.results(name)
    assert results["world_size"] == 2 and results["metrics"]["fine_recall_at_1"] >= 0
    # The test images through the checkpoint's own model, as evaluation embeds them.
    loaded = load_checkpoint_model(run)
    split = open_split(tiny_runs.shards, "test")
    data = DataConfig(**{**loaded.config.data.model_dump(), "shards": str(tiny_runs.shards), "num_workers": 0})
    batch = collate(list(EvalStream(deal(shard_urls(split, split.manifest.shards), 0, 1), data)))
    want = unit_features(model_for_eval(loaded.model.eval(), loaded.config.eval.features)(batch["images"]))
    with torch.no_grad():
        from_run = load_model(run)(batch["images"])
        export_model(load_model(run), tmp_path / "exported")
        from_export = load_model(tmp_path / "exported")(batch["images"])
        from_mlflow = load_model(results["mlflow_run_id"])(batch["images"])
    assert torch.equal(from_run, want) and torch.equal(from_export, want) and torch.equal(from_mlflow, want)
    code = embed_main(
        [
            "--model",
            str(tmp_path / "exported"),
            "--shards",
            str(tiny_runs.shards),
            "--out",
            str(tmp_path / "emb"),
            "--quiet",
        ]
    )
    embedded = read_embeddings(tmp_path / "emb")  # sorted by instance id
    assert code == 0 and torch.equal(embedded.instance, batch["instance"].sort().values)
    torch.testing.assert_close(embedded.vectors, want[batch["instance"].argsort()], atol=1e-5, rtol=0)
    meta = json.loads((tmp_path / "exported" / "fgdist_model.json").read_text())
    assert meta["arch"] == loaded.config.model.arch and meta["preprocessing"]["mean"] == loaded.config.data.mean
    pictures = {p.name for p in (run / "pictures").iterdir()}
    if arch == "timm_vit":
        assert pictures == {"retrieval.png"} and "no attention maps: VisionTransformer is a transformer" in output
        assert "has no BatchNorm: model.norm and eval.bn_batches do not apply" in output
    else:
        assert pictures == {"attention.png", "retrieval.png"}
    if arch == "torchvision_resnet18_pretrained":  # the heads at optim.lr, the backbone at a tenth of it
        client = mlflow.MlflowClient()
        lr = client.get_metric_history(results["mlflow_run_id"], "lr")[0].value
        backbone_lr = client.get_metric_history(results["mlflow_run_id"], "backbone_lr")[0].value
        assert backbone_lr == pytest.approx(lr * 0.1) and lr == pytest.approx(loaded.config.optim.lr)


@pytest.mark.parametrize("trained", ["timm_mobilenetv3"], indirect=True)  # one is enough: each probe is a launch
def test_a_timm_backbone_resumes_and_recuts_onto_another_world_size(trained, tiny_runs):
    arch, name, _ = trained
    epoch1 = tiny_runs.run_dir(name) / "checkpoints" / "epoch0001-step000000"
    args = arch_args(tiny_runs, arch)
    on_2 = probe(tiny_runs, f"{name}_resumed", epoch1, 2, 2, *args)  # then trains epoch 2 on 2 ranks
    assert_same_metrics(tiny_runs.results(name), tiny_runs.results(f"{name}_resumed"))
    on_1 = probe(tiny_runs, f"{name}_on_1", epoch1, 1, 1, *args)  # the same checkpoint re-cut onto 1 rank
    assert on_1 == pytest.approx(on_2, abs=1e-6)
