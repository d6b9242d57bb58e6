"""Write a collection as a shard set: per split, tars grouped by super-class with contiguous
instance ids, a Parquet index and a manifest. Everything is written into a temporary folder
beside the output and renamed into place at the end, so a failed build leaves nothing that looks
like a shard set; an existing output is replaced only with overwrite and only if fgdist wrote it,
and never the source's own folder (fgdist/output_folder.py).

Bad data fails here, not hours into training: every image is decoded once, from the bytes about
to be written (`on_corrupt`: fail naming the record, or skip and list it in the manifest), and a
collection without a test split is refused unless `test_fraction` draws one.

Scale: the shards are fixed by the listing before any image is read (`plan_jobs`: each holds
up to shard_size consecutive records of one super-class, its first instance id the records
before it), so `workers` forked processes encode them in any order, and `build_part` encodes
part i of n on one machine; shards/assemble.py gives the final ids and joins parts. Serial,
parallel and partitioned builds write the same files."""

from __future__ import annotations

import hashlib
import inspect
import json
import multiprocessing
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from fgdist.data.shardset import DECODE_ERRORS, INDEX, INDEX_COLUMNS, UNLABELED, Manifest, sample_key, sha256_of
from fgdist.images import check_shape, open_image
from fgdist.output_folder import Inputs, atomic_folder
from shards.assemble import ShardResult, add_member, assemble_split, sample_meta, write_collection, write_part
from shards.sources import Collection, CorruptImageError, Record

# The build's own `--opt` keys (every source takes them): name -> what it does. Their defaults
# are build_shards' keyword defaults, so the CLI's help and the function cannot disagree.
BUILD_OPTIONS = {
    "on_corrupt": "fail: an undecodable image stops the build, naming it; skip: leave it out, listed in manifest.json",
    "test_fraction": "for a source without test rows: draw this fraction (0 < F < 1) of its images as the test split",
    "split_seed": "the seed of the test_fraction draw",
}


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


# -- the plan: fixed by the listing before any image is read ---------------------------------------
@dataclass(frozen=True)
class ShardJob:
    """One tar to write: records [begin, end) of its split's listing, all of one super-class."""

    split: str
    number: int
    super_id: int
    first_id: int  # its first instance id when no image before it is skipped
    begin: int
    end: int

    @property
    def file(self) -> str:
        return f"{self.split}-{self.number:06d}.tar"


def sorted_by_super(split: str, records: list[Record], collection: Collection) -> list[Record]:
    """The split's listing: sorted by super-class, the source's order kept inside one; unlabeled
    training images (super id UNLABELED) last, the pool (docs/DESIGN.md, "The pool")."""
    num_super = len(collection.super_names)
    for record in records:
        if record.super_id == UNLABELED and split != "train":
            raise ValueError(
                f"{record.origin}: an unlabeled image (no super-class) in the {split} split; only training images "
                "may be unlabeled (evaluation needs each query's label)"
            )
        if not (0 <= record.super_id < num_super or record.super_id == UNLABELED):
            raise ValueError(
                f"{record.origin}: super id {record.super_id} outside the class table ({num_super} classes)"
            )
    return sorted(records, key=lambda record: num_super if record.super_id == UNLABELED else record.super_id)


def plan_jobs(split: str, listing: list[Record], shard_size: int) -> list[ShardJob]:
    """At most `shard_size` consecutive records of one super-class per shard."""
    jobs, begin = [], 0
    while begin < len(listing):
        super_id, end = listing[begin].super_id, begin
        while end < len(listing) and end - begin < shard_size and listing[end].super_id == super_id:
            end += 1
        jobs.append(ShardJob(split, len(jobs), super_id, begin, begin, end))
        begin = end
    return jobs


