"""Running fgdist's parts on this machine without a cluster, for the launcher, the tests and the
benchmarks alike (so that bench/ never imports tests/): a free port for a DeepSpeed master or a
server, the command that starts local DeepSpeed ranks (torchrun or deepspeed), a gloo group for
a few local ranks, waiting until a local HTTP server answers, a manifest of given super-class
sizes (what the partition plan needs, without a shard set), and a tiny synthetic shard set with
the settings of a tiny 2-rank training run (for the integration tests and bench/stress_loop.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from fgdist.data.shardset import Manifest, PoolInfo, SuperClassInfo

REPO = Path(__file__).resolve().parents[1]

# `launcher/train.py` arguments of a tiny run: a narrow ResNet-18, batches of 8, one loader worker.
TINY_TRAINING = [
    *["--config", str(REPO / "configs" / "synthetic_cpu.json")],
    *["--set", "model.width=8", "--set", "data.batch_size=8", "--set", "data.num_workers=1"],
    *["--set", "tracking.log_every_steps=1", "--set", "tracking.system_metrics=false", "--set", "eval.batch_size=16"],
]


def tiny_synthetic(out, **overrides) -> str:
    """Build a tiny real shard set with the CLI (4 super-classes, 32 training images)."""
    opts = {"num_super": 4, "fine_per_super": 2, "train_per_fine": 4, "test_per_fine": 2, **overrides}
    cmd = [sys.executable, "-m", "shards", "build", "--source", "synthetic", "--out", str(out), "--quiet"]
    for k, v in opts.items():
        cmd += ["--opt", f"{k}={v}"]
    subprocess.run(cmd, check=True, cwd=REPO)
    return str(out)


class ServerNotReadyError(RuntimeError):
    """A local server that exited, or did not answer in time; the message ends with its log."""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the OS picks it): DeepSpeed's default
    master port, 29500, collides when two runs share a machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The launchers that start DeepSpeed ranks on one machine. Each rank is the same DeepSpeed engine
# under both (tests/integration/test_launchers_and_comm.py: the same steps, the same losses);
# torchrun starts them 4-7 s sooner on a 2-core CPU, as the deepspeed runner imports DeepSpeed
# twice (its runner, then its launch module) before a rank starts (bench/RESULTS.md, start times).
LAUNCHERS = ("torchrun", "deepspeed")


def launcher_prefix(launcher: str, ranks: int, port: int) -> list[str]:
    """The command that starts `ranks` ranks of the script after it on this machine, with the
    master on 127.0.0.1:`port`."""
    if launcher == "torchrun":
        return ["torchrun", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port)]
    raise ValueError(f"launcher {launcher!r}: one of {', '.join(LAUNCHERS)}")


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Join a gloo process group of `world_size` local ranks whose master listens on `port`."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def wait_for_http(url: str, proc, log: Path, timeout_s: float = 120) -> None:
    """Poll `url` until it answers 200; ServerNotReadyError (with the end of `log`) if the server
    process `proc` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerNotReadyError(f"{proc.args[:4]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet
        time.sleep(0.2)
    raise ServerNotReadyError(f"{url} did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


def manifest_with_sizes(sizes: list[int], num_fine: int = 0, pool: int = 0) -> Manifest:
    """A training manifest whose super-class i holds sizes[i] instances (contiguous ids, in
    order), with `num_fine` fine classes spread round-robin over the super-classes and `pool`
    unlabeled images after them."""
    supers, begin = [], 0
    for i, n in enumerate(sizes):
        supers.append(SuperClassInfo(i, f"s{i}", begin, begin + n))
        begin += n
    fine_to_super = [i % len(sizes) for i in range(num_fine)]
    pool_info = PoolInfo(begin, begin + pool, pool) if pool else None
    fine_names = [f"f{i}" for i in range(num_fine)]
    return Manifest("train", begin + pool, supers, fine_names, fine_to_super, [], pool=pool_info)
