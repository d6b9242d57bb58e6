"""The Fashion-MNIST source on the real IDX files (Debian package dataset-fashion-mnist, which
.ci/run installs), a truncated copy, and a folder without them."""

import gzip
from pathlib import Path

import pytest

from fgdist.data.shardset import open_split, verify_split
from shards.build import build_shards
from shards.sources import SourceError
from shards.sources.fashion_mnist import DEFAULT_ROOT, FINE_TO_SUPER, open_fashion_mnist

needs_dataset = pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason="apt-get install dataset-fashion-mnist")


def test_missing_files_point_at_the_path_flag(tmp_path):
    """The CLI flag that sets the folder is --path (there is no --root)."""
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte.gz: file not found \(.*or pass --path FOLDER\)$"):
        open_fashion_mnist(root=str(tmp_path))


@needs_dataset
def test_real_files_grouped_as_designed(tmp_path):
    collection = open_fashion_mnist(limit_per_split=300)
    assert collection.super_names == ["tops", "trouser", "dress", "footwear", "bag"]
    assert FINE_TO_SUPER == [0, 1, 0, 2, 0, 3, 0, 3, 4, 3]
    assert len(collection.splits["train"]) == 300 and len(collection.splits["test"]) == 300
    assert all(collection.fine_to_super[r.fine_id] == r.super_id for r in collection.splits["train"])
    build_shards(collection, tmp_path / "fm", shard_size=50, progress=False)
    split = open_split(tmp_path / "fm", "train")
    assert verify_split(split) == [] and split.manifest.num_fine == 10


@needs_dataset
def test_limit_train_keeps_the_whole_test_split():
    collection = open_fashion_mnist(limit_train=200)
    assert len(collection.splits["train"]) == 200 and len(collection.splits["test"]) == 10000


@needs_dataset
def test_truncated_idx_file_names_the_file(tmp_path):
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        data = gzip.open(Path(DEFAULT_ROOT) / name).read()
        if name == "train-images-idx3-ubyte.gz":
            data = data[:5000]
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(data)
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte.gz: truncated IDX file"):
        open_fashion_mnist(root=str(tmp_path))


@needs_dataset
def test_unlabeled_are_the_next_training_images_with_their_labels_dropped():
    collection = open_fashion_mnist(limit_train=200, unlabeled=50)
    train = collection.splits["train"]
    assert len(train) == 250 and len(collection.splits["test"]) == 10000
    assert all(r.super_id >= 0 for r in train[:200])
    assert [(r.super_id, r.fine_id) for r in train[200:]] == [(-1, -1)] * 50
    assert [r.origin for r in train[199:201]] == ["train-images-idx3-ubyte.gz#199", "train-images-idx3-ubyte.gz#200"]
    assert train[200].load() == open_fashion_mnist(limit_train=201).splits["train"][200].load()  # the same image
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte.gz: unlabeled=20 asks for images 59990..60009"):
        open_fashion_mnist(limit_train=59990, unlabeled=20)
