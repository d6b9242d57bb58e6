"""Step time and memory per rank of recipe variants on DeepSpeed ranks, and the loader's rate.

Driver (runs each variant under the real launcher, then writes a Markdown table):
    python bench/step_time.py --config configs/synthetic_cpu.json --steps 20 \
        --variant base:objective.name=base \
        --variant eff_cos:objective.name=base_indi_eff,head.logit=cosine,head.temperature=0.1 \
        --out bench/results/step_time_synthetic.md [--set data.shards=data/synthetic ...]
    python bench/step_time.py --config configs/synthetic_cpu.json --objectives base base_indi_eff \
        --steps 20 --out bench/results/step_time_synthetic.md [--set model.width=16 ...]

A variant is NAME:KEY=VALUE[,KEY=VALUE...] (as in bench/quality.py), one launch each; --objectives X
is the shortcut for --variant X:objective.name=X. A dict key takes dotted settings
(model.kwargs.img_size=32). --channels-last NAME feeds variant NAME its batches in the
channels-last memory format, which convolutions propagate through the network (a measurement
only: training has no such option yet, and the weights stay as DeepSpeed holds them, converted
per call; whether convolutional networks gain from it under bf16 is the device check's question).
Variants run in command-line order (by default --objectives base base_indi_eff); the first is the
reference of the step-time ratio. --set applies to all of them, a variant's own settings win over it.

Each rank times `Trainer.train_step` alone (batch already in memory) and, separately, how fast
its loader produces batches with nothing else running in that rank. Memory: once its batches are
in memory, each rank resets its RSS high-water mark (VmHWM) and reads the RSS, runs the warm-up and
timed steps, and reads the high-water mark; the table shows, max over ranks, the RSS before the
steps, the peak during them and what the steps add. On the CPU this is process RSS, so the
allocator's cached blocks count too. head.init=features only sets the head's starting values: its
pass over the training set is not run here, and a step costs the same either way.
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

from bench.common import (  # noqa: E402
    command_line,
    git_commit,
    hwm_bytes,
    md_head,
    md_row,
    mib,
    parse_variant,
    ranks_command,
    reset_hwm,
    rss_bytes,
)

DEFAULT_OBJECTIVES = ("base", "base_indi_eff")


def measure(args) -> None:
    """Inside a DeepSpeed rank."""
    import torch
    import torch.distributed as dist

    from fgdist.config import load_config
    from fgdist.data.loader import train_batches
    from fgdist.training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    # Only the batches the timed steps use: an epoch of a large set would not fit in memory.
    batches = list(
        itertools.islice(
            train_batches(trainer.train_split, trainer.plan, cfg.data, trainer.rank, epoch=0, seed=cfg.seed),
            args.steps + args.warmup,
        )
    )
    if args.channels_last:
        # Only the inputs: under bf16 DeepSpeed's optimizer holds the parameters as views of one
        # flat buffer, which converting them would cut.
        for b in batches:
            b["images"] = b["images"].contiguous(memory_format=torch.channels_last)
    dist.barrier()
    # From here the high-water mark sees only the steps (the batches and the model are in `before`).
    # Where the kernel refuses the reset the mark would include the setup: no memory numbers then.
    hwm_reset = reset_hwm()
    rss_before = rss_bytes()
    if trainer.on_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps + args.warmup):
        batch = batches[i % len(batches)]
        dist.barrier()
        t = time.perf_counter()
        trainer.train_step(batch)
        if trainer.on_cuda:
            torch.cuda.synchronize()  # the step's kernels, not just their launches
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak_rss = hwm_bytes()
    peak_device = torch.cuda.max_memory_allocated() if trainer.on_cuda else None
    dist.barrier()
    loader_rate = None
    if args.loader:
        # The loader alone: this rank's batches for a whole epoch, decode and augment included.
        t = time.perf_counter()
        rows = sum(
            b["images"].shape[0]
            for b in train_batches(trainer.train_split, trainer.plan, cfg.data, trainer.rank, epoch=1, seed=cfg.seed)
        )
        loader_rate = rows / cfg.data.views / (time.perf_counter() - t)  # images, as training's rate
    step = statistics.median(times)
    result = {
        "rank": trainer.rank,
        "step_s": step,
        "train_images_per_s_per_rank": cfg.data.batch_size / step,  # images, not rows (data.views)
        "loader_images_per_s_per_rank": loader_rate,
        "rss_before_bytes": rss_before if hwm_reset else None,
        "peak_rss_bytes": peak_rss if hwm_reset else None,
        "peak_device_bytes": peak_device,
    }
    gathered = [None] * trainer.world_size
    dist.all_gather_object(gathered, result)
    if trainer.rank == 0:
        Path(args.result).write_text(json.dumps(gathered))
    trainer.tracker.finish()


def summarize(name: str, settings: list[str], ranks: list[dict], channels_last: bool = False) -> dict:
    """One table row from every rank's result: the slowest rank's step and training rate, the
    slowest loader, and each memory figure's maximum over ranks (None where not measured)."""
    memory = all(r["rss_before_bytes"] is not None for r in ranks)
    return {
        "name": name,
        "settings": settings + (["channels-last inputs"] if channels_last else []),
        "step_s": max(r["step_s"] for r in ranks),
        "train": min(r["train_images_per_s_per_rank"] for r in ranks),
        "loader": min(r["loader_images_per_s_per_rank"] for r in ranks)
        if ranks[0]["loader_images_per_s_per_rank"] is not None
        else None,
        "rss_before": max(r["rss_before_bytes"] for r in ranks) if memory else None,
        "peak_rss": max(r["peak_rss_bytes"] for r in ranks) if memory else None,
        "step_adds": max(r["peak_rss_bytes"] - r["rss_before_bytes"] for r in ranks) if memory else None,
        # GPU memory allocated by PyTorch at its peak over the steps (None on the CPU, and in results
        # recorded before it was measured)
        "peak_device": max(r["peak_device_bytes"] for r in ranks) if ranks[0].get("peak_device_bytes") else None,
    }


