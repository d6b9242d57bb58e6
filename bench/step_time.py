"""Step time of each objective on DeepSpeed ranks, and the data loader's rate against it.

Driver (runs each objective under the real launcher, then writes a Markdown table):
    python bench/step_time.py --config configs/synthetic_cpu.json --objectives base base_indi_eff \
        --steps 20 --out bench/results/step_time_synthetic.md [--set model.width=16 ...]
Each rank times `Trainer.train_step` alone (batch already in memory) and, separately, how fast
its loader produces batches with nothing else running in that rank.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command_line, deepspeed_command, git_commit, md_head, md_row  # noqa: E402


def measure(args) -> None:
    """Inside a DeepSpeed rank."""
    import torch.distributed as dist

    from fgdist.config import load_config
    from fgdist.data import train_batches
    from fgdist.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    # Only the batches the timed steps use: an epoch of a large set would not fit in memory.
    batches = list(
        itertools.islice(
            train_batches(trainer.train_split, trainer.plan, cfg.data, trainer.rank, epoch=0, seed=cfg.seed),
            args.steps + args.warmup,
        )
    )
    times = []
    for i in range(args.steps + args.warmup):
        batch = batches[i % len(batches)]
        dist.barrier()
        t = time.perf_counter()
        trainer.train_step(batch)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    dist.barrier()
    loader_rate = None
    if args.loader:
        # The loader alone: this rank's batches for a whole epoch, decode and augment included.
        t = time.perf_counter()
        count = sum(
            b["images"].shape[0]
            for b in train_batches(trainer.train_split, trainer.plan, cfg.data, trainer.rank, epoch=1, seed=cfg.seed)
        )
        loader_rate = count / (time.perf_counter() - t)
    step = statistics.median(times)
    result = {
        "rank": trainer.rank,
        "step_s": step,
        "train_images_per_s_per_rank": cfg.data.batch_size / step,
        "loader_images_per_s_per_rank": loader_rate,
    }
    gathered = [None] * trainer.world_size
    dist.all_gather_object(gathered, result)
    if trainer.rank == 0:
        Path(args.result).write_text(json.dumps(gathered))
    trainer.tracker.finish()


def drive(args) -> None:
    rows = []
    for objective in args.objectives:
        result = Path(f"/tmp/step_time_{os.getpid()}_{objective}.json")
        cmd = deepspeed_command(
            args.ranks,
            __file__,
            [
                "--measure",
                "--result",
                str(result),
                "--config",
                args.config,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--loader" if args.loader else "--no-loader",
                "--set",
                f"objective.name={objective}",
                "--set",
                f"name=bench_{objective}",
                "--set",
                "tracking.system_metrics=false",
                "--set",
                "tracking.experiment=bench",
                *sum((["--set", o] for o in args.overrides), []),
            ],
        )
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        ranks = json.loads(result.read_text())
        loader = min(r["loader_images_per_s_per_rank"] for r in ranks) if args.loader else None
        rows.append(
            (objective, max(r["step_s"] for r in ranks), loader, max(r["train_images_per_s_per_rank"] for r in ranks))
        )
    base = rows[0][1]
    lines = [
        f"# Step time: {args.config} {' '.join(args.overrides)}",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {args.machine}; date {time.strftime('%Y-%m-%d')}; commit {git_commit()}  ",
        f"{args.ranks} DeepSpeed ranks; median of {args.steps} steps after {args.warmup} warm-up; slowest rank.",
        "",
        *md_head(
            [
                *("objective", "step (s)", f"step / {rows[0][0]} step", "training consumes (img/s/rank)"),
                *("loader alone (img/s/rank)", "loader / training"),
            ]
        ),
    ]
    for objective, step, loader, train in rows:
        loader_cells = [f"{loader:.1f}", f"{loader / train:.2f}x"] if loader is not None else ["not measured", "-"]
        lines.append(md_row([objective, f"{step:.4f}", f"{step / base:.3f}", f"{train:.1f}", *loader_cells]))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--objectives", nargs="+", default=["base", "base_indi_eff"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out")
    p.add_argument(
        "--loader",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the loader alone over one epoch",
    )
    p.add_argument("--machine", default="2-core x86_64 CPU, no GPU, gloo")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    measure(a) if a.measure else drive(a)
