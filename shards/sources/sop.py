"""Stanford Online Products: `Ebay_train.txt` and `Ebay_test.txt`, each a header line
`image_id class_id super_class_id path` and then rows like `1 1 1 bicycle_final/111085122871_0.JPG`;
images at `<root>/<path>`. super_class_id 1..12 is the super-class (named by the path's first
folder without `_final`), class_id 1..22634 the fine class (one product).

Splits: 'standard' keeps the two files (their fine classes are disjoint); 'paper' pools both and
draws a seeded random `train_size` images for train, the rest for test (the paper: 80,000 train).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.sources import Collection, Record, SourceError, jpeg_loader, parse_int, require_image_file

FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
HEADER = ["image_id", "class_id", "super_class_id", "path"]
NUM_FINE = 22634
NUM_SUPER = 12


def _parse(path: Path, root: Path):
    """Yield (where, class id, super id, super name, relative image path) per row of one file."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found (expected the Stanford Online Products folder)") from None
    if not lines or lines[0].split() != HEADER:
        raise SourceError(f"{path}:1: header {lines[0] if lines else ''!r}, expected {' '.join(HEADER)!r}")
    for lineno, line in enumerate(lines[1:], start=2):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4:
            raise SourceError(f"{where}: expected '{' '.join(HEADER)}', got {line!r}")
        parse_int(fields[0], "image_id", where)
        class_id = parse_int(fields[1], "class_id", where)
        super_id = parse_int(fields[2], "super_class_id", where)
        image = fields[3]
        if not 1 <= class_id <= NUM_FINE:
            raise SourceError(f"{where}: class_id {class_id} out of range 1..{NUM_FINE}")
        if not 1 <= super_id <= NUM_SUPER:
            raise SourceError(f"{where}: super_class_id {super_id} out of range 1..{NUM_SUPER}")
        folder, sep, _ = image.partition("/")
        if not sep or not folder:
            raise SourceError(f"{where}: path {image!r} has no super-class folder (like bicycle_final/...)")
        require_image_file(root / image, where)
        yield where, class_id, super_id, folder.removesuffix("_final"), image


def open_sop(
    root: str,
    split: str = "paper",
    seed: int = 0,
    train_size: int = 80000,
    shorter_side: int = 256,
    jpeg_quality: int = 90,
) -> Collection:
    if split not in ("paper", "standard"):
        raise ValueError(f"sop: split must be 'paper' or 'standard', got {split!r}")
    base = Path(root)
    pool = []  # (file's split, where, class id, super id, image path)
    super_name: dict[int, tuple[str, str]] = {}  # super id -> (name, where first seen)
    class_super: dict[int, tuple[int, str]] = {}  # class id -> (super id, where first seen)
    seen_images: dict[str, str] = {}
    for file_split, file in FILES.items():
        for where, class_id, super_id, name, image in _parse(base / file, base):
            known = super_name.setdefault(super_id, (name, where))
            if known[0] != name:
                raise SourceError(
                    f"{where}: super_class_id {super_id} is folder {name!r}, but {known[0]!r} at {known[1]}"
                )
            owner = class_super.setdefault(class_id, (super_id, where))
            if owner[0] != super_id:
                raise SourceError(
                    f"{where}: class_id {class_id} under super_class_id {super_id}, but under {owner[0]} at {owner[1]}"
                )
            if image in seen_images:
                raise SourceError(f"{where}: {image} is already listed at {seen_images[image]}")
            seen_images[image] = where
            pool.append((file_split, where, class_id, super_id, image))

    # Class tables from the pooled files in id order, so both splits (either split mode) share them.
    super_of = {s: i for i, s in enumerate(sorted(super_name))}
    fine_of = {c: i for i, c in enumerate(sorted(class_super))}
    collection = Collection(
        "stanford-online-products",
        [super_name[s][0] for s in sorted(super_name)],
        [f"{super_name[class_super[c][0]][0]}/{c}" for c in sorted(class_super)],
        [super_of[class_super[c][0]] for c in sorted(class_super)],
    )

    if split == "standard":
        assignment = [file_split for file_split, *_ in pool]
    else:
        if isinstance(train_size, bool) or not isinstance(train_size, int) or not 0 < train_size < len(pool):
            raise ValueError(
                f"sop: train_size must be an integer with 0 < train_size < {len(pool)} (the images in "
                f"{FILES['train']} and "
                f"{FILES['test']} together), got {train_size!r}"
            )
        chosen = np.zeros(len(pool), dtype=bool)
        chosen[np.random.default_rng(seed).permutation(len(pool))[:train_size]] = True
        assignment = ["train" if c else "test" for c in chosen]

    collection.splits = {"train": [], "test": []}
    for to, (_, where, class_id, super_id, image) in zip(assignment, pool):
        record = Record(
            super_of[super_id],
            fine_of[class_id],
            jpeg_loader(base / image, shorter_side, jpeg_quality),
            "jpg",
            f"{where} {image}",
        )
        collection.splits[to].append(record)
    return collection
