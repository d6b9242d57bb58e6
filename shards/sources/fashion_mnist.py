"""Fashion-MNIST from its IDX files (Debian package `dataset-fashion-mnist`), with the
super-class grouping of docs/DESIGN.md ("The data sets"): tops, trouser, dress, footwear, bag."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from fgdist.data.shardset import UNLABELED
from shards.sources import Collection, Record, SourceError, encode_png

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FINE_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SUPER_NAMES = ["tops", "trouser", "dress", "footwear", "bag"]
FINE_TO_SUPER = [0, 1, 0, 2, 0, 3, 0, 3, 4, 3]
FILES = {"train": "train", "test": "t10k"}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SourceError(
            f"{path}: file not found (apt-get install dataset-fashion-mnist, or pass --path FOLDER)"
        ) from None
    (got,) = struct.unpack(">I", data[:4])
    if got != magic:
        raise SourceError(f"{path}: not an IDX file of the expected kind (magic {got:#x}, expected {magic:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise SourceError(f"{path}: truncated IDX file ({array.size} bytes of data, header says {dims})")
    return array.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    return root / (stem + ".gz")


def open_fashion_mnist(
    root: str = DEFAULT_ROOT, limit_per_split: int | None = None, limit_train: int | None = None, unlabeled: int = 0
) -> Collection:
    """limit_per_split: only the first N images of each split; limit_train: of the train split
    only (a small training set measured on the whole test split). unlabeled: the next N training
    images after the labeled ones, their labels dropped (the pool, docs/DESIGN.md "The pool")."""
    if isinstance(unlabeled, bool) or not isinstance(unlabeled, int) or unlabeled < 0:
        raise SourceError(f"fashion-mnist: unlabeled must be an integer >= 0, got {unlabeled!r}")
    base = Path(root)
    collection = Collection("fashion-mnist", SUPER_NAMES, FINE_NAMES, FINE_TO_SUPER)
    for split, prefix in FILES.items():
        images_path = _find(base, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(base, f"{prefix}-labels-idx1-ubyte")
        images = _read_idx(images_path, 0x803)
        labels = _read_idx(labels_path, 0x801)
        if len(images) != len(labels):
            raise SourceError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
        limit = limit_train if split == "train" and limit_train is not None else limit_per_split
        count = len(labels) if limit is None else min(limit, len(labels))
        records = []
        for i in range(count):
            fine = int(labels[i])
            if fine >= len(FINE_NAMES):
                raise SourceError(f"{labels_path}: item {i}: label {fine} out of range 0..9")
            records.append(_record(images, i, FINE_TO_SUPER[fine], fine, images_path))
        if split == "train":
            records += _unlabeled(images, count, unlabeled, images_path)
        collection.splits[split] = records
    return collection


def _record(images: np.ndarray, i: int, super_id: int, fine: int, images_path: Path) -> Record:
    return Record(
        super_id, fine, (lambda a=images[i]: encode_png(Image.fromarray(a))), "png", f"{images_path.name}#{i}"
    )


def _unlabeled(images: np.ndarray, labeled: int, count: int, images_path: Path) -> list[Record]:
    """Images [labeled, labeled + count) of the training file as unlabeled records."""
    if labeled + count > len(images):
        raise SourceError(
            f"{images_path}: unlabeled={count} asks for images {labeled}..{labeled + count - 1}, but the file holds "
            f"{len(images)} ({len(images) - labeled} after the {labeled} labeled ones; lower limit_train or unlabeled)"
        )
    return [_record(images, i, UNLABELED, UNLABELED, images_path) for i in range(labeled, labeled + count)]
