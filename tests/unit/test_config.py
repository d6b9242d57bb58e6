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


@pytest.mark.parametrize("raw, key", [
    ({"optim": {"lrr": 0.1}}, "optim.lrr"),
    ({"optim": {"lr": "0.1"}}, "optim.lr"),
    ({"data": {"batch_size": 1.5}}, "data.batch_size"),
    ({"data": {"routing": "random"}}, "data.routing"),
    ({"objective": {"name": "indi_eff"}}, "objective.name"),
    ({"bogus": 1}, "bogus"),
    ({"head": {"kernel": "cuda"}}, "head.kernel"),
])
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
    assert cfg.optim.epochs == 90 and cfg.optim.lr == 0.1 and cfg.optim.milestones == [30, 60] and cfg.optim.gamma == 0.1
    assert cfg.data.augment == "resized_crop_flip" and cfg.data.image_size == 224 and cfg.model.stem == "imagenet"
    assert cfg.deepspeed["bf16"]["enabled"] is True
    assert cfg.objective.name == "base_indi_eff"
