"""The backbones f(x): a torchvision classification model or a timm model, built without its
classifier (f(x) is the pooled penultimate vector), optionally with pretrained weights.

`model.arch` names the network: `resnet18` (the default; `model.width` below 64 gives the narrow
ResNet-18 the CPU configs train), any torchvision classification model (`resnet50`,
`convnext_tiny`, `vit_b_16`, ...) or `timm:<name>` for any timm model (`pip install 'fgdist[timm]'`).
`model.kwargs` go to the model's constructor (e.g. `{"img_size": 32}` for a timm ViT). The
classifier is the network's last `nn.Linear` for torchvision (replaced by an identity, so the
dimension is its input width) and `num_classes=0` for timm. The built module carries that
dimension as `embedding_dim`.

`model.pretrained` is a local file (a torchvision or timm state dict, `.pth`/`.bin` or
`.safetensors`) checked key by key (`PretrainedMismatchError` lists the missing, unexpected and
mis-shaped keys; the file's classifier keys are expected and dropped), or a tag resolved from the
local caches only: `torchvision:<WeightsEnum>` (e.g. `torchvision:ResNet18_Weights.IMAGENET1K_V1`,
or just `torchvision:IMAGENET1K_V1`) from torch hub's checkpoint folder, `timm:<pretrained tag>`
(e.g. `timm:c3_in1k`) from the Hugging Face cache. A tag not in the cache is a
`WeightsNotCachedError` naming the file to pass instead; nothing is downloaded unless
`model.download` is true.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:  # torch is imported where it is used: reading a config needs none of it
    from torch import nn

DEFAULT_ARCH = "resnet18"
TIMM = "timm:"
TORCHVISION = "torchvision:"
STANDARD_WIDTH = 64  # torchvision's ResNet-18: d = 8 * 64 = 512
RESNET_FAMILIES = ("resnet", "wide_resnet", "resnext")  # the torchvision names model.stem=cifar fits
# ImageNet statistics: what torchvision's weights expect, and timm's where its config says nothing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hugging Face repositories hold
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class UnknownArchError(ValueError):
    """model.arch names no torchvision classification model or timm model (or timm is missing)."""


class PretrainedMismatchError(ValueError):
    """A model.pretrained file whose keys or shapes are not the backbone's."""


class WeightsNotCachedError(FileNotFoundError):
    """A model.pretrained tag whose file is not in the local cache (and model.download is off)."""


# -- names ---------------------------------------------------------------------------------------
def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM)


def timm_name(arch: str) -> str:
    return arch[len(TIMM) :]


def is_torchvision_resnet(arch: str) -> bool:
    """The torchvision ResNets (ResNet, Wide ResNet, ResNeXt): the ones model.stem=cifar fits."""
    return not is_timm(arch) and arch.startswith(RESNET_FAMILIES)


def _closest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    return f" (closest: {', '.join(close)})" if close else ""


def import_timm(what: str):
    try:
        import timm
    except ImportError:
        raise UnknownArchError(f"{what} needs timm: pip install 'fgdist[timm]'") from None
    return timm


def check_arch(arch: str) -> str:
    """model.arch as given, or UnknownArchError naming what is wrong with it."""
    if arch == DEFAULT_ARCH:
        return arch  # no import for the default
    if is_timm(arch):
        timm = import_timm(repr(arch))
        name = timm_name(arch)
        if not timm.is_model(name):
            raise UnknownArchError(f"{name!r} is not a timm model{_closest(name, timm.list_models())}")
        return arch
    from torchvision import models

    names = models.list_models(module=models)  # the classification models only
    if arch not in names:
        raise UnknownArchError(
            f"{arch!r} is not a torchvision classification model{_closest(arch, names)}; a timm model is 'timm:<name>'"
        )
    return arch


def input_normalization(arch: str, pretrained: str | None) -> tuple[list[float], list[float]]:
    """The mean and std the backbone's inputs are normalized with: timm's pretrained config for a
    timm model (the `timm:<tag>` one where model.pretrained names it), ImageNet's otherwise."""
    if is_timm(arch):
        name = timm_name(arch)
        if pretrained and pretrained.startswith(TIMM):
            name = f"{name}.{timm_name(pretrained)}"
        cfg = _timm_pretrained_cfg(name)
        if cfg is not None and cfg.mean and cfg.std:
            return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def _timm_pretrained_cfg(name: str):
    """timm's pretrained config of `name` (`model` or `model.tag`), None where it has none."""
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag: named where the weights are resolved
        return None


