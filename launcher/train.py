"""The training entry point, under any launcher or none.

deepspeed --num_gpus 2 launcher/train.py --config configs/synthetic_cpu.json [--objective base]
    [--set optim.epochs=3 --set data.batch_size=32] [--resume]
torchrun --nproc_per_node 2 launcher/train.py --config ...      (or --nnodes N --node_rank R ...)
python launcher/train.py --config ...                           (one process)

--objective NAME sets objective.name and, unless `--set name=...` is given, appends _NAME to the
run's name, so that the objectives of one config (configs/cifar100.json) run into separate
folders and MLflow runs, and --resume with the same arguments finds that objective's checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from fgdist import cli  # noqa: E402
from fgdist.config import ConfigError, RunConfig, load_config, parse_override  # noqa: E402
from fgdist.harness import free_port  # noqa: E402
from fgdist.objective_table import OBJECTIVE_NAMES  # noqa: E402

# What torchrun and the deepspeed launcher give every process; DeepSpeed looks for MPI (mpi4py)
# when one is missing.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def parse_args(argv=None):
    p = cli.parser("train.py", __doc__)
    p.add_argument("--config", required=True, help="a JSON run config (configs/*.json)")
    p.add_argument(
        "--objective",
        choices=OBJECTIVE_NAMES,
        help="sets objective.name and appends _OBJECTIVE to the run's name (unless --set name=... is given)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (value parsed as JSON)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint of this run, or from the given checkpoint folder",
    )
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    return p.parse_args(argv)


def run_config(args) -> RunConfig:
    """The config file with the command line's overrides and --objective applied."""
    if not args.objective:
        return load_config(args.config, args.overrides)
    cfg = load_config(args.config, [*args.overrides, f"objective.name={args.objective}"])
    if any(parse_override(o)[0] == "name" for o in args.overrides):
        return cfg
    return cfg.model_copy(update={"name": f"{cfg.name}_{args.objective}"})


def single_process_env(environ=os.environ) -> None:
    """Started without a launcher (no RANK and no WORLD_SIZE): a world of one process on a free
    local port, so that DeepSpeed finds a complete environment and does not try MPI discovery."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        missing = [k for k in LAUNCHER_ENV if k not in environ]
        if missing:
            raise ConfigError(f"launched with RANK/WORLD_SIZE but without {', '.join(missing)} in the environment")
        return
    environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_reporting(lambda: _train(args), (ConfigError,))


def _train(args) -> int:
    cfg = run_config(args)
    single_process_env()
    from fgdist.collectives import leave  # slow imports (torch, MLflow): a bad config is named before them
    from fgdist.retrieval.publish import publish_run
    from fgdist.training.trainer import Trainer

    Trainer(cfg, resume=args.resume, publish=publish_run).train()
    leave()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
