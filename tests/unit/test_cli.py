"""One command-line grammar (fgdist/cli.py): every command answers --version the same way, shows
its defaults in --help, and names the same thing with the same flag."""

from __future__ import annotations

import importlib
import importlib.metadata
import re

import pytest

from fgdist import cli

# every console script of the installed package, plus the module entry points the README names
SCRIPTS = {ep.name: ep.value for ep in importlib.metadata.distribution("fgdist").entry_points}
COMMANDS = {**SCRIPTS, "python -m shards": "shards.cli:main", "retrieval_metrics": "fgdist.retrieval_metrics:main"}


def entry(value: str):
    module, function = value.split(":")
    return getattr(importlib.import_module(module), function)


def run(value: str, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        entry(value)(argv)
    return done.value.code, capsys.readouterr().out


def test_every_console_script_is_covered():
    assert {"fgdist-train", "fgdist-embed", "fgdist-index", "fgdist-search", "fgdist-serve"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_version_everywhere(name, capsys):
    code, out = run(COMMANDS[name], ["--version"], capsys)
    assert code == 0
    assert out.strip().endswith(f"(fgdist {importlib.metadata.version('fgdist')})"), out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_defaults(name, capsys):
    code, out = run(COMMANDS[name], ["--help"], capsys)
    assert code == 0
    helps_with_defaults = re.findall(r"\(default: [^)]*\)", out)
    assert not re.search(r"\(default: (None|False|\[\])\)", out), out
    # these have only required options, switches and lists (or sub-commands that carry the options)
    if name not in ("python -m shards", "fgdist-shards", "fgdist-export", "fgdist-train"):
        assert helps_with_defaults, f"{name} --help shows no default:\n{out}"


@pytest.mark.parametrize(
    "name, flag",
    [("fgdist-pictures", "--model"), ("fgdist-embed", "--model"), ("fgdist-export", "--model")]
    + [("fgdist-search", "--model"), ("fgdist-serve", "--model"), ("fgdist-embed", "--device")]
    + [("fgdist-serve", "--device"), ("fgdist-pictures", "--device")],
)
def test_same_flag_for_the_same_thing(name, flag, capsys):
    _, out = run(COMMANDS[name], ["--help"], capsys)
    assert re.search(rf"^\s+{flag}\b", out, re.M), f"{name} has no {flag}"


def test_queries_is_always_query_images(capsys):
    """--queries means query images (a folder or manifest) wherever it appears; counts and
    embeddings have their own names."""
    for name in COMMANDS:
        _, out = run(COMMANDS[name], ["--help"], capsys)
        assert "--queries QUERIES" not in out or name == "fgdist-search", name
    _, out = run(COMMANDS["fgdist-pictures"], ["--help"], capsys)
    assert "--num-queries" in out


def test_device_names():
    assert cli.torch_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="--device nonsense"):
        cli.torch_device("nonsense")


def test_a_named_error_is_one_line_and_exit_2(capsys):
    assert cli.run_reporting(lambda: (_ for _ in ()).throw(FileNotFoundError("x.json: no such file")), (OSError,)) == 2
    assert capsys.readouterr().err == "error: FileNotFoundError: x.json: no such file\n"


def bad_input(value: str, tmp) -> list[str]:
    """A command line naming an input that is not there, per entry point."""
    missing = str(tmp / "missing")
    return {
        "fgdist.report.comparison:main": [
            "--experiment",
            "x",
            "--tracking-uri",
            f"sqlite:///{missing}",
            "--out",
            str(tmp),
        ],
        "fgdist.retrieval.embed:main": ["--model", missing, "--images", missing, "--out", str(tmp / "out")],
        "fgdist.retrieval.export:main": ["--model", missing, "--out", str(tmp / "out")],
        "fgdist.retrieval.search:index_main": ["--embeddings", missing, "--out", str(tmp / "out")],
        "fgdist.retrieval.search:search_main": ["--index", missing, "--queries", missing, "--out", str(tmp / "out")],
        "fgdist.report.pictures:main": ["--model", missing],
        "fgdist.retrieval.serve:main": ["--index", missing],
        "shards.cli:main": ["inspect", missing],
        "launcher.train:main": ["--config", missing],
        "launcher.main_job:main": ["--config", missing],
        "fgdist.retrieval_metrics:main": ["--embeddings", missing, "--gallery", missing],
    }[value]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_names_a_missing_input_in_one_line(name, tmp_path, capsys):
    """Every entry point ends a user's mistake through cli.run_reporting: exit 2, one line."""
    code = entry(COMMANDS[name])(bad_input(COMMANDS[name], tmp_path))
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(tmp_path / "missing") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written on the way
