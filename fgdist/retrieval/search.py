"""A faiss index over an embeddings dataset, and queries against it (`pip install fgdist[search]`).

    fgdist-index --embeddings emb/test --out index/test                  # auto: Flat, or IVF when Flat is slow
    fgdist-index --embeddings emb/test --out index/small --memory-budget 200MB --target-recall 0.95
    fgdist-index --embeddings emb/test --out index/ivf --type ivfsq8 --nlist 1024 --nprobe 16
    fgdist-search --index index/test --image Q.jpg --k 10 [--grid out.png] [--fine 3]
    fgdist-search --index index/test --queries queries/ --out results.parquet --k 10   # or a CSV manifest

Scores are inner products of L2-normalized vectors, i.e. cosine similarities, as in evaluation.
`Flat` is exact. `--type auto` (the default) keeps Flat while a query takes at most
`--latency-budget-ms` and it fits `--memory-budget`, else builds the most accurate approximate
index that fits (IVF-SQfp16 first) and tunes its nprobe to `--target-recall`; the rule, the
other types and the measurements behind them are in fgdist/retrieval/index_choice.py and
bench/results/search_scale.md. An index folder holds `index.faiss`,
`rows.parquet` (key, instance, super, fine, super_name, fine_name, path of each index row) and
`index.json` (type, parameters, nprobe, the choice and its reason, the measured recall, dimension,
the embeddings, the model and the images they came from). index.json records local paths relative
to the index folder (`./...`, `../...`), so the index, its images and its model can move together;
indexes written with absolute paths still open.

`open_index(DIR).neighbours(queries, k)` answers one list per query of dicts with RESULT_FIELDS
(rank, key, score, super, fine, super_name, fine_name, path); `.image_bytes(key)` is an indexed
image's encoded file; `.model_source` the model to embed queries with.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fgdist import cli
from fgdist.data.shardset import INDEX as SHARD_INDEX
from fgdist.embeddings_io import TEXT_COLUMNS, Embeddings, read_embeddings
from fgdist.output_folder import atomic_folder, check_free
from fgdist.retrieval.index_choice import (
    KINDS,
    _faiss,
    build_spec,
    describe_choice,
    make_index,
    set_breadth,
    size_arg,
    spec_for,
)
from fgdist.search_errors import ERRORS, DimensionMismatchError, IndexFolderError

INDEX, ROWS, META = "index.faiss", "rows.parquet", "index.json"


def build(vectors: np.ndarray, kind: str = "flat", nlist=None, m=None, nbits: int = 8, train_size=None):
    """A faiss inner-product index of `kind` (index_choice.KINDS) holding `vectors` (N x d float32,
    normalized) in row order; nlist and m default from N and d (index_choice.spec_for)."""
    spec = spec_for(kind, *np.shape(vectors), nlist=nlist, m=m, nbits=nbits)
    return build_spec(spec, vectors, train_size)


def set_nprobe(index, nprobe: int) -> None:
    """IVF lists scanned, or HNSW's efSearch, per query."""
    set_breadth(index, nprobe)


def write_index(emb: Embeddings, source: str, out: str | Path, kind: str = "flat", overwrite: bool = False, **params):
    """Build an index over an embeddings dataset into the folder `out` (atomically)."""
    faiss = _faiss()
    check_free(out, overwrite, {"--embeddings": source})
    index, chosen = make_index(emb.vectors.numpy(), kind, **params)
    folder = Path(out).absolute()
    images = emb.meta.get("images")
    meta = {
        **chosen,
        "dim": int(emb.vectors.shape[1]),
        "count": len(emb.keys),
        "embeddings": stored_path(source, folder),
        "model": stored_path(emb.meta.get("model"), folder),
        "images": {**images, "root": stored_path(images.get("root"), folder)} if images else images,
    }
    with atomic_folder(out, overwrite, "index", {"--embeddings": source}) as partial:
        faiss.write_index(index, str(partial / INDEX))
        pq.write_table(rows_table(emb), partial / ROWS)
        (partial / META).write_text(json.dumps(meta, indent=1))
    return Path(out)


def rows_table(emb: Embeddings) -> pa.Table:
    """rows.parquet: per index row (faiss row order) ROW_COLUMNS."""
    return pa.table(
        {
            "key": pa.array(emb.keys, pa.string()),
            "instance": pa.array(emb.instance.numpy()),
            "super": pa.array(emb.labels["super"].numpy().astype(np.int32)),
            "fine": pa.array(emb.labels["fine"].numpy().astype(np.int32)),
            **{name: pa.array(emb.column(name), pa.string()) for name in TEXT_COLUMNS},
        }
    )


