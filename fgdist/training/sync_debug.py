"""Counting the host synchronizations of a training step on CUDA (FGDIST_SYNC_DEBUG=warn).

With the switch on, each training step runs under torch.cuda.set_sync_debug_mode("warn"), which
warns at every operation that makes the host wait for the GPU (an .item(), a copy to the host, a
nonzero...); the warnings are counted, not printed, and the logging step reports
`syncs_per_step`, the mean over the steps since the last log line. The places that synced are
logged once at the end (`report`). Off, and on the CPU, it does nothing. docs/DESIGN.md, "How
a step runs", lists the syncs that remain and why.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import warnings

import torch

ENV = "FGDIST_SYNC_DEBUG"
log = logging.getLogger("fgdist.training.sync_debug")


class SyncCounter:
    def __init__(self, device: torch.device):
        self.enabled = os.environ.get(ENV) == "warn" and device.type == "cuda"
        self.steps, self.syncs = 0, 0
        self.places: collections.Counter[str] = collections.Counter()  # file:line -> syncs, whole run

    @contextlib.contextmanager
    def step(self):
        if not self.enabled:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        for w in syncs:
            self.places[f"{w.filename}:{w.lineno}"] += 1
        self.syncs += len(syncs)
        self.steps += 1

    def take(self) -> dict[str, float]:
        """{"syncs_per_step": mean since the last call} when counting; {} otherwise."""
        if not self.enabled or not self.steps:
            return {}
        mean = self.syncs / self.steps
        self.steps, self.syncs = 0, 0
        return {"syncs_per_step": mean}

    def report(self) -> None:
        if self.enabled:
            top = ", ".join(f"{place} x{count}" for place, count in self.places.most_common(20))
            log.info(f"host syncs in training steps, by place: {top or 'none'}")
