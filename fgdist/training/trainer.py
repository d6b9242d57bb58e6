"""The training loop: a DeepSpeed engine (backbone + super/fine heads) beside the partitioned
instance head, one objective module, per-rank WebDataset streams, atomic checkpoints, chunked
distributed evaluation, MLflow from rank 0.

`Trainer.__init__` runs four named steps (start the processes, build, restore, start
tracking); `Trainer.train` is the epoch loop and `Trainer.train_step` one step, top to bottom
(docs/DESIGN.md, "How a step runs"). When to save, evaluate and log are the functions below the
imports. At the end, rank 0 hands the finished model (`FinishedRun`) to the `publish` step it was
given (fgdist.retrieval.publish.publish_run from the launcher): training imports neither export
nor pictures, which sit above it (fgdist.LAYERS). The DeepSpeed config policy:
fgdist.training.deepspeed_config.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from fgdist.collectives import gather_rows, world
from fgdist.config import ModelConfig, OptimConfig, RunConfig
from fgdist.data.loader import eval_batches, open_data_split, own_column_batches, steps_per_epoch, train_batches
from fgdist.data.partition import make_plan
from fgdist.data.shardset import SplitDir, split_fingerprint
from fgdist.faults import kill_point, poison_loss
from fgdist.log import setup as setup_logging
from fgdist.objective_table import OBJECTIVES
from fgdist.training import checkpoint, per_query
from fgdist.training.deepspeed_config import deepspeed_config, precision, zero_stage
from fgdist.training.deepspeed_shm import skip_shm_comm_op, unlink_deepspeed_shm_buffer
from fgdist.training.evaluation import evaluate
from fgdist.training.head import InstanceHead
from fgdist.training.model import (
    EmbeddingNet,
    batchnorm_layers,
    convert_batchnorm,
    instance_features,
    model_for_eval,
    reestimate_batchnorm,
)
from fgdist.training.objectives import Objective, instance_ce_chance, softmax_group_sizes
from fgdist.training.start_time import StartClock
from fgdist.training.sync_debug import SyncCounter
from fgdist.training.tracking import Tracker, flatten, resolve_uri

log = logging.getLogger("fgdist.training.trainer")


class FinishedRun(NamedTuple):
    """What the trainer hands its publishing step on rank 0 once the results are written."""

    model: nn.Module  # the engine's module: weights and BatchNorm statistics of the last evaluation
    cfg: RunConfig
    tracker: Tracker
    test_split: SplitDir
    device: torch.device


Publish = Callable[[FinishedRun], None]


class NonFiniteLossError(FloatingPointError):
    pass


# -- when to save, evaluate and log (epoch: epochs done; step: steps done in the epoch) ----------
def evaluates_after_epoch(cfg: RunConfig, epoch: int) -> bool:
    """After the last epoch, and every eval.every_epochs epochs (0: only after the last)."""
    every = cfg.eval.every_epochs
    return epoch == cfg.optim.epochs or (every > 0 and epoch % every == 0)


def saves_after_epoch(cfg: RunConfig, epoch: int) -> bool:
    """After the last epoch, and every checkpoint.every_epochs epochs (0: only after the last):
    the run folder's newest checkpoint then holds the final weights, which export, embed and
    pictures read from it, and which the MLflow model holds."""
    every = cfg.checkpoint.every_epochs
    return epoch == cfg.optim.epochs or (every > 0 and epoch % every == 0)


def saves_after_step(cfg: RunConfig, global_step: int, step: int, steps_per_epoch: int) -> bool:
    """Every checkpoint.every_steps global steps (0: never), except at an epoch's last step:
    the position there is the next epoch's start, which the epoch checkpoint covers."""
    every = cfg.checkpoint.every_steps
    return every > 0 and global_step % every == 0 and step < steps_per_epoch


def logs_after_step(cfg: RunConfig, step: int, steps_per_epoch: int) -> bool:
    """Every tracking.log_every_steps steps of an epoch, and at its last step."""
    return step % cfg.tracking.log_every_steps == 0 or step == steps_per_epoch


