"""CIFAR-100, python version (`cifar-100-python/`): pickles `train`, `test` and `meta`.

Each split pickle is a dict with bytes keys (written by Python 2): b'data' is an N x 3072 uint8
array, one row per image, channel-major (1024 red, then 1024 green, then 1024 blue values, each
a 32x32 image in row-major order); b'fine_labels' and b'coarse_labels' are lists of N ints;
b'filenames' names the images. `meta` holds b'fine_label_names' (100) and b'coarse_label_names'
(20), both in alphabetical order. Super-class = coarse label, fine class = fine label.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from shards.sources import Collection, Record, SourceError, encode_png

NUM_FINE = 100
NUM_COARSE = 20
SPLITS = ("train", "test")

# The fixed public CIFAR-100 super-class table (coarse name -> its 5 fine names). Used only for a
# fine class that has no image in the given pickles (a cut-down copy of the data set), whose
# super-class the data cannot tell; the real train split holds every fine class.
STANDARD_SUPER_CLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
STANDARD_COARSE_OF_FINE = {fine: coarse for coarse, fines in STANDARD_SUPER_CLASSES.items() for fine in fines}


def _load_pickle(path: Path) -> dict:
    # The official files are Python 2 pickles: encoding='bytes' keeps their str keys and values
    # as bytes (b'data', ...) and lets numpy arrays load. Unpickling runs code from the file, as
    # with any pickle: only open a copy of the data set you trust.
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise SourceError(
            f"{path}: file not found (expected the CIFAR-100 python version: train, test, meta)"
        ) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as err:
        raise SourceError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a dict, found {type(data).__name__}")
    return data


def _require(data: dict, key: bytes, path: Path, hint: str = ""):
    if key not in data:
        have = sorted(k.decode("latin-1") if isinstance(k, bytes) else str(k) for k in data)
        raise SourceError(f"{path}: no {key!r} entry{hint} (entries: {have})")
    return data[key]


def _names(data: dict, key: bytes, count: int, path: Path) -> list[str]:
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in _require(data, key, path)]
    if len(names) != count:
        raise SourceError(f"{path}: {key!r} has {len(names)} names, CIFAR-100 has {count}")
    return names


def _read_split(path: Path):
    data = _load_pickle(path)
    _require(data, b"data", path)
    _require(data, b"fine_labels", path)
    # CIFAR-10's batches have b'labels' only: name the likely mix-up.
    _require(data, b"coarse_labels", path, " (a CIFAR-100 split has coarse labels; is this CIFAR-10?)")
    images = np.asarray(data[b"data"])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise SourceError(f"{path}: b'data' is {images.dtype} with shape {images.shape}, expected uint8 N x 3072")
    try:
        fine = [int(v) for v in data[b"fine_labels"]]
        coarse = [int(v) for v in data[b"coarse_labels"]]
    except (TypeError, ValueError) as err:
        raise SourceError(f"{path}: labels are not lists of integers ({err})") from None
    # File names only label the records' origin; a copy without them still loads.
    filenames = [
        n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)
        for n in data.get(b"filenames", [b""] * len(images))
    ]
    for key, values in ((b"fine_labels", fine), (b"coarse_labels", coarse), (b"filenames", filenames)):
        if len(values) != len(images):
            raise SourceError(f"{path}: {len(values)} entries in {key!r} for {len(images)} rows of b'data'")
    for i, (f, c) in enumerate(zip(fine, coarse)):
        if not 0 <= f < NUM_FINE:
            raise SourceError(f"{path}: item {i}: fine label {f} out of range 0..{NUM_FINE - 1}")
        if not 0 <= c < NUM_COARSE:
            raise SourceError(f"{path}: item {i}: coarse label {c} out of range 0..{NUM_COARSE - 1}")
    # Channel-major rows -> (N, 32, 32, 3) height x width x RGB; a view, no copy.
    return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), fine, coarse, filenames


def _png_loader(pixels: np.ndarray):
    return lambda: encode_png(Image.fromarray(np.ascontiguousarray(pixels)))


def open_cifar100(root: str) -> Collection:
    base = Path(root)
    meta_path = base / "meta"
    meta = _load_pickle(meta_path)
    fine_names = _names(meta, b"fine_label_names", NUM_FINE, meta_path)
    coarse_names = _names(meta, b"coarse_label_names", NUM_COARSE, meta_path)

    splits = {split: _read_split(base / split) for split in SPLITS}

    # fine -> coarse comes from the data; CIFAR-100 fixes it, so a fine label seen with two
    # coarse labels means a damaged file.
    fine_to_coarse: dict[int, tuple[int, str]] = {}
    for split, (_, fine, coarse, _) in splits.items():
        for i, (f, c) in enumerate(zip(fine, coarse)):
            seen = fine_to_coarse.setdefault(f, (c, f"{base / split} item {i}"))
            if seen[0] != c:
                raise SourceError(
                    f"{base / split}: item {i}: fine class {f} ({fine_names[f]}) has coarse label {c} "
                    f"({coarse_names[c]}), "
                    f"but coarse label {seen[0]} ({coarse_names[seen[0]]}) at {seen[1]}"
                )
    fine_to_super = []
    for f, name in enumerate(fine_names):
        if f in fine_to_coarse:
            fine_to_super.append(fine_to_coarse[f][0])
        elif STANDARD_COARSE_OF_FINE.get(name) in coarse_names:
            fine_to_super.append(coarse_names.index(STANDARD_COARSE_OF_FINE[name]))
        else:
            raise SourceError(
                f"{meta_path}: fine class {f} ({name}) has no image in {base / 'train'} or {base / 'test'} and is not "
                "in the standard CIFAR-100 table, so its super-class is unknown"
            )

    collection = Collection("cifar100", coarse_names, fine_names, fine_to_super)
    for split, (images, fine, coarse, filenames) in splits.items():
        collection.splits[split] = [
            Record(coarse[i], fine[i], _png_loader(images[i]), "png", f"{split}#{i} {filenames[i]}".rstrip())
            for i in range(len(fine))
        ]
    return collection
