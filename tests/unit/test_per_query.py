"""Per-query results: evaluate() writes one row per test query whose values reproduce the run's
metrics exactly, with first ranks equal to a brute force (ties by the lower row, at any depth)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from fgdist.data.shardset import sample_key
from fgdist.training import per_query
from fgdist.training.evaluation import evaluate

KS = [1, 2, 4, 8]


class Features(nn.Module):
    """The images are the features."""

    def forward(self, images):
        return {"features": images.flatten(1)}


def tied_rows(n, seed):
    """Vectors of +-1 (all of norm 2, so the cosine similarities are exact multiples of 1/4 in
    float32 and many are equal), a fine label nested in a super label, one fine label held by a
    single row (R = 0), and instance ids in no particular order."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (n, 4), generator=gen).float() * 2 - 1
    fine = torch.randint(0, 9, (n,), generator=gen)
    fine[-1] = 20
    return x, fine, fine // 3, torch.randperm(n, generator=gen)


def brute_first_rank(x, labels, i):
    """1-based position of the first row with query i's label among the other rows sorted by
    cosine similarity, descending, ties by the lower row; 0 when none."""
    others = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-float(x[i].double() @ x[j].double()), j))
    return next((p + 1 for p, j in enumerate(others) if labels[j] == labels[i]), 0)


@pytest.fixture
def evaluated(tmp_path):
    n = 41
    x, fine, sup, ids = tied_rows(n, seed=5)
    parts = [slice(0, 9), slice(9, 30), slice(30, n)]
    batches = [{"images": x[p], "super": sup[p], "fine": fine[p], "instance": ids[p]} for p in parts]
    path = tmp_path / per_query.FILE
    metrics = evaluate(
        Features(), batches, "cpu", torch.float32, KS, chunk=4, has_super_head=False, per_query_file=path, test_set="T"
    )
    return metrics, per_query.read(path), (x, fine, sup, ids)


def test_per_query_values_reproduce_the_metrics_exactly(evaluated):
    metrics, table, _ = evaluated
    for label in ("super", "fine"):
        for k in KS:  # counts: exactly equal
            name = f"{label}_recall_at_{k}"
            assert table.metric_values(name).mean() == metrics[name], name
        for name in (f"{label}_map_at_r", f"{label}_r_precision"):
            values = table.metric_values(name)
            # The same float64 values, summed in another order: equal to the last bits.
            assert values[~np.isnan(values)].mean() == pytest.approx(metrics[name], rel=1e-12)
    assert 0 < metrics["fine_recall_at_1"] < metrics["fine_recall_at_8"] < 100  # the data exercise the ranks


def test_rows_by_key_with_brute_force_first_ranks_and_null_where_r_is_zero(evaluated):
    _, table, (x, fine, sup, ids) = evaluated
    n = len(x)
    assert list(table.keys) == [sample_key(i) for i in range(n)]  # sorted by instance id, whatever the row order
    row_of = {int(i): r for r, i in enumerate(ids)}
    for key_index in range(n):
        row = row_of[key_index]
        assert table.columns["fine_id"][key_index] == fine[row] and table.columns["super_id"][key_index] == sup[row]
        for label, y in (("super", sup), ("fine", fine)):
            assert table.columns[f"{label}_first_rank"][key_index] == brute_first_rank(x, y, row), (label, row)
    # Some first ranks lie beyond the deepest R of both labels (the columns the sort keeps, where
    # first ranks are read off): counted from the similarities there, and exact too.
    kept = max(int(torch.bincount(y).max()) - 1 for y in (sup, fine))
    assert table.columns["fine_first_rank"].max() > kept
    single = int(ids[-1])  # the key of the last row, whose fine label no other row has
    assert table.columns["fine_first_rank"][single] == 0
    assert np.isnan(table.columns["fine_ap_at_r"][single])
    assert table.test_set == "T"
    written = pq.read_table(table.where)
    assert written.column("fine_ap_at_r").null_count == 1  # null in the file, not NaN


def test_metric_values_name_what_is_missing(tmp_path, evaluated):
    _, table, _ = evaluated
    with pytest.raises(per_query.PerQueryError, match="no per-query values for metric 'super_top1'"):
        table.metric_values("super_top1")
    # Data without fine labels: super columns alone, fine_id -1.
    x, _, sup, ids = tied_rows(12, seed=6)
    batch = {"images": x, "super": sup, "fine": torch.full((12,), -1), "instance": ids}
    path = tmp_path / "no_fine.parquet"
    evaluate(Features(), [batch], "cpu", torch.float32, KS, 4, has_super_head=False, per_query_file=path)
    no_fine = per_query.read(path)
    assert (no_fine.columns["fine_id"] == -1).all() and "fine_first_rank" not in no_fine.columns
    with pytest.raises(per_query.PerQueryError, match="no_fine.parquet: no column fine_first_rank"):
        no_fine.metric_values("fine_recall_at_1")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(per_query.PerQueryError, match="bad.parquet: not a readable per-query table"):
        per_query.read(bad)
