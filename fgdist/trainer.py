"""The training loop: a DeepSpeed engine (backbone + super/fine heads) beside the partitioned
instance head, one objective module, per-rank WebDataset streams, atomic checkpoints, chunked
distributed evaluation, MLflow from rank 0.

Read `Trainer.train_step` top to bottom for what one step does.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fgdist import checkpoint
from fgdist.collectives import mean_over_ranks, unlink_deepspeed_shm_buffer, world
from fgdist.config import ModelConfig, RunConfig
from fgdist.data import eval_batches, own_column_batches, steps_per_epoch, train_batches
from fgdist.evaluation import evaluate
from fgdist.faults import kill_point
from fgdist.head import InstanceHead
from fgdist.model import (
    EmbeddingNet,
    convert_batchnorm,
    instance_dim,
    instance_features,
    model_for_eval,
    reestimate_batchnorm,
)
from fgdist.objectives import OBJECTIVE_HEADS, Objective
from fgdist.partition import make_plan
from fgdist.shardset import open_split
from fgdist.tracking import Tracker, flatten, resolve_uri


class NonFiniteLossError(FloatingPointError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deepspeed_config(cfg: RunConfig, world_size: int, on_cuda: bool) -> dict:
    """The user's `deepspeed` section, with the batch size and precision fgdist owns."""
    ds = {"steps_per_print": 10**9, "zero_optimization": {"stage": 0}, "bf16": {"enabled": on_cuda}, **cfg.deepspeed}
    micro = ds.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
    if micro != cfg.data.batch_size or ds.setdefault("gradient_accumulation_steps", 1) != 1:
        raise ValueError(
            f"deepspeed.train_micro_batch_size_per_gpu must equal data.batch_size ({cfg.data.batch_size}) and "
            "gradient_accumulation_steps must be 1"
        )
    ds.setdefault("train_batch_size", cfg.data.batch_size * world_size)
    return ds


def built_model_config(cfg: RunConfig) -> ModelConfig:
    """The model section as built: the projection only when a loss term or the evaluation uses it
    (so `base` and `fine` with the combined recipe's flags train exactly the paper's network,
    with no engine parameters that never get a gradient)."""
    used = (
        cfg.objective.name in OBJECTIVE_HEADS["instance"]
        or cfg.model.projection_for_super
        or cfg.eval.features == "projection"
    )
    return cfg.model if used else cfg.model.model_copy(update={"projection": "none"})


