"""Config schema: unknown keys and wrong types are errors naming the key; shipped configs load."""

import json
from pathlib import Path

import pytest

from fgdist.config import ConfigError, load_config
from fgdist.objective_table import OBJECTIVE_NAMES
from launcher.train import parse_args, run_config
from tests.helpers import write_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


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
        load_config(write_config(tmp_path, raw))
    assert f"key '{key}'" in str(err.value) and "c.json" in str(err.value)


def test_override_is_validated_like_the_file(tmp_path):
    path = write_config(tmp_path, {})
    assert load_config(path, ["optim.lr=0.05", "objective.name=base"]).optim.lr == 0.05
    with pytest.raises(ConfigError, match="key 'optim.momentun'"):
        load_config(path, ["optim.momentun=0.8"])


def test_unordered_milestones_rejected(tmp_path):
    with pytest.raises(ConfigError, match="milestones"):
        load_config(write_config(tmp_path, {"optim": {"milestones": [30, 10]}}))


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"optim": {"lr": 0.1,}}')
    with pytest.raises(ConfigError, match="line 1"):
        load_config(path)


def leaves(tree: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a JSON object (`deepspeed` is passed through whole)."""
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "deepspeed":
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def dotted(cfg, key: str):
    node = cfg.model_dump()
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_load_with_every_value_the_file_sets(path):
    """A shipped config loads, and the loaded config holds each value the file sets (a loader
    that dropped or renamed a key would leave a default there), with a schedule that decays."""
    raw = json.loads(path.read_text())
    cfg = load_config(path)
    for key, value in leaves(raw):
        assert dotted(cfg, key) == value, (path.name, key)
    assert all(m < cfg.optim.epochs for m in cfg.optim.milestones), "a milestone after the last epoch never applies"
    assert max(cfg.eval.recall_ks) >= 8, "the paper reports Recall@k up to k=8"


# The paper's recipes (Section 4): what the shipped paper configs must hold. global_batch =
# data.batch_size x the ranks the file is meant for (the paper gives no batch for Pets).
PAPER = {
    "cifar100.json": {
        "ranks": 2,
        "global_batch": 256,
        "optim": {"epochs": 200, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "milestones": [60, 120, 160]},
        "gamma": 0.2,
        "data": {"augment": "crop_flip", "image_size": 32, "padding": 4},  # 32x32 crops of the padded 40x40
        "model": {"stem": "cifar", "width": 64, "pretrained": None},
        "recall_ks": [1, 2, 4, 8],
    },
    "pets_base.json": {
        "optim": {"epochs": 30, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "milestones": [15]},
        "gamma": 0.1,
        "data": {"augment": "resized_crop_flip", "image_size": 224},
        "model": {"stem": "imagenet", "width": 64, "pretrained": "torchvision:ResNet18_Weights.IMAGENET1K_V1"},
        "recall_ks": [1, 2, 4, 8],
    },
    "sop_8gpu.json": {
        "ranks": 8,
        "global_batch": 256,
        "optim": {"epochs": 90, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "milestones": [30, 60]},
        "gamma": 0.1,
        "data": {"augment": "resized_crop_flip", "image_size": 224},
        "model": {"stem": "imagenet", "width": 64, "pretrained": None},
        "recall_ks": [1, 10, 100, 1000],
    },
}
PAPER["pets_base_indi_eff.json"] = PAPER["pets_base.json"]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_the_papers_recipe(name):
    want = PAPER[name]
    cfg = load_config(CONFIGS / name)
    if "global_batch" in want:
        assert cfg.data.batch_size * want["ranks"] == want["global_batch"]
    assert cfg.optim.gamma == want["gamma"] and cfg.eval.recall_ks == want["recall_ks"]
    for section in ("optim", "data", "model"):
        got = getattr(cfg, section)
        for key, value in want[section].items():
            assert getattr(got, key) == value, (name, f"{section}.{key}")


@pytest.mark.parametrize("objective", OBJECTIVE_NAMES)
def test_one_cifar100_config_serves_every_objective_through_the_launcher(objective):
    """`--objective` changes the objective and the run's name, nothing else; an explicit name wins."""
    base = load_config(CONFIGS / "cifar100.json")
    cfg = run_config(parse_args(["--config", str(CONFIGS / "cifar100.json"), "--objective", objective]))
    assert cfg.objective.name == objective and cfg.name == f"{base.name}_{objective}"
    assert cfg.model_dump(exclude={"name", "objective"}) == base.model_dump(exclude={"name", "objective"})
    named = run_config(
        parse_args(["--config", str(CONFIGS / "cifar100.json"), "--objective", objective, "--set", "name=mine"])
    )
    assert named.name == "mine" and named.objective.name == objective
