"""Retrieval metrics beside Recall@k: MAP@R and R-precision (Musgrave, Belongie, Lim, "A Metric
Learning Reality Check", 2020), exact and chunked.

For a query with label y, R is the number of gallery items labelled y (the query itself excluded
when the gallery holds it: the paper's protocol, where the test split is both). Ranking the
gallery by cosine similarity (inner product of L2-normalized rows), with rel(i) = 1 when the i-th
item is labelled y:

    R-precision = (1/R) sum_{i<=R} rel(i)
    MAP@R       = (1/R) sum_{i<=R} rel(i) * precision@i

Queries whose label has no other gallery item (R = 0) are left out of the mean, as in
pytorch-metric-learning. Recall@k (the same pass) counts a query as a hit at k when one of its
first k gallery items is labelled y; one with no such item anywhere is a miss at every k, k larger
than the gallery included. Ties in similarity are broken by the lower gallery row (a stable sort),
for Recall@k as for MAP@R, so the metrics are a function of the data (a top-k selection would pick
among tied items arbitrarily).

`python -m fgdist.retrieval_metrics --queries Q --gallery G` scores a query set against a
different gallery set (two `fgdist-embed` outputs); evaluation (`fgdist.evaluation.evaluate`)
uses the test split for both, and all its retrieval metrics come from one `retrieval_sums` pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

SUB_CHUNK = 256  # query rows sorted at once at most: their full sort against n rows is the peak memory


def metric_names(label: str) -> tuple[str, str]:
    """MLflow metric names (no '@'): fine_map_at_r, fine_r_precision."""
    return f"{label}_map_at_r", f"{label}_r_precision"


@torch.no_grad()
def ranked(queries: torch.Tensor, gallery: torch.Tensor, depth: int, self_rows: torch.Tensor | None = None):
    """Gallery rows of each query by similarity, descending, ties by the lower row: (Q x depth)
    indices. `self_rows[i]` is query i's own row in the gallery (excluded), or None."""
    sims = queries @ gallery.T
    if self_rows is not None:
        sims[torch.arange(len(queries), device=sims.device), self_rows] = float("-inf")
    # A copy of the kept columns: a view would keep all Q x n sorted indices alive.
    return torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth].clone()


