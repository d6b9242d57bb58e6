"""`python -m shards`: help for every subcommand, every source's options with their defaults,
the version, and errors for options a source does not take."""

import importlib.metadata
import inspect
import re
import subprocess
import sys

import pytest

from shards.build import BUILD_OPTIONS
from shards.cli import SOURCES
from shards.cli import main as shards_main
from tests.helpers import REPO


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", *args], cwd=REPO, capture_output=True, text=True)


def test_top_level_help_lists_every_subcommand_with_a_line():
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("build", "inspect", "verify"):
        assert re.search(rf"^    {command}\s+\S", proc.stdout, re.M), f"no help line for {command}:\n{proc.stdout}"


def table_rows(help_text: str) -> dict[str, dict[str, str]]:
    """The options table of `build --help`, read by its header's columns: source -> option ->
    default (an explanation line, indented under the option column, is not a row)."""
    lines = help_text.split("source options (--opt key=value", 1)[1].splitlines()[1:]
    header = lines[0]
    option_at, default_at = header.index("option"), header.index("default")
    rows, source = {}, None
    for line in lines[1:]:
        if len(line) <= option_at or line[option_at] == " ":
            continue
        source = line[:option_at].strip() or source
        rows.setdefault(source, {})[line[option_at:default_at].strip()] = line[default_at:].strip()
    return rows


def test_build_help_lists_every_source_with_its_options_and_defaults():
    proc = cli("build", "--help")
    assert proc.returncode == 0
    rows = table_rows(proc.stdout)
    assert set(rows) == set(SOURCES) | {"every source"}
    for name, opener in SOURCES.items():
        params = inspect.signature(opener).parameters
        shown = {key.removeprefix("--path (").removesuffix(")"): value for key, value in rows[name].items()}
        assert list(shown) == list(params), name
        for key, param in params.items():
            expected = "(required)" if param.default is inspect.Parameter.empty else param.default
            assert shown[key] == ("(unset)" if expected is None else str(expected)), (name, key)
    # The options the issue names, with their defaults.
    assert rows["sop"]["split"] == "paper" and rows["pets"]["shorter_side"] == "256"
    assert rows["fashion-mnist"]["limit_train"] == "(unset)" and rows["manifest"]["--path (path)"] == "(required)"
    assert rows["every source"] == {"on_corrupt": "fail", "test_fraction": "(unset)", "split_seed": "0"}
    for explanation in BUILD_OPTIONS.values():
        assert explanation in proc.stdout
    assert "max samples per shard (default: 1000)" in proc.stdout


def test_version():
    proc = cli("--version")
    assert (
        proc.returncode == 0
        and proc.stdout.strip() == f"python -m shards (fgdist {importlib.metadata.version('fgdist')})"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--source", "pets", "--path", "x", "--opt", "shorter=128"],
            "source 'pets': unknown option 'shorter'; its options: root, shorter_side, jpeg_quality; "
            "every source's: on_corrupt, test_fraction, split_seed",
        ),
        (
            ["--source", "synthetic", "--opt", "num_super=4", "--opt", "limit_train=3"],
            "source 'synthetic': unknown option 'limit_train'; its options: seed, num_super,",
        ),
        (["--source", "synthetic", "--path", "data"], "source 'synthetic' takes no --path"),
        (["--source", "manifest"], "source 'manifest' needs --path"),
        (
            ["--source", "synthetic", "--opt", "on_corrupt=ignore"],
            "on_corrupt must be 'fail' or 'skip', got 'ignore'",
        ),
    ],
)
def test_bad_options_are_errors_naming_them(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert shards_main(["build", "--out", str(out), "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
