"""From encoded shards to a shard set: final instance ids, the index and the manifest; and the
merge of a partitioned build's parts.

Every way of building (one process, `--workers N`, or `--part I/N` on several machines followed
by `merge`) encodes the same shard jobs, fixed by the source listing (shards/build.py). A job
writes one tar whose instance ids assume that no image before it was skipped. Assembling walks
the results in listing order and gives each shard its final first id, the number of images kept
before it. Only a shard that follows an image skipped as undecodable (`on_corrupt=skip`) has to
change: it is rewritten with its ids shifted, its images' bytes untouched (`renumber_tar`). Every
other tar is kept as written, and a merge links (or copies) it from its part after checking its
sha256. So all the ways write the same files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fgdist.data.shardset import (
    COLLECTION,
    INDEX,
    MANIFEST,
    PART,
    UNLABELED,
    Manifest,
    PoolInfo,
    ShardInfo,
    ShardSetError,
    SuperClassInfo,
    sample_key,
    sha256_of,
)
from fgdist.output_folder import Inputs, atomic_file, atomic_folder
from shards.sources import Collection

PART_FORMAT = "fgdist-shards-part/1"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible tars: same input, same bytes, same checksum (uid, gid, names: 0 and "")
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def sample_meta(instance_id: int, super_id: int, fine_id: int) -> bytes:
    """A sample's `.json` member: the one writer, so a renumbered tar matches a direct write."""
    return json.dumps({"instance": instance_id, "super": super_id, "fine": fine_id}).encode()


@dataclass(frozen=True)
class ShardResult:
    """One encoded shard job."""

    number: int  # the job's place in its split's listing; the tar is f"{split}-{number:06d}.tar"
    file: str
    super_id: int
    first_id: int  # the instance id its first image was written with
    count: int  # images written (0: every one skipped, and no tar)
    sha256: str
    skipped: list[str] = field(default_factory=list)  # origins of the images skipped as undecodable


def renumber_tar(source: Path, dest: Path, delta: int) -> str:
    """Write `source` to `dest` with every instance id moved by `delta` (member names and `.json`
    members; image bytes as they are). Returns the new tar's sha256."""
    with (
        atomic_file(dest) as temporary,
        tarfile.open(source) as old,
        tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as new,
    ):
        for member in old:
            data = old.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            instance = int(key) + delta
            if ext == "json":
                meta = json.loads(data)
                data = sample_meta(instance, meta["super"], meta["fine"])
            add_member(new, f"{sample_key(instance)}.{ext}", data)
    return sha256_of(dest)


def _bring(source: Path, dest: Path, expected: str) -> None:
    """A part's tar into the merged set: linked (no copy of the bytes) or copied across file systems."""
    if sha256_of(source) != expected:
        raise ShardSetError(
            f"{source}: its sha256 is not the one its part.json lists; the part changed since its build"
        )
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _place(result: ShardResult, first_id: int, source: Path, out: Path) -> str:
    """Put the result's tar into `out` with `first_id` as its first id; returns its sha256."""
    src, dest = source / result.file, out / result.file
    if first_id != result.first_id:
        return renumber_tar(src, dest, first_id - result.first_id)
    if source != out:
        _bring(src, dest, result.sha256)
    return result.sha256


def _shifted(rows: pa.Table, delta: int) -> pa.Table:
    """Index rows with their instance ids (and keys and member names) moved by `delta`."""
    if delta == 0:
        return rows
    ids = [i + delta for i in rows.column("instance_id").to_pylist()]
    keys = [sample_key(i) for i in ids]
    members = [f"{k}.{m.split('.', 1)[1]}" for k, m in zip(keys, rows.column("member").to_pylist())]
    for name, values in (("key", keys), ("instance_id", ids), ("member", members)):
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(values, rows.schema.field(name).type))
    return rows


def assemble_split(
    split: str, classes: Collection, encoded: list[tuple[ShardResult, pa.Table | None, Path]], out: Path
) -> Manifest:
    """Write `out` (the split's folder, holding or receiving the tars): final ids, index, manifest.
    `encoded`: (result, its index rows, the folder its tar is in) per job, in listing order."""
    shards, skipped, tables, next_id = [], [], [], 0
    for result, rows, source in encoded:
        skipped += result.skipped
        if result.count == 0:
            continue
        sha256 = _place(result, next_id, source, out)
        shards.append(ShardInfo(result.file, result.super_id, next_id, next_id + result.count, result.count, sha256))
        tables.append(_shifted(rows, next_id - result.first_id))
        next_id += result.count
    if next_id == 0:
        raise ValueError(f"{classes.name} {split}: no image to write ({len(skipped)} skipped as undecodable)")
    held, begin, supers = Counter(), 0, []
    for shard in shards:
        held[shard.super_id] += shard.count
    for super_id, name in enumerate(classes.super_names):
        supers.append(SuperClassInfo(super_id, name, begin, begin + held[super_id]))
        begin += held[super_id]
    # The unlabeled images' shards come last in the listing (shards/build.py sorted_by_super).
    pool = PoolInfo(begin, next_id, held[UNLABELED]) if held[UNLABELED] else None
    pq.write_table(pa.concat_tables(tables).combine_chunks(), out / INDEX)
    manifest = Manifest(
        split, next_id, supers, list(classes.fine_names), list(classes.fine_to_super), shards, skipped, pool=pool
    )
    (out / MANIFEST).write_text(manifest.to_json())
    return manifest


