"""fgdist-compare --baseline / --group-by over a real local MLflow store whose runs carry
per_query.parquet artifacts: the differences and their intervals are the paired bootstrap's over
the runs' queries, gap closed is measured against the fine run, groups show mean +- standard
error over seeds, and runs evaluated on another test set are refused before anything is written."""

import csv

import mlflow
import numpy as np
import pytest

from fgdist.report.bootstrap import paired_difference
from fgdist.report.comparison import main
from fgdist.training import per_query

N = 400  # test queries
METRICS = ("fine_recall_at_1", "fine_recall_at_4", "fine_map_at_r")
# name -> (objective, seed, probability that a query's first neighbour has its fine label)
RUNS = {
    "base-s0": ("base", 0, 0.30),
    "base-s1": ("base", 1, 0.33),
    "eff-s0": ("base_indi_eff", 0, 0.45),
    "eff-s1": ("base_indi_eff", 1, 0.40),
    "fine-s0": ("fine", 0, 0.80),
}


def fake_table(seed: int, p_first: float, n: int = N, test_set: str = "test-A"):
    """A per-query table shaped like evaluation's: first ranks, AP@R in 0..1, and the same 20
    queries without another image of their label (rank 0, AP@R null) in every run."""
    rng = np.random.default_rng(seed)
    ranks = np.where(rng.random(n) < p_first, 1, rng.integers(2, 12, n))
    ap = np.clip(1.2 / ranks - 0.1 * rng.random(n), 0, 1)
    ranks[:20], ap[:20] = 0, np.nan
    values = {
        "super": {"first_rank": np.ones(n, dtype=np.int64), "ap_at_r": np.ones(n), "r_precision": np.ones(n)},
        "fine": {"first_rank": ranks.astype(np.int64), "ap_at_r": ap, "r_precision": ap.copy()},
    }
    labels = {"super": np.arange(n) % 4, "fine": np.arange(n) % 16}
    return per_query.table(np.arange(n), labels, values, test_set)


def log_run(folder, name, objective, seed, table=None):
    """A finished run as the trainer logs it: params, the final metrics (the per-query means) and,
    when given, the per-query table as the artifact per_query.parquet."""
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_params({"objective.name": objective, "seed": str(seed), "data.shards": "data/synthetic"})
        if table is None:
            mlflow.log_metrics({m: 10.0 for m in METRICS})
            return run.info.run_id
        (folder / name).mkdir()
        path = per_query.write(folder / name / per_query.FILE, table)
        mlflow.log_metrics({m: float(np.nanmean(per_query.read(path).metric_values(m))) for m in METRICS})
        mlflow.log_artifact(str(path))
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment `paired`: the runs above and one without a per-query table; `mismatched`: a run
    on another test split; `mismatched-keys`: a run on fewer queries."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    tables, ids = {}, {}
    try:
        mlflow.set_experiment("paired")
        for i, (name, (objective, seed, p)) in enumerate(RUNS.items()):
            tables[name] = fake_table(i, p)
            ids[name] = log_run(root, name, objective, seed, tables[name])
        ids["old"] = log_run(root, "old", "base_indi", 0)
        mlflow.set_experiment("mismatched")
        log_run(root, "m-base", "base", 0, fake_table(10, 0.3))
        log_run(root, "m-other-split", "base_indi_eff", 0, fake_table(11, 0.4, test_set="test-B"))
        mlflow.set_experiment("mismatched-keys")
        log_run(root, "k-base", "base", 0, fake_table(12, 0.3))
        log_run(root, "k-smaller", "base_indi_eff", 0, fake_table(13, 0.4, n=N - 8))
    finally:
        mlflow.set_tracking_uri(previous)
    return uri, ids, {name: per_query.from_table(t, name) for name, t in tables.items()}


def read_csv(path):
    """{first cell: row} of a CSV the command wrote."""
    with open(path, newline="") as f:
        return {row[next(iter(row))]: row for row in csv.DictReader(f)}


def compare(uri, out, *args):
    return main(["--experiment", "paired", "--tracking-uri", uri, "--out", str(out), *args])


def values(table, metric):
    return table.metric_values(metric)


