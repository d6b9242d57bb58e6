"""Helpers the bench scripts share: resident-memory probes, the run's description (command line,
commit, date), the `deepspeed` command that starts a script's ranks, the --variant argument, and
Markdown table rows.

The scripts run as `python bench/NAME.py` from the repository root; each puts the root on
sys.path and imports this module as `bench.common`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from fgdist.harness import free_port, launcher_prefix

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def mib(nbytes: float) -> str:
    """Bytes as whole MiB with thousands separators, the unit of every memory column."""
    return f"{nbytes / MIB:,.0f}"


# ---------------------------------------------------------------------------------------------
# Resident memory of this process (Linux)
# ---------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """The resident set size now, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_hwm() -> bool:
    """Reset the kernel's high-water mark VmHWM to the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    """The kernel's high-water mark of the RSS (VmHWM) since the process start or the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def max_rss_bytes() -> int:
    """getrusage's ru_maxrss (KiB on Linux). A VmHWM reset lowers it too: both read one mark."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssPeak:
    """Peak RSS of this process while the block runs, sampled by a thread through psutil every
    `period_s` (a shorter peak can be missed); for where VmHWM cannot be reset."""

    def __init__(self, period_s: float = 0.002):
        self.period_s, self.proc = period_s, psutil.Process()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.base


# ---------------------------------------------------------------------------------------------
# What ran, where and when
# ---------------------------------------------------------------------------------------------


def command_output(cmd: list[str]) -> str | None:
    """stdout of a command run in the repository root, stripped; None if it fails."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str:
    return command_output(["git", "rev-parse", "--short", "HEAD"]) or "unknown"


def git_dirty(*paths: str) -> bool:
    """Whether tracked files (under `paths`, or anywhere) have uncommitted changes."""
    return bool(command_output(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths]))


def shell_date() -> str:
    """The output of `date`, as a person would note it; ISO time where there is no `date`."""
    return command_output(["date"]) or datetime.datetime.now().astimezone().isoformat()


def command_line(argv: list[str] | None = None) -> str:
    """The running script's command, to repeat from the repository root (arguments shell-quoted)."""
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0], ROOT), *argv])


def run_meta(*dirty_paths: str) -> dict:
    """What ran, where and when, for a report's header: the command line, `date`, the commit,
    whether tracked files (under `dirty_paths`, or anywhere) had uncommitted changes, the torch
    and Python versions and the load average now."""
    return {
        "command": command_line(),
        "date": shell_date(),
        "commit": git_commit(),
        "dirty": git_dirty(*dirty_paths),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def ranks_command(ranks: int, script: str | Path, args: list[str], launcher: str = "deepspeed") -> list[str]:
    """`launcher` (fgdist.harness.LAUNCHERS) starting `ranks` DeepSpeed ranks of `script args` on
    this machine, on a free port."""
    return [*launcher_prefix(launcher, ranks, free_port()), str(script), *args]


# ---------------------------------------------------------------------------------------------
# Command-line arguments
# ---------------------------------------------------------------------------------------------


def parse_variant(text: str) -> tuple[str, list[str]]:
    """A --variant argument NAME:KEY=VALUE[,KEY=VALUE...] as (NAME, ["KEY=VALUE", ...]); the
    settings may be empty (NAME or NAME:). argparse reports the error with the bad argument."""
    name, _, sets = text.partition(":")
    settings = [s for s in sets.split(",") if s]
    if not name or any(c in name for c in "/ "):
        raise argparse.ArgumentTypeError(f"variant {text!r}: NAME must be non-empty, without '/' or spaces")
    bad = [s for s in settings if "=" not in s or s.startswith("=")]
    if bad:
        raise argparse.ArgumentTypeError(f"variant {name!r}: settings must be KEY=VALUE, not {', '.join(bad)}")
    return name, settings


# ---------------------------------------------------------------------------------------------
# Markdown tables
# ---------------------------------------------------------------------------------------------


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def md_head(columns: list[str]) -> list[str]:
    """A Markdown table's header line and its separator line."""
    return [md_row(columns), "|" + "---|" * len(columns)]


def write_report(path: str, lines: list[str]) -> None:
    """A benchmark's markdown report, its folder made if needed; says where it went."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"written to {path}")