def batchnorm_mode(cfg: RunConfig, world_size: int) -> str:
    """model.norm, with `auto` resolved: statistics over all ranks where a rank's batch holds
    only its own super-classes (by_superclass routing on more than one rank)."""
    if cfg.model.norm != "auto":
        return cfg.model.norm
    return "global" if cfg.data.routing == "by_superclass" and world_size > 1 else "local"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parameter_groups(model: EmbeddingNet, optim: OptimConfig) -> list[dict]:
    """The engine optimizer's parameter groups: one, or with optim.backbone_lr_mult != 1 the heads
    (and projection) at optim.lr first, so the logged `lr` stays theirs, then the backbone at
    lr x backbone_lr_mult. The LR schedule scales both. A run's checkpoints hold its group count,
    so the default keeps the single group older checkpoints were saved with."""
    if optim.backbone_lr_mult == 1.0:
        return [{"params": list(model.parameters())}]
    backbone = {id(p) for p in model.backbone.parameters()}
    return [
        {"params": [p for p in model.parameters() if id(p) not in backbone]},
        {"params": list(model.backbone.parameters()), "lr": optim.lr * optim.backbone_lr_mult},
    ]


def built_model_config(cfg: RunConfig) -> ModelConfig:
    """The model section as built: the projection only when a loss term or the evaluation uses it
    (so `base` and `fine` with the combined recipe's flags train exactly the paper's network,
    with no engine parameters that never get a gradient)."""
    used = (
        OBJECTIVES[cfg.objective.name].instance is not None
        or cfg.model.projection_for_super
        or cfg.eval.features == "projection"
    )
    return cfg.model if used else cfg.model.model_copy(update={"projection": "none"})


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool | str = False, publish: Publish | None = None):
        """resume: False, True (the newest complete checkpoint) or a checkpoint folder. publish: what
        rank 0 does with the finished model (fgdist.retrieval.publish.publish_run: the MLflow model
        and the pictures); None publishes nothing."""
        self.cfg = cfg
        self.publish = publish
        self.spec = OBJECTIVES[cfg.objective.name]
        self.start_clock = StartClock()  # logs where the start went after the first step
        self._start_processes()
        self._build()
        self._restore(resume)
        self.start_clock.mark("restore")
        self._start_tracking(resumed=bool(resume))
        self.start_clock.mark("tracking")
        pool = self.train_split.manifest.num_unlabeled
        log.info(
            f"{self.spec.name} on {self.world_size} rank(s), {self.device}, {self.num_instances} training images"
            + (f" ({pool} unlabeled, in the pool: lambda_U={cfg.objective.lambda_U})" if pool else "")
            + ", "
            f"{self.steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs, batch {cfg.data.batch_size}/rank, "
            f"routing {cfg.data.routing}, norm {batchnorm_mode(cfg, self.world_size)}"
        )

    # -- setting up ---------------------------------------------------------------------
    def _start_processes(self) -> None:
        """The process group, this rank's logging, device, precision and threads."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.start_clock.mark("imports")
        # This node's device from the local rank (every launcher sets LOCAL_RANK), before the
        # process group starts: NCCL binds a process to the current device. The global rank
        # (RANK) orders the column line, the data and the logging.
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
        skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        unlink_deepspeed_shm_buffer()
        self.start_clock.mark("distributed")
        self.rank, self.world_size = world()
        setup_logging(self.rank)
        self.device = torch.device(get_accelerator().current_device_name())
        self.on_cuda = self.device.type == "cuda"
        self.ds_config = deepspeed_config(self.cfg, self.world_size, self.on_cuda)
        self.dtype = precision(self.ds_config)
        if not self.on_cuda:
            # CPU ranks share the machine's cores: oversubscribed threads slow every rank down.
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        seed_everything(self.cfg.seed)

    def _build(self) -> None:
        """Data and the column line, then the model: the engine gets backbone + super/fine heads;
        the instance head stays outside it (docs/DESIGN.md, "The column line")."""
        import deepspeed

        cfg, spec = self.cfg, self.spec
        self.train_split = open_data_split(cfg.data, "train")
        self.test_split = open_data_split(cfg.data, "test")
        manifest = self.train_split.manifest
        self.num_instances = manifest.num_instances
        self.plan = make_plan(manifest, self.world_size, where=str(self.train_split.path))
        self.steps_per_epoch = steps_per_epoch(manifest.num_instances, self.world_size, cfg.data.batch_size)
        self.start_clock.mark("data")

        if spec.fine_head and manifest.num_fine == 0:
            raise ValueError(f"objective {spec.name!r} needs fine labels; {self.train_split.path} has none")
        model_cfg = built_model_config(cfg)
        model = EmbeddingNet(
            model_cfg,
            manifest.num_super if spec.super_head else None,
            manifest.num_fine if spec.fine_head else None,
        )
        self.has_batchnorm = bool(batchnorm_layers(model))
        if not self.has_batchnorm:
            log.info(f"{model_cfg.arch} has no BatchNorm: model.norm and eval.bn_batches do not apply")
        elif batchnorm_mode(cfg, self.world_size) == "global":
            model = convert_batchnorm(model)
        self.head = None
        if spec.instance is not None:
            self.head = InstanceHead.for_run(
                self.plan,
                self.rank,
                model.instance_dim,
                cfg.seed,
                cfg.head,
                cfg.optim,
                self.steps_per_epoch,
                self.device,
            )
        self.objective = Objective(cfg, self.plan, self.rank, self.head).to(self.device)

        optimizer = torch.optim.SGD(
            parameter_groups(model, cfg.optim),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [m * self.steps_per_epoch for m in cfg.optim.milestones], cfg.optim.gamma
        )
        self.start_clock.mark("model")
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
        )
        # Per-step health, kept on the device and read on logging steps (read_step_state): this
        # rank's first global step with a non-finite loss (-1: none yet).
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=self.device)
        self.sync_counter = SyncCounter(self.device)
        self.start_clock.mark("engine")

    def _restore(self, resume: bool | str) -> None:
        """Where to start: step 0, or a checkpoint's position (re-cut to this world size)."""
        self.ckpt_dir = self.cfg.run_dir / "checkpoints"
        self.corrupt_skipped = 0  # undecodable samples skipped by this rank (data.on_corrupt=skip)
        self.position = checkpoint.Position(0, 0, 0, self.world_size, None)
        if not resume:
            if self.head is not None and self.cfg.head.init == "features":
                self.init_head_from_features()  # a fresh start only: a resume has the trained columns
            return
        folder = checkpoint.latest(self.ckpt_dir) if resume is True else Path(resume)
        if folder is None or not (folder / "meta.json").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {folder or self.ckpt_dir}")
        saved = checkpoint.read_position(folder)
        if zero_stage(self.ds_config) and saved.world_size != self.world_size:
            raise ValueError(
                f"--resume {folder}: saved on {saved.world_size} rank(s) with ZeRO stage {zero_stage(self.ds_config)}, "
                f"whose optimizer state is cut per rank; resume it on {saved.world_size} rank(s)"
            )
        self.position = checkpoint.load(folder, self.engine, self.head, self.rank)
        log.info(
            f"resumed from {folder} at epoch {self.position.epoch} step {self.position.step} (saved on "
            f"{self.position.world_size} rank(s), now {self.world_size})"
        )
        if self.position.continue_on(self.world_size):
            log.info(f"world size changed: epoch {self.position.epoch} restarts at step 0")

    def _start_tracking(self, resumed: bool) -> None:
        """MLflow from rank 0 (a resumed run continues its MLflow run); the run folder's config
        and plan. Params and tags are logged once, by the run's first start."""
        cfg = self.cfg
        self.tracker = Tracker(
            self.rank == 0,
            resolve_uri(cfg.tracking.uri),
            cfg.tracking.experiment,
            cfg.tracking.run_name or cfg.name,
            self.position.mlflow_run_id,
            cfg.tracking.system_metrics,
        )
        self.position.mlflow_run_id = self.tracker.run_id
        if self.rank != 0:
            return
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
        (cfg.run_dir / "plan.json").write_text(self.plan.to_json())
        if resumed:
            return
        params = {
            **flatten(cfg.model_dump()),
            "world_size": str(self.world_size),
            "num_instances": str(self.num_instances),
            "num_unlabeled": str(self.train_split.manifest.num_unlabeled),  # the pool's size
        }
        if self.spec.instance is not None:
            # What the logged instance_ce is at chance (fgdist-compare: the epoch it leaves it).
            chance = instance_ce_chance(softmax_group_sizes(self.plan, self.spec.dense))
            params["instance_ce_chance"] = repr(chance)
        if self.plan.pool_range:  # pool_ce at chance: a uniform softmax over the pool's columns
            params["pool_ce_chance"] = repr(instance_ce_chance([self.plan.pool_range[1] - self.plan.pool_range[0]]))
        self.tracker.log_params(params)
        self.tracker.set_tags(
            {"objective": self.spec.name, "dataset": str(cfg.data.shards), "lambda_I": str(cfg.objective.lambda_I)}
        )
        self.tracker.log_artifact(str(cfg.run_dir / "config.json"))
        self.tracker.log_artifact(str(cfg.run_dir / "plan.json"))

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
        log.info(f"head.init=features: {self.plan.num_instances} columns set to their images' features")

    # -- one step -----------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["images"].to(self.device, self.dtype, non_blocking=True)
        labels = [batch[k].to(self.device) for k in ("super", "fine", "instance")]
        outputs = self.engine(images)
        self.objective.set_progress(self.position.epochs_done(self.steps_per_epoch) / self.cfg.optim.epochs)
        parts = self.objective(outputs, *labels)
        parts["loss"] = poison_loss(parts["loss"], self.rank, self.position.global_step + 1)
        self.watch_finite(parts["loss"], self.position.global_step + 1)
        self.engine.backward(parts["loss"])
        self.engine.step()  # DeepSpeed averages the engine's gradients over ranks, steps its LR
        if self.head is not None:
            self.head.step(self.world_size)  # the head slice: its own optimizer and schedule
        return {k: v.detach() for k, v in parts.items()}  # this rank's values; averaged when logged

    def watch_finite(self, loss: torch.Tensor, global_step: int) -> None:
        """Remember the first step with a non-finite loss, on the device: no host sync here. The
        flag is read, with every rank's, on the next logging or saving step (read_step_state)."""
        bad = ~torch.isfinite(loss.detach()) & (self.first_nonfinite < 0)
        self.first_nonfinite = torch.where(bad, global_step, self.first_nonfinite)

    def read_step_state(self, parts: dict[str, torch.Tensor]) -> dict[str, float]:
        """The one collective and host read of a logging (or saving) step: every rank's loss
        parts, first non-finite step, misrouted rows and skipped samples, gathered in one row per
        rank. Raises on every rank alike when any rank saw a non-finite loss or a misrouted row
        (a lone rank raising would leave the others waiting in a collective). Returns the loss
        parts averaged over ranks and the run's skipped samples over all ranks."""
        misrouted = self.objective.instance.misrouted if self.objective.instance is not None else 0
        health = {
            "first_nonfinite": self.first_nonfinite.double(),
            "misrouted": torch.as_tensor(misrouted, device=self.device).double(),
            "corrupt_skipped": torch.tensor(float(self.corrupt_skipped), dtype=torch.float64, device=self.device),
        }
        named = {**{k: v.detach().double() for k, v in parts.items()}, **health}
        rows = [dict(zip(named, values)) for values in gather_rows(torch.stack(list(named.values()))[None]).tolist()]
        first = {r: int(row["first_nonfinite"]) for r, row in enumerate(rows) if row["first_nonfinite"] >= 0}
        if first:
            pos = self.position
            raise NonFiniteLossError(
                f"rank {self.rank}: non-finite loss on rank(s) {sorted(first)}, first at global step "
                f"{min(first.values())}; stopped at global step {pos.global_step} (epoch {pos.epoch + 1} step "
                f"{pos.step}); lower optim.lr or head.lr_mult"
            )
        if self.objective.instance is not None:
            self.objective.instance.check_routing(int(sum(row["misrouted"] for row in rows)))
        averaged = {k: sum(row[k] for row in rows) / len(rows) for k in parts}
        return {**averaged, "corrupt_skipped": sum(row["corrupt_skipped"] for row in rows)}

    # -- the loop -----------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg, pos = self.cfg, self.position
        status = "FAILED"
        try:
            while pos.epoch < cfg.optim.epochs:
                self.train_epoch()
                pos.epoch, pos.step = pos.epoch + 1, 0
                evaluate_now = evaluates_after_epoch(cfg, pos.epoch)
                if evaluate_now:  # before saving, so a checkpoint holds the statistics its evaluation used
                    self.batchnorm_for_eval()
                if saves_after_epoch(cfg, pos.epoch):
                    self.save()
                if evaluate_now and pos.epoch < cfg.optim.epochs:  # the last evaluation follows the loop
                    self.run_eval()
            self.sync_counter.report()
            metrics = self.run_eval()
            self.write_results(metrics)
            if self.rank == 0 and self.publish is not None:
                self.publish(FinishedRun(self.engine.module, cfg, self.tracker, self.test_split, self.device))
            status = "FINISHED"
            return metrics
        finally:
            self.tracker.finish(status)

    def train_epoch(self) -> None:
        cfg, pos = self.cfg, self.position
        window_start, window_images = time.time(), 0  # images/s over the steps since the last log line
        batches = train_batches(
            self.train_split, self.plan, cfg.data, self.rank, pos.epoch, cfg.seed, start_step=pos.step
        )
        for batch in batches:
            self.start_clock.mark("first batch")
            with self.sync_counter.step():
                parts = self.train_step(batch)
            self.start_clock.finish("first step")
            pos.step += 1
            pos.global_step += 1
            kill_point("step", self.rank, pos.global_step)
            window_images += batch["num_images"] * self.world_size  # images, not rows (data.views)
            self.corrupt_skipped += batch["corrupt_skipped"]
            saves = saves_after_step(cfg, pos.global_step, pos.step, self.steps_per_epoch)
            logs = logs_after_step(cfg, pos.step, self.steps_per_epoch)
            if not (saves or logs):
                continue  # no host sync on this step (docs/DESIGN.md, "How a step runs")
            state = self.read_step_state(parts)  # before saving: a non-finite state is never checkpointed
            if saves:
                self.save()
            if logs:
                metrics = self.step_metrics(state, window_images / max(time.time() - window_start, 1e-9))
                log.info(
                    f"epoch {pos.epoch + 1}/{cfg.optim.epochs} step {pos.step}/{self.steps_per_epoch} "
                    + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                )
                epoch = pos.epochs_done(self.steps_per_epoch)  # beside the step metrics
                self.tracker.log_metrics({**metrics, "epoch": epoch}, step=pos.global_step)
                window_start, window_images = time.time(), 0

    def step_metrics(self, state: dict[str, float], images_per_s: float) -> dict[str, float]:
        """The loss parts averaged over ranks (read_step_state), the learning rates, the speed."""
        skipped = state.pop("corrupt_skipped")
        lrs = self.engine.get_lr()
        metrics = {**state, "lr": lrs[0], "images_per_s": images_per_s}
        if len(lrs) > 1:  # optim.backbone_lr_mult: the backbone's group (parameter_groups)
            metrics["backbone_lr"] = lrs[1]
        if self.head is not None:
            metrics["head_lr"] = self.head.scheduler.get_last_lr()[0]
        if self.cfg.objective.lambda_I_schedule != "constant" and self.spec.lambda_weighted:
            metrics["lambda_I"] = self.objective.weights["instance_ce"]  # the last step's
        if self.cfg.data.on_corrupt == "skip":  # never silent: the run's total over all ranks
            metrics["corrupt_skipped"] = skipped
        metrics.update(self.sync_counter.take())  # FGDIST_SYNC_DEBUG=warn on CUDA: syncs_per_step
        return metrics

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
        log.info(f"checkpoint {folder}")

    def batchnorm_for_eval(self) -> None:
        """BatchNorm statistics for evaluation from eval.bn_batches training batches (nothing to do
        for a backbone without BatchNorm, which _build logged)."""
        cfg = self.cfg
        if cfg.eval.bn_batches and self.has_batchnorm:
            # Shuffled routing: every rank draws from all super-classes (by_superclass would not).
            shuffled = cfg.data.model_copy(update={"routing": "shuffled"})
            stream = train_batches(
                self.train_split, self.plan, shuffled, self.rank, epoch=self.position.epoch, seed=cfg.seed
            )
            reestimate_batchnorm(
                self.engine.module, itertools.islice(stream, cfg.eval.bn_batches), self.device, self.dtype
            )
            stream.close()  # shut its DataLoader workers down now, not whenever the GC gets to them

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
            has_super_head=self.spec.super_head,
            per_query_file=cfg.run_dir / per_query.FILE,
            test_set=split_fingerprint(self.test_split),
        )
        log.info(f"eval after epoch {self.position.epoch}: " + " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        self.tracker.log_metrics(metrics, step=self.position.global_step)
        return metrics

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
        self.tracker.log_artifact(str(self.cfg.run_dir / per_query.FILE))  # the last evaluation's
