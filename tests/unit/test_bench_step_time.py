"""bench/step_time.py without launching ranks: the --variant / --objectives arguments (the parser
bench/quality.py shares through bench.common) and the table built from every rank's result."""

import argparse

import pytest

from bench.common import MIB, parse_variant
from bench.step_time import DEFAULT_OBJECTIVES, parser, report, summarize


def test_parse_variant_splits_name_and_settings():
    assert parse_variant("eff_v2:objective.name=base_indi_eff,data.views=2") == (
        "eff_v2",
        ["objective.name=base_indi_eff", "data.views=2"],
    )
    assert parse_variant("base") == ("base", [])
    assert parse_variant("base:") == ("base", [])


@pytest.mark.parametrize("text", [":objective.name=base", "x:objective.name", "x:=1", "a b:data.views=2"])
def test_parse_variant_rejects_malformed_text(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_variant(text)


def test_variants_and_objectives_keep_command_line_order():
    args = parser().parse_args(
        ["--config", "c.json", "--objectives", "base", "--variant", "cos:head.logit=cosine", "--objectives", "indi"]
    )
    assert args.variants == [
        ("base", ["objective.name=base"]),
        ("cos", ["head.logit=cosine"]),
        ("indi", ["objective.name=indi"]),
    ]
    assert parser().parse_args(["--config", "c.json"]).variants == []  # drive() then runs DEFAULT_OBJECTIVES
    assert DEFAULT_OBJECTIVES == ("base", "base_indi_eff")


def rank(step, before_mib, peak_mib, loader=None, batch=32):
    return {
        "step_s": step,
        "train_images_per_s_per_rank": batch / step,
        "loader_images_per_s_per_rank": loader,
        "rss_before_bytes": before_mib * MIB,
        "peak_rss_bytes": peak_mib * MIB,
    }


def test_summary_takes_the_worst_rank_for_each_column():
    row = summarize("eff", ["objective.name=base_indi_eff"], [rank(0.5, 900, 1000, 400.0), rank(0.4, 950, 1010, 300.0)])
    assert row["step_s"] == 0.5 and row["train"] == 32 / 0.5 and row["loader"] == 300.0
    assert (row["rss_before"], row["peak_rss"], row["step_adds"]) == (950 * MIB, 1010 * MIB, 100 * MIB)


def test_report_has_ratio_memory_columns_and_settings_lines():
    rows = [
        summarize("base", ["objective.name=base"], [rank(0.25, 900, 1000), rank(0.2, 900, 1000)]),
        summarize("eff_v2", ["objective.name=base_indi_eff", "data.views=2"], [rank(0.5, 1000, 3500)] * 2),
    ]
    text = report(rows, config="c.json", overrides=["data.shards=x"], ranks=2, steps=2, warmup=1, machine="m")
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("| variant"))
    assert "step / base step" in head and "peak RSS in steps (MiB)" in head and "steps add (MiB)" in head
    assert "| eff_v2 | 0.5000 | 2.000 | 64.0 | 1,000 | 3,500 | 2,500 | not measured | - |" in lines
    assert "| base | 0.2500 | 1.000 | 128.0 | 900 | 1,000 | 100 | not measured | - |" in lines
    assert "- `eff_v2`: `objective.name=base_indi_eff`, `data.views=2`" in lines
    assert any("process RSS" in line and "allocator" in line for line in lines)


def test_report_without_memory_says_so():
    ranks = [{**rank(0.3, 0, 0), "rss_before_bytes": None, "peak_rss_bytes": None}]
    text = report([summarize("base", [], ranks)], config="c", overrides=[], ranks=1, steps=2, warmup=1, machine="m")
    assert "| base | 0.3000 | 1.000 | 106.7 | not measured | not measured | not measured |" in text
    assert "- `base`: the config as is" in text


def test_channels_last_variants_and_gpu_memory_are_reported():
    args = parser().parse_args(["--config", "c.json", "--variant", "r50:model.arch=resnet50", "--channels-last", "r50"])
    assert args.channels_last == ["r50"]
    on_gpu = {**rank(0.1, 900, 1000), "peak_device_bytes": 2048 * MIB}
    rows = [summarize("r18", [], [rank(0.2, 900, 1000)]), summarize("r50", ["model.arch=resnet50"], [on_gpu], True)]
    text = report(rows, config="c", overrides=[], ranks=1, steps=2, warmup=1, machine="m")
    assert "| peak GPU memory allocated (MiB) |" in text and text.count(" 2,048 |") == 1
    assert "- `r50`: `model.arch=resnet50`, `channels-last inputs`" in text
