"""Compare the runs of an MLflow experiment: the paper-style table and plots.

    python -m fgdist.report.comparison --experiment synthetic [--runs ID ...] [--tracking-uri URI]
        [--out DIR] [--curves] [--baseline RUN] [--group-by KEY]

Prints a Markdown table (one row per run: run name, objective, data set, lambda_I; then super
top-1/top-5 and super/fine Recall@k for every k any run logged, each the run's latest value; then,
where a run logged its instance CE and its chance level, "instance CE leaves chance (epoch)") and
writes into --out:
  comparison.md, comparison.csv   the table
  recall_at_k.png                 R@k against k, one colour per run, fine solid, super dashed
  training_curves.png             (--curves) loss parts, learning rates, images/s against step
  instance_ce.png                 (--curves) instance CE against epoch, one colour per run, its
                                  chance level dotted, a star where it leaves chance

"instance CE leaves chance (epoch)": the first epoch whose mean logged instance_ce is below the
run's chance level (param instance_ce_chance: the mean of ln n over the training images, n the
columns a row's softmax runs over) by more than LEAVE_CHANCE_MARGIN of it; "from start" when the
first logged value is already below that (head.init=features starts there), "never" when no epoch
is. The trainer logs the fractional epoch beside each step's metrics (metric `epoch`).

--baseline RUN (a run id or name) adds each run's difference to it on fine R@1, R@4 and MAP@R with
a 95% paired bootstrap interval over the test queries (differences.md, differences.csv); runs
evaluated on another test set are refused. --group-by KEY (a param: objective.name, a recipe key;
several joined by commas) shows the mean +- standard error over each group's runs (seeds) instead,
and with --baseline the
groups' differences (groups.md, groups.csv). Where a `fine` run is compared: "gap closed" =
(run - baseline) / (fine - baseline) on fine R@1. See fgdist.report.differences.
"""

from __future__ import annotations

import csv
import math
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from fgdist import cli
from fgdist.objective_table import OBJECTIVE_NAMES, OBJECTIVES
from fgdist.report.figures import new_figure
from fgdist.retrieval_metrics import TITLES as MAP_TITLES
from fgdist.retrieval_metrics import metric_names
from fgdist.training.tracking import resolve_uri

DPI = 120  # plots: text-heavy, read on screen
RECALL = re.compile(r"^(super|fine)_recall_at_(\d+)$")
META_COLUMNS = ["run", "objective", "dataset", "lambda_I"]
CHANCE_PARAM = "instance_ce_chance"  # the trainer's param: the instance CE at chance
EPOCH_METRIC = "epoch"  # the trainer's fractional epochs done, logged beside each step's metrics
LEAVES_COLUMN = "instance_ce_leaves_chance"
# "Leaves chance" means the epoch's mean instance CE is below chance by more than this fraction of
# it, not merely below: a random head's softmax is not quite uniform (its CE starts a little off
# ln n) and a logged value is one step's batch mean, so values just under chance are noise. 5% of
# ln n means the target's probability is, in geometric mean, n^0.05 times uniform (1.4x at n=1000).
LEAVE_CHANCE_MARGIN = 0.05
FROM_START = "from start"
NEVER = "never"
# Step metrics the trainer logs (fgdist.training.trainer.Trainer.train_epoch); one panel each, the head's
# learning rate shares the panel of the backbone's.
CURVE_PANELS = [
    ("loss", ["loss"]),
    ("super_ce", ["super_ce"]),
    ("instance_ce", ["instance_ce"]),
    ("fine_ce", ["fine_ce"]),
    ("learning rate (head: dashed)", ["lr", "head_lr"]),
    ("images/s", ["images_per_s"]),
]


class ComparisonError(RuntimeError):
    """Nothing to compare (no such experiment, no runs, unknown run id); the message says where."""


@dataclass(frozen=True)
class RunInfo:
    """What the table needs of one MLflow run."""

    run_id: str
    name: str
    status: str
    objective: str
    dataset: str
    lambda_I: str
    metrics: dict[str, float]  # latest value of each metric
    start_time: int
    instance_ce_chance: float | None = None  # the instance CE at chance (param), if the run logged it
    params: dict[str, str] = field(default_factory=dict)  # the flattened config (--group-by reads it)


