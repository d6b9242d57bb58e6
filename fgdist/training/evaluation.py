"""Distributed, chunked evaluation: one retrieval pass.

Each rank embeds its slice of the test split; the L2-normalized embeddings (and labels) are
gathered to every rank; each rank then ranks its own queries against the whole test set, the
query itself excluded, with `fgdist.retrieval_metrics.retrieval_pass`: one ranking pass that
yields the Recall@k hits, MAP@R and R-precision together, in blocks of at most `query_chunk`
rows (and at most `retrieval_metrics.SUB_CHUNK`), so no all-pairs matrix is ever held (the peak
is stated there). The sums of all labels and the super-class top-1/top-5 counts are added over
ranks in one collective and read to the host once. With `per_query_file`, the per-query values
the sums are made of (3 numbers per query and label) and the queries' instance ids are gathered
too, and rank 0 writes them (`fgdist.training.per_query`).

Everything stays on the model's device: collectives run through fgdist.collectives (which puts
their tensors on the communication device).

Recall@k: the fraction of queries with at least one of their k nearest neighbours (cosine
similarity on f(x)) of the same label; a query with no same-label row is a miss at every k,
including k beyond the other rows' count. Neighbours tied in similarity are ranked by the lower
row (a stable sort), so the metrics are a function of the data. Super-class top-1/top-5 come
from the super head. See docs/DESIGN.md, "Evaluation".
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fgdist.collectives import gather_counts, gather_rows, sum_over_ranks, world
from fgdist.retrieval_metrics import VALUES, retrieval_pass, to_metrics
from fgdist.training import per_query
from fgdist.training.model import unit_features


@torch.no_grad()
def query_slice_pass(
    embeddings: torch.Tensor,
    labels: dict[str, torch.Tensor],
    query_begin: int,
    query_end: int,
    ks: list[int],
    chunk: int,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """`retrieval_pass` of rows [query_begin, query_end) as queries against all rows, each query's
    own row excluded: one rank's share of evaluation (local, no collective)."""
    rows = slice(query_begin, query_end)
    queries = {name: y[rows] for name, y in labels.items()}
    return retrieval_pass(embeddings[rows], queries, embeddings, labels, ks, chunk, self_offset=query_begin)


def query_slice_sums(embeddings, labels, query_begin, query_end, ks, chunk) -> dict[str, torch.Tensor]:
    """`query_slice_pass`'s sums alone."""
    return query_slice_pass(embeddings, labels, query_begin, query_end, ks, chunk)[0]


@torch.no_grad()
def evaluate(
    model,
    batches,
    device,
    dtype,
    ks: list[int],
    chunk: int,
    has_super_head: bool,
    progress=None,
    per_query_file: str | Path | None = None,
    test_set: str = "",
) -> dict[str, float]:
    """Metrics of `model` on a test split; `batches` is this rank's slice of it. With
    `per_query_file`, rank 0 also writes the per-query values there (`fgdist.training.per_query`; the
    batches must carry `instance`), recording `test_set` (the split's fingerprint)."""
    rank, _ = world()
    was_training = model.training
    model.eval()
    feats, supers, fines, instances = [], [], [], []
    top = torch.zeros(2, dtype=torch.long, device=device)  # super-class top-1 and top-5 hits
    started = time.time()
    for batch in batches:
        out = model(batch["images"].to(device=device, dtype=dtype))
        feats.append(unit_features(out))
        y = batch["super"].to(device)
        supers.append(y)
        fines.append(batch["fine"].to(device))
        if per_query_file is not None:
            instances.append(batch["instance"].to(device))
        if has_super_head:
            best = out["super_logits"].float().topk(min(5, out["super_logits"].shape[1]), dim=1).indices
            top[0] += (best[:, 0] == y).sum()
            top[1] += (best == y[:, None]).any(dim=1).sum()
        if progress:
            progress(sum(len(f) for f in feats))
    model.train(was_training)  # the caller's mode: the trainer goes on training, a script may not
    if not feats:
        raise RuntimeError(f"rank {rank}: no test samples in its slice of the test split")
    local = torch.cat(feats)
    counts = gather_counts(local.shape[0])
    embeddings = gather_rows(local, counts)
    labels = {"super": gather_rows(torch.cat(supers), counts), "fine": gather_rows(torch.cat(fines), counts)}
    if (labels["fine"] < 0).all():
        del labels["fine"]  # no fine labels in this data set
    begin = sum(counts[:rank])
    sums, values = query_slice_pass(embeddings, labels, begin, begin + counts[rank], ks, chunk)
    # float64 holds every count exactly (below 2**53), so the top-k counts ride along.
    totals = sum_over_ranks(torch.cat([*sums.values(), top.double()])).tolist()  # the one read to the host
    if per_query_file is not None:  # after the sums: a failed write on rank 0 leaves no rank in a collective
        write_per_query(per_query_file, test_set, torch.cat(instances), labels, values, counts)
    per_label, i = {}, 0
    for name, s in sums.items():
        per_label[name], i = totals[i : i + len(s)], i + len(s)
    metrics = to_metrics(per_label, ks)
    n = sum(counts)
    if has_super_head:
        metrics["super_top1"] = 100.0 * totals[-2] / n
        metrics["super_top5"] = 100.0 * totals[-1] / n
    metrics["eval_images"] = float(n)
    metrics["eval_seconds"] = time.time() - started
    return metrics


def write_per_query(
    path: str | Path,
    test_set: str,
    instances: torch.Tensor,
    labels: dict[str, torch.Tensor],
    values: dict[str, dict[str, torch.Tensor]],
    counts: list[int],
) -> None:
    """Gather every rank's per-query values (and its queries' instance ids) and write them on rank
    0. Collective. `labels` are already gathered (all rows, in rank order, as the queries are)."""
    # One float64 row per query (ids and ranks are exact below 2**53), one gather, one host read.
    local = torch.stack([instances.double()] + [values[name][v].double() for name in labels for v in VALUES], dim=1)
    rows = gather_rows(local, counts).cpu().numpy()
    if world()[0] != 0:
        return
    columns = iter(rows.T[1:])
    per_label = {name: {v: next(columns) for v in VALUES} for name in labels}
    for name in labels:
        per_label[name]["first_rank"] = per_label[name]["first_rank"].astype(np.int64)
    ids = rows[:, 0].astype(np.int64)
    host_labels = {name: y.cpu().numpy() for name, y in labels.items()}
    per_query.write(path, per_query.table(ids, host_labels, per_label, test_set))