ROW_COLUMNS = ("key", "instance", "super", "fine", *TEXT_COLUMNS)
RESULT_FIELDS = ("rank", "key", "score", "super", "fine", *TEXT_COLUMNS)  # one neighbour (Index.neighbours)
PRINTED = ("rank", "score", "key", "super", "fine", *TEXT_COLUMNS)  # fgdist-search --image's columns
RELATIVE = ("./", "../")


def stored_path(target: str | None, folder: Path) -> str | None:
    """How index.json records a local path: relative to the index folder, starting with ./ or ../
    (never mistaken for an MLflow run id), so the index moves together with what it refers to.
    MLflow URIs and run ids, and paths on another drive, stay as they are."""
    if not target or not Path(target).is_absolute():
        return target
    try:
        relative = Path(os.path.relpath(target, folder)).as_posix()
    except ValueError:  # another drive (Windows): no relative path
        return target
    return relative if relative.startswith("../") or relative == ".." else f"./{relative}"


def resolved_path(stored: str | None, folder: Path) -> str | None:
    """The inverse of stored_path: an index.json path as an absolute path (absolute ones, from
    indexes written before paths were relative, and URIs as they are)."""
    if not stored or not (stored.startswith(RELATIVE) or stored == ".."):
        return stored
    return os.path.normpath(folder.absolute() / stored)


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    return int(k)


@dataclass
class Index:
    """A loaded index folder."""

    index: object
    rows: pa.Table
    meta: dict
    folder: Path | None = None  # paths in `meta` are relative to it

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def model_source(self) -> str | None:
        """The model the index was built with, as fgdist.load_model takes it."""
        return self._resolved(self.meta.get("model"))

    @property
    def images(self) -> dict:
        """Where the indexed images are: kind (shards, folder, manifest), root (absolute), split."""
        images = self.meta.get("images") or {}
        return {**images, "root": self._resolved(images.get("root"))} if images else {}

    def _resolved(self, stored: str | None) -> str | None:
        return resolved_path(stored, self.folder) if self.folder is not None else stored

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row numbers), each Q x min(k, rows); a query of the wrong dimension is an error."""
        k = check_k(k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DimensionMismatchError(
                f"queries of dimension {queries.shape[-1]} against an index of dimension {self.dim} "
                f"(built from {self.meta.get('embeddings')}, model {self.meta.get('model')})"
            )
        return self.index.search(queries, min(k, self.index.ntotal))

    def neighbours(self, queries: np.ndarray, k: int) -> list[list[dict]]:
        """Per query (Q x d, L2-normalized), its neighbours best first, each a dict of RESULT_FIELDS."""
        scores, rows = self.search(queries, k)
        return [self.results(s[r >= 0], r[r >= 0]) for s, r in zip(scores, rows)]

    def results(self, scores: np.ndarray, rows: np.ndarray) -> list[dict]:
        """One query's neighbours as RESULT_FIELDS dicts, from its scores and index rows (all found)."""
        records = self.rows.take(rows).select(["key", *RESULT_FIELDS[3:]]).to_pylist()
        return [
            {"rank": rank, "key": record["key"], "score": float(score), **{n: record[n] for n in RESULT_FIELDS[3:]}}
            for rank, (score, record) in enumerate(zip(scores, records), start=1)
        ]

    @cached_property
    def _row_of_key(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.rows.column("key").to_pylist())}

    def row_number(self, key: str) -> int:
        """The index row of `key`; KeyError naming it when the index has no such row."""
        if key not in self._row_of_key:
            raise KeyError(f"{key!r} is not a key of the index {self.folder}")
        return self._row_of_key[key]

    def row(self, key: str) -> dict:
        """The rows.parquet record of `key` (ROW_COLUMNS)."""
        return self.rows.slice(self.row_number(key), 1).to_pylist()[0]

    def image_bytes(self, key: str) -> bytes:
        """The encoded image file of an index row: from its folder or manifest, or its shard's tar."""
        record, images = self.row(key), self.images
        if images.get("kind") == "shards":
            return self._shard_members.read(record["instance"])
        if images.get("kind") in ("folder", "manifest"):
            return self.image_file(record).read_bytes()
        raise ValueError(f"{self.folder}: the index does not record where its images are ({images})")

    def image_file(self, record: dict) -> Path:
        """The file of a folder or manifest row (its path is relative to the folder or the manifest's folder)."""
        root = Path(self.images["root"])
        base = root if self.images["kind"] == "folder" else root.parent
        return base / (record.get("path") or record["key"])

    @cached_property
    def _shard_members(self) -> ShardMembers:
        return ShardMembers(Path(self.images["root"]) / self.images["split"])


