"""Benchmark of the distributed, chunked evaluation (its one retrieval pass: Recall@k, MAP@R and
R-precision) at the scale of SOP's test split.

The paper's SOP split keeps 80,000 random images for training and tests on the rest (40,053):
every test image is a query against the rest of the test set, Recall@{1,10,100,1000}, for super
and fine labels. This script runs the product's own code on random data of that shape:

  * features: 512-d, L2-normalized, clustered by fine class (a random centre per class plus
    noise) so that the recalls are neither 0 nor 100; labels: ~3.5 images per fine class over
    11,316 fine classes (as many as in SOP's standard test half; the paper's random 80,000/rest
    split spreads its test images over more, smaller classes), each in one of 12 super-classes;
  * every rank generates its own contiguous slice of rows, gathers rows and labels with
    fgdist.collectives.gather_rows (as fgdist.training.evaluation.evaluate does after embedding), then
    calls fgdist.training.evaluation.query_slice_sums on its query slice (the retrieval pass evaluate runs);
    the sums are added over ranks with fgdist.collectives.sum_over_ranks;
  * 1 rank (one spawned process, no process group) and 2 ranks (2 spawned processes, gloo).

Measured per rank: the wall time of query_slice_sums plus the sum over ranks (the table shows the
slowest rank), the CPU seconds of query_slice_sums (process time: on a shared machine the wall time also
counts the waits for a core, the CPU time only the work), the resident set after the embeddings
and labels are in place, and the peak resident set while query_slice_sums runs. The peak is the
kernel's VmHWM after resetting it through /proc/self/clear_refs just before the call (Linux);
where that is not allowed, a thread samples psutil's RSS every 2 ms instead (it can miss a
shorter peak). "extra" = that peak minus the resident set just before the call: the evaluation's
working memory beyond the embeddings. The table sets it beside one c x N fp32 similarity block
(c = min(query_chunk, retrieval_metrics.SUB_CHUNK) queries ranked at once, N rows) and beside the
estimate of fgdist.retrieval_metrics.retrieval_pass' docstring, c * (10 N + 50 depth) bytes (the
block, two masks and an int32 count of the top-depth selection, and the kept columns; depth = the
deepest R).

Exactness: the Recall@k hits are compared against a brute-force computation (float64 full similarity
matrix, rank of the best same-label neighbour, no top-k) on a subset of about 2,000 rows that
holds whole fine classes, at several chunk sizes and with the queries split over two slices;
and every full-size run (any rank count, any chunk) must report the same hit counts.

    python bench/eval_scale.py --out bench/results/eval_scale.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    RssPeak,
    hwm_bytes,
    max_rss_bytes,
    md_head,
    md_row,
    mib,
    reset_hwm,
    rss_bytes,
    run_meta,
)
from fgdist.collectives import barrier, gather_counts, gather_rows, sum_over_ranks  # noqa: E402
from fgdist.harness import free_port  # noqa: E402
from fgdist.retrieval_metrics import SUB_CHUNK  # noqa: E402
from fgdist.training.evaluation import query_slice_sums  # noqa: E402

KS = [1, 10, 100, 1000]
BLOCK = 4096  # rows are generated in global blocks, so the data does not depend on the rank count


# --------------------------------------------------------------------------- data
def make_labels(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(fine, super) for all n rows; every super-class holds at least one fine class."""
    g = torch.Generator().manual_seed(spec["seed"])
    fine_to_super = torch.randint(spec["super_classes"], (spec["fine_classes"],), generator=g)
    fine_to_super[: spec["super_classes"]] = torch.arange(spec["super_classes"])
    fine = torch.randint(spec["fine_classes"], (spec["n"],), generator=g)
    return fine, fine_to_super[fine]


