"""The main job on the embedded default: build the synthetic shards (paper Section 4.1), train
`base` and `base_indi_eff` on two DeepSpeed ranks (CPU/gloo here, GPUs where present), print
both runs side by side from MLflow with base_indi_eff's difference to base, and a verdict: the
fine R@1 difference with its 95% paired bootstrap interval over the test queries.

    python launcher/main_job.py [--config configs/synthetic_cpu.json] [--num-gpus 2] [--launcher torchrun]

The ranks start under torchrun: the same DeepSpeed engine as under `deepspeed launcher/train.py`
(`--launcher deepspeed`), up to 7 s sooner per run on a 2-core CPU (fgdist.harness.LAUNCHERS).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fgdist import cli  # noqa: E402
from fgdist.config import ConfigError, load_config  # noqa: E402
from fgdist.data.shardset import open_split  # noqa: E402
from fgdist.harness import LAUNCHERS, free_port, launcher_prefix  # noqa: E402
from fgdist.report.bootstrap import paired_difference  # noqa: E402
from fgdist.training import per_query  # noqa: E402
from shards.sources.synthetic import open_synthetic  # noqa: E402

OBJECTIVES = ("base", "base_indi_eff")  # the paper's baseline and its method (Eqn 1, Eqn 5)


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def rank_environment(num_gpus: int) -> dict[str, str]:
    """This environment with each rank's OpenMP threads set, unless the user set them: the cores
    shared out, as the trainer does on a CPU (torchrun would set 1 and print a warning about it)."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_gpus)), **os.environ}


def main(argv=None) -> int:
    p = cli.parser("main_job.py", __doc__)
    p.add_argument("--config", default=str(ROOT / "configs" / "synthetic_cpu.json"))
    p.add_argument("--num-gpus", type=int, default=2, help="ranks per machine (CPU processes without a GPU)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun", help="what starts the DeepSpeed ranks")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    return cli.run_reporting(lambda: _main_job(args), (ConfigError, subprocess.CalledProcessError))


def train_command(
    config: str, overrides: list[str], objective: str, name: str, num_gpus: int, launcher: str = "torchrun"
) -> list[str]:
    """One objective's launcher/train.py run on `num_gpus` ranks. Its name comes after the user's
    settings, so a `--set name=...` of the user's names the pair and never merges the two runs."""
    settings = [*overrides, f"name={name}"]
    return [
        *launcher_prefix(launcher, num_gpus, free_port()),
        *[str(ROOT / "launcher" / "train.py"), "--config", config, "--objective", objective],
        *sum((["--set", s] for s in settings), []),
    ]


def _main_job(args) -> int:
    cfg = load_config(args.config, args.overrides)

    shards = Path(cfg.data.shards)
    if not (shards / "train" / "manifest.json").is_file():
        run([sys.executable, "-m", "shards", "build", "--source", "synthetic", "--out", str(shards)])
    note = older_test_split(shards)
    if note:
        print(note, flush=True)
    run_ids, tables = [], {}
    for objective in OBJECTIVES:
        name = f"{cfg.name}_{objective}"
        run(
            train_command(args.config, args.overrides, objective, name, args.num_gpus, args.launcher),
            rank_environment(args.num_gpus),
        )
        run_dir = Path(cfg.output_dir) / name
        run_ids.append(json.loads((run_dir / "results.json").read_text())["mlflow_run_id"])
        tables[objective] = per_query.read(run_dir / per_query.FILE)
    from fgdist.report.comparison import main as compare

    code = compare(
        [
            "--experiment",
            cfg.tracking.experiment,
            "--runs",
            *run_ids,
            "--baseline",
            run_ids[0],
            "--out",
            str(Path(cfg.output_dir) / f"{cfg.name}_comparison"),
        ]
        + (["--tracking-uri", cfg.tracking.uri] if cfg.tracking.uri else [])
    )
    print(verdict(tables["base"], tables["base_indi_eff"]))
    return code


def older_test_split(shards: Path) -> str | None:
    """A note when `shards` holds synthetic data built with another test split than the synthetic
    source draws by default (a shard set from before the test split grew): the verdict's interval
    is then wider than the default's."""
    collection = shards / "collection.json"
    if not collection.is_file() or json.loads(collection.read_text()).get("name") != "synthetic":
        return None
    defaults = {k: p.default for k, p in inspect.signature(open_synthetic).parameters.items()}
    expected = defaults["num_super"] * defaults["fine_per_super"] * defaults["test_per_fine"]
    found = open_split(shards, "test").manifest.num_instances
    if found == expected:
        return None
    return (
        f"note: {shards} holds {found:,} synthetic test images, the synthetic source draws {expected:,} by default "
        f"(for a fine R@1 interval of about +-2 points); remove {shards} to rebuild it"
    )


def verdict(base: per_query.PerQuery, eff: per_query.PerQuery) -> str:
    """One line under the table: does the instance term pay off on fine-class retrieval, beyond
    the noise of the test set? "within noise" when the 95% interval of the difference holds 0."""
    metric = "fine_recall_at_1"
    ours, theirs = eff.metric_values(metric), base.metric_values(metric)
    d = paired_difference(ours, theirs)
    if d.holds_zero:
        claim = f"base_indi_eff and base are within noise on fine R@1: {d.value:+.2f} points"
    else:
        claim = f"base_indi_eff {'beats' if d.value > 0 else 'trails'} base on fine R@1 by {d.value:+.2f} points"
    return (
        f"verdict: {claim}, 95% paired bootstrap interval [{d.low:+.2f}, {d.high:+.2f}] over {d.n:,} test queries "
        f"({ours.mean():.2f} against {theirs.mean():.2f}; the interval covers the test set's noise, not a new "
        "training seed's)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