@dataclass(frozen=True)
class InstanceCurve:
    """One run's logged instance CE against the fractional epochs done, and its chance level."""

    epochs: list[float]
    values: list[float]
    chance: float

    def epoch_means(self) -> dict[int, float]:
        """1-based epoch -> mean of the values logged in it (a value at e in (k-1, k] is epoch k's)."""
        sums: dict[int, list[float]] = {}
        for e, v in zip(self.epochs, self.values):
            sums.setdefault(max(1, math.ceil(round(e, 9))), []).append(v)
        return {k: sum(vs) / len(vs) for k, vs in sorted(sums.items())}

    def leaves_chance(self) -> int | str:
        """The first epoch whose mean is below chance by more than LEAVE_CHANCE_MARGIN; FROM_START
        when the first logged value already is, NEVER when no epoch is."""
        threshold = self.chance * (1 - LEAVE_CHANCE_MARGIN)
        if self.values and self.values[0] < threshold:
            return FROM_START
        return next((k for k, mean in self.epoch_means().items() if mean < threshold), NEVER)


def column_title(key: str) -> str:
    m = RECALL.match(key)
    if m:
        return f"{m.group(1)} R@{m.group(2)}"
    return {
        "run": "run",
        "objective": "objective",
        "dataset": "data set",
        "lambda_I": "lambda_I",
        "super_top1": "super top-1",
        "super_top5": "super top-5",
        LEAVES_COLUMN: "instance CE leaves chance (epoch)",
        **MAP_TITLES,
    }.get(key, key)


# -- reading MLflow ----------------------------------------------------------------------------
def open_client(uri: str):
    """An MlflowClient for `uri`; a SQLite store must already exist (MlflowClient would otherwise
    silently create an empty database and report 'no experiment')."""
    from mlflow import MlflowClient

    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        # MLflow's client retries a refused connection for minutes; a command should say at once.
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # something answered (a proxy may guard /health); let MLflow talk to it
        except OSError as err:
            raise ComparisonError(f"cannot reach the MLflow server at {uri} ({err})") from None
    if parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if path is not None and not path.is_file():
            raise ComparisonError(
                f"no MLflow store at {uri}: {path} does not exist (pass --tracking-uri or set MLFLOW_TRACKING_URI)"
            )
    return MlflowClient(tracking_uri=uri)


def load_runs(client, experiment: str, run_ids: list[str] | None = None) -> list[RunInfo]:
    """The experiment's active runs, or the given ones (which must belong to it)."""
    uri = client.tracking_uri
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as err:  # an unreachable server or a broken store: say which
        raise ComparisonError(
            f"cannot read experiment {experiment!r} from {uri}: {type(err).__name__}: {str(err)[:300]}"
        ) from None
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ComparisonError(
            f"experiment {experiment!r} not found at {uri} (experiments there: {', '.join(names) or 'none'})"
        )
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                run = client.get_run(run_id)
            except Exception as err:  # MLflow raises its own exception for an unknown id
                raise ComparisonError(
                    f"run {run_id} not found at {uri} ({type(err).__name__}: {str(err)[:200]})"
                ) from None
            if run.info.experiment_id != exp.experiment_id:
                raise ComparisonError(f"run {run_id} is not in experiment {experiment!r} at {uri}")
            runs.append(run)
    else:
        runs, token = [], None
        while True:
            page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    if not runs:
        raise ComparisonError(f"experiment {experiment!r} at {uri} has no runs")
    return [run_info(r) for r in runs]


