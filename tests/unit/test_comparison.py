"""The compare command over a real local MLflow store: the printed table, the CSV and the plots
hold the runs' latest logged values, "-" where a run lacks a metric, in the paper's order; the
epoch each run's instance CE leaves chance comes from its logged history."""

import csv

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from fgdist.objective_table import OBJECTIVES
from fgdist.report.comparison import LEAVES_COLUMN, comparison_table, instance_curves, load_runs, main
from fgdist.training.objectives import instance_ce_chance
from tests.helpers import free_port

# (run name, objective, lambda_I, final metrics); `indi` has no super head, so no super top-k.
RUNS = [
    (
        "eff-a",
        "base_indi_eff",
        0.5,
        {
            "super_top1": 86.5,
            "super_top5": 99.0,
            "super_recall_at_1": 80.25,
            "super_recall_at_8": 95.0,
            "fine_recall_at_1": 56.62,
            "fine_recall_at_8": 81.0,
        },
    ),
    (
        "indi-a",
        "indi",
        1.0,
        {"super_recall_at_1": 60.0, "super_recall_at_8": 88.5, "fine_recall_at_1": 40.125, "fine_recall_at_8": 70.0},
    ),
    (
        "base-a",
        "base",
        1.0,
        {
            "super_top1": 85.6,
            "super_top5": 98.75,
            "super_recall_at_1": 82.0,
            "super_recall_at_8": 96.0,
            "fine_recall_at_1": 37.06,
            "fine_recall_at_8": 66.0,
        },
    ),
    (
        "fine-a",
        "fine",
        1.0,
        {"super_recall_at_1": 84.0, "super_recall_at_8": 97.0, "fine_recall_at_1": 71.77, "fine_recall_at_8": 90.0},
    ),
    (
        "bi-a",
        "base_indi",
        2.0,
        {
            "super_top1": 86.27,
            "super_top5": 99.5,
            "super_recall_at_1": 81.0,
            "super_recall_at_8": 95.5,
            "fine_recall_at_1": 56.95,
            "fine_recall_at_8": 82.0,
        },
    ),
]
ORDER = ["base-a", "fine-a", "indi-a", "bi-a", "eff-a"]  # base, fine, indi, base_indi, base_indi_eff
STEPS_PER_EPOCH = 2  # 6 logged steps: 3 epochs
# The runs with an instance term: softmax group sizes, the logged instance CE per step as a
# fraction of chance, and the epoch it leaves chance (by more than 5%: below 0.95).
INSTANCE = {
    # Epoch means 1.025, 0.96 (0.94 alone is below: the mean decides), 0.775.
    "eff-a": ([2, 4, 6], [1.05, 1.0, 0.98, 0.94, 0.8, 0.75], "3"),
    "indi-a": ([12], [1.02, 0.97, 0.975, 0.96, 0.99, 0.955], "never"),  # means 0.995, 0.9675, 0.9725
    "bi-a": ([12], [0.3, 0.25, 0.2, 0.2, 0.15, 0.1], "from start"),  # head.init=features
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with the runs above, logged the way the trainer logs them: params, tags,
    step metrics, an interim evaluation and a final one (the table must show the final)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("cmp")
        ids = {}
        for i, (name, objective, lam, final) in enumerate(RUNS):
            with mlflow.start_run(run_name=name) as run:
                mlflow.log_params(
                    {"objective.name": objective, "objective.lambda_I": str(lam), "data.shards": "data/synthetic"}
                )
                if i % 2 == 0:  # the others are read from the params alone
                    mlflow.set_tags({"objective": objective, "dataset": "data/synthetic", "lambda_I": str(lam)})
                if name in INSTANCE:
                    sizes, ratios, _ = INSTANCE[name]
                    chance = instance_ce_chance(sizes)
                    mlflow.log_param("instance_ce_chance", repr(chance))
                for step in range(1, 7):
                    mlflow.log_metrics(
                        {
                            "loss": 5.0 / step + i,
                            "lr": 0.1,
                            "images_per_s": 100.0 + step,
                            "epoch": step / STEPS_PER_EPOCH,
                        },
                        step=step,
                    )
                    if OBJECTIVES[objective].instance is not None:
                        mlflow.log_metrics({"instance_ce": ratios[step - 1] * chance, "head_lr": 0.1}, step=step)
                mlflow.log_metrics({k: v / 2 for k, v in final.items()}, step=3)  # interim evaluation
                mlflow.log_metrics(final, step=6)
                ids[name] = run.info.run_id
        mlflow.set_experiment("bad-chance")
        with mlflow.start_run(run_name="bad") as run:
            mlflow.log_params({"objective.name": "base_indi_eff", "instance_ce_chance": "ln 12"})
            ids["bad"] = run.info.run_id
        mlflow.set_experiment("empty")
    finally:
        mlflow.set_tracking_uri(previous)
    return uri, ids


def parse_markdown(text):
    """{run: {column title: cell}} and the row order, from the printed table."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {r[0]: dict(zip(header, r)) for r in rows}, [r[0] for r in rows], header


def test_printed_table_holds_latest_metrics(store, tmp_path, capsys):
    uri, ids = store
    assert main(["--experiment", "cmp", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    table, order, header = parse_markdown(capsys.readouterr().out)
    assert order == ORDER
    assert header == [
        "run",
        "objective",
        "data set",
        "lambda_I",
        "super top-1",
        "super top-5",
        "super R@1",
        "super R@8",
        "fine R@1",
        "fine R@8",
        "instance CE leaves chance (epoch)",
    ]
    client = MlflowClient(uri)
    titles = {
        "super_top1": "super top-1",
        "super_top5": "super top-5",
        "super_recall_at_1": "super R@1",
        "super_recall_at_8": "super R@8",
        "fine_recall_at_1": "fine R@1",
        "fine_recall_at_8": "fine R@8",
    }
    for name, objective, lam, final in RUNS:
        row = table[name]
        logged = client.get_run(ids[name]).data.metrics
        assert row["objective"] == objective and row["data set"] == "synthetic"
        assert row["lambda_I"] == (str(lam) if objective in ("base_indi", "base_indi_eff") else "-")  # Eqn 4, 5
        for key, title in titles.items():
            if key in final:
                assert row[title] == f"{logged[key]:.2f}" == f"{final[key]:.2f}", (name, key)
            else:
                assert row[title] == "-", (name, key)
    assert table["indi-a"]["super top-1"] == "-" and table["indi-a"]["super top-5"] == "-"
    for name in ORDER:
        want = INSTANCE[name][2] if name in INSTANCE else "-"  # base, fine: no instance term
        assert table[name]["instance CE leaves chance (epoch)"] == want, name
    assert (tmp_path / "comparison.md").read_text().startswith("| run")
    assert not (tmp_path / "instance_ce.png").exists() and not (tmp_path / "training_curves.png").exists()


def test_csv_and_plots(store, tmp_path):
    uri, ids = store
    assert main(["--experiment", "cmp", "--tracking-uri", uri, "--out", str(tmp_path), "--curves"]) == 0
    with open(tmp_path / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ORDER
    by_name = {r["run"]: r for r in rows}
    for name, _, _, final in RUNS:
        for key in (
            "super_top1",
            "super_top5",
            "super_recall_at_1",
            "super_recall_at_8",
            "fine_recall_at_1",
            "fine_recall_at_8",
        ):
            assert by_name[name][key] == (repr(final[key]) if key in final else ""), (name, key)
        assert by_name[name][LEAVES_COLUMN] == (INSTANCE[name][2] if name in INSTANCE else ""), name
    for png in ("recall_at_k.png", "training_curves.png", "instance_ce.png"):
        with Image.open(tmp_path / png) as img:
            img.verify()
        with Image.open(tmp_path / png) as img:
            assert img.format == "PNG" and img.width > 400 and img.height > 300
            colours = np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)
            assert len(colours) > 20  # curves drawn, not a blank canvas
    # instance_ce.png: each instance run in its colour (tab10 in the table's order, as in the
    # other figures), the runs without an instance term absent.
    tab10 = {
        name: rgb
        for name, rgb in zip(ORDER, [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)])
    }
    with Image.open(tmp_path / "instance_ce.png") as img:
        pixels = {tuple(c) for c in np.asarray(img.convert("RGB")).reshape(-1, 3)}
    for name, rgb in tab10.items():
        assert (rgb in pixels) == (name in INSTANCE), name


def test_selected_runs_and_library_table(store, tmp_path, capsys):
    uri, ids = store
    assert (
        main(
            [
                "--experiment",
                "cmp",
                "--tracking-uri",
                uri,
                "--out",
                str(tmp_path),
                "--runs",
                ids["eff-a"],
                ids["base-a"],
            ]
        )
        == 0
    )
    _, order, _ = parse_markdown(capsys.readouterr().out)
    assert order == ["base-a", "eff-a"]
    columns, rows = comparison_table(load_runs(MlflowClient(uri), "cmp"))
    assert columns[:4] == ["run", "objective", "dataset", "lambda_I"]
    indi = rows[ORDER.index("indi-a")]
    assert indi[columns.index("super_top1")] is None and indi[columns.index("fine_recall_at_1")] == 40.125
    assert LEAVES_COLUMN not in columns  # without the histories, the table is the metrics' alone

    runs = load_runs(MlflowClient(uri), "cmp")
    curves = instance_curves(MlflowClient(uri), runs)
    assert set(curves) == {ids[name] for name in INSTANCE}
    for name, (sizes, ratios, _) in INSTANCE.items():
        curve = curves[ids[name]]
        assert curve.chance == instance_ce_chance(sizes)  # the param, read back at full precision
        assert curve.epochs == [s / STEPS_PER_EPOCH for s in range(1, 7)]
        assert curve.values == pytest.approx([r * curve.chance for r in ratios])
    columns, rows = comparison_table(runs, curves)
    assert columns[-1] == LEAVES_COLUMN
    assert [row[-1] for row in rows] == [None, None, "never", "from start", 3]


def test_clear_errors(store, tmp_path, capsys):
    uri, ids = store
    assert main(["--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'nope' not found" in err and uri in err and "cmp" in err  # names what exists there
    assert main(["--experiment", "empty", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'empty'" in err and "has no runs" in err and uri in err
    assert main(["--experiment", "bad-chance", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"run {ids['bad']}: param instance_ce_chance='ln 12' is not a number" in err
    missing = f"sqlite:///{tmp_path}/absent.db"
    assert main(["--experiment", "cmp", "--tracking-uri", missing]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "absent.db").exists()
    nobody = f"http://127.0.0.1:{free_port()}"
    assert main(["--experiment", "cmp", "--tracking-uri", nobody]) == 2
    assert f"cannot reach the MLflow server at {nobody}" in capsys.readouterr().err
    assert not (tmp_path / "comparison.csv").exists()
