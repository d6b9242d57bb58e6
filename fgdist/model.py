"""ResNet-18 backbone (f(x) taken before the FC layer, d = 512) and the heads that live inside
the DeepSpeed engine: the super-class head, and the fine head for the `fine` objective."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock

from fgdist.collectives import all_reduce_sum, mean_over_ranks
from fgdist.config import ModelConfig

STANDARD_WIDTH = 64  # torchvision's ResNet-18: d = 8 * 64 = 512


def feature_dim(cfg: ModelConfig) -> int:
    return 8 * cfg.width


def instance_dim(cfg: ModelConfig) -> int:
    """Width of the instance term's input, hence of the instance head's columns."""
    return cfg.projection_dim if cfg.projection == "mlp" else feature_dim(cfg)


def projection_mlp(dim: int, out_dim: int) -> nn.Module:
    """model.projection=mlp: d -> d -> out_dim. No BatchNorm: its statistics would be
    per-super-class under by_superclass routing, and the loss would depend on the rank count."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))


def instance_features(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the instance term (and head.init=features) sees: the projection if there is one."""
    return outputs.get("projection", outputs["features"])


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken over the global batch (all ranks).

    Under by_superclass routing a rank's batch holds only its own super-classes, so local
    statistics would be per-super-class. Sums are all-reduced with autograd (works on gloo and
    NCCL alike), which also makes the loss on k ranks equal to the loss of one rank computing the
    same global batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c = x.shape[1]
        n_local = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        xf = x.float()
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), n_local])
        stats = all_reduce_sum(stats)
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean**2).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            # momentum None: cumulative average, as in nn.BatchNorm2d (used by reestimate_batchnorm)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp_min(1), alpha=m)
        y = (x - mean[None, :, None, None].to(x.dtype)) * torch.rsqrt(var + self.eps)[None, :, None, None].to(x.dtype)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches, device, dtype) -> int:
    """Set every BatchNorm's running mean and variance to their plain average over `batches`
    (population statistics, "precise BN"); returns the number of batches used. Collective: every
    rank calls it with the same number of batches.

    Why: training keeps an exponential average dominated by the last ~10 steps, and under
    by_superclass routing those steps hold only the last few super-classes of each rank's stream,
    so evaluation would normalize every image with those super-classes' statistics (measured on
    Fashion-MNIST: super-class top-1 from 56% to 95% depending on which super-classes came last).
    The batches should be drawn across super-classes (the trainer uses shuffled routing). The
    averages are then averaged over ranks, so ranks with local BatchNorm evaluate one model too."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    used = 0
    for batch in batches:
        model(batch["images"].to(device=device, dtype=dtype))
        used += 1
    model.train(was_training)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.running_mean.copy_(mean_over_ranks(m.running_mean))
        m.running_var.copy_(mean_over_ranks(m.running_var))
    return used


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by CrossRankBatchNorm2d, keeping parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CrossRankBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


class NarrowResNet18(nn.Module):
    """ResNet-18 with `width` channels in its first stage (64 in torchvision's), so that CPU
    experiments can trade capacity for speed; d = 8 * width. Same blocks, same depth."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, inplanes = [], width
        for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            down = (
                None
                if stride == 1 and inplanes == planes
                else nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            )
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.width != STANDARD_WIDTH and cfg.pretrained:
        raise ValueError(f"model.pretrained needs model.width={STANDARD_WIDTH} (got {cfg.width})")
    net = resnet18(weights=None) if cfg.width == STANDARD_WIDTH else NarrowResNet18(cfg.width)
    if cfg.pretrained:
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.pretrained: weights file {path} not found (nothing is downloaded at run time)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise ValueError(
                f"model.pretrained: {path} is not a torchvision ResNet-18 state_dict (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
    if cfg.stem == "cifar":
        # Small images: a 3x3 stride-1 first conv and no max-pool keep 32x32 detail.
        net.conv1 = nn.Conv2d(3, cfg.width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class EmbeddingNet(nn.Module):
    """What the DeepSpeed engine wraps: backbone + super-class head (+ fine head)."""

    def __init__(self, cfg: ModelConfig, num_super: int | None, num_fine: int | None):
        super().__init__()
        self.backbone = build_backbone(cfg)
        d = feature_dim(cfg)
        self.projection = projection_mlp(d, cfg.projection_dim) if cfg.projection == "mlp" else None
        self.projection_for_super = cfg.projection_for_super
        self.super_head = (
            nn.Linear(cfg.projection_dim if cfg.projection_for_super else d, num_super) if num_super else None
        )
        self.fine_head = nn.Linear(d, num_fine) if num_fine else None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        out = {"features": features}
        if self.projection is not None:
            out["projection"] = self.projection(features)
        if self.super_head is not None:
            out["super_logits"] = self.super_head(out["projection"] if self.projection_for_super else features)
        if self.fine_head is not None:
            out["fine_logits"] = self.fine_head(features)
        return out


class ProjectionAsFeatures(nn.Module):
    """An EmbeddingNet seen by evaluation and pictures with eval.features=projection: its
    `features` output is the projection (the backbone stays reachable for attention maps)."""

    def __init__(self, net: EmbeddingNet):
        super().__init__()
        self.net = net

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(images)
        return {**out, "features": out["projection"]}


def model_for_eval(net: EmbeddingNet, features: str) -> nn.Module:
    """eval.features: `backbone` evaluates f(x), `projection` the projection output."""
    return net if features == "backbone" else ProjectionAsFeatures(net)


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalized f(x), for cosine-similarity retrieval."""
    return F.normalize(model(images)["features"].float(), dim=1)
