"""Outputs that are either complete or absent: a command writes into `.<name>.partial` beside
the output and renames it into place at the end, so a crash never leaves a folder that looks
finished; an existing output is refused unless the caller asked to overwrite it."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from fgdist.search_errors import OutputExistsError


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def check_free(out: str | Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")


def begin(out: str | Path, overwrite: bool) -> Path:
    """A fresh, empty partial folder for `out` (a leftover of a crashed run is removed)."""
    check_free(out, overwrite)
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def publish(out: str | Path) -> Path:
    """Move the finished partial folder into place, replacing an old output."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(partial_path(out), out)
    return out


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool):
    """One process: yields the partial folder; renamed into place on success, removed on error."""
    partial = begin(out, overwrite)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(out)
