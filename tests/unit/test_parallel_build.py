"""Parallel and partitioned shard builds: `--workers 2` and `--part 0/2` + `--part 1/2` + `merge`
write exactly the files of the serial build (tars byte for byte, index, manifest), on the
synthetic source (with and without unlabeled images), a folder of JPEGs, and a manifest with
undecodable images skipped (which shifts the ids of every later shard); merges of mismatched,
missing or repeated parts are refused; a failing worker leaves nothing."""

import io
import json
import random
import tarfile

import pytest
from PIL import Image

from fgdist.data.shardset import ShardSetError, open_split, verify_split
from fgdist.output_folder import MARKER
from shards.assemble import merge_parts
from shards.cli import main as shards_main

SYNTHETIC = ["--source", "synthetic"] + [
    arg
    for key, value in dict(num_super=3, fine_per_super=2, train_per_fine=3, test_per_fine=2, seed=4).items()
    for arg in ("--opt", f"{key}={value}")
]


def jpeg(seed: int, size=(20, 14)) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", size)
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def photo_folder(root):
    """photos/<super>/<fine>/*.jpg: 3 super-classes of 5, 6 and 4 images."""
    for s, (name, count) in enumerate((("bags", 5), ("cups", 6), ("hats", 4))):
        for i in range(count):
            path = root / name / f"{name}{i % 2}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(10 * s + i))
    return ["--source", "folder", "--path", str(root), "--opt", "test_fraction=0.25"]