def run_info(run) -> RunInfo:
    """Tags first (set by the trainer for the UI), else the flattened config params."""
    tags, params = run.data.tags, run.data.params
    shards = tags.get("dataset") or params.get("data.shards") or ""
    chance = params.get(CHANCE_PARAM)
    try:
        chance = None if chance is None else float(chance)
    except ValueError:
        raise ComparisonError(f"run {run.info.run_id}: param {CHANCE_PARAM}={chance!r} is not a number") from None
    return RunInfo(
        run_id=run.info.run_id,
        name=run.info.run_name or tags.get("mlflow.runName") or run.info.run_id[:8],
        status=run.info.status,
        objective=tags.get("objective") or params.get("objective.name") or "?",
        dataset=Path(shards.rstrip("/")).name or shards,  # data/synthetic -> synthetic
        lambda_I=tags.get("lambda_I") or params.get("objective.lambda_I") or "",
        metrics=dict(run.data.metrics),
        start_time=run.info.start_time or 0,
        instance_ce_chance=chance,
        params=dict(params),
    )


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every value logged under `key`, by step, then by time (a run resumed from
    an earlier checkpoint logs some steps again; the later value is last)."""
    points = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
    return [(step, value) for step, _, value in points]


def instance_curves(client, runs: list[RunInfo]) -> dict[str, InstanceCurve]:
    """Run id -> its instance CE curve, for the runs that logged instance_ce, the epoch and the
    chance level. A step logged twice counts once, with its later value."""
    curves = {}
    for r in runs:
        if r.instance_ce_chance is None or not {"instance_ce", EPOCH_METRIC} <= r.metrics.keys():
            continue
        epoch_at = dict(metric_history(client, r.run_id, EPOCH_METRIC))
        values = dict(metric_history(client, r.run_id, "instance_ce"))
        points = [(epoch_at[step], v) for step, v in sorted(values.items()) if step in epoch_at]
        if points:
            epochs, ces = zip(*points)
            curves[r.run_id] = InstanceCurve(list(epochs), list(ces), r.instance_ce_chance)
    return curves


# -- the table ---------------------------------------------------------------------------------
def _order(objective: str) -> tuple:
    if objective in OBJECTIVES:
        return (OBJECTIVE_NAMES.index(objective), "")
    return (len(OBJECTIVE_NAMES), objective)


def _lambda_sort(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.inf


def sort_runs(runs: list[RunInfo]) -> list[RunInfo]:
    """Objective in the paper's order (base, fine, indi, base_indi, base_indi_eff, then others),
    then name, lambda_I, start time and id: the same runs always give the same table."""
    return sorted(runs, key=lambda r: (_order(r.objective), r.name, _lambda_sort(r.lambda_I), r.start_time, r.run_id))


def metric_columns(runs: list[RunInfo]) -> list[str]:
    """super top-1, top-5, then super R@k and fine R@k for every k some run logged."""
    ks = {"super": set(), "fine": set()}
    for r in runs:
        for key in r.metrics:
            m = RECALL.match(key)
            if m:
                ks[m.group(1)].add(int(m.group(2)))
    columns = [k for k in ("super_top1", "super_top5") if any(k in r.metrics for r in runs)]
    for label in ("super", "fine"):
        columns += [f"{label}_recall_at_{k}" for k in sorted(ks[label])]
    columns += [c for label in ("super", "fine") for c in metric_names(label) if any(c in r.metrics for r in runs)]
    return columns


def run_labels(runs: list[RunInfo]) -> dict[str, str]:
    """Run id -> its name, with the id's start where runs share a name."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    return {r.run_id: r.name if counts[r.name] == 1 else f"{r.name} ({r.run_id[:8]})" for r in runs}


def comparison_table(
    runs: list[RunInfo], curves: dict[str, InstanceCurve] | None = None
) -> tuple[list[str], list[list]]:
    """(column keys, rows). A row holds run name, objective, data set, lambda_I (strings; "-"
    where the objective has no lambda_I) and then each metric's latest value or None; with
    `curves` (instance_curves) holding any run, last the epoch its instance CE leaves chance."""
    runs = sort_runs([r if isinstance(r, RunInfo) else run_info(r) for r in runs])  # RunInfo or mlflow Run
    metrics = metric_columns(runs)
    curves = {r.run_id: curves[r.run_id] for r in runs if curves and r.run_id in curves}
    labels = run_labels(runs)
    rows = []
    for r in runs:
        name = labels[r.run_id]
        if r.status != "FINISHED":
            name += f" [{r.status.lower()}]"  # its metrics may be interim or missing
        # lambda_I means something only where it weighs the instance term (Eqn 4, 5).
        uses_lambda = r.objective in OBJECTIVES and OBJECTIVES[r.objective].lambda_weighted
        lam = r.lambda_I if uses_lambda and r.lambda_I else "-"
        rows.append([name, r.objective, r.dataset, lam] + [r.metrics.get(k) for k in metrics])
        if curves:
            rows[-1].append(curves[r.run_id].leaves_chance() if r.run_id in curves else None)
    return META_COLUMNS + metrics + ([LEAVES_COLUMN] if curves else []), rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def to_markdown(columns: list[str], rows: list[list], meta_columns: int = len(META_COLUMNS), title=column_title) -> str:
    """The first `meta_columns` columns left-aligned (names), the others right-aligned (numbers);
    `title(key)` heads a column."""
    titles = [title(c) for c in columns]
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(t)] + [len(row[i]) for row in cells]) for i, t in enumerate(titles)]
    numeric = [i >= meta_columns for i in range(len(columns))]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(titles), rule] + [line(r) for r in cells]) + "\n"


