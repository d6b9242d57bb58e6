"""The command line: train.py's --version and --objective, and the console scripts' targets."""

import importlib
import subprocess
import sys
from importlib.metadata import version

import pytest

from fgdist.objective_table import OBJECTIVE_NAMES
from launcher.main_job import verdict
from launcher.train import parse_args
from tests.helpers import REPO


def test_version_is_the_installed_packages():
    out = subprocess.run(
        [sys.executable, str(REPO / "launcher" / "train.py"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"train.py (fgdist {version('fgdist')})"


def test_objective_choices_come_from_the_objective_table(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--config", "c.json", "--objective", "indi_eff"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'indi_eff'" in err
    assert all(f"'{name}'" in err for name in OBJECTIVE_NAMES)
    assert parse_args(["--config", "c.json", "--objective", "base_indi"]).objective == "base_indi"


def test_every_console_script_points_at_a_main_taking_argv():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fgdist-pictures"] == "fgdist.pictures:main"
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        main = getattr(importlib.import_module(module), attr)
        with pytest.raises(SystemExit) as exit_:  # --help parses and exits 0 without doing anything
            main(["--help"])
        assert exit_.value.code == 0, name


@pytest.mark.parametrize(
    "eff, base, expected",
    [
        (30.7, 28.1, "verdict: base_indi_eff beats base on fine R@1 by +2.60 points (30.70 against 28.10)"),
        (74.64, 77.64, "verdict: base_indi_eff trails base on fine R@1 by -3.00 points (74.64 against 77.64)"),
        (50.0, 50.0, "verdict: base_indi_eff ties base on fine R@1 by +0.00 points (50.00 against 50.00)"),
    ],
)
def test_main_job_verdict_gives_the_sign_of_the_fine_recall_difference(eff, base, expected):
    metrics = {"base_indi_eff": {"fine_recall_at_1": eff}, "base": {"fine_recall_at_1": base}}
    assert verdict(metrics) == expected
