"""DeepSpeed's CPU shared-memory all-reduce op: not built, and its buffer's name never left behind.

`skip_shm_comm_op`: DeepSpeed's CPU accelerator compiles a C++ op (deepspeed_shm_comm) when its
communication backend starts, about 40 s on a first start (90 s on a busy 2-core machine; cached
under TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions, afterwards). The op serves only
`deepspeed.comm.inference_all_reduce`, DeepSpeed's tensor-parallel inference; training's
all-reduces (the engine's gradients, fgdist's collectives) go through torch.distributed's gloo
either way. So fgdist marks it incompatible in DeepSpeed's per-process table of compatible ops,
which DeepSpeed consults before building it, and no rank compiles or maps it.

`unlink_deepspeed_shm_buffer`, for a DeepSpeed that builds the op all the same (one whose
builder ignores the table): the op maps a 66 MB all-reduce buffer per rank as
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

SHM_COMM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def skip_shm_comm_op() -> None:
    """On the CPU accelerator, before deepspeed.init_distributed: DeepSpeed neither compiles nor
    loads its shared-memory op in this process (the module docstring says why nothing needs it).
    The table is computed on first use (a probe of every op, 0.15 s on the CPU) and kept, edits
    included, for the process. Other accelerators have no such op: nothing to do."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def buffer_path(rank: int) -> Path:
    master = f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{master}_{rank}"


def unlink_deepspeed_shm_buffer() -> None:
    """Remove the name of this rank's buffer. Collective: call it right after
    deepspeed.init_distributed (which returns once this rank has mapped every rank's buffer; the
    barrier waits until every other rank has too). Harmless where there is no such file (CUDA, or the op skipped)."""
    barrier()
    buffer_path(world()[0]).unlink(missing_ok=True)
