"""A trained model outside its DeepSpeed checkpoint: the backbone (and, for a run evaluated with
`eval.features=projection`, its projection MLP) as safetensors plus its config and evaluation
preprocessing (`fgdist-export`), the same module logged to MLflow at the end of training, and
`fgdist.load_model`, which turns any of these into a module mapping images to L2-normalized
embeddings: the features the run's own evaluation embedded.

    fgdist-export --model runs/synthetic --out exported/synthetic [--overwrite]

An export folder holds `model.safetensors` (the backbone's state_dict under its plain keys and,
with projection features, the projection's under `projection.`; float32) and `fgdist_model.json`
(format, `features`: `backbone` or `projection`, absent in older exports and read as `backbone`,
embedding dimension, `arch` and the whole `model` config, `preprocessing`: the data config keys
the evaluation transform reads, image size and the backbone's mean/std among them, and those
mean/std again under `normalize`). Sources `load_model` takes:
an export folder, a run folder (its newest checkpoint) or a checkpoint folder, an MLflow model
URI (`runs:/<id>/model`, `models:/...`), or a bare MLflow run id (its `model`). See
docs/DESIGN.md ("Evaluation") for why the heads are left out: search embeds what evaluation embeds,
f(x) or the projection of f(x).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from fgdist import cli
from fgdist.backbones import state_dict_problems
from fgdist.config import DataConfig, ModelConfig
from fgdist.data.loader import make_transform, normalization
from fgdist.images import check_shape
from fgdist.output_folder import atomic_folder, check_free
from fgdist.search_errors import ERRORS, CheckpointError, UnknownRunError
from fgdist.training.checkpoint import load_checkpoint_model
from fgdist.training.model import build_backbone, projection_mlp, unit_features

log = logging.getLogger(__name__)

FORMAT = "fgdist-model/1"
WEIGHTS, CONFIG = "model.safetensors", "fgdist_model.json"
MLFLOW_NAME = "model"  # the logged model's name inside a training run
# what make_transform(train=False) reads; exports written before mean and std (ResNet-18s, all
# ImageNet-normalized) hold only the first four, and read as ImageNet's
PREPROCESSING_KEYS = ("augment", "image_size", "resize", "padding", "mean", "std")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PROJECTION = "projection."  # key prefix of the projection's weights in model.safetensors


class ImageEmbedder(nn.Module):
    """Normalized CHW image tensors (N x 3 x H x W, the evaluation transform's output) -> N x d
    L2-normalized float32 embeddings: of f(x), or of projection(f(x)) when `projection` (the
    trained model.projection=mlp module) is given. `preprocess` turns PIL images into that input."""

    def __init__(
        self, backbone: nn.Module, model_config: dict, preprocessing: dict, projection: nn.Module | None = None
    ):
        super().__init__()
        self.backbone = backbone
        self.register_module("projection", projection)
        self.model_config = dict(model_config)
        self.preprocessing = dict(preprocessing)

    def __setstate__(self, state: dict) -> None:
        # MLflow models pickled before the projection existed have no such submodule: f(x) only;
        # before other backbones, theirs is a ResNet-18 whose f(x) is 8 * width wide.
        super().__setstate__(state)
        self._modules.setdefault("projection", None)
        if not hasattr(self.backbone, "embedding_dim"):
            self.backbone.embedding_dim = 8 * self.model_config.get("width", 64)

    @property
    def features(self) -> str:
        """The eval.features value this embedder reproduces."""
        return "backbone" if self.projection is None else "projection"

    @property
    def dim(self) -> int:
        return self.backbone.embedding_dim if self.projection is None else self.model_config["projection_dim"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.backbone.parameters())
        features = self.backbone(images.to(device=p.device, dtype=p.dtype))
        if self.projection is not None:
            features = self.projection(features)
        return unit_features(features)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images of any mode and size, as evaluation reads them (fgdist/images.py, then the
        evaluation transform); ImageTooSmallError names the first image too small or elongated."""
        for i, img in enumerate(images):
            check_shape(img.size, f"image {i} of {len(images)}")
        transform = eval_transform(self.preprocessing)
        return torch.stack([transform(img, None) for img in images])


def eval_transform(preprocessing: dict):
    """The evaluation transform (PIL image, rng -> tensor) of a model's preprocessing keys."""
    return make_transform(DataConfig(**preprocessing), train=False)


def _cpu_copy(module: nn.Module, source: nn.Module) -> nn.Module:
    module.load_state_dict({k: v.detach().float().cpu() for k, v in source.state_dict().items()})
    return module


def embedder_from(model: nn.Module, model_cfg: ModelConfig, data_cfg: DataConfig, features: str) -> ImageEmbedder:
    """An ImageEmbedder on the CPU with a copy of `model`'s backbone weights (an EmbeddingNet,
    possibly with cross-rank BatchNorm, which has BatchNorm2d's keys), and of its projection when
    `features` (the run's eval.features) is `projection`: plain modules only, so it pickles and
    runs without a process group."""
    model_cfg = model_cfg.model_copy(update={"pretrained": None})
    backbone = _cpu_copy(build_backbone(model_cfg), getattr(model, "backbone", model))
    projection = None
    if features == "projection":
        if getattr(model, "projection", None) is None:
            raise ValueError("eval.features='projection' needs model.projection='mlp': the model has no projection")
        projection = _cpu_copy(projection_mlp(backbone.embedding_dim, model_cfg.projection_dim), model.projection)
    elif features != "backbone":
        raise ValueError(f"eval.features: expected 'backbone' or 'projection', got {features!r}")
    preprocessing = {k: getattr(data_cfg, k) for k in PREPROCESSING_KEYS}
    return ImageEmbedder(backbone, model_cfg.model_dump(), preprocessing, projection).eval()


# -- loading -----------------------------------------------------------------------------------
def _from_checkpoint(path: Path) -> ImageEmbedder:
    try:
        model, cfg, _ = load_checkpoint_model(path)
    except FileNotFoundError as err:  # its message names the folder or file already
        raise CheckpointError(str(err)) from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError) as err:  # truncated or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {str(err)[:200]})") from None
    return embedder_from(model, cfg.model, cfg.data, cfg.eval.features)


