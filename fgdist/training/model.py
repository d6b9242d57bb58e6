"""The network the DeepSpeed engine wraps: a backbone (fgdist/backbones.py: ResNet-18 by default,
any torchvision or timm model; f(x) taken before its classifier) and the heads that live inside
the engine: the super-class head, and the fine head for the `fine` objective. Cross-rank
BatchNorm and BatchNorm re-estimation for whatever BatchNorm layers the backbone has."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fgdist.backbones import build_backbone
from fgdist.collectives import all_reduce_sum, mean_over_ranks
from fgdist.config import ModelConfig


def projection_mlp(dim: int, out_dim: int) -> nn.Module:
    """model.projection=mlp: d -> d -> out_dim. No BatchNorm: its statistics would be
    per-super-class under by_superclass routing, and the loss would depend on the rank count."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))


def instance_features(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the instance term (and head.init=features) sees: the projection if there is one."""
    return outputs.get("projection", outputs["features"])


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """`bn` normalizing `x` (N x C x ...) with statistics over the global batch (all ranks), and
    its running statistics updated with them as nn.BatchNorm does."""
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = [1, c] + [1] * (x.dim() - 2)
    n_local = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
    xf = x.float()
    stats = torch.cat([xf.sum(dim=dims), (xf * xf).sum(dim=dims), n_local])
    stats = all_reduce_sum(stats)
    count = stats[-1]
    mean = stats[:c] / count
    var = (stats[c : 2 * c] / count - mean**2).clamp_min(0)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            # momentum None: cumulative average, as in nn.BatchNorm2d (used by reestimate_batchnorm)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp_min(1), alpha=m)
    y = (x - mean.view(shape).to(x.dtype)) * torch.rsqrt(var + bn.eps).view(shape).to(x.dtype)
    return y * bn.weight.view(shape) + bn.bias.view(shape) if bn.affine else y


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken over the global batch (all ranks).

    Under by_superclass routing a rank's batch holds only its own super-classes, so local
    statistics would be per-super-class. Sums are all-reduced with autograd (works on gloo and
    NCCL alike), which also makes the loss on k ranks equal to the loss of one rank computing the
    same global batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_batch_norm(self, x) if self.training else super().forward(x)


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """CrossRankBatchNorm2d for N x C (x L) inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _global_batch_norm(self, x) if self.training else super().forward(x)


class CrossRankBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d (BatchNorm, then its `drop` and `act` modules) with cross-rank
    statistics; the same state dict keys (drop and act hold no tensors)."""

    def __init__(self, *args, drop: nn.Module, act: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _global_batch_norm(self, x) if self.training else super().forward(x)
        return self.act(self.drop(y))


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
    norms = [m for m in batchnorm_layers(model) if m.track_running_stats]
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


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm (of any dimension, timm's BatchNormAct2d included) in `model`."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _is_timm_batchnorm_act(bn: nn.Module) -> bool:
    return type(bn).__name__ == "BatchNormAct2d" and type(bn).__module__.startswith("timm.")


def _cross_rank(bn: nn.Module, where: str) -> nn.Module:
    """The cross-rank twin of one BatchNorm, with its parameters and buffers."""
    args = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if type(bn) is nn.BatchNorm2d:
        new = CrossRankBatchNorm2d(*args)
    elif type(bn) is nn.BatchNorm1d:
        new = CrossRankBatchNorm1d(*args)
    elif _is_timm_batchnorm_act(bn):
        new = CrossRankBatchNormAct2d(*args, drop=bn.drop, act=bn.act)
    else:
        raise ValueError(
            f"model.norm=global: {where} is a {type(bn).__module__}.{type(bn).__name__}, which fgdist cannot make "
            "cross-rank (it converts BatchNorm1d, BatchNorm2d and timm's BatchNormAct2d); set model.norm='local'"
        )
    new.load_state_dict(bn.state_dict())
    return new


def convert_batchnorm(module: nn.Module, prefix: str = "") -> nn.Module:
    """Replace every BatchNorm by its cross-rank twin, recursively (as
    SyncBatchNorm.convert_sync_batchnorm does), keeping parameters and buffers. LayerNorm and
    GroupNorm need nothing: their statistics are per example."""
    for name, child in module.named_children():
        where = f"{prefix}{name}"
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
            child, (CrossRankBatchNorm1d, CrossRankBatchNorm2d, CrossRankBatchNormAct2d)
        ):
            setattr(module, name, _cross_rank(child, where))
        else:
            convert_batchnorm(child, f"{where}.")
    return module


class EmbeddingNet(nn.Module):
    """What the DeepSpeed engine wraps: backbone + super-class head (+ fine head). The heads'
    widths follow the backbone's: `feature_dim` is f(x)'s, `instance_dim` the instance term's
    input's (the projection's where there is one), hence the instance head's columns'."""

    def __init__(self, cfg: ModelConfig, num_super: int | None, num_fine: int | None):
        super().__init__()
        self.backbone = build_backbone(cfg)
        d = self.feature_dim = self.backbone.embedding_dim
        self.projection = projection_mlp(d, cfg.projection_dim) if cfg.projection == "mlp" else None
        self.instance_dim = cfg.projection_dim if cfg.projection == "mlp" else d
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


def unit_features(out: dict | torch.Tensor) -> torch.Tensor:
    """The L2-normalized float32 rows that retrieval compares by inner product (cosine
    similarity), of a network's output: an EmbeddingNet's dict (its `features`) or the tensor of
    a bare backbone or projection. Evaluation, pictures, exported models and head.init=features
    all normalise through here, so they embed an image alike."""
    features = out["features"] if isinstance(out, dict) else out
    return F.normalize(features.float(), dim=1)
