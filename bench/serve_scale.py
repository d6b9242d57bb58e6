"""fgdist-serve under load: queries/s and p50/p99 latency of real HTTP searches (POST /search
with a PNG, k = 10) from a few concurrent client threads on 127.0.0.1, per index type, with the
served neighbours' recall@10 against the first index (Flat) and the server's resident memory.

    PYTHONPATH=. python bench/serve_scale.py [--n 1000000] [--d 128] [--embeddings emb/test] \
        [--index flat --index 'ivfpq --nlist 1024 --m 16 --nprobe 16'] [--clients 1 4 16] \
        [--requests 300] [--out bench/results/serve_scale.md]

Without --embeddings the catalogue is N x d clustered random vectors (bench/search_scale.py's
mixture) and the queries are embedded by a random ResNet-18 of width d/8 at 32 px, exported as
fgdist-export writes it: what a request costs (decode, preprocess, one forward, one index search,
JSON) is real, the neighbours are not meaningful. With --embeddings (an fgdist-embed output) the
index is built over it and its own model embeds the queries. Each --index is an fgdist-index
`--type` followed by that command's flags; the index folders are built with fgdist-index itself
and served with fgdist-serve itself, in a scratch folder removed at the end. Every level sends a
bounded number of requests and stops.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import ROOT, md_head, md_row, run_meta, write_report  # noqa: E402
from bench.search_scale import clustered  # noqa: E402
from fgdist.harness import ServerNotReadyError, free_port, wait_for_http  # noqa: E402

K, QUERY_IMAGES = 10, 50


# -- the catalogue ------------------------------------------------------------------------------
def random_model(out: Path, d: int) -> Path:
    """An export of a random ResNet-18 whose embeddings have d dimensions (width d/8, 32 px)."""
    import torch

    from fgdist.config import RunConfig
    from fgdist.retrieval.export import embedder_from, export_model
    from fgdist.training.model import EmbeddingNet

    if d % 8:
        raise SystemExit(f"--d {d}: the random model's dimension is 8 x its width; pick a multiple of 8")
    cfg = RunConfig.model_validate({"model": {"width": d // 8}, "data": {"image_size": 32, "shards": str(out)}})
    torch.manual_seed(0)
    model = EmbeddingNet(cfg.model, 2, None).eval()
    return export_model(embedder_from(model, cfg.model, cfg.data, "backbone"), out)


def synthetic_embeddings(out: Path, n: int, d: int, model: Path) -> Path:
    """An fgdist-embed-format folder holding n clustered random d-dim vectors, unlabelled."""
    import pyarrow.parquet as pq

    from fgdist.embeddings_io import FORMAT, META, to_table
    from fgdist.output_folder import atomic_folder

    vectors = clustered(n, d, 1000, seed=0)
    unknown = np.full(n, -1)
    table = to_table([f"{i:08d}" for i in range(n)], np.arange(n), unknown, unknown, vectors)
    meta = {"format": FORMAT, "count": n, "dim": d, "dtype": "float32", "model": str(model), "images": None}
    with atomic_folder(out, overwrite=False) as partial:
        pq.write_table(table, partial / "part-00000.parquet")
        (partial / META).write_text(json.dumps(meta, indent=1))
    return out


def build_index(embeddings: Path, out: Path, spec: str) -> float:
    """fgdist-index --type SPEC... into `out`; its wall seconds."""
    from fgdist.retrieval.search import index_main

    started = time.perf_counter()
    if index_main(["--embeddings", str(embeddings), "--out", str(out), "--type", *shlex.split(spec)]) != 0:
        raise SystemExit(f"fgdist-index --type {spec} failed")
    return time.perf_counter() - started


def query_pngs(count: int, size: int = 32) -> list[bytes]:
    gen = np.random.default_rng(1)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(gen.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


# -- the server and its clients -------------------------------------------------------------------
class Served:
    """fgdist-serve over one index folder, on a free port, for the duration of a `with`."""

    def __init__(self, index: Path, log: Path, k_max: int):
        self.index, self.log, self.k_max = index, log, k_max

    def __enter__(self):
        port = free_port()
        cmd = [sys.executable, "-m", "fgdist.retrieval.serve", "--index", str(self.index), "--port", str(port)]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--k-max", str(self.k_max)],
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(self.url + "/health", self.proc, self.log, timeout_s=600)
        except ServerNotReadyError:
            self.__exit__()
            raise
        return self

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def searched(self) -> tuple[int, int]:
        """(batches, queries) the server has searched so far."""
        health = requests.get(self.url + "/health", timeout=30).json()
        return health["batches"], health["queries"]

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def search(session: requests.Session, url: str, png: bytes) -> tuple[float, list[str] | None]:
    """(seconds, neighbour keys or None on an error answer) of one POST /search."""
    started = time.perf_counter()
    answer = session.post(f"{url}/search?k={K}", files={"image": ("q.png", png, "image/png")}, timeout=120)
    seconds = time.perf_counter() - started
    return seconds, [n["key"] for n in answer.json()["neighbours"]] if answer.status_code == 200 else None


def neighbours_of(url: str, pngs: list[bytes]) -> list[list[str] | None]:
    """Each query's neighbour keys, one request at a time (also warms the server up)."""
    with requests.Session() as session:
        return [search(session, url, png)[1] for png in pngs]


