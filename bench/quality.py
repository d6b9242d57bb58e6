"""Train several variants of one config on DeepSpeed ranks and print the paper-style table.

    python bench/quality.py --config configs/fmnist_cpu.json --experiment fmnist_quality \
        --variant base:objective.name=base --variant eff:objective.name=base_indi_eff \
        --variant eff_l05:objective.name=base_indi_eff,objective.lambda_I=0.5 \
        [--set optim.epochs=4 ...] --out bench/results/fmnist_quality

A variant is NAME:KEY=VALUE[,KEY=VALUE...]; --set applies to all of them. Each variant is a real
`deepspeed launcher/train.py` run; the table comes from MLflow through `fgdist.report.comparison`.
The five objectives with the same recipe: --objectives base fine indi base_indi base_indi_eff.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import md_head, md_row, parse_variant, ranks_command  # noqa: E402
from fgdist.config import load_config  # noqa: E402
from fgdist.report.comparison import main as compare  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--variant", action="append", default=[], type=parse_variant)
    p.add_argument("--objectives", nargs="*", default=[], help="shortcut: one variant per objective")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    variants = args.variant + [(o, [f"objective.name={o}"]) for o in args.objectives]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_ids, timings, failed = [], [], []
    for name, sets in variants:
        overrides = [
            *args.overrides,
            *sets,
            f"name={args.experiment}_{name}",
            f"tracking.experiment={args.experiment}",
            f"tracking.run_name={name}",
        ]
        cfg = load_config(args.config, overrides)
        train = ROOT / "launcher" / "train.py"
        cmd = ranks_command(args.ranks, train, ["--config", args.config, *sum((["--set", o] for o in overrides), [])])
        print(f"[quality] {name}: {' '.join(sets)}", flush=True)
        started = time.time()
        with open(out / f"{name}.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if code:  # one failed run does not cost the others: it is named under the table
            failed.append(f"{name}: exit code {code}, see {out / f'{name}.log'}")
            print(f"[quality] {failed[-1]}", flush=True)
            continue
        timings.append((name, time.time() - started))
        run_ids.append(json.loads((cfg.run_dir / "results.json").read_text())["mlflow_run_id"])
    code = (
        compare(["--experiment", args.experiment, "--runs", *run_ids, "--out", str(out), "--curves"]) if run_ids else 1
    )
    lines = ["", *md_head(["variant", "wall time (s), launch to exit"]), *[md_row([n, f"{t:.0f}"]) for n, t in timings]]
    lines += [f"FAILED {line}" for line in failed]
    print("\n".join(lines))
    with open(out / "comparison.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    return 1 if failed else code


if __name__ == "__main__":
    raise SystemExit(main())
