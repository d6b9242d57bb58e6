"""Shard sources: each turns an on-disk collection into labelled records per split.

A source is a function `open_<name>(**options) -> Collection`. Records carry integer class ids
into the collection's class tables and a `load()` that returns the encoded image bytes, so the
builder can sort all records by super-class before reading a single image.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fgdist.data.shardset import DECODE_ERRORS
from fgdist.images import to_rgb


class SourceError(ValueError):
    """Bad input in a source; the message names the file and the row or line."""


class CorruptImageError(SourceError):
    """An image that does not decode: the build fails on it, or skips it with on_corrupt=skip."""


@dataclass(frozen=True)
class Record:
    super_id: int  # -1 (fgdist.data.shardset.UNLABELED): an unlabeled training image, for the pool
    fine_id: int  # -1 when the source has no fine labels (and for an unlabeled image)
    load: Callable[[], bytes]  # encoded image bytes (PNG or JPEG)
    ext: str  # "png" or "jpg": the member name's extension in the tar
    origin: str  # where it came from, for errors and the index's `source` column


@dataclass
class Collection:
    name: str
    super_names: list[str]
    fine_names: list[str]  # empty when there are no fine labels
    fine_to_super: list[int]  # per fine id, its super id
    splits: dict[str, list[Record]] = field(default_factory=dict)


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def parse_int(text: str, what: str, where: str) -> int:
    """An integer field of a list file; the error names the file and line (`where`)."""
    try:
        return int(text)
    except ValueError:
        raise SourceError(f"{where}: {what} {text!r} is not an integer") from None


def require_image_file(path: Path, where: str) -> None:
    """A listed image must be a regular file; says which of missing / directory / other it is."""
    if path.is_file():
        return
    problem = "is a directory" if path.is_dir() else "does not exist" if not path.exists() else "is not a regular file"
    raise SourceError(f"{where}: image {path} {problem}")


# Integer labels keep their value as id while the table they need (0..largest) has at most this
# many entries, or twice as many as there are labels: a few unused ids cost a few empty classes,
# product numbers (1000000, 2000000, ...) would cost a million-class head.
DENSE_IDS_UP_TO = 1024
PLAIN_INTEGER = re.compile(r"0|[1-9][0-9]*")  # "2", not "02", "+2" or "-2": one text per id


def class_table(labels) -> tuple[list[str], dict[str, int]]:
    """(class names by id, the id of each label). Labels that are all plain non-negative integers
    keep their value as id ("0", "2", "10" -> ids 0, 2, 10); the unused ids between them are empty
    classes named by their number. When those ids are too sparse (a table longer than
    max(DENSE_IDS_UP_TO, 2 x labels)) they are numbered in numeric order instead, and the names
    keep the numbers. Other labels are names, numbered in sorted order. Either way the ids depend
    on the set of labels only: stable across runs and across the train and test splits."""
    distinct = set(labels)
    if distinct and all(PLAIN_INTEGER.fullmatch(label) for label in distinct):
        size = max(int(label) for label in distinct) + 1
        if size <= max(DENSE_IDS_UP_TO, 2 * len(distinct)):
            return [str(i) for i in range(size)], {label: int(label) for label in distinct}
        ordered = sorted(distinct, key=int)
    else:
        ordered = sorted(distinct)
    return ordered, {name: i for i, name in enumerate(ordered)}


def jpeg_loader(path, shorter_side: int = 256, quality: int = 90) -> Callable[[], bytes]:
    """A lazy `Record.load` for one image file: RGB JPEG bytes whose shorter side is scaled down to
    `shorter_side` (aspect kept; smaller images are not upscaled). The options are checked here,
    when the source is opened, so a bad value fails before any image is read.

    Real collections hold CMYK, grayscale and PNG files named `.jpg` (Oxford-IIIT Pet has all
    three): everything is decoded, made upright and RGB as evaluation reads it (fgdist.images.to_rgb)
    and re-encoded as RGB JPEG, except a file that already is an RGB JPEG small enough, whose bytes
    are kept as they are (no second lossy pass; its EXIF orientation goes with them, and the
    readers apply it; the builder decodes them, as it does every image it writes)."""
    if isinstance(shorter_side, bool) or not isinstance(shorter_side, int) or shorter_side < 1:
        raise ValueError(f"shorter_side must be a positive integer, got {shorter_side!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"jpeg_quality must be an integer in 1..95 (Pillow's useful range), got {quality!r}")

    def load() -> bytes:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise SourceError(f"{path}: image file not found") from None
        except OSError as err:  # unreadable is not undecodable: never skipped as corrupt
            raise SourceError(f"{path}: cannot read image file ({type(err).__name__}: {err})") from None
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                short = min(width, height)
                if image.format == "JPEG" and image.mode == "RGB" and short <= shorter_side:
                    return data
                if short > shorter_side:
                    scale = shorter_side / short
                    size = (
                        (shorter_side, max(1, round(height * scale)))
                        if width <= height
                        else (max(1, round(width * scale)), shorter_side)
                    )
                    # JPEG decoders can scale by 1/2, 1/4, 1/8 while decoding (never below `size`):
                    # most of the work for large photos saved before the exact resize.
                    image.draft("RGB", size)
                    drafted = image.size
                    rgb = to_rgb(image)  # upright: a quarter turn swaps the sides
                    rgb = rgb.resize(size if rgb.size == drafted else size[::-1], Image.Resampling.BICUBIC)
                else:
                    rgb = to_rgb(image)
        except DECODE_ERRORS as err:
            raise CorruptImageError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()

    return load
