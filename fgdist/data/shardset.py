"""A shard set on disk: one folder per split holding WebDataset tars grouped by super-class,
`index.parquet` (one row per sample) and `manifest.json` (per shard and per super-class).

Instance ids are sorted by super-class and contiguous within one; every shard holds one
super-class and a contiguous instance range. Unlabeled training images (the pool) come after
every super-class: their shards hold only pool rows, their super and fine ids are -1 (in the
index and in each sample's `.json`), and the manifest's `pool` records their instance range
(docs/DESIGN.md, "The pool"). This module reads and checks that layout; the builder in `shards/`
writes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from fgdist.data.remote import ShardReadError, ShardStream, TarReader, fetch_file, join_url
from fgdist.images import open_image

FORMAT = "fgdist-shards/1"
MANIFEST = "manifest.json"
INDEX = "index.parquet"
COLLECTION = "collection.json"  # the shard set root's: its name and splits
PART = "part.json"  # the root of one part of a partitioned build (`shards build --part I/N`)
IMAGE_EXTS = ("png", "jpg")
# What Pillow raises for bytes that are not a whole image (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
INDEX_COLUMNS = ("key", "instance_id", "super_id", "fine_id", "shard", "member", "source")


class ShardSetError(ValueError):
    """A shard set that does not match its manifest; the message names the file."""


# The super (and fine) id of an unlabeled row, in the index, the samples' `.json` and ShardInfo.
UNLABELED = -1


@dataclass(frozen=True)
class ShardInfo:
    file: str
    super_id: int  # UNLABELED for a shard of the pool
    instance_begin: int
    instance_end: int  # exclusive
    count: int
    sha256: str


@dataclass(frozen=True)
class SuperClassInfo:
    id: int
    name: str
    instance_begin: int
    instance_end: int


@dataclass(frozen=True)
class PoolInfo:
    """The unlabeled training images: instance ids [instance_begin, instance_end), after every
    super-class; `count` is their number (written out for readers of manifest.json)."""

    instance_begin: int
    instance_end: int
    count: int


@dataclass(frozen=True)
class Manifest:
    split: str
    num_instances: int
    super_classes: list[SuperClassInfo]
    fine_names: list[str]
    fine_to_super: list[int]
    shards: list[ShardInfo]
    # Origins of the images the build skipped as undecodable (`--opt on_corrupt=skip`).
    skipped_corrupt: list[str] = field(default_factory=list)
    format: str = FORMAT
    # The unlabeled training images (train split only); None: none (and every shard set written
    # before the pool existed).
    pool: PoolInfo | None = None

    @property
    def num_super(self) -> int:
        return len(self.super_classes)

    @property
    def num_unlabeled(self) -> int:
        return self.pool.count if self.pool else 0

    @property
    def num_fine(self) -> int:
        return len(self.fine_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def from_json(text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ShardSetError(f"{where}: format {raw.get('format')!r}, expected {FORMAT!r}")
            return Manifest(
                split=raw["split"],
                num_instances=int(raw["num_instances"]),
                super_classes=[SuperClassInfo(**s) for s in raw["super_classes"]],
                fine_names=list(raw["fine_names"]),
                fine_to_super=[int(v) for v in raw["fine_to_super"]],
                shards=[ShardInfo(**s) for s in raw["shards"]],
                skipped_corrupt=[str(v) for v in raw.get("skipped_corrupt", [])],
                pool=PoolInfo(**raw["pool"]) if raw.get("pool") else None,
            )
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ShardSetError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class SplitDir:
    """One split of a shard set: its folder (manifest and index), its manifest, and the URL its
    tars are read from (None: from the folder)."""

    path: Path
    manifest: Manifest
    url: str | None = None

    def shard_path(self, shard: ShardInfo) -> str:
        return f"{self.url}/{shard.file}" if self.url else str(self.path / shard.file)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_split(root: str | Path, split: str, url: str | None = None, retry_seconds: float = 60.0) -> SplitDir:
    """Open `root/split`, checking that the manifest is consistent and its tars are present.

    With `url` (data.shards_url) the tars are read from `url/split/`; the manifest and index are
    read from `root/split/`, fetched from the URL first if they are not there (fgdist/data/remote.py)."""
    path = Path(root) / split
    manifest_path = path / MANIFEST
    if url:
        fetch_small_files(url, Path(root), split, retry_seconds)
    if not manifest_path.is_file():
        hint = " (one part of a partitioned build: merge the parts first)" if (Path(root) / PART).is_file() else ""
        raise ShardSetError(
            f"{manifest_path}: no manifest (is {root} a shard set built by `python -m shards build`?){hint}"
        )
    manifest = Manifest.from_json(manifest_path.read_text(), str(manifest_path))
    check_manifest(manifest, str(manifest_path))
    if url:
        return SplitDir(path, manifest, f"{url.rstrip('/')}/{split}")
    for shard in manifest.shards:
        if not (path / shard.file).is_file():
            raise ShardSetError(f"{manifest_path}: shard {shard.file} is listed but missing from {path}")
    listed = {s.file for s in manifest.shards}
    stray = sorted(p.name for p in path.glob("*.tar") if p.name not in listed)
    if stray:
        raise ShardSetError(f"{manifest_path}: tar files not in the manifest: {', '.join(stray)}")
    return SplitDir(path, manifest)


def fetch_small_files(url: str, root: Path, split: str, retry_seconds: float) -> None:
    """`collection.json` and the split's `index.parquet` and `manifest.json` from `url` into
    `root`, those missing; the manifest last, so a manifest on disk means its index is there too."""
    if (root / split / MANIFEST).is_file():
        return
    for name in (COLLECTION, f"{split}/{INDEX}", f"{split}/{MANIFEST}"):
        fetch_file(join_url(url, name), root / name, retry_seconds)


def reader_for(split: SplitDir, retry_seconds: float) -> TarReader:
    """The reader of a split's shards: those read through a URL are checked against the manifest."""
    checksums = {split.shard_path(s): s.sha256 for s in split.manifest.shards} if split.url else {}
    return TarReader(retry_seconds, checksums)


