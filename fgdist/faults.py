"""Fault injection for the reliability tests, off unless FGDIST_KILL_AT, FGDIST_NAN_AT or
FGDIST_STALL_AT is set.

FGDIST_KILL_AT="<point>:<rank>:<key>" makes that rank SIGKILL itself when it reaches that point:
    step:<rank>:<global step>          right after that training step
    checkpoint:<rank>:<checkpoint tag> after writing its part of that checkpoint, before the
                                       checkpoint is complete
FGDIST_NAN_AT="<rank>:<global step>" makes that rank's loss NaN at that step (a diverged step:
its gradients are NaN too).
FGDIST_STALL_AT="<rank>:<epoch>:<batch>" makes the loader worker that reads that batch of that
rank's epoch (0-based; "eval" for an evaluation loader's batches) stop delivering, once: the
first worker to get there creates the file FGDIST_STALL_ONCE names and sleeps; a later loader
(fgdist.data.loader.restarting) goes on.
A real fault at a reproducible place: the tests need no timing races to hit a checkpoint write.
"""

from __future__ import annotations

import os
import signal
import time

import torch


def kill_point(point: str, rank: int, key) -> None:
    if os.environ.get("FGDIST_KILL_AT") == f"{point}:{rank}:{key}":
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(loss: torch.Tensor, rank: int, global_step: int) -> torch.Tensor:
    """The loss, or NaN times it at the step FGDIST_NAN_AT names for this rank."""
    if os.environ.get("FGDIST_NAN_AT") == f"{rank}:{global_step}":
        return loss * float("nan")
    return loss


def stall_point(rank: int, epoch: int | str, batch: int) -> None:
    """Sleep for good if FGDIST_STALL_AT names this batch and no worker has stalled there yet."""
    if os.environ.get("FGDIST_STALL_AT") != f"{rank}:{epoch}:{batch}":
        return
    try:
        os.close(os.open(os.environ["FGDIST_STALL_ONCE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    while True:  # a stuck worker: alive, delivering nothing, until it is killed
        time.sleep(60)
