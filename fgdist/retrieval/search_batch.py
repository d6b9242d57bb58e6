"""A file of queries against an index: `fgdist-search --index DIR --queries FOLDER|MANIFEST --out R`.

The queries are read as `fgdist-embed` reads images (a folder, `<super>/<fine>/` subfolders being
labels, or a CSV/Parquet manifest with path[,super[,fine]]), embedded in batches with the embed
path, searched, and written to `R`, a Parquet dataset folder (`R/part-00000.parquet`; pyarrow,
pandas and DuckDB read it as one table) with one row per (query, rank): RESULT_COLUMNS.

Query labels are put into the index's class ids by name: a query of class `mug` matches the
index rows named `mug` whatever id each side's own class table gave it (ids as they are where
the index has no names). A query class the index does not know gets -1 in the file, and counts
as a labelled query without a relevant row in the metrics.

With labelled queries (and a labelled index) the command prints Recall@k (k = 1, 2, 4, 8 up to
--k), MAP@R and R-precision per label, over the labelled queries, from the index's own ranking
(exact for Flat; an approximate index is scored on what it returns), searched max(k, R) deep;
`--metrics` makes unlabelled queries an UnlabelledQueriesError instead of printing nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from fgdist.embeddings_io import vectors_of
from fgdist.output_folder import atomic_folder, check_free
from fgdist.retrieval.search import RESULT_FIELDS, Index
from fgdist.retrieval_metrics import ranking_sums, relevant_counts, to_metrics
from fgdist.search_errors import UnlabelledQueriesError

LABELS = ("super", "fine")
QUERY_FIELDS = ("key", "path", *LABELS, "super_name", "fine_name")
RESULT_COLUMNS = (*(f"query_{f}" for f in QUERY_FIELDS), *RESULT_FIELDS)
PART = "part-00000.parquet"
CHUNK = 4096  # queries embedded at once: bounds the memory of a long query list
SEARCH_BUDGET = 1 << 24  # (query, neighbour) pairs one search returns at most (~200 MB): MAP@R may look deep
RECALL_KS = (1, 2, 4, 8)


def recall_ks(k: int) -> list[int]:
    return [x for x in RECALL_KS if x <= k]


def result_schema() -> pa.Schema:
    types = {"rank": pa.int32(), "score": pa.float32(), "super": pa.int32(), "fine": pa.int32()}
    fields = [(f"query_{f}", types.get(f, pa.string())) for f in QUERY_FIELDS]
    return pa.schema(fields + [(f, types.get(f, pa.string())) for f in RESULT_FIELDS])


def query_files(path: str | Path) -> list:
    """--queries: a folder (read as fgdist-embed --images reads one) or a manifest (as --manifest)."""
    from fgdist.retrieval.embed import folder_files, manifest_files

    return folder_files(path) if Path(path).is_dir() else manifest_files(path)


class QueryLabels:
    """The queries' labels in the index's class ids (see the module docstring)."""

    def __init__(self, files: list, idx: Index):
        self.labelled = {name: np.array([_has_label(f, name) for f in files], dtype=bool) for name in LABELS}
        self.ids = {name: _index_ids(files, name, _name_to_id(idx, name)) for name in LABELS}

    def scored(self, idx: Index, refuse: bool) -> list[str]:
        """The labels metrics are computed for: on some query and on some index row. None and
        `refuse`: an UnlabelledQueriesError."""
        names = [n for n in LABELS if self.labelled[n].any() and (gallery_labels(idx, n) >= 0).any()]
        if refuse and not names:
            which = "the queries have" if not any(v.any() for v in self.labelled.values()) else "the index has"
            raise UnlabelledQueriesError(
                f"--metrics: {which} no super or fine labels (queries: <super>/<fine>/ folders, or super/fine "
                "columns in the manifest)"
            )
        return names


def _has_label(file, name: str) -> bool:
    return getattr(file, name) >= 0 or getattr(file, f"{name}_name") is not None


def _index_ids(files: list, name: str, index_ids: dict[str, int]) -> np.ndarray:
    """By class name where the index has names (-1 for a name it lacks), else the query's own id."""
    ids = [
        index_ids.get(getattr(f, f"{name}_name"), -1)
        if index_ids and getattr(f, f"{name}_name") is not None
        # no name to match: the id as it is
        else getattr(f, name)
        for f in files
    ]
    return np.array(ids, dtype=np.int64)


def _name_to_id(idx: Index, name: str) -> dict[str, int]:
    pairs = idx.rows.select([name, f"{name}_name"]).group_by([name, f"{name}_name"]).aggregate([]).to_pylist()
    return {p[f"{name}_name"]: p[name] for p in pairs if p[f"{name}_name"] is not None and p[name] >= 0}


