"""The DeepSpeed entry point.

deepspeed --num_gpus 2 launcher/train.py --config configs/synthetic_cpu.json [--objective base]
    [--set optim.epochs=3 --set data.batch_size=32] [--resume]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from fgdist.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a JSON run config (configs/*.json)")
    p.add_argument("--objective", help="shortcut for --set objective.name=...")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"objective.name={args.objective}"] if args.objective else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fgdist.trainer import Trainer

    Trainer(cfg, resume=args.resume).train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