def test_baseline_differences_are_the_paired_bootstrap_over_the_queries(store, tmp_path, capsys):
    uri, ids, tables = store
    assert compare(uri, tmp_path, "--baseline", "base-s0") == 0
    out = capsys.readouterr().out
    assert "fine R@1 - base" in out and "gap closed (fine R@1)" in out
    assert "95% paired bootstrap interval over its 400 test queries" in out
    assert "No per_query.parquet artifact, so no difference: old." in out
    rows = read_csv(tmp_path / "differences.csv")
    assert set(rows) == set(RUNS) - {"base-s0"} | {"old"}
    base = tables["base-s0"]
    r1 = {name: np.nanmean(values(t, "fine_recall_at_1")) for name, t in tables.items()}
    for name in set(RUNS) - {"base-s0"}:
        for m in METRICS:
            d = paired_difference(values(tables[name], m), values(base, m))
            got = [float(rows[name][f"{m}_minus_base{s}"]) for s in ("", "_low", "_high")]
            assert got == [d.value, d.low, d.high], (name, m)
        want_gap = (r1[name] - r1["base-s0"]) / (r1["fine-s0"] - r1["base-s0"])
        assert float(rows[name]["gap_closed"]) == pytest.approx(want_gap, rel=1e-12)
    assert float(rows["fine-s0"]["gap_closed"]) == pytest.approx(1.0)
    assert rows["old"]["fine_recall_at_1_minus_base"] == "" and rows["old"]["gap_closed"] != ""
    eff = [float(rows["eff-s0"][f"fine_recall_at_1_minus_base{s}"]) for s in ("_low", "", "_high")]
    assert 0 < eff[0] < eff[1] < eff[2]  # the data give a difference that clears noise
    # By id, the same table.
    assert compare(uri, tmp_path / "by_id", "--baseline", ids["base-s0"]) == 0
    assert read_csv(tmp_path / "by_id" / "differences.csv") == rows


def test_group_by_gives_mean_and_standard_error_over_seeds_and_pooled_differences(store, tmp_path, capsys):
    uri, _, tables = store
    assert compare(uri, tmp_path, "--group-by", "objective.name", "--baseline", "base-s1") == 0
    assert "mean ± standard error over each group's runs" in capsys.readouterr().out
    rows = read_csv(tmp_path / "groups.csv")
    assert list(rows) == ["base", "fine", "base_indi", "base_indi_eff"]  # the paper's order
    assert (rows["base"]["runs"], rows["base"]["seeds"]) == ("2", "0, 1")
    for m in METRICS:
        per_run = [np.nanmean(values(tables[n], m)) for n in ("eff-s0", "eff-s1")]
        assert float(rows["base_indi_eff"][f"{m}_mean"]) == pytest.approx(np.mean(per_run), rel=1e-12)
        assert float(rows["base_indi_eff"][f"{m}_se"]) == pytest.approx(np.std(per_run, ddof=1) / np.sqrt(2))
        # Per-query values averaged over each group's seeds, then paired.
        ours = (values(tables["eff-s0"], m) + values(tables["eff-s1"], m)) / 2
        theirs = (values(tables["base-s0"], m) + values(tables["base-s1"], m)) / 2
        d = paired_difference(ours, theirs)
        got = [float(rows["base_indi_eff"][f"{m}_minus_base{s}"]) for s in ("", "_low", "_high")]
        assert got == pytest.approx([d.value, d.low, d.high], rel=1e-12)
        assert rows["base"][f"{m}_minus_base"] == "" and rows["base_indi"][f"{m}_minus_base"] == ""
    assert rows["fine"]["fine_recall_at_1_se"] == ""  # one run: no standard error
    assert float(rows["fine"]["gap_closed"]) == pytest.approx(1.0)
    assert compare(uri, tmp_path / "plain", "--group-by", "seed") == 0  # no baseline: means alone
    plain = read_csv(tmp_path / "plain" / "groups.csv")
    assert list(plain) == ["0", "1"] and plain["0"]["runs"] == "4"
    assert not any(c.endswith("_minus_base") for c in plain["0"])
    # Several params name a recipe: one group per combination, the baseline's combination the base.
    assert compare(uri, tmp_path / "two", "--group-by", "objective.name,seed", "--baseline", "base-s1") == 0
    two = read_csv(tmp_path / "two" / "groups.csv")
    assert list(two)[:2] == ["base, 0", "base, 1"] and {v["runs"] for v in two.values()} == {"1"}
    assert two["base, 1"]["fine_recall_at_1_minus_base"] == ""
    d = paired_difference(values(tables["eff-s0"], METRICS[0]), values(tables["base-s1"], METRICS[0]))
    assert float(two["base_indi_eff, 0"]["fine_recall_at_1_minus_base"]) == pytest.approx(d.value, rel=1e-12)


@pytest.mark.parametrize(
    "experiment, why",
    [
        ("mismatched", "test split fingerprints"),
        ("mismatched-keys", f"{N - 8} and {N} queries, e.g. key 0000000392 in one only"),
    ],
)
def test_compare_refuses_runs_evaluated_on_another_test_set(store, tmp_path, capsys, experiment, why):
    uri, _, _ = store
    base = {"mismatched": "m-base", "mismatched-keys": "k-base"}[experiment]
    args = ["--experiment", experiment, "--tracking-uri", uri, "--out", str(tmp_path / "out"), "--baseline", base]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "TestSetMismatchError" in err and f"and baseline {base} were not evaluated on the same test set" in err
    assert why in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_baseline_must_exist_and_have_a_per_query_table(store, tmp_path, capsys):
    uri, ids, _ = store
    assert compare(uri, tmp_path, "--baseline", "nobody") == 2
    assert "--baseline nobody: no such run among those compared" in capsys.readouterr().err
    assert compare(uri, tmp_path, "--baseline", "old") == 2
    assert f"run {ids['old']} has no per_query.parquet artifact" in capsys.readouterr().err
