"""Image files on disk: a CSV/Parquet manifest, or a folder tree `root/<super>/<fine>/*.jpg`
(or `root/<super>/*.jpg` where there are no fine classes).

JPEG and PNG files go into the shards as they are; the other formats Pillow reads and photo
collections hold (WebP, BMP, GIF, TIFF) are stored as lossless PNG of their RGB pixels
(fgdist/images.py `to_rgb`: what training would read from them anyway), since a shard member
is `.jpg` or `.png`.

`read_manifest`, `tree_labels` and `class_tables` are also how `fgdist-embed` reads its
`--manifest` and `--images` labels, so a manifest or folder means the same classes to both.

Unlabeled training images (the pool, docs/DESIGN.md "The pool"): a manifest row with an empty
`super` (and no `fine`), or an image under the folder's top-level `unlabeled/` (`train/unlabeled/`
with split folders). The test split has none: such a row there is an error naming it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path, PurePath

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shards.sources import Collection, Record, SourceError, class_table, require_image_file

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}  # stored as they are
TRANSCODED = (".webp", ".bmp", ".gif", ".tif", ".tiff")  # stored as PNG
IMAGE_SUFFIXES = (*IMAGE_EXTS, *TRANSCODED)  # what a folder source (and fgdist-embed --images) reads
UNLABELED_FOLDER = "unlabeled"  # a folder source's tree of unlabeled training images


def _png_of(path: Path) -> bytes:
    from fgdist.images import open_image, to_rgb

    out = io.BytesIO()
    to_rgb(open_image(path.read_bytes())).save(out, format="PNG")
    return out.getvalue()


def _reader(path: Path):
    if path.suffix.lower() in TRANSCODED:
        return lambda: _png_of(path)
    return lambda: path.read_bytes()


def _ext(path: Path, where: str) -> str:
    if path.suffix.lower() in TRANSCODED:
        return "png"
    ext = IMAGE_EXTS.get(path.suffix.lower())
    if ext is None:
        raise SourceError(f"{where}: {path.name}: unsupported image type (use one of {', '.join(IMAGE_SUFFIXES)})")
    return ext


@dataclass(frozen=True)
class ListedImage:
    """One image of a manifest or a folder tree with its labels as written (None: no label)."""

    file: Path  # the file on disk
    listed: str  # its path as the user knows it: as written in the manifest, or relative to the folder
    super: str | None
    fine: str | None
    origin: str  # where it was listed, for errors and the shard index's `source` column
    split: str = "train"


@dataclass(frozen=True)
class ClassTables:
    super_names: list[str]
    fine_names: list[str]  # empty when there are no fine labels
    super_ids: dict[str, int]
    fine_ids: dict[str, int]

    def ids(self, image: ListedImage) -> tuple[int, int]:
        """(super id, fine id) of an image, -1 for a label it does not have (both -1: unlabeled,
        fgdist.data.shardset.UNLABELED)."""
        return self.super_ids.get(image.super, -1), self.fine_ids.get(image.fine, -1)


def class_tables(images: list[ListedImage]) -> ClassTables:
    """The class tables of the images' labels (`class_table`). Fine labels are on every labelled
    image or on none; unlabelled images (no label at all) are left out."""
    labelled = [i for i in images if i.super is not None or i.fine is not None]
    if any(i.fine is not None for i in labelled):
        first = next((i.origin for i in labelled if i.fine is None), None)
        if first is not None:
            raise SourceError(f"{first}: empty fine label, while other rows have one")
    super_names, super_ids = class_table(i.super for i in labelled if i.super is not None)
    fine_names, fine_ids = class_table(i.fine for i in labelled if i.fine is not None)
    return ClassTables(super_names, fine_names, super_ids, fine_ids)


def tree_labels(relative: PurePath) -> tuple[str | None, str | None]:
    """(super, fine) of an image at `relative` in a `<super>/<fine>/` tree: the fine class is named
    `super/fine` (two super-classes may each have a `red`); at `<super>/` it has a super-class and
    no fine class; an image elsewhere (the root, deeper folders) has no labels."""
    if len(relative.parts) == 2:
        return relative.parts[0], None
    if len(relative.parts) != 3:
        return None, None
    super_name, fine_name = relative.parts[0], relative.parts[1]
    return super_name, f"{super_name}/{fine_name}"


def tree_images(root: Path) -> list[Path]:
    """The image files under `root` (IMAGE_SUFFIXES, any case; hidden files and folders left out),
    sorted by path. A folder named like an image is listed too, so that it is reported, not skipped."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _collect(name: str, images: list[ListedImage]) -> Collection:
    tables = class_tables(images)
    fine_to_super = [-1] * len(tables.fine_names)  # -1: an unused fine id (sparse integer labels)
    for image in images:
        super_id, fine_id = tables.ids(image)
        if fine_id < 0:
            continue
        if fine_to_super[fine_id] not in (-1, super_id):
            raise SourceError(f"{image.origin}: fine class {image.fine!r} appears under two super-classes")
        fine_to_super[fine_id] = super_id
    collection = Collection(name, tables.super_names, tables.fine_names, fine_to_super)
    for image in images:
        if image.super is None:
            _check_unlabeled(image)
        ext = _ext(image.file, image.origin)
        record = Record(*tables.ids(image), _reader(image.file), ext, image.origin)
        collection.splits.setdefault(image.split, []).append(record)
    return collection


