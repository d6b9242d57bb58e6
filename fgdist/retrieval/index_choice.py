"""Which faiss index to build and how widely to search it (`fgdist-index --type auto`, the default).

As autofaiss does, the choice starts from budgets rather than from faiss factory strings:

1. **Flat** (exact) when it fits `--memory-budget` and one query against it is estimated to take at
   most `--latency-budget-ms` (default 10 ms). The estimate times Flat queries over a slice of the
   vectors on this machine and scales it by N: on 2 CPU cores that keeps Flat up to about 100,000
   vectors of 128 dimensions (1M x 128 takes about 100 ms a query). The estimate is the fastest of
   20 timed queries, so that a busy machine does not flip the choice.
2. Otherwise the most accurate approximate index that fits the memory budget, from this ladder:
   **IVF-SQfp16** (IVF lists of the vectors in float16, 2d bytes each: the default approximate
   index), IVF-SQ8 (d bytes), then IVF-PQ with d/2, d/4 and d/8 bytes of code. Nothing fitting is
   a `NoIndexFitsError` naming the budget and the smallest footprint. Measured on a trained run's
   Fashion-MNIST embeddings (bench/results/search_scale.md), recall@10 against Flat tops out at
   0.999 for IVF-SQfp16, 0.85 for IVF-SQ8 and 0.62 for IVF-PQ with d/2 bytes, whatever nprobe:
   a rung below the first can miss the target recall, and fgdist-index then says so. IVF-Flat
   (4d bytes) is not on the ladder: it reaches IVF-SQfp16's recall at twice the memory. HNSW is
   not either: it needs more memory than Flat and builds several times slower than IVF on CPUs;
   `--type ivfflat` and `--type hnsw` build them.

Then the search breadth (IVF's `nprobe`, HNSW's `efSearch`) is the smallest power of two whose
recall@10 against exact search reaches `--target-recall` (default 0.95), measured on 200 of the
indexed vectors used as queries, each query's own row left out of both answers; where the codes
cap the recall below the target, the breadth at which doubling stops gaining recall. The index folder's
`index.json` records the choice, the reason, the estimates and the measured recall.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import asdict, dataclass

import numpy as np

KINDS = ("flat", "ivfflat", "ivffp16", "ivfsq8", "ivfpq", "hnsw")
TUNE_QUERIES = 200
PLATEAU = 0.001  # a doubling of the breadth that gains less recall than this ends the tuning
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20}
_UNITS |= {"G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}


class NoIndexFitsError(ValueError):
    """No index kind fits the memory budget."""


def _faiss():
    """faiss, or an ImportError that says how to install it (search.py uses this one too)."""
    try:
        import faiss
    except ImportError:
        raise ImportError("fgdist's index and search need faiss: pip install 'fgdist[search]'") from None
    return faiss


def parse_size(text: str) -> int:
    """Bytes in "2GB", "512MiB", "1.5G" or "1000000"; decimal units are powers of 1000."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not found or found.group(2).upper() not in _UNITS:
        raise ValueError(f"memory budget {text!r}: expected a size such as 2GB, 512MB or 1.5GiB")
    return int(float(found.group(1)) * _UNITS[found.group(2).upper()])


