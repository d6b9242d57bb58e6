"""Retrieval metrics beside Recall@k: MAP@R and R-precision (Musgrave, Belongie, Lim, "A Metric
Learning Reality Check", 2020), exact and chunked.

For a query with label y, R is the number of gallery items labelled y (the query itself excluded
when the gallery holds it: the paper's protocol, where the test split is both). Ranking the
gallery by cosine similarity (inner product of L2-normalized rows), with rel(i) = 1 when the i-th
item is labelled y:

    R-precision = (1/R) sum_{i<=R} rel(i)
    MAP@R       = (1/R) sum_{i<=R} rel(i) * precision@i

Queries whose label has no other gallery item (R = 0) are left out of the mean, as in
pytorch-metric-learning. Recall@k (the same pass) counts a query as a hit at k when the first
gallery item labelled y (its first rank) is among its first k; one with no such item anywhere is a
miss at every k, k larger than the gallery included. Ties in similarity are broken by the lower
gallery row (a stable sort), for Recall@k as for MAP@R, so the metrics are a function of the data
(a top-k selection would pick among tied items arbitrarily).

The metrics are means of per-query values (first rank, AP@R, R-precision), which
`retrieval_pass` returns beside the sums (evaluation writes them: `fgdist.training.per_query`).

`python -m fgdist.retrieval_metrics --embeddings Q --gallery G` scores a query set against a
different gallery set (two `fgdist-embed` outputs); evaluation (`fgdist.training.evaluation.evaluate`)
uses the test split for both, and all its retrieval metrics come from one `retrieval_pass`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from fgdist import cli

SUB_CHUNK = 256  # query rows ranked at once at most: their ranking against n rows is the peak memory


def metric_names(label: str) -> tuple[str, str]:
    """MLflow metric names (no '@'): fine_map_at_r, fine_r_precision."""
    return f"{label}_map_at_r", f"{label}_r_precision"


@torch.no_grad()
def similarities(queries: torch.Tensor, gallery: torch.Tensor, self_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Q x n inner products; `self_rows[i]` is query i's own row in the gallery (set to -inf, so
    it is never a neighbour), or None."""
    sims = queries @ gallery.T
    if self_rows is not None:
        sims[torch.arange(len(queries), device=sims.device), self_rows] = float("-inf")
    return sims