# -- building ------------------------------------------------------------------------------------
def _torchvision_model(cfg) -> tuple[nn.Module, tuple[str, ...], int]:
    """(network without its classifier, the classifier's key prefixes, f(x)'s dimension)."""
    from torch import nn
    from torchvision import models

    if cfg.arch == DEFAULT_ARCH and cfg.width != STANDARD_WIDTH:
        from fgdist.narrow_resnet import NarrowResNet18

        return NarrowResNet18(cfg.width), ("fc",), 8 * cfg.width

    net = models.get_model(cfg.arch, weights=None, **cfg.kwargs)
    # The classifier is the last Linear (torchvision registers it last: fc, classifier[-1],
    # heads.head, head); f(x) is what it would read.
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UnknownArchError(f"model.arch={cfg.arch!r}: no Linear classifier to take f(x) before")
    name, classifier = linears[-1]
    net.set_submodule(name, nn.Identity())
    return net, (name,), classifier.in_features


def _timm_model(cfg) -> tuple[nn.Module, tuple[str, ...], int]:
    timm = import_timm(f"model.arch={cfg.arch!r}")
    net = timm.create_model(timm_name(cfg.arch), pretrained=False, num_classes=0, **cfg.kwargs)
    classifier = net.pretrained_cfg.get("classifier") or ()
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    # head_hidden_size: models with a pre-logits layer (MobileNetV3's 1024) output that, not num_features
    return net, prefixes, int(getattr(net, "head_hidden_size", None) or net.num_features)


def build_backbone(cfg):
    """The backbone (an nn.Module) of a ModelConfig: f(x) = its output, `embedding_dim` = f(x)'s width."""
    from torch import nn

    net, classifier, dim = _timm_model(cfg) if is_timm(cfg.arch) else _torchvision_model(cfg)
    if cfg.pretrained:
        load_pretrained(net, pretrained_file(cfg), classifier, cfg.arch)
    if cfg.stem == "cifar":
        # Small images: a 3x3 stride-1 first conv and no max-pool keep 32x32 detail.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.embedding_dim = dim
    return net


# -- pretrained weights --------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict:
    """A state dict file (name -> tensor): safetensors, or a torch pickle of tensors only (weights_only)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip readers each raise their own
        raise PretrainedMismatchError(
            f"model.pretrained: {path} is not a readable state dict ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = [k for k, v in state.items() if isinstance(v, dict)] if isinstance(state, dict) else []
        hint = f" (a checkpoint? its {inner[0]!r} entry may be the state dict)" if inner else ""
        raise PretrainedMismatchError(f"model.pretrained: {path} is not a state dict of tensors{hint}")
    return state


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def state_dict_problems(state: dict, own: dict, classifier: tuple[str, ...]) -> list[str]:
    """What keeps `state` from loading exactly into a module whose state dict is `own`: its
    missing keys, unexpected keys (the classifier's are expected) and shape mismatches."""
    head = tuple(f"{c}." for c in classifier)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(head)]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    return [
        f"{what}: {_listing(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if keys
    ]


def _timm_filter(net):
    """timm's conversion of checkpoints for this model family (older layouts, position
    embeddings resampled to another image size), where the family has one."""
    return getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)


def load_pretrained(net, path: Path, classifier: tuple[str, ...], arch: str) -> None:
    """Load `path` into `net` exactly (every tensor of the backbone from the file), or raise
    PretrainedMismatchError listing what does not fit. A timm file that does not fit as it is
    is tried once more through timm's conversion for the model family."""
    state = read_state_dict(path)
    own = net.state_dict()
    problems = state_dict_problems(state, own, classifier)
    convert = _timm_filter(net) if is_timm(arch) else None
    if problems and convert is not None:
        try:
            converted = convert(dict(state), net)
        except Exception:  # a file of another model: the plain comparison's problems are the answer
            converted = None
        if converted is not None and not state_dict_problems(converted, own, classifier):
            state, problems = converted, []
    if problems:
        raise PretrainedMismatchError(
            f"model.pretrained: {path} does not fit model.arch={arch!r}: " + "; ".join(problems)
        )
    net.load_state_dict({k: state[k] for k in own})


