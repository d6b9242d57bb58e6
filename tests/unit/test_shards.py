"""Shard building: layout, readers (tar, WebDataset, pyarrow), atomic output, bad input."""

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from fgdist.data.shardset import PoolInfo, ShardSetError, open_split, verify_split
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
    no_super = tmp_path / "no_super.csv"
    no_super.write_text("path,fine\na.png,k1\n")
    with pytest.raises(SourceError, match=r"no_super.csv: missing column 'super'"):
        open_manifest(str(no_super))


def test_manifest_rows_with_an_empty_super_are_unlabeled_training_images(tmp_path):
    """An empty super is an unlabeled training image; one in the test split, or one with a fine
    label, is an error naming the file and row. test_fraction draws its test rows from the
    labeled ones only."""
    write_images(tmp_path, ["a.png", "b.png", "c.png", "d.png", "e.png"])
    good = tmp_path / "m.csv"
    good.write_text("path,super,fine\na.png,kettle,k1\nb.png,,\nc.png,kettle,k2\nd.png,mug,m1\ne.png,,\n")
    c = open_manifest(str(good))
    assert [(r.super_id, r.fine_id) for r in c.splits["train"]] == [(0, 0), (-1, -1), (0, 1), (1, 2), (-1, -1)]
    assert c.super_names == ["kettle", "mug"]
    manifests = build_shards(c, tmp_path / "out", progress=False, test_fraction=0.34, split_seed=0)
    assert manifests["test"].pool is None and manifests["test"].num_instances == 1
    assert manifests["train"].num_unlabeled == 2 and manifests["train"].num_instances == 4
    for text, message in (
        ("path,super,split\na.png,kettle,train\nb.png,,test\n", r"test.csv row 3 b.png: an unlabeled image"),
        ("path,super,fine\na.png,kettle,k1\nb.png,,k2\n", r"test.csv row 3 b.png: fine label 'k2' without a super"),
    ):
        (tmp_path / "test.csv").write_text(text)
        with pytest.raises(SourceError, match=message):
            open_manifest(str(tmp_path / "test.csv"))


def test_synthetic_unlabeled_images_form_the_pool_after_the_super_classes(synthetic, tmp_path, capsys):
    """--opt unlabeled=N: N more images from the generator, labels dropped, in shards of their own
    after every super-class; the labeled and test shards stay byte for byte the same. The
    manifest records the pool; index and samples mark its rows with super id -1."""
    pooled = tmp_path / "pooled"
    opts = [f"--opt={k}={v}" for k, v in {**SMALL, "unlabeled": 10}.items()]
    assert (
        shards_main(["build", "--source", "synthetic", "--out", str(pooled), "--quiet", "--shard-size=4", *opts]) == 0
    )
    assert "10 unlabeled (the pool, instances [24, 34))" in capsys.readouterr().out
    plain, split = open_split(synthetic, "train"), open_split(pooled, "train")
    m = split.manifest
    assert m.pool == PoolInfo(24, 34, 10) and m.num_unlabeled == 10 and m.num_instances == 34
    assert m.super_classes == plain.manifest.super_classes
    assert m.shards[: len(plain.manifest.shards)] == plain.manifest.shards  # same files, same checksums
    pool_shards = m.shards[len(plain.manifest.shards) :]
    assert [(s.super_id, s.instance_begin, s.instance_end) for s in pool_shards] == [(-1, 24, 28), (-1, 28, 32)] + [
        (-1, 32, 34)
    ]
    assert open_split(pooled, "test").manifest == open_split(synthetic, "test").manifest
    index = pq.read_table(split.path / "index.parquet").to_pydict()
    assert index["instance_id"] == list(range(34))
    assert [(i, s, f) for i, s, f in zip(index["instance_id"], index["super_id"], index["fine_id"]) if s < 0] == [
        (i, -1, -1) for i in range(24, 34)
    ]
    samples = list(wds.WebDataset(str(split.path / pool_shards[0].file), shardshuffle=False).decode("pil"))
    assert [(s["json"]["instance"], s["json"]["super"], s["json"]["fine"]) for s in samples] == [
        (i, -1, -1) for i in range(24, 28)
    ]
    with tarfile.open(split.path / pool_shards[0].file) as tar:
        assert tar.getnames()[:2] == ["0000000024.png", "0000000024.json"]
    assert verify_split(split) == []


def test_a_manifest_written_before_the_pool_still_loads(synthetic):
    path = synthetic / "train" / "manifest.json"
    raw = json.loads(path.read_text())
    assert raw.pop("pool") is None
    path.write_text(json.dumps(raw))
    assert open_split(synthetic, "train").manifest.pool is None


def test_a_pool_outside_the_train_split_or_off_the_line_is_refused(synthetic):
    path = synthetic / "test" / "manifest.json"
    raw = json.loads(path.read_text())
    last = raw["super_classes"][-1]
    raw["super_classes"][-1] = {**last, "instance_end": last["instance_begin"]}
    raw["pool"] = {"instance_begin": last["instance_begin"], "instance_end": last["instance_end"], "count": 2}
    path.write_text(json.dumps(raw))
    with pytest.raises(ShardSetError, match=r"test/manifest.json: pool range \[12, 16\) with 2 unlabeled images"):
        open_split(synthetic, "test")
    raw["pool"]["count"] = last["instance_end"] - last["instance_begin"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ShardSetError, match=r"test/manifest.json: split 'test' holds unlabeled images"):
        open_split(synthetic, "test")


def test_folder_source(tmp_path):
    write_images(
        tmp_path / "photos",
        ["train/kettle/red/1.jpg", "train/kettle/blue/2.jpg", "train/mug/white/3.png", "test/mug/white/4.png"],
    )
    c = open_folder(str(tmp_path / "photos"))
    assert c.super_names == ["kettle", "mug"] and c.fine_names == ["kettle/blue", "kettle/red", "mug/white"]
    assert c.fine_to_super == [0, 0, 1] and len(c.splits["test"]) == 1


def test_folder_source_unlabeled_tree(tmp_path):
    """Images under unlabeled/ (any depth) are unlabeled training images; under test/ an error."""
    root = tmp_path / "photos"
    write_images(
        root, ["train/kettle/1.jpg", "train/unlabeled/2.jpg", "train/unlabeled/deep/3.png", "test/kettle/4.png"]
    )
    c = open_folder(str(root))
    assert c.super_names == ["kettle"] and [r.super_id for r in c.splits["train"]] == [0, -1, -1]
    assert [r.fine_id for r in c.splits["train"]] == [-1, -1, -1] and len(c.splits["test"]) == 1
    write_images(root, ["test/unlabeled/5.png"])
    with pytest.raises(
        SourceError, match=r"test/unlabeled/5.png: an unlabeled image \(empty super\) in the test split"
    ):
        open_folder(str(root))


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
