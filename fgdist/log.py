"""Logging for training processes: every line carries the time and the rank.

`setup(rank)` configures the "fgdist" logger (and so every `fgdist.*` module logger) once the
rank is known: rank 0 logs INFO and up, the other ranks WARNING and up, so a run's progress is
printed once and a problem on any rank is still seen. Lines go to stdout, where the DeepSpeed
launcher collects every rank's output:

    2025-01-31 12:00:00,123 [fgdist rank 0] INFO: epoch 1/3 step 2/2 loss=3.1 ... images_per_s=410

Only the "fgdist" logger is touched (not the root logger), so libraries keep their own settings.
Without `setup` (the library used from a script) Python's default applies: warnings to stderr.
"""

from __future__ import annotations

import logging
import sys

ROOT = "fgdist"


def setup(rank: int, level: int | None = None) -> logging.Logger:
    """Configure the "fgdist" logger for this rank; calling it again replaces its handler."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [fgdist rank {rank}] %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level if level is not None else (logging.INFO if rank == 0 else logging.WARNING))
    logger.propagate = False  # no second copy through a root handler someone else configured
    return logger
