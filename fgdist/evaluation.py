"""Distributed, chunked evaluation.

Each rank embeds its slice of the test split; the L2-normalized embeddings (and labels) are
gathered to every rank; each rank then ranks its own queries against the whole test set in
blocks of `query_chunk` rows (an exact top-k per block, the query itself excluded), so no
all-pairs matrix is ever held. Hits are summed over ranks.

Everything stays on the model's device: collectives run through fgdist.collectives (which puts
their tensors on the communication device), and the host reads the totals once at the end.

Recall@k: the fraction of queries with at least one of their k nearest neighbours (cosine
similarity on f(x)) of the same label. Super-class top-1/top-5 come from the super head.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fgdist.collectives import gather_counts, gather_rows, sum_over_ranks, world
from fgdist.retrieval_metrics import map_at_r_metrics


def metric_name(label: str, k: int) -> str:
    """MLflow metric names allow no '@': fine_recall_at_1 stands for fine R@1."""
    return f"{label}_recall_at_{k}"


@torch.no_grad()
def recall_at_k(
    embeddings: torch.Tensor,
    labels: dict[str, torch.Tensor],
    query_begin: int,
    query_end: int,
    ks: list[int],
    chunk: int,
) -> dict[str, torch.Tensor]:
    """Hit counts of queries [query_begin, query_end) against all rows, per label and k."""
    k_max = min(max(ks), embeddings.shape[0] - 1)  # there are only n - 1 other rows
    miss = max(ks)  # a query with no same-label neighbour: beyond every k, never a hit
    device = embeddings.device
    hits = {name: torch.zeros(len(ks), dtype=torch.long, device=device) for name in labels}
    for start in range(query_begin, query_end, chunk):
        stop = min(start + chunk, query_end)
        sims = embeddings[start:stop] @ embeddings.T
        sims[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = float("-inf")
        neighbours = sims.topk(k_max, dim=1).indices
        del sims  # otherwise the next block is computed while this one is still held (2x peak)
        for name, y in labels.items():
            match = y[neighbours] == y[start:stop, None]
            first_hit = torch.where(match.any(dim=1), match.float().argmax(dim=1), miss)
            for i, k in enumerate(ks):
                hits[name][i] += (first_hit < k).sum()
    return hits


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
    hits = recall_at_k(embeddings, labels, begin, begin + counts[rank], ks, chunk)
    totals = sum_over_ranks(torch.cat([*hits.values(), top])).tolist()  # the one read to the host
    n = sum(counts)
    metrics, i = {}, 0
    for name in hits:
        for k in ks:
            metrics[metric_name(name, k)] = 100.0 * totals[i] / n
            i += 1
    if has_super_head:
        metrics["super_top1"] = 100.0 * totals[i] / n
        metrics["super_top5"] = 100.0 * totals[i + 1] / n
    metrics.update(map_at_r_metrics(embeddings, labels, begin, begin + counts[rank], chunk))
    metrics["eval_images"] = float(n)
    metrics["eval_seconds"] = time.time() - started
    return metrics
