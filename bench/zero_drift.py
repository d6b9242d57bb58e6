"""Is the drift between ZeRO stages (and thread counts) rounding? The per-step loss differences
in float32 and in float64.

    python bench/zero_drift.py [--epochs 2] [--out bench/results/zero_drift.md]

The runs of tests/integration/test_launchers_and_comm.py (2 ranks under the deepspeed launcher,
the tiny synthetic shard set, shuffled routing, a loss logged every step): ZeRO stage 0, 1 and
2, and stage 0 with every rank on all of the machine's threads (LOCAL_WORLD_SIZE=1, as each
one-process node of the two-node test has). Each variant runs once in float32 (the trainer's
CPU precision) and once in float64 (this script, as the ranks' entry point, sets torch's default
dtype and the trainer's precision to float64 before training). The losses are MLflow's (full
precision), and the table gives each variant's largest relative difference from stage 0 at each
step. Rounding shows as: float32 differences that start near float32's resolution (1e-7) and
grow step by step, float64 differences ~1e9 times smaller. A real difference (a missing gradient
average, another batch) would be the same size in both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RANK_ENTRY = "FGDIST_DRIFT_DTYPE"  # set: this process is a rank, training in that dtype

VARIANTS = {
    "stage 1": (["--set", 'deepspeed={"zero_optimization": {"stage": 1}}'], {}),
    "stage 2": (["--set", 'deepspeed={"zero_optimization": {"stage": 2}}'], {}),
    "threads x2": ([], {"LOCAL_WORLD_SIZE": "1"}),
}


def rank_main() -> int:
    """A rank: train in the dtype the driver asked for."""
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    import fgdist.training.trainer
    from launcher.train import main

    dtype = getattr(torch, os.environ[RANK_ENTRY])
    torch.set_default_dtype(dtype)  # the model, the head and the optimizer state
    fgdist.training.trainer.precision = lambda ds: dtype  # the inputs and every cast the trainer makes
    # DeepSpeed reduces the gradient dtypes its accelerator lists (float32 and bfloat16 on the CPU).
    listed = CPU_Accelerator.supported_dtypes
    CPU_Accelerator.supported_dtypes = lambda self: [*listed(self), torch.float64]
    return main(sys.argv[1:])


def losses(root: Path, name: str) -> dict[int, float]:
    """Global step -> rank-averaged loss, from the run's MLflow metrics (full precision)."""
    import mlflow

    run_id = json.loads((root / "runs" / name / "results.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    return {m.step: m.value for m in client.get_metric_history(run_id, "loss")}


def train(root: Path, name: str, dtype: str, epochs: int, extra: list[str], env: dict) -> dict[int, float]:
    """One 2-rank run under the deepspeed launcher, its ranks started in this file."""
    from bench.common import ROOT, ranks_command
    from tests.helpers import TINY_TRAINING

    args = [
        *TINY_TRAINING,
        *("--set", f"data.shards={root / 'shards'}", "--set", f"output_dir={root / 'runs'}"),
        *("--set", f"tracking.uri=sqlite:///{root}/mlflow.db", "--set", f"name={name}"),
        *("--set", "data.routing=shuffled", "--set", f"optim.epochs={epochs}"),
        *extra,
    ]
    full_env = {**os.environ, RANK_ENTRY: dtype, "PYTHONPATH": str(ROOT), **env}
    done = subprocess.run(ranks_command(2, __file__, args), cwd=root, env=full_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return losses(root, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="8 steps each")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--out", help="write the Markdown table here")
    args = p.parse_args()
    from bench.common import md_head, md_row, run_meta, write_report
    from tests.helpers import tiny_synthetic

    meta = run_meta()
    table: dict[tuple[str, str], dict[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fgdist-drift-") as tmp:
        root = Path(tmp)
        tiny_synthetic(root / "shards", train_per_fine=16)  # 128 images: 8 steps of 2 x 8 per epoch
        for dtype in args.dtypes:
            reference = train(root, f"{dtype}_stage0", dtype, args.epochs, [], {})
            for variant, (extra, env) in VARIANTS.items():
                ours = train(root, f"{dtype}_{variant.replace(' ', '_')}", dtype, args.epochs, extra, env)
                table[dtype, variant] = {s: abs(ours[s] - reference[s]) / abs(reference[s]) for s in reference}
                print(dtype, variant, table[dtype, variant], flush=True)
    columns = list(table)
    steps = sorted(next(iter(table.values())))
    lines = [
        f"`{meta['command']}`, {meta['date']}, commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}",
        "",
        "Relative loss difference from ZeRO stage 0 at each global step (2 ranks, rank-averaged loss):",
        "",
        *md_head(["step", *(f"{variant}, {dtype}" for dtype, variant in columns)]),
        *(md_row([str(s), *(f"{table[c][s]:.1e}" for c in columns)]) for s in steps),
    ]
    print("\n".join(lines))
    if args.out:
        write_report(args.out, lines)


if __name__ == "__main__":
    raise SystemExit(rank_main() if os.environ.get(RANK_ENTRY) else main())