def gallery_labels(idx: Index, name: str) -> np.ndarray:
    return idx.rows.column(name).to_numpy().astype(np.int64)


def search_queries(
    idx: Index,
    model_source: str,
    queries: str,
    out: str,
    k: int,
    batch_size: int,
    metrics: bool,
    *,
    overwrite=False,
    quiet=False,
) -> dict[str, float]:
    """Embed, search and write the results of every query in `queries`; returns the metrics
    (empty without labels), as `to_metrics` names them, with `<label>_queries` counts."""
    from fgdist.retrieval.embed import embed_batches, file_batches
    from fgdist.retrieval.export import load_model

    inputs = {"--queries": queries, "--index": idx.folder}
    check_free(out, overwrite, inputs)
    files = query_files(queries)
    labels = QueryLabels(files, idx)
    scored = labels.scored(idx, refuse=metrics)  # every refusal before the model is loaded
    embedder = load_model(model_source)
    ks = recall_ks(k)
    sums = {}
    bar = tqdm(total=len(files), unit="query", desc="search", disable=quiet)
    with (
        atomic_folder(out, overwrite, "search results", inputs) as partial,
        pq.ParquetWriter(partial / PART, result_schema()) as writer,
    ):
        for start in range(0, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            table = embed_batches(embedder, file_batches(chunk, embedder, batch_size), batch_size, False, bar)
            vectors = vectors_of(table)
            depth = search_depth(idx, labels, slice(start, start + len(chunk)), scored, k)
            step = max(1, SEARCH_BUDGET // depth)
            for sub in range(0, len(chunk), step):
                rows = slice(start + sub, start + min(sub + step, len(chunk)))
                scores, order = idx.search(vectors[sub : sub + step], depth)
                writer.write_table(result_table(idx, files[rows], labels, rows, scores[:, :k], order[:, :k]))
                for name in scored:
                    add_sums(sums, name, labels, rows, order, idx, ks)
    bar.close()
    return {
        **to_metrics(sums, ks),
        **{f"{name}_queries": int(labels.labelled[name].sum()) for name in scored},
    }


def search_depth(idx: Index, labels: QueryLabels, rows: slice, scored: list[str], k: int) -> int:
    """k, or the deepest R of these queries where metrics need it (MAP@R looks R rows deep)."""
    deepest = [k]
    for name in scored:
        y = torch.from_numpy(labels.ids[name][rows][labels.labelled[name][rows]])
        if len(y):
            deepest.append(int(relevant_counts(torch.from_numpy(gallery_labels(idx, name)), y, False).max()))
    return min(max(deepest), idx.index.ntotal)


def add_sums(sums: dict, name: str, labels: QueryLabels, rows: slice, order: np.ndarray, idx: Index, ks) -> None:
    mask = labels.labelled[name][rows]
    y = torch.from_numpy(labels.ids[name][rows][mask])
    got = ranking_sums(
        torch.from_numpy(order[mask]), {name: y}, {name: torch.from_numpy(gallery_labels(idx, name))}, ks
    )
    sums[name] = sums.get(name, 0) + got[name]


def result_table(idx: Index, files: list, labels: QueryLabels, rows: slice, scores, order) -> pa.Table:
    """One row per (query, neighbour found), best first."""
    columns = {c: [] for c in RESULT_COLUMNS}
    for i, (f, s, o) in enumerate(zip(files, scores, order)):
        query = {
            "key": f.key,
            "path": f.source,
            "super": int(labels.ids["super"][rows][i]),
            "fine": int(labels.ids["fine"][rows][i]),
            "super_name": f.super_name,
            "fine_name": f.fine_name,
        }
        for found in idx.results(s[o >= 0], o[o >= 0]):
            for c in QUERY_FIELDS:
                columns[f"query_{c}"].append(query[c])
            for c in RESULT_FIELDS:
                columns[c].append(found[c])
    return pa.table(columns, schema=result_schema())


def metric_lines(metrics: dict[str, float], ks: list[int]) -> list[str]:
    """One line per scored label: R@k..., MAP@R, R-precision and the number of labelled queries."""
    lines = []
    for name in LABELS:
        if f"{name}_queries" not in metrics:
            continue
        recalls = "  ".join(f"R@{k} {metrics[f'{name}_recall_at_{k}']:.2f}" for k in ks)
        lines.append(
            f"{name}: {recalls}  MAP@R {metrics[f'{name}_map_at_r']:.2f}  "
            f"R-precision {metrics[f'{name}_r_precision']:.2f}  ({metrics[f'{name}_queries']} labelled queries)"
        )
    return lines