def _from_export(path: Path) -> ImageEmbedder:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = json.loads((path / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / CONFIG}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path}: {WEIGHTS} is missing")
    try:
        state = load_file(str(path / WEIGHTS))
    except SafetensorError as err:
        raise CheckpointError(f"{path / WEIGHTS}: unreadable ({err})") from None
    try:
        model_cfg = ModelConfig(**meta["model"])
    except ValueError as err:  # an arch this installation cannot build (timm missing, say), or a bad key
        raise CheckpointError(f"{path / CONFIG}: model: {err}") from None
    backbone = build_backbone(model_cfg)
    backbone_state = {k: v for k, v in state.items() if not k.startswith(PROJECTION)}
    projection_state = {k[len(PROJECTION) :]: v for k, v in state.items() if k.startswith(PROJECTION)}
    features = meta.get("features", "backbone")  # exports written before the key embed f(x)
    if features not in ("backbone", "projection"):
        raise CheckpointError(f"{path / CONFIG}: features {features!r}, expected 'backbone' or 'projection'")
    projection = None
    if features == "projection":
        if model_cfg.projection != "mlp" or not projection_state:
            raise CheckpointError(
                f"{path}: features 'projection' needs model.projection='mlp' in {CONFIG} "
                f"and {PROJECTION}* weights in {WEIGHTS}"
            )
        projection = projection_mlp(backbone.embedding_dim, model_cfg.projection_dim)
        projection.load_state_dict(projection_state)
    elif projection_state:
        raise CheckpointError(f"{path}: {PROJECTION}* weights in {WEIGHTS} but features {features!r} in {CONFIG}")
    problems = state_dict_problems(backbone_state, backbone.state_dict(), ())
    if problems:
        raise CheckpointError(f"{path / WEIGHTS} is not the backbone {CONFIG} describes: " + "; ".join(problems))
    backbone.load_state_dict(backbone_state)
    return ImageEmbedder(backbone, meta["model"], meta["preprocessing"], projection).eval()


def _from_mlflow(uri: str) -> ImageEmbedder:
    import mlflow
    from mlflow.exceptions import MlflowException

    from fgdist.training.tracking import resolve_uri

    mlflow.set_tracking_uri(resolve_uri(None))
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError) as err:
        raise UnknownRunError(f"{uri}: no such MLflow model in {resolve_uri(None)} ({str(err)[:200]})") from None
    return model.eval()