class ShardMembers:
    """Encoded images of a shard split by instance id, read from the tars (the split's index.parquet
    says which tar and member)."""

    def __init__(self, split: Path):
        table = pq.read_table(split / SHARD_INDEX, columns=["instance_id", "shard", "member"])
        self.split = split
        self.where = dict(
            zip(
                table.column("instance_id").to_pylist(),
                zip(table.column("shard").to_pylist(), table.column("member").to_pylist()),
            )
        )

    def read(self, instance: int) -> bytes:
        shard, member = self.where[instance]
        with tarfile.open(self.split / shard) as tar:
            return tar.extractfile(member).read()


def open_index(path: str | Path) -> Index:
    """An index folder; one missing, partial or unreadable is an IndexFolderError naming the file.
    Rows of indexes written before the name and path columns existed read with nulls there."""
    faiss = _faiss()
    path = Path(path)
    if not (path / META).is_file():
        raise IndexFolderError(f"{path}: not an fgdist-index folder (no {META})")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as err:
        raise IndexFolderError(f"{path / META}: unreadable ({err})") from None
    if not (path / INDEX).is_file():
        raise IndexFolderError(f"{path / INDEX}: missing; rebuild the index with fgdist-index")
    try:
        index = faiss.read_index(str(path / INDEX))
    except RuntimeError as err:  # faiss reports a truncated or foreign file as a RuntimeError
        why = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(err).strip())  # the C++ function and line say nothing here
        raise IndexFolderError(
            f"{path / INDEX}: unreadable faiss index ({why}); rebuild it with fgdist-index"
        ) from None
    set_nprobe(index, meta.get("nprobe", 16))
    return Index(index, read_rows(path / ROWS, index.ntotal), meta, path)


def read_rows(path: Path, count: int) -> pa.Table:
    """rows.parquet with every ROW_COLUMNS column (nulls for those an older index lacks)."""
    try:
        rows = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise IndexFolderError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if rows.num_rows != count:
        raise IndexFolderError(f"{path}: {rows.num_rows} rows, its index.faiss holds {count}")
    for name in TEXT_COLUMNS:
        if name not in rows.column_names:
            rows = rows.append_column(name, pa.nulls(rows.num_rows, pa.string()))
    return rows


# -- command lines -----------------------------------------------------------------------------
def index_main(argv=None) -> int:
    p = cli.parser("fgdist-index", __doc__)
    p.add_argument("--embeddings", required=True, help="an fgdist-embed output folder")
    p.add_argument("--out", required=True, help="the index folder to write")
    p.add_argument(
        "--type",
        choices=("auto",) + KINDS,
        default="auto",
        help="auto: chosen from the budgets below",
    )
    p.add_argument(
        "--memory-budget", type=size_arg, help="most memory the index may take, e.g. 2GB (auto; default: no limit)"
    )
    p.add_argument(
        "--latency-budget-ms",
        type=float,
        default=10.0,
        help="Flat only while a query takes at most this (auto)",
    )
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 vs exact that tunes --nprobe",
    )
    p.add_argument("--nlist", type=int, help="IVF lists (default: about sqrt(N))")
    p.add_argument(
        "--m", type=int, help="PQ sub-vectors: m x nbits bits a vector (divides the dimension; default: d/8)"
    )
    p.add_argument("--nbits", type=int, default=8, help="bits per PQ code")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links a vector")
    p.add_argument(
        "--nprobe", type=int, help="IVF lists (HNSW: efSearch) per query (default: tuned to --target-recall)"
    )
    p.add_argument("--train-size", type=int, default=100_000, help="IVF training vectors")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that fgdist wrote")
    args = p.parse_args(argv)
    return cli.run_reporting(lambda: _index(args), ERRORS + (FileNotFoundError, ValueError))


def _index(args) -> int:
    check_free(args.out, args.overwrite, {"--embeddings": args.embeddings})
    emb = read_embeddings(args.embeddings)
    params = {k: getattr(args, k) for k in ("memory_budget", "latency_budget_ms", "target_recall", "nprobe")}
    params |= {k: getattr(args, k) for k in ("nlist", "m", "nbits", "hnsw_m", "train_size")}
    out = write_index(emb, str(Path(args.embeddings).resolve()), args.out, args.type, args.overwrite, **params)
    meta = json.loads((out / META).read_text())
    print(describe_choice(meta))
    print(f"{meta['factory']} index of {len(emb.keys)} x {emb.vectors.shape[1]} written to {out}")
    return 0