def load(url: str, pngs: list[bytes], clients: int, total: int) -> dict:
    """`total` requests from `clients` threads, each with its own keep-alive connection."""
    latencies, errors, lock = [], [0], threading.Lock()
    shares = [range(c, total, clients) for c in range(clients)]

    def client(share):
        with requests.Session() as session:
            for i in share:
                seconds, keys = search(session, url, pngs[i % len(pngs)])
                with lock:
                    latencies.append(seconds)
                    errors[0] += keys is None

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, shares))
    wall = time.perf_counter() - started
    ms = 1000 * np.asarray(latencies)
    return {"qps": total / wall, "p50": np.percentile(ms, 50), "p99": np.percentile(ms, 99), "errors": errors[0]}


def recall(found: list, truth: list) -> float:
    pairs = [(f, t) for f, t in zip(found, truth) if f and t]
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in pairs])) if pairs else float("nan")


# -- the report ---------------------------------------------------------------------------------------
def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    memory = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB memory, {platform.system()} {platform.release()}"


def header(args, meta: dict, catalogue: str) -> list[str]:
    load_avg = ", ".join(f"{x:.1f}" for x in meta["loadavg"])
    return [
        "# fgdist-serve under load",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; commit {meta['commit']}{' (uncommitted changes)' if meta['dirty'] else ''}",
        f"- machine: {machine()}; load average at the start {load_avg}" + (f"; {args.note}" if args.note else ""),
        f"- catalogue: {catalogue}; {QUERY_IMAGES} distinct 32-px PNG queries, k = {K}",
        f"- each level: {args.requests} requests from the given number of client threads (keep-alive), "
        "server and clients on this machine; latency is the client's, request sent to JSON read",
        "",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic catalogue rows")
    p.add_argument("--d", type=int, default=128, help="synthetic catalogue dimension (a multiple of 8)")
    p.add_argument("--embeddings", help="an fgdist-embed output to serve instead of synthetic vectors")
    p.add_argument("--index", action="append", help="fgdist-index --type and flags (repeatable; first = truth)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=300, help="requests per level")
    p.add_argument("--note", default="", help="a word on the machine's state (shared, idle)")
    p.add_argument("--out", default="bench/results/serve_scale.md")
    args = p.parse_args()
    specs = args.index or ["flat", "ivfpq --nlist 1024 --m 16 --nbits 8 --nprobe 16"]
    meta = run_meta("fgdist", "bench")
    pngs = query_pngs(QUERY_IMAGES)
    with tempfile.TemporaryDirectory(prefix="serve_scale-") as scratch:
        work = Path(scratch)
        if args.embeddings:
            embeddings, catalogue = Path(args.embeddings), f"`{args.embeddings}`"
        else:
            model = random_model(work / "model", args.d)
            embeddings = synthetic_embeddings(work / "embeddings", args.n, args.d, model)
            catalogue = f"{args.n:,} x {args.d} clustered random vectors, a random ResNet-18 of width {args.d // 8}"
        lines = header(args, meta, catalogue)
        columns = ["index", "build s", "server RSS MiB", "clients", "q/s", "p50 ms", "p99 ms", "mean batch", "errors"]
        lines += md_head([*columns, f"recall@{K} vs {specs[0]}"])
        print("\n".join(lines), flush=True)
        truth = None
        for number, spec in enumerate(specs):
            folder = work / f"index{number}"
            build_s = build_index(embeddings, folder, spec)
            with Served(folder, work / f"serve{number}.log", K) as server:
                found = neighbours_of(server.url, pngs)
                truth = truth or found
                for clients in args.clients:
                    before = server.searched()
                    r = load(server.url, pngs, clients, args.requests)
                    batches, queries = (after - b for after, b in zip(server.searched(), before))
                    cells = [spec, f"{build_s:.1f}", f"{server.rss() / 2**20:,.0f}", str(clients), f"{r['qps']:.1f}"]
                    cells += [
                        f"{r['p50']:.1f}",
                        f"{r['p99']:.1f}",
                        f"{queries / max(batches, 1):.1f}",
                        str(r["errors"]),
                    ]
                    cells.append(f"{recall(found, truth):.3f}")
                    lines.append(md_row(cells))
                    print(lines[-1], flush=True)
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
