"""A workaround for DeepSpeed's CPU backend, which leaves a shared-memory file per rank behind.

DeepSpeed's CPU accelerator maps a 66 MB all-reduce buffer per rank as
/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> and never unlinks
it, so every run left 132 MB (2 ranks) behind until /dev/shm filled the RAM (seen on the
development machine: 311 buffers, 21 GB, the machine thrashing). The file's name is only needed
while the ranks map each other's buffers; once they all have, it can go: the memory stays mapped
while the ranks live and is returned when they exit, crashes included.
"""

from __future__ import annotations

import os
from pathlib import Path

from fgdist.collectives import barrier, world


def buffer_path(rank: int) -> Path:
    master = f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{master}_{rank}"


def unlink_deepspeed_shm_buffer() -> None:
    """Remove the name of this rank's buffer. Collective: call it right after
    deepspeed.init_distributed (which returns once this rank has mapped every rank's buffer; the
    barrier waits until every other rank has too). Harmless where there is no such file (CUDA)."""
    barrier()
    buffer_path(world()[0]).unlink(missing_ok=True)
