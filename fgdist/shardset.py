"""A shard set on disk: one folder per split holding WebDataset tars grouped by super-class,
`index.parquet` (one row per sample) and `manifest.json` (per shard and per super-class).

Instance ids are sorted by super-class and contiguous within one; every shard holds one
super-class and a contiguous instance range. This module reads and checks that layout; the
builder in `shards/` writes it.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from fgdist.images import open_image

FORMAT = "fgdist-shards/1"
MANIFEST = "manifest.json"
INDEX = "index.parquet"
COLLECTION = "collection.json"  # the shard set root's: its name and splits
IMAGE_EXTS = ("png", "jpg")
# What Pillow raises for bytes that are not a whole image (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
INDEX_COLUMNS = ("key", "instance_id", "super_id", "fine_id", "shard", "member", "source")


class ShardSetError(ValueError):
    """A shard set that does not match its manifest; the message names the file."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    super_id: int
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

    @property
    def num_super(self) -> int:
        return len(self.super_classes)

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
            )
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ShardSetError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class SplitDir:
    """One split of a shard set: its folder and its manifest."""

    path: Path
    manifest: Manifest

    def shard_path(self, shard: ShardInfo) -> str:
        return str(self.path / shard.file)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_split(root: str | Path, split: str) -> SplitDir:
    """Open `root/split`, checking that the manifest is consistent and its tars are present."""
    path = Path(root) / split
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ShardSetError(f"{manifest_path}: no manifest (is {root} a shard set built by `python -m shards build`?)")
    manifest = Manifest.from_json(manifest_path.read_text(), str(manifest_path))
    check_manifest(manifest, str(manifest_path))
    for shard in manifest.shards:
        if not (path / shard.file).is_file():
            raise ShardSetError(f"{manifest_path}: shard {shard.file} is listed but missing from {path}")
    listed = {s.file for s in manifest.shards}
    stray = sorted(p.name for p in path.glob("*.tar") if p.name not in listed)
    if stray:
        raise ShardSetError(f"{manifest_path}: tar files not in the manifest: {', '.join(stray)}")
    return SplitDir(path, manifest)


def check_manifest(manifest: Manifest, where: str) -> None:
    """The invariants the partition and the routing rely on."""
    expected = 0
    for s in manifest.super_classes:
        if s.instance_begin != expected or s.instance_end < s.instance_begin:
            raise ShardSetError(
                f"{where}: super-class {s.id} ({s.name}) range [{s.instance_begin}, {s.instance_end}) is not "
                f"contiguous after {expected}"
            )
        expected = s.instance_end
    if expected != manifest.num_instances:
        raise ShardSetError(
            f"{where}: super-class ranges cover {expected} instances, manifest says {manifest.num_instances}"
        )
    expected = 0
    for shard in manifest.shards:
        owner = manifest.super_classes[shard.super_id]
        if shard.instance_begin != expected or shard.instance_end - shard.instance_begin != shard.count:
            raise ShardSetError(
                f"{where}: shard {shard.file} range [{shard.instance_begin}, {shard.instance_end}) with {shard.count} "
                f"samples does not follow {expected}"
            )
        if not owner.instance_begin <= shard.instance_begin <= shard.instance_end <= owner.instance_end:
            raise ShardSetError(f"{where}: shard {shard.file} crosses the range of super-class {shard.super_id}")
        expected = shard.instance_end
    if expected != manifest.num_instances:
        raise ShardSetError(f"{where}: shards hold {expected} samples, manifest says {manifest.num_instances}")


def verify_split(split: SplitDir) -> list[str]:
    """Deep check of every shard against the manifest: checksum, readable tar, members and
    their instance ids. Returns one problem per line (empty when all is well)."""
    problems = []
    for shard in split.manifest.shards:
        path = split.path / shard.file
        if sha256_of(path) != shard.sha256:
            problems.append(f"{path}: checksum does not match the manifest")
        keys = []
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = member.name.split(".", 1)
                    keys.append(key)
                    problem = image_problem(tar.extractfile(member).read()) if ext in IMAGE_EXTS else None
                    if problem:
                        problems.append(f"{path}: member {member.name}: corrupt image ({problem})")
        except (tarfile.TarError, EOFError, OSError) as err:
            problems.append(f"{path}: unreadable or truncated tar ({err})")
            continue
        unique = list(dict.fromkeys(keys))
        if len(unique) != shard.count:
            problems.append(f"{path}: {len(unique)} samples, manifest says {shard.count}")
        ids = [int(k) for k in unique if k.isdigit()]
        if ids != list(range(shard.instance_begin, shard.instance_begin + len(ids))):
            problems.append(f"{path}: instance ids are not the contiguous range starting at {shard.instance_begin}")
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
