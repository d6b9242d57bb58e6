"""Output folders that are complete or absent, and that never take anything of the user's with them.

Every command that writes a folder (fgdist-embed, fgdist-index, fgdist-export, `shards build`)
writes it through this module:

- **Complete or absent.** The command writes into `.<name>.partial` beside the output and renames
  it into place at the end, so a crash never leaves a folder that looks finished.
- **Marked.** The partial folder gets a marker file, `.fgdist-output.json` (what wrote it, the
  command line, the time), as soon as it is made; at the end the marker also lists every file
  written. Dataset readers skip it (pyarrow skips names starting with `.`).
- **Only fgdist's is replaced.** An existing output is replaced only with `--overwrite` and only
  if fgdist wrote it: it carries the marker and holds no file the marker does not list. Anything
  else (a folder without the marker, one with files added since, a plain file, a symbolic link)
  is refused with `NotFgdistOutputError`, and must be removed by hand. A leftover partial folder
  of a crashed run is removed only if it carries the marker too.
- **Older outputs.** Folders written before the marker existed are accepted as fgdist's when
  their own metadata file is there in fgdist's format (`_embeddings.json` of format
  fgdist-embeddings/1, `fgdist_model.json` of fgdist-model/1, an index's `index.json` with its
  factory string and dimension, a shard set's `collection.json` whose splits each hold a
  `manifest.json` of fgdist-shards/1); their other files are not checked, as there is no list.
- **Never an input.** An output that is, contains or lies inside one of the command's inputs
  (symbolic links resolved) is refused with `OutputIsInputError`, naming both, whether or not it
  exists yet.
- **Usual permissions.** Before the rename every file is set to 0666 and every folder to 0777,
  less the umask (0644/0755 under umask 022), whatever the library that wrote them chose
  (safetensors writes 0600).

Single files that must be complete or absent (a per-query table, a checkpoint's `latest`
pointer, a renumbered shard) are written through `atomic_file`: under a temporary name beside
the file, renamed over it at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fgdist.cli import __version__
from fgdist.search_errors import NotFgdistOutputError, OutputExistsError, OutputIsInputError

MARKER = ".fgdist-output.json"
MARKER_FORMAT = "fgdist-output/1"
SHOWN_FILES = 5  # foreign files named in a refusal before "and N more"

Inputs = Mapping[str, "str | Path | None"]  # flag -> path, e.g. {"--images": "photos/"}; None or "": not given


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def replaced_path(out: str | Path) -> Path:
    """Where the old output waits while the new one is renamed into place."""
    out = Path(out)
    return out.parent / f".{out.name}.replaced"


# -- is it fgdist's? ----------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}


# What each kind of output wrote before the marker existed: (file, key, value). Written out here, not
# read from the modules that own them: those sit above this one (fgdist.LAYERS) and write through
# it; tests/unit/test_output_folder.py builds real outputs with the owners' names, so a rename fails
EMBEDDINGS_META = ("_embeddings.json", "format", "fgdist-embeddings/1")  # fgdist.embeddings_io
MODEL_META = ("fgdist_model.json", "format", "fgdist-model/1")  # fgdist.retrieval.export
INDEX_META, INDEX_KEYS = "index.json", {"factory", "dim", "count"}  # fgdist.retrieval.search
SHARD_SET = ("collection.json", "manifest.json", "fgdist-shards/1")  # fgdist.data.shardset


def _older_output(folder: Path) -> bool:
    """A folder fgdist wrote before the marker existed, recognised by its own metadata file."""
    for name, key, value in (EMBEDDINGS_META, MODEL_META):
        if _read_json(folder / name).get(key) == value:
            return True
    if INDEX_KEYS <= _read_json(folder / INDEX_META).keys():
        return True
    collection, manifest, shard_format = SHARD_SET
    splits = _read_json(folder / collection).get("splits")
    return (
        isinstance(splits, list)
        and bool(splits)
        and all(_read_json(folder / str(s) / manifest).get("format") == shard_format for s in splits)
    )


def _files_under(folder: Path) -> list[str]:
    """Every file and link under `folder` (relative, sorted), the marker left out."""
    found = []
    for parent, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if (Path(parent) / d).is_symlink()]:
            found.append((Path(parent) / name).relative_to(folder).as_posix())
    return sorted(f for f in found if f != MARKER)


def _not_ours(path: Path) -> str | None:
    """Why fgdist may not remove `path` (None: fgdist wrote it and nothing else is in it)."""
    if path.is_symlink():
        return "is a symbolic link (fgdist never writes one)"
    if not path.is_dir():
        return "is a file, not a folder fgdist wrote"
    marker = path / MARKER
    if not marker.is_file():
        return None if _older_output(path) else f"was not written by fgdist (no {MARKER} in it)"
    listed = _read_json(marker).get("files")
    if listed is None:  # a partial folder: the list is written when it is published
        return None
    foreign = sorted(set(_files_under(path)) - set(listed))
    if foreign:
        more = f" and {len(foreign) - SHOWN_FILES} more" if len(foreign) > SHOWN_FILES else ""
        return f"holds files fgdist did not write ({', '.join(foreign[:SHOWN_FILES])}{more})"
    return None


def _refuse_unless_ours(path: Path) -> None:
    reason = _not_ours(path)
    if reason:
        raise NotFgdistOutputError(f"{path} {reason}; fgdist replaces only what it wrote: remove or move it by hand")


def _remove_ours(path: Path) -> None:
    """Remove a folder fgdist wrote (an old output, a crashed run's partial folder); refuse anything else."""
    if path.exists() or path.is_symlink():
        _refuse_unless_ours(path)
        shutil.rmtree(path)


# -- never an input -----------------------------------------------------------------------------
def _check_not_input(out: Path, inputs: Inputs) -> None:
    target = out.resolve()
    for flag, given in inputs.items():
        if not given or not Path(given).exists():  # not a path (an MLflow run id or URI): nothing to lose
            continue
        source = Path(given).resolve()
        if target == source:
            how = "is"
        elif target.is_relative_to(source):
            how = "lies inside"
        elif source.is_relative_to(target):
            how = "contains"
        else:
            continue
        raise OutputIsInputError(f"the output {out} {how} the input {flag} {given}; write the output elsewhere")


# -- the steps ---------------------------------------------------------------------------------
def check_free(out: str | Path, overwrite: bool, inputs: Inputs | None = None) -> None:
    """Refuse an output that is an input, that exists and is not fgdist's, or that exists without `overwrite`."""
    out = Path(out)
    _check_not_input(out, inputs or {})
    if out.exists() or out.is_symlink():
        _refuse_unless_ours(out)
        if not overwrite:
            raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")


def _write_marker(folder: Path, kind: str | None, files: list[str] | None) -> None:
    marker = {
        "format": MARKER_FORMAT,
        "kind": kind,
        "command": sys.argv,
        "fgdist_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=1))


def begin(out: str | Path, overwrite: bool, kind: str | None = None, inputs: Inputs | None = None) -> Path:
    """A fresh, empty, marked partial folder for `out` (a crashed run's marked leftover is removed)."""
    check_free(out, overwrite, inputs)
    partial = partial_path(out)
    _remove_ours(partial)
    partial.mkdir(parents=True)
    _write_marker(partial, kind, None)
    return partial


def _usual_modes(folder: Path) -> None:
    """0666/0777 less the umask for everything under `folder`, the modes a plain open() and mkdir() give."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for parent, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(Path(parent) / name, 0o777 & ~umask)
        for name in files:
            os.chmod(Path(parent) / name, 0o666 & ~umask)


def publish(out: str | Path) -> Path:
    """Move the finished partial folder into place, replacing an old output only if fgdist wrote it."""
    out = Path(out)
    partial = partial_path(out)
    marker = _read_json(partial / MARKER)
    _write_marker(partial, marker.get("kind"), _files_under(partial))
    _usual_modes(partial)
    if out.exists() or out.is_symlink():
        _refuse_unless_ours(out)  # again: the folder may have changed since the command started
        replaced = replaced_path(out)
        _remove_ours(replaced)
        os.replace(out, replaced)
        os.replace(partial, out)
        shutil.rmtree(replaced)
    else:
        os.replace(partial, out)
    return out


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool, kind: str | None = None, inputs: Inputs | None = None):
    """One process: yields the partial folder; renamed into place on success, removed on error."""
    partial = begin(out, overwrite, kind, inputs)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(out)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the caller to write, renamed over `path` when
    the block ends and removed when it raises: a crash never leaves a half-written file under
    the final name. Beside it, so that the rename stays on one file system (atomic); the process
    id in its name keeps two writers from sharing it."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