def size_arg(text: str) -> int:
    """parse_size for argparse, which then prints the message under the flag's name."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def default_nlist(n: int) -> int:
    """IVF lists: the power of two nearest sqrt(N), with at least 39 training vectors per list
    (faiss's own lower bound) and at least one list."""
    nlist = 2 ** round(np.log2(max(n, 1)) / 2)
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


@dataclass(frozen=True)
class IndexSpec:
    """One faiss index structure; `nlist` and `m` are 0 where the kind has none."""

    kind: str
    nlist: int = 0
    m: int = 0
    nbits: int = 8
    hnsw_m: int = 32

    @property
    def factory(self) -> str:
        return {
            "flat": "Flat",
            "ivfflat": f"IVF{self.nlist},Flat",
            "ivffp16": f"IVF{self.nlist},SQfp16",
            "ivfsq8": f"IVF{self.nlist},SQ8",
            # np: no polysemous training, which only polysemous search (not used here) needs and which
            # doubled the build (20,000 x 64, PQ16x8 on the shared 2-core machine: 197 s against 100 s)
            "ivfpq": f"IVF{self.nlist},PQ{self.m}x{self.nbits}np",
            "hnsw": f"HNSW{self.hnsw_m},Flat",
        }[self.kind]

    def memory_bytes(self, n: int, d: int) -> int:
        """The index's size in memory (and on disk): codes, 8-byte ids for IVF, centroids and
        codebooks; HNSW's graph holds about 2 * hnsw_m 4-byte links a vector on its lowest level."""
        centroids = 4 * self.nlist * d
        per_vector = {
            "flat": 4 * d,
            "ivfflat": 4 * d + 8,
            "ivffp16": 2 * d + 8,
            "ivfsq8": d + 8,
            "ivfpq": -(-self.m * self.nbits // 8) + 8,
            "hnsw": 4 * d + 4 * 2 * self.hnsw_m + 16,
        }[self.kind]
        codebook = 4 * d * 2**self.nbits if self.kind == "ivfpq" else 8 * d if self.kind == "ivfsq8" else 0
        return n * per_vector + centroids + codebook

    def check(self, d: int, training: int) -> None:
        """A named error for a structure that `training` vectors of dimension d cannot train."""
        if self.kind == "ivfpq" and d % self.m:
            raise ValueError(f"IVF-PQ: the dimension {d} is not a multiple of m={self.m} (--m)")
        if training < self.nlist:
            raise ValueError(
                f"{self.factory}: {training} training vectors cannot train nlist={self.nlist} lists; "
                "lower --nlist (or raise --train-size)"
            )


def spec_for(kind: str, n: int, d: int, nlist=None, m=None, nbits: int = 8, hnsw_m: int = 32) -> IndexSpec:
    """The structure of an explicit `--type`, with the defaults filled in from N and d."""
    if kind not in KINDS:
        raise ValueError(f"index type {kind!r}: expected one of {', '.join(('auto',) + KINDS)}")
    ivf = kind.startswith("ivf")
    return IndexSpec(
        kind,
        nlist=(nlist or default_nlist(n)) if ivf else 0,
        m=(m or max(1, d // 8)) if kind == "ivfpq" else 0,
        nbits=nbits,
        hnsw_m=hnsw_m,
    )


def approximate_ladder(n: int, d: int, nlist=None) -> list[IndexSpec]:
    """The approximate indexes `auto` considers, most accurate (and largest) first."""
    nlist = nlist or default_nlist(n)
    rungs = [IndexSpec("ivffp16", nlist), IndexSpec("ivfsq8", nlist)]
    for m in (d // 2, d // 4, d // 8):
        if m >= 1 and d % m == 0 and IndexSpec("ivfpq", nlist, m) not in rungs:
            rungs.append(IndexSpec("ivfpq", nlist, m))
    return rungs


@dataclass(frozen=True)
class Choice:
    spec: IndexSpec
    reason: str
    estimated_bytes: int


def _mb(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


def choose(n: int, d: int, memory_budget=None, latency_budget_ms: float = 10.0, flat_ms=None, nlist=None) -> Choice:
    """The `auto` rule (module docstring); `flat_ms` is the estimated time of one Flat query
    (estimate_flat_ms), None when unknown (then Flat is chosen on memory alone)."""
    flat = IndexSpec("flat")
    flat_bytes = flat.memory_bytes(n, d)
    budget = f"the {_mb(memory_budget)} budget" if memory_budget else "no memory budget"
    fits = memory_budget is None or flat_bytes <= memory_budget
    fast = flat_ms is None or flat_ms <= latency_budget_ms
    if fits and fast:
        timing = "" if flat_ms is None else f", est. {flat_ms:.2f} ms a query <= {latency_budget_ms:g} ms"
        return Choice(flat, f"Flat (exact): {_mb(flat_bytes)} within {budget}{timing}", flat_bytes)
    why = f"Flat needs {_mb(flat_bytes)}" if not fits else f"Flat est. {flat_ms:.1f} ms > {latency_budget_ms:g} ms"
    ladder = approximate_ladder(n, d, nlist)
    for spec in ladder:
        size = spec.memory_bytes(n, d)
        if memory_budget is None or size <= memory_budget:
            return Choice(
                spec, f"{spec.factory}: {why}; the most accurate that fits: {_mb(size)} within {budget}", size
            )
    smallest = ladder[-1]
    raise NoIndexFitsError(
        f"no index of {n:,} x {d} fits the memory budget {_mb(memory_budget)} (--memory-budget): the smallest, "
        f"{smallest.factory}, needs {_mb(smallest.memory_bytes(n, d))}"
    )


def estimate_flat_ms(vectors: np.ndarray, slice_rows: int = 50_000, queries: int = 20) -> float:
    """The fastest of `queries` timed Flat queries over the first `slice_rows` vectors, scaled to
    all of them (a Flat scan is linear in N). The fastest, not the median, so that other work on a
    shared machine does not flip the choice from one build to the next."""
    faiss = _faiss()
    part = np.ascontiguousarray(vectors[:slice_rows], dtype=np.float32)
    flat = faiss.IndexFlatIP(part.shape[1])
    flat.add(part)
    times = []
    for q in part[:: max(1, len(part) // queries)][:queries]:
        started = time.perf_counter()
        flat.search(q[None], 10)
        times.append(time.perf_counter() - started)
    if not times:  # an empty embeddings set: nothing to scan
        return 0.0
    return min(times) * 1000 * len(vectors) / len(part)


def build_spec(spec: IndexSpec, vectors: np.ndarray, train_size=None):
    """A faiss inner-product index of `spec` holding `vectors` (N x d float32) in row order,
    trained on `train_size` rows drawn evenly (all rows when None)."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    sample = vectors[:: len(vectors) // train_size] if train_size and train_size < len(vectors) else vectors
    spec.check(vectors.shape[1], len(sample))
    index = faiss.index_factory(vectors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(sample)
    index.add(vectors)
    return index


def set_breadth(index, breadth: int) -> None:
    """IVF's nprobe or HNSW's efSearch; Flat has neither."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = breadth
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = breadth


def breadths(index) -> list[int]:
    """The nprobe (IVF) or efSearch (HNSW) values tuning tries, narrowest first; none for Flat."""
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return sorted({min(2**i, ivf.nlist) for i in range(int(np.log2(ivf.nlist)) + 2)})
    if isinstance(index, faiss.IndexHNSW):
        return [16, 32, 64, 128, 256, 512, 1024]
    return []


def recall_without_self(index, vectors: np.ndarray, rows: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Recall@k of `index` against `truth` (exact top k+1), the queries being `vectors[rows]`;
    each query's own row is left out of both lists, as a new image would not find itself."""
    _, found = index.search(vectors[rows], k + 1)
    hits = [len(set(_drop(f, r, k)) & set(_drop(t, r, k))) for f, t, r in zip(found, truth, rows)]
    return float(np.mean(hits)) / k


def _drop(row_ids: np.ndarray, own: int, k: int) -> list[int]:
    return [int(i) for i in row_ids if i != own][:k]


def tune(index, vectors: np.ndarray, target_recall: float, k: int = 10, seed: int = 0) -> dict:
    """The narrowest breadth whose recall@k (recall_without_self, on TUNE_QUERIES seeded rows)
    reaches target_recall; short of it, the breadth where doubling stops paying (PLATEAU) or the
    widest. With every trial's recall."""
    faiss = _faiss()
    tries = breadths(index)
    if not tries:
        return {"nprobe": None, "recall_at_10": 1.0, "tried": []}
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.random.default_rng(seed).choice(len(vectors), min(TUNE_QUERIES, len(vectors)), replace=False)
    _, truth = faiss.knn(vectors[rows], vectors, k + 1, faiss.METRIC_INNER_PRODUCT)
    tried = []
    for breadth in tries:
        set_breadth(index, breadth)
        tried.append([breadth, recall_without_self(index, vectors, rows, truth, k)])
        if tried[-1][1] >= target_recall:
            break
        if len(tried) > 1 and tried[-1][1] - tried[-2][1] < PLATEAU:
            # the codes, not the breadth, limit the recall: searching wider only costs time
            return {"nprobe": tried[-2][0], "recall_at_10": tried[-2][1], "tried": tried}
    return {"nprobe": tried[-1][0], "recall_at_10": tried[-1][1], "tried": tried}


def query_ms(index, vectors: np.ndarray, queries: int = 20) -> float:
    """Median time of one single-vector query at the index's current settings."""
    times = []
    for q in vectors[:: max(1, len(vectors) // queries)][:queries]:
        started = time.perf_counter()
        index.search(np.ascontiguousarray(q[None], dtype=np.float32), 10)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000 if times else 0.0


def make_index(
    vectors: np.ndarray,
    kind: str = "auto",
    memory_budget=None,
    latency_budget_ms: float = 10.0,
    target_recall: float = 0.95,
    nprobe=None,
    train_size=None,
    **structure,
) -> tuple[object, dict]:
    """Choose (kind 'auto') or take the structure, build it, and set its search breadth (`nprobe`
    when given, else tuned to target_recall). Returns the index and what index.json records."""
    n, d = vectors.shape
    if not 0 < target_recall <= 1:
        raise ValueError(f"--target-recall {target_recall}: a recall@10 in (0, 1]")
    if kind == "auto":
        flat_ms = estimate_flat_ms(vectors)
        choice = choose(n, d, memory_budget, latency_budget_ms, flat_ms, structure.get("nlist"))
        spec, reason, flat_estimate = choice.spec, choice.reason, flat_ms
    else:
        spec, reason, flat_estimate = spec_for(kind, n, d, **structure), f"--type {kind}", None
    started = time.perf_counter()
    index = build_spec(spec, vectors, train_size)
    record = {"build_seconds": time.perf_counter() - started}
    if nprobe:
        set_breadth(index, nprobe)
        record |= {"nprobe": nprobe if breadths(index) else None, "tuning": "given (--nprobe)"}
    else:
        tuned = tune(index, vectors, target_recall)
        set_breadth(index, tuned["nprobe"] or 0)
        record |= {"nprobe": tuned["nprobe"], "tuning": tuned}
    record |= {
        "type": spec.kind,
        "factory": spec.factory,
        "structure": asdict(spec),
        "choice": {
            "asked": kind,
            "reason": reason,
            "memory_budget_bytes": memory_budget,
            "latency_budget_ms": latency_budget_ms,
            "target_recall": target_recall,
            "flat_ms_estimate": flat_estimate,
            "estimated_bytes": spec.memory_bytes(n, d),
            "query_ms": query_ms(index, vectors),
        },
    }
    return index, record


def describe_choice(meta: dict) -> str:
    """index.json's choice in two or three lines, as fgdist-index prints it."""
    choice, tuning = meta["choice"], meta["tuning"]
    lines = [f"index: {meta['factory']} ({choice['reason']}), est. {_mb(choice['estimated_bytes'])}"]
    if isinstance(tuning, dict) and tuning["tried"]:
        tried = ", ".join(f"{b}: {r:.3f}" for b, r in tuning["tried"])
        lines.append(f"search breadth {meta['nprobe']}: recall@10 vs exact by breadth {tried}")
        if tuning["recall_at_10"] < choice["target_recall"]:
            lines.append(
                f"warning: target recall {choice['target_recall']} not reached ({tuning['recall_at_10']:.3f} at "
                f"breadth {meta['nprobe']}; wider gains nothing): give a larger --memory-budget or another --type"
            )
    lines.append(f"one query: {choice['query_ms']:.2f} ms (median of 20)")
    return "\n".join(lines)
