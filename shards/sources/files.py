"""Image files on disk: a CSV/Parquet manifest, or a folder tree `root/<super>/<fine>/*.jpg`."""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shards.sources import Collection, Record, SourceError, class_ids, require_image_file

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


def _reader(path: Path):
    return lambda: path.read_bytes()


def _ext(path: Path, where: str) -> str:
    ext = IMAGE_EXTS.get(path.suffix.lower())
    if ext is None:
        raise SourceError(f"{where}: {path.name}: unsupported image type (use .jpg, .jpeg or .png)")
    return ext


def _collect(name: str, rows: list[tuple[str, str, str | None, Path, str]]) -> Collection:
    """rows: (split, super name, fine name or None, image path, origin) -> a Collection."""
    has_fine = any(fine is not None for _, _, fine, _, _ in rows)
    if has_fine and any(fine is None for _, _, fine, _, _ in rows):
        first = next(origin for _, _, fine, _, origin in rows if fine is None)
        raise SourceError(f"{first}: empty fine label, while other rows have one")
    super_ids = class_ids(s for _, s, _, _, _ in rows)
    fine_ids = class_ids(f for _, _, f, _, _ in rows) if has_fine else {}
    fine_to_super: dict[int, int] = {}
    for _, s, f, _, origin in rows:
        if f is None:
            continue
        if fine_to_super.setdefault(fine_ids[f], super_ids[s]) != super_ids[s]:
            raise SourceError(f"{origin}: fine class {f!r} appears under two super-classes")
    collection = Collection(name, sorted(super_ids), sorted(fine_ids), [fine_to_super[i] for i in range(len(fine_ids))])
    for split, s, f, path, origin in rows:
        record = Record(super_ids[s], fine_ids[f] if f is not None else -1, _reader(path), _ext(path, origin), origin)
        collection.splits.setdefault(split, []).append(record)
    return collection


def open_manifest(path: str) -> Collection:
    """Columns: `path` (relative to the manifest's folder), `super`, optional `fine`, optional
    `split` (train/test; default train)."""
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
    for column in ("path", "super"):
        if column not in table.column_names:
            raise SourceError(f"{manifest}: missing column {column!r} (columns: {table.column_names})")
    columns = {c: table.column(c).to_pylist() for c in table.column_names}
    rows = []
    first_row_of: dict[Path, str] = {}  # resolved image path -> the row that listed it first
    for i in range(table.num_rows):
        # Row numbers as a person counts them in the file: the CSV header is line 1.
        where = f"{manifest} row {i + 2 if manifest.suffix != '.parquet' else i}"
        values = {c: (str(v).strip() if v is not None else "") for c, v in ((c, columns[c][i]) for c in columns)}
        for column in ("path", "super"):
            if not values[column]:
                raise SourceError(f"{where}: empty {column!r}")
        image = (manifest.parent / values["path"]).resolve()
        require_image_file(image, where)
        # The same image twice would be two instances with identical pixels (or one image in
        # both splits): a mistake in the list, never what a user means.
        if image in first_row_of:
            raise SourceError(f"{where}: image {image} is already listed at {first_row_of[image]}")
        first_row_of[image] = where
        split = values.get("split") or "train"
        rows.append((split, values["super"], values.get("fine") or None, image, f"{where} {values['path']}"))
    if not rows:
        raise SourceError(f"{manifest}: no rows")
    return _collect(f"manifest:{manifest.name}", rows)


def open_folder(root: str) -> Collection:
    """`root/<super>/<fine>/*.jpg`; with `root/train` and `root/test`, each is one split."""
    base = Path(root)
    if not base.is_dir():
        raise SourceError(f"{base}: folder not found")
    split_roots = {s: base / s for s in ("train", "test") if (base / s).is_dir()} or {"train": base}
    rows = []
    for split, split_root in split_roots.items():
        for image in sorted(split_root.glob("*/*/*")):
            if image.suffix.lower() in IMAGE_EXTS:
                require_image_file(image, str(base))
                fine_dir, super_dir = image.parent, image.parent.parent
                rows.append((split, super_dir.name, f"{super_dir.name}/{fine_dir.name}", image, str(image)))
    if not rows:
        raise SourceError(f"{base}: no images found under <super>/<fine>/ (extensions {sorted(IMAGE_EXTS)})")
    return _collect(f"folder:{base.name}", rows)
