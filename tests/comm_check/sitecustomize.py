"""The collective-device check of tests/integration/test_launchers_and_comm.py, loaded into every
process of a run by putting this folder first on PYTHONPATH (Python imports `sitecustomize` at
start-up). It lives here, outside fgdist, so that it checks any version of the code.

With FGDIST_COMM_DEVICE=<device> declared, every torch.distributed collective called from fgdist
code must be called from fgdist/collectives.py (the module that owns the communication device),
and every tensor it hands over must be on the declared device; otherwise the process raises,
naming the caller. DeepSpeed's own collectives are not checked.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "broadcast", "reduce", "barrier")


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


def _guard(name: str, fn, declared: str):
    import torch

    device = torch.device(declared)

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        frame = sys._getframe(1)
        caller = Path(frame.f_code.co_filename)
        if "fgdist" in caller.parts:
            where = f"{caller}:{frame.f_lineno}"
            if caller.name != "collectives.py":
                raise RuntimeError(f"comm check: torch.distributed.{name} called from {where}, outside collectives.py")
            for t in _tensors([*args, *kwargs.values()]):
                if t.device != device:
                    raise RuntimeError(f"comm check: {name} from {where} got a {t.device} tensor, declared {device}")
        return fn(*args, **kwargs)

    return guarded


def install() -> None:
    declared = os.environ.get("FGDIST_COMM_DEVICE")
    if not declared:
        return
    import torch.distributed as dist

    for name in COLLECTIVES:
        setattr(dist, name, _guard(name, getattr(dist, name), declared))
    print(f"comm check: installed, device {declared}", file=sys.stderr, flush=True)


install()
