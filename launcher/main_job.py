"""The main job on the embedded default: build the synthetic shards (paper Section 4.1), train
`base` and `base_indi_eff` on two DeepSpeed ranks (CPU/gloo here, GPUs where present), and print
both runs side by side from MLflow.

    python launcher/main_job.py [--config configs/synthetic_cpu.json] [--num-gpus 2]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fgdist import cli  # noqa: E402
from fgdist.config import load_config  # noqa: E402
from launcher.ports import free_port  # noqa: E402

OBJECTIVES = ("base", "base_indi_eff")  # the paper's baseline and its method (Eqn 1, Eqn 5)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None) -> int:
    p = cli.parser("main_job.py", __doc__)
    p.add_argument("--config", default=str(ROOT / "configs" / "synthetic_cpu.json"))
    p.add_argument("--num-gpus", type=int, default=2, help="ranks per machine (CPU processes without a GPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    shards = Path(cfg.data.shards)
    if not (shards / "train" / "manifest.json").is_file():
        run([sys.executable, "-m", "shards", "build", "--source", "synthetic", "--out", str(shards)])
    run_ids, results = [], {}
    for objective in OBJECTIVES:
        name = f"{cfg.name}_{objective}"
        run(
            [
                "deepspeed",
                "--num_gpus",
                str(args.num_gpus),
                "--master_port",
                str(free_port()),
                str(ROOT / "launcher" / "train.py"),
                "--config",
                args.config,
                "--objective",
                objective,
                "--set",
                f"name={name}",
                *sum((["--set", o] for o in args.overrides), []),
            ]
        )
        results[objective] = json.loads((Path(cfg.output_dir) / name / "results.json").read_text())
        run_ids.append(results[objective]["mlflow_run_id"])
    from fgdist.comparison import main as compare

    code = compare(
        [
            "--experiment",
            cfg.tracking.experiment,
            "--runs",
            *run_ids,
            "--out",
            str(Path(cfg.output_dir) / f"{cfg.name}_comparison"),
        ]
        + (["--tracking-uri", cfg.tracking.uri] if cfg.tracking.uri else [])
    )
    print(verdict({objective: r["metrics"] for objective, r in results.items()}))
    return code


def verdict(metrics: dict[str, dict[str, float]]) -> str:
    """One line under the table: does the instance term pay off on fine-class retrieval?"""
    eff, base = metrics["base_indi_eff"]["fine_recall_at_1"], metrics["base"]["fine_recall_at_1"]
    delta = eff - base
    word = "beats" if delta > 0 else ("ties" if delta == 0 else "trails")
    return f"verdict: base_indi_eff {word} base on fine R@1 by {delta:+.2f} points ({eff:.2f} against {base:.2f})"


if __name__ == "__main__":
    raise SystemExit(main())
