"""`fgdist-compare --baseline RUN` and `--group-by KEY`: differences with their uncertainty.

--baseline: each run's difference to the baseline run on PAIRED_METRICS, in points, with a 95%
paired bootstrap interval over the test queries both were evaluated on (`fgdist.report.bootstrap`; the
runs' `per_query.parquet` artifacts, `fgdist.training.per_query`). Runs evaluated on another test set than
the baseline's are refused (TestSetMismatchError). Where a run of the `fine` objective (the upper
bound) is among those compared, "gap closed" = (run - baseline) / (fine - baseline) on GAP_METRIC,
fine being the mean over the fine runs.

--group-by KEY (a run param such as objective.name or objective.lambda_I_schedule, or several
joined by commas, e.g. objective.name,num_unlabeled: a recipe named by more than one param): one row per
value of KEY with the mean +- standard error of PAIRED_METRICS over the group's runs (seeds);
with --baseline, each group's difference to the baseline's group, the per-query values averaged
over each group's runs first (runs on the same test set, so the queries stay paired).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fgdist.report.bootstrap import RESAMPLES, Difference, mean_and_standard_error, paired_difference
from fgdist.report.comparison import (
    ComparisonError,
    RunInfo,
    column_title,
    run_labels,
    sort_runs,
    to_markdown,
    write_csv,
)
from fgdist.training import per_query

PAIRED_METRICS = ("fine_recall_at_1", "fine_recall_at_4", "fine_map_at_r")
GAP_METRIC = "fine_recall_at_1"
GAP_COLUMN = "gap_closed"
FINE_OBJECTIVE = "fine"
SEED = 0  # the resampling's: the same runs always give the same intervals
NOT_LOGGED = "(not logged)"


class TestSetMismatchError(ComparisonError):
    """Two runs to pair were not evaluated on the same test set."""

    __test__ = False  # a class named Test*: not a pytest test class


@dataclass(frozen=True)
class MeanSE:
    """Mean +- standard error over a group's runs (se None for one run)."""

    mean: float
    se: float | None

    def __str__(self) -> str:
        return f"{self.mean:.2f}" if self.se is None else f"{self.mean:.2f} ± {self.se:.2f}"


# -- reading the per-query tables --------------------------------------------------------------
def fetch_per_query(client, run: RunInfo) -> per_query.PerQuery | None:
    """The run's per_query.parquet artifact, or None when it has none (a run evaluated before
    fgdist wrote them, or one that has not finished)."""
    if per_query.FILE not in {f.path for f in client.list_artifacts(run.run_id)}:
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run would bury the tables
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.run_id, per_query.FILE, tmp)
        return per_query.read(path, where=f"run {run.run_id} ({run.name}) artifact {per_query.FILE}")


def check_same_test_set(label: str, table: per_query.PerQuery, base_label: str, base: per_query.PerQuery) -> None:
    """Refuse to pair two runs' queries unless they were evaluated on the same test set: the same
    split fingerprint where both recorded one, and the same query keys."""
    if table.test_set and base.test_set and table.test_set != base.test_set:
        why = f"test split fingerprints {table.test_set[:12]} and {base.test_set[:12]}"
    elif not np.array_equal(table.keys, base.keys):
        only = sorted(set(table.keys) ^ set(base.keys))
        why = f"{len(table.keys)} and {len(base.keys)} queries" + (f", e.g. key {only[0]} in one only" if only else "")
    else:
        return
    raise TestSetMismatchError(f"{label} and {base_label} were not evaluated on the same test set ({why})")


def find_run(runs: list[RunInfo], ref: str) -> RunInfo:
    """The run whose id is `ref`, else the one run named `ref`."""
    by_id = [r for r in runs if r.run_id == ref]
    if by_id:
        return by_id[0]
    named = [r for r in runs if r.name == ref]
    if len(named) == 1:
        return named[0]
    if named:
        raise ComparisonError(
            f"--baseline {ref}: {len(named)} runs have that name; give one of their ids: "
            + ", ".join(r.run_id for r in named)
        )
    raise ComparisonError(f"--baseline {ref}: no such run among those compared ({', '.join(r.name for r in runs)})")


