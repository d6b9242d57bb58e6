"""A faiss index over an embeddings dataset, and queries against it (`pip install fgdist[search]`).

    fgdist-index --embeddings emb/test --out index/test                  # auto: Flat, or IVF when Flat is slow
    fgdist-index --embeddings emb/test --out index/small --memory-budget 200MB --target-recall 0.95
    fgdist-index --embeddings emb/test --out index/ivf --type ivfsq8 --nlist 1024 --nprobe 16
    fgdist-search --index index/test --image Q.jpg --k 10 [--grid out.png] [--fine 3]

Scores are inner products of L2-normalized vectors, i.e. cosine similarities, as in evaluation.
`Flat` is exact. `--type auto` (the default) keeps Flat while a query takes at most
`--latency-budget-ms` and it fits `--memory-budget`, else builds the most accurate approximate
index that fits (IVF-SQfp16 first) and tunes its nprobe to `--target-recall`; the rule, the
other types and the measurements behind them are in fgdist/index_choice.py and
bench/results/search_scale.md. An index folder holds `index.faiss`,
`rows.parquet` (key, instance, super, fine of each index row) and `index.json` (type, parameters,
nprobe, the choice and its reason, the measured recall, dimension, the embeddings and the model
they came from).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fgdist.embeddings_io import Embeddings, read_embeddings
from fgdist.index_choice import (
    KINDS,
    IndexSpec,
    build_spec,
    describe_choice,
    make_index,
    set_breadth,
    size_arg,
    spec_for,
)
from fgdist.output_folder import atomic_folder, check_free
from fgdist.search_errors import ERRORS, DimensionMismatchError

INDEX, ROWS, META = "index.faiss", "rows.parquet", "index.json"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("fgdist's index and search need faiss: pip install 'fgdist[search]'") from None
    return faiss


def factory_string(kind: str, nlist: int = 1024, m: int = 16, nbits: int = 8) -> str:
    if kind not in KINDS:
        raise ValueError(f"index type {kind!r}: expected one of {', '.join(KINDS)}")
    return IndexSpec(kind, nlist, m, nbits).factory


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
    check_free(out, overwrite)
    index, chosen = make_index(emb.vectors.numpy(), kind, **params)
    rows = pa.table(
        {
            "key": pa.array(emb.keys, pa.string()),
            "instance": pa.array(emb.instance.numpy()),
            "super": pa.array(emb.labels["super"].numpy().astype(np.int32)),
            "fine": pa.array(emb.labels["fine"].numpy().astype(np.int32)),
        }
    )
    meta = {
        **chosen,
        "dim": int(emb.vectors.shape[1]),
        "count": len(emb.keys),
        "embeddings": source,
        "model": emb.meta.get("model"),
        "images": emb.meta.get("images"),
    }
    with atomic_folder(out, overwrite) as partial:
        faiss.write_index(index, str(partial / INDEX))
        pq.write_table(rows, partial / ROWS)
        (partial / META).write_text(json.dumps(meta, indent=1))
    return Path(out)


@dataclass
class Index:
    """A loaded index folder."""

    index: object
    rows: pa.Table
    meta: dict

    @property
    def dim(self) -> int:
        return self.index.d

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row numbers), each Q x k; a query of the wrong dimension is an error."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DimensionMismatchError(
                f"queries of dimension {queries.shape[-1]} against an index of dimension {self.dim} "
                f"(built from {self.meta.get('embeddings')}, model {self.meta.get('model')})"
            )
        return self.index.search(queries, min(k, self.index.ntotal))


def open_index(path: str | Path) -> Index:
    faiss = _faiss()
    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path}: not an fgdist-index folder (no {META})")
    meta = json.loads((path / META).read_text())
    index = faiss.read_index(str(path / INDEX))
    set_nprobe(index, meta.get("nprobe", 16))
    return Index(index, pq.read_table(path / ROWS), meta)


# -- command lines -----------------------------------------------------------------------------
def index_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="fgdist-index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--embeddings", required=True, help="an fgdist-embed output folder")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--type",
        choices=("auto",) + KINDS,
        default="auto",
        help="auto: chosen from the budgets below (default: %(default)s)",
    )
    p.add_argument(
        "--memory-budget", type=size_arg, help="most memory the index may take, e.g. 2GB (auto; default: none)"
    )
    p.add_argument(
        "--latency-budget-ms",
        type=float,
        default=10.0,
        help="Flat only while a query takes at most this (auto; default: %(default)s)",
    )
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 vs exact that tunes --nprobe (default: %(default)s)",
    )
    p.add_argument("--nlist", type=int, help="IVF lists (default: about sqrt(N))")
    p.add_argument(
        "--m", type=int, help="PQ sub-vectors: m x nbits bits a vector (divides the dimension; default: d/8)"
    )
    p.add_argument("--nbits", type=int, default=8, help="bits per PQ code (default: %(default)s)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links a vector (default: %(default)s)")
    p.add_argument(
        "--nprobe", type=int, help="IVF lists (HNSW: efSearch) per query (default: tuned to --target-recall)"
    )
    p.add_argument("--train-size", type=int, default=100_000, help="IVF training vectors (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        check_free(args.out, args.overwrite)
        emb = read_embeddings(args.embeddings)
        params = {k: getattr(args, k) for k in ("memory_budget", "latency_budget_ms", "target_recall", "nprobe")}
        params |= {k: getattr(args, k) for k in ("nlist", "m", "nbits", "hnsw_m", "train_size")}
        out = write_index(emb, str(Path(args.embeddings).resolve()), args.out, args.type, args.overwrite, **params)
    except ERRORS + (FileNotFoundError, ValueError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    meta = json.loads((out / META).read_text())
    print(describe_choice(meta))
    print(f"{meta['factory']} index of {len(emb.keys)} x {emb.vectors.shape[1]} written to {out}")
    return 0


def neighbour_images(idx: Index, rows: list[int], preprocessing: dict):
    """TestImages (pictures.py) of index rows, decoded from where their embeddings came from."""
    from fgdist.embed import decode
    from fgdist.export import eval_transform
    from fgdist.pictures import TestImage, read_images

    images = idx.meta.get("images") or {}
    records = idx.rows.take(rows).to_pylist()
    if images.get("kind") == "shards":
        from fgdist.config import DataConfig
        from fgdist.shardset import open_split

        split = open_split(images["root"], images["split"])
        found = read_images(split, DataConfig(shards=images["root"], **preprocessing), [r["instance"] for r in records])
        return [found[r["instance"]] for r in records]
    if images.get("kind") in ("folder", "manifest"):
        root = Path(images["root"])
        base = root if images["kind"] == "folder" else root.parent
        transform = eval_transform(preprocessing)
        return [TestImage(r["instance"], r["super"], r["fine"], decode(base / r["key"], transform)) for r in records]
    raise ValueError(f"the index does not record where its images are ({images}); cannot draw a grid")


def search_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="fgdist-search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--index", required=True, help="an fgdist-index folder")
    p.add_argument("--image", required=True, help="the query image")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--model", help="the model that embeds the query (default: the one the index was built with)")
    p.add_argument("--nprobe", type=int, help="IVF lists to scan (default: the index's)")
    p.add_argument("--grid", help="draw the query and its neighbours into this PNG")
    p.add_argument("--fine", type=int, default=-1, help="the query's fine class, for the grid's outlines")
    p.add_argument("--super", type=int, default=-1, help="the query's super-class, where there are no fine labels")
    args = p.parse_args(argv)
    from fgdist.embed import decode
    from fgdist.export import eval_transform, load_model
    from fgdist.pictures import TestImage, retrieval_grid

    try:
        idx = open_index(args.index)
        model_source = args.model or idx.meta.get("model")
        if not model_source:
            raise ValueError(f"{args.index}: the index records no model; pass --model")
        embedder = load_model(model_source)
        query = decode(Path(args.image), eval_transform(embedder.preprocessing))
        if args.nprobe:
            set_nprobe(idx.index, args.nprobe)
        scores, rows = idx.search(embedder(query[None]).detach().numpy(), args.k)
        found = [int(r) for r in rows[0] if r >= 0]
        records = idx.rows.take(found).to_pylist()
        print("rank\tscore\tkey\tinstance\tsuper\tfine")
        for i, (rec, score) in enumerate(zip(records, scores[0])):
            print(f"{i + 1}\t{score:.4f}\t{rec['key']}\t{rec['instance']}\t{rec['super']}\t{rec['fine']}")
        if args.grid:
            shown = neighbour_images(idx, found, embedder.preprocessing)
            q = TestImage(-1, args.super, args.fine, query)
            retrieval_grid([q], [[(t, float(s)) for t, s in zip(shown, scores[0])]], args.grid)
            print(f"grid written to {args.grid}")
    except ERRORS + (FileNotFoundError, ValueError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(search_main())
