"""One command-line grammar for every fgdist command: the same parser shape (the module's
docstring as the description, defaults shown in `--help`, `--version`) and the same error
ending (one line `error: <what>: <message>` on stderr, exit code 2).

Flag names mean one thing in every command: `--model` a trained model (run or checkpoint
folder, export folder, MLflow run id or model URI), `--out` the output folder, `--overwrite`
replace an output fgdist wrote, `--queries` query images (a folder or a manifest), `--k`
neighbours per query, `--device` where the model runs, `--quiet` no progress bar.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

EXIT_USAGE = 2  # argparse's code for a bad command line; fgdist uses it for every named error


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring's layout kept as written, and each option's default after its help (not
    where there is nothing to say: no default, an off switch, an empty list)."""

    def _get_help_string(self, action):
        nothing = action.default in (None, False, argparse.SUPPRESS) or action.default == []
        if nothing or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help} (default: %(default)s)"


__version__ = "0.1.0"  # the package's version, re-exported as fgdist.__version__


def installed_version() -> str:
    try:
        return version("fgdist")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return f"{__version__}, not installed"


def parser(prog: str | None, description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s (fgdist {installed_version()})")
    return p


def torch_device(name: str):
    """`--device`: `auto` is this process's GPU (cuda:LOCAL_RANK, as the launchers set it) when
    CUDA is there, else the CPU; anything else is a torch device name, checked here so that a
    typo or a missing GPU is one named error before any work."""
    import os

    import torch

    if name == "auto":
        cuda = torch.cuda.is_available()
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # a malformed name, or CUDA absent
        raise ValueError(f"--device {name}: {err}") from None
    return device


def report(err: BaseException, where: str = "") -> int:
    """Print a named error as one line and return the exit code for it."""
    print(f"error: {where}{type(err).__name__}: {err}", file=sys.stderr)
    return EXIT_USAGE


def run_reporting(body: Callable[[], int], errors: tuple[type[BaseException], ...], where: str = "") -> int:
    """`body()`'s exit code, or one error line and EXIT_USAGE when it raises one of `errors`
    (the errors a user can fix: a missing file, a bad value); anything else is a bug and keeps
    its traceback."""
    try:
        return body()
    except errors as err:
        return report(err, where)