def ranked(sims: torch.Tensor, depth: int) -> torch.Tensor:
    """Gallery rows of each query by similarity, descending, ties by the lower row: (Q x depth)
    indices, the first `depth` columns of a stable full sort, without sorting the other rows.

    The depth-th largest similarity t of each row (a top-k) splits it: every row above t is kept,
    and of the rows equal to t the lowest ones, as many as fill the depth; the kept rows, taken in
    row order, are then sorted stably, so ties stay in row order as in the full sort. Two reads to
    the host per block (the NaN check, and nonzero's count), beside first_ranks' one."""
    n = sims.shape[1]
    if depth >= n or torch.isnan(sims).any():  # a full sort: nothing to skip, or NaN (no threshold)
        # A copy of the kept columns: a view would keep all Q x n sorted indices alive.
        return torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth].clone()
    if depth == 0:
        return torch.zeros(sims.shape[0], 0, dtype=torch.long, device=sims.device)
    t = torch.topk(sims, depth, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above, at_t = sims > t, sims == t
    room = depth - above.sum(dim=1, keepdim=True)  # >= 1: t itself is among the top depth
    keep = above | (at_t & (at_t.cumsum(dim=1, dtype=torch.int32) <= room))
    rows = keep.nonzero()[:, 1].view(sims.shape[0], depth)  # exactly depth per query, in row order
    return rows.gather(1, torch.sort(sims.gather(1, rows), dim=1, descending=True, stable=True).indices)


def first_ranks(
    rel: torch.Tensor,
    r: torch.Tensor,
    sims: torch.Tensor,
    gallery_labels: torch.Tensor,
    labels: torch.Tensor,
    self_rows,
) -> torch.Tensor:
    """Each query's 1-based rank, in `ranked`'s order, of its first gallery item with its label;
    0 when there is none (R = 0). Read off the kept columns (`rel`, as in `query_values`) where it
    lies among them; counted from the similarities for the few queries whose R same-label items
    all rank deeper (one read to the host per block says which)."""
    first = listed_ranks(rel)
    deeper = torch.nonzero((first == 0) & (r > 0)).squeeze(1)
    if len(deeper):
        own = None if self_rows is None else self_rows[deeper]
        first[deeper] = counted_ranks(sims[deeper], gallery_labels, labels[deeper], own)
    return first


def listed_ranks(rel: torch.Tensor) -> torch.Tensor:
    """Each query's 1-based position of its first relevant column in `rel`; 0 where none is."""
    if not rel.shape[1]:
        return torch.zeros(len(rel), dtype=torch.long, device=rel.device)
    return torch.where(rel.any(dim=1), rel.byte().argmax(dim=1) + 1, 0)


def counted_ranks(sims: torch.Tensor, gallery_labels: torch.Tensor, labels: torch.Tensor, self_rows) -> torch.Tensor:
    """`first_ranks` without a sort, exact at any depth: the items ranked ahead of the best
    same-label item j are the more similar ones and the equally similar ones in lower rows."""
    same = (gallery_labels[None, :] == labels[:, None]) & (labels[:, None] >= 0)
    if self_rows is not None:
        same[torch.arange(len(labels), device=same.device), self_rows] = False
    best = sims.masked_fill(~same, float("-inf")).max(dim=1).values[:, None]
    at_best = sims == best
    first = (same & at_best).byte().argmax(dim=1)  # the lowest same-label row at the best similarity
    before = torch.arange(sims.shape[1], device=sims.device)[None, :] < first[:, None]
    ahead = (sims > best).sum(dim=1) + (at_best & before).sum(dim=1)
    return torch.where(same.any(dim=1), ahead + 1, 0)


@torch.no_grad()
def retrieval_pass(
    queries: torch.Tensor,
    query_labels: dict[str, torch.Tensor],
    gallery: torch.Tensor,
    gallery_labels: dict[str, torch.Tensor],
    ks: list[int],
    chunk: int = 1024,
    self_offset: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(sums, per-query values) per label. Sums: float64 tensor [recall hits at each k..., MAP@R
    sum, R-precision sum, queries with R > 0, queries], on the queries' device; they add over
    ranks before `to_metrics`. Per-query values (`query_values`): first_rank, ap_at_r and
    r_precision of every query, in query order; the sums are made of them.

    `self_offset`: the queries are gallery rows [self_offset, self_offset + len(queries)) and each
    one's own row is excluded (the paper's protocol); None: the two sets are distinct.

    Memory: queries are taken c = min(chunk, SUB_CHUNK) at a time, each ranked against the whole
    gallery of n rows to depth = the deepest R (at most n; `ranked`: a top-k, no full sort). The
    peak working memory is that ranking: about 10 x c x n bytes (the fp32 similarity block, two
    masks and an int32 count; 16 x c x n where it falls back to the full sort: the block, its
    sorted copy and the int64 order), plus some 50 x c x depth bytes for the kept columns,
    whatever the number of queries; the per-query values are 3 numbers per query and label."""
    n, device, excluded = gallery.shape[0], queries.device, self_offset is not None
    r = {name: relevant_counts(g_labels, query_labels[name], excluded) for name, g_labels in gallery_labels.items()}
    # Columns kept for every query and label (a shape, so read to the host once): the deepest R,
    # within the n (- 1) rows there are.
    deepest = torch.stack([x.max() for x in r.values()]).max() if len(queries) and r else 0
    depth = min(int(deepest), n - excluded)
    sums = {name: torch.zeros(len(ks) + 4, dtype=torch.float64, device=device) for name in gallery_labels}
    blocks = {name: [empty_values(device)] for name in gallery_labels}  # no query: empty values
    step = min(chunk, SUB_CHUNK)
    for start in range(0, len(queries), step):
        stop = min(start + step, len(queries))
        self_rows = torch.arange(self_offset + start, self_offset + stop, device=device) if excluded else None
        sims = similarities(queries[start:stop], gallery, self_rows)
        order = ranked(sims, depth)  # one ranking serves every label
        for name, g_labels in gallery_labels.items():
            y, r_block = query_labels[name][start:stop], r[name][start:stop]
            rel = relevant(order, y, g_labels)
            values = query_values(rel, r_block, first_ranks(rel, r_block, sims, g_labels, y, self_rows))
            add_chunk(sums[name], values, r_block, ks)
            blocks[name].append(values)
        del sims, order  # freed before the next block's: two blocks alive would double the peak
    per_query = {name: {key: torch.cat([b[key] for b in parts]) for key in VALUES} for name, parts in blocks.items()}
    return sums, per_query


def retrieval_sums(*args, **kwargs) -> dict[str, torch.Tensor]:
    """`retrieval_pass`'s sums alone (its arguments)."""
    return retrieval_pass(*args, **kwargs)[0]


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
    ranking (an approximate index) scores the rows it has, R staying the count of the label, and a
    query whose first same-label row it did not return is a miss at every k."""
    sums = {}
    for name, g_labels in gallery_labels.items():
        y = query_labels[name]
        rel, r = relevant(order, y, g_labels), relevant_counts(g_labels, y, False)
        sums[name] = torch.zeros(len(ks) + 4, dtype=torch.float64, device=order.device)
        add_chunk(sums[name], query_values(rel, r, listed_ranks(rel)), r, ks)
    return sums


def relevant_counts(gallery_labels: torch.Tensor, query_labels: torch.Tensor, excluded: bool) -> torch.Tensor:
    """R of each query: the gallery items with its label, less its own row when `excluded`; 0 for
    an unlabelled query (label < 0)."""
    counts = torch.bincount(gallery_labels[gallery_labels >= 0], minlength=1)
    known = (query_labels >= 0) & (query_labels < len(counts))  # a label beyond the gallery's: R = 0
    r = torch.where(known, counts[query_labels.clamp(0, len(counts) - 1)], 0)
    return (r - 1).clamp_min(0) if excluded else r


VALUES = ("first_rank", "ap_at_r", "r_precision")  # per query and label; fgdist.training.per_query writes them


def empty_values(device) -> dict[str, torch.Tensor]:
    """`query_values` of no query."""
    return {
        "first_rank": torch.zeros(0, dtype=torch.long, device=device),
        "ap_at_r": torch.zeros(0, dtype=torch.float64, device=device),
        "r_precision": torch.zeros(0, dtype=torch.float64, device=device),
    }


def query_values(rel: torch.Tensor, r: torch.Tensor, first_rank: torch.Tensor) -> dict[str, torch.Tensor]:
    """A block of queries' values: first_rank (`first_ranks`), and AP@R and R-precision (0..1,
    NaN where R = 0). rel[i, j] says whether the j-th ranked gallery item of query i is relevant
    (j < depth >= R), r[i] is its R."""
    depth, device = rel.shape[1], rel.device
    position = torch.arange(1, depth + 1, dtype=torch.float64, device=device)
    hits = (rel & (position[None, :] <= r[:, None])).double()
    precision = hits.cumsum(dim=1) / position
    denom = r.clamp_min(1).double()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)
    scored = r > 0
    return {
        "first_rank": first_rank,
        "ap_at_r": torch.where(scored, (precision * hits).sum(dim=1) / denom, nan),
        "r_precision": torch.where(scored, hits.sum(dim=1) / denom, nan),
    }


def add_chunk(sums: torch.Tensor, values: dict[str, torch.Tensor], r: torch.Tensor, ks: list[int]) -> None:
    """Adds a block of queries' `query_values` to `sums` (`retrieval_pass`' layout); r[i] is
    query i's R. Recall@k hits: the queries whose first same-label item ranks k or better."""
    first = values["first_rank"]
    for i, k in enumerate(ks):
        sums[i] += ((first >= 1) & (first <= k)).sum()
    scored = r > 0
    sums[len(ks)] += values["ap_at_r"][scored].sum()
    sums[len(ks) + 1] += values["r_precision"][scored].sum()
    sums[len(ks) + 2] += scored.sum()
    sums[len(ks) + 3] += len(first)


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
    p = cli.parser("python -m fgdist.retrieval_metrics", __doc__)
    p.add_argument("--embeddings", required=True, help="an fgdist-embed output: the queries")
    p.add_argument("--gallery", help="an fgdist-embed output: the gallery (default: the queries, each query excluded)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="the k of Recall@k")
    args = p.parse_args(argv)
    return cli.run_reporting(lambda: _score(args), (FileNotFoundError, ValueError))


def _score(args) -> int:
    from fgdist.embeddings_io import read_embeddings
    from fgdist.search_errors import DimensionMismatchError, UnlabelledQueriesError

    q = read_embeddings(args.embeddings)
    g = read_embeddings(args.gallery) if args.gallery else q
    if q.vectors.shape[1] != g.vectors.shape[1]:
        raise DimensionMismatchError(f"query dimension {q.vectors.shape[1]} != gallery dimension {g.vectors.shape[1]}")
    labels = [name for name in ("super", "fine") if (g.labels[name] >= 0).any() and (q.labels[name] >= 0).any()]
    if not labels:
        raise UnlabelledQueriesError(
            f"no super or fine label on both the queries {args.embeddings} and the gallery "
            f"{args.gallery or args.embeddings}: retrieval metrics need labelled queries and a labelled gallery"
        )
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
