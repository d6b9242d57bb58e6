"""How long a training run takes from its launch to its first step, and where that time goes.

    python bench/start_time.py --shards data/synthetic --runs first warm warm \
        [--launcher deepspeed|torchrun|python] [--config configs/synthetic_cpu.json] [--out bench/results/start_time.md]

Each run launches `deepspeed --num_gpus 2 launcher/train.py --config CONFIG` (or the same two
ranks under torchrun, or one plain `python launcher/train.py` process) as a user would, waits
for rank 0's start line (logged after the first step, fgdist/training/start_time.py), then stops
the run. The parts come from that line; the launcher's share is the time from the launch to rank
0's process creation (as psutil reports it, derived from the boot time: good to about a second,
so it can even read slightly negative).

A `first` run starts as on a fresh machine: an empty TORCH_EXTENSIONS_DIR (where DeepSpeed keeps
the ops it compiles) and a new MLflow store; a `warm` run reuses those of the run before it.
The load average before each run is in the table: the machine may be shared. So is the CPU
time the run's processes (the launcher's and the ranks') had used when the start line came,
which a busy machine stretches less than the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
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
from fgdist.harness import LAUNCHERS  # noqa: E402

START_LINE = re.compile(r"^(\S+ \S+) \[fgdist rank 0\] INFO: started in ([\d.]+) s: (.*)$")
SHM_BUILT = "deepspeed_shm_comm_op built successfully"
PARTS = ("imports", "distributed", "data", "model", "engine", "restore", "tracking", "first batch", "first step")


def parse_start_line(line: str) -> tuple[float, float, dict[str, float]] | None:
    """(the line's time as a Unix time, the total, the parts) of rank 0's start line, else None."""
    m = START_LINE.match(line.strip())
    if not m:
        return None
    when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    parts = {}
    for item in m.group(3).split(", "):
        name, _, seconds = item.rpartition(" ")
        parts[name] = float(seconds)
    return when, float(m.group(2)), parts


def train_command(launcher: str, config: str, sets: list[str]) -> list[str]:
    args = ["--config", config, *(a for s in sets for a in ("--set", s))]
    if launcher == "python":
        return [sys.executable, str(ROOT / "launcher" / "train.py"), *args]
    return ranks_command(2, ROOT / "launcher" / "train.py", args, launcher)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants so far (live ones: the ranks
    are still running when this is read)."""
    top = psutil.Process(pid)
    total = 0.0
    for p in [top, *top.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def stop(proc: subprocess.Popen) -> None:
    """End the launched run: its whole process group (the launcher and its ranks)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def one_start(cmd: list[str], env: dict, log_path: Path, timeout_s: float) -> dict:
    """Launch, read the output until rank 0's start line, stop the run; the measured parts."""
    load = os.getloadavg()[0]
    launched = time.time()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        found, shm_built = None, False
        try:
            for line in proc.stdout:
                log.write(line)
                shm_built = shm_built or SHM_BUILT in line
                found = parse_start_line(line)
                if found or time.time() - launched > timeout_s:
                    break
            cpu = cpu_seconds(proc.pid)
        finally:
            stop(proc)
    if found is None:
        raise RuntimeError(f"no start line within {timeout_s:.0f} s (or the run ended); its output: {log_path}")
    when, total, parts = found
    return {
        "load": load,
        "to_first_step": when - launched,
        "launcher": when - total - launched,
        "parts": parts,
        "shm_built": shm_built,
        "cpu": cpu,
    }


def table(rows: list[tuple[str, dict]]) -> list[str]:
    lines = md_head(["run", "load before", "launch to first step", "CPU s", "launcher", *PARTS, "shm op built"])
    for kind, r in rows:
        cells = [kind, f"{r['load']:.2f}", f"**{r['to_first_step']:.1f}**", f"{r['cpu']:.1f}", f"{r['launcher']:.1f}"]
        cells += [f"{r['parts'].get(p, 0.0):.1f}" for p in PARTS]
        lines.append(md_row([*cells, "yes" if r["shm_built"] else "no"]))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="the shard set (data.shards)")
    p.add_argument("--config", default="configs/synthetic_cpu.json")
    p.add_argument("--runs", nargs="+", choices=["first", "warm"], default=["first", "warm", "warm"])
    p.add_argument("--launcher", choices=[*LAUNCHERS, "python"], default="deepspeed")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for a run's first step")
    p.add_argument("--out", help="write the Markdown table here")
    args = p.parse_args()
    meta = run_meta()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fgdist-start-") as tmp:
        state = Path(tmp) / "state0"
        for i, kind in enumerate(args.runs):
            if kind == "first":  # a fresh machine: nothing compiled, no MLflow store yet
                state = Path(tmp) / f"state{i}"
                shutil.rmtree(state, ignore_errors=True)
            state.mkdir(exist_ok=True)
            env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(state / "torch_extensions")}
            sets = [
                f"data.shards={Path(args.shards).resolve()}",
                f"output_dir={state / 'runs'}",
                f"tracking.uri=sqlite:///{state / 'mlflow.db'}",
                f"name=start{i}",
            ]
            cmd = train_command(args.launcher, args.config, sets)
            r = one_start(cmd, env, Path(tmp) / f"run{i}.log", args.timeout)
            rows.append((kind, r))
            print(f"{kind}: {r['to_first_step']:.1f} s to the first step ({r})", flush=True)
    lines = [
        f"`{meta['command']}`, {meta['date']}, commit {meta['commit']}{' (dirty)' if meta['dirty'] else ''}, "
        f"{os.cpu_count()} cores, {args.launcher} launcher",
        "",
        *table(rows),
    ]
    print("\n".join(lines))
    if args.out:
        write_report(args.out, lines)


if __name__ == "__main__":
    main()
