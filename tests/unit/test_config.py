"""Config schema: unknown keys and wrong types are errors naming the key; shipped configs load."""

import json
from pathlib import Path

import pytest

from fgdist.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path, raw):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"optim": {"lrr": 0.1}}, "optim.lrr"),
        ({"optim": {"lr": "0.1"}}, "optim.lr"),
        ({"data": {"batch_size": 1.5}}, "data.batch_size"),
        ({"data": {"routing": "random"}}, "data.routing"),
        ({"objective": {"name": "indi_eff"}}, "objective.name"),
        ({"bogus": 1}, "bogus"),
        ({"head": {"kernel": "cuda"}}, "head.kernel"),
    ],
)
def test_bad_key_or_type_is_an_error_naming_the_key(tmp_path, raw, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, raw))
    assert f"key '{key}'" in str(err.value) and "c.json" in str(err.value)


def test_override_is_validated_like_the_file(tmp_path):
    path = write(tmp_path, {})
    assert load_config(path, ["optim.lr=0.05", "objective.name=base"]).optim.lr == 0.05
    with pytest.raises(ConfigError, match="key 'optim.momentun'"):
        load_config(path, ["optim.momentun=0.8"])


def test_unordered_milestones_rejected(tmp_path):
    with pytest.raises(ConfigError, match="milestones"):
        load_config(write(tmp_path, {"optim": {"milestones": [30, 10]}}))


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"optim": {"lr": 0.1,}}')
    with pytest.raises(ConfigError, match="line 1"):
        load_config(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name


def test_sop_8gpu_is_the_paper_recipe():
    cfg = load_config(CONFIGS / "sop_8gpu.json")
    assert (
        cfg.optim.epochs == 90 and cfg.optim.lr == 0.1 and cfg.optim.milestones == [30, 60] and cfg.optim.gamma == 0.1
    )
    assert cfg.data.augment == "resized_crop_flip" and cfg.data.image_size == 224 and cfg.model.stem == "imagenet"
    assert cfg.deepspeed["bf16"]["enabled"] is True
    assert cfg.objective.name == "base_indi_eff"


@pytest.mark.parametrize("objective", ["base", "fine", "indi", "base_indi", "base_indi_eff"])
def test_cifar100_configs_are_the_paper_recipe(objective):
    cfg = load_config(CONFIGS / f"cifar100_{objective}.json")
    assert cfg.objective.name == objective
    # batch 256 in total: 128 per rank on the 2 ranks the file is meant for (named in `name`).
    assert cfg.name == f"cifar100_{objective}_2gpu" and cfg.data.batch_size * 2 == 256
    assert cfg.optim.epochs == 200 and cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == 5e-4 and cfg.optim.milestones == [60, 120, 160] and cfg.optim.gamma == 0.2
    # 32x32 random crops from the zero-padded 40x40 image, plus horizontal flips.
    assert cfg.data.augment == "crop_flip" and cfg.data.image_size == 32 and cfg.data.padding == 4
    assert cfg.model.stem == "cifar" and cfg.model.width == 64 and cfg.model.pretrained is None
    assert cfg.eval.recall_ks == [1, 2, 4, 8] and cfg.data.shards == "data/cifar100"


@pytest.mark.parametrize("objective", ["base", "base_indi_eff"])
def test_pets_configs_are_the_paper_recipe(objective):
    cfg = load_config(CONFIGS / f"pets_{objective}.json")
    assert cfg.objective.name == objective
    assert cfg.model.pretrained == "weights/resnet18_imagenet.pth"  # ImageNet init, a local file
    assert cfg.model.stem == "imagenet" and cfg.model.width == 64
    assert cfg.optim.epochs == 30 and cfg.optim.lr == 0.01 and cfg.optim.milestones == [15] and cfg.optim.gamma == 0.1
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.momentum == 0.9
    assert cfg.data.augment == "resized_crop_flip" and cfg.data.image_size == 224 and cfg.data.resize == 256
    assert cfg.data.batch_size == 32 and cfg.data.shards == "data/pets"
    assert cfg.eval.recall_ks == [1, 2, 4, 8]


def test_sop_8gpu_evaluates_at_the_papers_ks():
    cfg = load_config(CONFIGS / "sop_8gpu.json")
    assert cfg.eval.recall_ks == [1, 10, 100, 1000] and cfg.optim.weight_decay == 1e-4
    assert cfg.data.batch_size * 8 == 256  # the ImageNet recipe's batch 256 for lr 0.1