def report(rows: list[dict], *, config: str, overrides: list[str], ranks: int, steps: int, warmup: int, machine: str):
    """The Markdown table, its header lines and one line per variant naming its settings."""
    reference = rows[0]
    device = any(row.get("peak_device") for row in rows)  # a GPU run: its memory is not the process RSS
    lines = [
        f"# Step time: {config} {' '.join(overrides)}",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine}; date {time.strftime('%Y-%m-%d')}; commit {git_commit()}  ",
        f"{ranks} DeepSpeed ranks; median of {steps} steps after {warmup} warm-up; slowest rank.  ",
        "Memory per rank, each column its own maximum over ranks: process RSS (on the CPU the allocator's "
        "cached blocks count too); peak = the RSS high-water mark over warm-up and timed steps, reset once "
        "the batches are in memory.",
        "",
        *md_head(
            [
                *("variant", "step (s)", f"step / {reference['name']} step", "training consumes (img/s/rank)"),
                *("RSS before steps (MiB)", "peak RSS in steps (MiB)", "steps add (MiB)"),
                *("loader alone (img/s/rank)", "loader / training"),
                *(["peak GPU memory allocated (MiB)"] if device else []),
            ]
        ),
    ]
    for row in rows:
        memory = [row["rss_before"], row["peak_rss"], row["step_adds"]]
        memory_cells = [mib(b) for b in memory] if row["rss_before"] is not None else ["not measured"] * 3
        loader, train = row["loader"], row["train"]
        loader_cells = [f"{loader:.1f}", f"{loader / train:.2f}x"] if loader is not None else ["not measured", "-"]
        ratio = row["step_s"] / reference["step_s"]
        device_cells = [mib(row["peak_device"]) if row.get("peak_device") else "-"] if device else []
        cells = [row["name"], f"{row['step_s']:.4f}", f"{ratio:.3f}", f"{train:.1f}", *memory_cells, *loader_cells]
        lines.append(md_row(cells + device_cells))
    lines += ["", "Variants (each on top of the config and the --set above):", ""]
    lines += [
        f"- `{row['name']}`: {', '.join(f'`{s}`' for s in row['settings']) or 'the config as is'}" for row in rows
    ]
    return "\n".join(lines) + "\n"


def drive(args) -> None:
    from fgdist.config import ConfigError, load_config

    variants = args.variants or [(o, [f"objective.name={o}"]) for o in DEFAULT_OBJECTIVES]
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"step_time: variant names must differ: {' '.join(names)}")
    unknown = sorted(set(args.channels_last) - set(names))
    if unknown:
        raise SystemExit(f"step_time: --channels-last names no variant: {' '.join(unknown)}")
    launches = []
    for name, settings in variants:
        overrides = [
            *args.overrides,
            *settings,
            f"name=bench_{name}",
            "tracking.system_metrics=false",
            "tracking.experiment=bench",
        ]
        try:  # a bad key or value stops here, before any launch
            load_config(args.config, overrides)
        except ConfigError as err:
            raise SystemExit(f"step_time: variant {name!r}: {err}") from None
        launches.append((name, settings, overrides))
    rows = []
    for name, settings, overrides in launches:
        result = Path(f"/tmp/step_time_{os.getpid()}_{name}.json")
        cmd = ranks_command(
            args.ranks,
            __file__,
            [
                *("--measure", "--result", str(result), "--config", args.config),
                *("--steps", str(args.steps), "--warmup", str(args.warmup)),
                "--loader" if args.loader else "--no-loader",
                *(["--channels-last", name] if name in args.channels_last else []),
                *sum((["--set", o] for o in overrides), []),
            ],
        )
        print(f"[step_time] {name}: {' '.join(settings)}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows.append(summarize(name, settings, json.loads(result.read_text()), name in args.channels_last))
        result.unlink()
    text = report(
        rows,
        config=args.config,
        overrides=args.overrides,
        ranks=args.ranks,
        steps=args.steps,
        warmup=args.warmup,
        machine=args.machine,
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)


class AddObjectives(argparse.Action):
    """--objectives X Y: the variants X:objective.name=X and Y:objective.name=Y, in their place
    among the --variant arguments."""

    def __call__(self, parser, namespace, values, option_string=None):
        variants = list(getattr(namespace, self.dest) or [])
        setattr(namespace, self.dest, variants + [(o, [f"objective.name={o}"]) for o in values])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--variant", dest="variants", action="append", default=[], type=parse_variant)
    p.add_argument(
        "--objectives", dest="variants", nargs="+", action=AddObjectives, help="shortcut: one variant per objective"
    )
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
    p.add_argument(
        "--channels-last",
        action="append",
        default=[],
        metavar="VARIANT",
        help="run this variant in the channels-last memory format (repeatable)",
    )
    p.add_argument("--machine", default="2-core x86_64 CPU, no GPU, gloo")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    a = parser().parse_args()
    measure(a) if a.measure else drive(a)
