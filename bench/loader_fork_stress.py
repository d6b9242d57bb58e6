"""Fork loader workers from a threaded rank, many times, and catch any worker that never delivers.

A rank's DataLoader forks its workers while the rank's other threads run: gloo's (one per
process group and device), pyarrow's jemalloc background thread and, on rank 0, MLflow's. A
forked child holds only the forking thread; a lock another thread held at that instant stays
held in the child for ever. This script repeats that instant as often as it can: each rank starts
an asynchronous all-reduce (gloo's threads at work), forks an evaluation loader worker at once,
reads the whole test split through it, waits for the all-reduce, and starts again.

    deepspeed --num_gpus 2 bench/loader_fork_stress.py --shards DIR --loaders 300 [--mlflow]

A worker that delivers nothing for --timeout seconds is a hang: the loader has it print its threads'
Python stacks (fgdist.data.loader.WatchedLoader) and the rank moves on. Every rank prints
its tally; the script exits 1 if any loader hung.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from fgdist.config import DataConfig  # noqa: E402
from fgdist.data.loader import LoaderWorkerTimeoutError, eval_batches, open_data_split  # noqa: E402
from fgdist.training.deepspeed_shm import skip_shm_comm_op, unlink_deepspeed_shm_buffer  # noqa: E402


def read_once(loader) -> bool:
    """Read every batch of `loader`; False if a worker went silent past the loader's timeout (the
    loader has had its workers print their stacks, fgdist.data.loader.WatchedLoader)."""
    try:
        for _ in loader:
            pass
        return True
    except LoaderWorkerTimeoutError as err:
        print(err, flush=True)
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="a shard set (its test split is read)")
    parser.add_argument("--loaders", type=int, default=300, help="loaders (forks) per rank")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a worker may stay silent")
    parser.add_argument("--mlflow", action="store_true", help="rank 0 logs to an MLflow run meanwhile")
    parser.add_argument("--local_rank", type=int, default=0)  # appended by the deepspeed launcher
    args = parser.parse_args(argv)

    skip_shm_comm_op()  # started as the trainer starts its ranks
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    unlink_deepspeed_shm_buffer()
    rank, size = dist.get_rank(), dist.get_world_size()
    if args.mlflow and rank == 0:
        import mlflow

        mlflow.start_run(log_system_metrics=True)
    # no new loader after a stuck worker (data.worker_restarts): a hang is what this counts
    cfg = DataConfig(shards=args.shards, num_workers=1, worker_timeout=args.timeout, worker_restarts=0)
    split = open_data_split(cfg, "test")
    busy = torch.ones(1 << 20)
    hangs, start = 0, time.time()
    for i in range(args.loaders):
        pending = dist.all_reduce(busy, async_op=True)  # gloo's threads work while the worker forks
        loader = eval_batches(split, cfg, 8, rank, size)
        hangs += not read_once(loader)
        pending.wait()
        busy.fill_(1.0)
        if args.mlflow and rank == 0:
            mlflow.log_metric("loaders", i + 1, step=i, synchronous=False)
        if (i + 1) % 50 == 0:
            print(f"rank {rank}: {i + 1}/{args.loaders} loaders, {hangs} hung, {time.time() - start:.0f} s", flush=True)
    if args.mlflow and rank == 0:
        mlflow.end_run()
    print(f"rank {rank} pid {os.getpid()}: {args.loaders} loaders, {hangs} hung", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if hangs else 0


if __name__ == "__main__":
    raise SystemExit(main())
