"""The paper's synthetic data (Section 4.1): a big patch (super-class) and a small patch (fine
class) pasted at random places on a blank image. Each super-class owns `fine_per_super` small
patches that no other super-class uses, so only the small patch tells fine classes apart.

One generator draws the patches, then every training image, then every test image: the test
split's size (`test_per_fine`) leaves the training images bit for bit the same. The default
training set is the paper's 512 images (4 per fine class); the default test split is 40 per fine
class (5,120 images), so that the 95% interval of a difference in fine R@1 between two runs
reaches about 2 points on each side at most (docs/DESIGN.md, "Evaluation").

`unlabeled=N` adds N unlabeled training images (the pool, docs/DESIGN.md "The pool"): drawn
after the test images by the same generator (so the labeled and test images stay bit for bit the
same), image j of fine class j mod F, its labels dropped."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fgdist.data.shardset import UNLABELED
from shards.sources import Collection, Record, encode_png


def _patches(rng, count, size):
    """Random RGB patterns: each patch a fixed colour texture."""
    return rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def _paste(rng, canvas, patch, taken):
    """Paste `patch` at a random place that does not overlap the box in `taken` (if any)."""
    h = patch.shape[0]
    size = canvas.shape[0]
    while True:
        y, x = rng.integers(0, size - h + 1, size=2)
        box = (y, x, y + h, x + h)
        if taken is None or box[2] <= taken[0] or box[0] >= taken[2] or box[3] <= taken[1] or box[1] >= taken[3]:
            canvas[y : y + h, x : x + h] = patch
            return box


def _image(rng, big_patch, small_patch, image_size: int) -> bytes:
    """One image: the super-class's big patch and the fine class's small patch, not overlapping."""
    canvas = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    box = _paste(rng, canvas, big_patch, None)
    _paste(rng, canvas, small_patch, box)
    return encode_png(Image.fromarray(canvas))


def open_synthetic(
    seed: int = 0,
    num_super: int = 32,
    fine_per_super: int = 4,
    train_per_fine: int = 4,
    test_per_fine: int = 40,
    image_size: int = 32,
    big_patch: int = 12,
    small_patch: int = 5,
    unlabeled: int = 0,
) -> Collection:
    if 2 * max(big_patch, small_patch) > image_size or big_patch + small_patch > image_size:
        raise ValueError(f"synthetic: patches {big_patch}+{small_patch} do not fit in {image_size}x{image_size}")
    if isinstance(unlabeled, bool) or not isinstance(unlabeled, int) or unlabeled < 0:
        raise ValueError(f"synthetic: unlabeled must be an integer >= 0, got {unlabeled!r}")
    rng = np.random.default_rng(seed)
    big = _patches(rng, num_super, big_patch)
    small = _patches(rng, num_super * fine_per_super, small_patch)
    num_fine = num_super * fine_per_super
    collection = Collection(
        name="synthetic",
        super_names=[f"super{s:02d}" for s in range(num_super)],
        fine_names=[f"fine{f:03d}" for f in range(num_fine)],
        fine_to_super=[f // fine_per_super for f in range(num_fine)],
    )
    for split, per_fine in (("train", train_per_fine), ("test", test_per_fine)):
        records = []
        for fine in range(num_fine):
            for k in range(per_fine):
                png = _image(rng, big[fine // fine_per_super], small[fine], image_size)
                records.append(
                    Record(fine // fine_per_super, fine, (lambda b=png: b), "png", f"synthetic {split} fine{fine} #{k}")
                )
        collection.splits[split] = records
    for j in range(unlabeled):
        fine = j % num_fine
        png = _image(rng, big[fine // fine_per_super], small[fine], image_size)
        record = Record(UNLABELED, UNLABELED, (lambda b=png: b), "png", f"synthetic train unlabeled #{j}")
        collection.splits["train"].append(record)
    return collection