def paired_tables(client, runs: list[RunInfo], baseline: RunInfo) -> dict[str, per_query.PerQuery]:
    """Run id -> its per-query table, every one checked against the baseline's test set; runs
    without a table are left out (the caller says so). The baseline must have one."""
    labels = run_labels(runs)
    tables = {r.run_id: t for r in runs if (t := fetch_per_query(client, r)) is not None}
    if baseline.run_id not in tables:
        raise ComparisonError(
            f"--baseline {labels[baseline.run_id]}: run {baseline.run_id} has no {per_query.FILE} artifact (evaluated "
            "before fgdist wrote per-query results?); pick a baseline that has one"
        )
    base = tables[baseline.run_id]
    for run_id, table in tables.items():
        check_same_test_set(f"run {labels[run_id]}", table, f"baseline {labels[baseline.run_id]}", base)
    return tables


# -- the tables --------------------------------------------------------------------------------
def difference_title(metric: str) -> str:
    return f"{column_title(metric)} - base"


def fine_upper_bound(runs: list[RunInfo]) -> float | None:
    """GAP_METRIC of the fine objective, averaged over its runs; None without one."""
    values = [r.metrics[GAP_METRIC] for r in runs if r.objective == FINE_OBJECTIVE and GAP_METRIC in r.metrics]
    return float(np.mean(values)) if values else None


def gap_closed(value: float | None, base: float | None, fine: float | None) -> float | None:
    if value is None or base is None or fine is None or fine == base:
        return None
    return (value - base) / (fine - base)


def pooled_values(tables: list[per_query.PerQuery], metric: str) -> np.ndarray:
    """Per-query values of `metric` averaged over runs on one test set (NaN where no query counts)."""
    stacked = np.stack([t.metric_values(metric) for t in tables])
    return stacked.mean(axis=0)  # NaN (R = 0) sits at the same queries in every run


def differences(
    runs: list[RunInfo], tables: dict[str, per_query.PerQuery], baseline: RunInfo
) -> tuple[list[str], list[list]]:
    """One row per run but the baseline: run, objective, each PAIRED_METRICS difference (a
    Difference, or None without a per-query table) and, where a fine run is compared, gap closed."""
    fine = fine_upper_bound(runs)
    base = tables[baseline.run_id]
    labels = run_labels(runs)
    columns = ["run", "objective", *(f"{m}_minus_base" for m in PAIRED_METRICS)]
    columns += [GAP_COLUMN] if fine is not None else []
    rows = []
    for r in sort_runs([r for r in runs if r.run_id != baseline.run_id]):
        table = tables.get(r.run_id)
        cells = [
            None if table is None else paired_difference(table.metric_values(m), base.metric_values(m), RESAMPLES, SEED)
            for m in PAIRED_METRICS
        ]
        rows.append([labels[r.run_id], r.objective, *cells])
        if fine is not None:
            rows[-1].append(gap_closed(r.metrics.get(GAP_METRIC), baseline.metrics.get(GAP_METRIC), fine))
    return columns, rows


def param_value(run: RunInfo, key: str) -> str:
    """The run's value of param `key`; of several params ("A,B"), their values joined by ", "."""
    return ", ".join(run.params.get(k, NOT_LOGGED) for k in key.split(","))


def groups(
    runs: list[RunInfo], key: str, tables: dict[str, per_query.PerQuery] | None = None, baseline: RunInfo | None = None
) -> tuple[list[str], list[list]]:
    """One row per value of param `key`, in the order of the runs' table: the value, the number of
    runs, their seeds, the mean +- standard error of each PAIRED_METRICS; with a baseline, each
    group's pooled difference to the baseline's group (None for the baseline's group and where a
    run lacks its per-query table) and, where a fine run is compared, gap closed (on the means)."""
    members: dict[str, list[RunInfo]] = {}
    for r in sort_runs(runs):
        members.setdefault(param_value(r, key), []).append(r)
    fine = fine_upper_bound(runs)
    columns = [key, "runs", "seeds", *PAIRED_METRICS]
    if baseline is not None:
        columns += [f"{m}_minus_base" for m in PAIRED_METRICS] + ([GAP_COLUMN] if fine is not None else [])
        base_group = members[param_value(baseline, key)]
        base_mean = group_mean(base_group, GAP_METRIC)
    rows = []
    for value, group in members.items():
        seeds = ", ".join(sorted({r.params.get("seed", "?") for r in group}, key=lambda s: (len(s), s)))
        rows.append([value, len(group), seeds, *(mean_se([r.metrics.get(m) for r in group]) for m in PAIRED_METRICS)])
        if baseline is None:
            continue
        pairable = group is not base_group and all(r.run_id in tables for r in group + base_group)
        rows[-1] += [pooled_difference(group, base_group, tables, m) if pairable else None for m in PAIRED_METRICS]
        if fine is not None:
            ours = group_mean(group, GAP_METRIC) if group is not base_group else None
            rows[-1].append(gap_closed(ours, base_mean, fine))
    return columns, rows


