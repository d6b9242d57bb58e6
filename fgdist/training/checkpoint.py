"""Atomic checkpoints: DeepSpeed engine state + per-rank head slice + plan + data position +
RNG states, and restart from the newest complete one (docs/DESIGN.md, "The checkpoint layout").

Layout under <run_dir>/checkpoints:
    <tag>/engine/...          deepspeed save_checkpoint (tag "state")
    <tag>/head-<begin>-<end>.pt  a head slice (weights, momentum) named by its column range
    <tag>/rank00000.pt        RNG states of that rank
    <tag>/plan.json           the plan that wrote it (Plan.describe)
    <tag>/meta.json           epoch, step, global step, world size, MLflow run id (written last
                              inside the folder)
    latest                    the tag of the newest complete checkpoint
Everything is written into `.<tag>.partial` first; rank 0 renames it into place and only then
rewrites `latest` (output_folder.atomic_file: a temporary file, then os.replace). A checkpoint that was being
written when a process died has no `latest` pointing at it and is never read.

`load_checkpoint_model` reads a checkpoint's model and config back on the CPU, for
fgdist-pictures, fgdist-export and load_model.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from fgdist.collectives import barrier, world
from fgdist.config import RunConfig, validate
from fgdist.faults import kill_point
from fgdist.output_folder import atomic_file
from fgdist.search_errors import CheckpointError
from fgdist.training.head import InstanceHead
from fgdist.training.model import EmbeddingNet

log = logging.getLogger("fgdist.training.checkpoint")

LATEST = "latest"


@dataclass
class Position:
    """Where a run is: what meta.json holds."""

    epoch: int  # the epoch to run next
    step: int  # the step within that epoch to run next
    global_step: int
    world_size: int  # the world size that reached this position
    mlflow_run_id: str | None

    def epochs_done(self, steps_per_epoch: int) -> float:
        """Epochs done, fractional. Steps per epoch change when a run resumes on another world
        size, so the global step alone does not say where training stands."""
        return self.epoch + self.step / steps_per_epoch

    @property
    def tag(self) -> str:
        """The checkpoint folder's name, e.g. epoch0003-step000000."""
        return f"epoch{self.epoch:04d}-step{self.step:06d}"

    def continue_on(self, world_size: int) -> bool:
        """Carry a restored position over to `world_size` ranks; True when the epoch restarts.

        A mid-epoch position counts the batches of one cut of the data: each rank's stream
        depends on the world size (docs/DESIGN.md, "The data path"), so on another world size
        the batches already trained cannot be skipped exactly, and the epoch is redone from
        step 0 (its steps are taken off the global step too, so MLflow steps stay one per step)."""
        restart = world_size != self.world_size and self.step > 0
        if restart:
            self.global_step -= self.step
            self.step = 0
        self.world_size = world_size
        return restart


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    directory: Path, engine, head: InstanceHead | None, plan_json: str, position: Position, rank: int, keep: int
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    tag = position.tag
    partial = directory / f".{tag}.partial"
    final = directory / tag
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(partial / "engine"), tag="state", save_latest=False)
    torch.save(rng_state(), partial / f"rank{rank:05d}.pt")
    if head is not None:
        torch.save(head.slice_state(), partial / f"head-{head.column_begin:012d}-{head.column_end:012d}.pt")
    kill_point("checkpoint", rank, tag)
    barrier()
    if rank == 0:
        (partial / "plan.json").write_text(plan_json)
        (partial / "meta.json").write_text(json.dumps(asdict(position), indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        with atomic_file(directory / LATEST) as pointer:
            pointer.write_text(tag)
        for old in sorted(p for p in directory.glob("epoch*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def latest(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    folder = directory / pointer.read_text().strip()
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is not a complete checkpoint")
    return folder


def read_position(folder: Path) -> Position:
    path = folder / "meta.json"
    try:
        return Position(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:  # truncated, or not the keys save() writes
        raise CheckpointError(f"{path}: not a checkpoint position ({err})") from None


def load(folder: Path, engine, head: InstanceHead | None, rank: int) -> Position:
    """Restore the engine, this rank's head columns (re-cut from any saved world size), and,
    when the world size is unchanged, this rank's RNG states."""
    position = read_position(folder)
    load_path, _ = engine.load_checkpoint(
        str(folder / "engine"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise FileNotFoundError(f"{folder / 'engine'}: DeepSpeed found no engine state")
    files = sorted(folder.glob("rank*.pt"))
    if len(files) != position.world_size:
        raise FileNotFoundError(f"{folder}: {len(files)} rank files for a world size of {position.world_size}")
    if head is not None:
        # Read only the saved slices that overlap this rank's columns (names carry the range).
        overlapping = []
        for f in sorted(folder.glob("head-*.pt")):
            begin, end = (int(v) for v in f.stem.split("-")[1:])
            if begin < head.column_end and end > head.column_begin:
                overlapping.append(torch.load(f, map_location="cpu", weights_only=False))
        head.load_slices(overlapping, str(folder))
    if position.world_size == world()[1]:
        set_rng_state(torch.load(files[rank], map_location="cpu", weights_only=False))
    return position


# -- a checkpoint's model, for pictures, export and tests ----------------------------------------
class LoadedCheckpoint(NamedTuple):
    model: nn.Module  # an EmbeddingNet with the checkpoint's weights, on the CPU, fp32
    config: RunConfig  # the run's config (config.json in the run folder)
    folder: Path  # the checkpoint folder read


def newest_checkpoint(run_dir: Path) -> Path:
    """A run folder's newest complete checkpoint; one error naming the folder when it has none."""
    folder = latest(run_dir / "checkpoints")
    if folder is not None:
        return folder
    if (run_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{run_dir}: the run saved no checkpoint (no checkpoints/latest): it stopped before its first save, "
            "or was trained by a version that did not save the last epoch"
        )
    raise FileNotFoundError(
        f"{run_dir}: neither a checkpoint folder (with meta.json) nor a run folder with checkpoints/latest"
    )


def warn_if_not_final(folder: Path, cfg: RunConfig) -> None:
    """Log a warning when a run folder's newest checkpoint is not the end of training (a run
    stopped or still going, or one that finished before the last epoch always saved): its weights
    are then not the final ones, which the MLflow model holds."""
    position = read_position(folder)
    if (position.epoch, position.step) == (cfg.optim.epochs, 0):
        return
    steps = f" and {position.step} steps" if position.step else ""
    log.warning(
        f"{folder.parent.parent}: the newest checkpoint ({folder.name}) is after epoch {position.epoch}{steps} "
        f"of {cfg.optim.epochs}: not the end of training, so these are not the run's final weights"
    )


def load_checkpoint_model(path: str | Path) -> LoadedCheckpoint:
    """The model, config and folder of a checkpoint, from a run folder (its newest checkpoint; a
    logged warning when that is not the end of training) or one checkpoint folder
    (runs/NAME/checkpoints/TAG); layout in docs/DESIGN.md, "The checkpoint layout"."""
    path = Path(path)
    from_run = not (path / "meta.json").is_file()
    folder, run_dir = (newest_checkpoint(path), path) if from_run else (path, path.parent.parent)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: the run's config is missing (the trainer writes it into the run folder)"
        )
    cfg = validate(json.loads(config_path.read_text()), str(config_path))
    if from_run:
        warn_if_not_final(folder, cfg)
    states = sorted((folder / "engine").glob("**/mp_rank_00_model_states.pt"))
    if not states:
        raise FileNotFoundError(f"{folder / 'engine'}: no DeepSpeed model state (mp_rank_00_model_states.pt)")
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in torch.load(states[0], map_location="cpu", weights_only=False)["module"].items()
    }
    # The heads' sizes are in the weights (the data set's class counts at training time).
    num_super = state["super_head.weight"].shape[0] if "super_head.weight" in state else None
    num_fine = state["fine_head.weight"].shape[0] if "fine_head.weight" in state else None
    model = EmbeddingNet(cfg.model.model_copy(update={"pretrained": None}), num_super, num_fine)
    model.load_state_dict(state)  # CrossRankBatchNorm2d has BatchNorm2d's keys
    return LoadedCheckpoint(model, cfg, folder)
