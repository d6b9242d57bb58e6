"""Embed images with a trained model into a Parquet dataset (see fgdist/embeddings_io.py).

    fgdist-embed --model runs/synthetic --shards data/synthetic --split test --out emb/test
    fgdist-embed --model runs/sop --shards data/sop --shards-url http://storage/sop --out emb/sop   # tars over HTTP
    fgdist-embed --model <mlflow run id> --images photos/ --out emb/photos --fp16
    fgdist-embed --model exported/m --manifest images.csv --out emb/mine     # columns path[,super[,fine]]
    torchrun --nproc_per_node 2 -m fgdist.retrieval.embed --model ... --out ...        # or deepspeed --num_gpus 2

Labels are read as `shards build` reads them (shared code in shards/sources/files.py): `--images`
takes `<super>/<fine>/` subfolders as classes (other images are unlabelled, -1), `--manifest` the
columns path[,super[,fine]] (names, or integer ids kept as they are); with `--shards` the names
come from the shard manifest and each image's path from the shard index's `source`.

Every rank embeds its share (shards dealt out as in evaluation, files by position) with the
evaluation transform and writes its own `part-<rank>.parquet` into `.<out>.partial`; once all
ranks have written, rank 0 adds `_embeddings.json` and renames the folder to `out`. A rank that
fails (an image that does not decode) fails them all, and no output is left.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from fgdist import cli
from fgdist.collectives import any_rank, barrier, sum_over_ranks
from fgdist.data.shardset import DECODE_ERRORS
from fgdist.embeddings_io import FORMAT, META, TEXT_COLUMNS, to_table
from fgdist.images import check_shape, open_image
from fgdist.output_folder import begin, check_free, partial_path, publish
from fgdist.retrieval.export import ImageEmbedder, describe, eval_transform, load_model
from fgdist.search_errors import ERRORS, ImageDecodeError, ImageTooSmallError
from shards.sources.files import IMAGE_SUFFIXES, ListedImage, class_tables, read_manifest, tree_images, tree_labels


@dataclass(frozen=True)
class ImageFile:
    key: str
    instance: int
    super: int
    fine: int
    path: Path  # the file on disk
    super_name: str | None = None
    fine_name: str | None = None
    source: str | None = None  # the path as the user knows it (the `path` column of the embeddings)


def _image_files(listed: list[ListedImage]) -> list[ImageFile]:
    """Keys are the listed paths, instances the positions, ids those `shards build` would give."""
    tables = class_tables(listed)
    return [
        ImageFile(image.listed, i, *tables.ids(image), image.file, image.super, image.fine, image.listed)
        for i, image in enumerate(listed)
    ]


def folder_files(root: str | Path) -> list[ImageFile]:
    """Every image under `root`, sorted by relative path (the key). An image at
    `root/<super>/<fine>/` or `root/<super>/` has those labels, as `shards build --source folder`
    reads them (the fine class named `super/fine`); any other image (at the root, or deeper) has
    none (-1)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    paths = tree_images(root)
    if not paths:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    relative = [p.relative_to(root) for p in paths]
    return _image_files([ListedImage(p, r.as_posix(), *tree_labels(r), str(p)) for p, r in zip(paths, relative)])


def manifest_files(path: str | Path) -> list[ImageFile]:
    """A CSV or Parquet manifest read as `shards build --source manifest` reads it (same columns,
    names or integer ids, same checks), except that `super` is optional: without it the images
    are unlabelled (-1). The key is the path as written, the instance the row number."""
    return _image_files(read_manifest(path))


