"""Write a collection as a shard set: per split, tars grouped by super-class with contiguous
instance ids, a Parquet index and a manifest. Everything is written into a temporary folder
beside the output and renamed into place at the end, so a failed build leaves nothing that looks
like a shard set."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from fgdist.shardset import INDEX, MANIFEST, Manifest, ShardInfo, SuperClassInfo, sample_key, sha256_of
from shards.sources import Collection, Record


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible tars: same input, same bytes, same checksum
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_split(split: str, records: list[Record], collection: Collection, out: Path, shard_size: int, progress: bool):
    out.mkdir(parents=True)
    # Instance ids: sorted by super-class, contiguous within one (stable: source order inside).
    ordered = sorted(records, key=lambda r: r.super_id)
    super_infos, shard_infos, index = (
        [],
        [],
        {c: [] for c in ("key", "instance_id", "super_id", "fine_id", "shard", "member", "source")},
    )
    bar = tqdm(total=len(ordered), desc=f"{collection.name} {split}", unit="img", disable=not progress)
    begin = 0
    for super_id, name in enumerate(collection.super_names):
        end = begin
        while end < len(ordered) and ordered[end].super_id == super_id:
            end += 1
        super_infos.append(SuperClassInfo(super_id, name, begin, end))
        for first in range(begin, end, shard_size):
            last = min(first + shard_size, end)
            file = f"{split}-{len(shard_infos):06d}.tar"
            with tarfile.open(out / file, "w", format=tarfile.USTAR_FORMAT) as tar:
                for iid in range(first, last):
                    record = ordered[iid]
                    key = sample_key(iid)
                    image = record.load()
                    meta = {"instance": iid, "super": record.super_id, "fine": record.fine_id}
                    _add_member(tar, f"{key}.{record.ext}", image)
                    _add_member(tar, f"{key}.json", json.dumps(meta).encode())
                    for column, value in zip(
                        index, (key, iid, record.super_id, record.fine_id, file, f"{key}.{record.ext}", record.origin)
                    ):
                        index[column].append(value)
                    bar.update(1)
            shard_infos.append(ShardInfo(file, super_id, first, last, last - first, sha256_of(out / file)))
        begin = end
    bar.close()
    if begin != len(ordered):
        bad = ordered[begin]
        raise ValueError(
            f"{bad.origin}: super id {bad.super_id} outside the class table ({len(collection.super_names)} classes)"
        )
    pq.write_table(pa.table(index), out / INDEX)
    manifest = Manifest(
        split, len(ordered), super_infos, list(collection.fine_names), list(collection.fine_to_super), shard_infos
    )
    (out / MANIFEST).write_text(manifest.to_json())
    return manifest


def build_shards(
    collection: Collection, out: str | Path, shard_size: int = 1000, overwrite: bool = False, progress: bool = True
) -> dict[str, Manifest]:
    out = Path(out)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifests = {
            split: _write_split(split, records, collection, tmp / split, shard_size, progress)
            for split, records in collection.splits.items()
        }
        (tmp / "collection.json").write_text(
            json.dumps({"name": collection.name, "splits": sorted(manifests)}, indent=1)
        )
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifests
