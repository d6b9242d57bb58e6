"""Shard building: layout, readers (tar, WebDataset, pyarrow), atomic output, bad input."""

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from fgdist.shardset import ShardSetError, open_split, verify_split
from shards.build import build_shards
from shards.cli import main as shards_main
from shards.sources import SourceError
from shards.sources.files import open_folder, open_manifest
from shards.sources.synthetic import open_synthetic

SMALL = dict(num_super=4, fine_per_super=2, train_per_fine=3, test_per_fine=2)


@pytest.fixture
def synthetic(tmp_path):
    out = tmp_path / "syn"
    build_shards(open_synthetic(**SMALL), out, shard_size=4, progress=False)
    return out


def test_layout_grouped_by_superclass_with_contiguous_ids(synthetic):
    split = open_split(synthetic, "train")
    m = split.manifest
    assert m.num_instances == 24 and m.num_super == 4 and m.num_fine == 8
    assert [(s.instance_begin, s.instance_end) for s in m.super_classes] == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert all(len({m.super_classes[s.super_id].id}) == 1 for s in m.shards)
    assert [(s.instance_begin, s.instance_end) for s in m.shards][:3] == [(0, 4), (4, 6), (6, 10)]
    index = pq.read_table(split.path / "index.parquet").to_pydict()
    assert index["instance_id"] == list(range(24))
    assert all(m.fine_to_super[f] == s for f, s in zip(index["fine_id"], index["super_id"]))
    # Plain tar and WebDataset read the same samples.
    with tarfile.open(split.path / m.shards[0].file) as tar:
        assert tar.getnames()[:2] == ["0000000000.png", "0000000000.json"]
    samples = list(wds.WebDataset(str(split.path / m.shards[0].file), shardshuffle=False).decode("pil"))
    assert [json.loads(json.dumps(s["json"]))["instance"] for s in samples] == [0, 1, 2, 3]
    assert isinstance(samples[0]["png"], Image.Image) and samples[0]["png"].size == (32, 32)
    assert verify_split(split) == []


def test_a_larger_synthetic_test_split_keeps_the_training_images_bit_identical(synthetic, tmp_path):
    """The generator draws every training image before any test image: more test images per fine
    class (the main job's larger test split) leave the training shards byte for byte the same."""
    larger = tmp_path / "larger"
    build_shards(open_synthetic(**{**SMALL, "test_per_fine": 5}), larger, shard_size=4, progress=False)
    small_train, large_train = open_split(synthetic, "train").manifest, open_split(larger, "train").manifest
    assert [s.sha256 for s in large_train.shards] == [s.sha256 for s in small_train.shards]
    assert pq.read_table(larger / "train" / "index.parquet").equals(
        pq.read_table(synthetic / "train" / "index.parquet")
    )
    assert open_split(larger, "test").manifest.num_instances == 5 * 8  # 5 per fine class, 8 fine classes
    assert open_split(synthetic, "test").manifest.num_instances == 2 * 8


def test_refuses_existing_output_without_overwrite(synthetic, capsys):
    assert shards_main(["build", "--source", "synthetic", "--out", str(synthetic), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
    assert (
        shards_main(
            [
                "build",
                "--source",
                "synthetic",
                "--out",
                str(synthetic),
                "--quiet",
                "--overwrite",
                "--opt",
                "num_super=2",
                "--opt",
                "train_per_fine=1",
                "--opt",
                "test_per_fine=1",
            ]
        )
        == 0
    )
    assert open_split(synthetic, "train").manifest.num_super == 2


def test_failed_build_leaves_nothing(tmp_path):
    collection = open_synthetic(**SMALL)
    bad = collection.splits["train"][5]

    def explode():
        raise OSError("disk on fire")

    collection.splits["train"][5] = type(bad)(bad.super_id, bad.fine_id, explode, bad.ext, bad.origin)
    with pytest.raises(OSError):
        build_shards(collection, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def write_images(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (len(name) * 10 % 255, 0, 0)).save(path)


def test_manifest_source_and_its_errors(tmp_path):
    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    good = tmp_path / "m.csv"
    good.write_text("path,super,fine,split\na.png,kettle,k1,train\nb.png,kettle,k2,train\nc.png,mug,m1,test\n")
    c = open_manifest(str(good))
    assert c.super_names == ["kettle", "mug"] and len(c.splits["train"]) == 2 and len(c.splits["test"]) == 1
    missing = tmp_path / "missing.csv"
    missing.write_text("path,super\na.png,kettle\nnope.png,mug\n")
    with pytest.raises(SourceError, match=r"missing.csv row 3: image .*nope.png does not exist"):
        open_manifest(str(missing))
    empty = tmp_path / "empty.csv"
    empty.write_text("path,super\na.png,kettle\nb.png,\n")
    with pytest.raises(SourceError, match=r"empty.csv row 3: empty 'super'"):
        open_manifest(str(empty))


def test_folder_source(tmp_path):
    write_images(
        tmp_path / "photos",
        ["train/kettle/red/1.jpg", "train/kettle/blue/2.jpg", "train/mug/white/3.png", "test/mug/white/4.png"],
    )
    c = open_folder(str(tmp_path / "photos"))
    assert c.super_names == ["kettle", "mug"] and c.fine_names == ["kettle/blue", "kettle/red", "mug/white"]
    assert c.fine_to_super == [0, 0, 1] and len(c.splits["test"]) == 1


def test_folder_source_without_fine_folders_and_other_formats(tmp_path):
    """A hand-made tree: <super>/ only (no fine classes), upper-case and WebP/TIFF files (stored
    as PNG of the same pixels), a hidden file left alone."""
    root = tmp_path / "photos"
    write_images(root, ["kettle/a.JPG", "kettle/b.webp", "mug/c.tiff", "mug/d.png"])
    (root / "mug" / ".DS_Store").write_bytes(b"\0\1")
    c = open_folder(str(root))
    assert c.super_names == ["kettle", "mug"] and c.fine_names == []
    records = c.splits["train"]
    assert [(r.super_id, r.fine_id, r.ext) for r in records] == [(0, -1, "jpg"), (0, -1, "png"), (1, -1, "png")] + [
        (1, -1, "png")
    ]
    webp = Image.open(io.BytesIO(records[1].load()))
    assert webp.format == "PNG" and webp.tobytes() == Image.open(root / "kettle" / "b.webp").convert("RGB").tobytes()


@pytest.mark.parametrize(
    "files, message",
    [
        (["kettle/a.png", "stray.png"], r"stray.png: not in a class folder"),
        (["kettle/red/a.png", "kettle/red/deep/b.png"], r"b.png: not in a class folder"),
        (["kettle/a.png", "mug/white/b.png"], r"kettle/a.png has no fine-class folder while mug/white/b.png has one"),
    ],
)
def test_folder_source_names_an_image_out_of_place(tmp_path, files, message):
    write_images(tmp_path / "photos", files)
    with pytest.raises(SourceError, match=message):
        open_folder(str(tmp_path / "photos"))


def test_manifest_not_matching_tars_is_reported(synthetic):
    train = synthetic / "train"
    (train / "train-000001.tar").unlink()
    with pytest.raises(ShardSetError, match=r"train-000001.tar is listed but missing"):
        open_split(synthetic, "train")
    (synthetic / "test" / "stray.tar").write_bytes(b"")
    with pytest.raises(ShardSetError, match=r"not in the manifest: stray.tar"):
        open_split(synthetic, "test")


def test_verify_reports_checksum_truncation_and_corrupt_image(synthetic, capsys):
    train = synthetic / "train"
    first, second, third = sorted(train.glob("*.tar"))[:3]
    with open(first, "r+b") as f:  # flip bytes inside the first image's PNG data
        f.seek(600)
        f.write(b"\x00" * 64)
    data = second.read_bytes()
    second.write_bytes(data[:1000])  # inside the first member's data
    with open(third, "ab") as f:
        f.write(b"\0" * 512)
    assert shards_main(["verify", str(synthetic)]) == 1
    out = capsys.readouterr().out
    assert f"{first}: member 0000000000.png: corrupt image" in out
    assert f"{second}: checksum does not match" in out and f"{second}: unreadable or truncated tar" in out
    assert f"{third}: checksum does not match" in out
