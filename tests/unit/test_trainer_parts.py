"""The trainer's pieces that need no process group: when it saves, evaluates and logs; how a
restored position carries over to another world size; the log line format; precision, ZeRO
stages and the launcher environment."""

import logging
import re

import pytest
import torch

from fgdist import log as fgdist_log
from fgdist.config import validate
from fgdist.training.checkpoint import Position
from fgdist.training.deepspeed_config import deepspeed_config, precision
from fgdist.training.trainer import evaluates_after_epoch, logs_after_step, saves_after_epoch, saves_after_step


def config(**sections):
    return validate(sections, "test")


@pytest.mark.parametrize("every, want", [(4, [4, 8, 10]), (0, [10]), (5, [5, 10])])
def test_evaluation_every_n_epochs_and_always_after_the_last(every, want):
    cfg = config(optim={"epochs": 10, "milestones": [5]}, eval={"every_epochs": every})
    assert [e for e in range(1, 11) if evaluates_after_epoch(cfg, e)] == want


@pytest.mark.parametrize(
    "every, want", [(3, [3, 6, 9, 10]), (0, [10]), (1, list(range(1, 11))), (20, [10]), (5, [5, 10])]
)
def test_epoch_checkpoints_every_n_epochs_and_always_after_the_last(every, want):
    cfg = config(optim={"epochs": 10, "milestones": [5]}, checkpoint={"every_epochs": every})
    assert [e for e in range(1, 11) if saves_after_epoch(cfg, e)] == want


def test_step_checkpoints_skip_the_last_step_of_an_epoch():
    # 5 steps per epoch, a checkpoint every 4 global steps: 4, 8, 12, 16; global step 20 is the
    # end of epoch 4, where the epoch checkpoint is taken instead.
    cfg = config(checkpoint={"every_steps": 4})
    saved = [
        (epoch, step)
        for epoch in range(4)
        for step in range(1, 6)
        if saves_after_step(cfg, epoch * 5 + step, step, steps_per_epoch=5)
    ]
    assert saved == [(0, 4), (1, 3), (2, 2), (3, 1)]
    assert not any(saves_after_step(config(), g, 1, 5) for g in range(1, 50))  # every_steps 0: never


def test_log_lines_every_n_steps_and_at_the_end_of_an_epoch():
    cfg = config(tracking={"log_every_steps": 3})
    assert [s for s in range(1, 8) if logs_after_step(cfg, s, steps_per_epoch=7)] == [3, 6, 7]


def test_a_position_carries_over_to_the_same_world_size_unchanged():
    pos = Position(epoch=2, step=3, global_step=11, world_size=2, mlflow_run_id="r")
    assert pos.continue_on(2) is False
    assert (pos.epoch, pos.step, pos.global_step, pos.world_size) == (2, 3, 11, 2)
    assert pos.tag == "epoch0002-step000003"


def test_a_mid_epoch_position_on_another_world_size_restarts_the_epoch():
    pos = Position(epoch=2, step=3, global_step=11, world_size=2, mlflow_run_id="r")
    assert pos.continue_on(1) is True
    assert (pos.epoch, pos.step, pos.global_step, pos.world_size) == (2, 0, 8, 1)
    at_boundary = Position(epoch=2, step=0, global_step=8, world_size=2, mlflow_run_id="r")
    assert at_boundary.continue_on(4) is False
    assert (at_boundary.step, at_boundary.global_step, at_boundary.world_size) == (0, 8, 4)


@pytest.fixture
def restore_fgdist_logger():
    logger = logging.getLogger(fgdist_log.ROOT)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_rank_0_logs_info_with_time_and_rank_other_ranks_only_warnings(capsys, restore_fgdist_logger):
    child = logging.getLogger("fgdist.training.trainer")
    fgdist_log.setup(0)
    child.info("epoch 1/3 step 2/2 images_per_s=410")
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[fgdist rank 0\] INFO: epoch 1/3 step 2/2 images_per_s=410", line
    ), line
    fgdist_log.setup(1)  # replaces the handler: one line per message
    child.info("not shown on rank 1")
    child.warning("shown on every rank")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].endswith("[fgdist rank 1] WARNING: shown on every rank")


def test_the_start_line_is_logged_once_and_read_by_the_start_bench(capsys, restore_fgdist_logger):
    """fgdist/training/start_time.py's line after the first step, as bench/start_time.py parses it."""
    import time

    from bench.start_time import PARTS, parse_start_line
    from fgdist.training.start_time import StartClock

    fgdist_log.setup(0)
    clock = StartClock()
    for part in PARTS[:-1]:
        clock.mark(part)
    clock.finish(PARTS[-1])
    clock.mark("later")  # after the first step nothing more is timed or logged
    clock.finish("again")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    when, total, parts = parse_start_line(lines[0])
    assert list(parts) == list(PARTS)
    assert abs(sum(parts.values()) - total) <= 0.05 * len(PARTS) + 0.05  # each part rounded to 0.1 s
    assert abs(when - time.time()) < 60 and total >= parts["imports"] > 0  # imports: since the process started


# -- precision and ZeRO: the final DeepSpeed config decides (issue 12) ----------------------------
def ds_config(deepspeed: dict, on_cuda: bool) -> dict:
    return deepspeed_config(config(deepspeed=deepspeed), world_size=2, on_cuda=on_cuda)


@pytest.mark.parametrize(
    "deepspeed, on_cuda, want",
    [
        ({}, True, torch.bfloat16),  # bf16 by default on CUDA
        ({}, False, torch.float32),
        ({"bf16": {"enabled": False}}, True, torch.float32),  # the config turns it off: fp32
        ({"bf16": {"enabled": True}}, False, torch.bfloat16),
        ({"bfloat16": {"enabled": True}}, False, torch.bfloat16),  # DeepSpeed's other spelling
    ],
)
def test_the_dtype_follows_the_final_deepspeed_config(deepspeed, on_cuda, want):
    assert precision(ds_config(deepspeed, on_cuda)) == want


def test_fp16_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="fp16 is not supported"):
        precision(ds_config({"fp16": {"enabled": True}}, True))


def test_zero_stage_3_is_refused_and_stages_1_2_accept_torch_sgd():
    with pytest.raises(ValueError, match=r"stage=3 is not supported"):
        ds_config({"zero_optimization": {"stage": 3}}, False)
    assert ds_config({"zero_optimization": {"stage": 2}}, False)["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in ds_config({}, False)


def test_no_launcher_means_a_world_of_one_and_a_partial_launcher_environment_is_an_error():
    from fgdist.config import ConfigError
    from launcher.train import single_process_env

    env = {}
    single_process_env(env)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0" and int(env["MASTER_PORT"])
    launched = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "LOCAL_RANK": "0"}
    single_process_env(launched)  # a launcher's environment is left alone
    assert launched["RANK"] == "1"
    with pytest.raises(ConfigError, match="without LOCAL_RANK"):
        single_process_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