def make_rows(spec: dict, begin: int, end: int, fine: torch.Tensor) -> torch.Tensor:
    """L2-normalized features of rows [begin, end): signal * centre[fine] + noise."""
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    centres = torch.randn(spec["fine_classes"], spec["dim"], generator=g)
    out = torch.empty(end - begin, spec["dim"])
    for b in range(begin // BLOCK, (end + BLOCK - 1) // BLOCK):
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, spec["n"])
        gb = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + 7919 * b + 2)
        block = spec["signal"] * centres[fine[lo:hi]] + torch.randn(hi - lo, spec["dim"], generator=gb)
        a, z = max(lo, begin), min(hi, end)
        out[a - begin : z - begin] = F.normalize(block[a - lo : z - lo], dim=1)
    return out


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


# --------------------------------------------------------------------------- one run, one rank
def _worker(rank: int, world: int, port: int, spec: dict, outdir: str) -> None:
    torch.set_num_threads(spec["threads"])
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    rss_start = rss_bytes()

    # This rank's slice of the test split (as if it had embedded it), then gathered to all ranks.
    counts_plan = split(spec["n"], world)
    begin = sum(counts_plan[:rank])
    fine_all, super_all = make_labels(spec)
    local = make_rows(spec, begin, begin + counts_plan[rank], fine_all)
    local_fine, local_super = (
        fine_all[begin : begin + counts_plan[rank]].clone(),
        super_all[begin : begin + counts_plan[rank]].clone(),
    )
    del fine_all, super_all
    counts = gather_counts(local.shape[0])
    embeddings = gather_rows(local, counts)
    labels = {"super": gather_rows(local_super, counts), "fine": gather_rows(local_fine, counts)}
    del local, local_fine, local_super
    gc.collect()

    # Queries: this rank's own rows, limited to its share of the first `queries` rows' count.
    q_rank = split(spec["queries"], world)[rank]
    barrier()
    rss_before = rss_bytes()
    hwm_reset = reset_hwm()
    with contextlib.nullcontext() if hwm_reset else RssPeak() as sampler:
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        sums = query_slice_sums(embeddings, labels, begin, begin + q_rank, KS, spec["chunk"])
        t_local, cpu = time.perf_counter() - t0, time.process_time() - c0
        totals = sum_over_ranks(torch.stack(list(sums.values())))
        t_total = time.perf_counter() - t0
    peak = hwm_bytes() if hwm_reset else sampler.peak
    record = {
        "rank": rank,
        "queries": q_rank,
        "rows": embeddings.shape[0],
        "seconds_recall": t_local,
        "seconds_with_reduce": t_total,
        "cpu_seconds": cpu,
        "load_before": load,
        "rss_start": rss_start,
        "rss_before": rss_before,
        "peak_during": peak,
        "peak_method": "VmHWM" if hwm_reset else "psutil-2ms",
        "ru_maxrss": max_rss_bytes(),
        "hits": {name: [int(h) for h in totals[i, : len(KS)]] for i, name in enumerate(sums)},
        "depth": depth(labels, embeddings.shape[0]),
    }
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        barrier()
        dist.destroy_process_group()