@torch.no_grad()
def retrieval_sums(
    queries: torch.Tensor,
    query_labels: dict[str, torch.Tensor],
    gallery: torch.Tensor,
    gallery_labels: dict[str, torch.Tensor],
    ks: list[int],
    chunk: int = 1024,
    self_offset: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per label: float64 tensor [recall hits at each k..., MAP@R sum, R-precision sum, queries
    with R > 0, queries], on the queries' device. Sums add over ranks before `to_metrics`.

    `self_offset`: the queries are gallery rows [self_offset, self_offset + len(queries)) and each
    one's own row is excluded (the paper's protocol); None: the two sets are distinct.

    Memory: queries are taken c = min(chunk, SUB_CHUNK) at a time, each sorted against the whole
    gallery of n rows, keeping depth = max(R, max ks) columns (at most n). The peak working memory
    is that sort: about 16 x c x n bytes (the fp32 similarity block, its sorted copy and the int64
    order; a CUDA sort adds its workspace), plus some 50 x c x depth bytes for the kept columns,
    whatever the number of queries."""
    n, device, excluded = gallery.shape[0], queries.device, self_offset is not None
    r = {name: relevant_counts(g_labels, query_labels[name], excluded) for name, g_labels in gallery_labels.items()}
    # Columns kept for every query and label (a shape, so read to the host once): the deepest R, or
    # max(ks), within the n (- 1) rows there are.
    deepest = torch.stack([x.max() for x in r.values()]).max() if len(queries) and r else 0
    depth = min(max(int(deepest), max(ks)), n - excluded)
    sums = {name: torch.zeros(len(ks) + 4, dtype=torch.float64, device=device) for name in gallery_labels}
    step = min(chunk, SUB_CHUNK)
    for start in range(0, len(queries), step):
        stop = min(start + step, len(queries))
        self_rows = torch.arange(self_offset + start, self_offset + stop, device=device) if excluded else None
        order = ranked(queries[start:stop], gallery, depth, self_rows)  # one sort serves every label
        for name, g_labels in gallery_labels.items():
            add_chunk(sums[name], relevant(order, query_labels[name][start:stop], g_labels), r[name][start:stop], ks)
    return sums


def relevant(order: torch.Tensor, y: torch.Tensor, gallery_labels: torch.Tensor) -> torch.Tensor:
    """rel[i, j]: the j-th ranked gallery row of query i (order[i, j]; -1: none) has its label y[i]."""
    found = order >= 0
    return (gallery_labels[order.clamp_min(0)] == y[:, None]) & (y[:, None] >= 0) & found


@torch.no_grad()
def ranking_sums(
    order: torch.Tensor, query_labels: dict[str, torch.Tensor], gallery_labels: dict[str, torch.Tensor], ks: list[int]
) -> dict[str, torch.Tensor]:
    """`retrieval_sums`' layout from rankings made elsewhere (a faiss index): order[i] is query i's
    gallery rows best first, -1 past the last one the index found. The queries are not gallery
    rows. Complete metrics need order at least max(R, max ks) deep (`relevant_counts`); a shorter
    ranking (an approximate index) scores the rows it has, R staying the count of the label."""
    sums = {}
    for name, g_labels in gallery_labels.items():
        y = query_labels[name]
        sums[name] = torch.zeros(len(ks) + 4, dtype=torch.float64, device=order.device)
        add_chunk(sums[name], relevant(order, y, g_labels), relevant_counts(g_labels, y, False), ks)
    return sums


def relevant_counts(gallery_labels: torch.Tensor, query_labels: torch.Tensor, excluded: bool) -> torch.Tensor:
    """R of each query: the gallery items with its label, less its own row when `excluded`; 0 for
    an unlabelled query (label < 0)."""
    counts = torch.bincount(gallery_labels[gallery_labels >= 0], minlength=1)
    known = (query_labels >= 0) & (query_labels < len(counts))  # a label beyond the gallery's: R = 0
    r = torch.where(known, counts[query_labels.clamp(0, len(counts) - 1)], 0)
    return (r - 1).clamp_min(0) if excluded else r


def add_chunk(sums: torch.Tensor, rel: torch.Tensor, r: torch.Tensor, ks: list[int]) -> None:
    """Adds a block of queries to `sums` (`retrieval_sums`' layout): rel[i, j] says whether the
    j-th ranked gallery item of query i is relevant, r[i] is its R."""
    depth, device = rel.shape[1], rel.device
    for i, k in enumerate(ks):
        sums[i] += rel[:, :k].any(dim=1).sum()  # k beyond depth (the whole gallery) takes every column
    position = torch.arange(1, depth + 1, dtype=torch.float64, device=device)
    hits = (rel & (position[None, :] <= r[:, None])).double()
    precision = hits.cumsum(dim=1) / position
    scored = r > 0
    denom = r.clamp_min(1).double()
    sums[len(ks)] += ((precision * hits).sum(dim=1) / denom)[scored].sum()
    sums[len(ks) + 1] += (hits.sum(dim=1) / denom)[scored].sum()
    sums[len(ks) + 2] += scored.sum()
    sums[len(ks) + 3] += len(rel)


def to_metrics(sums: dict[str, Sequence[float] | torch.Tensor], ks: list[int]) -> dict[str, float]:
    """Percentages: Recall@k over all queries, MAP@R and R-precision over the queries with R > 0.
    `sums`: `retrieval_sums`'s layout per label, as tensors or as numbers already read to the host."""
    metrics = {}
    for name, s in sums.items():
        queries, scored = float(s[len(ks) + 3]), float(s[len(ks) + 2])
        for i, k in enumerate(ks):
            metrics[f"{name}_recall_at_{k}"] = 100.0 * float(s[i]) / max(queries, 1.0)
        map_name, rp_name = metric_names(name)
        metrics[map_name] = 100.0 * float(s[len(ks)]) / max(scored, 1.0)
        metrics[rp_name] = 100.0 * float(s[len(ks) + 1]) / max(scored, 1.0)
    return metrics


TITLES = {
    name: f"{label} {title}"
    for label in ("super", "fine")
    for name, title in zip(metric_names(label), ("MAP@R", "R-prec"))
}


def main(argv=None) -> int:
    from fgdist.embeddings_io import read_embeddings
    from fgdist.search_errors import UnlabelledQueriesError

    p = argparse.ArgumentParser(
        prog="python -m fgdist.retrieval_metrics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--queries", required=True, help="an fgdist-embed output (the query set)")
    p.add_argument("--gallery", help="an fgdist-embed output (default: the query set, each query excluded)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    args = p.parse_args(argv)
    try:
        q = read_embeddings(args.queries)
        g = read_embeddings(args.gallery) if args.gallery else q
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if q.vectors.shape[1] != g.vectors.shape[1]:
        print(f"error: query dimension {q.vectors.shape[1]} != gallery dimension {g.vectors.shape[1]}", file=sys.stderr)
        return 2
    labels = [name for name in ("super", "fine") if (g.labels[name] >= 0).any() and (q.labels[name] >= 0).any()]
    if not labels:
        gallery = args.gallery or args.queries
        err = UnlabelledQueriesError(
            f"no super or fine label on both the queries {args.queries} and the gallery {gallery}: "
            "retrieval metrics need labelled queries and a labelled gallery"
        )
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    sums = retrieval_sums(
        q.vectors,
        {n: q.labels[n] for n in labels},
        g.vectors,
        {n: g.labels[n] for n in labels},
        args.k,
        self_offset=None if args.gallery else 0,
    )
    print(json.dumps(to_metrics(sums, args.k), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
