"""Shared test helpers: free ports, tiny manifests, and a gloo process group per test."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist

from fgdist.shardset import Manifest, SuperClassInfo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest_with_sizes(sizes: list[int], num_fine: int = 0) -> Manifest:
    supers, begin = [], 0
    for i, n in enumerate(sizes):
        supers.append(SuperClassInfo(i, f"s{i}", begin, begin + n))
        begin += n
    fine_to_super = [i % len(sizes) for i in range(num_fine)]
    return Manifest("train", begin, supers, [f"f{i}" for i in range(num_fine)], fine_to_super, [])


def init_gloo(rank: int, world_size: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
