"""Per-query retrieval results: what a run's retrieval metrics are made of, one row per test query.

Evaluation writes them to `<run folder>/per_query.parquet` (rank 0, after gathering 3 numbers per
query and label from every rank; written to a temporary file and renamed) and the trainer logs
the file as the MLflow artifact `per_query.parquet`. Columns, one row per test image, by key:

    key                  the image's key in the shard set (`shardset.sample_key` of its instance id)
    super_id, fine_id    its labels (fine_id -1 where the data have no fine labels)
    <label>_first_rank   1-based rank of its first neighbour with its label among the other test
                         images (cosine similarity, ties by the lower row); 0 when there is none
    <label>_ap_at_r      its AP@R, 0..1; null where no other test image has its label (R = 0)
    <label>_r_precision  its R-precision, 0..1; null where R = 0

for label in super and fine (fine where the data have fine labels). The schema's metadata
`fgdist.test_set` holds the test split's fingerprint (`shardset.split_fingerprint`): two runs'
tables are paired only when it and the keys match.

The run's metrics are means of these (`metric_values`): <label>_recall_at_k = 100 x mean of
(1 <= first_rank <= k) over all queries; <label>_map_at_r and <label>_r_precision = 100 x mean of
the non-null values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fgdist.data.shardset import sample_key
from fgdist.output_folder import atomic_file
from fgdist.retrieval_metrics import VALUES

FILE = "per_query.parquet"
TEST_SET = b"fgdist.test_set"
LABELS = ("super", "fine")
METRIC = re.compile(r"^(super|fine)_(?:recall_at_(\d+)|(map_at_r)|(r_precision))$")


class PerQueryError(ValueError):
    """A per-query table that cannot be read or does not hold what was asked; names the file."""


@dataclass(frozen=True)
class PerQuery:
    """One run's per-query table, read back: columns as numpy arrays (null -> NaN), rows by key."""

    columns: dict[str, np.ndarray]
    test_set: str
    where: str

    @property
    def keys(self) -> np.ndarray:
        return self.columns["key"]

    def metric_values(self, metric: str) -> np.ndarray:
        """Each query's share of `metric` (an evaluation metric name such as fine_recall_at_4 or
        fine_map_at_r), in percent: its mean is the metric. NaN where the query does not count
        (R = 0 for MAP@R and R-precision)."""
        m = METRIC.match(metric)
        if m is None:
            raise PerQueryError(f"{self.where}: no per-query values for metric {metric!r}")
        label, k, ap, _ = m.groups()
        column = f"{label}_{'first_rank' if k else 'ap_at_r' if ap else 'r_precision'}"
        if column not in self.columns:
            raise PerQueryError(f"{self.where}: no column {column} (the data have no {label} labels?)")
        values = self.columns[column]
        if k:
            return 100.0 * ((values >= 1) & (values <= int(k)))
        return 100.0 * values


def table(
    instance_ids: np.ndarray,
    labels: dict[str, np.ndarray],
    values: dict[str, dict[str, np.ndarray]],
    test_set: str,
) -> pa.Table:
    """The per-query table, rows sorted by instance id (the same file for any number of ranks).
    `labels`: super (and fine) label per query; `values`: per label, `retrieval_metrics.VALUES`."""
    order = np.argsort(instance_ids, kind="stable")
    columns = {
        "key": pa.array([sample_key(int(i)) for i in instance_ids[order]], pa.string()),
        "super_id": pa.array(labels["super"][order], pa.int32()),
        "fine_id": pa.array(labels["fine"][order] if "fine" in labels else np.full(len(order), -1), pa.int32()),
    }
    for label, per_label in values.items():
        columns[f"{label}_first_rank"] = pa.array(per_label["first_rank"][order], pa.int64())
        for name in VALUES[1:]:
            v = per_label[name][order]
            columns[f"{label}_{name}"] = pa.array(v, pa.float64(), mask=np.isnan(v))
    return pa.table(columns).replace_schema_metadata({TEST_SET: test_set.encode()})


def write(path: str | Path, per_query: pa.Table) -> Path:
    """Write atomically: a temporary file beside `path`, renamed over it (a crash leaves no
    half-written table under the final name)."""
    with atomic_file(path) as partial:
        pq.write_table(per_query, partial)
    return Path(path)


def read(path: str | Path, where: str | None = None) -> PerQuery:
    """A per-query table from `path`; `where` names it in errors (default: the path)."""
    where = where or str(path)
    try:
        t = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise PerQueryError(f"{where}: not a readable per-query table ({type(err).__name__}: {err})") from None
    return from_table(t, where)


def from_table(t: pa.Table, where: str) -> PerQuery:
    """`table`'s output (or a file's) as numpy columns; `where` names it in errors."""
    missing = [c for c in ("key", "super_first_rank") if c not in t.column_names]
    if missing:
        raise PerQueryError(f"{where}: not a per-query table (no column {', '.join(missing)})")
    columns = {
        name: t.column(name).to_numpy(zero_copy_only=False) if name == "key" else _numbers(t.column(name))
        for name in t.column_names
    }
    test_set = (t.schema.metadata or {}).get(TEST_SET, b"").decode()
    return PerQuery(columns, test_set, where)


def _numbers(column: pa.ChunkedArray) -> np.ndarray:
    """Integers as int64 (no nulls there), floats as float64 with null -> NaN."""
    if pa.types.is_floating(column.type):
        return column.cast(pa.float64()).fill_null(np.nan).to_numpy()
    return column.to_numpy()
