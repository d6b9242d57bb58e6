"""A faiss index over an embeddings dataset, and queries against it (`pip install fgdist[search]`).

    fgdist-index --embeddings emb/test --out index/test                              # exact (Flat)
    fgdist-index --embeddings emb/test --out index/ivf --type ivfpq --nlist 1024 --m 16 --nbits 8
    fgdist-search --index index/test --image Q.jpg --k 10 [--grid out.png] [--fine 3]

Scores are inner products of L2-normalized vectors, i.e. cosine similarities, as in evaluation.
`Flat` is exact; `IVF<nlist>,PQ<m>x<nbits>` clusters the vectors into nlist lists, stores each
as m codes of nbits bits, and at query time scans `nprobe` lists (approximate; its recall@10
against Flat is in bench/results/search_scale.md). An index folder holds `index.faiss`,
`rows.parquet` (key, instance, super, fine of each index row) and `index.json` (type, parameters,
dimension, the embeddings and the model they came from).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fgdist.embeddings_io import Embeddings, read_embeddings
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
    if kind == "flat":
        return "Flat"
    if kind == "ivfpq":
        return f"IVF{nlist},PQ{m}x{nbits}"
    raise ValueError(f"index type {kind!r}: expected 'flat' or 'ivfpq'")


def build(vectors: np.ndarray, kind: str = "flat", nlist: int = 1024, m: int = 16, nbits: int = 8, train_size=None):
    """A faiss inner-product index holding `vectors` (N x d float32, normalized) in row order.
    IVF-PQ is trained on `train_size` rows drawn evenly (all rows when None)."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1]
    if kind == "ivfpq" and d % m:
        raise ValueError(f"IVF-PQ: the dimension {d} is not a multiple of m={m}")
    index = faiss.index_factory(d, factory_string(kind, nlist, m, nbits), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        if len(vectors) < nlist:
            raise ValueError(f"IVF-PQ: {len(vectors)} vectors cannot train nlist={nlist} lists; lower --nlist")
        sample = vectors if not train_size or train_size >= len(vectors) else vectors[:: len(vectors) // train_size]
        index.train(sample)
    index.add(vectors)
    return index


def set_nprobe(index, nprobe: int) -> None:
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


def write_index(emb: Embeddings, source: str, out: str | Path, kind: str = "flat", overwrite: bool = False, **params):
    """Build an index over an embeddings dataset into the folder `out` (atomically)."""
    faiss = _faiss()
    check_free(out, overwrite, {"--embeddings": source})
    started = time.time()
    index = build(emb.vectors.numpy(), kind, **{k: v for k, v in params.items() if k != "nprobe"})
    seconds = time.time() - started
    rows = pa.table(
        {
            "key": pa.array(emb.keys, pa.string()),
            "instance": pa.array(emb.instance.numpy()),
            "super": pa.array(emb.labels["super"].numpy().astype(np.int32)),
            "fine": pa.array(emb.labels["fine"].numpy().astype(np.int32)),
        }
    )
    meta = {
        "type": kind,
        "factory": factory_string(kind, **{k: v for k, v in params.items() if k in ("nlist", "m", "nbits")}),
        "nprobe": params.get("nprobe", 16),
        "dim": int(emb.vectors.shape[1]),
        "count": len(emb.keys),
        "embeddings": source,
        "model": emb.meta.get("model"),
        "images": emb.meta.get("images"),
        "build_seconds": seconds,
    }
    with atomic_folder(out, overwrite, "index", {"--embeddings": source}) as partial:
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
    p.add_argument("--type", choices=("flat", "ivfpq"), default="flat")
    p.add_argument("--nlist", type=int, default=1024, help="IVF lists (about sqrt(N) to 16 sqrt(N))")
    p.add_argument("--m", type=int, default=16, help="PQ sub-vectors (divides the dimension)")
    p.add_argument("--nbits", type=int, default=8, help="bits per PQ code")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists scanned per query (stored with the index)")
    p.add_argument("--train-size", type=int, default=100_000, help="IVF-PQ training vectors")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        check_free(args.out, args.overwrite, {"--embeddings": args.embeddings})
        emb = read_embeddings(args.embeddings)
        params = {"nprobe": args.nprobe}
        if args.type == "ivfpq":
            params.update(nlist=args.nlist, m=args.m, nbits=args.nbits, train_size=args.train_size)
        out = write_index(emb, str(Path(args.embeddings).resolve()), args.out, args.type, args.overwrite, **params)
    except ERRORS + (FileNotFoundError, ValueError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(f"{args.type} index of {len(emb.keys)} x {emb.vectors.shape[1]} written to {out}")
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
