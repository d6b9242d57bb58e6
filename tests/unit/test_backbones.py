"""The backbones users bring (fgdist/backbones.py): torchvision and timm models without their
classifier, their config checks, pretrained files and cache tags, cross-rank BatchNorm for any
BatchNorm layer, and the optimizer's backbone learning rate."""

import copy
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from fgdist.backbones import PretrainedMismatchError, WeightsNotCachedError, build_backbone
from fgdist.config import ConfigError, DataConfig, ModelConfig, validate
from fgdist.report.pictures import NoSpatialMapsError, attention_maps
from fgdist.retrieval.export import embedder_from, export_model, load_model
from fgdist.search_errors import CheckpointError
from fgdist.training.model import (
    CrossRankBatchNorm1d,
    CrossRankBatchNormAct2d,
    EmbeddingNet,
    batchnorm_layers,
    convert_batchnorm,
    reestimate_batchnorm,
)
from fgdist.training.trainer import parameter_groups
from tests.helpers import REPO, write_run_folder

TIMM_CONV = "timm:mobilenetv3_small_050"  # timm's BatchNormAct2d layers
TIMM_VIT = {"arch": "timm:vit_tiny_patch16_224", "kwargs": {"img_size": 32}}
MARK = 12.375  # a value no initializer produces by chance


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, message",
    [
        ({"arch": "resnet5O"}, r"model\.arch.*'resnet5O' is not a torchvision classification model.*resnet50"),
        ({"arch": "timm:mobilenetv3_smal_050"}, r"model\.arch.*not a timm model.*mobilenetv3_small_050"),
        ({"arch": "resnet50", "width": 16}, r"model\.width is for arch 'resnet18' only"),
        ({"arch": "convnext_tiny", "stem": "cifar"}, r"model\.stem='cifar' is for torchvision ResNets only"),
        ({"arch": "resnet18", "pretrained": "timm:c3_in1k"}, r"timm tag: it needs model\.arch='timm:<name>'"),
        ({"arch": TIMM_CONV, "pretrained": "torchvision:IMAGENET1K_V1"}, r"torchvision tag: it needs a torchvision"),
        ({"download": True}, r"model\.download fetches a model\.pretrained tag"),
    ],
)
def test_model_config_errors_name_the_key_and_the_fix(model, message):
    with pytest.raises(ConfigError, match=message):
        validate({"model": model}, "run.json")


def test_backbone_lr_mult_needs_pretrained_weights():
    with pytest.raises(ConfigError, match=r"optim\.backbone_lr_mult.*set model\.pretrained"):
        validate({"optim": {"backbone_lr_mult": 0.1}}, "run.json")


def test_old_configs_keep_their_meaning():
    """No arch (resnet18), stem and width as configs always wrote them; the default resnet18 is
    the CIFAR-stem ResNet-18 of width 64, normalized with ImageNet's statistics."""
    old = validate({"model": {"stem": "cifar", "width": 16}}, "old.json")
    assert (old.model.arch, old.model.stem, old.model.width) == ("resnet18", "cifar", 16)
    default = validate({}, "default.json")
    assert (default.model.stem, default.model.width) == ("cifar", 64)
    assert default.data.mean == [0.485, 0.456, 0.406] and default.data.std == [0.229, 0.224, 0.225]
    # What the trainer writes into config.json reads back as the same config, for any arch.
    for model in ({}, {"arch": "resnet50"}, TIMM_VIT):
        cfg = validate({"model": model}, "run.json")
        assert validate(json.loads(cfg.model_dump_json()), "config.json") == cfg