def neighbour_images(idx: Index, rows: list[int], preprocessing: dict):
    """TestImages (pictures.py) of index rows, decoded from where their embeddings came from."""
    from fgdist.report.pictures import TestImage, read_images
    from fgdist.retrieval.embed import decode
    from fgdist.retrieval.export import eval_transform

    images = idx.images
    records = idx.rows.take(rows).to_pylist()
    if images.get("kind") == "shards":
        from fgdist.config import DataConfig
        from fgdist.data.shardset import open_split

        split = open_split(images["root"], images["split"], images.get("url"))
        found = read_images(split, DataConfig(shards=images["root"], **preprocessing), [r["instance"] for r in records])
        return [found[r["instance"]] for r in records]
    if images.get("kind") in ("folder", "manifest"):
        transform = eval_transform(preprocessing)
        return [TestImage(r["instance"], r["super"], r["fine"], decode(idx.image_file(r), transform)) for r in records]
    raise ValueError(f"the index does not record where its images are ({images}); cannot draw a grid")


def search_main(argv=None) -> int:
    p = cli.parser("fgdist-search", __doc__)
    p.epilog = "--queries: see fgdist/retrieval/search_batch.py (results columns, labels, metrics)."
    p.add_argument("--index", required=True, help="an fgdist-index folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="one query image: its neighbours are printed")
    what.add_argument("--queries", help="a folder of query images or a CSV/Parquet manifest (with --out)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    p.add_argument("--model", help="the model that embeds the queries (default: the one the index was built with)")
    p.add_argument("--nprobe", type=int, help="IVF lists to scan (default: the index's)")
    p.add_argument("--grid", help="--image: draw the query and its neighbours into this PNG")
    p.add_argument("--fine", type=int, default=-1, help="--image: the query's fine class, for the grid's outlines")
    p.add_argument("--super", type=int, default=-1, help="--image: its super-class, where there are no fine labels")
    p.add_argument("--out", help="--queries: the results, a Parquet dataset folder (one row per query and rank)")
    p.add_argument("--metrics", action="store_true", help="--queries: refuse unlabelled queries instead of no metrics")
    p.add_argument("--batch-size", type=int, default=256, help="--queries: images embedded at once")
    p.add_argument("--overwrite", action="store_true", help="--queries: replace an --out that fgdist wrote")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    return cli.run_reporting(lambda: _search(args), ERRORS + (FileNotFoundError, ValueError))


def _search(args) -> int:
    check_search_args(args)
    idx = open_index(args.index)
    model_source = args.model or idx.model_source
    if not model_source:
        raise ValueError(f"{args.index}: the index records no model; pass --model")
    if args.nprobe:
        set_nprobe(idx.index, args.nprobe)
    if args.queries:
        search_file(idx, model_source, args)
    else:
        search_image(idx, model_source, args)
    return 0


def check_search_args(args) -> None:
    """Flags that do not go together, before the index and the model are loaded."""
    if args.k < 1:
        raise ValueError(f"--k {args.k}: k must be >= 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.queries and not args.out:
        raise ValueError("--queries needs --out (the results folder)")
    image_only = [f for f, v in (("--grid", args.grid), ("--fine", args.fine >= 0), ("--super", args.super >= 0)) if v]
    if args.queries and image_only:
        raise ValueError(f"{', '.join(image_only)}: only with --image")
    queries_only = [
        f for f, v in (("--out", args.out), ("--metrics", args.metrics), ("--overwrite", args.overwrite)) if v
    ]
    if args.image and queries_only:
        raise ValueError(f"{', '.join(queries_only)}: only with --queries")


def search_image(idx: Index, model_source: str, args) -> None:
    """One query: its neighbours printed as a table (PRINTED), and drawn with --grid."""
    from fgdist.report.pictures import TestImage, retrieval_grid
    from fgdist.retrieval.embed import decode
    from fgdist.retrieval.export import eval_transform, load_model

    embedder = load_model(model_source)
    query = decode(Path(args.image), eval_transform(embedder.preprocessing))
    found = idx.neighbours(embedder(query[None]).detach().numpy(), args.k)[0]
    print("\t".join(PRINTED))
    for n in found:
        print("\t".join(f"{n[f]:.4f}" if f == "score" else "" if n[f] is None else str(n[f]) for f in PRINTED))
    if args.grid:
        shown = neighbour_images(idx, [idx.row_number(n["key"]) for n in found], embedder.preprocessing)
        q = TestImage(-1, args.super, args.fine, query)
        retrieval_grid([q], [[(t, n["score"]) for t, n in zip(shown, found)]], args.grid)
        print(f"grid written to {args.grid}")


def search_file(idx: Index, model_source: str, args) -> None:
    """--queries: results written to --out, metrics printed where the queries have labels."""
    from fgdist.retrieval.search_batch import metric_lines, recall_ks, search_queries

    metrics = search_queries(
        idx,
        model_source,
        args.queries,
        args.out,
        args.k,
        args.batch_size,
        args.metrics,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    print(f"results written to {args.out}")
    for line in metric_lines(metrics, recall_ks(args.k)):
        print(line)


if __name__ == "__main__":
    raise SystemExit(search_main())