def write_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    """Column keys as the header (MLflow metric names); empty cells where a run lacks a metric,
    full precision, so that the CSV can be read back as numbers."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in row])


# -- plots -------------------------------------------------------------------------------------
def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def run_colours(runs: list[RunInfo]) -> dict[str, tuple]:
    """Run id -> its colour, the same in every figure of one comparison."""
    return dict(zip([r.run_id for r in sort_runs(runs)], _colors(len(runs))))


def plot_recall(path: Path, columns: list[str], rows: list[list]) -> bool:
    """R@k against k: one colour per run, fine solid, super dashed. False when no run has any
    Recall@k (nothing to draw)."""
    series = []
    for row in rows:
        values = dict(zip(columns, row))
        for label, style in (("fine", "-"), ("super", "--")):
            points = sorted(
                (int(RECALL.match(c).group(2)), v)
                for c, v in values.items()
                if v is not None and RECALL.match(c) and RECALL.match(c).group(1) == label
            )
            if points:
                series.append((row[0], label, style, points))
    if not series:
        return False
    names = list(dict.fromkeys(s[0] for s in series))
    color = dict(zip(names, _colors(len(names))))
    fig = new_figure(7.5, 4.5, DPI)
    ax = fig.add_subplot()
    for name, label, style, points in series:
        ks, vs = zip(*points)
        ax.plot(ks, vs, style, marker="o", markersize=4, color=color[name], label=f"{name} {label}")
    all_k = sorted({k for s in series for k, _ in s[3]})
    if all_k[-1] / all_k[0] > 10:  # more than a decade (SOP: 1..1000)
        ax.set_xscale("log")
    ax.set_xticks(all_k, [str(k) for k in all_k])
    ax.minorticks_off()
    ax.set_xlabel("k")
    ax.set_ylabel("Recall@k (%)")
    ax.set_title("Recall@k on the test split (fine solid, super dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, bbox_inches="tight")
    return True


def plot_curves(path: Path, client, runs: list[RunInfo]) -> bool:
    """Metric histories against the global step, one panel per logged quantity; the head's
    learning rate dashed beside the backbone's. False when no run has any step metric."""
    runs = sort_runs(runs)
    histories: dict[tuple[str, str], list] = {}
    for r in runs:
        for _, keys in CURVE_PANELS:
            for key in keys:
                if key in r.metrics:
                    histories[(r.run_id, key)] = metric_history(client, r.run_id, key)
    panels = [
        (title, keys) for title, keys in CURVE_PANELS if any((r.run_id, k) in histories for r in runs for k in keys)
    ]
    if not panels:
        return False
    color = run_colours(runs)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = new_figure(4.2 * cols, 3.2 * nrows, DPI)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for r in runs:
            for key, style in zip(keys, ("-", "--")):
                if (r.run_id, key) in histories:
                    steps, values = zip(*histories[(r.run_id, key)])
                    # Markers where the points are few: a run logged once would not show as a line.
                    ax.plot(
                        steps,
                        values,
                        style,
                        color=color[r.run_id],
                        linewidth=1.2,
                        marker="o" if len(steps) <= 30 else None,
                        markersize=3,
                    )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    # One legend entry per run (a run's colour is the same in every panel).
    labels = run_labels(runs)
    handles = [Line2D([], [], color=color[r.run_id], label=labels[r.run_id]) for r in runs]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(handles)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    return True