def check_manifest(manifest: Manifest, where: str) -> None:
    """The invariants the partition and the routing rely on: super-classes, then the pool, tile
    [0, num_instances); shards tile it in the same order, each inside one super-class or the pool."""
    expected = 0
    for s in manifest.super_classes:
        if s.instance_begin != expected or s.instance_end < s.instance_begin:
            raise ShardSetError(
                f"{where}: super-class {s.id} ({s.name}) range [{s.instance_begin}, {s.instance_end}) is not "
                f"contiguous after {expected}"
            )
        expected = s.instance_end
    pool = manifest.pool
    if pool is not None:
        if pool.instance_begin != expected or pool.instance_end - pool.instance_begin != pool.count or not pool.count:
            raise ShardSetError(
                f"{where}: pool range [{pool.instance_begin}, {pool.instance_end}) with {pool.count} unlabeled images "
                f"does not follow the super-classes' end {expected}"
            )
        if manifest.split != "train":
            raise ShardSetError(f"{where}: split {manifest.split!r} holds unlabeled images; only train may")
        expected = pool.instance_end
    if expected != manifest.num_instances:
        raise ShardSetError(
            f"{where}: super-class and pool ranges cover {expected} instances, manifest says {manifest.num_instances}"
        )
    expected = 0
    for shard in manifest.shards:
        if shard.instance_begin != expected or shard.instance_end - shard.instance_begin != shard.count:
            raise ShardSetError(
                f"{where}: shard {shard.file} range [{shard.instance_begin}, {shard.instance_end}) with {shard.count} "
                f"samples does not follow {expected}"
            )
        owner = _shard_owner(manifest, shard, where)
        if not owner[0] <= shard.instance_begin <= shard.instance_end <= owner[1]:
            raise ShardSetError(f"{where}: shard {shard.file} crosses the range of {owner[2]}")
        expected = shard.instance_end
    if expected != manifest.num_instances:
        raise ShardSetError(f"{where}: shards hold {expected} samples, manifest says {manifest.num_instances}")


def _shard_owner(manifest: Manifest, shard: ShardInfo, where: str) -> tuple[int, int, str]:
    """(begin, end, name) of the range a shard must lie in: its super-class's, or the pool's."""
    if shard.super_id == UNLABELED and manifest.pool is not None:
        return manifest.pool.instance_begin, manifest.pool.instance_end, "the pool"
    if not 0 <= shard.super_id < manifest.num_super:
        raise ShardSetError(f"{where}: shard {shard.file} has super id {shard.super_id}, not a super-class here")
    owner = manifest.super_classes[shard.super_id]
    return owner.instance_begin, owner.instance_end, f"super-class {shard.super_id}"


def verify_split(split: SplitDir, retry_seconds: float = 60.0) -> list[str]:
    """Deep check of every shard against the manifest, each read once (through the split's URL
    when it has one): checksum, readable tar, members and their instance ids. Returns one
    problem per line (empty when all is well)."""
    problems = []
    for shard in split.manifest.shards:
        problems += _shard_problems(split.shard_path(shard), shard, retry_seconds)
    return problems


def _shard_problems(where: str, shard: ShardInfo, retry_seconds: float) -> list[str]:
    problems, keys = [], []
    try:
        stream = ShardStream(where, retry_seconds, hashed=True)
    except (ShardReadError, OSError) as err:
        return [f"{where}: cannot open ({err})"]
    try:
        for name, data in stream.members():
            key, _, ext = name.partition(".")
            keys.append(key)
            problem = image_problem(data) if ext in IMAGE_EXTS else None
            if problem:
                problems.append(f"{where}: member {name}: corrupt image ({problem})")
    except ShardReadError as err:
        problems.append(str(err))
        keys = None
    try:
        if stream.sha256() != shard.sha256:
            problems.insert(0, f"{where}: checksum does not match the manifest")
    except ShardReadError:  # the stream itself failed: reported above
        pass
    finally:
        stream.close(quietly=True)
    if keys is None:
        return problems
    unique = list(dict.fromkeys(keys))
    if len(unique) != shard.count:
        problems.append(f"{where}: {len(unique)} samples, manifest says {shard.count}")
    ids = [int(k) for k in unique if k.isdigit()]
    if ids != list(range(shard.instance_begin, shard.instance_begin + len(ids))):
        problems.append(f"{where}: instance ids are not the contiguous range starting at {shard.instance_begin}")
    return problems


def image_problem(data: bytes) -> str | None:
    """Why encoded image bytes do not decode (fully, every pixel), or None when they do. The one
    test of a good image: the builder, `verify` and a resumed stream all apply it."""
    try:
        open_image(data)
        return None
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"


def sample_key(instance_id: int) -> str:
    """A sample's key in its tar: the zero-padded instance id (no dots: WebDataset splits on them)."""
    return f"{instance_id:010d}"


def split_fingerprint(split: SplitDir) -> str:
    """sha256 of the split's shards as its manifest lists them (file, checksum, count): the same
    for every copy of one split (builds are reproducible), different for any other split."""
    shards = [(s.file, s.sha256, s.count) for s in split.manifest.shards]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()
