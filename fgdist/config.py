"""The run configuration: one JSON file, validated by a typed schema.

Unknown keys and wrong types are errors that name the key (`optim.lr: ...`). Command-line
overrides (`--set optim.lr=0.05`) are applied to the raw JSON before validation, so they are
checked the same way. Defaults are the paper's CIFAR-100 recipe, scaled by the config files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fgdist.objective_table import OBJECTIVE_NAMES


class ConfigError(ValueError):
    pass


class Section(BaseModel):
    # strict: "0.1" is not a number; extra="forbid": a misspelt key is an error, not a no-op.
    model_config = ConfigDict(extra="forbid", strict=True)


class DataConfig(Section):
    shards: str = "data/synthetic"  # the shard set root (with train/ and test/)
    # Read the tars from a URL: "http(s)://host/fmnist" (read with retries, fgdist/data/remote.py) or
    # anything else webdataset opens ("pipe:gsutil cat gs://bucket/fmnist"), the file's path appended
    # ("/train/train-000000.tar"). The manifests and indexes are read from `shards`, fetched from the URL into it
    # when missing. A shared file system needs nothing: point `shards` at it.
    shards_url: str | None = None
    # an HTTP read that fails is retried from the byte it reached for this many seconds without
    # progress, then the run stops with an error naming the URL (0: no retry)
    url_retry_seconds: float = Field(60.0, ge=0.0)
    routing: Literal["by_superclass", "shuffled"] = "by_superclass"
    batch_size: int = Field(64, ge=1)  # per rank
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=1)
    # crop_flip: the paper's CIFAR recipe; resized_crop_flip: the ImageNet recipe; strong
    # (fgdist/data/augment.py): colour images get a random resized crop (crop_scale), flip, colour
    # jitter and random grayscale, single-channel images a random resized crop, a small affine
    # and random erasing. Evaluation (every mode) resizes the shorter side to image_size (to
    # `resize` for resized_crop_flip) and center-crops image_size (fgdist/data/loader.py eval_side).
    augment: Literal["crop_flip", "resized_crop_flip", "strong", "none"] = "crop_flip"
    image_size: int = Field(32, ge=8)  # the crop fed to the network
    padding: int = Field(4, ge=0)  # crop_flip: zero padding before the random crop (CIFAR: 32 from 40)
    resize: int = Field(256, ge=8)  # resized_crop_flip: evaluation resizes the shorter side to this
    crop_scale: list[float] = [0.2, 1.0]  # strong: [min, max] fraction of the image area a crop covers
    # strong, colour images: false drops colour jitter and grayscale (keep it for data whose labels
    # are colours, like the synthetic patches)
    colour: bool = True
    # Independently augmented views of each image in the same batch, with the same labels and
    # instance id; every loss term sees all of them. A rank's batch stays batch_size IMAGES, so a
    # step has views * batch_size rows (images/s counts images, not rows).
    views: int = Field(1, ge=1)
    # Input normalization (3 values each). None: the backbone's, filled in when the run config is
    # read: timm's pretrained config for a timm model, ImageNet's otherwise (fgdist/backbones.py).
    mean: list[float] | None = None
    std: list[float] | None = None
    on_corrupt: Literal["fail", "skip"] = "fail"
    # seconds a DataLoader worker may take for one batch before its loader is replaced, the workers
    # printing their stacks first (0: wait forever); after worker_restarts replacements in one
    # epoch's stream, the rank fails. The other ranks wait meanwhile: keep the timeout well under
    # the process group's (30 minutes).
    worker_timeout: float = Field(600.0, ge=0.0)
    worker_restarts: int = Field(2, ge=0)

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or not 0.0 < value[0] <= value[1] <= 1.0:
            raise ValueError(f"must be [min, max] with 0 < min <= max <= 1, got {value}")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: list[float] | None, info) -> list[float] | None:
        if value is not None and (len(value) != 3 or (info.field_name == "std" and min(value) <= 0)):
            raise ValueError(
                f"must be 3 values, one per RGB channel{' (positive)' if info.field_name == 'std' else ''}, got {value}"
            )
        return value


class ModelConfig(Section):
    # resnet18, any torchvision classification model (resnet50, convnext_tiny, vit_b_16, ...) or
    # timm:<name> (pip install 'fgdist[timm]'), built without its classifier (fgdist/backbones.py)
    arch: str = "resnet18"
    kwargs: dict[str, Any] = {}  # passed to the model's constructor, e.g. {"img_size": 32} for a timm ViT
    # ResNets (torchvision's resnet*, wide_resnet*, resnext*) only. cifar: 3x3 stride-1 conv, no
    # max-pool; imagenet: the network's own stem. None: cifar for resnet18 (the CPU configs'), the
    # network's own otherwise.
    stem: Literal["cifar", "imagenet"] | None = None
    # resnet18 only: first-stage channels, d = 8 * width; 64 (the default) is torchvision's ResNet-18
    width: int | None = Field(None, ge=4)
    # BatchNorm across ranks: per-rank batches under by_superclass routing hold few
    # super-classes, so local statistics would be per-super-class. auto = global when routing is
    # by_superclass and there is more than one rank. Models without BatchNorm ignore it.
    norm: Literal["auto", "global", "local"] = "auto"
    # a local state dict file (torchvision, timm or safetensors), or a tag read from the local
    # cache: torchvision:<Weights enum>, e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1, or
    # timm:<pretrained tag>, e.g. timm:c3_in1k
    pretrained: str | None = None
    download: bool = False  # true: fetch a pretrained tag missing from the local cache (needs the network)
    # mlp: a 2-layer MLP (d -> d -> projection_dim) after f(x) whose output feeds the instance
    # term (and its head is projection_dim wide); the super-class head too if projection_for_super.
    projection: Literal["none", "mlp"] = "none"
    projection_dim: int = Field(128, ge=1)
    projection_for_super: bool = False

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: str) -> str:
        from fgdist.backbones import check_arch

        return check_arch(value)

    @model_validator(mode="after")
    def _fits_arch(self):
        """width and stem resolved for the arch they apply to, refused for the others."""
        from fgdist.backbones import DEFAULT_ARCH, STANDARD_WIDTH, TIMM, TORCHVISION, is_timm, is_torchvision_resnet

        if self.arch == DEFAULT_ARCH:
            self.width = STANDARD_WIDTH if self.width is None else self.width
        elif self.width is not None:
            raise ValueError(
                f"model.width is for arch 'resnet18' only (the narrow ResNet-18); remove it for {self.arch!r}"
            )
        if self.stem == "cifar" and not is_torchvision_resnet(self.arch):
            raise ValueError(f"model.stem='cifar' is for torchvision ResNets only; remove it for {self.arch!r}")
        if self.stem is None and is_torchvision_resnet(self.arch):
            self.stem = "cifar" if self.arch == DEFAULT_ARCH else "imagenet"
        if self.pretrained and self.arch == DEFAULT_ARCH and self.width != STANDARD_WIDTH:
            raise ValueError(f"model.pretrained needs model.width={STANDARD_WIDTH} (got {self.width})")
        tag = self.pretrained or ""
        if tag.startswith(TIMM) and not is_timm(self.arch):
            raise ValueError(f"model.pretrained={tag!r} is a timm tag: it needs model.arch='timm:<name>'")
        if tag.startswith(TORCHVISION) and is_timm(self.arch):
            raise ValueError(f"model.pretrained={tag!r} is a torchvision tag: it needs a torchvision model.arch")
        if self.download and not tag.startswith((TIMM, TORCHVISION)):
            raise ValueError(
                "model.download fetches a model.pretrained tag (torchvision:... or timm:...); there is none"
            )
        return self


class ObjectiveConfig(Section):
    name: Literal[OBJECTIVE_NAMES] = "base_indi_eff"  # fgdist/objective_table.py
    lambda_I: float = Field(1.0, ge=0.0)  # weight of the instance term where it is added (base_indi, base_indi_eff)
    # cosine: lambda_I fades to 0 over the run, lambda_I * (1 + cos(pi * t)) / 2 at the fraction t
    # of training done. The instance term's lead in fine R@1 peaks early and fades while its loss
    # memorises (bench/RESULTS.md, issue 11); constant is the paper's.
    lambda_I_schedule: Literal["constant", "cosine"] = "constant"
    # Weight of the pool term: the instance CE of the unlabeled training images (a shard set built
    # with unlabeled images, base_indi_eff only), each over the pool's columns (Eqn 3 on unlabeled
    # data). Constant (lambda_I_schedule does not touch it); ignored without a pool. The loss is
    # then super_ce + lambda_I * instance_ce + lambda_U * pool_ce, each part a mean over the global
    # batch's rows of its kind (labeled rows, pool rows; docs/DESIGN.md, "The pool").
    lambda_U: float = Field(1.0, ge=0.0)


class HeadConfig(Section):
    """The instance head (the objectives with an instance term)."""

    lr_mult: float = Field(1.0, gt=0.0)  # each column sees about one positive per epoch
    logit: Literal["dot", "cosine"] = "dot"  # dot: the paper's x.w; cosine: cos(x, w) / temperature
    temperature: float = Field(0.1, gt=0.0)
    kernel: Literal["auto", "triton", "torch"] = "auto"
    # features: on a fresh start each column is set to the L2-normalized instance-term input
    # (projection output if any) of its own image, unaugmented (fgdist/training/head.py init_from_features).
    init: Literal["random", "features"] = "random"
    # ema: a memory bank. W gets no gradient; after each step every visited column becomes
    # normalize(m * column + (1 - m) * normalize(mean of its rows' normalized features)).
    update: Literal["sgd", "ema"] = "sgd"
    ema_momentum: float = Field(0.5, ge=0.0, lt=1.0)  # m above
    lr_schedule: Literal["same", "constant"] = "same"  # constant: no LR milestones for the head
    weight_decay: float | None = Field(None, ge=0.0)  # None: optim.weight_decay


class OptimConfig(Section):
    epochs: int = Field(200, ge=1)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    milestones: list[int] = [60, 120, 160]
    gamma: float = Field(0.2, gt=0.0)
    # The backbone's learning rate is lr x this (its own parameter group; the heads keep lr): the
    # usual lower rate for fine-tuning pretrained weights (model.pretrained).
    backbone_lr_mult: float = Field(1.0, gt=0.0)


class EvalConfig(Section):
    every_epochs: int = Field(0, ge=0)  # 0: only after the last epoch
    recall_ks: list[int] = [1, 2, 4, 8]
    batch_size: int = Field(256, ge=1)
    query_chunk: int = Field(1024, ge=1)  # queries per similarity block
    # before each evaluation, BatchNorm statistics are re-estimated on this many shuffled training
    # batches (see model.reestimate_batchnorm); 0 keeps training's running averages
    bn_batches: int = Field(20, ge=0)
    pictures: bool = True  # attention maps and a retrieval grid after the last evaluation (rank 0)
    picture_queries: int = Field(8, ge=1)  # test images in those pictures
    features: Literal["backbone", "projection"] = "backbone"  # what retrieval embeds: f(x) or the projection


class CheckpointConfig(Section):
    every_epochs: int = Field(1, ge=0)  # 0: only after the last epoch
    every_steps: int = Field(0, ge=0)  # also every this many global steps inside an epoch (0: never)
    keep: int = Field(2, ge=1)


class TrackingConfig(Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "fgdist"
    run_name: str | None = None
    system_metrics: bool = True
    log_every_steps: int = Field(10, ge=1)


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"  # checkpoints and local results under output_dir/name
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    head: HeadConfig = HeadConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    # Passed through to deepspeed.initialize; fgdist fills in the batch size and precision.
    deepspeed: dict[str, Any] = {}

    @model_validator(mode="after")
    def _checks(self):
        if sorted(self.optim.milestones) != self.optim.milestones:
            raise ValueError(f"optim.milestones must be increasing, got {self.optim.milestones}")
        if not self.eval.recall_ks or min(self.eval.recall_ks) < 1:
            raise ValueError(f"eval.recall_ks must be positive, got {self.eval.recall_ks}")
        if self.optim.backbone_lr_mult != 1.0 and not self.model.pretrained:
            raise ValueError(
                "optim.backbone_lr_mult sets a pretrained backbone's learning rate: "
                "set model.pretrained, or leave it at 1"
            )
        if self.data.mean is None or self.data.std is None:
            from fgdist.backbones import input_normalization

            mean, std = input_normalization(self.model.arch, self.model.pretrained)
            self.data.mean = mean if self.data.mean is None else self.data.mean
            self.data.std = std if self.data.std is None else self.data.std
        if self.model.projection == "none":
            if self.eval.features == "projection":
                raise ValueError("eval.features='projection' needs model.projection='mlp'")
            if self.model.projection_for_super:
                raise ValueError("model.projection_for_super needs model.projection='mlp'")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _set_dotted(raw: dict, dotted: str, value: Any, where: str) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: key {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value`; the value is JSON when it parses as JSON, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def validate(raw: dict, where: str) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(
                f"{where}: key {key!r}: {e['msg']}"
                + (f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e.get("input"), dict) else "")
            )
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    for text in overrides:
        _set_dotted(raw, *parse_override(text), where=f"{path} (override {text!r})")
    return validate(raw, str(path))