def _check_unlabeled(image: ListedImage) -> None:
    """An image without a super-class is an unlabeled training image: no fine label, train only."""
    if image.fine is not None:
        raise SourceError(f"{image.origin}: fine label {image.fine!r} without a super label")
    if image.split != "train":
        raise SourceError(
            f"{image.origin}: an unlabeled image (empty super) in the {image.split} split; only training images "
            "may be unlabeled (evaluation needs each query's label)"
        )


def read_manifest(
    path: str | Path, required: tuple[str, ...] = ("path",), columns: tuple[str, ...] = ()
) -> list[ListedImage]:
    """The images of a CSV or Parquet manifest. Columns: `path` (relative to the manifest's folder,
    or absolute), optional `super`, `fine` (class names or integer ids, see `class_table`) and
    `split` (default train); `required` columns must exist and be non-empty on every row,
    `columns` must exist (their values may be empty). Every listed image must be a file, listed
    once."""
    manifest = Path(path)
    if not manifest.exists():
        raise SourceError(f"{manifest}: manifest not found")
    table = (
        pq.read_table(manifest)
        if manifest.suffix == ".parquet"
        else pacsv.read_csv(
            manifest,
            convert_options=pacsv.ConvertOptions(
                strings_can_be_null=False, column_types={c: "string" for c in ("path", "super", "fine", "split")}
            ),
        )
    )
    for column in ("path", *required, *columns):
        if column not in table.column_names:
            raise SourceError(f"{manifest}: missing column {column!r} (columns: {table.column_names})")
    columns = {c: table.column(c).to_pylist() for c in table.column_names}
    images = []
    first_row_of: dict[Path, str] = {}  # resolved image path -> the row that listed it first
    for i in range(table.num_rows):
        # Row numbers as a person counts them in the file: the CSV header is line 1.
        where = f"{manifest} row {i + 2 if manifest.suffix != '.parquet' else i}"
        values = {c: (str(v).strip() if v is not None else "") for c, v in ((c, columns[c][i]) for c in columns)}
        for column in ("path", *required):
            if not values[column]:
                raise SourceError(f"{where}: empty {column!r}")
        image = (manifest.parent / values["path"]).resolve()
        require_image_file(image, where)
        # The same image twice would be two instances with identical pixels (or one image in
        # both splits): a mistake in the list, never what a user means.
        if image in first_row_of:
            raise SourceError(f"{where}: image {image} is already listed at {first_row_of[image]}")
        first_row_of[image] = where
        labels = (values.get("super") or None, values.get("fine") or None)
        split = values.get("split") or "train"
        images.append(ListedImage(image, values["path"], *labels, f"{where} {values['path']}", split))
    if not images:
        raise SourceError(f"{manifest}: no rows")
    return images


def open_manifest(path: str) -> Collection:
    """Columns: `path` (relative to the manifest's folder), `super`, optional `fine`, optional
    `split` (train/test; default train). Integer labels keep their value as id (`class_table`).
    A row with an empty `super` is an unlabeled training image."""
    return _collect(f"manifest:{Path(path).name}", read_manifest(path, columns=("super",)))


def open_folder(root: str) -> Collection:
    """`root/<super>/<fine>/*.jpg` or `root/<super>/*.jpg` (one layout for the whole tree); with
    `root/train` and `root/test`, each is one split. Images under `root/unlabeled/` (or
    `root/train/unlabeled/`, any depth) are unlabeled training images. An image anywhere else is
    an error naming it: it would train without a label nobody meant it to lack."""
    base = Path(root)
    if not base.is_dir():
        raise SourceError(f"{base}: folder not found")
    split_roots = {s: base / s for s in ("train", "test") if (base / s).is_dir()} or {"train": base}
    rows = []
    for split, split_root in split_roots.items():
        for image in tree_images(split_root):
            relative = image.relative_to(split_root)
            if relative.parts[0] == UNLABELED_FOLDER:  # any depth below it: no labels
                require_image_file(image, str(base))
                rows.append(ListedImage(image, relative.as_posix(), None, None, str(image), split))
                continue
            labels = tree_labels(relative)
            if labels[0] is None:
                raise SourceError(
                    f"{image}: not in a class folder: images go in {split_root}/<super>/<fine>/ "
                    f"or {split_root}/<super>/, unlabeled training images in {split_root}/{UNLABELED_FOLDER}/ "
                    "(move it, or remove it)"
                )
            require_image_file(image, str(base))
            rows.append(ListedImage(image, relative.as_posix(), *labels, str(image), split))
    if not rows:
        raise SourceError(f"{base}: no images found under <super>/<fine>/ or <super>/ ({', '.join(IMAGE_SUFFIXES)})")
    labelled = [r for r in rows if r.super is not None]
    layouts = {r.fine is None for r in labelled}
    if len(layouts) > 1:
        flat = next(r for r in labelled if r.fine is None)
        nested = next(r for r in labelled if r.fine is not None)
        raise SourceError(
            f"{base}: {flat.listed} has no fine-class folder while {nested.listed} has one: "
            "use <super>/<fine>/ everywhere, or <super>/ everywhere"
        )
    return _collect(f"folder:{base.name}", rows)
