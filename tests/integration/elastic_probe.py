"""Run under DeepSpeed: resume a Trainer from a checkpoint, print the loss of a fixed batch (the
training images, BatchNorm in eval mode, each row on the rank owning its column), then
train on to the configured end. Used by test_faults.py to show that re-cutting the head keeps
the loss."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fgdist.data.loader import EvalStream, collate, deal, shard_urls  # noqa: E402
from fgdist.retrieval.publish import publish_run  # noqa: E402
from fgdist.training.trainer import Trainer  # noqa: E402
from launcher.train import parse_args, run_config  # noqa: E402


def fixed_batch_loss(trainer: Trainer) -> float:
    split = trainer.train_split
    stream = EvalStream(deal(shard_urls(split, split.manifest.shards), 0, 1), trainer.cfg.data)
    batch = collate(list(stream))  # every training image: each rank owns some of them
    lo, hi = trainer.plan.column_range(trainer.rank)
    mine = (batch["instance"] >= lo) & (batch["instance"] < hi)
    model = trainer.engine.module
    model.eval()
    with torch.no_grad():
        out = model(batch["images"][mine])
        parts = trainer.objective(out, batch["super"][mine], batch["fine"][mine], batch["instance"][mine])
    model.train()
    if trainer.objective.pool_group is not None:
        # With a pool each rank's loss is its share of the global batch's means
        # (objectives.Objective._pool_parts): their mean over ranks is the loss.
        total = torch.tensor([float(parts["loss"]), 1.0], dtype=torch.float64)
    else:  # each rank's loss is the mean over its own rows
        total = torch.tensor([float(parts["loss"]) * int(mine.sum()), float(mine.sum())], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1])


if __name__ == "__main__":
    args = parse_args()
    trainer = Trainer(run_config(args), resume=args.resume, publish=publish_run)
    loss = fixed_batch_loss(trainer)
    if trainer.rank == 0:
        print(f"FIXED_BATCH_LOSS {loss:.10f} world_size={trainer.world_size}", flush=True)
    trainer.train()