def pretrained_file(cfg) -> Path:
    """The weights file model.pretrained names: a path, or a tag's file in the local cache."""
    source = cfg.pretrained
    if source.startswith(TORCHVISION):
        return _torchvision_weights(cfg, source)
    if source.startswith(TIMM):
        return _timm_weights(cfg, source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file {path} not found (nothing is downloaded at run time)")
    return path


def _torchvision_weights(cfg, source: str) -> Path:
    import torch
    from torchvision import models

    enum = models.get_model_weights(cfg.arch)
    owner, _, member = source[len(TORCHVISION) :].rpartition(".")
    if owner and owner != enum.__name__:
        raise ValueError(
            f"model.pretrained={source!r}: {owner} are not weights of model.arch={cfg.arch!r} ({enum.__name__})"
        )
    try:
        weights = enum[member]
    except KeyError:
        raise ValueError(
            f"model.pretrained={source!r}: {enum.__name__} has no {member!r} (it has {', '.join(enum.__members__)})"
        ) from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if file.is_file():
        return file
    if cfg.download:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(file), progress=False)
        return file
    raise WeightsNotCachedError(
        f"model.pretrained={source!r}: {file} is not in the local cache and nothing is downloaded at run time. "
        f"Set model.pretrained to the path of {file.name} ({weights.url}), or copy that file to {file}, "
        "or set model.download=true"
    )


def _timm_weights(cfg, source: str) -> Path:
    timm = import_timm(f"model.pretrained={source!r}")
    name, tag = timm_name(cfg.arch), timm_name(source)
    if f"{name}.{tag}" not in timm.list_pretrained(f"{name}.*"):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")]
        raise ValueError(f"model.pretrained={source!r}: timm has no {tag!r} weights for {name} (it has {tags})")
    pcfg = _timm_pretrained_cfg(f"{name}.{tag}")
    found = _timm_cached(pcfg)
    if found is not None:
        return found
    if cfg.download:
        return _timm_download(pcfg)
    if pcfg.hf_hub_id:
        repo = pcfg.hf_hub_id
        wanted = f"{HF_FILES[0]} of the Hugging Face repository {repo} (https://huggingface.co/{repo}/resolve/main/{HF_FILES[0]})"
    else:
        wanted = f"{Path(urlparse(pcfg.url).path).name} ({pcfg.url})"
    raise WeightsNotCachedError(
        f"model.pretrained={source!r}: not in the local cache (Hugging Face hub cache, torch hub checkpoints) and "
        f"nothing is downloaded at run time. Set model.pretrained to the path of {wanted}, or set model.download=true"
    )


def _url_file(url: str | None) -> Path | None:
    """Where torch hub caches a state dict URL (None for other files, e.g. JAX .npz)."""
    import torch

    if not url or not urlparse(url).path.endswith(STATE_DICT_SUFFIXES):
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _timm_cached(pcfg) -> Path | None:
    """A timm pretrained config's weights file in the Hugging Face cache or torch hub's folder."""
    if pcfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in (pcfg.hf_hub_filename,) if pcfg.hf_hub_filename else HF_FILES:
            found = try_to_load_from_cache(pcfg.hf_hub_id, filename)
            if isinstance(found, str):  # else None or a "known to be absent" marker
                return Path(found)
    file = _url_file(pcfg.url)
    return file if file is not None and file.is_file() else None


def _timm_download(pcfg) -> Path:
    """model.download=true: fetch the weights into the cache they are read from."""
    if pcfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(pcfg.hf_hub_id, pcfg.hf_hub_filename or HF_FILES[0]))
    import torch

    file = _url_file(pcfg.url)
    if file is None:
        raise WeightsNotCachedError(
            f"timm weights at {pcfg.url} are not a state dict fgdist reads: pass a converted file"
        )
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(pcfg.url, str(file), progress=False)
    return file
