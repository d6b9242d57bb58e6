"""Search at scale: faiss Flat against IVF-PQ (fgdist.search.build) on 1M x 128 vectors and on
the real embeddings of a trained run. Per index: build seconds, queries/s (single-query latency
and one batch), index memory (serialized bytes) and process RSS growth, and IVF-PQ's recall@10
against Flat (the fraction of Flat's top 10 that IVF-PQ also returns).

    PYTHONPATH=. python bench/search_scale.py [--n 1000000] [--queries 200] [--embeddings emb/test] \
        [--out bench/results/search_scale.md]

The synthetic vectors are a mixture of 1,000 Gaussian clusters on the unit sphere (uniform
random vectors have no neighbours worth finding, and IVF would look worse than on real data).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import psutil

from fgdist.search import build, set_nprobe


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def measure(name, vectors, queries, kind, k=10, **params):
    import faiss

    nprobe = params.pop("nprobe", None)
    before = rss()
    started = time.perf_counter()
    index = build(vectors, kind, **params)
    build_s = time.perf_counter() - started
    grown = rss() - before
    if nprobe:
        set_nprobe(index, nprobe)
    started = time.perf_counter()
    for q in queries[:50]:
        index.search(q[None], k)
    single_qps = 50 / (time.perf_counter() - started)
    started = time.perf_counter()
    _, rows = index.search(queries, k)
    batch_qps = len(queries) / (time.perf_counter() - started)
    size = len(faiss.serialize_index(index))
    return {
        "name": name,
        "build_s": build_s,
        "single_qps": single_qps,
        "batch_qps": batch_qps,
        "bytes": size,
        "rss_growth": grown,
    }, rows


def recall_at(rows, truth, k=10) -> float:
    return float(np.mean([len(set(r[:k]) & set(t[:k])) / k for r, t in zip(rows, truth)]))


def bench(label, vectors, queries, ivf_params) -> list[str]:
    flat, truth = measure("Flat", vectors, queries, "flat")
    ivf, rows = measure(
        f"IVF{ivf_params['nlist']},PQ{ivf_params['m']}x{ivf_params['nbits']} nprobe {ivf_params['nprobe']}",
        vectors,
        queries,
        "ivfpq",
        **ivf_params,
    )
    ivf["recall_at_10"] = recall_at(rows, truth)
    flat["recall_at_10"] = 1.0
    lines = [
        f"### {label}: {vectors.shape[0]:,} x {vectors.shape[1]}, {len(queries)} queries, k = 10",
        "",
        "| index | build s | q/s single | q/s batch | index MB | RSS growth MB | recall@10 vs Flat |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (flat, ivf):
        lines.append(
            f"| {r['name']} | {r['build_s']:.1f} | {r['single_qps']:.0f} | {r['batch_qps']:.0f} | "
            f"{r['bytes'] / 2**20:.1f} | {r['rss_growth'] / 2**20:.0f} | {r['recall_at_10']:.3f} |"
        )
    print("\n".join(lines), flush=True)
    return lines + [""]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--embeddings", help="an fgdist-embed output of a trained run")
    p.add_argument("--out", default="bench/results/search_scale.md")
    args = p.parse_args()
    import faiss

    lines = [
        "# Search at scale: faiss Flat vs IVF-PQ",
        "",
        f"Produced by `bench/search_scale.py` on {os.cpu_count()} CPU cores (faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} OpenMP threads). Queries are held-out vectors of the same distribution "
        "(synthetic) or the set's own vectors (real; each query finds itself). IVF-PQ is trained on 50,000 "
        "vectors (all, when fewer). Memory: the serialized index, and the process RSS growth while building.",
        "",
    ]
    data = clustered(args.n + args.queries, args.d, 1000, seed=0)
    lines += bench(
        "synthetic clusters",
        data[: args.n],
        data[args.n :],
        {"nlist": 1024, "m": 16, "nbits": 8, "nprobe": 16, "train_size": 50_000},
    )
    del data
    if args.embeddings:
        from fgdist.embeddings_io import read_embeddings

        emb = read_embeddings(args.embeddings)
        vectors = emb.vectors.numpy()
        rng = np.random.default_rng(1)
        queries = vectors[rng.choice(len(vectors), min(args.queries, len(vectors)), replace=False)]
        nlist = max(16, int(4 * np.sqrt(len(vectors))))
        m = 16 if vectors.shape[1] % 16 == 0 else 8
        lines.append(f"Real embeddings: `{args.embeddings}` (model {emb.meta.get('model')}).")
        lines.append("")
        lines += bench(
            "real embeddings",
            vectors,
            queries,
            {"nlist": nlist, "m": m, "nbits": 8, "nprobe": 16, "train_size": 50_000},
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