def write_collection(folder: Path, name: str, splits) -> None:
    (folder / COLLECTION).write_text(json.dumps({"name": name, "splits": sorted(splits)}, indent=1))


# -- parts of a partitioned build ----------------------------------------------------------------
def write_part(folder: Path, part: tuple[int, int], listing: str, classes: Collection, jobs: dict, results: dict):
    """part.json: which part of which listing, the class tables, and per split its job count and
    this part's results (their index rows are in the split's index.parquet, in the same order)."""
    meta = {
        "format": PART_FORMAT,
        "part": part[0],
        "parts": part[1],
        "listing": listing,
        "collection": {k: getattr(classes, k) for k in ("name", "super_names", "fine_names", "fine_to_super")},
        "splits": {s: {"jobs": jobs[s], "results": [asdict(r) for r in results[s]]} for s in results},
    }
    (folder / PART).write_text(json.dumps(meta, indent=1))


def read_part(folder: Path) -> dict:
    path = Path(folder) / PART
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardSetError(f"{path}: not found; is {folder} a part written by `shards build --part I/N`?") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ShardSetError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != PART_FORMAT:
        raise ShardSetError(
            f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {PART_FORMAT!r}"
        )
    return meta


def _check_parts(folders: list[Path], metas: list[dict]) -> None:
    """All parts of one listing, each once."""
    first = metas[0]
    for folder, meta in zip(folders, metas):
        if meta["listing"] != first["listing"] or meta["parts"] != first["parts"]:
            raise ShardSetError(
                f"{folder}: part {meta['part']}/{meta['parts']} of another build than {folders[0]} (part "
                f"{first['part']}/{first['parts']}): other source, options, shard size or part count"
            )
    seen: dict[int, Path] = {}
    for folder, meta in zip(folders, metas):
        if meta["part"] in seen:
            raise ShardSetError(f"{folder} and {seen[meta['part']]} are both part {meta['part']}/{meta['parts']}")
        seen[meta["part"]] = folder
    count = first["parts"]
    missing = [f"{i}/{count}" for i in range(count) if i not in seen]
    if missing:
        raise ShardSetError(f"part(s) {', '.join(missing)} missing from the merge")


def _split_results(folders: list[Path], metas: list[dict], split: str) -> list[tuple[ShardResult, pa.Table, Path]]:
    """Every part's results of `split` in listing order, each with its index rows and its folder."""
    encoded = []
    for folder, meta in zip(folders, metas):
        results = [ShardResult(**r) for r in meta["splits"].get(split, {}).get("results", [])]
        rows = pq.read_table(folder / split / INDEX) if any(r.count for r in results) else None
        at = 0
        for result in results:
            encoded.append((result, rows.slice(at, result.count) if result.count else None, folder / split))
            at += result.count
    encoded.sort(key=lambda item: item[0].number)
    jobs = metas[0]["splits"][split]["jobs"]
    if [result.number for result, _, _ in encoded] != list(range(jobs)):
        raise ShardSetError(f"{split}: the parts do not hold each of its {jobs} shard jobs exactly once")
    return encoded


def merge_parts(parts: list[str | Path], out: str | Path, overwrite: bool = False) -> dict[str, Manifest]:
    """Join the parts of a partitioned build into one shard set at `out`, the set a single build
    would have written (written whole or not at all; the parts are left as they are)."""
    folders = [Path(p) for p in parts]
    if not folders:
        raise ValueError("merge needs the part folders")
    metas = [read_part(f) for f in folders]
    _check_parts(folders, metas)
    classes = Collection(**metas[0]["collection"])
    inputs: Inputs = {f"part {m['part']}": f for f, m in zip(folders, metas)}
    with atomic_folder(out, overwrite, "shards", inputs) as partial:
        manifests = {}
        for split in metas[0]["splits"]:  # the source's order, as a single build writes them
            (partial / split).mkdir()
            manifests[split] = assemble_split(split, classes, _split_results(folders, metas, split), partial / split)
        write_collection(partial, classes.name, manifests)
    return manifests