def load_model(source: str | Path) -> ImageEmbedder:
    """The ImageEmbedder of an export folder, a run or checkpoint folder, an MLflow model URI or
    an MLflow run id (its logged `model`), in eval mode on the CPU."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        return _from_export(path) if (path / CONFIG).is_file() else _from_checkpoint(path)
    if "://" in text or text.startswith(("runs:/", "models:/")):
        return _from_mlflow(text)
    if RUN_ID.match(text):
        return _from_mlflow(f"runs:/{text}/{MLFLOW_NAME}")
    raise CheckpointError(
        f"{text}: no such folder, and not an MLflow URI or run id (an export folder, a run or checkpoint folder)"
    )


def describe(source: str | Path) -> str:
    """How a source is recorded in the outputs made from it: folders as absolute paths."""
    path = Path(str(source))
    return str(path.resolve()) if path.is_dir() else str(source)


# -- writing -----------------------------------------------------------------------------------
def export_model(embedder: ImageEmbedder, out: str | Path, source: str = "", overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    # the backbone under its plain keys, as before the projection existed; the projection beside it
    modules = [("", embedder.backbone)] + (
        [(PROJECTION, embedder.projection)] if embedder.projection is not None else []
    )
    state = {
        prefix + k: v.detach().float().contiguous() if v.is_floating_point() else v
        for prefix, module in modules
        for k, v in module.state_dict().items()
    }
    mean, std = normalization(DataConfig(**embedder.preprocessing))
    meta = {
        "format": FORMAT,
        "features": embedder.features,
        "embedding_dim": embedder.dim,
        "model": embedder.model_config,
        "preprocessing": embedder.preprocessing,
        "arch": embedder.model_config.get("arch", "resnet18"),
        "normalize": {"mean": mean.tolist(), "std": std.tolist()},
        "source": source,
    }
    with atomic_folder(out, overwrite, "export", {"--model": source}) as partial:
        save_file(state, str(partial / WEIGHTS))
        (partial / CONFIG).write_text(json.dumps(meta, indent=1))
    return Path(out)


def signature(embedder: ImageEmbedder):
    """Input: float32 N x 3 x S x S (the evaluation transform's output); output: N x d float32.
    The tensors are unnamed: MLflow hands a named input to the model as a dict, which the PyTorch
    flavor refuses, so `pyfunc.predict(array)` and `mlflow models serve` ({"inputs": [...]}) would
    fail (models logged with the named spec stay unservable; `load_model` still reads them)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = embedder.preprocessing["image_size"]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embedder.dim))]),
    )


def log_to_mlflow(embedder: ImageEmbedder):
    """Log the embedder as the active MLflow run's `model` (mlflow.pytorch, with a signature)."""
    import mlflow

    return mlflow.pytorch.log_model(
        embedder,
        name=MLFLOW_NAME,
        signature=signature(embedder),
        serialization_format="pickle",  # the module itself (with `preprocess`), not a traced graph
        # explicit: inferring requirements would re-import and run the model in a subprocess
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "fgdist"],
    )


def log_trained_model(model: nn.Module, cfg, tracker) -> None:
    """The trainer's last step (rank 0, results written): log the trained backbone (and projection,
    with eval.features=projection) to MLflow. A failure is reported, not raised: the run itself has
    finished."""
    if not tracker.enabled:
        return
    try:
        log_to_mlflow(embedder_from(model, cfg.model, cfg.data, cfg.eval.features))
        log.info(f"model logged to MLflow: runs:/{tracker.run_id}/{MLFLOW_NAME}")
    except Exception as err:
        log.warning(f"logging the model to MLflow failed ({type(err).__name__}: {str(err)[:300]})")


def main(argv=None) -> int:
    p = cli.parser("fgdist-export", __doc__)
    p.add_argument("--model", required=True, help="a run or checkpoint folder, an MLflow run id or model URI")
    p.add_argument("--out", required=True, help="the export folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that fgdist wrote")
    args = p.parse_args(argv)

    def body() -> int:
        check_free(args.out, args.overwrite, {"--model": args.model})  # before the model is read
        out = export_model(load_model(args.model), args.out, describe(args.model), args.overwrite)
        print(f"exported {args.model} to {out}")
        return 0

    return cli.run_reporting(body, ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
