"""The embeddings dataset `fgdist-embed` writes: a folder of Parquet files (one or more per rank)
with columns key (string), instance (int64), super (int32), fine (int32; -1 where unknown),
super_name, fine_name (the class names; null where unknown), path (the image's source path as the
user knows it: relative to the image folder or the manifest's folder, or the shard index's
`source`; null where unknown) and embedding (fixed-size list of float32, or float16,
L2-normalized), plus `_embeddings.json` (model source, dimension, dtype, where the images came
from). Datasets written before the name and path columns existed read with nulls there.
pyarrow, pandas, DuckDB and Spark read the folder as one table; names starting with `_` are
skipped by their dataset readers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

META = "_embeddings.json"
FORMAT = "fgdist-embeddings/1"
TEXT_COLUMNS = ("super_name", "fine_name", "path")  # nullable: unknown names, paths


def schema(dim: int, fp16: bool = False) -> pa.Schema:
    value = pa.float16() if fp16 else pa.float32()
    return pa.schema(
        [
            ("key", pa.string()),
            ("instance", pa.int64()),
            ("super", pa.int32()),
            ("fine", pa.int32()),
            *((name, pa.string()) for name in TEXT_COLUMNS),
            ("embedding", pa.list_(value, dim)),
        ]
    )


def to_table(
    keys: list[str], instance, supers, fines, vectors: np.ndarray, fp16: bool = False, text: dict | None = None
) -> pa.Table:
    """`text`: per TEXT_COLUMNS name, one string or None per row (a missing column is all null)."""
    text = text or {}
    vectors = np.ascontiguousarray(vectors, dtype=np.float16 if fp16 else np.float32)
    n, dim = vectors.shape
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    columns = [
        pa.array(keys, pa.string()),
        pa.array(np.asarray(instance, dtype=np.int64)),
        pa.array(np.asarray(supers, dtype=np.int32)),
        pa.array(np.asarray(fines, dtype=np.int32)),
        *(pa.array(text.get(name) or [None] * n, pa.string()) for name in TEXT_COLUMNS),
        embedding,
    ]
    return pa.Table.from_arrays(columns, schema=schema(dim, fp16))


def vectors_of(table: pa.Table) -> np.ndarray:
    """The `embedding` column of a table in this schema as an N x d float32 array."""
    column = table.column("embedding").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size).astype(np.float32)


@dataclass
class Embeddings:
    """A whole embeddings dataset in memory, rows sorted by (instance, key)."""

    keys: list[str]
    instance: torch.Tensor
    labels: dict[str, torch.Tensor]  # "super", "fine"
    vectors: torch.Tensor  # N x d float32
    meta: dict
    text: dict[str, list[str | None]] = field(default_factory=dict)  # TEXT_COLUMNS -> one value per row

    def column(self, name: str) -> list[str | None]:
        """A TEXT_COLUMNS column, nulls where the dataset has none."""
        return self.text.get(name) or [None] * len(self.keys)


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not an fgdist-embed output (no {META})")
    return json.loads(meta_path.read_text())


def read_embeddings(path: str | Path) -> Embeddings:
    path = Path(path)
    meta = read_meta(path)
    table = pq.read_table(path).sort_by([("instance", "ascending"), ("key", "ascending")])
    if table.num_rows != meta["count"]:
        raise ValueError(f"{path}: {table.num_rows} rows, {META} says {meta['count']}")
    vectors = vectors_of(table)
    return Embeddings(
        keys=table.column("key").to_pylist(),
        instance=torch.from_numpy(table.column("instance").to_numpy().copy()),
        labels={n: torch.from_numpy(table.column(n).to_numpy().astype(np.int64)) for n in ("super", "fine")},
        vectors=torch.from_numpy(vectors),
        meta=meta,
        text={n: table.column(n).to_pylist() for n in TEXT_COLUMNS if n in table.column_names},
    )
