"""Write a collection as a shard set: per split, tars grouped by super-class with contiguous
instance ids, a Parquet index and a manifest. Everything is written into a temporary folder
beside the output and renamed into place at the end, so a failed build leaves nothing that looks
like a shard set; an existing output is replaced only with overwrite and only if fgdist wrote it,
and never the source's own folder (fgdist/output_folder.py).

Bad data fails here, not hours into training: every image is decoded once, from the bytes about
to be written (`on_corrupt`: fail naming the record, or skip and list it in the manifest), and a
collection without a test split is refused unless `test_fraction` draws one."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from fgdist.images import check_shape, open_image
from fgdist.output_folder import Inputs, atomic_folder
from fgdist.shardset import (
    COLLECTION,
    DECODE_ERRORS,
    INDEX,
    INDEX_COLUMNS,
    MANIFEST,
    Manifest,
    ShardInfo,
    SuperClassInfo,
    sample_key,
    sha256_of,
)
from shards.sources import Collection, CorruptImageError, Record

# The build's own `--opt` keys (every source takes them): name -> what it does. Their defaults
# are build_shards' keyword defaults, so the CLI's help and the function cannot disagree.
BUILD_OPTIONS = {
    "on_corrupt": "fail: an undecodable image stops the build, naming it; skip: leave it out, listed in manifest.json",
    "test_fraction": "for a source without test rows: draw this fraction (0 < F < 1) of its images as the test split",
    "split_seed": "the seed of the test_fraction draw",
}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible tars: same input, same bytes, same checksum
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _checked_bytes(record: Record) -> bytes:
    """The record's encoded image, decoded once here: what goes into the tar is known to decode,
    and to be large enough to train on (fgdist.images.check_shape, the test every query image
    meets: such an image is an error naming its record, whatever on_corrupt says)."""
    try:
        data = record.load()
    except CorruptImageError as err:
        raise CorruptImageError(f"{record.origin}: {err}") from None
    try:
        size = open_image(data).size
    except DECODE_ERRORS as err:
        raise CorruptImageError(f"{record.origin}: cannot decode image ({type(err).__name__}: {err})") from None
    check_shape(size, record.origin)
    return data


class _ShardWriter:
    """Tars of one super-class, each at most `shard_size` samples; `add` rolls to the next."""

    def __init__(self, out: Path, split: str, super_id: int, shard_size: int, shards: list[ShardInfo]):
        self.out, self.split, self.super_id, self.shard_size, self.shards = out, split, super_id, shard_size, shards
        self.tar, self.file, self.first, self.count = None, "", 0, 0

    def add(self, instance_id: int, record: Record, data: bytes) -> str:
        if self.tar is not None and self.count == self.shard_size:
            self.close()
        if self.tar is None:
            self.file = f"{self.split}-{len(self.shards):06d}.tar"
            self.tar = tarfile.open(self.out / self.file, "w", format=tarfile.USTAR_FORMAT)
            self.first, self.count = instance_id, 0
        key = sample_key(instance_id)
        meta = {"instance": instance_id, "super": record.super_id, "fine": record.fine_id}
        _add_member(self.tar, f"{key}.{record.ext}", data)
        _add_member(self.tar, f"{key}.json", json.dumps(meta).encode())
        self.count += 1
        return self.file

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        end = self.first + self.count
        self.shards.append(
            ShardInfo(self.file, self.super_id, self.first, end, self.count, sha256_of(self.out / self.file))
        )
        self.tar = None


def _write_split(
    split: str, records: list[Record], collection: Collection, out: Path, shard_size: int, progress: bool, on_corrupt
) -> Manifest:
    out.mkdir(parents=True)
    by_super: list[list[Record]] = [[] for _ in collection.super_names]
    for record in records:  # source order kept inside a super-class
        if not 0 <= record.super_id < len(by_super):
            raise ValueError(
                f"{record.origin}: super id {record.super_id} outside the class table ({len(by_super)} classes)"
            )
        by_super[record.super_id].append(record)
    super_infos, shard_infos, skipped = [], [], []
    index = {column: [] for column in INDEX_COLUMNS}
    bar = tqdm(total=len(records), desc=f"{collection.name} {split}", unit="img", disable=not progress)
    next_id = 0  # instance ids: sorted by super-class, contiguous, assigned to the images kept
    for super_id, (name, members) in enumerate(zip(collection.super_names, by_super)):
        begin = next_id
        writer = _ShardWriter(out, split, super_id, shard_size, shard_infos)
        for record in members:
            bar.update(1)
            try:
                data = _checked_bytes(record)
            except CorruptImageError as err:
                if on_corrupt == "fail":
                    raise CorruptImageError(f"{err}; pass --opt on_corrupt=skip to leave such images out") from None
                skipped.append(record.origin)
                bar.set_postfix(skipped=len(skipped))
                continue
            file = writer.add(next_id, record, data)
            key = sample_key(next_id)
            row = (key, next_id, record.super_id, record.fine_id, file, f"{key}.{record.ext}", record.origin)
            for column, value in zip(INDEX_COLUMNS, row):
                index[column].append(value)
            next_id += 1
        writer.close()
        super_infos.append(SuperClassInfo(super_id, name, begin, next_id))
    bar.close()
    if next_id == 0:
        raise ValueError(f"{collection.name} {split}: no image to write ({len(skipped)} skipped as undecodable)")
    pq.write_table(pa.table(index), out / INDEX)
    manifest = Manifest(
        split, next_id, super_infos, list(collection.fine_names), list(collection.fine_to_super), shard_infos, skipped
    )
    (out / MANIFEST).write_text(manifest.to_json())
    return manifest


def with_test_split(collection: Collection, test_fraction: float | None, split_seed: int) -> dict[str, list[Record]]:
    """The collection's splits, with a test split: training evaluates on it, so a source without
    test rows gets a seeded random `test_fraction` of its train rows, or an error now."""
    train, test = collection.splits.get("train", []), collection.splits.get("test", [])
    if test_fraction is None:
        if not test:
            raise ValueError(
                f"{collection.name}: no test rows ({len(train)} train); training needs a test split: give rows "
                "split=test, or pass --opt test_fraction=F to draw one"
            )
        return collection.splits
    if test:
        raise ValueError(
            f"{collection.name}: test_fraction={test_fraction} given, but the source has {len(test)} test rows already"
        )
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise ValueError(f"split_seed must be an integer, got {split_seed!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number with 0 < F < 1, got {test_fraction!r}")
    count = round(test_fraction * len(train))
    if not 0 < count < len(train):
        raise ValueError(
            f"{collection.name}: test_fraction={test_fraction} of {len(train)} train rows leaves "
            f"{count} test rows; both splits need at least one"
        )
    chosen = np.zeros(len(train), dtype=bool)
    chosen[np.random.default_rng(split_seed).permutation(len(train))[:count]] = True
    return {
        **collection.splits,
        "train": [r for r, c in zip(train, chosen) if not c],
        "test": [r for r, c in zip(train, chosen) if c],
    }


def build_shards(
    collection: Collection,
    out: str | Path,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    on_corrupt: str = "fail",
    test_fraction: float | None = None,
    split_seed: int = 0,
    inputs: Inputs | None = None,
) -> dict[str, Manifest]:
    """Build `collection` into the shard set `out` (fgdist/output_folder.py: written whole or not at
    all; an existing `out` is replaced only with `overwrite` and only if fgdist wrote it; `inputs`,
    e.g. {"--path": root}, are never written over)."""
    out = Path(out)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    splits = with_test_split(collection, test_fraction, split_seed)
    with atomic_folder(out, overwrite, "shards", inputs) as partial:
        manifests = {
            split: _write_split(split, records, collection, partial / split, shard_size, progress, on_corrupt)
            for split, records in splits.items()
        }
        (partial / COLLECTION).write_text(json.dumps({"name": collection.name, "splits": sorted(manifests)}, indent=1))
    return manifests
