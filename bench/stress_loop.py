"""Stress loop: many short 2-rank training runs with evaluations, counting the runs that end badly.

Each run trains a narrow ResNet-18 on a tiny synthetic shard set for a few epochs with an
evaluation and a checkpoint after every epoch, under the real DeepSpeed launcher (gloo, CPU), with
one loader worker per rank: the shape of the runs in which a loader worker once never delivered
(issue 22) and a rank once aborted at exit with "terminate called without an active exception".

    python bench/stress_loop.py --runs 30 --out bench/results/stress_loop.md

A run is "ok" (exit 0), "restarted" (exit 0 after a loader worker delivered nothing for 60 s,
data.worker_timeout here, and a new loader went on: the stuck workers' stacks are printed),
"abort" (a rank died of SIGABRT), "hang" (still running after --timeout seconds; killed) or
"failed" (any other exit; its last lines are printed). Before a hung run is
killed, `py-spy dump --native` (pip install py-spy) prints the stack of each of its processes: the
ranks, their loader workers and the launcher.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, md_head, md_row, ranks_command, run_meta, write_report  # noqa: E402
from fgdist.harness import TINY_TRAINING, tiny_synthetic  # noqa: E402

# a tiny run (fgdist.harness), evaluating and saving after every epoch
TRAIN = [*TINY_TRAINING, "--set", "eval.every_epochs=1", "--set", "checkpoint.every_epochs=1"]
TRAIN += ["--set", "data.worker_timeout=60"]  # a stuck worker: its stacks, then a new loader
RESTARTED = "goes on with a new loader"  # fgdist.data.loader.restarting's warning


def dump_stacks(pid: int) -> None:
    """Print the Python and native stacks of `pid` and every process it started."""
    if shutil.which("py-spy") is None:
        print("(no py-spy: pip install py-spy to see where a hung run waits)")
        return
    parent = psutil.Process(pid)
    for p in [parent, *parent.children(recursive=True)]:
        print(f"--- pid {p.pid}: {' '.join(p.cmdline())[:200]}", flush=True)
        subprocess.run(["py-spy", "dump", "--native", "--pid", str(p.pid)], check=False)


def one_run(work: Path, i: int, epochs: int, timeout: float) -> tuple[str, float, str]:
    """Start one run; return its outcome, wall seconds and the tail of its output."""
    args = [*TRAIN, "--set", f"data.shards={work / 'shards'}", "--set", f"output_dir={work / 'runs'}"]
    args += ["--set", f"name=run{i}", "--set", f"optim.epochs={epochs}", "--set", f"seed={i}"]
    cmd = ranks_command(2, ROOT / "launcher" / "train.py", args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    start = time.time()
    # its own session, so a hang can be killed with every rank and loader worker it started
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        dump_stacks(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "hang", time.time() - start, out[-3000:]
    seconds = time.time() - start
    if proc.returncode == 0:
        # where the stuck worker waited: the stacks (faulthandler's "Thread 0x...") up to the warning
        return ("restarted", seconds, out[out.find("Thread 0x") :]) if RESTARTED in out else ("ok", seconds, "")
    aborted = "return code = -6" in out or "terminate called" in out
    return ("abort" if aborted else "failed"), seconds, out[-3000:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run counts as a hang")
    parser.add_argument("--out", help="write the tally as Markdown to this file")
    args = parser.parse_args(argv)
    tally: dict[str, int] = {"ok": 0, "restarted": 0, "abort": 0, "hang": 0, "failed": 0}
    with tempfile.TemporaryDirectory(prefix="fgdist-stress-") as tmp:
        work = Path(tmp)
        tiny_synthetic(work / "shards")
        for i in range(args.runs):
            outcome, seconds, tail = one_run(work, i, args.epochs, args.timeout)
            tally[outcome] += 1
            counts = " ".join(f"{k}={v}" for k, v in tally.items())
            print(f"run {i + 1}/{args.runs}: {outcome} in {seconds:.0f} s  {counts}", flush=True)
            if tail:
                print(tail, flush=True)
    meta = run_meta()
    lines = [f"{key}: {value}" for key, value in meta.items()] + [""]
    lines += md_head(["runs", *tally]) + [md_row([str(args.runs), *map(str, tally.values())])]
    print("\n".join(lines))
    if args.out:
        write_report(args.out, lines)
    return 0 if tally["ok"] == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
