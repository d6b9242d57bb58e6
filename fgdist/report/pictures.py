"""Pictures of what a trained model looks at and what it retrieves.

- Spatial attention maps (Zagoruyko & Komodakis, "Paying More Attention to Attention"): for a
  stage's activation A (C x h x w), the map sum_c A_c^2 (here the channel mean, the same up to
  scale) shows where the stage responds strongly. Taken by forward hooks from the backbone's last
  two spatial stages (layer3 and layer4 of a ResNet; found by the resolution of their outputs, so
  any convolutional network works), upsampled to the image and overlaid: one row per image,
  image | stage | last stage. Transformers have token sequences, not such stages: they get no
  attention grid (NoSpatialMapsError; log_pictures draws the retrieval grid alone).
- A retrieval grid as in the paper's Figure 3: each query with its top-5 neighbours in the test
  split by cosine similarity of f(x); a neighbour of the query's fine class is outlined in green,
  one of another fine class in red, one whose label (or whose query's) is unknown in grey.

`log_pictures` draws both for a fixed set of test images (evenly spaced over the test split's
instance ids, which are sorted by super-class, so the queries cover the super-classes); the
end of a run (fgdist.retrieval.publish) calls it on rank 0 after the final evaluation and logs the
files as MLflow artifacts.

    fgdist-pictures --model runs/synthetic [--shards DIR] [--shards-url URL] [--out DIR] [--num-queries 8]
    (or python -m fgdist.report.pictures ...)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fgdist import cli
from fgdist.config import DataConfig
from fgdist.data.loader import MEAN, STD, eval_batches, make_transform, normalization, open_data_split
from fgdist.data.shardset import SplitDir, open_split, reader_for
from fgdist.images import open_image
from fgdist.report.figures import new_figure
from fgdist.retrieval_metrics import ranked, similarities
from fgdist.training.checkpoint import load_checkpoint_model
from fgdist.training.model import unit_features

log = logging.getLogger("fgdist.report.pictures")

TOP_K = 5
CORRECT, WRONG, QUERY = "#1a9850", "#d73027", "#222222"  # green, red, dark grey outlines
UNKNOWN = "#b0b0b0"  # light grey: a neighbour whose label, or whose query's, is unknown
DPI = 100  # with the cell sizes below: a 32x32 image shows at about 128 pixels
DISPLAY = 128  # pixels per grid cell side at least: 32x32 images are shown enlarged


@dataclass
class TestImage:
    """A decoded test image: `image` is the normalized CHW tensor the network sees, normalized
    with `normalization` (mean, std per channel; None: ImageNet's)."""

    instance: int
    super: int
    fine: int
    image: torch.Tensor
    normalization: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def rgb(self) -> np.ndarray:
        """The image as shown: HWC floats in [0, 1]."""
        return to_rgb(self.image, *(self.normalization or (MEAN, STD)))


class NoSpatialMapsError(ValueError):
    """A backbone without two spatial stages to draw attention maps from (a transformer)."""


# -- model plumbing ----------------------------------------------------------------------------
def backbone_of(model: nn.Module) -> nn.Module:
    """The backbone inside an EmbeddingNet (or the backbone itself); NoSpatialMapsError for a
    transformer, whose attention layers mix tokens rather than keep a spatial layout."""
    net = getattr(model, "backbone", model)
    attention = next((type(m).__name__ for m in net.modules() if "Attention" in type(m).__name__), None)
    if attention is not None:
        raise NoSpatialMapsError(
            f"{type(net).__name__} is a transformer ({attention} layers): attention maps are drawn from the spatial "
            "stages of convolutional backbones only"
        )
    return net


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalized f(x): EmbeddingNet returns a dict, a bare backbone the features."""
    p = _param(model)
    out = model(images.to(device=p.device, dtype=p.dtype))
    return unit_features(out).cpu()


class _EvalMode:
    """Eval mode (running BatchNorm statistics, no cross-rank collectives) and no autograd for
    the duration; the caller's mode is restored, because the trainer may go on training."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        self._no_grad = torch.no_grad()
        self._no_grad.__enter__()
        return self.model

    def __exit__(self, *exc):
        self._no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def attention_maps(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{stage: B x h x w} channel means of squared activations of the backbone's last two spatial
    stages, in order. A stage is a run of outputs at one resolution, of the backbone's modules
    two levels deep at most (ResNet: conv1, layer1, layer1.0, ...; torchvision's other models
    and timm's: features.3, blocks.2, stages.1): its map is the run's last output (a ResNet's
    layer3 and layer4), named by the outermost module that holds no earlier stage (layer4, not
    the `features` container of every stage). Outputs of one pixel (global pooling,
    squeeze-excitation) show nothing and are passed over."""
    net = backbone_of(model)
    stages: list[tuple[str, tuple[int, int], torch.Tensor]] = []  # (module, resolution, map)

    def record(name: str):
        def hook(_module, inputs, out):
            if not (isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1):
                return
            entry = (name, tuple(out.shape[-2:]), out.detach().float().pow(2).mean(dim=1).cpu())
            if not stages or stages[-1][1] != entry[1]:
                stages.append(entry)
                return
            source = tuple(inputs[0].shape[-2:]) if inputs and isinstance(inputs[0], torch.Tensor) else None
            if source in [s for _, s, _ in stages[-2:]]:  # it began in this stage or the one before
                stages[-1] = entry

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in net.named_modules() if n and n.count(".") <= 1]
    try:
        with _EvalMode(model):
            _features(model, images)
    finally:
        for h in hooks:
            h.remove()
    if len(stages) < 2:
        raise NoSpatialMapsError(
            f"{type(net).__name__} has {len(stages)} spatial stage(s) at this image size: attention maps need two"
        )
    return {name: amap for name, _, amap in stages[-2:]}


def to_rgb(image: torch.Tensor, mean: np.ndarray = MEAN, std: np.ndarray = STD) -> np.ndarray:
    """Normalized CHW tensor -> HWC floats in [0, 1] (undo the normalization: ImageNet's by default)."""
    array = image.detach().float().cpu().numpy().transpose(1, 2, 0) * std + mean
    return np.clip(array, 0.0, 1.0)


def _display_size(image: torch.Tensor) -> int:
    return max(DISPLAY, image.shape[-1], image.shape[-2])


def _enlarge(rgb: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour enlargement: the pixels of a 32x32 image stay visible as pixels."""
    img = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(img, dtype=np.float32) / 255.0


def overlay(rgb: np.ndarray, amap: torch.Tensor, size: int, alpha: float = 0.5) -> np.ndarray:
    """The map, bilinearly upsampled to the image, min-max scaled, as a jet heat map over it."""
    from matplotlib import colormaps

    up = F.interpolate(amap[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    lo, hi = float(up.min()), float(up.max())
    up = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
    heat = colormaps["jet"](up.numpy())[..., :3]
    return (1 - alpha) * _enlarge(rgb, size) + alpha * heat


# -- drawing -----------------------------------------------------------------------------------
def _show(ax, pixels: np.ndarray, title: str | None = None, outline: str | None = None, fontsize: int = 7) -> None:
    ax.imshow(pixels, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(outline is not None)
        if outline is not None:
            spine.set_edgecolor(outline)
            spine.set_linewidth(4)
    if title:
        ax.set_title(title, fontsize=fontsize, pad=3)


def attention_grid(model: nn.Module, images: list[TestImage], path: str | Path, names: Names | None = None) -> Path:
    """One row per image: the image and its maps of the backbone's last two spatial stages, overlaid."""
    if not images:
        raise ValueError("attention_grid: no images")
    names = names or Names()
    maps = attention_maps(model, torch.stack([t.image for t in images]))
    size = _display_size(images[0].image)
    fig = new_figure(3 * 1.6, len(images) * 1.75, DPI)
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, t in enumerate(images):
        rgb = t.rgb
        _show(axes[row, 0], _enlarge(rgb, size), f"{names.fine(t.fine)} / {names.super(t.super)}")
        for col, layer in enumerate(maps, start=1):
            h, w = maps[layer].shape[1:]
            _show(axes[row, col], overlay(rgb, maps[layer][row], size), f"{layer} ({h}x{w})" if row == 0 else None)
    fig.suptitle("spatial attention: channel mean of squared activations", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def retrieval_grid(
    queries: list[TestImage],
    neighbours: list[list[tuple[TestImage, float]]],
    path: str | Path,
    names: Names | None = None,
) -> Path:
    """Each query (left, dark outline) with its neighbours in rank order, each outlined green if
    it has the query's fine class (the super-class where the data set has no fine labels), red
    if not, grey if either label is unknown, titled with its class and cosine similarity."""
    if not queries:
        raise ValueError("retrieval_grid: no queries")
    names = names or Names()
    by_fine = all(q.fine >= 0 for q in queries)
    k = max(len(n) for n in neighbours)
    size = _display_size(queries[0].image)
    fig = new_figure((k + 1) * 1.45, len(queries) * 1.65, DPI)
    axes = fig.subplots(len(queries), k + 1, squeeze=False)
    for row, (q, found) in enumerate(zip(queries, neighbours)):
        _show(
            axes[row, 0],
            _enlarge(q.rgb, size),
            f"query {names.fine(q.fine) if by_fine else names.super(q.super)}",
            QUERY,
        )
        for col in range(1, k + 1):
            ax = axes[row, col]
            if col > len(found):
                ax.set_visible(False)
                continue
            t, sim = found[col - 1]
            label = names.fine(t.fine) if by_fine else names.super(t.super)
            outline = outline_colour(q.fine, t.fine) if by_fine else outline_colour(q.super, t.super)
            _show(ax, _enlarge(t.rgb, size), f"{label} {sim:.2f}", outline)
    label = "fine class" if by_fine else "super-class (no fine labels)"
    fig.suptitle(
        f"top-{k} neighbours by cosine similarity: green = same {label}, red = other, grey = label unknown", fontsize=9
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def outline_colour(query_label: int, found_label: int) -> str:
    """Green for the query's class, red for another; grey where either label is unknown (-1):
    two unknown labels are not the same class."""
    if query_label < 0 or found_label < 0:
        return UNKNOWN
    return CORRECT if found_label == query_label else WRONG


@dataclass
class Names:
    """Class names from the manifest, shortened for captions; ids where there are none."""

    fine_names: list[str] | None = None
    super_names: list[str] | None = None

    @staticmethod
    def of(split: SplitDir) -> Names:
        return Names(split.manifest.fine_names, [s.name for s in split.manifest.super_classes])

    def fine(self, i: int) -> str:
        return self.fine_names[i][:14] if self.fine_names and 0 <= i < len(self.fine_names) else f"fine {i}"

    def super(self, i: int) -> str:
        return self.super_names[i][:14] if self.super_names and 0 <= i < len(self.super_names) else f"super {i}"


# -- reading the test split --------------------------------------------------------------------
def pick_queries(split: SplitDir, count: int) -> list[int]:
    """`count` instance ids evenly spaced over the split: the same ones for every run on the same
    shard set, and spread over the super-classes (ids are sorted by super-class)."""
    n = split.manifest.num_instances
    count = min(count, n)
    return sorted({int((i + 0.5) * n / count) for i in range(count)})


def read_images(split: SplitDir, data_cfg: DataConfig, instance_ids: list[int]) -> dict[int, TestImage]:
    """Decode the given test samples with the evaluation transform, reading only the shards that
    hold them (each shard's instance range is in the manifest)."""
    wanted = set(instance_ids)
    transform = make_transform(data_cfg, train=False)
    norm = normalization(data_cfg)
    shards = [s for s in split.manifest.shards if any(s.instance_begin <= i < s.instance_end for i in wanted)]
    found: dict[int, TestImage] = {}
    reader = reader_for(split, data_cfg.url_retry_seconds)
    for sample in reader.samples([split.shard_path(s) for s in shards]):
        meta = json.loads(sample["json"])
        if meta["instance"] not in wanted:
            continue
        image = transform(open_image(sample.get("png", sample.get("jpg"))), None)
        found[meta["instance"]] = TestImage(meta["instance"], meta["super"], meta["fine"], image, norm)
    missing = wanted - found.keys()
    if missing:
        raise ValueError(f"{split.path}: instances {sorted(missing)[:5]} not found in its shards")
    return found


def embed_split(model: nn.Module, split: SplitDir, data_cfg: DataConfig, batch_size: int = 256):
    """Normalized f(x) of every test image (the eval pipeline, one rank), with instance ids."""
    feats, ids = [], []
    with _EvalMode(model):
        for batch in eval_batches(split, data_cfg, batch_size, rank=0, world_size=1):
            feats.append(_features(model, batch["images"]))
            ids.append(batch["instance"])
    return torch.cat(feats), torch.cat(ids)


def nearest(
    model: nn.Module, split: SplitDir, data_cfg: DataConfig, query_ids: list[int], k: int = TOP_K, batch_size: int = 256
) -> list[list[tuple[int, float]]]:
    """For each query, its k nearest other test images: (instance id, cosine similarity)."""
    feats, ids = embed_split(model, split, data_cfg, batch_size)
    return neighbours(feats, ids, query_ids, k)


def neighbours(feats: torch.Tensor, ids: torch.Tensor, query_ids: list[int], k: int) -> list[list[tuple[int, float]]]:
    """For each query id, the k rows of `feats` (L2-normalized, instance ids `ids`) nearest to
    its own, itself left out: (instance id, cosine similarity), ranked as the retrieval metrics
    rank them (ties by the lower row), so the grid shows the neighbours the metrics count."""
    position = {int(i): p for p, i in enumerate(ids.tolist())}
    rows = torch.tensor([position[i] for i in query_ids])
    sims = similarities(feats[rows], feats, rows)
    order = ranked(sims, min(k, feats.shape[0] - 1))
    return [[(int(ids[j]), float(s)) for s, j in zip(vals, idx)] for vals, idx in zip(sims.gather(1, order), order)]


def log_pictures(
    model: nn.Module,
    test_split: SplitDir | str | Path,
    data_cfg: DataConfig,
    out_dir: str | Path,
    device=None,
    queries: int = 8,
    batch_size: int = 256,
) -> list[Path]:
    """Draw attention.png and retrieval.png for `queries` fixed test images into `out_dir`
    (retrieval.png alone, and the reason logged, for a backbone without spatial stages).

    `model` is an EmbeddingNet (or its backbone) on its device; `test_split` a SplitDir or a
    shard-set root (its `test` split is used). `device` is where the model lives (default: where
    its parameters are). Returns the paths written."""
    if not isinstance(test_split, SplitDir):
        test_split = open_split(test_split, "test")
    if device is not None and _param(model).device != torch.device(device):
        raise ValueError(f"log_pictures: the model is on {_param(model).device}, not on {device}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = Names.of(test_split)
    query_ids = pick_queries(test_split, queries)
    found = nearest(model, test_split, data_cfg, query_ids, TOP_K, batch_size)
    images = read_images(test_split, data_cfg, query_ids + [i for row in found for i, _ in row])
    query_images = [images[i] for i in query_ids]
    paths = []
    try:
        paths.append(attention_grid(model, query_images, out_dir / "attention.png", names))
    except NoSpatialMapsError as err:
        log.warning(f"no attention maps: {err}")
    paths.append(
        retrieval_grid(
            query_images, [[(images[i], s) for i, s in row] for row in found], out_dir / "retrieval.png", names
        )
    )
    return paths


# -- command line: pictures from a saved checkpoint --------------------------------------------
def _test_split(args, cfg) -> SplitDir:
    """The test split of --shards/--shards-url, or else of the run config's data section."""
    if args.shards or args.shards_url:
        return open_split(args.shards or cfg.data.shards, "test", args.shards_url, cfg.data.url_retry_seconds)
    return open_data_split(cfg.data, "test")


def main(argv=None) -> int:
    p = cli.parser("fgdist-pictures", __doc__)
    p.add_argument(
        "--model", "--checkpoint", required=True, help="a run folder (newest checkpoint) or a checkpoint folder"
    )
    p.add_argument("--shards", help="shard set root (default: the run config's data.shards and data.shards_url)")
    p.add_argument("--shards-url", help="read the tars from this URL (data.shards_url; manifests fetched when missing)")
    p.add_argument("--out", help="output folder (default: <run folder>/pictures)")
    p.add_argument("--num-queries", type=int, default=8, help="test images drawn as queries in the retrieval grid")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, cuda:1)")
    args = p.parse_args(argv)
    return cli.run_reporting(lambda: _pictures(args), (FileNotFoundError, ValueError))


def _pictures(args) -> int:
    model, cfg, folder = load_checkpoint_model(args.model)
    split = _test_split(args, cfg)
    out = Path(args.out) if args.out else folder.parent.parent / "pictures"
    paths = log_pictures(
        model.to(args.device), split, cfg.data, out, args.device, args.num_queries, cfg.eval.batch_size
    )
    print(f"pictures of {folder}: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