def part_of(jobs: list[ShardJob], part: tuple[int, int]) -> list[ShardJob]:
    """Part i of n: the jobs whose first record falls in the i-th n-th of the listing (contiguous,
    about equal in images)."""
    index, count = part
    total = jobs[-1].end if jobs else 0
    return [job for job in jobs if min(count - 1, job.begin * count // total) == index]


def listing_digest(collection: Collection, listings: dict[str, list[Record]], settings: dict) -> str:
    """What a partitioned build's parts must share: the class tables, every record's labels, type
    and origin in listing order, and the build's settings (source, options, shard size)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(
        json.dumps([collection.name, collection.super_names, collection.fine_names, collection.fine_to_super]).encode()
    )
    for split, listing in listings.items():
        h.update(f"\n{split}\n".encode())
        for record in listing:
            h.update(f"{record.super_id}\t{record.fine_id}\t{record.ext}\t{record.origin}\n".encode())
    return h.hexdigest()


# -- encoding: one job per call, in this process or a worker ----------------------------------------
# What worker processes read: set before they are forked (records hold closures, which do not
# pickle), so a job crosses to them as a few integers.
_WORK: dict = {}


def _encode(job: ShardJob) -> tuple[ShardResult, dict[str, list]]:
    """Write one shard's tar: (its result, its index rows as columns)."""
    listing, folder, on_corrupt = _WORK["listings"][job.split], _WORK["folders"][job.split], _WORK["on_corrupt"]
    index = {column: [] for column in INDEX_COLUMNS}
    skipped, instance = [], job.first_id
    path = folder / job.file
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for record in listing[job.begin : job.end]:
            try:
                data = _checked_bytes(record)
            except CorruptImageError as err:
                if on_corrupt == "fail":
                    raise CorruptImageError(f"{err}; pass --opt on_corrupt=skip to leave such images out") from None
                skipped.append(record.origin)
                continue
            key = sample_key(instance)
            add_member(tar, f"{key}.{record.ext}", data)
            add_member(tar, f"{key}.json", sample_meta(instance, record.super_id, record.fine_id))
            row = (key, instance, record.super_id, record.fine_id, job.file, f"{key}.{record.ext}", record.origin)
            for column, value in zip(INDEX_COLUMNS, row):
                index[column].append(value)
            instance += 1
    count = instance - job.first_id
    if count == 0:
        path.unlink()
    sha256 = sha256_of(path) if count else ""
    return ShardResult(job.number, job.file, job.super_id, job.first_id, count, sha256, skipped), index


def _encoded(jobs: list[ShardJob], workers: int, pool, bar) -> list[tuple[ShardResult, pa.Table | None]]:
    """Every job's result in listing order (a worker's error, the first in listing order, is raised here)."""
    results = map(_encode, jobs) if workers == 1 else pool.imap(_encode, jobs)
    done, skipped = [], 0
    for job, (result, index) in zip(jobs, results):
        done.append((result, pa.table(index) if result.count else None))
        bar.update(job.end - job.begin)
        if result.skipped:
            skipped += len(result.skipped)
            bar.set_postfix(skipped=skipped)
    return done


@contextmanager
def _workers(count: int, listings: dict, folders: dict, on_corrupt: str):
    """A pool of `count` forked encoders (None for 1: encode in this process)."""
    _WORK.update(listings=listings, folders=folders, on_corrupt=on_corrupt)
    try:
        if count == 1:
            yield None
        else:
            with multiprocessing.get_context("fork").Pool(count) as pool:
                yield pool
    finally:
        _WORK.clear()


def with_test_split(collection: Collection, test_fraction: float | None, split_seed: int) -> dict[str, list[Record]]:
    """The collection's splits, with a test split: training evaluates on it, so a source without
    test rows gets a seeded random `test_fraction` of its labeled train rows (unlabeled ones stay
    in train, after them), or an error now."""
    rows = collection.splits.get("train", [])
    train, unlabeled = [r for r in rows if r.super_id != UNLABELED], [r for r in rows if r.super_id == UNLABELED]
    test = collection.splits.get("test", [])
    if unlabeled and not train:
        raise ValueError(
            f"{collection.name}: no labeled training image ({len(unlabeled)} unlabeled); the super-classes need some"
        )
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
        "train": [r for r, c in zip(train, chosen) if not c] + unlabeled,
        "test": [r for r, c in zip(train, chosen) if c],
    }


def _plan(collection: Collection, shard_size, on_corrupt, workers, test_fraction, split_seed):
    """(listing per split, shard jobs per split), after checking the settings."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    splits = with_test_split(collection, test_fraction, split_seed)
    listings = {split: sorted_by_super(split, records, collection) for split, records in splits.items()}
    return listings, {split: plan_jobs(split, listing, shard_size) for split, listing in listings.items()}


def _encode_splits(collection, listings, jobs, partial, workers, on_corrupt, progress):
    """{split: [(result, index rows)]}: the jobs encoded into partial/<split>/."""
    folders = {split: partial / split for split in jobs}
    for folder in folders.values():
        folder.mkdir(parents=True)
    encoded = {}
    with _workers(workers, listings, folders, on_corrupt) as pool:
        for split, split_jobs in jobs.items():
            images = sum(job.end - job.begin for job in split_jobs)
            with tqdm(total=images, desc=f"{collection.name} {split}", unit="img", disable=not progress) as bar:
                encoded[split] = _encoded(split_jobs, workers, pool, bar)
    return encoded


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
    workers: int = 1,
) -> dict[str, Manifest]:
    """Build `collection` into the shard set `out` with `workers` encoding processes
    (fgdist/output_folder.py: written whole or not at all; an existing `out` is replaced only
    with `overwrite` and only if fgdist wrote it; `inputs`, e.g. {"--path": root}, are never
    written over). Any number of workers writes the same files."""
    listings, jobs = _plan(collection, shard_size, on_corrupt, workers, test_fraction, split_seed)
    with atomic_folder(out, overwrite, "shards", inputs) as partial:
        encoded = _encode_splits(collection, listings, jobs, partial, workers, on_corrupt, progress)
        manifests = {
            split: assemble_split(split, collection, [(*r, partial / split) for r in results], partial / split)
            for split, results in encoded.items()
        }
        write_collection(partial, collection.name, manifests)
    return manifests


def build_part(
    collection: Collection, out: str | Path, part: tuple[int, int], source: dict | None = None, **options
) -> dict[str, list[ShardResult]]:
    """Build part `part` = (i, n) of `collection` into the folder `out` (an fgdist output like a
    shard set), for `merge_parts` to join with the other n - 1. `options`: build_shards' keyword
    arguments. `source` (the source's name and options) goes into the listing digest, which every
    part of one build must share."""
    index, count = part
    if not 0 <= index < count:
        raise ValueError(f"part must be I/N with 0 <= I < N, got {index}/{count}")
    bound = inspect.signature(build_shards).bind(collection, out, **options)
    bound.apply_defaults()
    o = bound.arguments
    listings, all_jobs = _plan(
        collection, o["shard_size"], o["on_corrupt"], o["workers"], o["test_fraction"], o["split_seed"]
    )
    jobs = {split: part_of(split_jobs, part) for split, split_jobs in all_jobs.items()}
    settings = {key: o[key] for key in ("shard_size", "on_corrupt", "test_fraction", "split_seed")} | {"source": source}
    with atomic_folder(out, o["overwrite"], "shards-part", o["inputs"]) as partial:
        encoded = _encode_splits(collection, listings, jobs, partial, o["workers"], o["on_corrupt"], o["progress"])
        for split, results in encoded.items():
            tables = [rows for _, rows in results if rows is not None]
            if tables:
                pq.write_table(pa.concat_tables(tables).combine_chunks(), partial / split / INDEX)
        results = {split: [result for result, _ in done] for split, done in encoded.items()}
        counts = {split: len(split_jobs) for split, split_jobs in all_jobs.items()}
        write_part(partial, part, listing_digest(collection, listings, settings), collection, counts, results)
    return results