def run(world: int, spec: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        mp.spawn(_worker, args=(world, free_port(), spec, tmp), nprocs=world, join=True)
        wall = time.perf_counter() - started
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    for r in ranks:
        r["process_wall"] = wall
    return ranks


def depth(labels: dict[str, torch.Tensor], n: int) -> int:
    """The columns retrieval_pass keeps per query: the deepest R (a label's rows but the query),
    within the n - 1 other rows."""
    deepest = max(int(torch.bincount(y).max()) - 1 for y in labels.values())
    return min(deepest, n - 1)


# --------------------------------------------------------------------------- exactness
def brute_force_hits(emb: torch.Tensor, labels: dict[str, torch.Tensor], ks: list[int]) -> dict[str, list[int]]:
    """Float64, full matrix, no top-k: a query hits at k when fewer than k other rows are
    strictly more similar than its most similar same-label row."""
    sims = emb.double() @ emb.double().T
    n = sims.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    sims[eye] = float("-inf")
    out = {}
    for name, y in labels.items():
        same = (y[:, None] == y[None, :]) & ~eye
        best = torch.where(same, sims, torch.tensor(float("-inf"), dtype=sims.dtype)).max(dim=1).values
        rank = (sims > best[:, None]).sum(dim=1)
        has = same.any(dim=1)
        out[name] = [int((has & (rank < k)).sum()) for k in ks]
    return out


def exactness(spec: dict, rows: int) -> list[str]:
    fine, sup = make_labels(spec)
    # Whole fine classes: the rows of the lowest-numbered classes, about `rows` of them.
    order = torch.argsort(fine, stable=True)
    cut = int(fine[order[rows - 1]])
    idx = order[fine[order] <= cut]
    emb_all = make_rows(spec, 0, spec["n"], fine)
    emb, labels = emb_all[idx].contiguous(), {"super": sup[idx], "fine": fine[idx]}
    del emb_all
    ks = [k for k in KS if k < len(idx)]
    want = brute_force_hits(emb, labels, ks)
    lines, ok = [], True
    m = len(idx)
    for chunk in (7, 300, m):
        for parts in (1, 2):
            sizes = split(m, parts)
            got = {name: [0] * len(ks) for name in labels}
            b = 0
            for s in sizes:
                h = query_slice_sums(emb, labels, b, b + s, ks, chunk)
                for name in labels:
                    got[name] = [x + int(y) for x, y in zip(got[name], h[name][: len(ks)])]
                b += s
            same = got == want
            ok &= same
            lines.append(
                md_row([str(chunk), str(parts), str(got["super"]), str(got["fine"]), "equal" if same else "DIFFERENT"])
            )
    head = [
        f"Subset: {m} rows holding whole fine classes 0..{cut} ({len(torch.unique(labels['fine']))} fine classes, "
        f"{len(torch.unique(labels['super']))} super-classes), k = {ks}.",
        f"Brute force (float64, full matrix, no top-k): super hits {want['super']}, fine hits {want['fine']}.",
        "",
        *md_head(["query_chunk", "query slices", "super hits", "fine hits", "vs brute force"]),
    ]
    if not ok:
        print("EXACTNESS CHECK FAILED", file=sys.stderr)
    return head + lines + ["", f"Result: {'all equal to the brute force' if ok else 'MISMATCH'}."]


# --------------------------------------------------------------------------- report
def summarize(world: int, spec: dict, ranks: list[dict]) -> dict:
    n, d = spec["n"], spec["dim"]
    c = min(spec["chunk"], SUB_CHUNK, max(r["queries"] for r in ranks))  # queries sorted at once
    return {
        "ranks": world,
        "chunk": spec["chunk"],
        "queries": spec["queries"],
        "queries_per_rank": [r["queries"] for r in ranks],
        "seconds": max(r["seconds_with_reduce"] for r in ranks),
        "process_wall": ranks[0]["process_wall"],
        "cpu": [r["cpu_seconds"] for r in ranks],
        "load": ranks[0]["load_before"],
        "block": c * n * 4,
        "emb_bytes": n * d * 4 + 2 * n * 8,
        "rss_before": max(r["rss_before"] - r["rss_start"] for r in ranks),
        "extra": [r["peak_during"] - r["rss_before"] for r in ranks],
        "predicted": c * (10 * n + 50 * ranks[0]["depth"]),
        "ru_maxrss": [r["ru_maxrss"] for r in ranks],
        "hits": ranks[0]["hits"],
        "peak_method": ranks[0]["peak_method"],
    }


def table(rows: list[dict], n: int) -> list[str]:
    out = md_head(
        [
            *("ranks", "query_chunk", "queries (per rank)", "eval wall s (slowest rank)", "queries/s"),
            *(
                "CPU s per rank",
                "load avg at start",
                "embeddings+labels expected MiB",
                "RSS growth for them MiB (max rank)",
            ),
            *("extra peak during the pass MiB (per rank)", "one c x N block MiB", "ranking + kept columns MiB"),
            "peak RSS (ru_maxrss) MiB per rank",
        ]
    )
    for s in rows:
        per_rank = " + ".join(f"{q:,}" for q in s["queries_per_rank"])
        cells = [str(s["ranks"]), str(s["chunk"]), f"{s['queries']:,} ({per_rank})", f"{s['seconds']:.1f}"]
        cells += [f"{s['queries'] / s['seconds']:,.0f}", " / ".join(f"{x:.1f}" for x in s["cpu"]), f"{s['load']:.1f}"]
        cells += [mib(s["emb_bytes"]), mib(s["rss_before"]), " / ".join(mib(x) for x in s["extra"])]
        cells += [mib(s["block"]), mib(s["predicted"]), " / ".join(mib(x) for x in s["ru_maxrss"])]
        out.append(md_row(cells))
    return out


def notes(sweep: list[dict], scaling: list[dict]) -> list[str]:
    out = []
    ratios = [f"{x / s['block']:.2f}" for s in sweep for x in s["extra"]]
    if ratios:
        out.append(
            f"- Extra memory / one c x N block, every rank of every run above: {', '.join(ratios)}. retrieval_sums "
            "sorts c = min(query_chunk, SUB_CHUNK) queries at a time against all N rows: the fp32 block, its sorted "
            "copy and the int64 order make about 4 blocks, the kept depth columns the rest; query_chunk above "
            f"SUB_CHUNK ({SUB_CHUNK}) changes nothing."
        )
    if len(scaling) > 1:
        ex = [max(s["extra"]) for s in sorted(scaling, key=lambda s: s["queries"])]
        qs = [s["queries"] for s in sorted(scaling, key=lambda s: s["queries"])]
        cpu = [s["cpu"][0] / s["queries"] * 1000 for s in sorted(scaling, key=lambda s: s["queries"])]
        flat = max(ex) / min(ex) < 1.25
        out.append(
            f"- At a fixed chunk the extra memory for {', '.join(f'{q:,}' for q in qs)} queries is "
            f"{', '.join(mib(x) for x in ex)} MiB (max/min {max(ex) / min(ex):.2f}): "
            + (
                "flat, set by the chunk and the gallery size N, not by the number of queries. "
                if flat
                else "NOT flat. "
            )
            + f"CPU seconds per 1,000 queries: {', '.join(f'{x:.2f}' for x in cpu)}."
        )
    two = [s for s in sweep if s["ranks"] == 2]
    one = {s["chunk"]: s for s in sweep if s["ranks"] == 1}
    for s in two:
        if s["chunk"] in one:
            o = one[s["chunk"]]
            out.append(
                f"- chunk {s['chunk']}: CPU seconds per rank {' / '.join(f'{x:.1f}' for x in s['cpu'])} on 2 ranks "
                f"against {o['cpu'][0]:.1f} on 1 rank; wall {s['seconds']:.1f} s against {o['seconds']:.1f} s "
                f"(speed-up {o['seconds'] / s['seconds']:.2f}x)."
            )
    if two:
        out.append(
            "- With 2 ranks each rank ranks half the queries against all N rows; the wall time halves only when two "
            "cores are free for them (compare the load averages)."
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=40_053, help="test rows (SOP's test split: 40,053)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--fine-classes", type=int, default=11_316)
    p.add_argument("--super-classes", type=int, default=12)
    p.add_argument("--signal", type=float, default=0.4, help="centre weight against unit noise")
    p.add_argument("--chunks", default="256,1024,4096")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--scaling-chunk", type=int, default=1024)
    p.add_argument("--scaling-queries", default="10000,20000", help="besides all rows, at --scaling-chunk on 1 rank")
    p.add_argument("--check-rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench/results/eval_scale.md"))
    args = p.parse_args()
    base = {
        "n": args.n,
        "dim": args.dim,
        "fine_classes": args.fine_classes,
        "super_classes": args.super_classes,
        "signal": args.signal,
        "seed": args.seed,
        "threads": args.threads,
    }
    started = time.perf_counter()

    print("exactness check ...", flush=True)
    check = exactness(base, args.check_rows)
    print("\n".join(check[-1:]), flush=True)

    sweep = []
    for world in [int(x) for x in args.ranks.split(",")]:
        for chunk in [int(x) for x in args.chunks.split(",")]:
            spec = {**base, "chunk": chunk, "queries": args.n}
            s = summarize(world, spec, run(world, spec))
            sweep.append(s)
            extra = [mib(x) for x in s["extra"]]
            print(f"ranks {world} chunk {chunk}: {s['seconds']:.1f} s, extra {extra} MiB, hits {s['hits']}", flush=True)
    scaling = []
    for q in [int(x) for x in args.scaling_queries.split(",") if x]:
        spec = {**base, "chunk": args.scaling_chunk, "queries": q}
        s = summarize(1, spec, run(1, spec))
        scaling.append(s)
        extra = [mib(x) for x in s["extra"]]
        print(f"scaling: queries {q} chunk {args.scaling_chunk}: {s['seconds']:.1f} s, extra {extra} MiB", flush=True)
    scaling += [s for s in sweep if s["ranks"] == 1 and s["chunk"] == args.scaling_chunk]
    total = time.perf_counter() - started

    hits = {json.dumps(s["hits"]) for s in sweep}
    full = sweep[0]["hits"] if sweep else {}
    n = args.n
    recall = {name: [f"{100 * h / n:.2f}" for h in v] for name, v in full.items()}
    meta = run_meta("bench/eval_scale.py", "bench/common.py", "fgdist")
    load_at_end = ", ".join(f"{x:.1f}" for x in meta["loadavg"])
    lines = [
        "# Distributed chunked evaluation at SOP scale (CPU)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- Machine: 2-core x86_64 CPU, no GPU, shared with other jobs (load average at the end: {load_at_end}); "
        f"{platform.platform()}, Python {meta['python']}, torch {meta['torch']}",
        f"- Date: {meta['date']}",
        f"- Git commit: {meta['commit']}"
        + (" (with uncommitted changes to the benchmark or fgdist)" if meta["dirty"] else ""),
        f"- Data: {n:,} rows x {args.dim}-d fp32, L2-normalized, {args.fine_classes:,} fine classes in "
        f"{args.super_classes} super-classes (random labels, features clustered by fine class, signal {args.signal}); "
        f"every row a query against the rest; Recall@{KS}",
        f"- {args.threads} torch thread(s) per rank; each configuration in fresh spawned processes (gloo for 2 ranks); "
        "code under test: `fgdist.training.evaluation.query_slice_sums` (evaluation's one retrieval pass) after "
        "`fgdist.collectives.gather_rows`",
        f"- Peak memory method: {sweep[0]['peak_method'] if sweep else '-'} (see the script's docstring); total "
        f"benchmark time {total:.0f} s",
        "",
        "## Exactness",
        "",
        *check,
        "",
        f"Full size: the {len(sweep)} runs below (1 and 2 ranks, every chunk) report "
        f"{'identical' if len(hits) == 1 else 'DIFFERENT'} hit counts: super R@{KS} = {recall.get('super')} %, fine "
        f"R@{KS} = {recall.get('fine')} %.",
        "",
        "## Chunk size and rank count (all queries)",
        "",
        '"embeddings+labels expected" is N x d x 4 bytes plus two int64 label vectors; "RSS growth for them" is the '
        "resident set just before the pass minus the one at process start (it includes the data generation's "
        'leftovers and the gather\'s buffers); "extra peak" is the peak during the pass minus the resident set just '
        'before it; "one c x N block" is c x N x 4 bytes with c = min(query_chunk, SUB_CHUNK, queries); "ranking '
        '+ kept columns" is c x (10 N + 50 depth) bytes, depth = the deepest R. "CPU s" is the process time of the '
        "pass: on this shared machine the wall time also counts the waits for a core.",
        "",
        *table(sweep, n),
        "",
        f"## Number of queries at a fixed chunk ({args.scaling_chunk}), 1 rank, all {n:,} rows as the gallery",
        "",
        *table(sorted(scaling, key=lambda s: s["queries"]), n),
        "",
        "## Reading the numbers",
        "",
        *notes(sweep, scaling),
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out} ({total:.0f} s)")


if __name__ == "__main__":
    main()