def log0(*args) -> None:
    if world()[0] == 0:
        print("[fgdist]", *args, flush=True)


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool | str = False):
        """resume: False, True (the newest complete checkpoint) or a checkpoint folder."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        unlink_deepspeed_shm_buffer()
        self.rank, self.world_size = world()
        self.device = torch.device(get_accelerator().current_device_name())
        self.on_cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.on_cuda else torch.float32
        if not self.on_cuda:
            # CPU ranks share the machine's cores: oversubscribed threads slow every rank down.
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        seed_everything(cfg.seed)

        # Data and the column line.
        self.train_split = open_split(cfg.data.shards, "train")
        self.test_split = open_split(cfg.data.shards, "test")
        manifest = self.train_split.manifest
        self.plan = make_plan(manifest, self.world_size, where=str(self.train_split.path))
        self.steps_per_epoch = steps_per_epoch(manifest.num_instances, self.world_size, cfg.data.batch_size)

        # Model: the engine gets backbone + super/fine heads; the instance head stays outside.
        name = cfg.objective.name
        if name == "fine" and manifest.num_fine == 0:
            raise ValueError(f"objective 'fine' needs fine labels; {self.train_split.path} has none")
        model_cfg = built_model_config(cfg)
        model = EmbeddingNet(
            model_cfg,
            manifest.num_super if name in OBJECTIVE_HEADS["super"] else None,
            manifest.num_fine if name in OBJECTIVE_HEADS["fine"] else None,
        )
        norm = (
            cfg.model.norm
            if cfg.model.norm != "auto"
            else ("global" if cfg.data.routing == "by_superclass" and self.world_size > 1 else "local")
        )
        if norm == "global":
            model = convert_batchnorm(model)
        self.head = None
        if name in OBJECTIVE_HEADS["instance"]:
            self.head = InstanceHead(
                self.plan, self.rank, instance_dim(model_cfg), cfg.seed, cfg.head.update, cfg.head.ema_momentum
            ).to(self.device)
            self.head.build_optimizer(
                cfg.optim, cfg.head.lr_mult, self.steps_per_epoch, cfg.head.lr_schedule, cfg.head.weight_decay
            )
        self.objective = Objective(cfg, self.plan, self.rank, self.head).to(self.device)

        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [m * self.steps_per_epoch for m in cfg.optim.milestones], cfg.optim.gamma
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.world_size, self.on_cuda),
        )

        # Where to start.
        self.ckpt_dir = cfg.run_dir / "checkpoints"
        self.corrupt_skipped = 0  # undecodable samples skipped by this rank (data.on_corrupt=skip)
        self.position = checkpoint.Position(0, 0, 0, self.world_size, None)
        if resume:
            folder = checkpoint.latest(self.ckpt_dir) if resume is True else Path(resume)
            if folder is None or not (folder / "meta.json").is_file():
                raise FileNotFoundError(f"--resume: no checkpoint in {folder or self.ckpt_dir}")
            self.position = checkpoint.load(folder, self.engine, self.head, self.rank)
            log0(
                f"resumed from {folder} at epoch {self.position.epoch} step {self.position.step} (saved on "
                f"{self.position.world_size} rank(s), now {self.world_size})"
            )
            if self.position.world_size != self.world_size and self.position.step:
                # A mid-epoch position means nothing for another cut of the data: redo the epoch.
                log0(f"world size changed: epoch {self.position.epoch} restarts at step 0")
                self.position.global_step -= self.position.step
                self.position.step = 0
            self.position.world_size = self.world_size
        elif self.head is not None and cfg.head.init == "features":
            self.init_head_from_features()  # a fresh start only: a resume has the trained columns

        self.tracker = Tracker(
            self.rank == 0,
            resolve_uri(cfg.tracking.uri),
            cfg.tracking.experiment,
            cfg.tracking.run_name or cfg.name,
            self.position.mlflow_run_id,
            cfg.tracking.system_metrics,
        )
        self.position.mlflow_run_id = self.tracker.run_id
        if self.rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            (cfg.run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
            (cfg.run_dir / "plan.json").write_text(self.plan.to_json())
            if not resume:
                self.tracker.log_params(
                    {
                        **flatten(cfg.model_dump()),
                        "world_size": str(self.world_size),
                        "num_instances": str(manifest.num_instances),
                    }
                )
                self.tracker.set_tags(
                    {"objective": name, "dataset": str(cfg.data.shards), "lambda_I": str(cfg.objective.lambda_I)}
                )
                self.tracker.log_artifact(str(cfg.run_dir / "config.json"))
                self.tracker.log_artifact(str(cfg.run_dir / "plan.json"))
        log0(
            f"{name} on {self.world_size} rank(s), {self.device}, {manifest.num_instances} training images, "
            f"{self.steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs, batch {cfg.data.batch_size}/rank, "
            f"routing {cfg.data.routing}, norm {norm}"
        )

    def init_head_from_features(self) -> None:
        """head.init=features, before the first step of a fresh run: each rank writes its own
        columns from its own images (data.own_column_batches, whatever the routing). BatchNorm is
        re-estimated first (eval.bn_batches) and the pass runs in eval mode, so a column is the
        feature evaluation would compute for its image, independent of batch composition and of
        the number of ranks."""
        self.batchnorm_for_eval()
        model = self.engine.module
        model.eval()
        batches = own_column_batches(self.train_split, self.plan, self.cfg.data, self.cfg.eval.batch_size, self.rank)
        self.head.init_from_features(
            batches, lambda images: instance_features(model(images.to(self.device, self.dtype)))
        )
        model.train()
        log0(f"head.init=features: {self.plan.num_instances} columns set to their images' features")

    # -- one step -----------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["images"].to(self.device, self.dtype, non_blocking=True)
        labels = [batch[k].to(self.device) for k in ("super", "fine", "instance")]
        outputs = self.engine(images)
        parts = self.objective(outputs, *labels)
        self.check_finite(parts)
        self.engine.backward(parts["loss"])
        self.engine.step()  # DeepSpeed averages the engine's gradients over ranks, steps its LR
        if self.head is not None:
            self.head.step(self.world_size)  # the head slice: its own optimizer and schedule
        return {k: v.detach() for k, v in parts.items()}  # this rank's values; averaged when logged

    def check_finite(self, parts: dict[str, torch.Tensor]) -> None:
        """All ranks stop together (a lone rank raising would leave the others in a collective)."""
        bad = torch.tensor([0.0 if torch.isfinite(parts["loss"]).item() else 1.0], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(bad)
        if bad.item():
            where = f"epoch {self.position.epoch} step {self.position.step}"
            raise NonFiniteLossError(
                f"rank {self.rank}: non-finite loss at {where} ({ {k: float(v) for k, v in parts.items()} }); lower "
                "optim.lr or head.lr_mult"
            )

    # -- the loop -----------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg, pos = self.cfg, self.position
        status = "FAILED"
        try:
            while pos.epoch < cfg.optim.epochs:
                self.train_epoch()
                pos.epoch, pos.step = pos.epoch + 1, 0
                last = pos.epoch == cfg.optim.epochs
                evaluate_now = last or (cfg.eval.every_epochs and pos.epoch % cfg.eval.every_epochs == 0)
                if evaluate_now:  # before saving, so a checkpoint holds the statistics its evaluation used
                    self.batchnorm_for_eval()
                if cfg.checkpoint.every_epochs and pos.epoch % cfg.checkpoint.every_epochs == 0:
                    self.save()
                if evaluate_now and not last:
                    self.run_eval()
            metrics = self.run_eval()
            self.write_results(metrics)
            if cfg.eval.pictures and self.rank == 0:
                self.log_pictures()
            status = "FINISHED"
            return metrics
        finally:
            self.tracker.finish(status)

    def train_epoch(self) -> None:
        cfg, pos = self.cfg, self.position
        window_start, window_images = time.time(), 0
        batches = train_batches(
            self.train_split, self.plan, cfg.data, self.rank, pos.epoch, cfg.seed, start_step=pos.step
        )
        for batch in batches:
            parts = self.train_step(batch)
            pos.step += 1
            pos.global_step += 1
            kill_point("step", self.rank, pos.global_step)
            window_images += batch["num_images"] * self.world_size  # images, not rows (data.views)
            self.corrupt_skipped += batch["corrupt_skipped"]
            if (
                cfg.checkpoint.every_steps
                and pos.global_step % cfg.checkpoint.every_steps == 0
                and pos.step < self.steps_per_epoch
            ):
                self.save()
            if pos.step % cfg.tracking.log_every_steps == 0 or pos.step == self.steps_per_epoch:
                elapsed = time.time() - window_start
                metrics = {
                    **{k: float(mean_over_ranks(v)) for k, v in parts.items()},
                    "lr": self.engine.get_lr()[0],
                    "images_per_s": window_images / max(elapsed, 1e-9),
                }
                if self.head is not None:
                    metrics["head_lr"] = self.head.scheduler.get_last_lr()[0]
                if cfg.data.on_corrupt == "skip":  # never silent: the run's total over all ranks
                    metrics["corrupt_skipped"] = float(
                        mean_over_ranks(torch.tensor(float(self.corrupt_skipped))) * self.world_size
                    )
                log0(
                    f"epoch {pos.epoch + 1}/{cfg.optim.epochs} step {pos.step}/{self.steps_per_epoch} "
                    + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                )
                self.tracker.log_metrics(metrics, step=pos.global_step)
                window_start, window_images = time.time(), 0

    def save(self) -> None:
        folder = checkpoint.save(
            self.ckpt_dir,
            self.engine,
            self.head,
            self.plan.to_json(),
            self.position,
            self.rank,
            self.cfg.checkpoint.keep,
        )
        log0(f"checkpoint {folder}")

    def batchnorm_for_eval(self) -> None:
        """BatchNorm statistics for evaluation from eval.bn_batches training batches."""
        cfg = self.cfg
        if cfg.eval.bn_batches:
            # Shuffled routing: every rank draws from all super-classes (by_superclass would not).
            shuffled = cfg.data.model_copy(update={"routing": "shuffled"})
            stream = train_batches(
                self.train_split, self.plan, shuffled, self.rank, epoch=self.position.epoch, seed=cfg.seed
            )
            reestimate_batchnorm(
                self.engine.module, itertools.islice(stream, cfg.eval.bn_batches), self.device, self.dtype
            )

    def run_eval(self) -> dict[str, float]:
        cfg = self.cfg
        batches = eval_batches(self.test_split, cfg.data, cfg.eval.batch_size, self.rank, self.world_size)
        metrics = evaluate(
            model_for_eval(self.engine.module, cfg.eval.features),
            batches,
            self.device,
            self.dtype,
            cfg.eval.recall_ks,
            cfg.eval.query_chunk,
            has_super_head=cfg.objective.name in OBJECTIVE_HEADS["super"],
        )
        log0(f"eval after epoch {self.position.epoch}: " + " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        self.tracker.log_metrics(metrics, step=self.position.global_step)
        return metrics

    def log_pictures(self) -> None:
        """Attention maps and the retrieval grid, on rank 0 once the results are written. A
        failure is reported, not raised: the training run itself has finished."""
        from fgdist.pictures import log_pictures

        try:
            paths = log_pictures(
                model_for_eval(self.engine.module, self.cfg.eval.features),
                self.test_split,
                self.cfg.data,
                self.cfg.run_dir / "pictures",
                self.device,
                self.cfg.eval.picture_queries,
                self.cfg.eval.batch_size,
            )
        except Exception as err:
            print(
                f"[fgdist] WARNING: pictures failed ({type(err).__name__}: {str(err)[:300]}); results are written",
                file=sys.stderr,
                flush=True,
            )
            return
        for path in paths:
            self.tracker.log_artifact(str(path), "pictures")
        log0("pictures " + ", ".join(str(p) for p in paths))

    def write_results(self, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        path = self.cfg.run_dir / "results.json"
        record = {
            "name": self.cfg.name,
            "objective": self.cfg.objective.name,
            "lambda_I": self.cfg.objective.lambda_I,
            "world_size": self.world_size,
            "mlflow_run_id": self.tracker.run_id,
            "metrics": metrics,
        }
        path.write_text(json.dumps(record, indent=1))
        table = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v:.2f} |\n" for k, v in metrics.items())
        (self.cfg.run_dir / "results.md").write_text(table)
        self.tracker.log_artifact(str(path))
        self.tracker.log_artifact(str(self.cfg.run_dir / "results.md"))
