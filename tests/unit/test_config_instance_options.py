"""Config of the instance options (issue 11): bad values are errors naming the key; the defaults
are the paper's recipe."""

import pytest

from fgdist.config import ConfigError, load_config
from tests.helpers import write_config


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"data": {"views": 0}}, "data.views"),
        ({"data": {"augment": "heavy"}}, "data.augment"),
        ({"data": {"crop_scale": [0.0, 1.0]}}, "data.crop_scale"),
        ({"data": {"crop_scale": [0.5, 1.2]}}, "data.crop_scale"),
        ({"data": {"crop_scale": [0.8, 0.3]}}, "data.crop_scale"),
        ({"data": {"crop_scale": [0.5]}}, "data.crop_scale"),
        ({"head": {"ema_momentum": 1.0}}, "head.ema_momentum"),
        ({"head": {"ema_momentum": -0.1}}, "head.ema_momentum"),
        ({"head": {"update": "adam"}}, "head.update"),
        ({"head": {"init": "zeros"}}, "head.init"),
        ({"head": {"lr_schedule": "cosine"}}, "head.lr_schedule"),
        ({"head": {"weight_decay": -1e-4}}, "head.weight_decay"),
        ({"model": {"projection_dim": 0}}, "model.projection_dim"),
        ({"model": {"projection": "linear"}}, "model.projection"),
        ({"eval": {"features": "head"}}, "eval.features"),
    ],
)
def test_bad_instance_option_is_an_error_naming_the_key(tmp_path, raw, key):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, raw))
    assert f"key '{key}'" in str(err.value) and "c.json" in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.features=projection", "eval.features"),
        ("model.projection_for_super=true", "model.projection_for_super"),
    ],
)
def test_projection_consumers_need_the_projection(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"{key}.*needs model.projection='mlp'"):
        load_config(write_config(tmp_path, {}), [override])
    assert load_config(write_config(tmp_path, {}), [override, "model.projection=mlp"]).model.projection == "mlp"


def test_defaults_are_the_paper_recipe_and_the_combined_recipe_loads(tmp_path):
    cfg = load_config(write_config(tmp_path, {}))
    assert (cfg.data.augment, cfg.data.views, cfg.model.projection) == ("crop_flip", 1, "none")
    assert (cfg.head.init, cfg.head.update, cfg.head.lr_schedule, cfg.head.weight_decay) == (
        "random",
        "sgd",
        "same",
        None,
    )
    assert cfg.eval.features == "backbone"
    combined = [
        "data.augment=strong",
        "data.crop_scale=[0.2, 1.0]",
        "data.views=2",
        "model.projection=mlp",
        "model.projection_dim=128",
        "head.logit=cosine",
        "head.temperature=0.1",
        "head.init=features",
        "head.update=ema",
        "head.ema_momentum=0.5",
    ]
    cfg = load_config(write_config(tmp_path, {}), combined)
    assert (cfg.data.views, cfg.data.crop_scale, cfg.head.update, cfg.head.ema_momentum) == (2, [0.2, 1.0], "ema", 0.5)
