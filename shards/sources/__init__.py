"""Shard sources: each turns an on-disk collection into labelled records per split.

A source is a function `open_<name>(**options) -> Collection`. Records carry integer class ids
into the collection's class tables and a `load()` that returns the encoded image bytes, so the
builder can sort all records by super-class before reading a single image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image


class SourceError(ValueError):
    """Bad input in a source; the message names the file and the row or line."""


@dataclass(frozen=True)
class Record:
    super_id: int
    fine_id: int  # -1 when the source has no fine labels
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


def class_ids(names) -> dict[str, int]:
    """Ids in sorted-name order: stable across runs and across the train and test splits."""
    return {name: i for i, name in enumerate(sorted(set(names)))}
