"""fgdist.retrieval.index_choice: the auto rule under memory and latency budgets, the memory estimates, the
default approximate index's recall against Flat, and what fgdist-index records in index.json."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from fgdist.embeddings_io import FORMAT, META, to_table
from fgdist.retrieval.index_choice import (
    PLATEAU,
    IndexSpec,
    NoIndexFitsError,
    choose,
    make_index,
    parse_size,
    set_breadth,
    spec_for,
)
from fgdist.retrieval.search import index_main, open_index

faiss = pytest.importorskip("faiss")


def clustered(n: int, d: int, clusters: int, noise: float, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres: neighbours cross IVF cells at this noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(index, queries, truth) -> float:
    _, found = index.search(queries, 10)
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))


def test_sizes_parse_and_bad_ones_are_named():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5g") == 1_500_000_000 and parse_size("1000") == 1000
    for bad in ("lots", "2XB", "-1GB", ""):
        with pytest.raises(ValueError, match="expected a size such as 2GB"):
            parse_size(bad)


def test_auto_takes_flat_while_it_is_fast_and_fits():
    chosen = choose(10_000, 128, flat_ms=1.0)
    assert chosen.spec.kind == "flat" and "Flat (exact)" in chosen.reason
    assert choose(10_000, 128, memory_budget=parse_size("10MB"), flat_ms=1.0).spec.kind == "flat"


def test_auto_takes_the_most_accurate_approximate_index_that_fits():
    n, d = 1_000_000, 128
    slow = choose(n, d, flat_ms=100.0)  # no memory budget: the first rung
    assert slow.spec == IndexSpec("ivffp16", 1024) and "Flat est. 100.0 ms > 10 ms" in slow.reason
    # Flat is fast enough but needs 488 MiB: each budget gets the largest rung within it
    for budget, kind, m in [("400MB", "ivffp16", 0), ("200MB", "ivfsq8", 0), ("100MB", "ivfpq", 64)]:
        chosen = choose(n, d, memory_budget=parse_size(budget), flat_ms=1.0)
        assert (chosen.spec.kind, chosen.spec.m) == (kind, m), budget
        assert chosen.estimated_bytes <= parse_size(budget) and "Flat needs 488.3 MiB" in chosen.reason
    assert choose(n, d, memory_budget=parse_size("30MB"), flat_ms=1.0).spec == IndexSpec("ivfpq", 1024, 16)


def test_a_budget_nothing_fits_is_named():
    with pytest.raises(NoIndexFitsError, match=r"--memory-budget.*IVF1024,PQ16x8np, needs 23\.5 MiB"):
        choose(1_000_000, 128, memory_budget=parse_size("20MB"), flat_ms=1.0)


@pytest.mark.parametrize("kind", ["flat", "ivfflat", "ivffp16", "ivfsq8", "ivfpq", "hnsw"])
def test_memory_estimates_match_the_built_index(kind):
    """What --memory-budget is compared with is within 2% of the serialized index (PQ with 4-bit
    codes: they train in a fraction of the time of 8-bit ones)."""
    x = clustered(4000, 32, 20, 1.0)
    structure = {"nbits": 4} if kind == "ivfpq" else {}
    spec = spec_for(kind, *x.shape, **structure)
    index, _ = make_index(x, kind, nprobe=1, **structure)
    assert spec.memory_bytes(*x.shape) == pytest.approx(len(faiss.serialize_index(index)), rel=0.02)


def test_the_default_approximate_index_reaches_recall_0_9_against_flat():
    """On 20,000 x 64 clustered vectors whose neighbours cross IVF cells, the index auto builds
    once Flat is too slow answers 1,000 new queries with recall@10 >= 0.9; the same index at
    nprobe 1 does not, so the breadth tuning is what gets it there."""
    data = clustered(21_000, 64, 50, 1.5)
    vectors, queries = data[:20_000], data[20_000:]
    _, truth = faiss.knn(queries, vectors, 10, faiss.METRIC_INNER_PRODUCT)
    index, record = make_index(vectors, "auto", latency_budget_ms=0.0)
    assert record["factory"] == "IVF128,SQfp16" and record["tuning"]["recall_at_10"] >= 0.95
    assert recall_at_10(index, queries, truth) >= 0.9
    set_breadth(index, 1)
    assert recall_at_10(index, queries, truth) < 0.9


def write_embeddings(path, vectors):
    path.mkdir()
    n = len(vectors)
    table = to_table([f"k{i}" for i in range(n)], np.arange(n), np.zeros(n), -np.ones(n), vectors)
    pq.write_table(table, path / "part-00000.parquet")
    (path / META).write_text(json.dumps({"format": FORMAT, "count": n, "dim": vectors.shape[1]}))
    return path


def test_fgdist_index_records_its_choice(tmp_path, capsys):
    emb = write_embeddings(tmp_path / "emb", clustered(5000, 32, 20, 1.0))
    assert index_main(["--embeddings", str(emb), "--out", str(tmp_path / "exact")]) == 0
    meta = json.loads((tmp_path / "exact" / "index.json").read_text())
    assert meta["type"] == "flat" and meta["choice"]["asked"] == "auto" and meta["nprobe"] is None
    assert meta["choice"]["reason"].startswith("Flat (exact)") and meta["choice"]["flat_ms_estimate"] < 10
    assert "index: Flat (Flat (exact)" in capsys.readouterr().out

    args = ["--embeddings", str(emb), "--out", str(tmp_path / "ivf"), "--latency-budget-ms", "0"]
    assert index_main(args) == 0
    meta = json.loads((tmp_path / "ivf" / "index.json").read_text())
    assert meta["factory"] == "IVF64,SQfp16" and "Flat est." in meta["choice"]["reason"]
    assert meta["tuning"]["recall_at_10"] >= 0.95 and meta["tuning"]["tried"][-1][0] == meta["nprobe"]
    out = capsys.readouterr().out
    assert f"search breadth {meta['nprobe']}: recall@10 vs exact" in out
    assert faiss.extract_index_ivf(open_index(tmp_path / "ivf").index).nprobe == meta["nprobe"]

    # 4 bytes of PQ code cap the recall far below the target: the tuning stops where doubling
    # nprobe stops gaining, short of scanning every list, and says the target was missed
    args = ["--embeddings", str(emb), "--out", str(tmp_path / "pq"), "--type", "ivfpq", "--m", "8", "--nbits", "4"]
    assert index_main(args) == 0
    meta = json.loads((tmp_path / "pq" / "index.json").read_text())
    (_, before), (_, last) = meta["tuning"]["tried"][-2:]
    assert meta["tuning"]["recall_at_10"] < 0.9 and meta["nprobe"] < 64 and last - before < PLATEAU
    assert "warning: target recall 0.95 not reached" in capsys.readouterr().out

    args = ["--embeddings", str(emb), "--out", str(tmp_path / "given"), "--type", "ivfsq8", "--nprobe", "3"]
    assert index_main(args) == 0
    meta = json.loads((tmp_path / "given" / "index.json").read_text())
    assert (meta["type"], meta["nprobe"], meta["tuning"]) == ("ivfsq8", 3, "given (--nprobe)")


def test_fgdist_index_refuses_a_budget_nothing_fits(tmp_path, capsys):
    emb = write_embeddings(tmp_path / "emb", clustered(3000, 32, 20, 1.0))
    args = ["--embeddings", str(emb), "--out", str(tmp_path / "index"), "--memory-budget", "10KB"]
    assert index_main(args) == 2
    assert "NoIndexFitsError" in capsys.readouterr().err and not (tmp_path / "index").exists()
    with pytest.raises(SystemExit):
        index_main([*args[:4], "--memory-budget", "lots"])
    assert "--memory-budget: memory budget 'lots'" in capsys.readouterr().err
    assert index_main([*args[:4], "--target-recall", "95"]) == 2
    assert "--target-recall 95.0: a recall@10 in (0, 1]" in capsys.readouterr().err
    assert index_main([*args[:4], "--type", "ivfflat", "--nlist", "5000"]) == 2
    assert "3000 training vectors cannot train nlist=5000 lists; lower --nlist" in capsys.readouterr().err
