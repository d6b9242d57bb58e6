"""MAP@R, R-precision and Recall@k against a float64 brute force (with ties, broken by the lower
row), MAP@R and R-precision against pytorch-metric-learning where it is installed."""

import pytest
import torch
import torch.nn.functional as F

from fgdist.retrieval_metrics import ranked, retrieval_sums, similarities, to_metrics
from fgdist.training.evaluation import query_slice_sums


def brute_force(q, q_labels, g, g_labels, ks, exclude_self):
    """Python loops, float64, ties broken by the lower gallery row."""
    q, g = q.double(), g.double()
    recall = [0] * len(ks)
    map_sum = rp_sum = scored = 0.0
    for i in range(len(q)):
        rows = [j for j in range(len(g)) if not (exclude_self and j == i)]
        order = sorted(rows, key=lambda j: (-float(q[i] @ g[j]), j))
        rel = [int(g_labels[j]) == int(q_labels[i]) for j in order]
        for n, k in enumerate(ks):
            recall[n] += any(rel[:k])
        r = sum(rel)
        if r == 0:
            continue
        scored += 1
        rp_sum += sum(rel[:r]) / r
        map_sum += sum(sum(rel[: p + 1]) / (p + 1) for p in range(r) if rel[p]) / r
    out = {f"y_recall_at_{k}": 100.0 * recall[n] / len(q) for n, k in enumerate(ks)}
    out.update(y_map_at_r=100.0 * map_sum / scored, y_r_precision=100.0 * rp_sum / scored)
    return out


def tied_data(n, seed):
    """Small integer vectors: inner products are exact in float32, and many of them are equal."""
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randint(-1, 2, (n, 4), generator=gen).float()
    labels = torch.randint(0, 6, (n,), generator=gen)
    labels[-1] = 99  # a label held by one item only: R = 0, left out of MAP@R
    return vectors, labels


def test_ranking_to_a_depth_equals_the_full_stable_sort_on_ties():
    """`ranked` selects the top `depth` without sorting the rest: the same rows in the same order
    as the first columns of the full stable sort, ties (many: small integer vectors) by the lower
    row, at every depth, with each query's own row at -inf, and with a NaN similarity."""
    x, _ = tied_data(57, seed=4)
    sims = similarities(x, x, torch.arange(57))
    assert len(torch.unique(sims)) < 20  # mostly ties
    full = torch.sort(sims, dim=1, descending=True, stable=True).indices
    for depth in range(58):
        assert torch.equal(ranked(sims, depth), full[:, :depth]), depth
    sims[3, 5] = float("nan")
    full = torch.sort(sims, dim=1, descending=True, stable=True).indices
    assert torch.equal(ranked(sims, 9), full[:, :9])


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_same_set_protocol_equals_brute_force_with_ties(chunk):
    x, y = tied_data(57, seed=1)
    ks = [1, 2, 4, 8]
    got = to_metrics(retrieval_sums(x, {"y": y}, x, {"y": y}, ks, chunk, self_offset=0), ks)
    want = brute_force(x, y, x, y, ks, exclude_self=True)
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < want["y_map_at_r"] < want["y_r_precision"] < 100  # the data exercise the metrics


def test_query_set_against_a_different_gallery_equals_brute_force():
    q, qy = tied_data(23, seed=2)
    g, gy = tied_data(41, seed=3)
    ks = [1, 5]
    got = to_metrics(retrieval_sums(q, {"y": qy}, g, {"y": gy}, ks, chunk=5), ks)
    assert got == pytest.approx(brute_force(q, qy, g, gy, ks, exclude_self=False), abs=1e-9)


def test_a_query_slice_with_offset_equals_the_whole():
    """Evaluation's use: each rank scores rows [begin, end) of the gathered embeddings."""
    x, y = tied_data(40, seed=4)
    whole = retrieval_sums(x, {"y": y}, x, {"y": y}, [1], 8, self_offset=0)["y"]
    parts = sum(
        retrieval_sums(x[b:e], {"y": y[b:e]}, x, {"y": y}, [1], 8, self_offset=b)["y"] for b, e in [(0, 13), (13, 40)]
    )
    assert torch.equal(whole, parts)
    assert torch.equal(whole, sum(query_slice_sums(x, {"y": y}, b, e, [1], 8)["y"] for b, e in [(0, 13), (13, 40)]))


def test_labels_sharing_one_sort_equal_each_label_alone():
    """One sort serves every label (its depth set by the deepest R of all): each label's sums are
    those it gets alone."""
    x, y = tied_data(45, seed=7)
    coarse = y % 2  # large R: deeper than the fine label needs
    ks = [1, 3, 60]  # 60 > 44 other rows
    both = retrieval_sums(x, {"y": y, "c": coarse}, x, {"y": y, "c": coarse}, ks, 6, self_offset=0)
    for name, labels in (("y", y), ("c", coarse)):
        alone = retrieval_sums(x, {name: labels}, x, {name: labels}, ks, 6, self_offset=0)[name]
        assert torch.equal(both[name], alone)


def test_equals_pytorch_metric_learning():
    calc_module = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    gen = torch.Generator().manual_seed(6)
    centers = torch.randn(8, 32, generator=gen)
    y = torch.randint(0, 8, (300,), generator=gen)
    x = F.normalize(centers[y] + 1.5 * torch.randn(300, 32, generator=gen), dim=1)  # no ties
    calc = calc_module.AccuracyCalculator(include=("mean_average_precision_at_r", "r_precision"), k="max_bin_count")
    theirs = calc.get_accuracy(x, y, x, y, ref_includes_query=True)
    ours = to_metrics(retrieval_sums(x, {"y": y}, x, {"y": y}, [1], 64, self_offset=0), [1])
    assert ours["y_map_at_r"] == pytest.approx(100 * theirs["mean_average_precision_at_r"], abs=1e-4)
    assert ours["y_r_precision"] == pytest.approx(100 * theirs["r_precision"], abs=1e-4)
    assert 10 < ours["y_map_at_r"] < 90


def test_compare_shows_map_at_r_and_r_precision_beside_recall():
    from fgdist.report.comparison import RunInfo, column_title, comparison_table

    metrics = {"fine_recall_at_1": 50.0, "fine_map_at_r": 20.0, "fine_r_precision": 30.0}
    run = RunInfo("a" * 32, "r", "FINISHED", "base", "syn", "-", metrics, 0)
    columns, rows = comparison_table([run])
    assert columns[-3:] == ["fine_recall_at_1", "fine_map_at_r", "fine_r_precision"]
    assert rows[0][-2:] == [20.0, 30.0]
    assert [column_title(c) for c in columns[-2:]] == ["fine MAP@R", "fine R-prec"]