def decode(path: Path, transform) -> torch.Tensor:
    """One image file through `transform` (export.eval_transform); a file that does not decode is
    named (ImageDecodeError), and so is one too small or too elongated to embed (ImageTooSmallError)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'is a directory, not an image' if path.is_dir() else 'no such image file'}")
    try:
        img = open_image(path.read_bytes())
        check_shape(img.size, str(path))
        return transform(img, None)
    except ImageTooSmallError:
        raise
    except DECODE_ERRORS as err:
        raise ImageDecodeError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None


def file_batches(files: list[ImageFile], embedder: ImageEmbedder, batch_size: int):
    transform = eval_transform(embedder.preprocessing)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        yield {
            "images": torch.stack([decode(f.path, transform) for f in chunk]),
            "key": [f.key for f in chunk],
            "instance": torch.tensor([f.instance for f in chunk]),
            "super": torch.tensor([f.super for f in chunk]),
            "fine": torch.tensor([f.fine for f in chunk]),
            "super_name": [f.super_name for f in chunk],
            "fine_name": [f.fine_name for f in chunk],
            "path": [f.source for f in chunk],
        }


def shard_batches(
    root: str, split_name: str, embedder: ImageEmbedder, batch_size: int, rank: int, world_size: int, url=None
):
    """This rank's share of a shard split, dealt out exactly as the evaluation deals it, with the
    class names of the shard manifest and each image's `source` from the shard index. With `url`
    the tars are read from there (data.shards_url), the manifest and index fetched when missing."""
    from fgdist.config import DataConfig
    from fgdist.data.loader import eval_batches
    from fgdist.data.shardset import open_split, sample_key

    split = open_split(root, split_name, url)
    super_names = [s.name for s in split.manifest.super_classes]
    cfg = DataConfig(shards=str(root), num_workers=1, **embedder.preprocessing)
    sources = shard_sources(split)
    for batch in eval_batches(split, cfg, batch_size, rank, world_size):
        instances = [int(i) for i in batch["instance"]]
        batch["key"] = [sample_key(i) for i in instances]
        batch["super_name"] = [_name(super_names, int(i)) for i in batch["super"]]
        batch["fine_name"] = [_name(split.manifest.fine_names, int(i)) for i in batch["fine"]]
        batch["path"] = [sources.get(i) for i in instances]
        yield batch


def _name(names: list[str], class_id: int) -> str | None:
    return names[class_id] if 0 <= class_id < len(names) else None


def shard_sources(split) -> dict[int, str]:
    """instance id -> the `source` column of a split's index.parquet (empty for shard sets
    written before that column existed)."""
    from fgdist.data.shardset import INDEX

    columns = pq.read_schema(split.path / INDEX).names
    if "source" not in columns:
        return {}
    table = pq.read_table(split.path / INDEX, columns=["instance_id", "source"])
    return dict(zip(table.column("instance_id").to_pylist(), table.column("source").to_pylist()))


def embed_batches(embedder: ImageEmbedder, batches, batch_size: int, fp16: bool, progress) -> tuple:
    """One table of this rank's rows. Every forward pass has `batch_size` images (a short batch
    is padded with zeros): convolution kernels pick their algorithm by batch size, so a short
    last batch would round differently, and the vectors would depend on how images were dealt
    to ranks. Equal shapes make 1-rank and k-rank outputs bitwise identical."""
    keys, instance, supers, fines, vectors = [], [], [], [], []
    text = {name: [] for name in TEXT_COLUMNS}
    with torch.no_grad():
        for batch in batches:
            images = batch["images"]
            padding = images.new_zeros((batch_size - len(images), *images.shape[1:]))
            vectors.append(embedder(torch.cat([images, padding]))[: len(images)].cpu())
            keys += batch["key"]
            instance.append(batch["instance"])
            supers.append(batch["super"])
            fines.append(batch["fine"])
            for name in TEXT_COLUMNS:
                text[name] += batch[name]
            progress.update(len(batch["key"]))
    if not vectors:
        return to_table([], [], [], [], torch.zeros(0, embedder.dim).numpy(), fp16)
    cat = [torch.cat(x).numpy() for x in (instance, supers, fines, vectors)]
    return to_table(keys, *cat, fp16, text)


def _world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun and deepspeed set both)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _inputs(args) -> dict:
    """What the output may not be, contain or lie inside (fgdist/output_folder.py)."""
    return {"--model": args.model, "--shards": args.shards, "--images": args.images, "--manifest": args.manifest}


def run(args) -> Path:
    rank, world_size = _world()
    out = Path(args.out)
    check_free(out, args.overwrite, _inputs(args))  # every rank, before any work
    embedder = load_model(args.model).to(cli.torch_device(args.device))
    if args.shards:
        source = {"kind": "shards", "root": str(Path(args.shards).resolve()), "split": args.split}
        if args.shards_url:
            source["url"] = args.shards_url
        batches = shard_batches(args.shards, args.split, embedder, args.batch_size, rank, world_size, args.shards_url)
        total = None
    else:
        files = folder_files(args.images) if args.images else manifest_files(args.manifest)
        where = Path(args.images or args.manifest).resolve()
        source = {"kind": "folder" if args.images else "manifest", "root": str(where)}
        mine = files[rank::world_size]
        batches, total = file_batches(mine, embedder, args.batch_size), len(mine)
    if world_size > 1:
        dist.init_process_group("gloo")
    try:
        if rank == 0:
            begin(out, args.overwrite, "embeddings", _inputs(args))
        barrier()
        partial = partial_path(out)
        failure = None
        started = time.time()
        bar = tqdm(total=total, unit="img", desc=f"embed rank {rank}/{world_size}", disable=rank != 0 or args.quiet)
        try:
            table = embed_batches(embedder, batches, args.batch_size, args.fp16, bar)
            pq.write_table(table, partial / f"part-{rank:05d}.parquet")
        except ERRORS + (FileNotFoundError, ValueError) as err:
            failure = err
        finally:
            bar.close()
        if any_rank(failure is not None):
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise failure or RuntimeError(f"rank {rank}: another rank failed; no output written")
        count = sum_over_ranks(torch.tensor([table.num_rows]))
        if rank == 0:
            meta = {
                "format": FORMAT,
                "count": int(count),
                "dim": embedder.dim,
                "dtype": "float16" if args.fp16 else "float32",
                "world_size": world_size,
                "model": describe(args.model),
                "images": source,
                "preprocessing": embedder.preprocessing,
                "seconds": time.time() - started,
            }
            (partial / META).write_text(json.dumps(meta, indent=1))
            publish(out)
        barrier()  # no rank reports success before the output is in place
        return out
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parse_args(argv=None):
    p = cli.parser("fgdist-embed", __doc__)
    p.add_argument("--model", required=True, help="a run, checkpoint or export folder, an MLflow run id or model URI")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--shards", help="a shard set root (with --split)")
    what.add_argument("--images", help="a folder of images (searched recursively; <super>/<fine>/ folders are labels)")
    what.add_argument(
        "--manifest", help="a CSV or Parquet file with columns path[,super[,fine]] (names or integer ids)"
    )
    p.add_argument("--split", default="test", help="the shard split to embed")
    p.add_argument(
        "--shards-url", help="with --shards: read the tars from this URL (manifest and index fetched into --shards)"
    )
    p.add_argument("--out", required=True, help="the output folder (a Parquet dataset)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument(
        "--device", default="auto", help="where the model runs: auto (this rank's GPU if there is one), cpu, cuda:1"
    )
    p.add_argument("--fp16", action="store_true", help="store embeddings as float16 (half the size)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that fgdist wrote")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> int:
        out = run(args)
        if _world()[0] == 0:
            print(f"embeddings written to {out}")
        return 0

    return cli.run_reporting(body, ERRORS + (FileNotFoundError, ValueError), where=f"rank {_world()[0]}: ")


if __name__ == "__main__":
    raise SystemExit(main())