def pooled_difference(group: list[RunInfo], base_group: list[RunInfo], tables, metric: str) -> Difference:
    ours = pooled_values([tables[r.run_id] for r in group], metric)
    theirs = pooled_values([tables[r.run_id] for r in base_group], metric)
    return paired_difference(ours, theirs, RESAMPLES, SEED)


def mean_se(values: list[float | None]) -> MeanSE | None:
    """Over the runs that logged the metric; None when none did."""
    present = [v for v in values if v is not None]
    return MeanSE(*mean_and_standard_error(present)) if present else None


def group_mean(group: list[RunInfo], metric: str) -> float | None:
    stats = mean_se([r.metrics.get(metric) for r in group])
    return None if stats is None else stats.mean


# -- output ------------------------------------------------------------------------------------
def title(column: str) -> str:
    if column.endswith("_minus_base"):
        return difference_title(column[: -len("_minus_base")])
    if column == GAP_COLUMN:
        return f"gap closed ({column_title(GAP_METRIC)})"
    return column_title(column)


def flat(columns: list[str], rows: list[list]) -> tuple[list[str], list[list]]:
    """The table with numbers only, for CSV: a Difference as value, low, high; a MeanSE as mean, se."""
    parts = {Difference: ("", "_low", "_high"), MeanSE: ("_mean", "_se")}
    kinds = [next((type(row[i]) for row in rows if type(row[i]) in parts), None) for i in range(len(columns))]
    out_columns = [c + suffix for c, kind in zip(columns, kinds) for suffix in parts.get(kind, ("",))]
    out_rows = []
    for row in rows:
        cells = []
        for v, kind in zip(row, kinds):
            if kind is None:
                cells.append(v)
            elif v is None:
                cells += [None] * len(parts[kind])
            else:
                cells += [v.value, v.low, v.high] if kind is Difference else [v.mean, v.se]
        out_rows.append(cells)
    return out_columns, out_rows


def caption(baseline: RunInfo | None, tables: dict, key: str | None, missing: list[str]) -> str:
    lines = []
    if key:
        lines.append(f"Grouped by param `{key}`: mean ± standard error over each group's runs.")
    if baseline is not None:
        n = len(tables[baseline.run_id].keys)
        against = f"the group of `{baseline.name}` ({key} = {param_value(baseline, key)})" if key else None
        lines.append(
            f"Differences to {against or f'`{baseline.name}`'} in points: 95% paired bootstrap interval over its "
            f"{n:,} test queries ({RESAMPLES:,} resamples, seed {SEED})"
            + ("; per-query values averaged over each group's runs first" if key else "")
            + ". An interval that holds 0 is within noise."
        )
    if missing:
        lines.append(f"No {per_query.FILE} artifact, so no difference: {', '.join(missing)}.")
    return "\n" + "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Report:
    """The differences (per run) or the groups table, rendered: `stem`.md holds `text`, `stem`.csv
    the numbers."""

    stem: str
    text: str
    columns: list[str]
    rows: list[list]

    def write(self, out: Path) -> list[Path]:
        (out / f"{self.stem}.md").write_text(self.text)
        write_csv(out / f"{self.stem}.csv", *flat(self.columns, self.rows))
        return [out / f"{self.stem}.md", out / f"{self.stem}.csv"]


def build_report(client, runs: list[RunInfo], baseline_ref: str | None, key: str | None) -> Report:
    """Raises ComparisonError (TestSetMismatchError among them) before anything is written."""
    baseline = find_run(runs, baseline_ref) if baseline_ref else None
    tables = paired_tables(client, runs, baseline) if baseline else {}
    labels = run_labels(runs)
    missing = [labels[r.run_id] for r in runs if baseline and r.run_id not in tables]
    if key:
        columns, rows = groups(runs, key, tables, baseline)
        stem, meta = "groups", 3
    else:
        columns, rows = differences(runs, tables, baseline)
        stem, meta = "differences", 2
    text = to_markdown(columns, rows, meta, title) + caption(baseline, tables, key, missing)
    return Report(stem, text, columns, rows)
