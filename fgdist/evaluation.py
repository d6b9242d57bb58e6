"""Distributed, chunked evaluation: one retrieval pass.

Each rank embeds its slice of the test split; the L2-normalized embeddings (and labels) are
gathered to every rank; each rank then ranks its own queries against the whole test set, the
query itself excluded, with `fgdist.retrieval_metrics.retrieval_sums`: one sorted pass that
yields the Recall@k hits, MAP@R and R-precision together, in blocks of at most `query_chunk`
rows (and at most `retrieval_metrics.SUB_CHUNK`), so no all-pairs matrix is ever held (the peak
is stated there). The sums of all labels and the super-class top-1/top-5 counts are added over
ranks in one collective and read to the host once.

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

import torch
import torch.nn.functional as F

from fgdist.collectives import gather_counts, gather_rows, sum_over_ranks, world
from fgdist.retrieval_metrics import retrieval_sums, to_metrics


@torch.no_grad()
def query_slice_sums(
    embeddings: torch.Tensor,
    labels: dict[str, torch.Tensor],
    query_begin: int,
    query_end: int,
    ks: list[int],
    chunk: int,
) -> dict[str, torch.Tensor]:
    """`retrieval_sums` of rows [query_begin, query_end) as queries against all rows, each query's
    own row excluded: one rank's share of evaluation (local, no collective)."""
    rows = slice(query_begin, query_end)
    queries = {name: y[rows] for name, y in labels.items()}
    return retrieval_sums(embeddings[rows], queries, embeddings, labels, ks, chunk, self_offset=query_begin)


@torch.no_grad()
def evaluate(
    model, batches, device, dtype, ks: list[int], chunk: int, has_super_head: bool, progress=None
) -> dict[str, float]:
    """Metrics of `model` on a test split; `batches` is this rank's slice of it."""
    rank, _ = world()
    was_training = model.training
    model.eval()
    feats, supers, fines = [], [], []
    top = torch.zeros(2, dtype=torch.long, device=device)  # super-class top-1 and top-5 hits
    started = time.time()
    for batch in batches:
        out = model(batch["images"].to(device=device, dtype=dtype))
        feats.append(F.normalize(out["features"].float(), dim=1))
        y = batch["super"].to(device)
        supers.append(y)
        fines.append(batch["fine"].to(device))
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
    sums = query_slice_sums(embeddings, labels, begin, begin + counts[rank], ks, chunk)
    # float64 holds every count exactly (below 2**53), so the top-k counts ride along.
    totals = sum_over_ranks(torch.cat([*sums.values(), top.double()])).tolist()  # the one read to the host
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