def files(folder) -> dict[str, bytes]:
    """Every file of a shard set but its output marker, by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != MARKER
    }


def build_three_ways(tmp_path, source, *extra):
    """The serial build, --workers 2, and --part 0/2 + --part 1/2 merged (given in reverse order)."""
    common = [*source, "--shard-size", "2", "--quiet", *extra]
    assert shards_main(["build", *common, "--out", str(tmp_path / "serial")]) == 0
    assert shards_main(["build", *common, "--workers", "2", "--out", str(tmp_path / "workers")]) == 0
    for i in (0, 1):
        assert shards_main(["build", *common, "--part", f"{i}/2", "--out", str(tmp_path / f"part{i}")]) == 0
    assert (
        shards_main(["merge", str(tmp_path / "part1"), str(tmp_path / "part0"), "--out", str(tmp_path / "merged")]) == 0
    )
    return [tmp_path / name for name in ("serial", "workers", "merged")]


def assert_same_files(folders):
    reference = files(folders[0])
    assert any(name.endswith(".tar") for name in reference) and "train/index.parquet" in reference
    for folder in folders[1:]:
        other = files(folder)
        assert sorted(other) == sorted(reference), folder
        for name, data in reference.items():
            assert other[name] == data, f"{folder}/{name} differs from the serial build's"


@pytest.mark.parametrize("source", ["synthetic", "synthetic_with_pool", "folder"])
def test_parallel_and_partitioned_builds_write_the_serial_builds_files(tmp_path, source, capsys):
    args = {
        "synthetic": SYNTHETIC,
        "synthetic_with_pool": [*SYNTHETIC, "--opt", "unlabeled=7"],  # unlabeled images: shards after the rest
    }.get(source) or photo_folder(tmp_path / "photos")
    folders = build_three_ways(tmp_path, args)
    assert open_split(folders[0], "train").manifest.num_unlabeled == (7 if source == "synthetic_with_pool" else 0)
    assert "images/s, 2 worker(s))" in capsys.readouterr().out  # the throughput line
    assert_same_files(folders)
    for folder in folders:
        assert verify_split(open_split(folder, "train")) == [] and verify_split(open_split(folder, "test")) == []
        assert json.loads((folder / MARKER).read_text())["kind"] == "shards"
    part = json.loads((tmp_path / "part0" / MARKER).read_text())
    assert part["kind"] == "shards-part" and "part.json" in part["files"]  # a part is a marked fgdist output
    with pytest.raises(ShardSetError, match=r"one part of a partitioned build: merge the parts first"):
        open_split(tmp_path / "part0", "train")
    # The parts hold different shards, and a tar's headers carry nothing of when or by whom it was written.
    tars = [sorted(p.name for p in (tmp_path / f"part{i}" / "train").glob("*.tar")) for i in (0, 1)]
    assert tars[0] and tars[1] and not set(tars[0]) & set(tars[1])
    merged = folders[2] / "train" / tars[1][0]
    assert merged.stat().st_ino == (tmp_path / "part1" / "train" / tars[1][0]).stat().st_ino  # linked, not copied
    with tarfile.open(folders[0] / "train" / tars[1][0]) as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar} == {(0, 0, 0, "", "", 0o644)}


def test_skipped_images_shift_the_later_shards_alike_in_every_build(tmp_path):
    """Two undecodable images in the first part's shards: every later shard, in part 1 too, gets
    its ids moved down by two when the parts are merged, as the serial build numbers them."""
    root = tmp_path / "in"
    root.mkdir()
    rows = []
    for i in range(14):
        name = f"{i}.jpg"
        broken = i in (1, 2)
        (root / name).write_bytes(jpeg(i)[:150] if broken else jpeg(i))
        rows.append(f"{name},{'ab'[i // 7]},{'ab'[i // 7]}{i % 2},{'test' if i % 5 == 4 else 'train'}\n")
    (root / "images.csv").write_text("path,super,fine,split\n" + "".join(rows))
    source = ["--source", "manifest", "--path", str(root / "images.csv"), "--opt", "on_corrupt=skip"]
    folders = build_three_ways(tmp_path, source)
    assert_same_files(folders)
    train = open_split(folders[2], "train")
    assert len(train.manifest.skipped_corrupt) == 2 and train.manifest.num_instances == 10
    assert verify_split(train) == []


def test_merges_of_mismatched_missing_or_repeated_parts_are_refused(tmp_path):
    for i, size in ((0, "2"), (1, "3")):
        argv = [*SYNTHETIC, "--shard-size", size, "--quiet", "--part", f"{i}/2", "--out", str(tmp_path / f"p{i}")]
        assert shards_main(["build", *argv]) == 0
    argv = [*SYNTHETIC, "--shard-size", "2", "--quiet", "--part", "1/2", "--out", str(tmp_path / "q1")]
    assert shards_main(["build", *argv]) == 0
    cases = [
        ([tmp_path / "p0", tmp_path / "p1"], r"p1: part 1/2 of another build than .*p0"),
        ([tmp_path / "p0"], r"part\(s\) 1/2 missing from the merge"),
        ([tmp_path / "p0", tmp_path / "q1", tmp_path / "q1"], r"q1 and .*q1 are both part 1/2"),
        ([tmp_path / "p0", tmp_path / "serial"], r"serial/part.json: not found"),
    ]
    for parts, message in cases:
        with pytest.raises(ShardSetError, match=message):
            merge_parts(parts, tmp_path / "merged")
        assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))
    assert shards_main(["merge", str(tmp_path / "q1"), str(tmp_path / "p0"), "--out", str(tmp_path / "merged")]) == 0


def test_a_failing_worker_names_the_first_bad_image_and_leaves_nothing(tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    names = [f"{i}.jpg" for i in range(8)]
    for i, name in enumerate(names):
        (root / name).write_bytes(jpeg(i)[:150] if i in (3, 6) else jpeg(i))
    (root / "images.csv").write_text(
        "path,super,split\n" + "".join(f"{n},a,{'train' if i < 6 else 'test'}\n" for i, n in enumerate(names))
    )
    argv = ["build", "--source", "manifest", "--path", str(root / "images.csv"), "--shard-size", "1", "--quiet"]
    assert shards_main([*argv, "--workers", "2", "--out", str(tmp_path / "out")]) == 2
    assert "images.csv row 5 3.jpg: cannot decode image" in capsys.readouterr().err  # the first in listing order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
