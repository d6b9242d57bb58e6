"""CIFAR-100, Oxford-IIIT Pet and Stanford Online Products sources on small trees fabricated in
the data sets' exact on-disk formats (the real sets cannot be downloaded here), plus the 20 real
CIFAR-100 test images from the shared fixtures packed into a real-format pickle."""

from __future__ import annotations

import csv
import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from fgdist.data.shardset import INDEX, open_split, verify_split
from shards.build import build_shards
from shards.cli import SOURCES, main
from shards.sources import SourceError
from shards.sources import cifar100 as cifar_module
from shards.sources.cifar100 import open_cifar100
from shards.sources.pets import open_pets
from shards.sources.sop import open_sop
from tests.helpers import shared_fixture

# The standard CIFAR-100 tables, as in the python version's `meta` (alphabetical order).
CIFAR_FINE_NAMES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip
CIFAR_COARSE_NAMES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]  # fmt: skip

# The real list.txt starts with these comment lines.
PETS_LIST_HEADER = """#Image CLASS-ID SPECIES BREED ID
#ID: 1:37 Class ids
#SPECIES: 1:Cat 2:Dog
#BREED ID: 1-25:Cat 1:12:Dog
#All images with 1st letter as captial are cat images
#images with small first letter are dog images
"""
SOP_HEADER = "image_id class_id super_class_id path"


# ---------------------------------------------------------------- reading a built shard set


def _read_split(root: Path, split: str) -> list[dict]:
    """Every sample of a built split, in instance order: its meta, index row and image bytes."""
    handle = open_split(root, split)
    assert verify_split(handle) == []
    index = pq.read_table(handle.path / INDEX).to_pylist()
    by_key = {row["key"]: row for row in index}
    samples = []
    for shard in handle.manifest.shards:
        with tarfile.open(handle.path / shard.file) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "json":
                continue
            meta = json.loads(members[f"{key}.json"])
            assert meta["super"] == shard.super_id
            samples.append({"meta": meta, "index": by_key[key], "ext": ext, "bytes": data})
    samples.sort(key=lambda s: s["meta"]["instance"])
    # Instance ids: 0..n-1, sorted by super-class, contiguous within each super-class's range.
    m = handle.manifest
    assert [s["meta"]["instance"] for s in samples] == list(range(m.num_instances))
    supers = [s["meta"]["super"] for s in samples]
    assert supers == sorted(supers)
    for c in m.super_classes:
        assert supers[c.instance_begin : c.instance_end] == [c.id] * (c.instance_end - c.instance_begin)
    for s in samples:
        assert s["index"]["super_id"] == s["meta"]["super"] and s["index"]["fine_id"] == s["meta"]["fine"]
        assert m.fine_to_super[s["meta"]["fine"]] == s["meta"]["super"]
    return samples


def _expected_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    w, h = size
    if min(w, h) <= shorter:
        return w, h
    return (shorter, round(h * shorter / w)) if w <= h else (round(w * shorter / h), shorter)


# ---------------------------------------------------------------- CIFAR-100


def _write_cifar_split(path: Path, images: np.ndarray, fine, coarse, filenames=None, drop=()):
    """`images` N x 32 x 32 x 3 -> a pickle like the real ones: bytes keys, channel-major rows."""
    data = {
        b"filenames": [n.encode() for n in (filenames or [f"img_{i:05d}.png" for i in range(len(images))])],
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": [int(v) for v in fine],
        b"coarse_labels": [int(v) for v in coarse],
        b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)),
    }
    for key in drop:
        del data[key]
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)


def _write_cifar_meta(path: Path, fine_names, coarse_names):
    with open(path, "wb") as f:
        pickle.dump(
            {
                b"fine_label_names": [n.encode() for n in fine_names],
                b"coarse_label_names": [n.encode() for n in coarse_names],
            },
            f,
            protocol=2,
        )


FAKE_FINE = [f"fine{i:02d}" for i in range(100)]
FAKE_COARSE = [f"coarse{i:02d}" for i in range(20)]