def test_timm_models_normalize_with_their_pretrained_statistics():
    vit = validate({"model": TIMM_VIT}, "run.json")
    assert vit.data.mean == [0.5, 0.5, 0.5] and vit.data.std == [0.5, 0.5, 0.5]
    own = validate({"model": TIMM_VIT, "data": {"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]}}, "run.json")
    assert own.data.mean == [0.1, 0.2, 0.3]  # the user's own wins


# -- building ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, dim",
    [
        ({"arch": "resnet50"}, 2048),
        ({"arch": "efficientnet_b0"}, 1280),
        ({"arch": "mobilenet_v3_small"}, 1024),  # the classifier's hidden layer: its last Linear is dropped
        ({"arch": "convnext_tiny"}, 768),
        ({"arch": "vit_b_16", "kwargs": {"image_size": 32}}, 768),
        ({"arch": "timm:resnet10t"}, 512),
        ({"arch": TIMM_CONV}, 1024),  # timm's head_hidden_size, not num_features (288)
        (TIMM_VIT, 192),
    ],
)
def test_backbones_give_their_pooled_features_and_the_heads_follow(model, dim):
    cfg = validate({"model": model}, "run.json").model
    torch.manual_seed(0)
    net = EmbeddingNet(cfg.model_copy(update={"projection": "mlp", "projection_dim": 8}), 3, 5).eval()
    assert net.feature_dim == net.backbone.embedding_dim == dim and net.instance_dim == 8
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out["features"].shape == (2, dim) and out["super_logits"].shape == (2, 3)
    assert out["fine_logits"].shape == (2, 5) and out["projection"].shape == (2, 8)
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in net.backbone.modules())


def test_cifar_stem_fits_other_resnets():
    net = build_backbone(validate({"model": {"arch": "resnet50", "stem": "cifar"}}, "r").model)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.out_channels == 64 and isinstance(net.maxpool, nn.Identity)


# -- pretrained files ----------------------------------------------------------------------------
def _timm_file(tmp_path, arch, name="weights.safetensors", **kwargs):
    """A state dict as timm writes it (the classifier included), with marked values."""
    import timm

    torch.manual_seed(1)
    state = timm.create_model(arch, num_classes=1000, **kwargs).state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[first].view(-1)[3] = MARK
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def test_timm_safetensors_file_loads_exactly_and_its_classifier_is_dropped(tmp_path):
    path, state = _timm_file(tmp_path, "resnet10t")
    net = build_backbone(ModelConfig(arch="timm:resnet10t", pretrained=str(path)))
    got = net.state_dict()
    assert set(state) - set(got) == {"fc.weight", "fc.bias"}
    for key, value in got.items():
        assert torch.equal(value, state[key]), key
    assert MARK in got["conv1.0.weight"].view(-1)


def test_a_file_of_another_model_names_its_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(PretrainedMismatchError) as err:
        build_backbone(ModelConfig(arch="timm:resnet10t", pretrained=str(path)))
    text = str(err.value)
    assert "resnet18.pth" in text and "model.arch='timm:resnet10t'" in text
    assert "missing keys: conv1.0.weight" in text  # timm's deep stem, not in a torchvision ResNet-18
    assert "unexpected keys: conv1.weight" in text and "fc.weight" not in text  # the classifier is expected


def test_every_kind_of_mismatch_is_listed(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer4.1.bn2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    state["layer1.0.conv1.weight"] = torch.zeros(128, 64, 3, 3)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedMismatchError) as err:
        build_backbone(ModelConfig(stem="imagenet", pretrained=str(path)))
    assert str(err.value).endswith(
        "missing keys: layer4.1.bn2.weight; unexpected keys: layer5.0.conv1.weight; "
        "shape mismatches: layer1.0.conv1.weight (128, 64, 3, 3) in the file, (64, 64, 3, 3) in the model"
    )


def test_a_file_that_is_no_state_dict_is_named(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(PretrainedMismatchError, match=r"checkpoint\.pth is not a state dict.*'state_dict' entry"):
        build_backbone(ModelConfig(stem="imagenet", pretrained=str(path)))


def test_timm_converts_a_vit_file_of_another_image_size(tmp_path):
    """A ViT trained at 224 (196 position embeddings) loads into one at 32 (4) through timm's own
    conversion, which resamples the position embeddings; every other tensor is the file's."""
    path, state = _timm_file(tmp_path, "vit_tiny_patch16_224")
    net = build_backbone(ModelConfig(**TIMM_VIT, pretrained=str(path)))
    got = net.state_dict()
    assert state["pos_embed"].shape[1] == 197 and got["pos_embed"].shape[1] == 5
    for key, value in got.items():
        if key != "pos_embed":
            assert torch.equal(value, state[key]), key


def test_torchvision_tag_reads_torch_hubs_cache_and_a_miss_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = ModelConfig(stem="imagenet", pretrained="torchvision:ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(WeightsNotCachedError) as err:
        build_backbone(cfg)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(cached) in str(err.value) and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(
        err.value
    )
    assert not cached.exists()  # nothing was downloaded
    cached.parent.mkdir(parents=True)
    torch.manual_seed(2)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, cached)
    for tag in ("torchvision:ResNet18_Weights.IMAGENET1K_V1", "torchvision:IMAGENET1K_V1", "torchvision:DEFAULT"):
        got = build_backbone(cfg.model_copy(update={"pretrained": tag})).state_dict()
        assert all(torch.equal(v, state[k]) for k, v in got.items())
    with pytest.raises(ValueError, match=r"ResNet50_Weights are not weights of model\.arch='resnet18'"):
        build_backbone(cfg.model_copy(update={"pretrained": "torchvision:ResNet50_Weights.IMAGENET1K_V2"}))


TIMM_TAG_SCRIPT = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
from fgdist.backbones import WeightsNotCachedError, build_backbone
from fgdist.config import ModelConfig
cfg = ModelConfig(arch="timm:resnet10t", pretrained="timm:c3_in1k")
try:
    build_backbone(cfg)
except WeightsNotCachedError as err:
    print("MISS", err)
snapshot = Path(sys.argv[1]) / "models--timm--resnet10t.c3_in1k"
(snapshot / "refs").mkdir(parents=True)
(snapshot / "refs" / "main").write_text("abc123")
(snapshot / "snapshots" / "abc123").mkdir(parents=True)
Path(sys.argv[2]).rename(snapshot / "snapshots" / "abc123" / "model.safetensors")
state = load_file(str(snapshot / "snapshots" / "abc123" / "model.safetensors"))
got = build_backbone(cfg).state_dict()
print("HIT", all(torch.equal(v, state[k]) for k, v in got.items()))
"""


def test_timm_tag_reads_the_hugging_face_cache_and_a_miss_names_the_file(tmp_path):
    """In a process of its own: the Hugging Face cache folder is read from the environment when
    huggingface_hub is imported."""
    path, _ = _timm_file(tmp_path, "resnet10t")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run(
        [sys.executable, "-c", TIMM_TAG_SCRIPT, str(tmp_path / "hf"), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    miss = next(line for line in out.stdout.splitlines() if line.startswith("MISS"))
    assert "model.safetensors of the Hugging Face repository timm/resnet10t.c3_in1k" in miss
    assert "HIT True" in out.stdout


# -- normalization layers ------------------------------------------------------------------------
def test_timm_batchnorm_act_becomes_cross_rank_and_computes_the_same(tmp_path):
    """timm's BatchNormAct2d (BatchNorm, then activation) converted recursively: in one process
    the same outputs, gradients and running statistics as the original."""
    torch.manual_seed(0)
    plain = build_backbone(validate({"model": {"arch": TIMM_CONV}}, "r").model).train()
    cross = convert_batchnorm(copy.deepcopy(plain))
    kinds = {type(m).__name__ for m in batchnorm_layers(cross)}
    assert kinds == {"CrossRankBatchNormAct2d"} and len(batchnorm_layers(cross)) == len(batchnorm_layers(plain))
    exact = copy.deepcopy(plain).double()  # the gradient oracle: float32 BatchNorm itself strays from it
    x = torch.randn(6, 3, 32, 32)
    outs = []
    for net in (plain, cross, exact):
        out = net(x.to(next(net.parameters()).dtype))
        (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(exact.named_parameters(), cross.parameters()):
        # relative, with a floor: a bias before another BatchNorm has no gradient to speak of
        assert (q.grad.double() - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-5, name
    for (name, a), b in zip(plain.named_buffers(), cross.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert cross.state_dict().keys() == plain.state_dict().keys()  # checkpoints and exports read either


def test_batchnorm1d_is_converted_and_other_batchnorms_are_refused():
    net = convert_batchnorm(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    assert type(net[1]) is CrossRankBatchNorm1d
    x = torch.randn(5, 4)
    torch.testing.assert_close(net(x), nn.functional.batch_norm(net[0](x), None, None, training=True))
    with pytest.raises(ValueError, match=r"model\.norm=global: 1\.0 is a torch\.nn\.modules\.batchnorm\.BatchNorm3d"):
        convert_batchnorm(nn.Sequential(nn.Identity(), nn.Sequential(nn.BatchNorm3d(2))))
    assert CrossRankBatchNormAct2d.__mro__[1] is nn.BatchNorm2d


def test_layernorm_models_are_left_alone_and_skip_reestimation():
    vit = build_backbone(validate({"model": TIMM_VIT}, "r").model)
    before = copy.deepcopy(vit.state_dict())
    assert not batchnorm_layers(vit)
    converted = convert_batchnorm(vit)
    assert all(
        type(a) is type(b) for a, b in zip(converted.modules(), build_backbone(ModelConfig(**TIMM_VIT)).modules())
    )
    never_read = iter(())  # a batch drawn would fail the test: none is needed
    assert reestimate_batchnorm(converted, never_read, "cpu", torch.float32) == 0
    assert all(torch.equal(v, before[k]) for k, v in converted.state_dict().items())


# -- the optimizer -------------------------------------------------------------------------------
def test_backbone_lr_mult_puts_the_backbone_in_its_own_group_and_the_schedule_scales_both(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    raw = {"model": {"pretrained": str(path)}, "optim": {"lr": 0.1, "backbone_lr_mult": 0.2, "milestones": [1]}}
    cfg = validate(raw, "run.json")
    net = EmbeddingNet(cfg.model, 3, None)
    groups = parameter_groups(net, cfg.optim)
    sgd = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.MultiStepLR(sgd, [1], 0.1)
    heads, backbone = sgd.param_groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in net.backbone.parameters()}
    assert {id(p) for p in heads["params"]} == {id(p) for p in net.super_head.parameters()}
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([0.1, 0.02])
    sgd.step()
    schedule.step()
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([0.01, 0.002])
    plain = validate({"model": {"pretrained": str(path)}}, "run.json")
    assert len(parameter_groups(net, plain.optim)) == 1  # the default: one group, as checkpoints always had


# -- downstream: export, load_model, attention maps ----------------------------------------------
OLD_EXPORT_MODEL = {  # the `model` section exports held before model.arch took other values
    "arch": "resnet18",
    "stem": "cifar",
    "width": 4,
    "norm": "auto",
    "pretrained": None,
    "projection": "none",
    "projection_dim": 128,
    "projection_for_super": False,
}
OLD_PREPROCESSING = {"augment": "crop_flip", "image_size": 16, "resize": 256, "padding": 4}  # no mean, std


def test_an_export_in_the_old_format_still_loads(tmp_path):
    """fgdist_model.json with the keys exports had before (no arch-specific keys, no mean/std in
    the preprocessing): it loads, embeds with its ResNet-18 and normalizes with ImageNet's."""
    torch.manual_seed(0)
    net = build_backbone(ModelConfig(**OLD_EXPORT_MODEL)).eval()
    folder = tmp_path / "old_export"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    meta = {"format": "fgdist-model/1", "embedding_dim": 32, "model": OLD_EXPORT_MODEL, "source": "runs/old"}
    meta |= {"preprocessing": OLD_PREPROCESSING, "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229]}}
    (folder / "fgdist_model.json").write_text(json.dumps(meta))
    embedder = load_model(folder)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(embedder(images), nn.functional.normalize(net(images), dim=1))
    assert embedder.dim == 32
    grey = Image.new("RGB", (16, 16), (128, 128, 128))
    want = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(embedder.preprocess([grey])[0, :, 5, 5], want)


def test_an_old_pickled_embedder_knows_its_dimension():
    """MLflow models pickled before backbones carried embedding_dim (ResNet-18s: 8 * width)."""
    embedder = embedder_from(
        EmbeddingNet(ModelConfig(width=4), 3, None), ModelConfig(width=4), DataConfig(), "backbone"
    )
    del embedder.backbone.embedding_dim
    assert pickle.loads(pickle.dumps(embedder)).dim == 32


def test_a_timm_export_records_its_arch_and_normalization_and_embeds_as_the_checkpoint(tmp_path):
    cfg = validate({"model": TIMM_VIT, "data": {"image_size": 32}, "output_dir": str(tmp_path)}, "run.json")
    torch.manual_seed(0)
    model = EmbeddingNet(cfg.model, 3, None).eval()
    run = tmp_path / "run"
    write_run_folder(run, cfg, model)
    images = torch.randn(2, 3, 32, 32)
    from_checkpoint = load_model(run)(images)
    with torch.no_grad():
        torch.testing.assert_close(from_checkpoint, nn.functional.normalize(model(images)["features"], dim=1))
    export_model(load_model(run), tmp_path / "exported")
    meta = json.loads((tmp_path / "exported" / "fgdist_model.json").read_text())
    assert meta["arch"] == "timm:vit_tiny_patch16_224" and meta["embedding_dim"] == 192
    assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and meta["normalize"]["std"] == [0.5, 0.5, 0.5]
    exported = load_model(tmp_path / "exported")
    assert torch.equal(exported(images), from_checkpoint)
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    assert torch.equal(exported.preprocess([white]), torch.ones(1, 3, 32, 32))  # (1 - 0.5) / 0.5


def test_an_export_whose_weights_do_not_fit_its_config_is_named(tmp_path):
    cfg = validate({"model": {"arch": "timm:resnet10t"}, "output_dir": str(tmp_path)}, "run.json")
    run = tmp_path / "run"
    write_run_folder(run, cfg, EmbeddingNet(cfg.model, 3, None))
    export_model(load_model(run), tmp_path / "exported")
    config = tmp_path / "exported" / "fgdist_model.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model": {"arch": TIMM_CONV}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not the backbone fgdist_model\.json describes"):
        load_model(tmp_path / "exported")


@pytest.mark.parametrize(
    "model, size, stages",
    [
        ({"arch": "timm:resnet10t"}, 64, {"layer3": (4, 4), "layer4": (2, 2)}),
        ({"arch": "efficientnet_b0"}, 64, {"features.5": (4, 4), "features.8": (2, 2)}),  # not `features`: all stages
        ({"arch": "resnet18", "stem": "imagenet"}, 32, {"layer2": (4, 4), "layer3": (2, 2)}),  # layer4 is 1x1
    ],
)
def test_attention_maps_come_from_the_last_two_spatial_stages_of_any_convnet(model, size, stages):
    net = EmbeddingNet(validate({"model": model}, "r").model, 3, None)
    maps = attention_maps(net, torch.randn(2, 3, size, size))
    assert {name: tuple(m.shape[1:]) for name, m in maps.items()} == stages
    assert all((m >= 0).all() and m.sum() > 0 for m in maps.values())


def test_attention_maps_refuse_a_transformer():
    vit = EmbeddingNet(validate({"model": TIMM_VIT}, "r").model, 3, None)
    with pytest.raises(NoSpatialMapsError, match=r"VisionTransformer is a transformer \(Attention layers\)"):
        attention_maps(vit, torch.randn(2, 3, 32, 32))