def plot_instance_ce(path: Path, runs: list[RunInfo], curves: dict[str, InstanceCurve]) -> bool:
    """Instance CE against epoch, one line per run in `curves`, its chance level dotted in its
    colour and a star where it leaves chance (at the epoch's mean; at the first value when it is
    below from the start). False when no run has a curve."""
    # Over all runs: a run has the colour and name it has in training_curves.png.
    color, labels = run_colours(runs), run_labels(runs)
    runs = [r for r in sort_runs(runs) if r.run_id in curves]
    if not runs:
        return False
    fig = new_figure(7.5, 4.5, DPI)
    ax = fig.add_subplot()
    for i, r in enumerate(runs):
        curve, c = curves[r.run_id], color[r.run_id]
        few = len(curve.epochs) <= 30  # markers, as in plot_curves, where a line alone would hardly show
        ax.plot(curve.epochs, curve.values, "-", color=c, linewidth=1.2, marker="o" if few else None, markersize=3)
        # Dotted, each run's dots offset from the others': runs on the same data with the same
        # kind of instance term share a chance level, and their dotted lines interleave.
        dots = (2 * i, (2, 2 * max(1, len(runs) - 1)))
        ax.axhline(curve.chance, color=c, linestyle=dots, linewidth=1.5)
        leaves = curve.leaves_chance()
        if leaves == FROM_START:
            ax.plot(curve.epochs[0], curve.values[0], "*", color=c, markersize=12)
        elif leaves != NEVER:
            ax.plot(leaves, curve.epoch_means()[leaves], "*", color=c, markersize=12)
        when = f"epoch {leaves}" if isinstance(leaves, int) else leaves
        ax.plot([], [], "-", color=c, label=f"{labels[r.run_id]} (leaves chance: {when})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("instance CE")
    ax.set_title(
        f"Instance CE (dotted: chance; star: the first epoch whose mean is {LEAVE_CHANCE_MARGIN:.0%} below)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, bbox_inches="tight")
    return True


# -- the command -------------------------------------------------------------------------------
def parse_args(argv=None):
    p = cli.parser("fgdist-compare", __doc__)
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument(
        "--runs", nargs="+", metavar="ID", help="only these run ids (default: all active runs of the experiment)"
    )
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--out", default=".", help="folder for comparison.csv, comparison.md, recall_at_k.png")
    p.add_argument(
        "--curves",
        action="store_true",
        help="also write training_curves.png and instance_ce.png from the metric histories",
    )
    p.add_argument(
        "--baseline",
        metavar="RUN",
        help="a run id or name: each run's difference to it with a 95%% paired bootstrap interval",
    )
    p.add_argument(
        "--group-by",
        metavar="KEY",
        help="a run param (objective.name, objective.lambda_I_schedule, ...), or several joined by commas "
        "(objective.name,num_unlabeled): mean +- standard error per value",
    )
    return p.parse_args(argv)


def differences_report(client, runs: list[RunInfo], baseline: str | None, group_by: str | None):
    """--baseline / --group-by: fgdist.report.differences' report, or None without either flag."""
    if not (baseline or group_by):
        return None
    from fgdist.report.differences import build_report  # it builds on this module's tables

    return build_report(client, runs, baseline, group_by)


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.run_reporting(lambda: _compare(args), (ComparisonError,))


def _compare(args) -> int:
    uri = resolve_uri(args.tracking_uri)
    client = open_client(uri)
    runs = load_runs(client, args.experiment, args.runs)
    extra = differences_report(client, runs, args.baseline, args.group_by)
    curves = instance_curves(client, runs)
    columns, rows = comparison_table(runs, curves)
    table = to_markdown(columns, rows)
    caption = (
        f"\nExperiment `{args.experiment}` at {uri}: {len(rows)} run(s); "
        "percentages, each run's latest logged value; - = not logged.\n"
    )
    print(table + caption)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table + caption)
    write_csv(out / "comparison.csv", columns, rows)
    written = [out / "comparison.md", out / "comparison.csv"]
    if plot_recall(out / "recall_at_k.png", columns, rows):
        written.append(out / "recall_at_k.png")
    else:
        print("note: no run logged Recall@k, so there is no recall_at_k.png", file=sys.stderr)
    if args.curves:
        if plot_curves(out / "training_curves.png", client, runs):
            written.append(out / "training_curves.png")
        else:
            print("note: no run logged step metrics, so there is no training_curves.png", file=sys.stderr)
        if plot_instance_ce(out / "instance_ce.png", runs, curves):
            written.append(out / "instance_ce.png")
        else:
            print(
                "note: no run logged instance_ce with its epoch and chance level, so there is no instance_ce.png",
                file=sys.stderr,
            )
    if extra is not None:
        print(extra.text)
        written += extra.write(out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
