"""Where a rank's start goes, from its process's creation to its first training step.

The trainer marks the end of each start-up part (`StartClock.mark`) and, after the first step,
logs one line (rank 0; bench/start_time.py parses it):

    started in 9.3 s: imports 5.1, distributed 0.4, data 0.0, model 0.5, engine 0.1, restore 0.0,
        tracking 2.2, first batch 0.2, first step 0.6          (one line in the log)

Each part is the time since the previous mark; the first, `imports`, runs from the process's
creation (the interpreter's start, the imports, the config) to the first mark; `restore` is a
resumed run's checkpoint load (or head.init=features), `tracking` MLflow's start.
"""

from __future__ import annotations

import logging
import time

import psutil

log = logging.getLogger("fgdist.start")


class StartClock:
    def __init__(self):
        # The kernel's record of when this process was created: the launcher's share of a start
        # is then the gap between the launch and this time.
        self.process_start = psutil.Process().create_time()
        self.last = self.process_start
        self.parts: dict[str, float] = {}
        self.done = False

    def mark(self, part: str) -> None:
        """The end of `part` (the time since the previous mark); nothing once the line is logged."""
        if self.done:
            return
        now = time.time()
        self.parts[part] = now - self.last
        self.last = now

    def finish(self, part: str) -> None:
        """The end of the last part: log the line, once."""
        if self.done:
            return
        self.mark(part)
        self.done = True
        log.info(self.line())

    def line(self) -> str:
        total = self.last - self.process_start
        return f"started in {total:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in self.parts.items())
