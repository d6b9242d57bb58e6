"""The command line: train.py's --version and --objective, and the console scripts' targets."""

import importlib
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from fgdist.config import load_config
from fgdist.objective_table import OBJECTIVE_NAMES
from fgdist.report.bootstrap import paired_difference
from fgdist.training import per_query
from launcher.main_job import older_test_split, train_command, verdict
from launcher.train import parse_args
from tests.helpers import REPO, tiny_synthetic


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
    assert scripts["fgdist-pictures"] == "fgdist.report.pictures:main"
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        main = getattr(importlib.import_module(module), attr)
        with pytest.raises(SystemExit) as exit_:  # --help parses and exits 0 without doing anything
            main(["--help"])
        assert exit_.value.code == 0, name


def first_ranks_table(first_ranks) -> per_query.PerQuery:
    """A per-query table holding fine first ranks alone (what the verdict reads)."""
    ranks = np.asarray(first_ranks, dtype=np.int64)
    return per_query.PerQuery({"key": np.arange(len(ranks)), "fine_first_rank": ranks}, "t", "test")


@pytest.mark.parametrize(
    "eff_hits, base_hits, n, claim",
    [
        (700, 500, 2000, "base_indi_eff beats base on fine R@1 by +10.00 points"),
        (500, 700, 2000, "base_indi_eff trails base on fine R@1 by -10.00 points"),
        (52, 50, 200, "base_indi_eff and base are within noise on fine R@1: +1.00 points"),
        (50, 50, 200, "base_indi_eff and base are within noise on fine R@1: +0.00 points"),
    ],
)
def test_main_job_verdict_states_the_difference_with_its_interval(eff_hits, base_hits, n, claim):
    # Queries 0..hits-1 have their first same-fine neighbour first (rank 1), the others at rank 3.
    base = first_ranks_table(np.where(np.arange(n) < base_hits, 1, 3))
    eff = first_ranks_table(np.where(np.arange(n) < eff_hits, 1, 3))
    d = paired_difference(eff.metric_values("fine_recall_at_1"), base.metric_values("fine_recall_at_1"))
    assert verdict(base, eff) == (
        f"verdict: {claim}, 95% paired bootstrap interval [{d.low:+.2f}, {d.high:+.2f}] over {n:,} test queries "
        f"({100 * eff_hits / n:.2f} against {100 * base_hits / n:.2f}; the interval covers the test set's noise, "
        "not a new training seed's)"
    )
    assert d.holds_zero == ("within noise" in claim)


def test_main_job_notes_a_synthetic_shard_set_built_with_another_test_split(tmp_path):
    shards = Path(tiny_synthetic(tmp_path / "syn", test_per_fine=2))  # 4 super x 2 fine x 2 test images
    assert older_test_split(shards) == (
        f"note: {shards} holds 16 synthetic test images, the synthetic source draws 5,120 by default (for a fine R@1 "
        f"interval of about +-2 points); remove {shards} to rebuild it"
    )
    assert older_test_split(tmp_path / "not_built") is None


def test_main_job_runs_keep_their_own_names_under_a_users_name_setting():
    """`main_job.py --set name=mine` once sent both objectives' runs to runs/mine (the second
    overwrote the first); the last `name=` on the train command is the objective's."""
    config = str(REPO / "configs" / "synthetic_cpu.json")
    names = set()
    for objective in ("base", "base_indi_eff"):
        cmd = train_command(config, ["name=mine", "seed=3"], objective, f"mine_{objective}", 2)
        settings = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
        names.add(load_config(config, settings).name)
    assert names == {"mine_base", "mine_base_indi_eff"}
