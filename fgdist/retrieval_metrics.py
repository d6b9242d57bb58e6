"""Retrieval metrics beside Recall@k: MAP@R and R-precision (Musgrave, Belongie, Lim, "A Metric
Learning Reality Check", 2020), exact and chunked.

For a query with label y, R is the number of gallery items labelled y (the query itself excluded
when the gallery holds it: the paper's protocol, where the test split is both). Ranking the
gallery by cosine similarity (inner product of L2-normalized rows), with rel(i) = 1 when the i-th
item is labelled y:

    R-precision = (1/R) sum_{i<=R} rel(i)
    MAP@R       = (1/R) sum_{i<=R} rel(i) * precision@i

Queries whose label has no other gallery item (R = 0) are left out of the mean, as in
pytorch-metric-learning. Ties in similarity are broken by the lower gallery row, so the metrics
are a function of the data (a top-k selection would pick among tied items arbitrarily).

`python -m fgdist.retrieval_metrics --queries Q --gallery G` scores a query set against a
different gallery set (two `fgdist-embed` outputs); evaluation uses the test split for both.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SUB_CHUNK = 256  # query rows sorted at once: a full sort of chunk x n rows is the peak memory


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
    return torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth]


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
    one's own row is excluded (the paper's protocol); None: the two sets are distinct."""
    n, device = gallery.shape[0], queries.device
    out = {}
    for name, g_labels in gallery_labels.items():
        q_labels = query_labels[name]
        top = max(int(g_labels.max()), int(q_labels.max()), 0)
        counts = torch.bincount(g_labels[g_labels >= 0], minlength=top + 1)
        sums = torch.zeros(len(ks) + 4, dtype=torch.float64, device=device)
        for start in range(0, len(queries), min(chunk, SUB_CHUNK)):
            stop = min(start + min(chunk, SUB_CHUNK), len(queries))
            y = q_labels[start:stop]
            r = torch.where(y >= 0, counts[y.clamp_min(0)], 0)
            if self_offset is not None:
                r = (r - 1).clamp_min(0)
            self_rows = (
                None if self_offset is None else torch.arange(self_offset + start, self_offset + stop, device=device)
            )
            depth = min(max(int(r.max()), max(ks)), n - (self_offset is not None))
            order = ranked(queries[start:stop], gallery, depth, self_rows)
            rel = (g_labels[order] == y[:, None]) & (y[:, None] >= 0)
            for i, k in enumerate(ks):
                sums[i] += rel[:, :k].any(dim=1).sum()
            position = torch.arange(1, depth + 1, dtype=torch.float64, device=device)
            within_r = position[None, :] <= r[:, None]
            hits = (rel & within_r).double()
            precision = hits.cumsum(dim=1) / position
            scored = r > 0
            denom = r.clamp_min(1).double()
            sums[len(ks)] += ((precision * hits).sum(dim=1) / denom)[scored].sum()
            sums[len(ks) + 1] += (hits.sum(dim=1) / denom)[scored].sum()
            sums[len(ks) + 2] += scored.sum()
            sums[len(ks) + 3] += stop - start
        out[name] = sums
    return out


def to_metrics(sums: dict[str, torch.Tensor], ks: list[int]) -> dict[str, float]:
    """Percentages: Recall@k over all queries, MAP@R and R-precision over the queries with R > 0."""
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


def map_at_r_metrics(
    embeddings: torch.Tensor, labels: dict[str, torch.Tensor], query_begin: int, query_end: int, chunk: int
) -> dict[str, float]:
    """Evaluation's hook (collective when a process group is up): this rank's queries are rows
    [query_begin, query_end) of the gathered test embeddings, the gallery all of them; returns
    MAP@R and R-precision per label over all ranks' queries."""
    from fgdist.collectives import sum_over_ranks

    rows = slice(query_begin, query_end)
    sums = retrieval_sums(
        embeddings[rows], {n: y[rows] for n, y in labels.items()}, embeddings, labels, [1], chunk, query_begin
    )
    sums = {name: sum_over_ranks(s).cpu() for name, s in sums.items()}
    wanted = {name for label in labels for name in metric_names(label)}
    return {k: v for k, v in to_metrics(sums, [1]).items() if k in wanted}


def main(argv=None) -> int:
    from fgdist.embeddings_io import read_embeddings

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
    labels = [name for name in ("super", "fine") if (g.labels[name] >= 0).any()]
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
