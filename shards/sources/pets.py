"""Oxford-IIIT Pet: `annotations/list.txt` (every annotated image), `annotations/trainval.txt`
and `annotations/test.txt` (the two splits), images at `images/<Image>.jpg`.

Every list line is `Image CLASS-ID SPECIES BREED-ID`, e.g. `Abyssinian_100 1 1 1`, after comment
lines starting with '#'. CLASS-ID 1..37 is the breed (fine class), SPECIES 1=cat 2=dog the
super-class; the breed's name is the image name without its trailing `_<number>`. The
`trainval` split becomes `train`.
"""

from __future__ import annotations

from pathlib import Path

from shards.sources import Collection, Record, SourceError, jpeg_loader, parse_int, require_image_file

SUPER_NAMES = ["cat", "dog"]  # SPECIES 1, 2
NUM_BREEDS = 37
LIST_FILES = {"list.txt": None, "trainval.txt": "train", "test.txt": "test"}  # file -> split


def _parse(path: Path, images: Path):
    """Yield (where, image name, breed name, class id, species) per line of one list file."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found (expected the Oxford-IIIT Pet annotations folder)") from None
    for lineno, line in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 4:
            raise SourceError(f"{where}: expected 'Image CLASS-ID SPECIES BREED-ID', got {line!r}")
        name, class_text, species_text, breed_text = fields
        class_id = parse_int(class_text, "CLASS-ID", where)
        species = parse_int(species_text, "SPECIES", where)
        parse_int(breed_text, "BREED-ID", where)
        if not 1 <= class_id <= NUM_BREEDS:
            raise SourceError(f"{where}: CLASS-ID {class_id} out of range 1..{NUM_BREEDS}")
        if not 1 <= species <= len(SUPER_NAMES):
            raise SourceError(f"{where}: SPECIES {species} out of range 1..2 (1=cat, 2=dog)")
        breed, sep, number = name.rpartition("_")
        if not sep or not breed or not number.isdigit():
            raise SourceError(f"{where}: image name {name!r} is not '<breed>_<number>'")
        require_image_file(images / f"{name}.jpg", where)
        yield where, name, breed, class_id, species


def open_pets(root: str, shorter_side: int = 256, jpeg_quality: int = 90) -> Collection:
    base = Path(root)
    annotations, images = base / "annotations", base / "images"
    labels: dict[str, tuple[int, int, str]] = {}  # image -> (class id, species, where first seen)
    breeds: dict[int, tuple[str, int, str]] = {}  # class id -> (breed name, species, where first seen)
    split_of: dict[str, str] = {}  # image -> where it was put in a split
    rows: dict[str, list[tuple[str, str, int]]] = {"train": [], "test": []}
    for file, split in LIST_FILES.items():
        for where, name, breed, class_id, species in _parse(annotations / file, images):
            seen = labels.setdefault(name, (class_id, species, where))
            if seen[:2] != (class_id, species):
                raise SourceError(
                    f"{where}: {name} has CLASS-ID {class_id} SPECIES {species}, but {seen[0]} {seen[1]} at {seen[2]}"
                )
            known = breeds.setdefault(class_id, (breed, species, where))
            if known[:2] != (breed, species):
                raise SourceError(
                    f"{where}: CLASS-ID {class_id} is breed {breed!r} of species {species}, "
                    f"but {known[0]!r} of species {known[1]} at {known[2]}"
                )
            if split is not None:
                if name in split_of:
                    raise SourceError(
                        f"{where}: {name} is already listed at {split_of[name]} (the splits must not share images)"
                    )
                split_of[name] = where
                rows[split].append((where, name, class_id))

    # Fine ids in CLASS-ID order: the official numbering (alphabetical by breed), the same table
    # for both splits because it is built from all three lists.
    fine_of = {class_id: i for i, class_id in enumerate(sorted(breeds))}
    collection = Collection(
        "oxford-iiit-pet",
        list(SUPER_NAMES),
        [breeds[c][0] for c in sorted(breeds)],
        [breeds[c][1] - 1 for c in sorted(breeds)],
    )
    for split, split_rows in rows.items():
        collection.splits[split] = [
            Record(
                breeds[class_id][1] - 1,
                fine_of[class_id],
                jpeg_loader(images / f"{name}.jpg", shorter_side, jpeg_quality),
                "jpg",
                f"{where} {name}",
            )
            for where, name, class_id in split_rows
        ]
    return collection