@pytest.fixture
def cifar_tree(tmp_path):
    """Train: 2 images per fine class; test: 1 per fine class; coarse = fine % 20 (not fine // 5,
    so nothing can rely on the real table's layout)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    arrays = {}
    for split, per_fine in (("train", 2), ("test", 1)):
        fine = np.repeat(np.arange(100), per_fine)
        rng.shuffle(fine)
        images = rng.integers(0, 256, size=(len(fine), 32, 32, 3), dtype=np.uint8)
        _write_cifar_split(root / split, images, fine.tolist(), (fine % 20).tolist())
        arrays[split] = (images, fine)
    _write_cifar_meta(root / "meta", FAKE_FINE, FAKE_COARSE)
    return root, arrays


def test_cifar100_builds_exact_pixels_and_mapping(cifar_tree, tmp_path):
    root, arrays = cifar_tree
    collection = open_cifar100(str(root))
    assert collection.fine_names == FAKE_FINE and collection.super_names == FAKE_COARSE
    assert collection.fine_to_super == [f % 20 for f in range(100)]
    out = tmp_path / "shards"
    manifests = build_shards(collection, out, shard_size=7, progress=False)
    assert manifests["train"].num_instances == 200 and manifests["test"].num_instances == 100
    for split, (images, fine) in arrays.items():
        samples = _read_split(out, split)
        m = manifests[split]
        assert m.fine_to_super == [f % 20 for f in range(100)] and m.fine_names == FAKE_FINE
        assert [c.instance_end - c.instance_begin for c in m.super_classes] == [len(fine) // 20] * 20
        for s in samples:
            item = int(re.match(rf"{split}#(\d+)", s["index"]["source"]).group(1))
            assert s["ext"] == "png"
            assert s["meta"]["fine"] == fine[item] and s["meta"]["super"] == fine[item] % 20
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["bytes"]))), images[item])


def test_cifar100_without_coarse_labels_names_the_file(cifar_tree):
    root, arrays = cifar_tree
    images, fine = arrays["test"]
    _write_cifar_split(root / "test", images, fine, fine % 20, drop=(b"coarse_labels",))
    with pytest.raises(SourceError, match=rf"{re.escape(str(root / 'test'))}: no b'coarse_labels'.*CIFAR-10"):
        open_cifar100(str(root))


@pytest.mark.parametrize(
    "which, value, message",
    [
        ("fine", 100, "fine label 100 out of range 0..99"),
        ("coarse", 20, "coarse label 20 out of range 0..19"),
        ("fine", -1, "fine label -1"),
    ],
)
def test_cifar100_label_out_of_range_names_file_and_item(cifar_tree, which, value, message):
    root, arrays = cifar_tree
    images, fine = arrays["train"]
    fine, coarse = fine.tolist(), (fine % 20).tolist()
    (fine if which == "fine" else coarse)[17] = value
    _write_cifar_split(root / "train", images, fine, coarse)
    with pytest.raises(SourceError, match=rf"{re.escape(str(root / 'train'))}: item 17: {message}"):
        open_cifar100(str(root))


def test_cifar100_other_bad_inputs(cifar_tree):
    root, arrays = cifar_tree
    images, fine = arrays["test"]
    _write_cifar_split(root / "test", images, fine[:-1], fine % 20)
    with pytest.raises(
        SourceError, match=rf"{re.escape(str(root / 'test'))}: 99 entries in b'fine_labels' for 100 rows"
    ):
        open_cifar100(str(root))
    coarse = fine % 20
    coarse[5] = (coarse[5] + 1) % 20  # fine class with a second coarse label
    _write_cifar_split(root / "test", images, fine, coarse)
    with pytest.raises(
        SourceError, match=rf"{re.escape(str(root / 'test'))}: item 5: fine class {fine[5]} .* at .*train item"
    ):
        open_cifar100(str(root))
    (root / "test").unlink()
    with pytest.raises(SourceError, match=rf"{re.escape(str(root / 'test'))}: file not found"):
        open_cifar100(str(root))
    (root / "meta").write_bytes(b"not a pickle")
    with pytest.raises(SourceError, match=rf"{re.escape(str(root / 'meta'))}: not a readable pickle"):
        open_cifar100(str(root))


def test_cifar100_fine_class_without_images_needs_the_standard_table(cifar_tree):
    root, arrays = cifar_tree
    for split in ("train", "test"):
        images, fine = arrays[split]
        keep = fine != 42
        _write_cifar_split(root / split, images[keep], fine[keep], fine[keep] % 20)
    with pytest.raises(SourceError, match=rf"{re.escape(str(root / 'meta'))}: fine class 42 \(fine42\) has no image"):
        open_cifar100(str(root))


def test_cifar100_real_test_images(tmp_path):
    fixture = shared_fixture("cifar100_test20")
    if fixture is None:
        pytest.skip("shared/fixtures/cifar100_test20 is not beside this checkout")
    with open(fixture / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    # The constants above are the real tables: the fixture's names agree with them, and with the
    # source's own copy of the standard super-class table (written independently).
    for row in rows:
        assert CIFAR_FINE_NAMES[int(row["fine_label"])] == row["fine_name"]
        assert CIFAR_COARSE_NAMES[int(row["coarse_label"])] == row["coarse_name"]
        assert cifar_module.STANDARD_COARSE_OF_FINE[row["fine_name"]] == row["coarse_name"]
    assert sorted(cifar_module.STANDARD_COARSE_OF_FINE) == CIFAR_FINE_NAMES
    assert sorted(cifar_module.STANDARD_SUPER_CLASSES) == CIFAR_COARSE_NAMES

    images = np.stack([np.asarray(Image.open(fixture / row["file"]).convert("RGB")) for row in rows])
    assert images.shape == (20, 32, 32, 3)
    fine = [int(r["fine_label"]) for r in rows]
    coarse = [int(r["coarse_label"]) for r in rows]
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _write_cifar_split(root / "test", images, fine, coarse, filenames=[r["file"] for r in rows])
    # The source needs both splits; a small train split of other (random) images of the same classes.
    rng = np.random.default_rng(0)
    _write_cifar_split(root / "train", rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8), fine, coarse)
    _write_cifar_meta(root / "meta", CIFAR_FINE_NAMES, CIFAR_COARSE_NAMES)

    collection = open_cifar100(str(root))
    # 17 fine classes come from the data, the other 83 from the standard table: all 100 right.
    assert [CIFAR_COARSE_NAMES[c] for c in collection.fine_to_super] == [
        cifar_module.STANDARD_COARSE_OF_FINE[n] for n in CIFAR_FINE_NAMES
    ]
    out = tmp_path / "shards"
    build_shards(collection, out, progress=False)
    samples = _read_split(out, "test")
    assert len(samples) == 20
    source_of = {s["index"]["key"]: s["index"]["source"] for s in samples}
    fine_to_super = open_split(out, "test").manifest.fine_to_super
    handle = open_split(out, "test")
    dataset = wds.WebDataset([handle.shard_path(s) for s in handle.manifest.shards], shardshuffle=False).decode("rgb8")
    seen = set()
    for sample in dataset:
        item = int(re.match(r"test#(\d+) ", source_of[sample["__key__"]]).group(1))
        row = rows[item]
        original = np.asarray(Image.open(fixture / row["file"]).convert("RGB"))
        np.testing.assert_array_equal(sample["png"], original)
        assert sample["json"]["fine"] == int(row["fine_label"])
        assert fine_to_super[sample["json"]["fine"]] == int(row["coarse_label"]) == sample["json"]["super"]
        seen.add(item)
    assert seen == set(range(20))


# ---------------------------------------------------------------- Oxford-IIIT Pet

# (image name, CLASS-ID, SPECIES, BREED-ID, split, (width, height), kind). Real class ids:
# Abyssinian 1, american_bulldog 2, beagle 5, Bengal 6.
PETS = [
    ("Abyssinian_1", 1, 1, 1, "trainval", (96, 72), "RGB"),
    ("Abyssinian_2", 1, 1, 1, "test", (40, 30), "RGB"),  # smaller than shorter_side: kept as is
    ("Abyssinian_10", 1, 1, 1, "trainval", (80, 60), "CMYK"),
    ("american_bulldog_100", 2, 2, 1, "trainval", (50, 120), "RGB"),
    ("american_bulldog_7", 2, 2, 1, "test", (70, 70), "L"),
    ("beagle_3", 5, 2, 3, "trainval", (60, 90), "PNG"),  # a PNG (with alpha) named .jpg
    ("beagle_4", 5, 2, 3, "test", (30, 20), "PNG"),
    ("Bengal_12", 6, 1, 2, "trainval", (64, 100), "RGB"),
    ("Bengal_13", 6, 1, 2, "test", (120, 50), "RGB"),
]
PETS_SHORTER = 48


def _pets_image(size, kind, seed) -> tuple[Image.Image, bytes]:
    rng = np.random.default_rng(seed)
    # Smooth content (a gradient plus a colour) so JPEG round trips stay close to the original.
    w, h = size
    base = rng.integers(40, 200, size=3)
    grad = np.linspace(0, 50, w, dtype=np.float32)[None, :, None]
    rgb = Image.fromarray(np.clip(base[None, None, :] + grad + np.zeros((h, w, 3)), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    if kind == "PNG":
        image = rgb.convert("RGBA")
        image.save(buf, format="PNG")
    else:
        image = rgb.convert(kind)
        image.save(buf, format="JPEG", quality=95)
    return image, buf.getvalue()


def _write_pets(root: Path, rows=PETS, extra_lines=()):
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    originals = {}
    for i, (name, _, _, _, _, size, kind) in enumerate(rows):
        image, data = _pets_image(size, kind, i)
        (root / "images" / f"{name}.jpg").write_bytes(data)
        originals[name] = (image, data)
    line = lambda r: f"{r[0]} {r[1]} {r[2]} {r[3]}\n"  # noqa: E731
    (root / "annotations" / "list.txt").write_text(PETS_LIST_HEADER + "".join(line(r) for r in rows))
    for split in ("trainval", "test"):
        text = "".join(line(r) for r in rows if r[4] == split) + "".join(t for s, t in extra_lines if s == split)
        (root / "annotations" / f"{split}.txt").write_text(text)
    return originals


def test_pets_builds_species_and_breeds_with_resized_rgb_jpegs(tmp_path):
    root = tmp_path / "oxford-iiit-pet"
    originals = _write_pets(root)
    collection = open_pets(str(root), shorter_side=PETS_SHORTER, jpeg_quality=90)
    assert collection.super_names == ["cat", "dog"]
    assert collection.fine_names == ["Abyssinian", "american_bulldog", "beagle", "Bengal"]
    assert collection.fine_to_super == [0, 1, 1, 0]
    out = tmp_path / "shards"
    manifests = build_shards(collection, out, shard_size=2, progress=False)
    assert manifests["train"].num_instances == 5 and manifests["test"].num_instances == 4
    assert [(c.name, c.instance_end - c.instance_begin) for c in manifests["train"].super_classes] == [
        ("cat", 3),
        ("dog", 2),
    ]
    assert manifests["train"].fine_names == manifests["test"].fine_names == collection.fine_names
    fine_of = {1: 0, 2: 1, 5: 2, 6: 3}
    for split in ("train", "test"):
        for s in _read_split(out, split):
            name = s["index"]["source"].rsplit(" ", 1)[1]
            row = next(r for r in PETS if r[0] == name)
            assert row[4] == ("trainval" if split == "train" else "test")
            assert s["meta"]["fine"] == fine_of[row[1]] and s["meta"]["super"] == row[2] - 1
            assert s["ext"] == "jpg"
            decoded = Image.open(io.BytesIO(s["bytes"]))
            assert decoded.format == "JPEG" and decoded.mode == "RGB"
            assert decoded.size == _expected_size(row[5], PETS_SHORTER)
            original, data = originals[name]
            if row[6] == "RGB" and min(row[5]) <= PETS_SHORTER:
                assert s["bytes"] == data  # an RGB JPEG needing no resize is stored untouched
            expected = np.asarray(
                original.convert("RGB").resize(decoded.size, Image.Resampling.BICUBIC), dtype=np.float32
            )
            assert np.abs(np.asarray(decoded, dtype=np.float32) - expected).mean() < 4


def test_pets_list_line_naming_a_missing_image(tmp_path):
    root = tmp_path / "pets"
    _write_pets(root, extra_lines=[("test", "Bengal_99 6 1 2\n")])
    with pytest.raises(
        SourceError,
        match=rf"{re.escape(str(root / 'annotations' / 'test.txt'))}:5: image .*Bengal_99\.jpg does not exist",
    ):
        open_pets(str(root))


@pytest.mark.parametrize(
    "line, message",
    [
        ("Bengal_12 38 1 2", "CLASS-ID 38 out of range 1..37"),
        ("Bengal_12 0 1 2", "CLASS-ID 0 out of range"),
        ("Bengal_12 6 3 2", "SPECIES 3 out of range 1..2"),
        ("Bengal_12 six 1 2", "CLASS-ID 'six' is not an integer"),
        ("Bengal_12 6 1", "expected 'Image CLASS-ID SPECIES BREED-ID'"),
        ("Bengal_12 2 2 1", "Bengal_12 has CLASS-ID 2 SPECIES 2, but 6 1 at .*list.txt:14"),
    ],
)
def test_pets_bad_lines_name_file_and_line(tmp_path, line, message):
    root = tmp_path / "pets"
    _write_pets(root, extra_lines=[("trainval", line + "\n")])
    with pytest.raises(SourceError, match=rf"{re.escape(str(root / 'annotations' / 'trainval.txt'))}:6: {message}"):
        open_pets(str(root))


def test_pets_breed_under_two_species_and_missing_list(tmp_path):
    root = tmp_path / "pets"
    rows = PETS + [("Bengal_50", 6, 2, 2, "trainval", (20, 20), "RGB")]
    _write_pets(root, rows=rows)
    with pytest.raises(
        SourceError,
        match=r"list.txt:16: CLASS-ID 6 is breed 'Bengal' of species 2, but 'Bengal' of species 1 at .*list.txt:14",
    ):
        open_pets(str(root))
    (root / "annotations" / "list.txt").unlink()
    with pytest.raises(SourceError, match=r"list.txt: file not found"):
        open_pets(str(root))


# ---------------------------------------------------------------- Stanford Online Products

# (class_id, super_class_id, folder, images) per file; real super ids: bicycle 1, chair 3, mug 8.
SOP_TRAIN = [(1, 1, "bicycle_final", 3), (2, 1, "bicycle_final", 2), (3, 3, "chair_final", 4), (4, 8, "mug_final", 3)]
SOP_TEST = [(11319, 1, "bicycle_final", 4), (11320, 3, "chair_final", 3), (11321, 8, "mug_final", 5)]
SOP_SHORTER = 32


def _write_sop(root: Path, train=SOP_TRAIN, test=SOP_TEST, header=SOP_HEADER, extra=()):
    rng = np.random.default_rng(7)
    sizes = {}
    for file, classes in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        lines = [header]
        image_id = 0
        for class_id, super_id, folder, count in classes:
            product = 111085122871 + class_id
            for k in range(count):
                image_id += 1
                rel = f"{folder}/{product}_{k}.JPG"
                size = tuple(int(v) for v in rng.integers(20, 90, size=2))
                (root / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(
                    root / rel, format="JPEG"
                )
                sizes[rel] = size
                lines.append(f"{image_id} {class_id} {super_id} {rel}")
        lines += [t for f, t in extra if f == file]
        (root / file).write_text("\n".join(lines) + "\n")
    return sizes


def _sources(collection, split):
    return [r.origin.rsplit(" ", 1)[1] for r in collection.splits[split]]


def test_sop_paper_split_sizes_determinism_and_shards(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    sizes = _write_sop(root)
    pool = 24
    collection = open_sop(str(root), split="paper", seed=3, train_size=15, shorter_side=SOP_SHORTER)
    assert collection.super_names == ["bicycle", "chair", "mug"]
    assert collection.fine_names == [
        "bicycle/1",
        "bicycle/2",
        "chair/3",
        "mug/4",
        "bicycle/11319",
        "chair/11320",
        "mug/11321",
    ]
    assert collection.fine_to_super == [0, 0, 1, 2, 0, 1, 2]
    train, test = _sources(collection, "train"), _sources(collection, "test")
    assert (
        len(train) == 15
        and len(test) == pool - 15
        and set(train) | set(test) == set(sizes)
        and not set(train) & set(test)
    )
    # A random draw over the pooled files, not the train file first.
    assert set(train) & set(_sources(open_sop(str(root), split="standard"), "test"))
    again = open_sop(str(root), split="paper", seed=3, train_size=15, shorter_side=SOP_SHORTER)
    assert _sources(again, "train") == train and _sources(again, "test") == test
    assert set(_sources(open_sop(str(root), split="paper", seed=4, train_size=15), "train")) != set(train)

    out = tmp_path / "shards"
    manifests = build_shards(collection, out, shard_size=3, progress=False)
    assert (manifests["train"].num_instances, manifests["test"].num_instances) == (15, 9)
    assert manifests["train"].fine_names == manifests["test"].fine_names == collection.fine_names
    assert manifests["train"].fine_to_super == manifests["test"].fine_to_super == [0, 0, 1, 2, 0, 1, 2]
    product_fine = {111085122871 + c: i for i, c in enumerate([1, 2, 3, 4, 11319, 11320, 11321])}
    for split in ("train", "test"):
        for s in _read_split(out, split):
            rel = s["index"]["source"].rsplit(" ", 1)[1]
            assert s["meta"]["fine"] == product_fine[int(rel.split("/")[1].split("_")[0])]
            decoded = Image.open(io.BytesIO(s["bytes"]))
            assert decoded.mode == "RGB" and decoded.size == _expected_size(sizes[rel], SOP_SHORTER)


def test_sop_standard_split_keeps_the_files(tmp_path):
    root = tmp_path / "sop"
    _write_sop(root)
    collection = open_sop(str(root), split="standard", shorter_side=SOP_SHORTER)
    assert len(collection.splits["train"]) == 12 and len(collection.splits["test"]) == 12
    assert all("Ebay_train.txt" in r.origin for r in collection.splits["train"])
    assert all("Ebay_test.txt" in r.origin for r in collection.splits["test"])
    assert {r.fine_id for r in collection.splits["train"]} == {0, 1, 2, 3}
    assert {r.fine_id for r in collection.splits["test"]} == {4, 5, 6}
    out = tmp_path / "shards"
    manifests = build_shards(collection, out, progress=False)
    assert [(c.name, c.instance_end - c.instance_begin) for c in manifests["test"].super_classes] == [
        ("bicycle", 4),
        ("chair", 3),
        ("mug", 5),
    ]
    assert manifests["train"].fine_names == manifests["test"].fine_names
    for split in ("train", "test"):
        _read_split(out, split)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("99 22635 1 bicycle_final/111085122872_0.JPG", "class_id 22635 out of range 1..22634"),
        ("99 x 1 bicycle_final/111085122872_0.JPG", "class_id 'x' is not an integer"),
        ("99 1 13 bicycle_final/111085122872_0.JPG", "super_class_id 13 out of range 1..12"),
        ("99 1 1 bicycle_final/missing_0.JPG", "image .*missing_0.JPG does not exist"),
        (
            "99 4 1 bicycle_final/111085122872_0.JPG",
            "class_id 4 under super_class_id 1, but under 8 at .*Ebay_train.txt:11",
        ),
        (
            "99 1 3 bicycle_final/111085122872_0.JPG",
            "super_class_id 3 is folder 'bicycle', but 'chair' at .*Ebay_train.txt:7",
        ),
        ("99 1 1 bicycle_final/111085122872_0.JPG extra", "expected 'image_id class_id super_class_id path'"),
    ],
)
def test_sop_bad_rows_name_file_and_line(tmp_path, extra, message):
    root = tmp_path / "sop"
    _write_sop(root, extra=[("Ebay_train.txt", extra)])
    with pytest.raises(SourceError, match=rf"{re.escape(str(root / 'Ebay_train.txt'))}:14: {message}"):
        open_sop(str(root))


def test_sop_wrong_header_and_train_size(tmp_path):
    root = tmp_path / "sop"
    _write_sop(root, header="id class super path")
    with pytest.raises(
        SourceError, match=rf"{re.escape(str(root / 'Ebay_train.txt'))}:1: header 'id class super path'"
    ):
        open_sop(str(root))
    root = tmp_path / "sop2"
    _write_sop(root)
    with pytest.raises(ValueError, match=r"0 < train_size < 24 .* got 24"):
        open_sop(str(root), train_size=24)
    with pytest.raises(ValueError, match=r"split must be 'paper' or 'standard'"):
        open_sop(str(root), split="random")


# ---------------------------------------------------------------- CLI


def test_cli_registers_the_sources_and_builds_cifar100(cifar_tree, tmp_path, capsys):
    assert SOURCES["cifar100"] is open_cifar100 and SOURCES["pets"] is open_pets and SOURCES["sop"] is open_sop
    root, _ = cifar_tree
    out = tmp_path / "cli"
    assert main(["build", "--source", "cifar100", "--path", str(root), "--out", str(out), "--quiet"]) == 0
    assert "200 samples" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
