"""Fault injection for the reliability tests, off unless FGDIST_KILL_AT is set.

FGDIST_KILL_AT="<point>:<rank>:<key>" makes that rank SIGKILL itself when it reaches that point:
    step:<rank>:<global step>          right after that training step
    checkpoint:<rank>:<checkpoint tag> after writing its part of that checkpoint, before the
                                       checkpoint is complete
A real kill at a reproducible place: the tests need no timing races to hit a checkpoint write.
"""

from __future__ import annotations

import os
import signal


def kill_point(point: str, rank: int, key) -> None:
    if os.environ.get("FGDIST_KILL_AT") == f"{point}:{rank}:{key}":
        os.kill(os.getpid(), signal.SIGKILL)
