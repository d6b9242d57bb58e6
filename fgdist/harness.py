"""Running fgdist's parts on this machine without a cluster, for the launcher, the tests and the
benchmarks alike (so that bench/ never imports tests/): a free port for a DeepSpeed master or a
server, a gloo group for a few local ranks, waiting until a local HTTP server answers, and a
manifest of given super-class sizes (what the partition plan needs, without a shard set).
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from fgdist.data.shardset import Manifest, PoolInfo, SuperClassInfo


class ServerNotReadyError(RuntimeError):
    """A local server that exited, or did not answer in time; the message ends with its log."""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the OS picks it): DeepSpeed's default
    master port, 29500, collides when two runs share a machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
