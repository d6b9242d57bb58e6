"""Shared test helpers: tiny shard sets, run folders and configs, training launches, servers; the
free port, gloo group, manifest and HTTP wait that bench/ needs too live in fgdist.harness."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

# Tests import these from here, beside the helpers above.
from fgdist.harness import (  # noqa: F401
    TINY_TRAINING,
    free_port,
    init_gloo,
    launcher_prefix,
    manifest_with_sizes,
    tiny_synthetic,
    wait_for_http,
)

REPO = Path(__file__).resolve().parents[1]


def shared_fixture(name: str) -> Path | None:
    """`shared/fixtures/<name>` in the checkout or in a folder above it (a worktree of the project
    sits below the folder that holds `shared/`), or None."""
    for folder in (REPO, *REPO.parents):
        if (folder / "shared" / "fixtures" / name).is_dir():
            return folder / "shared" / "fixtures" / name
    return None


def write_run_folder(run: Path, cfg, model, epoch: int | None = None) -> Path:
    """A run folder laid out as the trainer writes it (config.json, one checkpoint with the
    engine's model state and its meta.json, checkpoints/latest) holding `model`'s weights, saved
    after `epoch` epochs (default: the config's last). Returns the checkpoint folder."""
    import dataclasses
    import json

    import torch

    from fgdist.training.checkpoint import Position

    position = Position(cfg.optim.epochs if epoch is None else epoch, 0, 0, 1, None)
    folder = run / "checkpoints" / position.tag
    (folder / "engine" / "state").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, folder / "engine" / "state" / "mp_rank_00_model_states.pt")
    (folder / "meta.json").write_text(json.dumps(dataclasses.asdict(position)))
    (run / "checkpoints" / "latest").write_text(folder.name)
    (run / "config.json").write_text(cfg.model_dump_json())
    return folder


def write_config(tmp_path, raw: dict) -> Path:
    """A run config file holding `raw`."""
    import json

    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    return path


def assert_no_shm_buffer_left(port: int) -> None:
    """Whatever its outcome, a run leaves no DeepSpeed shared-memory buffer behind (66 MB each)."""
    leaked = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"run on port {port} left /dev/shm/{leaked}"


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


TRAIN_SCRIPT = REPO / "launcher" / "train.py"


def launch_training(
    cwd, launcher: list[str], port: int | None, *train_args, env=None, unset=(), timeout=600, check=True, script=None
):
    """Run `script` (launcher/train.py unless given) under `launcher` (a command prefix; [] for a
    plain python process), with `env` added to this environment and the variables in `unset` removed."""
    import subprocess
    import sys

    cmd = [*(launcher or [sys.executable]), str(script or TRAIN_SCRIPT), *train_args]
    full_env = {
        **{k: v for k, v in os.environ.items() if k not in unset},
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db",
        **(env or {}),
    }
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if port is not None:
        assert_no_shm_buffer_left(port)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def train_on_ranks(cwd, *train_args, launcher="torchrun", num_gpus=2, env=None, timeout=600, check=True, script=None):
    """Run `script` (launcher/train.py unless given) on `num_gpus` ranks started by `launcher` on a
    free port. torchrun by default (fgdist.harness.LAUNCHERS: the same DeepSpeed ranks as under the
    deepspeed runner, started sooner); the tests of the deepspeed launcher itself use deepspeed_train."""
    port = free_port()
    prefix = launcher_prefix(launcher, num_gpus, port)
    return launch_training(cwd, prefix, port, *train_args, env=env, timeout=timeout, check=check, script=script)


def deepspeed_train(cwd, *train_args, **options):
    """train_on_ranks under the real DeepSpeed launcher."""
    return train_on_ranks(cwd, *train_args, launcher="deepspeed", **options)


@contextmanager
def serving(cmd: list[str], cwd, env: dict, url: str, log: Path, timeout: float = 120):
    """Run a server command in its own process group (servers fork workers), wait (at most
    `timeout` s) until `url` answers 200, and kill the whole group when the block ends."""
    import signal
    import subprocess

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(url, proc, log, timeout)
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group had already gone
            pass
        proc.wait(timeout=30)
