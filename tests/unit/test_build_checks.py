"""Bad data caught while building shards, not hours into training: undecodable images (fail
naming the row, or skip and list in the manifest), a path listed twice, a directory given as an
image, an image too small to train on, a collection without a test split (error, or a seeded
`test_fraction` draw)."""

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

import shards.build as build_module
from fgdist.data.shardset import INDEX, open_split, verify_split
from fgdist.images import open_image
from fgdist.search_errors import ImageTooSmallError
from shards.build import build_shards
from shards.cli import main as shards_main
from shards.sources import Collection, CorruptImageError, Record, SourceError, jpeg_loader
from shards.sources.files import open_folder, open_manifest


def jpeg_bytes(size=(24, 16), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_manifest(root, rows, header="path,super,fine,split"):
    """rows: (file name, super, fine, split, bytes or None for a good JPEG)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, *_, data) in enumerate(rows):
        (root / name).write_bytes(data if data is not None else jpeg_bytes(colour=(10 * i, 40, 40)))
    path = root / "images.csv"
    path.write_text(header + "\n" + "".join(f"{n},{s},{f},{sp}\n" for n, s, f, sp, _ in rows))
    return path


GOOD = [
    ("a.jpg", "kettle", "k1", "train", None),
    ("b.jpg", "kettle", "k1", "train", None),
    ("c.jpg", "mug", "m1", "train", None),
    ("d.jpg", "mug", "m1", "train", None),
    ("e.jpg", "kettle", "k1", "test", None),
    ("f.jpg", "mug", "m1", "test", None),
]
TRUNCATED = jpeg_bytes()[:200]  # a JPEG header and the start of its data: opens, does not decode


def test_undecodable_image_fails_the_build_naming_the_row(tmp_path):
    rows = GOOD[:2] + [("bad.jpg", "mug", "m1", "train", TRUNCATED)] + GOOD[2:]
    manifest = write_manifest(tmp_path / "in", rows)
    out = tmp_path / "out"
    with pytest.raises(CorruptImageError, match=r"images.csv row 4 bad.jpg: cannot decode image .*on_corrupt=skip"):
        build_shards(open_manifest(str(manifest)), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # atomic: nothing half-written


def test_on_corrupt_skip_leaves_the_image_out_and_lists_it(tmp_path, capsys):
    rows = GOOD[:2] + [("bad.jpg", "mug", "m1", "train", TRUNCATED)] + GOOD[2:]
    manifest = write_manifest(tmp_path / "in", rows)
    out = tmp_path / "out"
    argv = ["build", "--source", "manifest", "--path", str(manifest), "--out", str(out), "--quiet"]
    assert shards_main(argv + ["--opt", "on_corrupt=skip"]) == 0
    assert "1 undecodable image(s) skipped (first: " in capsys.readouterr().out
    train = open_split(out, "train")
    assert train.manifest.skipped_corrupt == [f"{manifest} row 4 bad.jpg"]
    assert train.manifest.num_instances == 4 and open_split(out, "test").manifest.skipped_corrupt == []
    index = pq.read_table(train.path / INDEX).to_pydict()
    assert index["instance_id"] == [0, 1, 2, 3]  # still contiguous, the bad row took no id
    assert not any("bad.jpg" in source for source in index["source"])
    assert verify_split(train) == []
    assert shards_main(["inspect", str(out)]) == 0
    assert "1 undecodable image(s) skipped" in capsys.readouterr().out


def test_jpeg_loader_failures_are_corrupt_images_too(tmp_path):
    """A file the resizing loader cannot decode, and a truncated small RGB JPEG that the loader
    passes through as it is: both are caught, named by their record, and skippable."""
    garbage, truncated, good = tmp_path / "garbage.jpg", tmp_path / "truncated.jpg", tmp_path / "good.jpg"
    garbage.write_bytes(b"not an image at all")
    truncated.write_bytes(TRUNCATED)
    good.write_bytes(jpeg_bytes())

    def collection():
        c = Collection("loader", ["only"], [], [])
        c.splits["train"] = [
            Record(0, -1, jpeg_loader(p, shorter_side=8), "jpg", f"list:{i} {p.name}")
            for i, p in enumerate((good, garbage, truncated))
        ]
        c.splits["test"] = [Record(0, -1, jpeg_loader(good, shorter_side=8), "jpg", "list:9 good.jpg")]
        return c

    with pytest.raises(CorruptImageError, match=r"list:1 garbage.jpg: .*garbage.jpg: cannot decode image"):
        build_shards(collection(), tmp_path / "out", progress=False)
    manifests = build_shards(collection(), tmp_path / "out", progress=False, on_corrupt="skip")
    assert manifests["train"].skipped_corrupt == ["list:1 garbage.jpg", "list:2 truncated.jpg"]
    assert manifests["train"].num_instances == 1


def png_bytes(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 90, 60)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(1, 1), (5000, 3)], ids=["1x1", "5000x3"])
@pytest.mark.parametrize("on_corrupt", ["fail", "skip"])
def test_an_image_too_small_to_train_on_fails_the_build_naming_the_row(tmp_path, size, on_corrupt):
    """The check every query image meets (fgdist.images.check_shape), at build time: such an image
    decodes, so it is not skipped as corrupt; the user removes it."""
    rows = GOOD[:2] + [("speck.png", "mug", "m1", "train", png_bytes(size))] + GOOD[2:]
    manifest = write_manifest(tmp_path / "in", rows)
    with pytest.raises(
        ImageTooSmallError, match=rf"images.csv row 4 speck.png: a {size[0]}x{size[1]} image; the shorter"
    ):
        build_shards(open_manifest(str(manifest)), tmp_path / "out", progress=False, on_corrupt=on_corrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_every_image_is_decoded_once(tmp_path, monkeypatch):
    """The check decodes the bytes about to be written, once per image; no separate pass."""
    calls = []

    def counting(data):
        calls.append(len(data))
        return open_image(data)

    monkeypatch.setattr(build_module, "open_image", counting)
    build_shards(open_manifest(str(write_manifest(tmp_path / "in", GOOD))), tmp_path / "out", progress=False)
    assert len(calls) == len(GOOD)


def test_all_images_of_a_split_skipped_is_an_error(tmp_path):
    rows = GOOD[:4] + [("x.jpg", "mug", "m1", "test", TRUNCATED)]
    manifest = write_manifest(tmp_path / "in", rows)
    with pytest.raises(ValueError, match=r"test: no image to write \(1 skipped as undecodable\)"):
        build_shards(open_manifest(str(manifest)), tmp_path / "out", progress=False, on_corrupt="skip")
    assert not (tmp_path / "out").exists()


def test_a_path_listed_twice_names_both_rows(tmp_path):
    manifest = write_manifest(tmp_path / "in", GOOD)
    text = manifest.read_text() + "./c.jpg,mug,m1,test\n"  # row 8: the same file as row 4
    manifest.write_text(text)
    with pytest.raises(SourceError, match=r"images.csv row 8: image .*c.jpg is already listed at .*images.csv row 4$"):
        open_manifest(str(manifest))


def test_a_directory_given_as_an_image_says_so(tmp_path):
    manifest = write_manifest(tmp_path / "in", GOOD)
    (tmp_path / "in" / "photos.jpg").mkdir()
    manifest.write_text(manifest.read_text() + "photos.jpg,mug,m1,train\n")
    with pytest.raises(SourceError, match=r"images.csv row 8: image .*photos.jpg is a directory"):
        open_manifest(str(manifest))
    tree = tmp_path / "tree" / "mug" / "white"
    tree.mkdir(parents=True)
    (tree / "1.jpg").write_bytes(jpeg_bytes())
    (tree / "2.jpg").mkdir()
    with pytest.raises(SourceError, match=r"image .*white/2.jpg is a directory"):
        open_folder(str(tmp_path / "tree"))


def test_no_test_rows_is_an_error_at_build_time(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "in", GOOD[:4], header="path,super,fine,split")
    out = tmp_path / "out"
    argv = ["build", "--source", "manifest", "--path", str(manifest), "--out", str(out), "--quiet"]
    assert shards_main(argv) == 2
    err = capsys.readouterr().err
    assert "no test rows (4 train); training needs a test split" in err and "--opt test_fraction=F" in err
    assert not out.exists()


def test_test_fraction_draws_a_seeded_test_split(tmp_path, capsys):
    rows = [(f"{i}.jpg", "kettle" if i < 10 else "mug", f"f{i % 3}{i >= 10}", "train", None) for i in range(20)]
    manifest = write_manifest(tmp_path / "in", rows)
    argv = ["build", "--source", "manifest", "--path", str(manifest), "--quiet", "--opt", "test_fraction=0.25"]

    def split_sources(out):
        return {
            split: sorted(pq.read_table(out / split / INDEX).column("source").to_pylist())
            for split in ("train", "test")
        }

    assert shards_main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert shards_main(argv + ["--out", str(tmp_path / "b")]) == 0
    assert shards_main(argv + ["--out", str(tmp_path / "c"), "--opt", "split_seed=1"]) == 0
    a, b, c = (split_sources(tmp_path / n) for n in "abc")
    assert len(a["test"]) == 5 and len(a["train"]) == 15
    assert set(a["test"]).isdisjoint(a["train"]) and len(set(a["test"]) | set(a["train"])) == 20
    assert a == b and a != c  # the same seed draws the same split, another seed another one
    # A fraction too small to leave a test row, and a source that has test rows already.
    capsys.readouterr()
    assert shards_main(argv[:-1] + ["test_fraction=0.01", "--out", str(tmp_path / "d")]) == 2
    assert "leaves 0 test rows" in capsys.readouterr().err
    with_test = write_manifest(tmp_path / "in2", GOOD)
    with pytest.raises(ValueError, match=r"test_fraction=0.5 given, but the source has 2 test rows already"):
        build_shards(open_manifest(str(with_test)), tmp_path / "e", progress=False, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"test_fraction must be a number with 0 < F < 1, got 1.5"):
        build_shards(open_manifest(str(manifest)), tmp_path / "e", progress=False, test_fraction=1.5)
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_build_shows_a_progress_bar(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "in", GOOD)
    assert shards_main(["build", "--source", "manifest", "--path", str(manifest), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "manifest:images.csv train" in err and "4/4" in err and "img" in err
